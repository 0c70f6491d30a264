//! The message bus the stages run on. One interface, two implementations: `memory` (in-process,
//! for `sigrun run` and tests) and the RabbitMQ bus (workers). Stages never see it; the runtime
//! consumes, publishes, delays, parks and writes the run history through it, the admitter takes
//! triggers from it ([`Triggers`]), and the ledger reads the history back ([`HistoryReader`]).

use std::time::Duration;

use async_trait::async_trait;

use crate::events::Event;
use crate::ledger::record::Record;
use crate::model::envelope::Stage;

pub mod amqp;
pub mod memory;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus connection: {0}")]
    Connection(String),
    #[error("publish to {target} not confirmed: {reason}")]
    NotConfirmed { target: String, reason: String },
    #[error("bus closed")]
    Closed,
    /// Something read from the broker that does not parse (an event in the stream, a marker).
    #[error("{0}")]
    Malformed(String),
}

/// Why a message was parked, carried with it so the parking queue explains itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkReason {
    pub stage: Option<Stage>,
    pub error: String,
    pub attempts: u32,
    pub message_id: Option<String>,
}

/// One message taken from a stage queue.
pub struct Delivery {
    pub stage: Stage,
    pub body: Vec<u8>,
    /// Deliveries of this message so far, this one included (1 on first delivery).
    pub delivery_count: u32,
    pub acker: Box<dyn Acker>,
}

/// Settles a delivery. Dropping a delivery unsettled returns it to its queue.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Whether the delivery is still held on the connection it came on. Once that connection is
    /// gone the broker has put the message back for another consumer: publishing its next state
    /// now would make a second copy.
    fn still_held(&self) -> bool {
        true
    }
    async fn ack(self: Box<Self>) -> Result<(), BusError>;
    /// Returns the message to its queue (counts toward its delivery limit).
    async fn requeue(self: Box<Self>) -> Result<(), BusError>;
}

/// Where a history reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOffset {
    /// The oldest record still retained.
    First,
    /// Only records published after the reader opens.
    Next,
    /// The last chunk written, then what follows.
    Last,
    /// The record at this offset, then what follows.
    At(u64),
}

/// Reads the history (events and the ledger's records) in publish order.
#[async_trait]
pub trait HistoryReader: Send {
    /// The next record and its offset; waits at the end for more. `None` once the reader is gone
    /// (its connection dropped): open another from the offset after the last one read. A record
    /// that does not parse is [`BusError::Malformed`] and is skipped.
    async fn next_record(&mut self) -> Option<Result<(u64, Record), BusError>>;
    async fn close(self: Box<Self>);
}

#[async_trait]
pub trait Bus: Send + Sync {
    /// Puts a message on a stage's work queue; returns once the broker has confirmed it. An
    /// envelope's `traceparent` is handed over as a value beside its body: a bus that carries it
    /// (the AMQP bus, as a header) never reads the body again for it.
    async fn publish(&self, stage: Stage, body: &[u8], traceparent: Option<&str>) -> Result<(), BusError>;
    /// Puts a message on the delay tier that fits `delay` ([`tier_for`]), held there until `delay`
    /// has passed, not just the tier's own: then it lands on `stage`'s work queue. One hop for
    /// any delay, so a waiting message comes back once, when it is due. Confirmed like `publish`.
    async fn publish_delayed(
        &self,
        stage: Stage,
        body: &[u8],
        delay: Duration,
        traceparent: Option<&str>,
    ) -> Result<(), BusError>;
    /// Parks a message that cannot be processed, with the reason. Confirmed.
    async fn park(&self, body: &[u8], reason: &ParkReason) -> Result<(), BusError>;
    /// Appends a record to the history. Confirmed.
    async fn publish_record(&self, record: &Record) -> Result<(), BusError>;
    /// Publishes a run event on its own (not part of a step's commit). Confirmed.
    async fn publish_event(&self, event: &Event) -> Result<(), BusError> {
        self.publish_record(&Record::Event(event.clone())).await
    }
    /// Opens a reader of the history from `from`.
    async fn open_history(&self, from: StreamOffset) -> Result<Box<dyn HistoryReader>, BusError>;
    /// The next delivery from any of `stages`' queues; `None` once the bus is shut down.
    /// Cancel-safe: dropping the future before it completes takes no message (the runtime races
    /// it against its shutdown signal).
    async fn next(&self, stages: &[Stage]) -> Option<Delivery>;
}

/// A trigger as it was delivered: the body and the properties the admitter needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerMessage {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub message_id: Option<String>,
    /// Times it was put off for a transient failure (its `x-sigrun-attempts` header).
    pub attempts: u32,
    /// Deliveries of this message so far, this one included.
    pub delivery_count: u32,
    /// The producer's W3C trace context (its `traceparent` header), as sent.
    pub traceparent: Option<String>,
}

/// A trigger taken from the triggers queue. Dropping it unsettled returns it to the queue.
pub struct TriggerDelivery {
    pub message: TriggerMessage,
    pub acker: Box<dyn Acker>,
}

/// Where triggers wait to be admitted, one admitter taking them at a time.
#[async_trait]
pub trait Triggers: Bus {
    /// Publishes a trigger (confirmed).
    async fn publish_trigger(&self, trigger: &TriggerMessage) -> Result<(), BusError>;
    /// The next trigger; `None` once the bus is shut down. Cancel-safe like [`Bus::next`].
    async fn next_trigger(&self) -> Option<TriggerDelivery>;
    /// Parks a trigger with the reason (confirmed), its content type and message id kept.
    async fn park_trigger(&self, trigger: &TriggerMessage, error: &str) -> Result<(), BusError>;
    /// Puts a trigger off for `delay` (held on the tier that fits, as `Bus::publish_delayed`
    /// holds a message); it comes back carrying `attempts` (confirmed).
    async fn delay_trigger(&self, trigger: &TriggerMessage, delay: Duration, attempts: u32) -> Result<(), BusError>;
}

/// The tier to wait on for `delay`: the longest that does not overshoot it, or the shortest.
/// Waiting longer than a tier hops again (the message carries when it may be looked at).
pub fn tier_for(tiers: &[Duration], delay: Duration) -> usize {
    tiers.iter().rposition(|t| *t <= delay).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_never_overshoot_when_a_shorter_one_fits() {
        let tiers = [Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(30)];
        assert_eq!(tier_for(&tiers, Duration::from_millis(10)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_secs(4)), 0);
        assert_eq!(tier_for(&tiers, Duration::from_secs(5)), 1);
        assert_eq!(tier_for(&tiers, Duration::from_secs(600)), 2);
    }
}
