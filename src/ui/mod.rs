//! The web page for runs (`sigrun ui`): an HTTP server over a [`RunIndex`] that the caller feeds
//! from the events stream. `/` lists recent runs (filter by pipeline and state) and stays live
//! through `/live` (Server-Sent Events: one stream per viewer from the index's broadcast, never a
//! broker connection per viewer); `/runs/{id}` draws one run's timeline, resources and events.
//! Read-only unless started with a token: then `POST /runs/{id}/cancel` with `Authorization:
//! Bearer TOKEN` asks the workers to stop the run (as `sigrun cancel` does); without a token every
//! action is 403, with a wrong or missing one 401. Every answer carries a Content-Security-Policy
//! that allows the page's own script and style only, and every text from a message is escaped
//! (`pages::escape`).

pub mod index;
pub mod pages;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, oneshot, watch};

use self::index::{Filter, RunIndex, RunSummary};
use crate::events::{Event, EventKind};

/// Runs the runs page lists.
const PAGE_RUNS: usize = 200;

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The index the pages read and the feed that keeps it (and the live viewers) current.
#[derive(Clone)]
pub struct Feed {
    index: Arc<RwLock<RunIndex>>,
    changes: broadcast::Sender<RunSummary>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            index: Arc::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl Feed {
    /// Folds in the next event of the stream and tells the live viewers.
    pub fn apply(&self, event: Event) {
        let summary = self.index.write().unwrap_or_else(|p| p.into_inner()).apply(event);
        let _ = self.changes.send(summary);
    }
}

/// What the page may ask of the workers: publish an event into the run history (a cancel
/// request). The command wires it to the bus.
#[async_trait::async_trait]
pub trait Actions: Send + Sync {
    async fn publish(&self, event: Event) -> Result<(), String>;
}

/// Who may act, and how: the token callers must send, and the bus behind it.
#[derive(Clone)]
pub struct ActionsAllowed {
    pub token: String,
    pub actions: Arc<dyn Actions>,
}

/// What the handlers share: the feed, who may act, and whether the server is closing (live
/// streams end then, so a graceful stop does not wait on viewers that never leave).
#[derive(Clone)]
struct Shared {
    feed: Feed,
    allowed: Option<ActionsAllowed>,
    closing: watch::Receiver<bool>,
}

/// The server, until stopped.
pub struct UiServer {
    local_addr: SocketAddr,
    closing: watch::Sender<bool>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl UiServer {
    pub async fn start(listen: SocketAddr, feed: Feed, allowed: Option<ActionsAllowed>) -> std::io::Result<UiServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (closing, closing_rx) = watch::channel(false);
        let app = Router::new()
            .route("/", get(runs))
            .route("/runs/{id}", get(run))
            .route("/runs/{id}/cancel", axum::routing::post(cancel))
            .route("/live", get(live))
            .route("/app.js", get(script))
            .route("/style.css", get(style))
            .layer(axum::middleware::map_response(secure))
            .with_state(Shared {
                feed,
                allowed,
                closing: closing_rx,
            });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the ui server stopped");
            }
        });
        Ok(UiServer {
            local_addr,
            closing,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub async fn stop(self) {
        let _ = self.closing.send(true);
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// The headers every answer carries.
async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

#[derive(Debug, Default, Deserialize)]
struct RunsQuery {
    pipeline: Option<String>,
    state: Option<String>,
}

fn html(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

async fn runs(State(shared): State<Shared>, Query(query): Query<RunsQuery>) -> Response {
    let feed = shared.feed;
    let filter = Filter {
        pipeline: query.pipeline,
        state: query.state,
    };
    let index = feed.index.read().unwrap_or_else(|p| p.into_inner());
    html(pages::runs_page(
        &index.recent(&filter, PAGE_RUNS),
        &index.pipelines(),
        &filter,
    ))
}

async fn run(State(shared): State<Shared>, Path(id): Path<String>) -> Response {
    let feed = shared.feed;
    let index = feed.index.read().unwrap_or_else(|p| p.into_inner());
    let found = uuid::Uuid::parse_str(&id).ok().and_then(|id| index.run(&id));
    match found {
        Some(entry) => html(pages::run_page(entry, shared.allowed.is_some())),
        None => (StatusCode::NOT_FOUND, "no such run in the events stream\n").into_response(),
    }
}

/// Asks the workers to stop a running run, for a caller with the token.
async fn cancel(State(shared): State<Shared>, Path(id): Path<String>, headers: axum::http::HeaderMap) -> Response {
    let Some(allowed) = &shared.allowed else {
        return (
            StatusCode::FORBIDDEN,
            "read-only: this page was started without a token\n",
        )
            .into_response();
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !sent.is_some_and(|sent| same_secret(sent, &allowed.token)) {
        return (
            StatusCode::UNAUTHORIZED,
            "a valid `Authorization: Bearer TOKEN` is needed\n",
        )
            .into_response();
    }
    let request = {
        let index = shared.feed.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = uuid::Uuid::parse_str(&id).ok().and_then(|id| index.run(&id)) else {
            return (StatusCode::NOT_FOUND, "no such run in the events stream\n").into_response();
        };
        if entry.summary.state != "running" {
            return (
                StatusCode::CONFLICT,
                format!("the run has already ended ({})\n", entry.summary.state),
            )
                .into_response();
        }
        let first = &entry.events[0];
        crate::admission::trunk_event(
            first.run_id,
            &first.pipeline,
            &first.version,
            first.stage,
            EventKind::CancelRequested,
        )
    };
    match allowed.actions.publish(request).await {
        Ok(()) => (
            StatusCode::ACCEPTED,
            "cancel requested: each branch stops at its next step\n",
        )
            .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the cancel request was not published: {error}\n"),
        )
            .into_response(),
    }
}

/// Whether `sent` is the token, comparing every byte (no early exit on the first difference).
fn same_secret(sent: &str, token: &str) -> bool {
    sent.len() == token.len() && sent.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Each run's summary as it changes: an SSE `run` event with the summary as JSON and the row as
/// HTML (escaped on the server, so the script inserts it as is).
async fn live(State(shared): State<Shared>) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let changes = shared.feed.changes.subscribe();
    let stream = futures_util::stream::unfold((changes, shared.closing), |(mut changes, mut closing)| async move {
        loop {
            let received = tokio::select! {
                received = changes.recv() => received,
                _ = closing.wait_for(|closing| *closing) => return None,
            };
            match received {
                Ok(summary) => {
                    let data = serde_json::json!({"run": summary, "row": pages::run_row(&summary)});
                    let event = SseEvent::default().event("run").data(data.to_string());
                    return Some((Ok(event), (changes, closing)));
                }
                // A slow viewer missed some: the next change of each run brings it up to date.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/style.css"),
    )
        .into_response()
}
