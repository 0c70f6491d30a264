//! The six stages. Each is a small state machine in its own module: given a run's message and
//! the Azure trait, it decides what happens next. No stage does IO except through `AzureApi`, and
//! none knows the bus: the runtime carries out the outcome the same way for all of them.

use std::time::Duration;

use time::OffsetDateTime;

use crate::azure::{AzureApi, AzureError};
use crate::events::EventKind;
use crate::model::envelope::Envelope;

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

/// An outcome and the events that record it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub outcome: Outcome,
    pub events: Vec<EventKind>,
}

impl Step {
    pub fn new(outcome: Outcome) -> Step {
        Step {
            outcome,
            events: Vec::new(),
        }
    }

    pub fn with(mut self, event: EventKind) -> Step {
        self.events.push(event);
        self
    }
}

/// What a step may use besides its message.
pub struct StepContext<'a> {
    pub azure: &'a dyn AzureApi,
    /// Real time now.
    pub now: OffsetDateTime,
}

/// Runs one step of `message`'s stage. Azure failures come back as `Err` for the runtime to
/// classify (retry, back off, or fail the branch).
pub async fn step(message: Envelope, ctx: &StepContext<'_>) -> Result<Step, AzureError> {
    let _ = ctx;
    Ok(Step::new(Outcome::Fail(format!(
        "stage {} is not built yet",
        message.stage
    ))))
}
