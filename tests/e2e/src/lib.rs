//! Harness of the cross-crate tests (`tests/e2e/tests/`): the test control
//! plane (`HT_TEST_KUBECONFIG`, started by `tests/run`), helm (`HT_HELM`),
//! the chart's alerting rules and dashboard with promtool and Prometheus
//! ([`monitoring`]),
//! the built gateway and operator binaries, namespaces, and waiting; and for
//! the node tier (`tests/e2e/tests/node.rs`) the real node ([`node`]), a
//! backend the pods reach ([`backend`]) and 3.x clients and publishers ([`ws`]).

#![forbid(unsafe_code)]

pub mod backend;
pub mod monitoring;
pub mod node;
pub mod ws;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use serde_json::json;

/// How long any wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// RabbitMQ of the tests (`tests/rabbitmq.sh` starts it).
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Path of the test control plane's admin kubeconfig.
pub fn kubeconfig_path() -> String {
    std::env::var("HT_TEST_KUBECONFIG").unwrap_or_else(|_| {
        panic!(
            "HT_TEST_KUBECONFIG is not set: these tests need the test control plane. Run tests/run, which builds and \
             starts kube-apiserver + etcd, or: W=$(mktemp -d); tests/controlplane/start.sh $W; \
             export HT_TEST_KUBECONFIG=$W/kubeconfig HT_HELM=$HOME/.cache/high-templar/bin/helm"
        )
    })
}

/// An admin client of the test control plane.
pub async fn client() -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).expect("read the test kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    Client::try_from(config).expect("client")
}

/// A tool of the cache (`$HT_<NAME>` or `~/.cache/high-templar/bin/<name>`,
/// built by `tests/controlplane/ensure-tools.sh`); fails the test, saying
/// how to build it, when missing.
pub fn cached_tool(env: &str, name: &str) -> PathBuf {
    let path = std::env::var(env).map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/high-templar/bin").join(name)
    });
    assert!(
        path.exists(),
        "{name} not found at {}: run tests/run or tests/controlplane/ensure-tools.sh {name}",
        path.display()
    );
    path
}

/// The `helm` binary built by `tests/controlplane/ensure-tools.sh`.
pub fn helm() -> PathBuf {
    cached_tool("HT_HELM", "helm")
}

/// A binary of the workspace, built next to the test executable.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe.parent().and_then(|deps| deps.parent()).expect("target dir").join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo test --workspace` (tests/run does), or `cargo build -p {name}` first",
        path.display()
    );
    path
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Polls `f` until it returns `Some`, or fails the test after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, WAIT, f).await
}

/// Polls `f` until it returns `Some`, or fails the test after `limit`.
pub async fn eventually_within<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Installs the HighTemplar CRD (server-side apply) and waits until served.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = high_templar_operator::crd::HighTemplar::crd();
    crds.patch(&crd.name_any(), &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("the apiserver accepts the CRD");
    eventually("CRD established", || async {
        let crd = crds.get("hightemplars.hightemplar.io").await.ok()?;
        crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

/// Creates namespace `name`; panics if the apiserver refuses.
pub async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns"))
        .await
        .expect("create namespace");
}

/// Deletes namespace `name` (best effort: cleanup must not fail a test).
pub async fn delete_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(name, &DeleteParams::default()).await;
}

/// A namespace of its own for one test; deleted by [`Namespaced::delete`].
pub struct Namespaced {
    /// Admin client.
    pub client: Client,
    /// The namespace.
    pub name: String,
}

impl Namespaced {
    /// Creates `<prefix>-<pid>`.
    pub async fn create(client: &Client, prefix: &str) -> Namespaced {
        let name = format!("{prefix}-{}", std::process::id());
        create_namespace(client, &name).await;
        Namespaced { client: client.clone(), name }
    }

    /// A namespaced API in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Applies a Secret with one key.
    pub async fn secret(&self, name: &str, key: &str, value: &str) {
        let secret =
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {key: value}});
        self.api::<k8s_openapi::api::core::v1::Secret>()
            .patch(name, &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&secret))
            .await
            .expect("apply secret");
    }

    /// Deletes the namespace (best effort).
    pub async fn delete(self) {
        delete_namespace(&self.client, &self.name).await;
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// `GET http://127.0.0.1:<port><path>`: status code and raw response, if
/// anything answered.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out))
}

/// The status code of `GET http://127.0.0.1:<port><path>`, if anything answered.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).await.map(|(status, _)| status)
}
