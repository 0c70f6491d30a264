//! The delay relay: how a delayed message waits out its tier and comes back. A delayed stage
//! message or trigger is published to its tier's fanout exchange `{p}.delay.{ms}ms` (routing key:
//! its stage, or `trigger`) with the Unix time in milliseconds it is due in [`DUE_HEADER`]; the
//! exchange puts it on the tier's plain quorum queue. Every process that consumes work (a worker)
//! also relays every tier: it holds each delivery unacked until it is due, publishes it
//! (confirmed) to the work exchange with its routing key and properties, then acks it. A relay
//! that dies or loses its connection first leaves the message with the broker, which hands it to
//! another relay: at least once, as everything here, and a copy too many is the ledger's to drop.
//! One whose publish fails puts the message back on its tier, so no failure leaves a message held.
//!
//! Why not the broker's own message TTL with dead-lettering back to `work`: a quorum queue's
//! at-least-once dead-lettering runs on its leader, and when the leader's node dies RabbitMQ can
//! leave the messages it had expired but not yet delivered stranded — counted in the queue, never
//! ready, never delivered — for good (seen in `tests/chaos.rs` on a three-node cluster;
//! rabbitmq-server#16652). Plain consume, publish and ack survive a leader change, as the stage
//! queues show.
//!
//! A message is held until its own due time, not its tier's delay: a wait of 45 s goes to the 30 s
//! tier and comes back once, after 45 s (a hop per tier crossed would be a delivery, a publish and
//! an ack for nothing). A tier's messages are due between its delay and the next tier's, so the
//! queue's order is nearly the order they are due: a relay takes a window of the oldest
//! [`RELAY_WINDOW`], each released on its own timer (one due later does not hold up the one behind
//! it once both are in the window). No message is held past [`MAX_HOLD`] (the broker closes a channel that holds a
//! delivery unacked for its `consumer_timeout`, 30 minutes by default): one due later is put back
//! on its tier with the same due time.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::connection::Link;
use super::consumer::{self, integer};
use super::{Shared, publisher};

/// The header holding when a delayed message is due (Unix time, milliseconds).
pub const DUE_HEADER: &str = "x-sigrun-due-ms";
/// Deliveries of one tier a relay holds at once.
pub const RELAY_WINDOW: u16 = 256;
/// The longest a relay holds one delivery before putting it back on its tier.
pub const MAX_HOLD: Duration = Duration::from_secs(10 * 60);
/// How long a delivery whose release failed waits before it goes back on its tier: the relay
/// takes it again at once, and a broker refusing every publish would otherwise be asked in a loop.
const PUT_BACK_PAUSE: Duration = Duration::from_secs(1);

/// Headers the broker sets on a delivery that must not travel on with the released message (the
/// stage queue counts its own deliveries).
const BROKER_HEADERS: [&str; 2] = ["x-delivery-count", "x-death"];

/// Unix time now, in milliseconds.
pub fn now_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// `headers` with the due time of a message delayed by `delay` from now, rounded up to the next
/// millisecond and one more: released a moment late rather than a moment early, which would send
/// it round again for the fraction of a millisecond it lacks.
pub fn with_due(mut headers: FieldTable, delay: Duration) -> FieldTable {
    let delay_ms = i64::try_from(delay.as_micros().div_ceil(1000).saturating_add(1)).unwrap_or(i64::MAX);
    headers.insert(
        DUE_HEADER.into(),
        AMQPValue::LongLongInt(now_ms().saturating_add(delay_ms)),
    );
    headers
}

/// When a delivery is due: its header, or now when it has none (a message published to the tier
/// by hand, or by an older build).
fn due_ms(properties: &BasicProperties) -> i64 {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DUE_HEADER))
        .and_then(integer)
        .unwrap_or_else(now_ms)
}

/// Relays the tier `delay` on `link` until the link dies or the task is aborted.
pub(super) async fn relay(shared: Arc<Shared>, link: Arc<Link>, delay: Duration) {
    let queue = shared.names.tier(delay);
    let result = async {
        let mut deliveries = consumer::open(&link, &queue, RELAY_WINDOW).await?;
        debug!(%queue, generation = link.generation, "relaying delays");
        let mut held = JoinSet::new();
        loop {
            tokio::select! {
                next = deliveries.next() => match next {
                    Some(delivery) => {
                        held.spawn(release_when_due(Arc::clone(&shared), Arc::clone(&link), delay, delivery?));
                    }
                    None => break,
                },
                Some(_) = held.join_next(), if !held.is_empty() => {}
            }
        }
        Ok::<_, lapin::Error>(())
    }
    .await;
    consumer::ended(&shared, &link, result, &queue);
}

/// Holds one delivery until it is due (or [`MAX_HOLD`]), sends it on, then acks it. Nothing is
/// sent once the delivery's connection is gone: the broker has it back already.
async fn release_when_due(shared: Arc<Shared>, link: Arc<Link>, delay: Duration, delivery: Delivery) {
    let due = due_ms(&delivery.properties);
    let wait_ms = u64::try_from(due.saturating_sub(now_ms())).unwrap_or(0);
    let wait = Duration::from_millis(wait_ms);
    tokio::time::sleep(wait.min(MAX_HOLD)).await;
    if shared.generation.load(Ordering::SeqCst) != link.generation {
        return;
    }
    let (exchange, properties) = if wait > MAX_HOLD {
        // Not due within the hold: back on its tier, the same due time in its header.
        (
            shared.names.tier(delay),
            without_broker_headers(&delivery.properties, true),
        )
    } else {
        (shared.names.work(), without_broker_headers(&delivery.properties, false))
    };
    let key = delivery.routing_key.as_str();
    match publisher::publish(&shared, &exchange, key, &delivery.data, properties).await {
        Ok(()) => {
            if let Err(error) = delivery.acker.ack(BasicAckOptions::default()).await {
                debug!(%error, "ack of a relayed delay failed; the broker returns it and the copy is dropped later");
            }
        }
        Err(error) => {
            warn!(%error, %exchange, "a due message could not be sent on; it goes back on its tier");
            put_back(&shared, &link, delivery).await;
        }
    }
}

/// Returns a delivery whose release failed to its tier, after [`PUT_BACK_PAUSE`]. Left unacked on
/// a connection that stays up (a publish the broker refused, say), it would be held until that
/// connection closed: a run stalled for good with its next step on a relay nobody releases.
async fn put_back(shared: &Shared, link: &Link, delivery: Delivery) {
    tokio::time::sleep(PUT_BACK_PAUSE).await;
    if shared.generation.load(Ordering::SeqCst) != link.generation {
        return;
    }
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(error) = delivery.acker.nack(requeue).await {
        debug!(%error, "requeue of an unreleased delay failed; the broker returns it with its channel");
    }
}

/// The properties a message goes on with: its own, without the broker's delivery headers, and
/// without its due time unless it goes back to wait.
fn without_broker_headers(properties: &BasicProperties, keep_due: bool) -> BasicProperties {
    let mut headers = FieldTable::default();
    let kept = properties.headers().iter().flat_map(|table| table.inner().iter());
    for (name, value) in kept {
        let name_text = name.as_str();
        if !BROKER_HEADERS.contains(&name_text) && (keep_due || name_text != DUE_HEADER) {
            headers.insert(name.clone(), value.clone());
        }
    }
    properties.clone().with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_due_time_is_the_delay_from_now_and_is_dropped_on_release() {
        let before = now_ms();
        let headers = with_due(FieldTable::default(), Duration::from_secs(5));
        let properties = BasicProperties::default().with_headers(headers);
        let due = due_ms(&properties);
        assert!((before + 5001..=now_ms() + 5001).contains(&due), "{due}");

        let mut table = properties.headers().clone().unwrap();
        table.insert("x-delivery-count".into(), AMQPValue::LongInt(3));
        table.insert("traceparent".into(), AMQPValue::LongString("00-ab-cd-01".into()));
        let waiting_again = without_broker_headers(&BasicProperties::default().with_headers(table.clone()), true);
        assert!(
            waiting_again
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key(DUE_HEADER)
        );
        let sent_on = without_broker_headers(&BasicProperties::default().with_headers(table), false);
        let names: Vec<String> = sent_on
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(names, ["traceparent"]);
    }

    #[test]
    fn a_message_without_a_due_time_is_due_now_and_a_huge_delay_saturates() {
        let now = now_ms();
        assert!(due_ms(&BasicProperties::default()) >= now);
        let far = with_due(FieldTable::default(), Duration::MAX);
        assert_eq!(far.inner().get(DUE_HEADER).and_then(integer), Some(i64::MAX));
    }
}
