//! The chart's monitoring artefacts as the tests check them: the alerting
//! rules rendered by helm (the PrometheusRule's spec, a plain Prometheus
//! rule file), the dashboard's queries, the vector selectors of an
//! expression, and the `prometheus`/`promtool` binaries built by
//! `tests/controlplane/ensure-tools.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// `promtool` (Prometheus, pinned in tests/controlplane/go/prometheus).
pub fn promtool() -> PathBuf {
    crate::cached_tool("HT_PROMTOOL", "promtool")
}

/// `prometheus` (same module and version as [`promtool`]).
pub fn prometheus() -> PathBuf {
    crate::cached_tool("HT_PROMETHEUS", "prometheus")
}

/// The chart's alerting rules for a release in `namespace`, with default
/// values: the `spec` of the rendered PrometheusRule, as a rule file.
pub fn rendered_rules(namespace: &str) -> String {
    let chart = crate::repo_root().join("charts/high-templar");
    let out = Command::new(crate::helm())
        .args(["template", "high-templar"])
        .arg(&chart)
        .args(["--namespace", namespace, "--set", "monitoring.prometheusRule.enabled=true"])
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template: {}", String::from_utf8_lossy(&out.stderr));
    for doc in serde_yaml::Deserializer::from_slice(&out.stdout) {
        let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("rendered YAML");
        if value.get("kind").and_then(|k| k.as_str()) == Some("PrometheusRule") {
            return serde_yaml::to_string(&value["spec"]).expect("YAML");
        }
    }
    panic!("helm template rendered no PrometheusRule with monitoring.prometheusRule.enabled=true")
}

/// `(alert name, expression)` of every alert of a rule file.
pub fn alerts(rules: &str) -> Vec<(String, String)> {
    let file: serde_yaml::Value = serde_yaml::from_str(rules).expect("rule file");
    let groups = file["groups"].as_sequence().expect("groups");
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .filter_map(|r| Some((r["alert"].as_str()?.to_string(), r["expr"].as_str().expect("expr").to_string())))
        .collect()
}

/// `(panel title, expression)` of every query of the dashboard.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let path = crate::repo_root().join("charts/high-templar/dashboards/high-templar.json");
    let text = std::fs::read_to_string(&path).expect("dashboard JSON");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().expect("a title").to_string();
            queries.push((title, target["expr"].as_str().expect("an expr").to_string()));
        }
    }
    queries
}

/// A dashboard expression as Prometheus takes it: Grafana's variables
/// replaced (all namespaces, a rate window of `window`).
pub fn without_grafana_variables(expr: &str, window: &str) -> String {
    expr.replace("$namespace", ".+").replace("$__rate_interval", window)
}

/// The vector selectors of a PromQL expression: every `hightemplar_…`
/// metric name with its `{…}` matchers, if any. Enough for the project's
/// own expressions (no strings contain braces).
pub fn selectors(expr: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("hightemplar_") {
        let tail = &rest[at..];
        let name_len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        let mut end = name_len;
        if tail[name_len..].starts_with('{') {
            end = name_len + tail[name_len..].find('}').map_or(tail.len() - name_len, |i| i + 1);
        }
        found.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

/// A Prometheus server of the test: listens on 127.0.0.1, keeps its data
/// and its log in a directory of its own, and is killed on drop.
pub struct Prometheus {
    /// The server process.
    child: Child,
    /// Its HTTP port on 127.0.0.1.
    pub port: u16,
    /// Its directory: `prometheus.yml`, `rules.yaml`, `data/`, `prometheus.log`.
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus in `dir` with `config` (which names `rules.yaml`)
    /// and the rule file `rules`.
    pub fn start(dir: &Path, config: &str, rules: &str) -> Prometheus {
        std::fs::create_dir_all(dir).expect("Prometheus directory");
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        std::fs::write(dir.join("rules.yaml"), rules).expect("write rules.yaml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let port = crate::free_port();
        let child = Command::new(prometheus())
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus { child, port, dir: dir.to_path_buf() }
    }

    /// What Prometheus logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET <path>` of the HTTP API: the `data` of a `success` answer
    /// (`None` also when no answer came within 10 s, so the callers'
    /// polling deadlines hold against a hung server).
    pub async fn api(&self, path: &str) -> Option<Value> {
        tokio::time::timeout(std::time::Duration::from_secs(10), self.api_call(path)).await.ok().flatten()
    }

    async fn api_call(&self, path: &str) -> Option<Value> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        // HTTP/1.0: the answer is the body up to the close, never chunked.
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw);
        let body: Value = serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The series an instant query returns now (`None`: Prometheus refused
    /// the query or did not answer).
    pub async fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
        let data = self.api(&format!("/api/v1/query?query={q}")).await?;
        data["result"].as_array().cloned()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_keep_their_matchers() {
        let expr =
            r#"sum by (pod) (rate(hightemplar_auth_total{outcome=~"a|b"}[5m])) / hightemplar_connections_limit > 0"#;
        assert_eq!(selectors(expr), [r#"hightemplar_auth_total{outcome=~"a|b"}"#, "hightemplar_connections_limit"]);
    }

    #[test]
    fn grafana_variables_are_replaced() {
        let expr = r#"rate(hightemplar_connections_total{namespace=~"$namespace"}[$__rate_interval])"#;
        assert_eq!(
            without_grafana_variables(expr, "30s"),
            r#"rate(hightemplar_connections_total{namespace=~".+"}[30s])"#
        );
    }
}
