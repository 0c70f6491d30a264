//! `sigrun submit PIPELINE`: plans the pipeline exactly as `run` does (every preflight rule,
//! creating nothing), then publishes the run's `RunStarted` event and its first message(s) to
//! RabbitMQ, each with a publisher confirm, and prints the run id on stdout. The workers do the
//! rest. Bad input exits 2 with nothing published; an unreachable broker or an unconfirmed publish
//! exits 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::plan_view;
use super::session::Session;
use super::trigger;
use super::worker::bus_settings;
use crate::bus::Bus;
use crate::bus::amqp::AmqpBus;
use crate::model::envelope::Stage;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The pipeline spec (TOML).
    pub pipeline: PathBuf,
    /// Publish (or roll out) this version instead of the one the scheme gives.
    #[arg(long)]
    pub version: Option<String>,
    /// Start at this stage (snapshot, image-create, gallery-publish, replicate, pool-create).
    #[arg(long, value_parser = trigger::parse_stage)]
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
    let prepared = plan_view::prepare(
        &args.pipeline,
        args.version.as_deref(),
        args.image_version_id.as_deref(),
        None,
        &session,
    )
    .await?;
    for warning in &prepared.plan.warnings {
        eprintln!("warning: {warning}");
    }
    let entry = trigger::entry_stage(args.from, &prepared)?;
    let firsts = trigger::first_messages(&prepared, entry);
    let run_id = firsts[0].run_id;

    let url = session.amqp.redacted_url();
    let bus = AmqpBus::connect(session.amqp.clone(), session.runtime.tiers.clone())
        .await
        .map_err(|e| anyhow::anyhow!("RabbitMQ at {url}: {e}"))?;
    let published = async {
        bus.publish_event(&trigger::run_started(&prepared, entry, run_id))
            .await?;
        for message in &firsts {
            bus.publish(message.stage, &message.encode()).await?;
        }
        Ok::<(), crate::bus::BusError>(())
    }
    .await;
    bus.close().await;
    published.map_err(|e| anyhow::anyhow!("publishing run {run_id} to {url}: {e}"))?;
    eprintln!(
        "submitted run {run_id}: {} version {} from {entry} ({} message(s))",
        prepared.spec.name,
        prepared.plan.version,
        firsts.len()
    );
    println!("{run_id}");
    Ok(ExitCode::SUCCESS)
}
