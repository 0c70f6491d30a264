//! Waits held where they were looked at. A look that records nothing (the message goes on
//! unchanged but for when to look next) does not go round the broker: its delivery stays unacked
//! with this process, a timer brings the next look, and the delivery is settled only by the look
//! that finally records something (or by putting the message on a delay tier after all). On the
//! broker a wait costs nothing per look; through a delay tier each look cost two confirmed
//! publishes, two deliveries and two acks on quorum queues.
//!
//! Crash-safe as the delay tiers are: a process that dies holding a wait leaves its delivery
//! unacked, and the broker hands the message out again in the state of its last publish (its
//! looks since then are looked again: a wait records nothing). A delivery is held at most
//! `hold_max` in all (the broker closes a channel holding a delivery unacked for its
//! `consumer_timeout`, 30 minutes by default) and at most `held_waits` at once per process (each
//! holds a prefetch slot of its stage consumer: the worker adds that many slots beside
//! `amqp.prefetch`, so held waits never starve the deliveries that are due).
//!
//! The same slots hold deliveries that are not due yet: a message sent ahead of its time straight
//! to its stage's queue (`Runtime::sends_ahead`: a step's next state due later, when the sender
//! consumes that stage and has a slot free), one that came early, and a copy put off before its
//! step for a moment. Each would otherwise go round a delay tier and back.
//!
//! On shutdown every held wait is published as it stands (on a delay tier, or on its stage queue
//! if it is due), confirmed, and its delivery is acked: a stopping worker hands its waits on as
//! they were.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// The waits one runtime holds: a permit each, and the signal that it is shutting down.
pub(super) struct HeldWaits {
    permits: Arc<Semaphore>,
    capacity: u32,
    stop: watch::Sender<bool>,
}

impl HeldWaits {
    pub(super) fn new(capacity: usize) -> HeldWaits {
        // Settings bound it far below both limits.
        let capacity = u32::try_from(capacity.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        HeldWaits {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            stop: watch::channel(false).0,
        }
    }

    /// Room for one more held wait, unless the runtime is stopping or every slot is taken.
    pub(super) fn try_hold(&self) -> Option<OwnedSemaphorePermit> {
        if *self.stop.borrow() {
            return None;
        }
        Arc::clone(&self.permits).try_acquire_owned().ok()
    }

    /// Whether a slot is free now (and the runtime not stopping): a hint, not a reservation.
    pub(super) fn has_room(&self) -> bool {
        !*self.stop.borrow() && self.permits.available_permits() > 0
    }

    /// Resolves once the runtime is stopping (at once if it is already).
    pub(super) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Tells every held wait to hand its message on: the runtime is stopping.
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// How many waits are held now.
    pub(super) fn held(&self) -> usize {
        (self.capacity as usize).saturating_sub(self.permits.available_permits())
    }

    /// Resolves once no wait is held any more.
    pub(super) async fn drained(&self) {
        if self.capacity > 0 {
            // The semaphore is never closed; every permit comes back when its wait ends.
            let _all = self.permits.acquire_many(self.capacity).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_run_out_come_back_and_none_are_given_once_stopping() {
        let held = HeldWaits::new(2);
        let first = held.try_hold().expect("a slot");
        let second = held.try_hold().expect("a second slot");
        assert!(held.try_hold().is_none(), "only two slots");
        assert_eq!(held.held(), 2);
        drop(first);
        assert_eq!(held.held(), 1);
        let mut stopping = held.stopping();
        assert!(!*stopping.borrow_and_update());
        held.stop();
        assert!(held.try_hold().is_none(), "nothing is held once stopping");
        stopping.wait_for(|s| *s).await.unwrap();
        let drained = held.drained();
        tokio::pin!(drained);
        assert!(futures_util::poll!(&mut drained).is_pending(), "one wait is still held");
        drop(second);
        drained.await;
        assert_eq!(held.held(), 0);
    }

    #[tokio::test]
    async fn no_slots_means_nothing_is_held_and_drained_is_immediate() {
        let held = HeldWaits::new(0);
        assert!(held.try_hold().is_none());
        held.drained().await;
    }
}
