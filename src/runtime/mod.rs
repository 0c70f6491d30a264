//! The runtime: takes deliveries from the bus, runs the stage step, and carries out the outcome the
//! same way for every stage — publish (confirmed) then ack, delay on the tiers, retry with backoff
//! and jitter for transient errors (honouring Retry-After), fail the branch for permanent ones,
//! park what cannot be decoded, and emit events. It knows nothing of Azure beyond an error's class.
//!
//! - [`runner`] — [`Runtime`], the consumers and the handling of one delivery.
//! - `held` — waits held where they were looked at, instead of going round a delay tier.
//! - [`retry`] — what follows a failed step (pure).
//! - [`settings`] — [`RuntimeSettings`].
//! - [`complete`] — [`complete::drive`], one run driven in-process (what `sigrun run` uses, through
//!   `admission::local`).

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::azure::AzureError;
use crate::model::envelope::Envelope;
use crate::stages::{Step, Tried};

pub mod complete;
mod held;
pub mod observe;
pub mod retry;
pub mod runner;
pub mod settings;
pub mod stage_handler;

#[cfg(test)]
mod fencing_tests;
#[cfg(test)]
mod held_tests;
#[cfg(test)]
mod keep_tests;
#[cfg(test)]
mod step_on_tests;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

pub use complete::{RunError, RunOutcome};
pub use observe::{Handled, Observer};
pub use runner::{Running, Runtime, RuntimeReport};
pub use settings::{RetrySettings, RuntimeSettings, SettingsError};
pub use stage_handler::StageHandler;

/// What handles a decoded message. Production: the stages; tests: anything. `now` is the
/// runtime's clock (so a test with tokio's time paused steps in step with its delay tiers);
/// `tried`, whether an earlier try of the message's state may have reached Azure.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, message: Envelope, now: OffsetDateTime, tried: Tried) -> Result<Step, AzureError>;
}

/// Why a step produced no outcome: Azure (classified for retry by [`retry::decide`]), or the
/// handler itself broke (a bug: retrying the same message would break it again).
#[derive(Debug)]
pub enum StepError {
    Azure(AzureError),
    /// The handler panicked or its task was cancelled; the text says which and why.
    Broken(String),
}

impl From<AzureError> for StepError {
    fn from(error: AzureError) -> StepError {
        StepError::Azure(error)
    }
}

/// Where the runtime reads "now" when it compares a message's `not_before` and sets the next one.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock: what workers and real runs use, since messages carry absolute
    /// times that other processes compare with theirs.
    System,
    /// Tokio's clock, anchored to the wall clock when made: with tokio's time paused in a test,
    /// "now" moves only as the test advances it, in step with the delay tiers' timers.
    Tokio {
        wall: OffsetDateTime,
        instant: tokio::time::Instant,
    },
}

impl Clock {
    pub fn tokio() -> Clock {
        Clock::Tokio {
            wall: OffsetDateTime::now_utc(),
            instant: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> OffsetDateTime {
        match self {
            Clock::System => OffsetDateTime::now_utc(),
            Clock::Tokio { wall, instant } => *wall + instant.elapsed(),
        }
    }
}
