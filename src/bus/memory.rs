//! The in-process bus behind `sigrun run` and the tests: one FIFO queue per stage, delays as
//! tokio timers that put a message back on its stage queue when its own delay has passed, a
//! parking list, and an event log with a live broadcast. It keeps the RabbitMQ bus's semantics
//! where the runtime can tell: a delivery dropped or requeued unsettled goes back to its queue with
//! its delivery count raised, a delayed message comes back as a new message (count reset), and every
//! publish is confirmed (here at once). A triggers queue feeds one admitter, and the history is a
//! log of records that readers follow as they follow the RabbitMQ stream. Everything is
//! inspectable, for tests and for the CLI.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, broadcast};

use super::{
    Acker, Bus, BusError, Delivery, HistoryReader, ParkReason, StreamOffset, TriggerDelivery, TriggerMessage, Triggers,
};
use crate::events::Event;
use crate::ledger::record::Record;
use crate::model::envelope::Stage;

/// Events a live subscriber may fall behind by before it sees `Lagged` (the log keeps them all).
const EVENT_BUFFER: usize = 1024;

/// Counters and gauges of a [`MemoryBus`], for tests and progress output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Messages put on a stage queue by `publish`.
    pub published: u64,
    /// Messages put on a delay tier by `publish_delayed`.
    pub delayed: u64,
    /// Deliveries handed out by `next`.
    pub delivered: u64,
    pub acked: u64,
    /// Deliveries returned to their queue, by `requeue` or by being dropped unsettled.
    pub requeued: u64,
    pub parked: u64,
    pub events: u64,
    /// Now: messages ready on the stage queues.
    pub ready: u64,
    /// Now: messages waiting on a delay tier.
    pub waiting: u64,
    /// Now: deliveries handed out and not yet settled.
    pub unacked: u64,
}

impl BusStats {
    /// Nothing ready, waiting or unsettled: no message of any run is still in the bus.
    pub fn is_idle(&self) -> bool {
        self.ready == 0 && self.waiting == 0 && self.unacked == 0
    }
}

/// The in-process bus. Cheap to share behind an `Arc`; all state sits behind one mutex that is
/// never held across an await.
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes consumers waiting in `next` when a message lands or the bus shuts down.
    arrivals: Notify,
    /// Wakes history readers when a record is appended.
    appended: Notify,
    live: broadcast::Sender<Event>,
}

#[derive(Default)]
struct State {
    queues: BTreeMap<Stage, VecDeque<Queued>>,
    /// Arrival order across queues, so a consumer of several stages takes the oldest message first.
    seq: u64,
    parked: Vec<(Vec<u8>, ParkReason)>,
    /// The history: events and the ledger's records, in publish order.
    records: Vec<Record>,
    triggers: VecDeque<(TriggerMessage, u32)>,
    parked_triggers: Vec<(TriggerMessage, String)>,
    stats: BusStats,
    shut_down: bool,
}

struct Queued {
    seq: u64,
    body: Vec<u8>,
    /// Times it was delivered before.
    deliveries: u32,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements, so a panic elsewhere does not spoil it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a message at the back of its stage queue and wakes the consumers.
    fn enqueue(&self, stage: Stage, body: Vec<u8>, deliveries: u32, update: impl FnOnce(&mut BusStats)) {
        {
            let mut state = self.lock();
            state.seq += 1;
            let seq = state.seq;
            state
                .queues
                .entry(stage)
                .or_default()
                .push_back(Queued { seq, body, deliveries });
            state.stats.ready += 1;
            update(&mut state.stats);
        }
        self.arrivals.notify_waiters();
    }
}

impl MemoryBus {
    /// A bus built from the same settings as the RabbitMQ bus: its delay tiers (shortest first)
    /// are checked as that bus's are, though a timer holds any delay exactly and needs none.
    ///
    /// # Panics
    /// When `tiers` is empty, holds a zero delay or is not strictly increasing: a programming error
    /// (configured tiers are checked by `RuntimeSettings::check`).
    pub fn new(tiers: Vec<Duration>) -> MemoryBus {
        assert!(
            !tiers.is_empty() && tiers[0] > Duration::ZERO && tiers.windows(2).all(|w| w[0] < w[1]),
            "delay tiers must be non-empty, non-zero and strictly increasing: {tiers:?}"
        );
        let (live, _) = broadcast::channel(EVENT_BUFFER);
        MemoryBus {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                arrivals: Notify::new(),
                appended: Notify::new(),
                live,
            }),
        }
    }

    /// Every event published so far, in order (those of commits included).
    pub fn events(&self) -> Vec<Event> {
        let state = self.inner.lock();
        state.records.iter().flat_map(|r| r.events().iter().cloned()).collect()
    }

    /// Every record of the history so far, in order.
    pub fn records(&self) -> Vec<Record> {
        self.inner.lock().records.clone()
    }

    /// The records after the first `from`, in order: a follower keeps how many it has read and
    /// copies each record once, not the whole history on every look.
    pub fn records_since(&self, from: usize) -> Vec<Record> {
        let state = self.inner.lock();
        state.records.get(from..).map(<[Record]>::to_vec).unwrap_or_default()
    }

    /// Parked triggers with the reason, oldest first.
    pub fn parked_triggers(&self) -> Vec<(TriggerMessage, String)> {
        self.inner.lock().parked_triggers.clone()
    }

    /// Events as they are published (a subscriber sees those published after it subscribed).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.live.subscribe()
    }

    /// Parked messages with the reason, oldest first.
    pub fn parked(&self) -> Vec<(Vec<u8>, ParkReason)> {
        self.inner.lock().parked.clone()
    }

    /// The bodies ready on a stage queue, front first (for tests).
    pub fn ready(&self, stage: Stage) -> Vec<Vec<u8>> {
        let state = self.inner.lock();
        state
            .queues
            .get(&stage)
            .map(|q| q.iter().map(|m| m.body.clone()).collect())
            .unwrap_or_default()
    }

    pub fn stats(&self) -> BusStats {
        self.inner.lock().stats
    }

    /// Stops deliveries: `next` returns `None` from now on, waiting consumers included. Publishing
    /// keeps working, so in-flight handlers can finish and what they publish stays inspectable.
    pub fn shutdown(&self) {
        self.inner.lock().shut_down = true;
        self.inner.arrivals.notify_waiters();
    }

    /// Takes the oldest ready message among `stages`' queues.
    fn take(&self, state: &mut State, stages: &[Stage]) -> Option<Delivery> {
        let stage = stages
            .iter()
            .filter_map(|s| state.queues.get(s)?.front().map(|m| (m.seq, *s)))
            .min()?
            .1;
        let message = state.queues.get_mut(&stage)?.pop_front()?;
        state.stats.ready -= 1;
        state.stats.delivered += 1;
        state.stats.unacked += 1;
        let delivery_count = message.deliveries + 1;
        Some(Delivery {
            stage,
            body: message.body.clone(),
            delivery_count,
            acker: Box::new(MemoryAcker {
                inner: Arc::clone(&self.inner),
                home: Home::Stage(stage),
                unsettled: Some((message.body, delivery_count)),
            }),
        })
    }

    fn take_trigger(&self, state: &mut State) -> Option<TriggerDelivery> {
        let (mut message, deliveries) = state.triggers.pop_front()?;
        message.delivery_count = deliveries + 1;
        Some(TriggerDelivery {
            acker: Box::new(MemoryAcker {
                inner: Arc::clone(&self.inner),
                home: Home::Triggers(Box::new(message.clone())),
                unsettled: Some((Vec::new(), message.delivery_count)),
            }),
            message,
        })
    }

    /// Waits for `take` to find something, registering for a wake-up before each look so an
    /// arrival in between is not missed; nothing is taken before the return (cancel-safe).
    async fn wait_for<T>(&self, mut take: impl FnMut(&mut State) -> Option<T>) -> Option<T> {
        loop {
            let arrival = self.inner.arrivals.notified();
            let mut arrival = std::pin::pin!(arrival);
            arrival.as_mut().enable();
            {
                let mut state = self.inner.lock();
                if state.shut_down {
                    return None;
                }
                if let Some(found) = take(&mut state) {
                    return Some(found);
                }
            }
            arrival.await;
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, stage: Stage, body: &[u8], _traceparent: Option<&str>) -> Result<(), BusError> {
        self.inner.enqueue(stage, body.to_vec(), 0, |s| s.published += 1);
        Ok(())
    }

    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        _traceparent: Option<&str>,
    ) -> Result<(), BusError> {
        {
            let mut state = self.inner.lock();
            state.stats.delayed += 1;
            state.stats.waiting += 1;
        }
        // Like the relay sending it back to the work exchange once due: the message returns as a
        // new one, its delivery count starting again.
        let inner = Arc::clone(&self.inner);
        let body = body.to_vec();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.enqueue(stage, body, 0, |s| s.waiting -= 1);
        });
        Ok(())
    }

    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError> {
        let mut state = self.inner.lock();
        state.parked.push((body.to_vec(), reason.clone()));
        state.stats.parked += 1;
        Ok(())
    }

    async fn publish_record(&self, record: &Record) -> Result<(), BusError> {
        {
            let mut state = self.inner.lock();
            state.records.push(record.clone());
            state.stats.events += record.events().len() as u64;
        }
        self.inner.appended.notify_waiters();
        // No subscriber is fine: the log has them.
        for event in record.events() {
            let _ = self.inner.live.send(event.clone());
        }
        Ok(())
    }

    async fn open_history(&self, from: StreamOffset) -> Result<Box<dyn HistoryReader>, BusError> {
        let len = self.inner.lock().records.len() as u64;
        let next = match from {
            StreamOffset::First => 0,
            StreamOffset::Next => len,
            StreamOffset::Last => len.saturating_sub(1),
            StreamOffset::At(offset) => offset.min(len),
        };
        Ok(Box::new(MemoryHistory {
            inner: Arc::clone(&self.inner),
            next,
        }))
    }

    async fn next(&self, stages: &[Stage]) -> Option<Delivery> {
        self.wait_for(|state| self.take(state, stages)).await
    }
}

#[async_trait]
impl Triggers for MemoryBus {
    async fn publish_trigger(&self, trigger: &TriggerMessage) -> Result<(), BusError> {
        self.inner.lock().triggers.push_back((trigger.clone(), 0));
        self.inner.arrivals.notify_waiters();
        Ok(())
    }

    async fn next_trigger(&self) -> Option<TriggerDelivery> {
        self.wait_for(|state| self.take_trigger(state)).await
    }

    async fn park_trigger(&self, trigger: &TriggerMessage, error: &str) -> Result<(), BusError> {
        self.inner
            .lock()
            .parked_triggers
            .push((trigger.clone(), error.to_string()));
        Ok(())
    }

    async fn delay_trigger(&self, trigger: &TriggerMessage, delay: Duration, attempts: u32) -> Result<(), BusError> {
        let mut trigger = trigger.clone();
        trigger.attempts = attempts;
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.lock().triggers.push_back((trigger, 0));
            inner.arrivals.notify_waiters();
        });
        Ok(())
    }
}

/// A reader of the in-process history: the log from an offset, waiting at its end.
struct MemoryHistory {
    inner: Arc<Inner>,
    next: u64,
}

#[async_trait]
impl HistoryReader for MemoryHistory {
    async fn next_record(&mut self) -> Option<Result<(u64, Record), BusError>> {
        loop {
            let appended = self.inner.appended.notified();
            let mut appended = std::pin::pin!(appended);
            appended.as_mut().enable();
            if let Some(record) = self.inner.lock().records.get(self.next as usize).cloned() {
                let offset = self.next;
                self.next += 1;
                return Some(Ok((offset, record)));
            }
            appended.await;
        }
    }

    async fn close(self: Box<Self>) {}
}

/// Where a delivery goes back to when it is returned.
enum Home {
    Stage(Stage),
    /// The trigger itself (a trigger delivery carries its message, not a body).
    Triggers(Box<TriggerMessage>),
}

/// Settles one delivery; dropping it unsettled requeues the message, as a broker does when a
/// consumer goes away.
struct MemoryAcker {
    inner: Arc<Inner>,
    home: Home,
    /// The body and its delivery count until settled.
    unsettled: Option<(Vec<u8>, u32)>,
}

impl MemoryAcker {
    fn settle(&mut self, requeue: bool) {
        let Some((body, deliveries)) = self.unsettled.take() else {
            return;
        };
        if let Home::Triggers(trigger) = &self.home {
            if requeue {
                self.inner.lock().triggers.push_back(((**trigger).clone(), deliveries));
                self.inner.arrivals.notify_waiters();
            }
            return;
        }
        let Home::Stage(stage) = self.home else { return };
        if requeue {
            self.inner.enqueue(stage, body, deliveries, |s| {
                s.unacked -= 1;
                s.requeued += 1;
            });
        } else {
            let mut state = self.inner.lock();
            state.stats.unacked -= 1;
            state.stats.acked += 1;
        }
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.settle(false);
        Ok(())
    }

    async fn requeue(mut self: Box<Self>) -> Result<(), BusError> {
        self.settle(true);
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        self.settle(true);
    }
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use tokio::time::{Instant, advance};
    use uuid::Uuid;

    use super::*;
    use crate::events::EventKind;
    use crate::model::envelope::Branch;

    fn bus() -> MemoryBus {
        MemoryBus::new(vec![
            Duration::from_millis(10),
            Duration::from_millis(50),
            Duration::from_millis(200),
        ])
    }

    /// Lets spawned tasks (tier timers) run without moving the clock.
    async fn settle_tasks() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn messages_come_out_oldest_first_across_the_stages_asked_for() {
        let bus = bus();
        bus.publish(Stage::Replicate, b"r1", None).await.unwrap();
        bus.publish(Stage::Snapshot, b"s1", None).await.unwrap();
        bus.publish(Stage::Replicate, b"r2", None).await.unwrap();
        let stages = [Stage::Snapshot, Stage::Replicate];
        let mut bodies = Vec::new();
        for _ in 0..3 {
            let d = bus.next(&stages).await.unwrap();
            assert_eq!(d.delivery_count, 1);
            bodies.push((d.stage, d.body.clone()));
            d.acker.ack().await.unwrap();
        }
        assert_eq!(
            bodies,
            vec![
                (Stage::Replicate, b"r1".to_vec()),
                (Stage::Snapshot, b"s1".to_vec()),
                (Stage::Replicate, b"r2".to_vec()),
            ]
        );
        let stats = bus.stats();
        assert_eq!((stats.published, stats.delivered, stats.acked), (3, 3, 3));
        assert!(stats.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn a_consumer_only_sees_its_stages() {
        let bus = bus();
        bus.publish(Stage::Verify, b"v", None).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_secs(60), bus.next(&[Stage::Snapshot])).await;
        assert!(waited.is_err(), "a snapshot consumer must not get a verify message");
        assert_eq!(bus.ready(Stage::Verify), vec![b"v".to_vec()]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_message_reappears_after_its_own_delay_and_not_before() {
        let bus = Arc::new(bus());
        let start = Instant::now();
        // Longer than a tier, shorter than the next: held for all of it, once.
        bus.publish_delayed(Stage::Verify, b"later", Duration::from_millis(70), None)
            .await
            .unwrap();
        settle_tasks().await;
        assert_eq!(bus.stats().waiting, 1);

        advance(Duration::from_millis(69)).await;
        settle_tasks().await;
        assert!(bus.ready(Stage::Verify).is_empty(), "not before 70 ms");

        let d = bus.next(&[Stage::Verify]).await.unwrap();
        assert_eq!(Instant::now() - start, Duration::from_millis(70));
        assert_eq!(d.body, b"later");
        assert_eq!(d.delivery_count, 1);
        d.acker.ack().await.unwrap();
        let stats = bus.stats();
        assert_eq!((stats.delayed, stats.waiting, stats.published), (1, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_or_requeued_delivery_returns_with_its_count_raised() {
        let bus = bus();
        bus.publish(Stage::Snapshot, b"m", None).await.unwrap();

        let first = bus.next(&[Stage::Snapshot]).await.unwrap();
        assert_eq!(bus.stats().unacked, 1);
        drop(first);
        let stats = bus.stats();
        assert_eq!((stats.unacked, stats.requeued, stats.ready), (0, 1, 1));

        let second = bus.next(&[Stage::Snapshot]).await.unwrap();
        assert_eq!(second.delivery_count, 2);
        second.acker.requeue().await.unwrap();

        let third = bus.next(&[Stage::Snapshot]).await.unwrap();
        assert_eq!(third.delivery_count, 3);
        assert_eq!(third.body, b"m");
        third.acker.ack().await.unwrap();
        let stats = bus.stats();
        assert_eq!((stats.acked, stats.requeued), (1, 2));
        assert!(stats.is_idle());
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wakes_waiting_consumers_and_ends_deliveries() {
        let bus = Arc::new(bus());
        let waiting = tokio::spawn({
            let bus = Arc::clone(&bus);
            async move { bus.next(&[Stage::Snapshot]).await.is_none() }
        });
        settle_tasks().await;
        bus.shutdown();
        assert!(waiting.await.unwrap(), "a waiting consumer gets None");
        bus.publish(Stage::Snapshot, b"after", None).await.unwrap();
        assert!(bus.next(&[Stage::Snapshot]).await.is_none());
        assert_eq!(bus.ready(Stage::Snapshot).len(), 1, "publishing still works");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_consumer_wakes_when_a_message_lands() {
        let bus = Arc::new(bus());
        let consumer = tokio::spawn({
            let bus = Arc::clone(&bus);
            async move {
                let d = bus.next(&[Stage::Verify]).await.unwrap();
                let body = d.body.clone();
                d.acker.ack().await.unwrap();
                body
            }
        });
        settle_tasks().await;
        bus.publish_delayed(Stage::Verify, b"woken", Duration::from_millis(1), None)
            .await
            .unwrap();
        assert_eq!(consumer.await.unwrap(), b"woken");
    }

    #[tokio::test(start_paused = true)]
    async fn parking_and_events_are_kept_and_broadcast() {
        let bus = bus();
        let reason = ParkReason {
            stage: Some(Stage::Snapshot),
            error: "not JSON".into(),
            attempts: 1,
            message_id: None,
        };
        bus.park(b"junk", &reason).await.unwrap();
        assert_eq!(bus.parked(), vec![(b"junk".to_vec(), reason)]);

        let mut live = bus.subscribe();
        let event = Event {
            run_id: Uuid::nil(),
            pipeline: "p".into(),
            version: "1.0.0".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::Throttled { retry_after_ms: None },
        };
        bus.publish_event(&event).await.unwrap();
        assert_eq!(live.recv().await.unwrap(), event);
        assert_eq!(bus.events(), vec![event]);
        assert_eq!((bus.stats().parked, bus.stats().events), (1, 1));
    }

    #[tokio::test]
    async fn a_follower_reads_each_record_once_from_where_it_left_off() {
        let bus = bus();
        let event = |pipeline: &str| Event {
            run_id: Uuid::nil(),
            pipeline: pipeline.into(),
            version: "1.0.0".into(),
            stage: Stage::Snapshot,
            branch: Branch::Trunk,
            at: OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::RolloutFinished,
        };
        let pipelines = |records: Vec<Record>| -> Vec<String> {
            records
                .iter()
                .flat_map(|r| r.events().iter().map(|e| e.pipeline.clone()))
                .collect()
        };
        bus.publish_event(&event("a")).await.unwrap();
        bus.publish_event(&event("b")).await.unwrap();
        assert_eq!(pipelines(bus.records_since(0)), ["a", "b"]);
        assert_eq!(pipelines(bus.records_since(1)), ["b"]);
        assert!(bus.records_since(2).is_empty(), "nothing new");
        assert!(bus.records_since(7).is_empty(), "past the end is nothing, not a panic");
        bus.publish_event(&event("c")).await.unwrap();
        assert_eq!(pipelines(bus.records_since(2)), ["c"]);
    }
}
