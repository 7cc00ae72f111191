//! high-templar operator: reconciles `HighTemplar` resources into gateway
//! Deployments, Services, ConfigMaps, PDBs, HPAs and the RabbitMQ exchange.
//!
//! # Module map
//!
//! - [`crd`]: the `HighTemplar` resource (spec, status, validation).
//! - [`desired`]: pure builders of the objects a resource asks for.

#![forbid(unsafe_code)]

pub mod crd;
pub mod desired;
