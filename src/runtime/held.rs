//! Waits held where they were looked at. A look that records nothing (the message goes on
//! unchanged but for when to look next) does not go round the broker: its delivery stays unacked
//! with this process, a timer brings the next look, and the delivery is settled only by the look
//! that finally records something (or by putting the message on a delay tier after all). On the
//! broker a wait costs nothing per look; through a delay tier each look cost two confirmed
//! publishes, two deliveries and two acks on quorum queues.
//!
//! Crash-safe as the delay tiers are: a process that dies holding a wait leaves its delivery
//! unacked, and the broker hands the message out again in the state of its last publish (its
//! looks since then are looked again: a wait records nothing; a wait a step kept with its delivery,
//! `runtime.keep_waits`, is read back from that step's commit, see `Runtime::carry_kept`). A
//! delivery is held at most
//! `hold_max` in all (the broker closes a channel holding a delivery unacked for its
//! `consumer_timeout`, 30 minutes by default) and at most `held_waits` at once per stage the
//! process consumes, counted against the queue the delivery came from (each holds a prefetch slot
//! of that stage's consumer: the worker adds that many
//! slots beside `amqp.prefetch`, so held waits never starve the deliveries that are due).
//!
//! The same slots hold deliveries that are not due yet: a message sent ahead of its time straight
//! to its stage's queue (`Runtime::sends_ahead`: a step's next state due later, when the sender
//! consumes that stage and has a slot free), one that came early, and a copy put off before its
//! step for a moment. Each would otherwise go round a delay tier and back.
//!
//! On shutdown every held wait is published as it stands (on a delay tier, or on its stage queue
//! if it is due), confirmed, and its delivery is acked: a stopping worker hands its waits on as
//! they were.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::model::envelope::Stage;

tokio::task_local! {
    /// The slot of the held delivery whose next look runs in this task: its next hold takes the
    /// slot over instead of asking for a second one, and a look that does not hold again gives it
    /// back when it ends (so a delivery in its look still counts as held).
    static LOOKING: RefCell<Option<OwnedSemaphorePermit>>;
}

/// Runs `look`, the next look of a delivery held in `slot`, handing the slot on to the look's own
/// hold if it holds again ([`HeldWaits::try_hold`]).
pub(super) async fn looking_in<F: Future>(slot: OwnedSemaphorePermit, look: F) -> F::Output {
    LOOKING.scope(RefCell::new(Some(slot)), look).await
}

/// The slot of the delivery being looked at in this task, if it is one of `slots` and not taken
/// yet.
fn slot_of_the_look(slots: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
    LOOKING
        .try_with(|looking| {
            let mut looking = looking.borrow_mut();
            let ours = looking
                .as_ref()
                .is_some_and(|slot| Arc::ptr_eq(slot.semaphore(), slots));
            if ours { looking.take() } else { None }
        })
        .ok()
        .flatten()
}

/// The waits one runtime holds: a permit each from the slots of the delivery's stage, and the
/// signal that it is shutting down. Slots are per stage because a held delivery keeps a prefetch
/// slot of its own stage's consumer: one shared count would let a busy stage hold more than its
/// consumer has slots for, and keep that stage's due deliveries out.
pub(super) struct HeldWaits {
    slots: Vec<(Stage, Arc<Semaphore>)>,
    per_stage: u32,
    stop: watch::Sender<bool>,
}

impl HeldWaits {
    /// `per_stage` slots for each of `stages`.
    pub(super) fn new(per_stage: usize, stages: &[Stage]) -> HeldWaits {
        // Settings bound it far below both limits.
        let per_stage = u32::try_from(per_stage.min(Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        let mut slots: Vec<(Stage, Arc<Semaphore>)> = Vec::with_capacity(stages.len());
        for &stage in stages {
            if !slots.iter().any(|(s, _)| *s == stage) {
                slots.push((stage, Arc::new(Semaphore::new(per_stage as usize))));
            }
        }
        HeldWaits {
            slots,
            per_stage,
            stop: watch::channel(false).0,
        }
    }

    fn of(&self, stage: Stage) -> Option<&Arc<Semaphore>> {
        self.slots.iter().find(|(s, _)| *s == stage).map(|(_, permits)| permits)
    }

    /// Room for one more held delivery of `stage`, unless the runtime is stopping, does not
    /// consume that stage, or every slot of it is taken. A held delivery's next look that holds it
    /// again keeps the slot it had: a wait already held stays held when its stage's slots are full.
    pub(super) fn try_hold(&self, stage: Stage) -> Option<OwnedSemaphorePermit> {
        if *self.stop.borrow() {
            return None;
        }
        let slots = self.of(stage)?;
        slot_of_the_look(slots).or_else(|| Arc::clone(slots).try_acquire_owned().ok())
    }

    /// Whether a slot of `stage` is free now (and the runtime not stopping): a hint, not a
    /// reservation.
    pub(super) fn has_room(&self, stage: Stage) -> bool {
        !*self.stop.borrow() && self.of(stage).is_some_and(|permits| permits.available_permits() > 0)
    }

    /// Resolves once the runtime is stopping (at once if it is already).
    pub(super) fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Tells every held wait to hand its message on: the runtime is stopping.
    pub(super) fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// How many deliveries are held now, over every stage.
    pub(super) fn held(&self) -> usize {
        self.slots
            .iter()
            .map(|(_, permits)| (self.per_stage as usize).saturating_sub(permits.available_permits()))
            .sum()
    }

    /// Resolves once no wait is held any more.
    pub(super) async fn drained(&self) {
        for (_, permits) in &self.slots {
            // The semaphore is never closed; every permit comes back when its wait ends.
            let _all = permits.acquire_many(self.per_stage).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_run_out_come_back_and_none_are_given_once_stopping() {
        let held = HeldWaits::new(2, &[Stage::Replicate]);
        let first = held.try_hold(Stage::Replicate).expect("a slot");
        let second = held.try_hold(Stage::Replicate).expect("a second slot");
        assert!(held.try_hold(Stage::Replicate).is_none(), "only two slots");
        assert_eq!(held.held(), 2);
        drop(first);
        assert_eq!(held.held(), 1);
        let mut stopping = held.stopping();
        assert!(!*stopping.borrow_and_update());
        held.stop();
        assert!(
            held.try_hold(Stage::Replicate).is_none(),
            "nothing is held once stopping"
        );
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
        let held = HeldWaits::new(0, &[Stage::Replicate]);
        assert!(held.try_hold(Stage::Replicate).is_none());
        held.drained().await;
    }

    #[tokio::test]
    async fn each_stage_has_slots_of_its_own_and_none_for_a_stage_not_consumed() {
        let held = HeldWaits::new(1, &[Stage::Replicate, Stage::Verify]);
        let replicate = held.try_hold(Stage::Replicate).expect("a replicate slot");
        assert!(!held.has_room(Stage::Replicate), "replicate's one slot is taken");
        assert!(held.try_hold(Stage::Replicate).is_none());
        assert!(held.has_room(Stage::Verify), "verify's slot is its own");
        let verify = held.try_hold(Stage::Verify).expect("a verify slot");
        assert_eq!(held.held(), 2);
        assert!(!held.has_room(Stage::Snapshot) && held.try_hold(Stage::Snapshot).is_none());
        drop((replicate, verify));
        assert_eq!(held.held(), 0);
        held.drained().await;
    }
}
