//! The quota watch: every `[telemetry] quota_watch`, each pipeline of the workers' `[pipelines]
//! dir` is held to its Batch accounts' quotas as they stand now (`planner::survey_quotas`: what
//! the accounts' pools hold, and what its pools would add, net of its retired pools),
//! and the reading is exported as `sigrun_batch_quota_headroom{account, quota}` (limit − in use)
//! and `sigrun_pipeline_quota_need{pipeline, account, quota}`. So a nightly that would not fit
//! shows (alert `SigrunNightlyWouldNotFit`) before its trigger comes, not when it is refused.
//! A pipeline whose accounts cannot be read keeps its last reading; the failure is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use super::Telemetry;
use crate::azure::AzureApi;
use crate::model::spec::PipelineSpec;

/// Reads every pipeline's quotas now, then every `every`, until `stop` says so.
pub async fn run(
    telemetry: Arc<Telemetry>,
    azure: Arc<dyn AzureApi>,
    dir: PathBuf,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // A look may take a while (every pipeline's accounts): a stop does not wait for it.
        tokio::select! {
            _ = look(&telemetry, azure.as_ref(), &dir) => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|stopping| *stopping) => return,
        }
    }
}

/// One reading of every pipeline in `dir`.
pub async fn look(telemetry: &Telemetry, azure: &dyn AzureApi, dir: &std::path::Path) {
    for name in crate::admission::pipelines::names(dir) {
        let Ok(found) = crate::admission::pipelines::find(dir, &name) else {
            continue;
        };
        read(telemetry, azure, &found.spec).await;
    }
}

/// One pipeline's reading, in a span of its own: its requests belong to no run.
async fn read(telemetry: &Telemetry, azure: &dyn AzureApi, spec: &PipelineSpec) {
    let span = tracing::info_span!("quota_watch", pipeline = %spec.name);
    let surveyed = crate::planner::survey_quotas(spec, azure).instrument(span).await;
    match surveyed {
        Ok(uses) => telemetry.quota_reading(&spec.name, &uses),
        Err(error) => tracing::warn!(pipeline = %spec.name, %error, "quota watch: the accounts could not be read"),
    }
}
