//! high-templar operator: reconciles `HighTemplar` resources into gateway
//! Deployments, Services, ConfigMaps, PDBs, HPAs and the RabbitMQ exchange
//! (DESIGN.md §5).
//!
//! # Module map
//!
//! Pure (no I/O, unit-tested):
//! - [`crd`]: the `HighTemplar` resource: spec, status, defaults, CEL rules.
//! - [`desired`]: builders of the objects a resource asks for, and the
//!   gateway configuration it implies.
//! - [`status`]: conditions from what a reconciliation observed.
//! - [`fleet`]: a gateway pod's load from its `/metrics` page, and the sum
//!   over a resource's pods (#14: status figures, saturation).
//! - [`autoscale`]: the replica count connections per pod call for
//!   (HPA-like rules: immediate step-limited scale-up, scale-down after a
//!   stabilisation window, never on missing figures), and pod-deletion costs.
//!
//! I/O at the edges:
//! - [`reconcile`]: `Context`, `reconcile`, `error_policy`, finalizer.
//! - [`rabbitmq`]: declaring and deleting the exchange.
//! - [`controller`]: watches (owned objects, referenced Secrets) and the run loop.
//! - [`scrape`]: the fleet scrape (gateway pods' `/metrics` into the status).
//! - [`scaler`]: connection autoscaling applied: the Deployment's replicas
//!   and the pods' deletion costs, after each scrape.
//! - [`metrics`]: operator metrics.

#![forbid(unsafe_code)]

pub mod autoscale;
pub mod controller;
pub mod crd;
pub mod desired;
pub mod fleet;
pub mod metrics;
pub mod rabbitmq;
pub mod reconcile;
pub mod scaler;
pub mod scrape;
pub mod status;

use kube::CustomResourceExt;

/// The CustomResourceDefinition as YAML (`high-templar-operator crd`, and
/// the file under `crds/`).
pub fn crd_yaml() -> String {
    // Serialising a CRD built from static types to YAML cannot fail.
    serde_yaml::to_string(&crd::HighTemplar::crd()).unwrap_or_default()
}
