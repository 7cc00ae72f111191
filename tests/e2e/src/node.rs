//! The real single-node Kubernetes of the node tier (`tests/node/start.sh`,
//! started by `tests/run`): its kubeconfig, `kubectl`/`helm` against it, its
//! RabbitMQ, its containerd, and the addresses of the host and the node.
//!
//! Everything here talks to addresses inside the node's network namespace
//! (the node, pod and Service networks) or to the host end of its veth pair.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// A running node, as described by the `env` file its `start.sh` wrote.
pub struct Node {
    /// The node's work directory (`HT_TEST_NODE`).
    pub dir: PathBuf,
    /// The variables of `<dir>/env`.
    env: HashMap<String, String>,
}

impl Node {
    /// The node started by `tests/run` (`HT_TEST_NODE` names its work
    /// directory); fails the test, saying how to start one, when there is none.
    pub fn from_env() -> Node {
        let dir = std::env::var("HT_TEST_NODE").map(PathBuf::from).unwrap_or_else(|_| {
            panic!(
                "HT_TEST_NODE is not set: these tests need the real node. Run tests/run, or: images/build.sh; \
                 W=$(mktemp -d); tests/node/start.sh $W target/images/*.oci.tar; export HT_TEST_NODE=$W"
            )
        });
        let text = std::fs::read_to_string(dir.join("env"))
            .unwrap_or_else(|e| panic!("{}/env: {e}: is the node running (tests/node/start.sh)?", dir.display()));
        Node { env: parse_env(&text), dir }
    }

    /// A variable of the env file; fails the test when missing.
    pub fn var(&self, name: &str) -> &str {
        self.env.get(name).unwrap_or_else(|| panic!("{name} missing from {}/env", self.dir.display()))
    }

    /// The node's admin kubeconfig.
    pub fn kubeconfig(&self) -> &str {
        self.var("KUBECONFIG")
    }

    /// The node's address (inside its namespace).
    pub fn node_ip(&self) -> IpAddr {
        self.var("NODE_IP").parse().expect("NODE_IP is an address")
    }

    /// The host end of the veth pair: pods reach host processes bound here.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.var("HOST_IP").parse().expect("HOST_IP is an IPv4 address")
    }

    /// The URL of the node's own RabbitMQ, as pods and the host reach it.
    pub fn amqp_url(&self) -> &str {
        self.var("NODE_AMQP_URL")
    }

    /// An admin client of the node's apiserver.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("read the node kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("usable kubeconfig");
        Client::try_from(config).expect("client")
    }

    /// Directory of `kubectl` and `helm` (the tool cache's `bin/`), to put
    /// first on `PATH`.
    pub fn bin_dir(&self) -> PathBuf {
        PathBuf::from(self.var("HT_BIN"))
    }

    /// A command with `KUBECONFIG` and `PATH` set for this node.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        let path = format!("{}:{}", self.bin_dir().display(), std::env::var("PATH").unwrap_or_default());
        c.env("KUBECONFIG", self.kubeconfig()).env("PATH", path);
        c
    }

    /// `kubectl ARGS`; fails the test when kubectl does.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.command(self.var("HT_KUBECTL")).args(args).output().expect("run kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What a person debugging a pod that never became Ready looks at
    /// first: the node's conditions (DiskPressure, MemoryPressure, …), the
    /// free space of its disk, the pods and recent events of `namespaces`.
    /// Never fails: a broken apiserver is itself the report.
    pub fn report(&self, namespaces: &[&str]) -> String {
        let run = |args: &[&str]| match self.command(self.var("HT_KUBECTL")).args(args).output() {
            Ok(out) => format!(
                "$ kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("$ kubectl {}: {e}\n", args.join(" ")),
        };
        let conditions = "custom-columns=NODE:.metadata.name,CONDITIONS:.status.conditions[*].type,STATUS:.status.conditions[*].status,REASONS:.status.conditions[*].reason";
        let mut report = run(&["get", "nodes", "-o", conditions]);
        if let Ok(out) = Command::new("df").arg("-h").arg(&self.dir).output() {
            report += &format!("$ df -h {}\n{}", self.dir.display(), String::from_utf8_lossy(&out.stdout));
        }
        for ns in namespaces {
            report += &run(&["get", "pods", "-n", ns, "-o", "wide"]);
            report += &run(&["get", "events", "-n", ns, "--sort-by=.lastTimestamp"]);
        }
        report
    }

    /// `helm ARGS`; fails the test when helm does.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = self.command(self.var("HT_HELM")).args(args).output().expect("run helm");
        assert!(out.status.success(), "helm {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the node's RabbitMQ; it starts again when the returned guard
    /// is dropped (or [`BrokerOutage::end`] is called), however the test ends.
    pub fn stop_rabbitmq(&self) -> BrokerOutage<'_> {
        self.rabbitmq("stop").unwrap_or_else(|e| panic!("{e}"));
        BrokerOutage { node: self, ended: false }
    }

    fn rabbitmq(&self, action: &str) -> Result<(), String> {
        let script = crate::repo_root().join("tests/node/rabbitmq.sh");
        let out = Command::new(&script).arg(&self.dir).arg(action).output().map_err(|e| format!("{script:?}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "tests/node/rabbitmq.sh {action}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// Kills a container (`containerd://<id>` from a Pod's status) with
    /// SIGKILL through the node's containerd, as an OOM kill or a crash would.
    pub fn kill_container(&self, container_id: &str) {
        let id = container_id.strip_prefix("containerd://").unwrap_or(container_id);
        let out = Command::new("ctr")
            .args(["--address", self.var("CONTAINERD_SOCK"), "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", id])
            .output()
            .expect("run ctr");
        assert!(out.status.success(), "ctr tasks kill {id}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The host pid of a container's main process.
    pub fn container_pid(&self, container_id: &str) -> u32 {
        let id = container_id.strip_prefix("containerd://").unwrap_or(container_id);
        let out = Command::new("ctr")
            .args(["--address", self.var("CONTAINERD_SOCK"), "-n", "k8s.io", "tasks", "ls"])
            .output()
            .expect("run ctr");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(id)).then(|| f.next().and_then(|p| p.parse().ok())).flatten()
            })
            .unwrap_or_else(|| panic!("no task {id} in `ctr tasks ls`: {text}"))
    }
}

/// The node's RabbitMQ, stopped; started again on [`BrokerOutage::end`] or drop.
pub struct BrokerOutage<'a> {
    /// The node.
    node: &'a Node,
    /// Whether it was started again.
    ended: bool,
}

impl BrokerOutage<'_> {
    /// Starts RabbitMQ again; fails the test when it does not start.
    pub fn end(mut self) {
        self.ended = true;
        self.node.rabbitmq("start").unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for BrokerOutage<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Already failing: the next tests need the broker back.
            if let Err(e) = self.node.rabbitmq("start") {
                eprintln!("could not start the node's RabbitMQ again: {e}");
            }
        }
    }
}

/// `export K=V` lines of an env file (values as `printf %q` writes simple
/// values: unquoted, or in single quotes).
fn parse_env(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v);
            (k.to_string(), v.replace("\\ ", " "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_env;

    #[test]
    fn env_lines_are_read() {
        let env = parse_env("# comment\nexport A=1\nexport B='x y'\nexport C=/p/q\n");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x y");
        assert_eq!(env["C"], "/p/q");
        assert_eq!(env.len(), 3);
    }
}
