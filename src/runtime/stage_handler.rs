//! The production [`Handler`]: runs the stage named in each message against Azure.

use std::sync::Arc;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::Handler;
use crate::azure::{AzureApi, AzureError};
use crate::model::envelope::Envelope;
use crate::stages::{self, StageSettings, Step, StepContext};

pub struct StageHandler {
    azure: Arc<dyn AzureApi>,
    settings: StageSettings,
}

impl StageHandler {
    pub fn new(azure: Arc<dyn AzureApi>, settings: StageSettings) -> StageHandler {
        StageHandler { azure, settings }
    }
}

#[async_trait]
impl Handler for StageHandler {
    async fn handle(&self, message: Envelope) -> Result<Step, AzureError> {
        let ctx = StepContext {
            azure: self.azure.as_ref(),
            now: OffsetDateTime::now_utc(),
            settings: &self.settings,
        };
        stages::step(message, &ctx).await
    }
}
