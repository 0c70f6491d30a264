//! `sigrun cancel RUN`: asks the workers to stop a run. Reads the events stream to find the run
//! (an unknown run id is bad input, exit 2; a run that has already ended is left alone), then
//! publishes a `CancelRequested` event with a publisher confirm. Workers learn of it through their
//! ledger; each branch of the run stops at its next step (a step already under way finishes)
//! with a `Cancelled` event at the stage it stopped at. The run's result is then `cancelled`,
//! listing what it had created. Needs only the `[amqp]` settings.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use uuid::Uuid;

use super::{history, input_error};
use crate::admission::trunk_event;
use crate::bus::Bus;
use crate::bus::amqp::{AmqpBus, StreamOffset};
use crate::config::Settings;
use crate::events::{Event, EventKind, RunResult, run_result};

#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The run id (`sigrun submit` prints it).
    pub run: String,
    /// Settings file overlaid on the defaults (`[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let run_id = Uuid::parse_str(args.run.trim())
        .map_err(|e| input_error(anyhow::anyhow!("`{}` is not a run id: {e}", args.run)))?;
    // A prefix nothing has used is a typo, not a new environment: nothing is declared for it.
    let (bus, settings) = history::connect(args.config.as_deref(), "cancel").await?;
    let outcome = cancel(&bus, run_id, &settings).await;
    bus.close().await;
    outcome
}

async fn cancel(bus: &AmqpBus, run_id: Uuid, settings: &Settings) -> anyhow::Result<ExitCode> {
    let mut reader = bus.read_events(StreamOffset::First).await?;
    let read = reader.read_to_end(bus).await;
    reader.close().await;
    // Events that do not parse (another build's kinds) are not this run's business here.
    let history: Vec<Event> = read?
        .into_iter()
        .filter_map(Result::ok)
        .map(|streamed| streamed.event)
        .filter(|event| event.run_id == run_id)
        .collect();
    let Some(first) = history
        .iter()
        .find(|e| matches!(e.kind, EventKind::RunStarted { .. }))
        .or(history.first())
    else {
        return Err(input_error(anyhow::anyhow!(
            "no run {run_id} in the events stream of prefix `{}` (not started yet, or older than its \
             retention of {})",
            settings.amqp.prefix,
            settings.amqp.event_max_age
        )));
    };
    match run_result(&history) {
        RunResult::Running => {}
        ended => {
            eprintln!(
                "sigrun: run {run_id} has already ended ({}); nothing to cancel",
                describe(&ended)
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    let request = trunk_event(
        run_id,
        &first.pipeline,
        &first.version,
        first.stage,
        EventKind::CancelRequested,
    );
    bus.publish_event(&request)
        .await
        .map_err(|e| anyhow::anyhow!("publishing the cancel request of run {run_id}: {e}"))?;
    eprintln!(
        "sigrun: cancel requested for run {run_id} ({} version {}); its branches stop at their next step",
        first.pipeline, first.version
    );
    Ok(ExitCode::SUCCESS)
}

fn describe(result: &RunResult) -> String {
    match result {
        RunResult::Running => "running".into(),
        RunResult::Succeeded => "succeeded".into(),
        RunResult::SucceededWithWarnings { warnings } => format!("succeeded with {} warning(s)", warnings.len()),
        RunResult::PartlySucceeded { failed } => format!("partly succeeded, {} failed", failed.len()),
        RunResult::Failed { reason } => format!("failed: {reason}"),
        RunResult::Cancelled { .. } => "cancelled".into(),
    }
}
