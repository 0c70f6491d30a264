//! The runtime: takes deliveries from the bus, runs the stage step, and carries out the outcome the
//! same way for every stage — publish (confirmed) then ack, delay on the tiers, retry with backoff
//! and jitter for transient errors (honouring Retry-After), fail the branch for permanent ones,
//! park what cannot be decoded, and emit events.

use async_trait::async_trait;

use crate::azure::AzureError;
use crate::model::envelope::Envelope;
use crate::stages::Step;

/// What handles a decoded message. Production: the stages; tests: anything.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, message: Envelope) -> Result<Step, AzureError>;
}
