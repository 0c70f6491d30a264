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
use std::time::Duration;

use clap::{ArgGroup, Args};
use tokio::signal::unix::{SignalKind, signal};

use super::endpoints;
use super::input_error;
use super::session::Session;
use crate::admission::Admitter;
use crate::bus::amqp::{AmqpBus, AmqpSettings};
use crate::bus::{Bus, Triggers};
use crate::config::{Mode, Settings};
use crate::ledger::Ledger;
use crate::model::envelope::Stage;
use crate::runtime::{Handler, Runtime, RuntimeReport, SettingsError, StageHandler};
use crate::telemetry::{Components, MetricsServer, Readiness, Telemetry};

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

/// The bus settings of a worker: every wait the runtime holds for its next look keeps its delivery
/// (`runtime.held_waits`), so each stage consumer gets that many slots beside `amqp.prefetch` and
/// held waits never keep due deliveries out.
fn stage_consumers(session: &Session) -> AmqpSettings {
    let mut amqp = session.amqp.clone();
    let held = u16::try_from(session.runtime.held_waits).unwrap_or(u16::MAX);
    amqp.prefetch = amqp.prefetch.saturating_add(held);
    amqp
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let stages = chosen_stages(&args);
    let settings = bus_settings(args.config.as_deref(), "worker")?;
    // Installed before anything else, so a signal during start-up still shuts down cleanly.
    let mut stop = Stop::install()?;
    let pipelines_dir = settings.pipelines.dir.clone();
    let session = Session::from_settings(settings).await?;
    let url = session.amqp.redacted_url();
    let telemetry = Arc::new(Telemetry::new().with_pipelines(crate::admission::pipelines::names(&pipelines_dir)));
    session.azure.set_metrics(telemetry.azure());
    // The broker may not be there yet (a restart, a node coming back): the bus connects in the
    // background with backoff while /readyz says 503, and the worker never exits for it.
    let bus = Arc::new(AmqpBus::start(stage_consumers(&session), session.runtime.tiers.clone()));
    let components = Components::default();
    let server = serve_endpoints(&args, &session, &telemetry, &bus, &components).await?;
    // The ledger reads the whole retained history before anything is taken, so a run cancelled
    // earlier is known to be cancelled from the first delivery on. Created after the telemetry,
    // which it feeds the run history for the run-level metrics.
    let ledger = start_ledger(&bus, &session, &telemetry);
    if !catch_up_until_stopped(&ledger, &url, &mut stop).await {
        close(ledger, server, &bus).await;
        eprintln!("sigrun worker: stopped before it started consuming");
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = match stage_runtime(&bus, &session, &ledger, &telemetry, stages.clone()) {
        Ok(runtime) => runtime,
        Err(e) => {
            close(ledger, server, &bus).await;
            return Err(input_error(anyhow::anyhow!("runtime: {e}")));
        }
    };
    let admitter = Admitter::new(
        Arc::clone(&bus) as Arc<dyn Triggers>,
        Arc::clone(&ledger),
        session.azure.clone(),
        pipelines_dir.clone(),
        session.runtime.retry.clone(),
    );
    let names: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
    eprintln!(
        "sigrun worker: consuming {} and triggers on {url} (prefix {}, pipelines in {}; {} run(s) known)",
        names.join(", "),
        session.amqp.prefix,
        pipelines_dir.display(),
        ledger.started_count()
    );
    let (quota_stop, quota_watch) = watch_quotas(&session, &telemetry, &pipelines_dir);
    let (report, triggers) = consume(&runtime, admitter, components, stop, session.runtime.shutdown_grace).await;
    let _ = quota_stop.send(true);
    if let Some(watch) = quota_watch {
        let _ = watch.await;
    }
    close(ledger, server, &bus).await;
    eprintln!(
        "sigrun worker: stopped ({} messages handled, {} returned unfinished, {triggers} trigger(s) handled)",
        report.handled, report.abandoned
    );
    Ok(ExitCode::SUCCESS)
}

/// The quota watch (`[telemetry] quota_watch`; none at `0s`), and how to stop it.
fn watch_quotas(
    session: &Session,
    telemetry: &Arc<Telemetry>,
    pipelines_dir: &std::path::Path,
) -> (tokio::sync::watch::Sender<bool>, Option<tokio::task::JoinHandle<()>>) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let every = session.telemetry.quota_watch;
    let watch = (!every.is_zero()).then(|| {
        tokio::spawn(crate::telemetry::quota_watch::run(
            Arc::clone(telemetry),
            session.azure.clone() as Arc<dyn crate::azure::AzureApi>,
            pipelines_dir.to_path_buf(),
            every,
            stopped,
        ))
    });
    (stop, watch)
}

/// The stages asked for, in order and each once.
fn chosen_stages(args: &WorkerArgs) -> Vec<Stage> {
    if args.all_stages {
        return Stage::ALL.to_vec();
    }
    let mut stages = args.stage.clone();
    stages.sort();
    stages.dedup();
    stages
}

/// /metrics, /healthz and /readyz, if asked for (ready: the components running, the broker
/// connected, an Azure token obtainable). When they cannot start, the bus is closed first.
async fn serve_endpoints(
    args: &WorkerArgs,
    session: &Session,
    telemetry: &Arc<Telemetry>,
    bus: &Arc<AmqpBus>,
    components: &Components,
) -> anyhow::Result<Option<MetricsServer>> {
    let readiness = Readiness::new()
        .with_components(components.clone())
        .with_bus(Arc::clone(bus))
        .with_azure(session.azure.clone());
    match endpoints::start("worker", args.metrics_listen, &session.telemetry, telemetry, readiness).await {
        Ok(server) => Ok(server),
        Err(error) => {
            bus.close().await;
            Err(error)
        }
    }
}

/// The ledger over the events stream (claims, commits, started and cancelled runs), telling the
/// telemetry the run history.
fn start_ledger(bus: &Arc<AmqpBus>, session: &Session, telemetry: &Arc<Telemetry>) -> Arc<Ledger> {
    Arc::new(Ledger::start(
        Arc::clone(bus) as Arc<dyn Bus>,
        session.runtime.ledger(),
        Some(Arc::clone(telemetry) as Arc<dyn crate::runtime::Observer>),
    ))
}

/// The runtime over `stages`' queues with the stages' handler, each step fenced by `ledger`.
fn stage_runtime(
    bus: &Arc<AmqpBus>,
    session: &Session,
    ledger: &Arc<Ledger>,
    telemetry: &Arc<Telemetry>,
    stages: Vec<Stage>,
) -> Result<Runtime, SettingsError> {
    let handler: Arc<dyn Handler> = Arc::new(
        StageHandler::new(session.azure.clone(), session.stages.clone())
            .with_runs(Arc::clone(ledger) as Arc<dyn crate::stages::Runs>),
    );
    let runtime = Runtime::new(
        Arc::clone(bus) as Arc<dyn Bus>,
        handler,
        stages,
        session.runtime.clone(),
    )?;
    Ok(runtime.with_ledger(Arc::clone(ledger)).with_observer(telemetry.clone()))
}

/// Consumes the stage queues and admits triggers until `stop` fires, then gives both
/// `shutdown_grace` to finish: the runtime's report and the number of triggers handled.
async fn consume(
    runtime: &Runtime,
    admitter: Admitter,
    components: Components,
    mut stop: Stop,
    shutdown_grace: Duration,
) -> (RuntimeReport, u64) {
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    // Admission ending under a running worker would stop it for everyone, unseen: it is
    // supervised, and /readyz and /healthz say so.
    let admitting = tokio::spawn(async move {
        let run = admitter.run(stopped.clone());
        components.supervise("admitter", stopped, run).await.unwrap_or(0)
    });
    let report = runtime
        .run(async move {
            stop.wait().await;
            let _ = stopping.send(true);
        })
        .await;
    // A trigger being admitted gets the same grace; past it, it goes back to its queue unacked.
    let admitting_abort = admitting.abort_handle();
    let triggers = match tokio::time::timeout(shutdown_grace, admitting).await {
        Ok(Ok(handled)) => handled,
        Ok(Err(_)) | Err(_) => {
            admitting_abort.abort();
            0
        }
    };
    (report, triggers)
}

/// SIGTERM or SIGINT, whichever comes first.
struct Stop {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    fn install() -> std::io::Result<Stop> {
        Ok(Stop {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// Reads the history up to now, trying again (with backoff, saying why) for as long as the broker
/// is not there; false when asked to stop first.
async fn catch_up_until_stopped(ledger: &Ledger, url: &str, stop: &mut Stop) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = ledger.catch_up(Duration::from_secs(30));
        tokio::select! {
            caught = attempt => match caught {
                Ok(()) => return true,
                Err(error) => eprintln!(
                    "sigrun worker: cannot read the events stream on {url} yet ({error}); trying again in {} ms",
                    delay.as_millis()
                ),
            },
            () = stop.wait() => return false,
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.wait() => return false,
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Closes what the worker opened: its share of the ledger, the endpoints, then the bus.
async fn close(ledger: Arc<Ledger>, server: Option<MetricsServer>, bus: &AmqpBus) {
    drop(ledger);
    endpoints::stop(server).await;
    bus.close().await;
}
