//! `--metrics-listen ADDR` (over `[telemetry] listen`) for `worker` and `run`: starts the metrics
//! and health server when either is set and says where it listens on stderr (port 0 picks a free
//! port, so the line is how a caller finds it).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::telemetry::{MetricsServer, Readiness, Telemetry, TelemetrySettings};

/// Starts the server if `flag` or the settings ask for one.
pub async fn start(
    command: &str,
    flag: Option<SocketAddr>,
    settings: &TelemetrySettings,
    telemetry: &Arc<Telemetry>,
    readiness: Readiness,
) -> anyhow::Result<Option<MetricsServer>> {
    let Some(listen) = flag.or(settings.listen) else {
        return Ok(None);
    };
    let server = MetricsServer::start(listen, Arc::clone(telemetry), Arc::new(readiness))
        .await
        .with_context(|| {
            format!("metrics server (--metrics-listen or [telemetry] listen): cannot listen on {listen}")
        })?;
    eprintln!(
        "sigrun {command}: metrics on http://{}/metrics (also /healthz, /readyz)",
        server.local_addr()
    );
    Ok(Some(server))
}

/// Stops the server, if one was started.
pub async fn stop(server: Option<MetricsServer>) {
    if let Some(server) = server {
        server.stop().await;
    }
}
