//! The production [`Handler`]: runs the stage named in each message against Azure.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::Handler;
use crate::azure::{AzureApi, AzureError};
use crate::model::envelope::Envelope;
use crate::stages::{self, NoHistory, Runs, StageSettings, Step, StepContext};

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
    async fn handle(&self, message: Envelope, now: OffsetDateTime) -> Result<Step, AzureError> {
        let ctx = StepContext {
            azure: self.azure.as_ref(),
            now,
            settings: &self.settings,
            runs: self.runs.as_ref(),
        };
        // Throttling comes back to the runtime, which holds the message for the Retry-After.
        crate::azure::hand_back_retry_after(stages::step(message, &ctx)).await
    }
}
