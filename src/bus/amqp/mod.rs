//! The RabbitMQ bus: the [`Bus`] trait over AMQP 0-9-1 with lapin, for workers that share one
//! broker. Work goes through a direct exchange into one quorum queue per stage (with a delivery
//! limit that parks poison messages), delays through per-tier queues that the workers' relays
//! send back to the work exchange when due, parking into a quorum queue with the reason in headers, and events into a
//! stream. Every publish waits for the broker's confirm; deliveries are acked manually.
//!
//! - [`topology`] — names and the idempotent declaration of exchanges and queues.
//! - `publisher` — confirmed publishes and the headers parked messages carry.
//! - `consumer` — one consumer per stage queue feeding [`AmqpBus::next`], and the acker.
//! - [`delays`] — the delay tiers' relay: held until due, then back on the work exchange.
//! - [`triggers`] — publishing triggers, taking them (one admitter at a time), parking and delaying them.
//! - `connection` — the connection, and reconnecting with backoff (re-declare, re-consume).
//! - [`events`] — reading the events stream back (what `status` and `watch` need).
//! - [`parking`] — looking into the parking queue without losing what is in it (`dlq`).
//!
//! Recovery is this module's own loop rather than lapin's auto-recover: one place decides when a
//! connection is dead (a consumer's stream ends, a publish fails, the connection reports an
//! error), and after a reconnect everything is declared again from scratch, so a broker restarted
//! empty gets its topology back too.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use super::{Bus, BusError, Delivery, HistoryReader, ParkReason, Triggers};
use crate::ledger::record::Record;
use crate::model::envelope::Stage;

mod connection;
pub use connection::FRAME_MAX;
mod consumer;
pub mod delays;
pub mod events;
pub mod parking;
mod publisher;
pub mod topology;
pub mod triggers;

pub use crate::bus::{StreamOffset, TriggerDelivery, TriggerMessage};
use connection::Link;
use consumer::{Inbox, Source};
pub use events::{EventReader, StreamItem, StreamedEvent};
pub use parking::{ParkedBrowser, ParkedMessage};
pub use publisher::headers;
use topology::{Names, TopologySpec};

/// How to reach the broker and the shape of what is declared there.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSettings {
    /// `amqp://user:password@host:port/vhost` or `amqps://…` (the vhost percent-encoded: `%2f`).
    pub url: String,
    /// The other nodes of a RabbitMQ cluster, tried in turn (after `url`) whenever a connection
    /// is made: a worker whose node goes down carries on through another.
    pub cluster_urls: Vec<String>,
    /// Prefix of every exchange and queue name, so several environments (and tests) share a broker.
    pub prefix: String,
    /// Deliveries of one message beyond the first before the broker parks it (`x-delivery-limit`).
    /// Every return counts: a requeue, a crashed worker, a dropped connection.
    pub delivery_limit: u32,
    /// Unacked deliveries a stage consumer may hold (per stage, per process).
    pub prefetch: u16,
    /// Retention of the events stream (`x-max-age`: `7D`, `24h`, `30m`…).
    pub event_max_age: String,
    /// One connection attempt (TCP, TLS, AMQP handshake) may take this long.
    #[serde(rename = "connect_timeout_ms", with = "millis")]
    pub connect_timeout: Duration,
    /// How long a publish may wait for the connection to come back before it fails.
    #[serde(rename = "publish_timeout_ms", with = "millis")]
    pub publish_timeout: Duration,
    /// Reconnect backoff: first delay, doubled up to the maximum.
    #[serde(rename = "reconnect_min_ms", with = "millis")]
    pub reconnect_min: Duration,
    #[serde(rename = "reconnect_max_ms", with = "millis")]
    pub reconnect_max: Duration,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            cluster_urls: Vec::new(),
            prefix: "sigrun".into(),
            delivery_limit: 10,
            prefetch: 10,
            event_max_age: "7D".into(),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

impl AmqpSettings {
    /// The URL with its password replaced, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Checks what serde cannot: URLs the broker can read, and every number within its range.
    /// Errors name the key, never a URL's text.
    pub fn check(&self) -> Result<(), String> {
        check_url("amqp.url", &self.url)?;
        for (i, url) in self.cluster_urls.iter().enumerate() {
            check_url(&format!("amqp.cluster_urls[{i}]"), url)?;
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if self.prefix.is_empty() || self.prefix.len() > 100 || !self.prefix.chars().all(name_ok) {
            return Err(format!(
                "amqp.prefix `{}`: 1–100 letters, digits, `-`, `_`, `.`",
                crate::model::text::shorten(&self.prefix, 40)
            ));
        }
        let within = |key: &str, value: u64, low: u64, high: u64| {
            if (low..=high).contains(&value) {
                Ok(())
            } else {
                Err(format!("amqp.{key}: {value} is outside {low}–{high}"))
            }
        };
        within("delivery_limit", self.delivery_limit.into(), 1, 1000)?;
        within("prefetch", self.prefetch.into(), 1, 1000)?;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        within("connect_timeout_ms", ms(self.connect_timeout), 100, 600_000)?;
        within("publish_timeout_ms", ms(self.publish_timeout), 100, 3_600_000)?;
        within("reconnect_min_ms", ms(self.reconnect_min), 10, 60_000)?;
        within(
            "reconnect_max_ms",
            ms(self.reconnect_max),
            ms(self.reconnect_min),
            600_000,
        )?;
        let number = self.event_max_age.strip_suffix(['Y', 'M', 'D', 'h', 'm', 's']);
        let age_ok = number.is_some_and(|n| (1..=10).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()));
        if !age_ok {
            return Err(format!(
                "amqp.event_max_age `{}`: a number and a unit (Y, M, D, h, m, s), e.g. 7D",
                crate::model::text::shorten(&self.event_max_age, 20)
            ));
        }
        Ok(())
    }

    /// Every node to connect to, `url` first.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.cluster_urls.iter().map(String::as_str))
    }
}

/// A broker URL fit to print: parsed, its password replaced by `***`. Whatever does not parse as
/// a URL with a host is never shown at all (its text may hold a password where no parser looks).
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.has_host() && !parsed.host_str().unwrap_or_default().is_empty() => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        _ => "<a malformed broker URL, not shown>".to_string(),
    }
}

/// Checks a broker URL as the broker will read it (`amqp://` or `amqps://`, a host, at most a
/// vhost as its path), naming `key` and never the URL itself (it may hold a password).
fn check_url(key: &str, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url)
        .map_err(|e| format!("{key}: not a URL ({e}); write amqp://user:password@host:5672/%2f"))?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(format!(
            "{key}: the scheme must be amqp or amqps, not `{}`",
            crate::model::text::shorten(parsed.scheme(), 20)
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "{key}: the URL has no host; write amqp://user:password@host:5672/%2f"
        ));
    }
    if parsed.path().trim_start_matches('/').contains('/') || parsed.fragment().is_some() {
        return Err(format!(
            "{key}: the path of a broker URL is its vhost alone (`/%2f` for `/`)"
        ));
    }
    Ok(())
}

impl fmt::Debug for AmqpSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettings")
            .field("url", &self.redacted_url())
            .field(
                "cluster_urls",
                &self.cluster_urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("prefix", &self.prefix)
            .field("delivery_limit", &self.delivery_limit)
            .field("prefetch", &self.prefetch)
            .field("event_max_age", &self.event_max_age)
            .field("connect_timeout", &self.connect_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .finish()
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// What the bus's handle, its supervisor task and its consumer tasks share.
/// When a connection declares the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declaring {
    /// On every connect: workers and commands that consume.
    Always,
    /// Only where the prefix has none yet: one-shot publishers.
    WhenAbsent,
}

struct Shared {
    settings: AmqpSettings,
    names: Names,
    spec: TopologySpec,
    declaring: Declaring,
    /// The live connection, `None` while reconnecting. Publishers wait on it.
    link: watch::Sender<Option<Arc<Link>>>,
    /// Generation of the live connection (0: none), for dropping stale buffered deliveries.
    generation: AtomicU64,
    /// Whoever sees a connection fail reports its generation here; the supervisor reconnects.
    broken: mpsc::UnboundedSender<u64>,
    /// Queues `next` (stages) and `next_trigger` have been asked for: consumed now and after
    /// every reconnect.
    wanted: Mutex<BTreeSet<Source>>,
    wanted_changed: Notify,
    inbox: Inbox,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    fn report_broken(&self, generation: u64) {
        // The supervisor gone means the bus is closing: nothing to reconnect.
        let _ = self.broken.send(generation);
    }

    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// The RabbitMQ bus. One connection (a publishing channel with confirms, a channel per consumed
/// stage), re-established with backoff when it drops.
pub struct AmqpBus {
    shared: Arc<Shared>,
    tiers: Vec<Duration>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl AmqpBus {
    /// Connects, declares the whole topology (idempotently) and starts the connection supervisor.
    /// Fails if the first connection or declaration fails: a command that cannot reach its broker
    /// says so instead of retrying silently (`submit`, `status`…; a worker uses [`AmqpBus::start`]).
    /// Needs a tokio runtime; call [`AmqpBus::close`] before that runtime ends (lapin's IO loop
    /// must not outlive it).
    ///
    /// # Panics
    /// When `tiers` is empty, holds a zero delay or is not strictly increasing (configured tiers
    /// are checked by `RuntimeSettings::check`).
    pub async fn connect(settings: AmqpSettings, tiers: Vec<Duration>) -> Result<AmqpBus, BusError> {
        AmqpBus::connect_declaring(settings, tiers, Declaring::Always).await
    }

    /// As [`AmqpBus::connect`], but declares the topology only when the prefix has none yet (its
    /// events stream, declared last, is missing). For one-shot publishers such as `sigrun submit`:
    /// declaring everything again is some thirty broker operations, which cost the broker more
    /// than the publish itself; a passive look at the stream is one. What this bus does not declare
    /// is the workers' to keep (they declare all of it on every connect).
    pub async fn connect_to_publish(settings: AmqpSettings, tiers: Vec<Duration>) -> Result<AmqpBus, BusError> {
        AmqpBus::connect_declaring(settings, tiers, Declaring::WhenAbsent).await
    }

    async fn connect_declaring(
        settings: AmqpSettings,
        tiers: Vec<Duration>,
        declaring: Declaring,
    ) -> Result<AmqpBus, BusError> {
        let (shared, broken_rx) = AmqpBus::shared(settings, &tiers, declaring);
        let first = connection::establish(&shared, 1).await?;
        Ok(AmqpBus::supervised(shared, tiers, Some(first), broken_rx))
    }

    /// Starts the bus without waiting for the broker: the supervisor connects in the background,
    /// with backoff, for as long as it takes — a broker still starting, a queue whose home node is
    /// down, refused connections — and keeps the bus connected from then on. [`AmqpBus::is_connected`]
    /// says when it is (a worker's readiness); publishes wait for it within `publish_timeout`.
    ///
    /// # Panics
    /// As [`AmqpBus::connect`].
    pub fn start(settings: AmqpSettings, tiers: Vec<Duration>) -> AmqpBus {
        let (shared, broken_rx) = AmqpBus::shared(settings, &tiers, Declaring::Always);
        AmqpBus::supervised(shared, tiers, None, broken_rx)
    }

    fn shared(
        settings: AmqpSettings,
        tiers: &[Duration],
        declaring: Declaring,
    ) -> (Arc<Shared>, mpsc::UnboundedReceiver<u64>) {
        assert!(
            !tiers.is_empty() && tiers[0] > Duration::ZERO && tiers.windows(2).all(|w| w[0] < w[1]),
            "delay tiers must be non-empty, non-zero and strictly increasing: {tiers:?}"
        );
        let (broken, broken_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            names: Names::new(&settings.prefix),
            spec: TopologySpec {
                delivery_limit: settings.delivery_limit,
                tiers: tiers.to_vec(),
                event_max_age: settings.event_max_age.clone(),
            },
            declaring,
            settings,
            link: watch::Sender::new(None),
            generation: AtomicU64::new(0),
            broken,
            wanted: Mutex::new(BTreeSet::new()),
            wanted_changed: Notify::new(),
            inbox: Inbox::default(),
            shutdown: watch::Sender::new(false),
        });
        (shared, broken_rx)
    }

    fn supervised(
        shared: Arc<Shared>,
        tiers: Vec<Duration>,
        first: Option<connection::Link>,
        broken_rx: mpsc::UnboundedReceiver<u64>,
    ) -> AmqpBus {
        let supervisor = tokio::spawn(connection::supervise(Arc::clone(&shared), first, broken_rx));
        AmqpBus {
            shared,
            tiers,
            supervisor: Mutex::new(Some(supervisor)),
        }
    }

    pub fn settings(&self) -> &AmqpSettings {
        &self.shared.settings
    }

    pub fn names(&self) -> &Names {
        &self.shared.names
    }

    /// The delay tiers it was built with, shortest first.
    pub fn tiers(&self) -> &[Duration] {
        &self.tiers
    }

    /// Connected now (false while reconnecting): what a worker's readiness reports.
    pub fn is_connected(&self) -> bool {
        self.shared.link.borrow().is_some()
    }

    /// Waits until the bus is connected with a connection other than `not_generation` (0: any).
    /// Returns the connection's generation (1 for the first, raised by every reconnect).
    pub async fn connected(&self, not_generation: u64) -> Result<u64, BusError> {
        let link = connection::wait_link(&self.shared, not_generation, self.shared.settings.publish_timeout).await?;
        Ok(link.generation)
    }

    /// The generation of the live connection (0 while reconnecting).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    /// Stops deliveries (`next` returns `None`, waiting callers included) and closes the connection
    /// cleanly; unacked deliveries go back to their queues. Publishing fails from now on.
    pub async fn close(&self) {
        self.shared.inbox.shut_down();
        self.shared.shutdown.send_replace(true);
        let supervisor = self.supervisor.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor.await;
        }
    }

    /// Deletes the queues and exchanges of `settings.prefix` and these tiers, messages included
    /// (tests, tearing an environment down), on a connection of its own. Close the buses of that
    /// prefix first: a live bus sees its consumers cancelled, reconnects and declares it all again.
    pub async fn delete_topology(settings: &AmqpSettings, tiers: &[Duration]) -> Result<(), BusError> {
        let connect = connection::open(&settings.url, lapin::ConnectionProperties::default());
        let connection = tokio::time::timeout(settings.connect_timeout, connect)
            .await
            .map_err(|_| BusError::Connection(format!("{}: no connection", settings.redacted_url())))?
            .map_err(connection_error)?;
        let channel = connection.create_channel().await.map_err(connection_error)?;
        let deleted = topology::delete(&channel, &Names::new(&settings.prefix), tiers).await;
        let _ = connection.close(200, "topology deleted".into()).await;
        deleted.map_err(connection_error)
    }

    /// Whether the events stream of `settings.prefix` exists, checked passively on a connection of
    /// its own (declaring nothing): a prefix no worker or submit has used has none.
    pub async fn topology_exists(settings: &AmqpSettings) -> Result<bool, BusError> {
        let connect = connection::open(&settings.url, lapin::ConnectionProperties::default());
        let connection = tokio::time::timeout(settings.connect_timeout, connect)
            .await
            .map_err(|_| BusError::Connection(format!("{}: no connection", settings.redacted_url())))?
            .map_err(|e| BusError::Connection(format!("{}: {e}", settings.redacted_url())))?;
        let channel = connection.create_channel().await.map_err(connection_error)?;
        let exists = topology::declared(&channel, &Names::new(&settings.prefix))
            .await
            .map_err(connection_error);
        let _ = connection.close(200, "checked".into()).await;
        exists
    }

    /// Takes up to `limit` parked messages, oldest first, without removing them (see
    /// [`ParkedBrowser`]).
    pub async fn browse_parked(&self, limit: usize) -> Result<ParkedBrowser, BusError> {
        let link = connection::wait_link(&self.shared, 0, self.shared.settings.publish_timeout).await?;
        ParkedBrowser::open(&link.connection, &self.shared.names, limit).await
    }

    /// Reads the events stream from `offset` on a channel of its own (see [`EventReader`]).
    pub async fn read_events(&self, offset: StreamOffset) -> Result<EventReader, BusError> {
        let wait = self.shared.settings.publish_timeout;
        let link = connection::wait_link(&self.shared, 0, wait).await?;
        // Opening answers within the publish timeout or not at all: on a connection that died
        // before the supervisor noticed, the channel's replies never come.
        let opening = events::EventReader::open(&link, self.shared.link.subscribe(), &self.shared.names, offset);
        tokio::time::timeout(wait, opening).await.unwrap_or_else(|_| {
            Err(BusError::Connection(format!(
                "the events stream did not open within {} ms",
                wait.as_millis()
            )))
        })
    }

    /// Publishes a marker into the events stream (confirmed) and returns its id: what a reader
    /// looks for to know it has read everything published before (see [`EventReader::read_to_end`]).
    pub async fn publish_marker(&self) -> Result<uuid::Uuid, BusError> {
        let marker = uuid::Uuid::new_v4();
        self.publish_marker_id(marker).await?;
        Ok(marker)
    }

    /// As [`AmqpBus::publish_marker`] with an id of the caller's, for a reader that must be
    /// waiting for the marker before it can come by.
    pub async fn publish_marker_id(&self, marker: uuid::Uuid) -> Result<(), BusError> {
        self.publish_record(&Record::Marker(marker)).await
    }

    /// Marks queues as consumed; the supervisor starts their consumers.
    fn want(&self, sources: &[Source]) {
        let mut wanted = self.shared.wanted.lock().unwrap_or_else(PoisonError::into_inner);
        let before = wanted.len();
        wanted.extend(sources.iter().copied());
        if wanted.len() != before {
            self.shared.wanted_changed.notify_one();
        }
    }
}

impl Drop for AmqpBus {
    fn drop(&mut self) {
        // Not closed: tell the supervisor to close the connection in the background.
        self.shared.inbox.shut_down();
        self.shared.shutdown.send_replace(true);
    }
}

pub(crate) fn connection_error(error: lapin::Error) -> BusError {
    BusError::Connection(error.to_string())
}

#[async_trait]
impl Bus for AmqpBus {
    async fn publish(&self, stage: Stage, body: &[u8], traceparent: Option<&str>) -> Result<(), BusError> {
        let exchange = self.shared.names.work();
        let properties = publisher::stage_properties(traceparent);
        publisher::publish(&self.shared, &exchange, stage.as_str(), body, properties).await
    }

    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        let Some(&tier) = self.tiers.get(crate::bus::tier_for(&self.tiers, delay)) else {
            return Err(BusError::NotConfirmed {
                target: "a delay tier".into(),
                reason: "the bus has no delay tiers".into(),
            });
        };
        // Routing key = the stage: the tier's fanout exchange ignores it and the relay sends the
        // message back to the work exchange with it once due (its own delay, in its header).
        let exchange = self.shared.names.tier(tier);
        let properties = publisher::stage_properties(traceparent);
        let headers = delays::with_due(properties.headers().clone().unwrap_or_default(), delay);
        publisher::publish(
            &self.shared,
            &exchange,
            stage.as_str(),
            body,
            properties.with_headers(headers),
        )
        .await
    }

    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError> {
        let exchange = self.shared.names.parking_exchange();
        let key = reason.stage.map_or("", Stage::as_str);
        publisher::publish(&self.shared, &exchange, key, body, publisher::park_properties(reason)).await
    }

    async fn publish_record(&self, record: &Record) -> Result<(), BusError> {
        let exchange = self.shared.names.events();
        publisher::publish(
            &self.shared,
            &exchange,
            &record.routing_key(),
            &record.encode(),
            publisher::event_properties(),
        )
        .await
    }

    async fn open_history(&self, from: StreamOffset) -> Result<Box<dyn HistoryReader>, BusError> {
        Ok(Box::new(self.read_events(from).await?))
    }

    async fn next(&self, stages: &[Stage]) -> Option<Delivery> {
        let sources: Vec<Source> = stages.iter().map(|s| Source::Stage(*s)).collect();
        self.want(&sources);
        let (source, generation, delivery) = self.shared.inbox.next(&self.shared, &sources).await?;
        let Source::Stage(stage) = source else {
            unreachable!("only stage queues were asked for")
        };
        Some(consumer::delivery(&self.shared, generation, stage, delivery))
    }
}

#[async_trait]
impl Triggers for AmqpBus {
    async fn publish_trigger(&self, trigger: &TriggerMessage) -> Result<(), BusError> {
        self.publish_trigger_traced(
            &trigger.body,
            trigger.content_type.as_deref().unwrap_or("application/json"),
            trigger.message_id.as_deref(),
            trigger.traceparent.as_deref(),
        )
        .await
    }

    async fn next_trigger(&self) -> Option<TriggerDelivery> {
        AmqpBus::next_trigger(self).await
    }

    async fn park_trigger(&self, trigger: &TriggerMessage, error: &str) -> Result<(), BusError> {
        AmqpBus::park_trigger(self, trigger, error).await
    }

    async fn delay_trigger(&self, trigger: &TriggerMessage, delay: Duration, attempts: u32) -> Result<(), BusError> {
        AmqpBus::delay_trigger(self, trigger, delay, attempts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_redacted_url_hide_the_password() {
        let settings = AmqpSettings {
            url: "amqps://worker:s3cr%40t@broker.example:5671/prod".into(),
            ..AmqpSettings::default()
        };
        let printed = format!("{settings:?}");
        assert!(!printed.contains("s3cr"), "{printed}");
        assert!(
            printed.contains("amqps://worker:***@broker.example:5671/prod"),
            "{printed}"
        );
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("amqp://user@host"), "amqp://user@host");
        // Malformed forms with a password in them are never shown.
        for bad in [
            "amqp:/guest:PW@host",
            "amqp:",
            "amqp//guest:PW@host",
            "guest:PW@host",
            "amqp://:PW@/x",
        ] {
            let shown = redact(bad);
            assert!(!shown.contains("PW"), "{bad} → {shown}");
        }
    }

    #[test]
    fn malformed_urls_and_absurd_numbers_are_refused_by_key_without_the_url() {
        let with = |url: &str| AmqpSettings {
            url: url.into(),
            ..AmqpSettings::default()
        };
        assert_eq!(with("amqps://u:p@broker.example:5671/prod").check(), Ok(()));
        for bad in [
            "amqp:/guest:PW@host",
            "amqp:",
            "amqp//",
            "http://guest:PW@host",
            "amqp://guest:PW@host/a/b",
        ] {
            let error = with(bad).check().unwrap_err();
            assert!(error.starts_with("amqp.url"), "{bad}: {error}");
            assert!(!error.contains("PW"), "{bad}: {error}");
        }
        let mut settings = AmqpSettings {
            prefetch: 0,
            ..AmqpSettings::default()
        };
        assert!(settings.check().unwrap_err().contains("amqp.prefetch"));
        settings.prefetch = 10;
        settings.event_max_age = "forever".into();
        assert!(settings.check().unwrap_err().contains("amqp.event_max_age"));
        settings.event_max_age = "7D".into();
        settings.prefix = "x".repeat(300);
        assert!(settings.check().unwrap_err().contains("amqp.prefix"));
    }

    #[test]
    fn settings_read_strictly_with_defaults() {
        let settings: AmqpSettings = toml::from_str("prefix = \"ci\"\nconnect_timeout_ms = 500\n").unwrap();
        assert_eq!(settings.prefix, "ci");
        assert_eq!(settings.connect_timeout, Duration::from_millis(500));
        assert_eq!(settings.delivery_limit, AmqpSettings::default().delivery_limit);
        assert!(toml::from_str::<AmqpSettings>("prefetchh = 3").is_err());
    }
}
