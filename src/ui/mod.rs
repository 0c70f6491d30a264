//! The web page for runs and the fleet (`sigrun ui`, `sigrun dev`): an HTTP server over a
//! [`RunIndex`] that the caller feeds from the events stream. `/` lists recent runs (filter by
//! pipeline and state) and stays live through `/live` (Server-Sent Events: one stream per viewer
//! from the index's broadcast, never a broker connection per viewer); `/runs/{id}` draws one run's
//! timeline, resources, parked messages and events; `/fleet` shows each pipeline's versions,
//! replicas, pools, quota headroom and what retention deletes next. Actions (`actions`) need the
//! token. Every answer carries a Content-Security-Policy that allows the page's own script and
//! style only, and every text from a message, a spec or Azure is escaped (`pages::escape`).

pub mod actions;
pub mod fleet;
mod fleet_page;
pub mod index;
pub mod pages;
pub mod parking;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use serde::Deserialize;
use tokio::sync::{broadcast, oneshot, watch};

pub use self::actions::{Actions, ActionsAllowed};
use self::fleet::{FleetSource, KnownRuns};
use self::index::{Filter, RunIndex, RunSummary};
use self::parking::ParkedCache;
pub use self::parking::{ParkedView, Parking, ReplayRefused};
use crate::events::Event;

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

/// What the pages read besides the events stream, and who may act.
#[derive(Clone, Default)]
pub struct Backends {
    /// The parking queue: run pages list their run's parked messages.
    pub parking: Option<Arc<dyn Parking>>,
    /// The fleet page's reading of Azure; without it the page says `fleet_note`.
    pub fleet: Option<Arc<FleetSource>>,
    pub fleet_note: Option<String>,
    /// Actions, for callers with the token; read-only without.
    pub allowed: Option<ActionsAllowed>,
}

/// What the handlers share: the feed, who may act, and whether the server is closing (live
/// streams end then, so a graceful stop does not wait on viewers that never leave).
#[derive(Clone)]
struct Shared {
    feed: Feed,
    parked: Option<Arc<ParkedCache>>,
    fleet: Option<Arc<FleetSource>>,
    fleet_note: Option<String>,
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
    pub async fn start(listen: SocketAddr, feed: Feed, backends: Backends) -> std::io::Result<UiServer> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let local_addr = listener.local_addr()?;
        let (closing, closing_rx) = watch::channel(false);
        let app = Router::new()
            .route("/", get(runs))
            .route("/runs/{id}", get(run))
            .route("/runs/{id}/cancel", post(actions::cancel))
            .route("/parked/{id}/replay", post(actions::replay))
            .route("/fleet", get(fleet_page))
            .route("/live", get(live))
            .route("/app.js", get(script))
            .route("/style.css", get(style))
            .layer(axum::middleware::map_response(secure))
            .with_state(Shared {
                feed,
                parked: backends.parking.map(|p| Arc::new(ParkedCache::new(p))),
                fleet: backends.fleet,
                fleet_note: backends.fleet_note,
                allowed: backends.allowed,
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
    let Some(run_id) = uuid::Uuid::parse_str(&id).ok() else {
        return (StatusCode::NOT_FOUND, "no such run in the events stream\n").into_response();
    };
    // The parking queue is looked at only for a run that may have something there (a branch of
    // it failed or was parked): each look returns every parked message to the queue, which
    // raises its delivery count, and a page anyone may load must not do that at will.
    let may_have_parked = {
        let index = shared.feed.index.read().unwrap_or_else(|p| p.into_inner());
        match index.run(&run_id) {
            None => return (StatusCode::NOT_FOUND, "no such run in the events stream\n").into_response(),
            Some(entry) => entry.events.iter().any(|e| e.kind.is_failure()),
        }
    };
    let parked = match &shared.parked {
        Some(cache) if may_have_parked => Some(cache.current().await),
        Some(_) => Some(std::sync::Arc::new(Ok(Vec::new()))),
        None => None,
    };
    let index = shared.feed.index.read().unwrap_or_else(|p| p.into_inner());
    match index.run(&run_id) {
        Some(entry) => {
            let parked = parked
                .as_deref()
                .map(|p| p.as_ref().map(|all| pages::of_run(all, run_id)));
            html(pages::run_page(entry, parked, shared.allowed.is_some()))
        }
        None => (StatusCode::NOT_FOUND, "no such run in the events stream\n").into_response(),
    }
}

/// Each pipeline's versions, replicas, pools, quotas and retention, as last read.
async fn fleet_page(State(shared): State<Shared>) -> Response {
    let Some(source) = &shared.fleet else {
        let note = shared.fleet_note.as_deref().unwrap_or("this page reads no Azure");
        return html(fleet_page::fleet_page(&[], Some(note)));
    };
    let runs = {
        let index = shared.feed.index.read().unwrap_or_else(|p| p.into_inner());
        KnownRuns(index.running())
    };
    let fleet = source.current(&runs).await;
    let note = fleet.is_empty().then_some("no pipeline in the pipelines directory");
    html(fleet_page::fleet_page(&fleet, note))
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
