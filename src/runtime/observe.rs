//! What the runtime tells an observer (the metrics) about each delivery it handled: the stage and
//! what became of the message. Kept apart from the runner so the runtime stays free of any
//! metrics library; `telemetry::Telemetry` is the production observer.

use std::time::Duration;

use crate::events::Event;
use crate::model::envelope::Stage;
use crate::stages::{FailureClass, Observation};

/// What became of a handled message, decided by the step's outcome or the retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handled {
    /// The step succeeded and sent the message(s) on to their next stage (`Outcome::Advance`).
    Advanced,
    /// The step is waiting on Azure (or another claim holds the step): held here for its next
    /// look when a slot is free, else on a delay tier.
    Waiting,
    /// The message came before it was due with no slot free to hold it in (or was held and its
    /// runtime stopped): back to a delay tier without a step. Each is a broker round trip for
    /// nothing; held slots and the relay holding a delayed message until its own due time keep
    /// them rare.
    Early,
    /// The step was put off before it reached Azure: the subscription's request budget had no
    /// room for it yet (`azure::pacing`). Not a failure; it waits on a delay tier.
    Paced,
    /// The branch ended well with this step (`Outcome::Done`).
    Done,
    /// The stage itself said the branch failed (`Outcome::Fail`): the failure event is published,
    /// the message is not parked.
    Failed,
    /// The step failed and is tried again later.
    Retried,
    /// The message was parked: a step that failed for good, or a message that cannot be decoded.
    Parked,
    /// The message's run was cancelled: its branch stopped here without a step.
    Cancelled,
    /// A stale copy of a step another copy took (or of a finished run): dropped without a step.
    Dropped,
}

impl Handled {
    pub const ALL: [Handled; 10] = [
        Handled::Advanced,
        Handled::Waiting,
        Handled::Early,
        Handled::Paced,
        Handled::Done,
        Handled::Failed,
        Handled::Retried,
        Handled::Parked,
        Handled::Cancelled,
        Handled::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Handled::Advanced => "advanced",
            Handled::Waiting => "waiting",
            Handled::Early => "early",
            Handled::Paced => "paced",
            Handled::Done => "done",
            Handled::Failed => "failed",
            Handled::Retried => "retried",
            Handled::Parked => "parked",
            Handled::Cancelled => "cancelled",
            Handled::Dropped => "dropped",
        }
    }
}

/// Told about every delivery once its effects are confirmed and it is acked (a delivery returned
/// to its queue because a publish failed is told about when it is handled again). Called on the
/// consumer's task: keep it cheap and non-blocking.
///
/// The other hooks are told, for an acked delivery, what its step measured; each has a default
/// that ignores it.
pub trait Observer: Send + Sync {
    fn handled(&self, stage: Stage, outcome: Handled);

    /// Time the handler (the step) took for one message of `stage`.
    fn handler_time(&self, _stage: Stage, _elapsed: Duration) {}

    /// A branch of `pipeline` finished `stage` (advanced or done), `elapsed` after entering it.
    fn stage_finished(&self, _pipeline: &str, _stage: Stage, _elapsed: Duration) {}

    /// A branch of `pipeline` failed at `stage` (or a region of it did: `RegionFailed`).
    fn stage_failed(&self, _pipeline: &str, _stage: Stage, _class: FailureClass) {}

    /// An Azure operation the envelope was waiting on (`InFlight::what`) reached its end.
    fn operation_finished(&self, _what: &str, _elapsed: Duration) {}

    /// What a step of `pipeline` saw of Azure (replication progress, pool nodes).
    fn observed(&self, _pipeline: &str, _observation: &Observation) {}

    /// An event of the run history, in stream order (the run-level metrics). Fed by whatever reads
    /// the events (the ledger over the events stream, the worker's or `sigrun run`'s), not by the runtime.
    fn event(&self, _event: &Event) {}
}
