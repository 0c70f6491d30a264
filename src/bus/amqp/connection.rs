//! The bus's connection and its supervisor. A [`Link`] is one connection with its topology declared
//! and a publishing channel in confirm mode; each link has a generation number. The supervisor
//! owns the link: it starts a consumer per wanted stage on it, and when anyone reports the link's
//! generation broken (a consumer stream ending, a publish failing) or the connection reports an
//! error, it drops the link and builds a new one with exponential backoff — declaring everything
//! again and consuming the same stages. Deliveries taken on a dead link can no longer be acked
//! (their acks fail harmlessly); the broker has already put them back.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, timeout};
use tracing::{info, warn};

use super::{Declaring, Shared, connection_error, consumer, delays, topology};
use crate::bus::BusError;

/// How long closing a connection may take before it is abandoned.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Link {
    pub generation: u64,
    pub connection: Connection,
    /// Confirm mode; shared by all publishes (lapin matches each confirm to its publish).
    pub publisher: Channel,
}

/// Connects, declares the topology and opens the publishing channel, within the connect timeout.
pub(super) async fn establish(shared: &Shared, generation: u64) -> Result<Link, BusError> {
    // A cluster's other nodes are tried in turn when one cannot be reached.
    let mut failures = Vec::new();
    for url in shared.settings.urls() {
        match establish_on(shared, url, generation).await {
            Ok(link) => return Ok(link),
            Err(error) => failures.push(error.to_string()),
        }
    }
    Err(BusError::Connection(failures.join("; ")))
}

/// The frame size asked of the broker unless the URL names one (`?frame_max=`). lapin keeps a
/// read and a write ring of 32 frames for each connection, all of it resident once traffic has
/// gone round them: at RabbitMQ's default 128 KiB that was 8 MiB a connection, most of a worker's
/// memory. 32 KiB frames carry a nightly envelope (about 7 KB) in one frame and make the rings
/// 2 MiB; a larger message goes in several frames.
pub const FRAME_MAX: u32 = 32 * 1024;

/// Opens an AMQP connection to `url`, asking for [`FRAME_MAX`] unless the URL says otherwise.
pub(super) async fn open(url: &str, properties: ConnectionProperties) -> lapin::Result<Connection> {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Connection::connect_uri(uri, properties).await
        }
        // Checked when the settings loaded; lapin says what is wrong with it.
        Err(_) => Connection::connect(url, properties).await,
    }
}

/// Connects to the node at `url` within the connect timeout.
async fn establish_on(shared: &Shared, url: &str, generation: u64) -> Result<Link, BusError> {
    let settings = &shared.settings;
    let redacted = super::redact(url);
    let attempt = async {
        // The name lets an operator (and the tests) find this process's connection in
        // `rabbitmqctl list_connections`.
        let properties =
            ConnectionProperties::default().with_connection_name(format!("sigrun {}", shared.names.prefix()).into());
        let connection = open(url, properties).await?;
        let publisher = declared_channel(&connection, shared).await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok::<_, lapin::Error>(Link {
            generation,
            connection,
            publisher,
        })
    };
    match timeout(settings.connect_timeout, attempt).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(error)) => Err(BusError::Connection(format!(
            "{redacted} (prefix {}): {error}",
            shared.names.prefix()
        ))),
        Err(_) => Err(BusError::Connection(format!(
            "{redacted}: no connection within {} ms",
            settings.connect_timeout.as_millis()
        ))),
    }
}

/// A channel on `connection` once the topology is declared, as `shared.declaring` says: always, or
/// only when the prefix has none (the passive look that finds none costs its channel).
async fn declared_channel(connection: &Connection, shared: &Shared) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    let channel = match shared.declaring {
        Declaring::Always => channel,
        Declaring::WhenAbsent if topology::declared(&channel, &shared.names).await? => return Ok(channel),
        // The look that found nothing closed its channel (404).
        Declaring::WhenAbsent => connection.create_channel().await?,
    };
    topology::declare(&channel, &shared.names, &shared.spec).await?;
    Ok(channel)
}

/// Waits up to `wait` for a live link whose generation is not `not_generation` (0: any link).
/// Fails at once when the bus is closed.
pub(super) async fn wait_link(shared: &Shared, not_generation: u64, wait: Duration) -> Result<Arc<Link>, BusError> {
    let mut links = shared.link.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let usable = |link: &Option<Arc<Link>>| link.as_ref().is_some_and(|l| l.generation != not_generation);
    tokio::select! {
        biased;
        _ = shutdown.wait_for(|closed| *closed) => Err(BusError::Closed),
        found = timeout(wait, links.wait_for(usable)) => match found {
            Ok(Ok(link)) => Ok(Arc::clone(link.as_ref().expect("usable links exist"))),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => Err(BusError::Connection(format!(
                "not connected to the broker for {} ms",
                wait.as_millis()
            ))),
        },
    }
}

/// Keeps the bus connected until it is closed. Starts with the link made by `connect`, if any
/// (else it connects first, as after a drop).
pub(super) async fn supervise(shared: Arc<Shared>, first: Option<Link>, mut broken: mpsc::UnboundedReceiver<u64>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut generation = first.as_ref().map_or(0, |link| link.generation);
    let mut next_link = first;
    loop {
        let link = match next_link.take() {
            Some(link) => Arc::new(link),
            None => {
                let mut delay = shared.settings.reconnect_min;
                loop {
                    if shared.is_shut_down() {
                        return;
                    }
                    generation += 1;
                    match establish(&shared, generation).await {
                        Ok(link) => break Arc::new(link),
                        Err(error) => {
                            warn!(%error, retry_in_ms = delay.as_millis(), "reconnecting to the broker failed");
                            tokio::select! {
                                () = sleep(delay) => {}
                                _ = shutdown.wait_for(|closed| *closed) => return,
                            }
                            delay = (delay * 2).min(shared.settings.reconnect_max);
                        }
                    }
                }
            }
        };
        info!(
            generation = link.generation,
            prefix = shared.names.prefix(),
            "connected to the broker"
        );
        shared.generation.store(link.generation, Ordering::SeqCst);
        shared.link.send_replace(Some(Arc::clone(&link)));
        let closing = run_link(&shared, &link, &mut broken, &mut shutdown).await;

        shared.link.send_replace(None);
        shared.generation.store(0, Ordering::SeqCst);
        shared.inbox.forget_generation(link.generation);
        // A clean close returns this connection's unacked deliveries at once; on a dead connection
        // it fails, which is fine.
        let reason = if closing { "closing" } else { "reconnecting" };
        let _ = timeout(CLOSE_TIMEOUT, link.connection.close(200, reason.into())).await;
        if closing {
            return;
        }
    }
}

/// Consumes the wanted queues on `link` until it breaks (returns false) or the bus closes (true).
async fn run_link(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    broken: &mut mpsc::UnboundedReceiver<u64>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    let mut consumers = JoinSet::new();
    let mut consuming = BTreeSet::new();
    let mut relaying = false;
    let mut events = link.connection.events_listener();
    loop {
        // Registered before reading the set, so a stage added in between is not missed.
        let changed = shared.wanted_changed.notified();
        let wanted = shared.wanted.lock().unwrap_or_else(PoisonError::into_inner).clone();
        for source in wanted.difference(&consuming) {
            consumers.spawn(consumer::consume(Arc::clone(shared), Arc::clone(link), *source));
        }
        // A process that consumes work also relays the delay tiers (a `submit` or `status`
        // never does): delayed messages come back while any worker runs.
        if !wanted.is_empty() && !relaying {
            relaying = true;
            for &delay in &shared.spec.tiers {
                consumers.spawn(delays::relay(Arc::clone(shared), Arc::clone(link), delay));
            }
        }
        consuming.extend(wanted);
        let closing = tokio::select! {
            _ = shutdown.wait_for(|closed| *closed) => Some(true),
            reported = broken.recv() => match reported {
                Some(generation) if generation == link.generation => Some(false),
                // A report about an older connection: already replaced.
                Some(_) => None,
                None => Some(true),
            },
            event = events.next() => match event {
                Some(lapin::Event::Error(error)) => {
                    warn!(%error, generation = link.generation, "broker connection failed");
                    Some(false)
                }
                Some(_) => None,
                None => Some(false),
            },
            () = changed => None,
        };
        if let Some(closing) = closing {
            consumers.abort_all();
            return closing;
        }
    }
}

pub(super) fn publish_failed(shared: &Shared, link: &Link, error: &lapin::Error) -> BusError {
    warn!(%error, generation = link.generation, "publish failed; reconnecting");
    shared.report_broken(link.generation);
    connection_error(error.clone())
}
