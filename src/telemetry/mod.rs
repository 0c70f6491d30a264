//! Telemetry: the process's Prometheus metrics and the HTTP endpoints an orchestrator and a
//! scraper use — `/metrics` (Prometheus text format), `/healthz` (the process is up) and `/readyz`
//! (it can do work now: the bus is connected and an Azure token can be had).
//!
//! - [`metrics`] — [`Telemetry`]: a registry of its own (never the global default one) with the
//!   metrics every process exports; later metrics register on [`Telemetry::registry`].
//! - [`runs`] — [`runs::RunTracker`]: run-level state (started, ended, branches per stage) folded
//!   from the run history, for the run-level metrics.
//! - [`quota_watch`] — the Batch quota readings of the workers' pipelines, on a timer.
//! - [`readiness`] — [`Readiness`]: what `/readyz` checks, with the token check cached.
//! - [`server`] — [`MetricsServer`]: the axum server on `--metrics-listen`.

pub mod metrics;
pub mod quota_watch;
pub mod readiness;
pub mod runs;
pub mod server;

use std::net::SocketAddr;

use serde::Deserialize;

pub use metrics::Telemetry;
pub use readiness::{Components, Readiness};
pub use server::MetricsServer;

/// `[telemetry]` in the settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Serve `/metrics`, `/healthz` and `/readyz` here (e.g. `0.0.0.0:9464`); `--metrics-listen`
    /// overrides it. Unset: no server.
    pub listen: Option<SocketAddr>,
    /// How often a worker reads its pipelines' Batch quotas (`quota_watch.rs`); `0s`: never.
    #[serde(with = "crate::model::spec::duration")]
    pub quota_watch: std::time::Duration,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            listen: None,
            quota_watch: std::time::Duration::from_secs(600),
        }
    }
}
