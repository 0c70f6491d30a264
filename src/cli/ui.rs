//! `sigrun ui [--listen ADDR]`: the web page for runs and the fleet (`crate::ui`) over the
//! configured prefix's events stream and parking queue: reads the stream from the oldest kept
//! event, then follows it (reopening where it left off when the connection drops), and serves
//! until SIGINT or SIGTERM. The fleet page reads Azure when the settings point at it (`[azure]
//! mode = "azure"`, as `sigrun dev`'s config does). Prints the page's URL. [`serve`] is the same
//! page for `sigrun dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{history, input_error};
use crate::azure::AzureApi;
use crate::bus::Bus;
use crate::bus::amqp::{AmqpBus, StreamOffset};
use crate::config::Mode;
use crate::dlq::Parked;
use crate::events::Event;
use crate::ui::fleet::FleetSource;
use crate::ui::{Actions, ActionsAllowed, Backends, Feed, ParkedView, Parking, ReplayRefused, UiServer};

/// Parked messages a look reads at most (the oldest).
const PARKED_LIMIT: usize = 1_000;

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Where to serve the page (loopback by default; port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Settings file overlaid on the defaults (`[amqp]`: the broker and prefix to show; `[azure]`
    /// and `[pipelines] dir`: the fleet).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Allow actions (cancel a run, replay a parked message) to callers sending `Authorization:
    /// Bearer TOKEN`; without it the page is read-only. Best given in the environment, never on a
    /// shared command line.
    #[arg(long, env = "SIGRUN_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub async fn run(args: UiArgs) -> anyhow::Result<ExitCode> {
    let mut stop = super::signals::StopSignals::install()?;
    let token = checked_token(args.token.as_deref())?;
    let (bus, settings) = history::connect(args.config.as_deref(), "ui").await?;
    let (azure, fleet_note) = match settings.azure.mode {
        Mode::Azure => {
            let session = super::session::Session::from_settings(settings.clone()).await?;
            (Some(session.azure as Arc<dyn AzureApi>), None)
        }
        Mode::Emulator => (
            None,
            Some(
                "The fleet page reads Azure: start `sigrun ui` with settings whose [azure] mode is \"azure\" \
                 (`sigrun dev` serves it on its emulator)."
                    .to_string(),
            ),
        ),
    };
    let fleet = azure.map(|azure| Arc::new(FleetSource::new(azure, settings.pipelines.dir.clone())));
    let acting = if token.is_some() {
        "actions with the token"
    } else {
        "read-only"
    };
    let served = serve(Arc::new(bus), args.listen, token, fleet, fleet_note).await?;
    println!("{}", served.url());
    eprintln!(
        "sigrun ui: serving the runs of prefix `{}` on {} at {}, {acting} (Ctrl-C to stop)",
        settings.amqp.prefix,
        settings.amqp.redacted_url(),
        served.url()
    );
    stop.wait().await;
    served.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// The token as given, refused when empty or absurdly long.
pub fn checked_token(token: Option<&str>) -> anyhow::Result<Option<String>> {
    match token.map(str::trim) {
        Some("") => Err(input_error(anyhow::anyhow!("--token / SIGRUN_UI_TOKEN is empty"))),
        Some(token) if token.len() > 1024 => Err(input_error(anyhow::anyhow!(
            "--token / SIGRUN_UI_TOKEN is over 1024 bytes"
        ))),
        other => Ok(other.map(str::to_string)),
    }
}

/// The page being served, and the reader feeding it.
pub struct Served {
    server: UiServer,
    follower: tokio::task::JoinHandle<()>,
    bus: Arc<AmqpBus>,
}

impl Served {
    pub fn url(&self) -> String {
        format!("http://{}/", self.server.local_addr())
    }

    pub async fn stop(self) {
        self.follower.abort();
        self.server.stop().await;
        self.bus.close().await;
    }
}

/// Serves the page on `listen` over `bus`'s events stream and parking queue.
pub async fn serve(
    bus: Arc<AmqpBus>,
    listen: SocketAddr,
    token: Option<String>,
    fleet: Option<Arc<FleetSource>>,
    fleet_note: Option<String>,
) -> anyhow::Result<Served> {
    let feed = Feed::default();
    let backend = Arc::new(BusBackend(Arc::clone(&bus)));
    let backends = Backends {
        parking: Some(Arc::clone(&backend) as Arc<dyn Parking>),
        fleet,
        fleet_note,
        allowed: token.map(|token| ActionsAllowed {
            token,
            actions: backend as Arc<dyn Actions>,
        }),
    };
    let server = match UiServer::start(listen, feed.clone(), backends).await {
        Ok(server) => server,
        Err(error) => {
            bus.close().await;
            return Err(anyhow::Error::new(error))
                .with_context(|| format!("serving the web page on {listen} (port 0 takes any free one)"));
        }
    };
    let reader = Arc::clone(&bus);
    let follower = tokio::spawn(async move { follow(&reader, &feed).await });
    Ok(Served { server, follower, bus })
}

/// The page's reads and actions, on the bus it serves.
struct BusBackend(Arc<AmqpBus>);

#[async_trait::async_trait]
impl Actions for BusBackend {
    async fn publish(&self, event: Event) -> Result<(), String> {
        self.0.publish_event(&event).await.map_err(|e| e.to_string())
    }
}

#[async_trait::async_trait]
impl Parking for BusBackend {
    async fn parked(&self) -> Result<Vec<ParkedView>, String> {
        let browser = self.0.browse_parked(PARKED_LIMIT).await.map_err(|e| e.to_string())?;
        let parked = browser.messages().iter().map(|m| view(&Parked::of(m))).collect();
        browser.close().await;
        Ok(parked)
    }

    /// Every parked copy of message `id`, as `sigrun dlq replay ID` does.
    async fn replay(&self, id: &str) -> Result<String, ReplayRefused> {
        let mut browser = self
            .0
            .browse_parked(PARKED_LIMIT)
            .await
            .map_err(|e| ReplayRefused::Failed(e.to_string()))?;
        let copies: Vec<usize> = (0..browser.messages().len())
            .filter(|&i| browser.messages()[i].id == id)
            .collect();
        let mut replayed = Err(ReplayRefused::NotFound);
        for index in copies {
            let message = browser.messages()[index].clone();
            let parked = Parked::of(&message);
            replayed = match parked.envelope {
                Err(why) => Err(ReplayRefused::NotReplayable(why.to_string())),
                Ok(envelope) => crate::dlq::replay(&self.0, &mut browser, index, envelope, &parked.error)
                    .await
                    .map_err(|e| ReplayRefused::Failed(e.to_string())),
            };
            if replayed.is_err() {
                break;
            }
        }
        browser.close().await;
        replayed
    }
}

fn view(parked: &Parked<'_>) -> ParkedView {
    ParkedView {
        id: parked.message.id.clone(),
        run_id: parked
            .run
            .run_id
            .as_deref()
            .and_then(|id| uuid::Uuid::parse_str(id).ok()),
        stage: parked.stage.clone(),
        branch: parked.run.branch.clone(),
        error: parked.error.clone(),
        attempts: parked.attempts,
        last_seen: parked.last_seen,
        not_replayable: parked.not_replayable(),
    }
}

/// Feeds every event of the stream, from the oldest kept, into `feed`, for ever: a reader that is
/// lost is reopened just after the last event it gave.
async fn follow(bus: &AmqpBus, feed: &Feed) {
    let mut from = StreamOffset::First;
    // What the reader judged commits by, carried on to the one that replaces it.
    let mut judged = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut reader = match bus.read_events(from.clone()).await {
            Ok(reader) => reader.with_book(judged.take()),
            Err(error) => {
                tracing::warn!(%error, "ui: opening the events stream failed; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        while let Some(item) = reader.next().await {
            match item {
                Ok(streamed) => feed.apply(streamed.event),
                Err(crate::bus::BusError::Malformed(what)) => tracing::debug!(%what, "ui: skipping an event"),
                Err(error) => {
                    tracing::warn!(%error, "ui: lost the events stream; reopening");
                    break;
                }
            }
        }
        if let Some(offset) = reader.position() {
            from = StreamOffset::At(offset + 1);
        }
        judged = reader.take_book();
        reader.close().await;
    }
}
