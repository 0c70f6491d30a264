//! [`MetricsServer`]: `/metrics`, `/healthz` and `/readyz` over HTTP/1 with axum, on the address
//! of `--metrics-listen` (or `[telemetry] listen`). It runs beside the work on the same tokio
//! runtime and stops with [`MetricsServer::stop`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::warn;

use super::metrics::{CONTENT_TYPE, Telemetry};
use super::readiness::Readiness;

/// A running server; [`MetricsServer::stop`] ends it.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct Endpoints {
    telemetry: Arc<Telemetry>,
    readiness: Arc<Readiness>,
}

impl MetricsServer {
    /// Binds `listen` (port 0: any free port, see [`MetricsServer::local_addr`]) and serves.
    pub async fn start(
        listen: SocketAddr,
        telemetry: Arc<Telemetry>,
        readiness: Arc<Readiness>,
    ) -> std::io::Result<MetricsServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Endpoints { telemetry, readiness });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                warn!(%error, "the metrics server stopped");
            }
        });
        Ok(MetricsServer { local_addr, stop, task })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, lets requests in flight finish, and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn metrics(State(endpoints): State<Endpoints>) -> Response {
    if let Some(connected) = endpoints.readiness.bus_connected() {
        endpoints.telemetry.set_bus_connected(connected);
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], endpoints.telemetry.render()).into_response()
}

/// Alive unless a component of the process is down (then only a restart helps).
async fn healthz(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.readiness.alive() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("down: {reason}\n")).into_response(),
    }
}

async fn readyz(State(endpoints): State<Endpoints>) -> Response {
    match endpoints.readiness.check().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response(),
    }
}
