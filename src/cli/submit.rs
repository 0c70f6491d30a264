//! `sigrun submit PIPELINE`: plans the pipeline exactly as `run` does (every preflight rule,
//! creating nothing), then publishes a trigger — the resolved version, `--from`, `--image-version-id`
//! and the spec's TOML text — to the workers on RabbitMQ with a publisher confirm, and prints the
//! run id on stdout. A worker's admitter starts the run (or, for a run that has started already,
//! records the duplicate). Bad input exits 2 with nothing published; an unreachable broker or an
//! unconfirmed publish exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use uuid::Uuid;

use super::input_error;
use super::plan_view;
use super::session::Session;
use super::worker::bus_settings;
use crate::admission::RunRequest;
use crate::bus::amqp::AmqpBus;
use crate::model::envelope::Stage;
use crate::model::trigger::{self, CONTENT_TYPE_JSON, TRIGGER_VERSION, Trigger};

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The pipeline spec (TOML).
    pub pipeline: PathBuf,
    /// Publish (or roll out) this version instead of the one the scheme gives.
    #[arg(long)]
    pub version: Option<String>,
    /// Start at this stage (snapshot, image-create, gallery-publish, replicate, pool-create).
    #[arg(long, value_parser = plan_view::parse_stage)]
    pub from: Option<Stage>,
    /// Roll out this existing gallery image version (ARM id): starts at pool-create.
    #[arg(long)]
    pub image_version_id: Option<String>,
    /// Settings file overlaid on the defaults (`[azure]`, `[amqp]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub async fn run(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let settings = bus_settings(args.config.as_deref(), "submit")?;
    let session = Session::from_settings(settings).await?;
    let request = RunRequest {
        version: args.version.clone(),
        image_version_id: args.image_version_id.clone(),
        image_id: None,
    };
    let prepared = plan_view::prepare(&args.pipeline, &request, &session).await?;
    for warning in &prepared.plan.warnings {
        eprintln!("warning: {warning}");
    }
    let entry = plan_view::entry_stage(args.from, &prepared)?;
    let run_id = prepared.run_id();

    // The spec travels as written, so the workers plan what was planned here.
    let text = crate::input_file::read_bounded(&args.pipeline, crate::input_file::MAX_INPUT_FILE_BYTES)
        .map_err(|e| input_error(anyhow::anyhow!("{}: {e}", args.pipeline.display())))?;
    let trigger = Trigger {
        v: TRIGGER_VERSION,
        pipeline: prepared.spec.name.clone(),
        version: Some(prepared.plan.version.clone()),
        from: args.from,
        image_version_id: args.image_version_id.clone(),
        spec: Some(text),
    };
    let body = trigger.encode();
    // Checked as the workers will check it: a spec too large for a trigger is refused here.
    trigger::parse(&body, Some(CONTENT_TYPE_JSON))
        .map_err(|e| input_error(anyhow::anyhow!("{}: {e}", args.pipeline.display())))?;
    let message_id = Uuid::new_v4().to_string();

    let url = session.amqp.redacted_url();
    let bus = AmqpBus::connect_to_publish(session.amqp.clone(), session.runtime.tiers.clone())
        .await
        .map_err(|e| anyhow::anyhow!("RabbitMQ at {url}: {e}"))?;
    let published = bus.publish_trigger(&body, CONTENT_TYPE_JSON, Some(&message_id)).await;
    bus.close().await;
    published.map_err(|e| anyhow::anyhow!("publishing the trigger of run {run_id} to {url}: {e}"))?;
    eprintln!(
        "submitted run {run_id}: {} version {} from {entry} (trigger {message_id}); a worker starts it",
        prepared.spec.name, prepared.plan.version,
    );
    println!("{run_id}");
    Ok(ExitCode::SUCCESS)
}
