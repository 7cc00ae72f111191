//! The fleet scrape (#14 item 1): every period, for each `HighTemplar`,
//! read the `/metrics` page of each of its ready gateway pods and write the
//! sums into its status (`connections`, `subscriptions`, `consumers`,
//! `maxPodConnections`, the `Saturated` condition).
//!
//! Kubernetes and HTTP I/O happen here; reading a page is
//! [`crate::fleet`], the status fields are [`crate::status::fleet_status`].
//! The status is written by server-side apply under a field manager of its
//! own ([`FLEET_FIELD_MANAGER`]), so it owns these fields and the
//! `Saturated` entry of `conditions` (a list map keyed by `type`) and the
//! reconciler owns the rest.
//!
//! Cost is bounded: at most [`CONCURRENCY`] pages in flight, each with a
//! [`PAGE_TIMEOUT`] and at most [`MAX_PAGE_BYTES`] read; a pod that does not
//! answer is counted as failed, never waited for past its deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::{debug, warn};

use crate::crd::HighTemplar;
use crate::desired;
use crate::fleet::{FleetFigures, MetricsError, PodFigures, parse_metrics};
use crate::metrics::Metrics;
use crate::scaler::ConnectionAutoscaler;
use crate::status::{self, ScaleStatus};

/// Field manager of the fleet figures in the status.
pub const FLEET_FIELD_MANAGER: &str = "high-templar-operator-fleet";
/// Pages fetched at once, over all pods of one resource.
pub const CONCURRENCY: usize = 16;
/// Deadline of one page: connect, headers and body.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest page read; a gateway's page is a few KiB.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// Why one pod's page was not read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// Connecting, sending or reading failed or timed out.
    #[error("GET {url}: {reason}")]
    Http {
        /// The page's URL.
        url: String,
        /// What failed (reqwest's message, without the URL's query: there is none).
        reason: String,
    },
    /// The pod answered with a status other than 200.
    #[error("GET {url}: HTTP {status}")]
    Status {
        /// The page's URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The page is larger than [`MAX_PAGE_BYTES`].
    #[error("GET {url}: page larger than {MAX_PAGE_BYTES} bytes")]
    TooLarge {
        /// The page's URL.
        url: String,
    },
    /// The page is not a gateway's metrics page.
    #[error("GET {url}: {error}")]
    Page {
        /// The page's URL.
        url: String,
        /// What is wrong with it.
        error: MetricsError,
    },
}

/// One pod the scrape read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLoad {
    /// The pod's name.
    pub name: String,
    /// Its open connections.
    pub connections: u64,
    /// Its `controller.kubernetes.io/pod-deletion-cost` annotation now.
    pub deletion_cost: Option<String>,
}

/// One resource's scrape.
#[derive(Debug, Clone, Default)]
pub struct FleetScrape {
    /// The sums over the pods read.
    pub figures: FleetFigures,
    /// The first failure's message.
    pub first_failure: Option<String>,
    /// Each pod read.
    pub pods: Vec<PodLoad>,
    /// Pods (not terminating) that were not tried: not ready yet, or no IP.
    pub not_ready: u32,
}

/// Reads gateway pods' `/metrics` pages.
#[derive(Clone)]
pub struct FleetScraper {
    /// HTTP client with the page deadline; no proxy (pod IPs are direct).
    http: reqwest::Client,
}

impl FleetScraper {
    /// A scraper, or why the HTTP client cannot be built.
    pub fn new() -> Result<FleetScraper, reqwest::Error> {
        high_templar_gateway::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .timeout(PAGE_TIMEOUT)
            .connect_timeout(PAGE_TIMEOUT)
            .no_proxy()
            .pool_max_idle_per_host(1)
            .build()?;
        Ok(FleetScraper { http })
    }

    /// One page: `url` is `http://<pod IP>:<port>/metrics`.
    pub async fn page(&self, url: &str) -> Result<PodFigures, ScrapeError> {
        let http_error = |e: reqwest::Error| ScrapeError::Http { url: url.to_string(), reason: error_chain(e) };
        let mut response = self.http.get(url).send().await.map_err(http_error)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(ScrapeError::Status { url: url.to_string(), status: response.status().as_u16() });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > MAX_PAGE_BYTES {
                return Err(ScrapeError::TooLarge { url: url.to_string() });
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        parse_metrics(&text).map_err(|error| ScrapeError::Page { url: url.to_string(), error })
    }

    /// Every ready pod of `ht`.
    pub async fn fleet(&self, client: &Client, ht: &HighTemplar) -> Result<FleetScrape, kube::Error> {
        let ns = ht.namespace().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let list = pods.list(&ListParams::default().labels(&desired::selector_string(ht))).await?;
        let live: Vec<&Pod> = list.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
        let targets: Vec<(Option<PodLoad>, String)> = live
            .iter()
            .filter_map(|pod| {
                let load = PodLoad {
                    name: pod.name_any(),
                    connections: 0,
                    deletion_cost: pod.annotations().get(crate::scaler::DELETION_COST).cloned(),
                };
                Some((Some(load), metrics_url(pod)?))
            })
            .collect();
        let not_ready = u32::try_from(live.len() - targets.len()).unwrap_or(u32::MAX);
        let default_limit = u64::try_from(ht.spec.limits.max_connections).unwrap_or(0);
        let mut scrape = self.read(targets, default_limit).await;
        scrape.not_ready = not_ready;
        Ok(scrape)
    }

    /// The pages at `urls`, at most [`CONCURRENCY`] at once: the sums, and
    /// the first failure's message. `default_limit` is the connection
    /// limit of a pod whose page gives none.
    pub async fn pages(&self, urls: Vec<String>, default_limit: u64) -> (FleetFigures, Option<String>) {
        let scrape = self.read(urls.into_iter().map(|url| (None, url)).collect(), default_limit).await;
        (scrape.figures, scrape.first_failure)
    }

    /// Reads each `(pod, url)`; the pods read, with their connections, are
    /// in the result.
    async fn read(&self, targets: Vec<(Option<PodLoad>, String)>, default_limit: u64) -> FleetScrape {
        let mut scrape = FleetScrape { figures: FleetFigures::new(default_limit), ..FleetScrape::default() };
        let mut pages = stream::iter(targets)
            .map(|(pod, url)| async move { (pod, self.page(&url).await) })
            .buffer_unordered(CONCURRENCY);
        while let Some((pod, page)) = pages.next().await {
            match (&page, pod) {
                (Err(e), _) => {
                    scrape.first_failure.get_or_insert_with(|| e.to_string());
                }
                (Ok(figures), Some(pod)) => scrape.pods.push(PodLoad { connections: figures.connections, ..pod }),
                (Ok(_), None) => {}
            }
            scrape.figures.add(&page);
        }
        scrape
    }
}

/// `http://<pod IP>:<port>/metrics` of a ready, not terminating gateway
/// pod; the port is the container port named `http`.
pub fn metrics_url(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    if !ready {
        return None;
    }
    let port = pod
        .spec
        .as_ref()
        .into_iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .map(|p| p.container_port)
        .unwrap_or(i32::from(desired::GATEWAY_PORT));
    // An IPv6 pod IP needs brackets in a URL.
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
    Some(format!("http://{host}:{port}/metrics"))
}

/// reqwest's error and its causes, e.g. "error sending request: connection refused".
fn error_chain(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return format!("timed out after {} s", PAGE_TIMEOUT.as_secs());
    }
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Scrapes every resource in `store` each `period` until dropped, and
/// scales those that scale on connections ([`crate::scaler`]).
pub async fn run(
    client: Client,
    store: Store<HighTemplar>,
    period: Duration,
    metrics: Arc<Metrics>,
    recorder: Recorder,
) {
    let scraper = match FleetScraper::new() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "fleet scrape disabled: cannot build its HTTP client");
            return;
        }
    };
    let mut autoscaler = ConnectionAutoscaler::new(client.clone(), recorder, metrics.clone());
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let resources = store.state();
        autoscaler.retain(&resources.iter().filter_map(|ht| ht.uid()).collect::<Vec<_>>());
        for ht in resources {
            if ht.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let started = Instant::now();
            let outcome = scraper.fleet(&client, &ht).await;
            metrics.fleet_scrape_duration.observe(started.elapsed().as_secs_f64());
            let scrape = match outcome {
                Ok(o) => o,
                Err(e) => {
                    warn!(ht = %status::display_name(&ht), error = %e, "fleet scrape: cannot list the gateway pods");
                    continue;
                }
            };
            let figures = &scrape.figures;
            metrics.fleet_pages(figures.pods_read, figures.pods_failed);
            if let Some(failure) = &scrape.first_failure {
                debug!(ht = %status::display_name(&ht), failure = %failure, "fleet scrape: a page was not read");
            }
            let now = Time(k8s_openapi::jiff::Timestamp::now());
            let scale = match autoscaler.step(&ht, &scrape).await {
                Ok(decision) => decision.map(|d| {
                    let previous = ht.status.as_ref().and_then(|s| s.last_scale_time.clone());
                    ScaleStatus {
                        recommended: d.recommended,
                        last_scale_time: if d.changed { Some(now.clone()) } else { previous },
                    }
                }),
                Err(e) => {
                    warn!(ht = %status::display_name(&ht), error = %e, "connection autoscaling: cannot scale");
                    // Keep what the status said.
                    ht.status.as_ref().and_then(|s| {
                        Some(ScaleStatus {
                            recommended: s.recommended_replicas?,
                            last_scale_time: s.last_scale_time.clone(),
                        })
                    })
                }
            };
            let fleet = status::fleet_status(&ht, figures, scrape.first_failure.as_deref(), scale.as_ref(), now);
            let patch = json!({
                "apiVersion": "hightemplar.io/v1alpha1",
                "kind": "HighTemplar",
                "status": fleet,
            });
            let api: Api<HighTemplar> = Api::namespaced(client.clone(), &ht.namespace().unwrap_or_default());
            let params = PatchParams::apply(FLEET_FIELD_MANAGER).force();
            if let Err(e) = api.patch_status(&ht.name_any(), &params, &Patch::Apply(&patch)).await {
                warn!(ht = %status::display_name(&ht), error = %e, "fleet scrape: cannot write the status");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).expect("a pod")
    }

    #[test]
    fn only_ready_pods_with_an_ip_are_read() {
        let ready = json!({
            "metadata": {"name": "a"},
            "spec": {"containers": [{"name": "gateway", "ports": [{"name": "http", "containerPort": 9090}]}]},
            "status": {"podIP": "10.1.0.7", "conditions": [{"type": "Ready", "status": "True"}]},
        });
        assert_eq!(metrics_url(&pod(ready.clone())).as_deref(), Some("http://10.1.0.7:9090/metrics"));
        let mut v6 = ready.clone();
        v6["status"]["podIP"] = json!("fd00::7");
        assert_eq!(metrics_url(&pod(v6)).as_deref(), Some("http://[fd00::7]:9090/metrics"));
        let mut no_port = ready.clone();
        no_port["spec"]["containers"][0]["ports"] = json!([]);
        assert_eq!(metrics_url(&pod(no_port)).as_deref(), Some("http://10.1.0.7:8080/metrics"));
        let mut not_ready = ready.clone();
        not_ready["status"]["conditions"][0]["status"] = json!("False");
        assert_eq!(metrics_url(&pod(not_ready)), None);
        let mut no_ip = ready.clone();
        no_ip["status"]["podIP"] = json!("");
        assert_eq!(metrics_url(&pod(no_ip)), None);
        let mut terminating = ready;
        terminating["metadata"]["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
        assert_eq!(metrics_url(&pod(terminating)), None);
    }
}
