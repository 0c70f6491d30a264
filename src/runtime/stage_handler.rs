//! The production [`Handler`]: runs the stage named in each message against Azure.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::Handler;
use crate::azure::{AzureApi, AzureError};
use crate::model::envelope::{Branch, Envelope, Stage};
use crate::stages::{self, NoHistory, Runs, StageSettings, Step, StepContext, Tried};

pub struct StageHandler {
    azure: Arc<dyn AzureApi>,
    settings: StageSettings,
    runs: Arc<dyn Runs>,
}

impl StageHandler {
    pub fn new(azure: Arc<dyn AzureApi>, settings: StageSettings) -> StageHandler {
        StageHandler {
            azure,
            settings,
            runs: Arc::new(NoHistory),
        }
    }

    /// Lets the stages ask the run history about other runs (the rollout leaves the pools of live
    /// runs alone).
    pub fn with_runs(mut self, runs: Arc<dyn Runs>) -> StageHandler {
        self.runs = runs;
        self
    }
}

#[async_trait]
impl Handler for StageHandler {
    async fn handle(&self, message: Envelope, now: OffsetDateTime, tried: Tried) -> Result<Step, AzureError> {
        let ctx = StepContext {
            azure: self.azure.as_ref(),
            now,
            settings: &self.settings,
            runs: self.runs.as_ref(),
            tried,
        };
        let urgency = urgency(&message);
        // Throttling comes back to the runtime, which holds the message for the Retry-After.
        let step = crate::azure::hand_back_retry_after(stages::step(message, &ctx));
        crate::azure::pacing::with_urgency(urgency, step).await
    }
}

/// How urgent a message's requests are when the request budget is short: the nearer its run is to
/// done, the more (verify 1, snapshot 0); clean-up, which no run waits on, least.
fn urgency(message: &Envelope) -> f64 {
    if matches!(message.branch, Branch::CleanUp { .. }) {
        return 0.0;
    }
    let position = Stage::ALL.iter().position(|s| *s == message.stage).unwrap_or(0);
    position as f64 / (Stage::ALL.len() - 1) as f64
}
