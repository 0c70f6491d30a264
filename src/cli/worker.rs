//! `sigrun worker --stage S [--stage T …] | --all-stages`: a stage worker on RabbitMQ. Connects the
//! AMQP bus (declaring the whole topology, idempotently), builds the Azure client, starts the
//! ledger (claims, commits, started and cancelled runs, from the events stream), and runs the
//! runtime with the stages' handler on the given stage queues — each step fenced by the ledger,
//! the steps of cancelled runs skipped — and the trigger admitter, until SIGINT or SIGTERM; then it stops consuming, lets in-flight deliveries
//! (and a trigger being admitted) finish within `runtime.shutdown_grace_ms` (what is left goes
//! back to its queue unacked) and closes the bus. Workers need `azure.mode = "azure"`: in
//! `emulator` mode each process would start a private emulator of its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{ArgGroup, Args};
use tokio::signal::unix::{SignalKind, signal};

use super::endpoints;
use super::input_error;
use super::session::Session;
use crate::admission::Admitter;
use crate::bus::amqp::AmqpBus;
use crate::bus::{Bus, Triggers};
use crate::config::{Mode, Settings};
use crate::ledger::Ledger;
use crate::model::envelope::Stage;
use crate::runtime::{Handler, Runtime, StageHandler};
use crate::telemetry::{Readiness, Telemetry};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("stages").required(true).args(["stage", "all_stages"])))]
pub struct WorkerArgs {
    /// Consume this stage's queue (repeat for several).
    #[arg(long, value_parser = parse_any_stage)]
    pub stage: Vec<Stage>,
    /// Consume all six stage queues.
    #[arg(long)]
    pub all_stages: bool,
    /// Settings file overlaid on the defaults (`[azure]`, `[amqp]`, `[runtime]`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address (port 0: any free port); overrides
    /// `[telemetry] listen`. Ready = connected to the broker and an Azure token obtainable.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

fn parse_any_stage(text: &str) -> Result<Stage, String> {
    Stage::parse(text).ok_or_else(|| {
        format!("unknown stage `{text}` (snapshot, image-create, gallery-publish, replicate, pool-create, verify)")
    })
}

/// Loads the settings and refuses `emulator` mode (for `worker` and `submit`).
pub fn bus_settings(config: Option<&std::path::Path>, command: &str) -> anyhow::Result<Settings> {
    let settings = Settings::load(config).map_err(input_error)?;
    if settings.azure.mode == Mode::Emulator {
        return Err(input_error(anyhow::anyhow!(
            "`sigrun {command}` needs azure.mode = \"azure\" (an [azure.client] pointing at Azure or at a \
             shared `sigrun emulator`): in emulator mode every process would start a private emulator"
        )));
    }
    Ok(settings)
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let stages: Vec<Stage> = if args.all_stages {
        Stage::ALL.to_vec()
    } else {
        let mut stages = args.stage.clone();
        stages.sort();
        stages.dedup();
        stages
    };
    let settings = bus_settings(args.config.as_deref(), "worker")?;
    // Installed before anything else, so a signal during start-up still shuts down cleanly.
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let pipelines_dir = settings.pipelines.dir.clone();
    let session = Session::from_settings(settings).await?;
    let url = session.amqp.redacted_url();
    let prefix = session.amqp.prefix.clone();
    let bus = AmqpBus::connect(session.amqp.clone(), session.runtime.tiers.clone())
        .await
        .map_err(|e| anyhow::anyhow!("RabbitMQ at {url}: {e}"))?;
    let bus = Arc::new(bus);
    // The run index reads the whole retained history before anything is taken, so a run cancelled
    // earlier is known to be cancelled from the first delivery on.
    // Created before the index, which feeds it the run history for the run-level metrics.
    let telemetry = Arc::new(Telemetry::new().with_pipelines(crate::admission::pipelines::names(&pipelines_dir)));
    session.azure.set_metrics(telemetry.azure());
    let azure = session.azure.clone();
    let index = Arc::new(Ledger::start(
        Arc::clone(&bus) as Arc<dyn Bus>,
        session.runtime.ledger(),
        Some(Arc::clone(&telemetry) as Arc<dyn crate::runtime::Observer>),
    ));
    if let Err(error) = index.catch_up(session.amqp.publish_timeout).await {
        bus.close().await;
        return Err(anyhow::anyhow!("reading the events stream on {url}: {error}"));
    }
    let handler: Arc<dyn Handler> = Arc::new(
        StageHandler::new(azure.clone(), session.stages.clone())
            .with_runs(Arc::clone(&index) as Arc<dyn crate::stages::Runs>),
    );
    let runtime = match Runtime::new(
        Arc::clone(&bus) as Arc<dyn Bus>,
        handler,
        stages.clone(),
        session.runtime.clone(),
    ) {
        Ok(runtime) => runtime.with_ledger(Arc::clone(&index)),
        Err(e) => {
            bus.close().await;
            return Err(input_error(anyhow::anyhow!("runtime: {e}")));
        }
    };
    let admitter = Admitter::new(
        Arc::clone(&bus) as Arc<dyn Triggers>,
        Arc::clone(&index),
        azure.clone(),
        pipelines_dir.clone(),
        session.runtime.retry.clone(),
    );
    let runtime = runtime.with_observer(telemetry.clone());
    let readiness = Readiness::new()
        .with_bus(Arc::clone(&bus))
        .with_azure(session.azure.clone());
    let server = match endpoints::start("worker", args.metrics_listen, &session.telemetry, &telemetry, readiness).await
    {
        Ok(server) => server,
        Err(error) => {
            bus.close().await;
            return Err(error);
        }
    };
    let names: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
    eprintln!(
        "sigrun worker: consuming {} and triggers on {url} (prefix {prefix}, pipelines in {}; {} run(s) known)",
        names.join(", "),
        pipelines_dir.display(),
        index.started_count()
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admitting = tokio::spawn(async move { admitter.run(stopped).await });
    let report = runtime
        .run(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            let _ = stop.send(true);
        })
        .await;
    // A trigger being admitted gets the same grace; past it, it goes back to its queue unacked.
    let admitting_abort = admitting.abort_handle();
    let triggers = match tokio::time::timeout(session.runtime.shutdown_grace, admitting).await {
        Ok(Ok(handled)) => handled,
        Ok(Err(_)) | Err(_) => {
            admitting_abort.abort();
            0
        }
    };
    drop(index);
    endpoints::stop(server).await;
    bus.close().await;
    eprintln!(
        "sigrun worker: stopped ({} deliveries handled, {} returned unfinished, {triggers} trigger(s) handled)",
        report.handled, report.abandoned
    );
    Ok(ExitCode::SUCCESS)
}
