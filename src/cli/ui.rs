//! `sigrun ui [--listen ADDR]`: the web page for runs (`crate::ui`) over the configured prefix's
//! events stream: reads it from the oldest kept event, then follows it (reopening where it left
//! off when the connection drops), and serves until SIGINT or SIGTERM. Prints the page's URL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{history, input_error};
use crate::bus::Bus;
use crate::bus::amqp::{AmqpBus, StreamOffset};
use crate::events::Event;
use crate::ui::{Actions, ActionsAllowed, Feed, UiServer};

#[derive(Debug, Args)]
pub struct UiArgs {
    /// Where to serve the page (loopback by default; port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Settings file overlaid on the defaults (`[amqp]`: the broker and prefix to show).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Allow actions (cancel a run) to callers sending `Authorization: Bearer TOKEN`; without
    /// it the page is read-only. Best given in the environment, never on a shared command line.
    #[arg(long, env = "SIGRUN_UI_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// The page's actions, on the bus it reads.
struct BusActions(Arc<AmqpBus>);

#[async_trait::async_trait]
impl Actions for BusActions {
    async fn publish(&self, event: Event) -> Result<(), String> {
        self.0.publish_event(&event).await.map_err(|e| e.to_string())
    }
}

pub async fn run(args: UiArgs) -> anyhow::Result<ExitCode> {
    let token = match args.token.as_deref().map(str::trim) {
        Some("") => return Err(input_error(anyhow::anyhow!("--token / SIGRUN_UI_TOKEN is empty"))),
        Some(token) if token.len() > 1024 => {
            return Err(input_error(anyhow::anyhow!(
                "--token / SIGRUN_UI_TOKEN is over 1024 bytes"
            )));
        }
        other => other.map(str::to_string),
    };
    let (bus, settings) = history::connect(args.config.as_deref(), "ui").await?;
    let bus = Arc::new(bus);
    let feed = Feed::default();
    let allowed = token.map(|token| ActionsAllowed {
        token,
        actions: Arc::new(BusActions(Arc::clone(&bus))),
    });
    let actions = if allowed.is_some() {
        "cancel with the token"
    } else {
        "read-only"
    };
    let server = UiServer::start(args.listen, feed.clone(), allowed).await?;
    println!("http://{}/", server.local_addr());
    eprintln!(
        "sigrun ui: serving the runs of prefix `{}` on {} at http://{}/, {actions} (Ctrl-C to stop)",
        settings.amqp.prefix,
        settings.amqp.redacted_url(),
        server.local_addr()
    );
    tokio::select! {
        () = follow(&bus, &feed) => {}
        signalled = super::emulator::wait_for_signal() => signalled?,
    }
    server.stop().await;
    bus.close().await;
    Ok(ExitCode::SUCCESS)
}

/// Feeds every event of the stream, from the oldest kept, into `feed`, for ever: a reader that is
/// lost is reopened just after the last event it gave.
async fn follow(bus: &AmqpBus, feed: &Feed) {
    let mut from = StreamOffset::First;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut reader = match bus.read_events(from.clone()).await {
            Ok(reader) => reader,
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
        reader.close().await;
    }
}
