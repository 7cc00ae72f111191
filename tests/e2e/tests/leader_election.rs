//! Two real operator processes on the test control plane: only the Lease
//! holder reconciles; when it stops, the other takes over. Also checks the
//! operator's `/healthz` and `/metrics`.

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::process::{Child, Command};

use high_templar_e2e::{
    WAIT, client, create_namespace, delete_namespace, free_port, http_get, install_crd, kubeconfig_path,
    workspace_binary,
};

fn operator(identity: &str, ns: &str, port: u16) -> Child {
    Command::new(workspace_binary("high-templar-operator"))
        .args(["run", "--namespace", ns, "--lease-namespace", ns, "--identity", identity])
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", kubeconfig_path())
        .env("HT_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn operator")
}

/// The body of a 200 answer.
async fn get(port: u16, path: &str) -> Option<String> {
    http_get(port, path).await.and_then(|(status, body)| (status == 200).then_some(body))
}

async fn is_leader(port: u16) -> bool {
    get(port, "/metrics").await.is_some_and(|m| m.lines().any(|l| l == "hightemplar_operator_leader 1"))
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt("high-templar-operator").await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn only_the_lease_holder_reconciles_and_the_other_takes_over() {
    let client = client().await;
    install_crd(&client).await;
    let ns = format!("leader-{}", std::process::id());
    create_namespace(&client, &ns).await;

    let (port_a, port_b) = (free_port(), free_port());
    let mut a = operator("replica-a", &ns, port_a);
    let mut b = operator("replica-b", &ns, port_b);
    eventually("both serve /healthz", || async {
        get(port_a, "/healthz").await.is_some() && get(port_b, "/healthz").await.is_some()
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    eventually("one replica leads", || async { is_leader(port_a).await || is_leader(port_b).await }).await;
    let leader = holder(&leases).await.expect("a holder");
    let (leader_port, follower_port) = if leader == "replica-a" { (port_a, port_b) } else { (port_b, port_a) };
    assert!(!is_leader(follower_port).await, "never two leaders");

    let hts: Api<high_templar_operator::crd::HighTemplar> = Api::namespaced(client.clone(), &ns);
    let apply = |name: &'static str| {
        let hts = hts.clone();
        async move {
            let obj = json!({"apiVersion": "hightemplar.io/v1alpha1", "kind": "HighTemplar", "metadata": {"name": name},
                             "spec": {"replicas": 1, "backend": {"url": "http://api/"}}});
            hts.patch(name, &PatchParams::apply("high-templar-tests").force(), &Patch::Apply(&obj))
                .await
                .expect("apply");
        }
    };
    apply("first").await;
    eventually("the leader reconciles", || async { hts.get("first").await.ok().and_then(|h| h.status).is_some() })
        .await;
    let metrics = get(leader_port, "/metrics").await.expect("metrics");
    assert!(metrics.contains("hightemplar_operator_reconciliations_total"), "{metrics}");
    let follower_metrics = get(follower_port, "/metrics").await.expect("metrics");
    assert!(
        follower_metrics.lines().any(|l| l == "hightemplar_operator_reconciliations_total 0"),
        "the follower reconciled: {follower_metrics}"
    );

    // The leader stops (SIGTERM releases the Lease); the follower takes over.
    let leader_child = if leader == "replica-a" { &mut a } else { &mut b };
    let pid = leader_child.id().expect("pid").to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let exit = tokio::time::timeout(WAIT, leader_child.wait()).await.expect("leader exits").expect("status");
    assert_eq!(exit.code(), Some(0));
    eventually("the follower leads", || async { is_leader(follower_port).await }).await;
    apply("second").await;
    eventually("the new leader reconciles", || async { hts.get("second").await.ok().and_then(|h| h.status).is_some() })
        .await;
    assert_ne!(holder(&leases).await, Some(leader));

    let _ = a.start_kill();
    let _ = b.start_kill();
    delete_namespace(&client, &ns).await;
}
