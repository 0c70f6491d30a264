//! Stage consumers and the inbox `next` takes from. Each consumed stage (and the triggers queue,
//! when asked for) has a channel of its own with `basic.qos(prefetch)` and a manual-ack consumer on
//! its quorum queue; what the broker delivers waits in the inbox, tagged with the connection
//! generation, until `next` (or `next_trigger`) hands it out.
//! Taking from the inbox is synchronous, so `next` is cancel-safe: a dropped `next` takes nothing.
//! A delivery's count comes from the quorum queue's `x-delivery-count` header (absent on the first
//! delivery). Settling goes through the delivery's own channel; a delivery dropped unsettled is
//! requeued, as the trait asks.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::connection::Link;
use super::topology::Names;
use super::{Shared, connection_error};
use crate::bus::{Acker, BusError, Delivery};
use crate::model::envelope::Stage;

/// A queue the bus consumes from: a stage's work queue or the triggers queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Source {
    Stage(Stage),
    Triggers,
}

impl Source {
    fn queue(self, names: &Names) -> String {
        match self {
            Source::Stage(stage) => names.stage_queue(stage),
            Source::Triggers => names.triggers(),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Stage(stage) => stage.fmt(f),
            Source::Triggers => f.write_str("triggers"),
        }
    }
}

#[derive(Default)]
pub(super) struct Inbox {
    state: Mutex<InboxState>,
    arrivals: Notify,
}

#[derive(Default)]
struct InboxState {
    queues: BTreeMap<Source, VecDeque<Pending>>,
    /// Arrival order across stages, so a caller of several stages gets the oldest first.
    seq: u64,
    shut_down: bool,
}

struct Pending {
    seq: u64,
    generation: u64,
    delivery: lapin::message::Delivery,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, source: Source, generation: u64, delivery: lapin::message::Delivery) {
        {
            let mut state = self.lock();
            state.seq += 1;
            let seq = state.seq;
            state.queues.entry(source).or_default().push_back(Pending {
                seq,
                generation,
                delivery,
            });
        }
        self.arrivals.notify_waiters();
    }

    /// Drops what a dead connection delivered: it cannot be acked any more and the broker has
    /// requeued it already.
    pub(super) fn forget_generation(&self, generation: u64) {
        let mut state = self.lock();
        for queue in state.queues.values_mut() {
            queue.retain(|p| p.generation != generation);
        }
    }

    pub(super) fn shut_down(&self) {
        self.lock().shut_down = true;
        self.arrivals.notify_waiters();
    }

    /// The oldest delivery from any of `sources` (and the connection generation it came on),
    /// waiting for one; `None` once shut down.
    pub(super) async fn next(
        &self,
        shared: &Shared,
        sources: &[Source],
    ) -> Option<(Source, u64, lapin::message::Delivery)> {
        loop {
            // Register before looking, so an arrival between the look and the wait wakes us.
            let arrival = self.arrivals.notified();
            let mut arrival = std::pin::pin!(arrival);
            arrival.as_mut().enable();
            {
                let mut state = self.lock();
                if state.shut_down {
                    return None;
                }
                let live = shared.generation.load(Ordering::SeqCst);
                if let Some((source, pending)) = take(&mut state, sources, live) {
                    return Some((source, pending.generation, pending.delivery));
                }
            }
            arrival.await;
        }
    }
}

/// Takes the oldest pending delivery of `sources` from the live connection, discarding stale ones.
fn take(state: &mut InboxState, sources: &[Source], live: u64) -> Option<(Source, Pending)> {
    for source in sources {
        if let Some(queue) = state.queues.get_mut(source) {
            queue.retain(|p| p.generation == live);
        }
    }
    let source = sources
        .iter()
        .filter_map(|s| state.queues.get(s)?.front().map(|p| (p.seq, *s)))
        .min()?
        .1;
    let pending = state.queues.get_mut(&source)?.pop_front()?;
    Some((source, pending))
}

/// `x-delivery-count` is the number of earlier returns of the message (absent: none).
pub(super) fn delivery_count(headers: Option<&FieldTable>) -> u32 {
    let earlier = headers
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(integer)
        .unwrap_or(0);
    u32::try_from(earlier).unwrap_or(u32::MAX - 1).saturating_add(1)
}

/// An integer header value of whatever width the broker chose.
pub fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}

pub(super) fn delivery(
    shared: &Arc<Shared>,
    generation: u64,
    stage: Stage,
    delivery: lapin::message::Delivery,
) -> Delivery {
    // A message handed out again says so even where the broker keeps no count for its return
    // (a step's first try is told apart by this count).
    let returned = if delivery.redelivered { 2 } else { 1 };
    let delivery_count = delivery_count(delivery.properties.headers().as_ref()).max(returned);
    Delivery {
        stage,
        body: delivery.data,
        delivery_count,
        acker: acker(shared, generation, delivery.acker),
    }
}

pub(super) fn acker(shared: &Arc<Shared>, generation: u64, acker: lapin::Acker) -> Box<dyn Acker> {
    Box::new(AmqpAcker {
        acker: Some(acker),
        generation,
        shared: Arc::clone(shared),
    })
}

/// Consumes one queue on `link` until the link dies or the task is aborted.
pub(super) async fn consume(shared: Arc<Shared>, link: Arc<Link>, source: Source) {
    let queue = source.queue(&shared.names);
    let result = async {
        let mut consumer = open(&link, &queue, shared.settings.prefetch).await?;
        debug!(%source, generation = link.generation, "consuming");
        while let Some(delivery) = consumer.next().await {
            shared.inbox.push(source, link.generation, delivery?);
        }
        Ok::<_, lapin::Error>(())
    }
    .await;
    ended(&shared, &link, result, &queue);
}

/// A manual-ack consumer of `queue` on a channel of its own holding at most `prefetch` unacked
/// deliveries (per consumer, `global = false`: what quorum queues support).
pub(super) async fn open(link: &Link, queue: &str, prefetch: u16) -> lapin::Result<lapin::Consumer> {
    let channel = link.connection.create_channel().await?;
    channel.basic_qos(prefetch, BasicQosOptions { global: false }).await?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// A consumer of `queue` on `link` stopped: unless the bus is closing, the link is reported
/// broken and the supervisor reconnects (and consumes again).
pub(super) fn ended(shared: &Shared, link: &Link, result: lapin::Result<()>, queue: &str) {
    if shared.is_shut_down() {
        return;
    }
    match result {
        Err(error) => warn!(%error, %queue, "consumer failed; reconnecting"),
        // Cancelled by the broker (the queue was deleted, the node went down).
        Ok(()) => warn!(%queue, "consumer cancelled by the broker; reconnecting"),
    }
    shared.report_broken(link.generation);
}

/// Settles one delivery on the channel it came from.
struct AmqpAcker {
    acker: Option<lapin::Acker>,
    /// The connection it came on: once that is gone, the broker has the message back.
    generation: u64,
    shared: Arc<Shared>,
}

#[async_trait]
impl Acker for AmqpAcker {
    fn still_held(&self) -> bool {
        self.shared.generation.load(Ordering::SeqCst) == self.generation
    }

    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        let acker = self.acker.take().expect("settled once");
        settled(acker.ack(BasicAckOptions::default()).await)
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BusError> {
        let acker = self.acker.take().expect("settled once");
        settled(acker.nack(requeue()).await)
    }
}

/// lapin answers `Ok(false)` when the delivery's channel is gone (the acker is poisoned): nothing
/// was sent, and the broker has returned or will return the message. The caller must know.
fn settled(sent: lapin::Result<bool>) -> Result<(), BusError> {
    match sent {
        Ok(true) => Ok(()),
        Ok(false) => Err(BusError::Connection(
            "the delivery's channel is closed; the broker returns the message to its queue".into(),
        )),
        Err(error) => Err(connection_error(error)),
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

impl Drop for AmqpAcker {
    fn drop(&mut self) {
        // Unsettled: return it now rather than leave it holding a prefetch slot until the
        // connection closes. Without a runtime (process exit) the broker returns it on disconnect.
        if let Some(acker) = self.acker.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(error) = acker.nack(requeue()).await {
                    debug!(%error, "requeue of a dropped delivery failed (its channel is gone; the broker returns it)");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absent_delivery_count_is_a_first_delivery() {
        assert_eq!(delivery_count(None), 1);
        let mut headers = FieldTable::default();
        assert_eq!(delivery_count(Some(&headers)), 1);
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(2));
        assert_eq!(delivery_count(Some(&headers)), 3);
        headers.insert("x-delivery-count".into(), AMQPValue::ShortShortUInt(1));
        assert_eq!(delivery_count(Some(&headers)), 2);
    }
}
