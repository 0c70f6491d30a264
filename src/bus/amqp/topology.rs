//! The broker-side layout of the RabbitMQ bus and its idempotent declaration. Every process that
//! connects declares all of it (so there is no separate set-up step) and declares it again after a
//! reconnect. Re-declaring is only idempotent with identical arguments — RabbitMQ refuses a queue
//! redeclared with different ones (406 `inequivalent arg`) — so every argument is fixed here, and
//! names carry what may differ between deployments (the prefix, a tier's delay).
//!
//! | name | kind | arguments / binding |
//! | --- | --- | --- |
//! | `{p}.work` | direct exchange | `alternate-exchange={p}.parking` (unroutable messages are parked, not dropped) |
//! | `{p}.stage.{stage}` | quorum queue | bound to `work` by the stage name; `x-delivery-limit`, dead-letters to `{p}.parking` at-least-once |
//! | `{p}.triggers` | quorum queue | bound to `work` by `trigger`; as a stage queue, plus `x-single-active-consumer` (one admitter decides at a time) |
//! | `{p}.delay.{ms}ms` | fanout exchange + quorum queue | a delay tier: held by the workers' relays until due, then sent to `{p}.work` with the routing key it came with (`delays.rs`) |
//! | `{p}.parking` | fanout exchange | → quorum queue `{p}.parked` |
//! | `{p}.events` | topic exchange | `#` → stream queue `{p}.events` with `x-max-age` |

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::model::envelope::Stage;

/// The routing key of triggers on the work exchange (no stage is named so).
pub const TRIGGER_ROUTING_KEY: &str = "trigger";

/// Segment size of the events stream: RabbitMQ's default is 500 MB, far more than a run history
/// needs; smaller segments let `x-max-age` drop old events sooner (retention works per segment).
const STREAM_SEGMENT_BYTES: i64 = 50_000_000;

/// The names of everything the bus declares, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    pub fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn work(&self) -> String {
        format!("{}.work", self.prefix)
    }

    pub fn stage_queue(&self, stage: Stage) -> String {
        format!("{}.stage.{stage}", self.prefix)
    }

    /// The queue triggers land in (routing key [`TRIGGER_ROUTING_KEY`] on the work exchange).
    pub fn triggers(&self) -> String {
        format!("{}.triggers", self.prefix)
    }

    /// A delay tier's exchange and queue (same name). Named by the delay, not by its index: a
    /// changed delay is a new queue beside the old one instead of a refused re-declaration.
    pub fn tier(&self, delay: Duration) -> String {
        format!("{}.delay.{}ms", self.prefix, delay.as_millis())
    }

    /// The tier queue of earlier builds (a TTL queue dead-lettering to `work`). Messages left on
    /// one still come back by themselves; only [`delete`] names it.
    fn legacy_tier(&self, delay: Duration) -> String {
        format!("{}.wait.{}ms", self.prefix, delay.as_millis())
    }

    pub fn parking_exchange(&self) -> String {
        format!("{}.parking", self.prefix)
    }

    pub fn parked_queue(&self) -> String {
        format!("{}.parked", self.prefix)
    }

    /// The events exchange and the stream behind it (same name).
    pub fn events(&self) -> String {
        format!("{}.events", self.prefix)
    }
}

/// What the declaration needs beyond the names.
#[derive(Debug, Clone)]
pub struct TopologySpec {
    pub delivery_limit: u32,
    pub tiers: Vec<Duration>,
    /// `x-max-age` of the events stream, in RabbitMQ's notation (`7D`, `12h`, `30m`).
    pub event_max_age: String,
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// A table of arguments. Numbers must go in as integer AMQP types: a string `x-delivery-limit` is
/// accepted by the broker and silently ignored, and `AMQPValue::from(u64)` is a timestamp.
fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(key.into(), value);
    }
    table
}

/// Arguments shared by every quorum queue that dead-letters: at-least-once dead-lettering only
/// takes effect with `reject-publish` overflow (otherwise the broker silently falls back to
/// at-most-once and says so only in its log).
fn quorum_dead_lettering(dead_letter_exchange: &str) -> Vec<(&'static str, AMQPValue)> {
    vec![
        ("x-queue-type", text("quorum")),
        ("x-dead-letter-exchange", text(dead_letter_exchange)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ]
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares the whole topology. Safe to repeat with the same names and spec; the parking path comes
/// first because the work exchange names it as its alternate and the stage queues as their
/// dead-letter target.
pub async fn declare(channel: &Channel, names: &Names, spec: &TopologySpec) -> lapin::Result<()> {
    let parking = names.parking_exchange();
    let parked = names.parked_queue();
    channel
        .exchange_declare(
            parking.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            parked.as_str().into(),
            durable_queue(),
            table(vec![("x-queue-type", text("quorum"))]),
        )
        .await?;
    bind(channel, &parked, &parking, "").await?;

    let work = names.work();
    channel
        .exchange_declare(
            work.as_str().into(),
            ExchangeKind::Direct,
            durable_exchange(),
            table(vec![("alternate-exchange", text(&parking))]),
        )
        .await?;
    let limit = i32::try_from(spec.delivery_limit).unwrap_or(i32::MAX);
    for stage in Stage::ALL {
        let queue = names.stage_queue(stage);
        let mut args = quorum_dead_lettering(&parking);
        args.push(("x-delivery-limit", AMQPValue::LongInt(limit)));
        channel
            .queue_declare(queue.as_str().into(), durable_queue(), table(args))
            .await?;
        bind(channel, &queue, &work, stage.as_str()).await?;
    }
    // Triggers: like a stage queue, but one consumer at a time gets them (the others stand by), so
    // one admitter decides whether a run has started before starting it.
    let triggers = names.triggers();
    let mut args = quorum_dead_lettering(&parking);
    args.push(("x-delivery-limit", AMQPValue::LongInt(limit)));
    args.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    channel
        .queue_declare(triggers.as_str().into(), durable_queue(), table(args))
        .await?;
    bind(channel, &triggers, &work, TRIGGER_ROUTING_KEY).await?;

    for &delay in &spec.tiers {
        let tier = names.tier(delay);
        // Fanout, so the routing key the message was published with (its stage) is left alone and
        // is still the key the relay sends it on with. No TTL and no dead-lettering: the relays
        // decide when it is due (see `delays.rs` for why).
        channel
            .exchange_declare(
                tier.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(
                tier.as_str().into(),
                durable_queue(),
                table(vec![("x-queue-type", text("quorum"))]),
            )
            .await?;
        bind(channel, &tier, &tier, "").await?;
    }

    let events = names.events();
    channel
        .exchange_declare(
            events.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            events.as_str().into(),
            durable_queue(),
            table(vec![
                ("x-queue-type", text("stream")),
                ("x-max-age", text(&spec.event_max_age)),
                (
                    "x-stream-max-segment-size-bytes",
                    AMQPValue::LongLongInt(STREAM_SEGMENT_BYTES),
                ),
            ]),
        )
        .await?;
    bind(channel, &events, &events, "#").await?;
    Ok(())
}

/// Whether [`declare`] has completed under these names: its last declaration, the events stream,
/// exists (looked at passively, declaring nothing). A missing stream closes `channel` (404); any
/// other failure is the broker's.
pub async fn declared(channel: &Channel, names: &Names) -> lapin::Result<bool> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(names.events().as_str().into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(error)
            if matches!(error.kind(), lapin::ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// Deletes everything [`declare`] made under these names, messages included. For tests and for
/// tearing down an environment; a missing queue or exchange is not an error.
pub async fn delete(channel: &Channel, names: &Names, tiers: &[Duration]) -> lapin::Result<()> {
    let mut queues: Vec<String> = Stage::ALL.iter().map(|s| names.stage_queue(*s)).collect();
    queues.push(names.triggers());
    queues.extend(tiers.iter().map(|t| names.tier(*t)));
    queues.extend(tiers.iter().map(|t| names.legacy_tier(*t)));
    queues.push(names.parked_queue());
    queues.push(names.events());
    for queue in queues {
        channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    let mut exchanges = vec![names.work(), names.events(), names.parking_exchange()];
    exchanges.extend(tiers.iter().map(|t| names.tier(*t)));
    exchanges.extend(tiers.iter().map(|t| names.legacy_tier(*t)));
    for exchange in exchanges {
        channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_the_prefix_and_tiers_are_named_by_their_delay() {
        let names = Names::new("t1");
        assert_eq!(names.work(), "t1.work");
        assert_eq!(names.stage_queue(Stage::ImageCreate), "t1.stage.image-create");
        assert_eq!(names.triggers(), "t1.triggers");
        assert!(Stage::parse(TRIGGER_ROUTING_KEY).is_none(), "no stage shares the key");
        assert_eq!(names.tier(Duration::from_secs(5)), "t1.delay.5000ms");
        assert_eq!(names.parked_queue(), "t1.parked");
        assert_eq!(names.events(), "t1.events");
    }

    #[test]
    fn numeric_arguments_are_integers() {
        let args = table(vec![("x-delivery-limit", AMQPValue::LongInt(3))]);
        assert!(matches!(
            args.inner().get("x-delivery-limit"),
            Some(AMQPValue::LongInt(3))
        ));
    }
}
