//! The six stages. Each is a small state machine in its own module: given a run's message and
//! the Azure trait, it decides what happens next. No stage does IO except through `AzureApi`, and
//! none knows the bus: the runtime carries out the outcome the same way for all of them.

mod clean_up;
mod common;
#[cfg(test)]
mod decisions;
#[cfg(test)]
mod fake_azure;
mod gallery_publish;
mod image_create;
mod pool_create;
mod replicate;
pub mod retention;
mod rollout;
mod snapshot;
mod verify;

use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::azure::{AzureApi, AzureError};
use crate::events::EventKind;
use crate::model::envelope::{Envelope, Stage};
use crate::model::plan::Presence;

/// What a step decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Hand the run (or its branches) to the stages named in each message.
    Advance(Vec<Envelope>),
    /// Look again after `delay`; `emit` goes out now (a region's pools start while others replicate).
    Wait {
        message: Box<Envelope>,
        delay: Duration,
        emit: Vec<Envelope>,
    },
    /// This branch is finished.
    Done,
    /// This branch failed for a reason retrying will not fix.
    Fail(String),
}

/// An outcome, the events that record it, and what the step saw of Azure on the way (for the
/// metrics; not part of the run's history).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub outcome: Outcome,
    pub events: Vec<EventKind>,
    pub observations: Vec<Observation>,
}

/// A reading a step took that the metrics export as a gauge.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// The image version's replication to `region`: 0–1 (1 once Completed).
    Replication { region: String, ratio: f64 },
    /// The nodes of the pool being verified for pool target `target`, by Batch node state.
    PoolNodes {
        target: String,
        by_state: Vec<(String, u32)>,
    },
    /// Why the stage failed the branch, when it knows better than "permanent".
    Failure(FailureClass),
}

/// The bounded reason classes of `sigrun_stage_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// A failure retrying cannot fix (the step's call, or the stage's own verdict).
    Permanent,
    /// Transient failures until the retry budget ran out.
    GaveUp,
    /// A deadline passed (verify's).
    Timeout,
    /// A rule of the plan or of Azure is broken.
    Rule,
    /// The message could not be decoded.
    Malformed,
    /// A region's replication failed for good.
    RegionFailed,
    /// The pool's allocation ended with resize errors.
    Allocation,
    /// Too many nodes failed their start task.
    StartTask,
}

impl FailureClass {
    pub const ALL: [FailureClass; 8] = [
        FailureClass::Permanent,
        FailureClass::GaveUp,
        FailureClass::Timeout,
        FailureClass::Rule,
        FailureClass::Malformed,
        FailureClass::RegionFailed,
        FailureClass::Allocation,
        FailureClass::StartTask,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Permanent => "permanent",
            FailureClass::GaveUp => "gave_up",
            FailureClass::Timeout => "timeout",
            FailureClass::Rule => "rule",
            FailureClass::Malformed => "malformed",
            FailureClass::RegionFailed => "region_failed",
            FailureClass::Allocation => "allocation",
            FailureClass::StartTask => "start_task",
        }
    }
}

impl Step {
    pub fn new(outcome: Outcome) -> Step {
        Step {
            outcome,
            events: Vec::new(),
            observations: Vec::new(),
        }
    }

    pub fn observe(mut self, observation: Observation) -> Step {
        self.observations.push(observation);
        self
    }

    pub fn with(mut self, event: EventKind) -> Step {
        self.events.push(event);
        self
    }
}

/// How stages pace their looks at Azure. Durations are Azure time; `azure_time_factor` converts
/// them to real time (1 against Azure; 1/N against an emulator running N times faster).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageSettings {
    /// Look again after this when Azure gives no hint and nothing better is known.
    #[serde(with = "crate::model::spec::duration")]
    pub poll_default: Duration,
    #[serde(with = "crate::model::spec::duration")]
    pub poll_min: Duration,
    #[serde(with = "crate::model::spec::duration")]
    pub poll_max: Duration,
    /// Times a region whose replication failed is removed and added back before it counts as failed.
    pub region_retries: u32,
    pub azure_time_factor: f64,
}

impl StageSettings {
    /// Checks what serde cannot: the bounds of each look and of the retries, naming the key.
    pub fn check(&self) -> Result<(), String> {
        let day = Duration::from_secs(86_400);
        if self.poll_min.is_zero() || self.poll_min > self.poll_default || self.poll_default > self.poll_max {
            return Err("stages: poll_min must be above zero and poll_min ≤ poll_default ≤ poll_max".into());
        }
        if self.poll_max > day {
            return Err(format!(
                "stages.poll_max: {} is longer than a day",
                crate::model::spec::duration::format(self.poll_max)
            ));
        }
        if self.region_retries > 10 {
            return Err(format!("stages.region_retries: {} is above 10", self.region_retries));
        }
        if !(self.azure_time_factor > 0.0 && self.azure_time_factor <= 1000.0) {
            return Err(format!(
                "stages.azure_time_factor: {} is outside (0, 1000]",
                self.azure_time_factor
            ));
        }
        Ok(())
    }
}

impl Default for StageSettings {
    fn default() -> Self {
        StageSettings {
            poll_default: Duration::from_secs(30),
            poll_min: Duration::from_secs(5),
            poll_max: Duration::from_secs(600),
            region_retries: 1,
            azure_time_factor: 1.0,
        }
    }
}

/// What a step may ask of the run history: whether another run is still making a pool.
pub trait Runs: Send + Sync {
    /// Whether run `run_id` is still creating or verifying its pool for `target`; `None` when the
    /// run is not in the history this process reads.
    fn pool_in_progress(&self, run_id: uuid::Uuid, target: &str) -> Option<bool>;
    /// Whether run `run_id` may still act (a message of it is live); `None` when the run is not
    /// in the history this process reads.
    fn run_in_progress(&self, run_id: uuid::Uuid) -> Option<bool>;
    /// Whether a verdict of run `run_id` has promoted its version, as far as the history this
    /// process reads says; `None` when the run is not in it. `Some(true)` spares verify's read of
    /// the version; `Some(false)` spares it only for a version the verdict's admission made.
    fn version_promoted(&self, _run_id: uuid::Uuid) -> Option<bool> {
        None
    }
}

/// No history at all: every other run is unknown.
pub struct NoHistory;

impl Runs for NoHistory {
    fn pool_in_progress(&self, _run_id: uuid::Uuid, _target: &str) -> Option<bool> {
        None
    }

    fn run_in_progress(&self, _run_id: uuid::Uuid) -> Option<bool> {
        None
    }
}

/// Whether an earlier try of a message's state may have reached Azure: the runtime knows (from
/// the delivery and the ledger), the step does not. A create looks for what an earlier try made
/// (to join it, and to record it as this run's) only after one; on a first try it writes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tried {
    /// The state's first delivery, no failed try before it, sent on by a step whose claim the
    /// ledger read (not a replay), and claimed by no copy yet. A copy of it handled at the same
    /// moment may write too: Azure takes the same PUT twice as one.
    Never,
    /// Anything else, or not known (no ledger).
    Maybe,
}

/// What a step may use besides its message.
pub struct StepContext<'a> {
    pub azure: &'a dyn AzureApi,
    /// Real time now.
    pub now: OffsetDateTime,
    pub settings: &'a StageSettings,
    /// The other runs, as the history says (the rollout leaves their pools alone while they live).
    pub runs: &'a dyn Runs,
    /// Whether an earlier try of this message's state may have written to Azure.
    pub tried: Tried,
}

impl StepContext<'_> {
    /// Whether this is the state's first try: nothing of it can have reached Azure before.
    pub fn first_try(&self) -> bool {
        self.tried == Tried::Never
    }

    /// What this try may take as read from the planner's reading `seen` (`Plan::seen`): all of it
    /// on a first try, nothing (`Unknown`: read Azure) after one.
    pub fn as_planned(&self, seen: Presence) -> Presence {
        if self.first_try() { seen } else { Presence::Unknown }
    }
}

/// Runs one step of `message`'s stage. Azure failures come back as `Err` for the runtime to
/// classify (retry, back off, or fail the branch).
///
/// The step is on the heap: a stage's future is kilobytes (the envelope and what its requests
/// hold across awaits), and every layer a step goes through (the handler, its urgency and
/// throttling scopes, the runtime's watch and span) would otherwise move the largest by value.
pub fn step<'a>(message: Envelope, ctx: &'a StepContext<'_>) -> BoxFuture<'a, Result<Step, AzureError>> {
    if clean_up::is_clean_up(&message) {
        return Box::pin(clean_up::step(message, ctx));
    }
    match message.stage {
        Stage::Snapshot => Box::pin(snapshot::step(message, ctx)),
        Stage::ImageCreate => Box::pin(image_create::step(message, ctx)),
        Stage::GalleryPublish => Box::pin(gallery_publish::step(message, ctx)),
        Stage::Replicate => Box::pin(replicate::step(message, ctx)),
        Stage::PoolCreate => Box::pin(pool_create::step(message, ctx)),
        Stage::Verify if rollout::is_retiring(&message) => Box::pin(rollout::step(message, ctx)),
        Stage::Verify => Box::pin(verify::step(message, ctx)),
    }
}
