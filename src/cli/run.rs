//! `sigrun run PIPELINE`: plans the pipeline (every preflight rule, creating nothing until it
//! passes), then runs all six stages in this process on the in-process bus until every branch of
//! the run has ended. Shows progress per stage, region and pool (bars on a terminal, lines
//! otherwise) and ends with a summary: resources created, each stage's time (emulated and wall),
//! Azure calls by kind, retries and throttles. Exit 0 on success, 1 when the run failed or partly
//! failed (naming what), 2 for bad input.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use uuid::Uuid;

use super::endpoints;
use super::input_error;
use super::plan_view::{self, Prepared};
use super::session::Session;
use crate::admission::local::Local;
use crate::admission::{self, RunRequest};
use crate::azure::AzureError;
use crate::bus::memory::MemoryBus;
use crate::events::{Event, EventKind, RunResult};
use crate::ledger::Ledger;
use crate::model::envelope::{Envelope, Stage};
use crate::model::trace::TraceParent;
use crate::runtime::{Clock, Handler, RunOutcome, StageHandler};
use crate::stages::{Step, Tried};
use crate::telemetry::{Readiness, Telemetry};

#[derive(Debug, Args)]
pub struct RunArgs {
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
    /// Publish from this existing managed image (ARM id): starts at gallery-publish.
    #[arg(long)]
    pub image_id: Option<String>,
    /// Settings file overlaid on the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Give up after this long (real time), e.g. `30m`.
    #[arg(long, default_value = "6h")]
    pub timeout: String,
    /// Serve /metrics, /healthz and /readyz on this address while the run lasts (port 0: any free
    /// port); overrides `[telemetry] listen`. Ready = an Azure token obtainable.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut stop = super::signals::StopSignals::install()?;
    let timeout = crate::model::spec::duration::parse(&args.timeout)
        .map_err(|e| input_error(anyhow::anyhow!("--timeout: {e}")))?;
    let session = Session::open(args.config.as_deref()).await?;
    let telemetry = Arc::new(Telemetry::new());
    session.azure.set_metrics(telemetry.azure());
    let readiness = Readiness::new().with_azure(session.azure.clone());
    let server = endpoints::start("run", args.metrics_listen, &session.telemetry, &telemetry, readiness).await?;
    let (prepared, entry) = plan(&args, &session, &telemetry).await?;
    let run_id = prepared.run_id();
    let bus = Arc::new(MemoryBus::new(session.runtime.tiers.clone()));
    announce(run_id, &prepared, entry, &session);
    let timings = Arc::new(Timings::default());
    let ran = tokio::select! {
        ran = run_in_process(&bus, &prepared, entry, &session, telemetry, timeout, &timings) => Some(ran?),
        () = stop.wait() => None,
    };
    let Some((outcome, wall)) = ran else {
        // Stopped by SIGINT or SIGTERM: the built-in emulator still goes down properly, so its
        // temporary TLS directory (private key included) does not outlive the process.
        eprintln!("sigrun: run {run_id} interrupted");
        endpoints::stop(server).await;
        if let Some(emulator) = session.emulator {
            emulator.shutdown().await;
        }
        return Ok(ExitCode::from(130));
    };
    let calls = session.emulator.as_ref().map(azure_calls);
    print!(
        "{}",
        summary(
            &prepared,
            &outcome.events,
            &timings,
            wall,
            session.time_scale,
            calls.as_ref()
        )
    );
    endpoints::stop(server).await;
    if let Some(emulator) = session.emulator {
        emulator.shutdown().await;
    }
    Ok(exit_code(run_id, &args.timeout, outcome))
}

/// Plans the pipeline (every preflight rule; bad input is exit 2), shows the plan's warnings and
/// picks the stage the run starts at.
async fn plan(args: &RunArgs, session: &Session, telemetry: &Telemetry) -> anyhow::Result<(Prepared, Stage)> {
    let request = RunRequest {
        version: args.version.clone(),
        image_version_id: args.image_version_id.clone(),
        image_id: args.image_id.clone(),
    };
    let prepared = plan_view::prepare(&args.pipeline, &request, session).await?;
    telemetry.declare_pipeline(&prepared.spec.name);
    for warning in &prepared.plan.warnings {
        eprintln!("warning: {warning}");
    }
    let entry = plan_view::entry_stage(args.from, &prepared)?;
    Ok((prepared, entry))
}

/// The line saying which run starts, where, and against what.
fn announce(run_id: Uuid, prepared: &Prepared, entry: Stage, session: &Session) {
    eprintln!(
        "run {run_id}: {} version {} from {entry} ({})",
        prepared.spec.name,
        prepared.plan.version,
        if session.emulator.is_some() {
            format!("built-in emulator, {}x time", session.time_scale)
        } else {
            "Azure".to_string()
        }
    );
}

/// Runs the plan on `bus` in this process until it ends or `timeout` passes, with its progress
/// shown meanwhile; the outcome and the wall time the run took.
async fn run_in_process(
    bus: &Arc<MemoryBus>,
    prepared: &Prepared,
    entry: Stage,
    session: &Session,
    telemetry: Arc<Telemetry>,
    timeout: Duration,
    timings: &Arc<Timings>,
) -> anyhow::Result<(RunOutcome, Duration)> {
    let ledger = admission::local::ledger(
        bus,
        session.runtime.ledger(),
        Some(Arc::clone(&telemetry) as Arc<dyn crate::runtime::Observer>),
    );
    let handler = timed_handler(session, &ledger, timings);
    let progress = Progress::start(bus, prepared);
    let began = Instant::now();
    let local = Local {
        settings: session.runtime.clone(),
        clock: Clock::System,
        timeout,
        observer: Some(telemetry),
    };
    let outcome = admission::local::run(
        bus.clone(),
        ledger,
        handler,
        prepared,
        entry,
        &TraceParent::new(),
        local,
    )
    .await?;
    let wall = began.elapsed();
    progress.finish().await;
    Ok((outcome, wall))
}

/// The stages' handler, fenced by `ledger`, timing each stage into `timings` for the summary.
fn timed_handler(session: &Session, ledger: &Arc<Ledger>, timings: &Arc<Timings>) -> Arc<dyn Handler> {
    Arc::new(Timed {
        inner: StageHandler::new(session.azure.clone(), session.stages.clone())
            .with_runs(Arc::clone(ledger) as Arc<dyn crate::stages::Runs>),
        timings: timings.clone(),
    })
}

/// Exit 0 when the run succeeded (with or without warnings), 1 otherwise, saying why on stderr.
fn exit_code(run_id: Uuid, timeout: &str, outcome: RunOutcome) -> ExitCode {
    if outcome.timed_out {
        eprintln!("sigrun: run {run_id} did not end within {timeout}");
        return ExitCode::FAILURE;
    }
    match outcome.result {
        RunResult::Succeeded => ExitCode::SUCCESS,
        RunResult::SucceededWithWarnings { warnings } => {
            for warning in warnings {
                eprintln!("sigrun: warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        RunResult::PartlySucceeded { failed } => {
            for (pool, reason) in failed {
                eprintln!("sigrun: {}/{} failed: {reason}", pool.region, pool.target);
            }
            eprintln!("sigrun: run {run_id} partly succeeded");
            ExitCode::FAILURE
        }
        RunResult::Failed { reason } => {
            eprintln!("sigrun: run {run_id} failed: {reason}");
            ExitCode::FAILURE
        }
        RunResult::Cancelled { .. } => {
            eprintln!("sigrun: run {run_id} was cancelled");
            ExitCode::FAILURE
        }
        RunResult::Running => {
            eprintln!("sigrun: run {run_id} stopped before it ended");
            ExitCode::FAILURE
        }
    }
}

/// Wall time per stage: from its first step starting to its last step ending.
#[derive(Default)]
struct Timings(Mutex<BTreeMap<Stage, (Instant, Instant, u32)>>);

struct Timed {
    inner: StageHandler,
    timings: Arc<Timings>,
}

#[async_trait]
impl Handler for Timed {
    async fn handle(&self, message: Envelope, now: time::OffsetDateTime, tried: Tried) -> Result<Step, AzureError> {
        let stage = message.stage;
        let began = Instant::now();
        let result = self.inner.handle(message, now, tried).await;
        let ended = Instant::now();
        let mut timings = self.timings.0.lock().expect("timings lock");
        let entry = timings.entry(stage).or_insert((began, ended, 0));
        entry.0 = entry.0.min(began);
        entry.1 = entry.1.max(ended);
        entry.2 += 1;
        result
    }
}

/// The progress display beside a run: subscribed before the run starts, so no event is missed;
/// drained after it ends, so none is lost.
struct Progress {
    stop: tokio::sync::oneshot::Sender<()>,
    shown: tokio::task::JoinHandle<()>,
}

impl Progress {
    fn start(bus: &MemoryBus, prepared: &Prepared) -> Progress {
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shown = tokio::spawn(show_progress(
            bus.subscribe(),
            stopped,
            prepared
                .plan
                .pools
                .iter()
                .map(|p| (p.region.clone(), p.target.clone()))
                .collect(),
        ));
        Progress { stop, shown }
    }

    async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.shown.await;
    }
}

/// Progress from the run's events: a bar per trunk and pool on a terminal, lines otherwise. When
/// `stop` fires (the run has ended), the events still buffered are shown before it returns.
async fn show_progress(
    mut events: tokio::sync::broadcast::Receiver<Event>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
    pools: Vec<(String, String)>,
) {
    use std::io::IsTerminal;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let terminal = std::io::stderr().is_terminal();
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner} {prefix:<28} {wide_msg}").expect("valid template");
    let mut by_branch: BTreeMap<String, ProgressBar> = BTreeMap::new();
    if terminal {
        by_branch.insert(
            "trunk".into(),
            bars.add(
                ProgressBar::new_spinner()
                    .with_style(style.clone())
                    .with_prefix("build and publish"),
            ),
        );
        for (region, target) in &pools {
            let label = format!("{region}/{target}");
            by_branch.insert(
                label.clone(),
                bars.add(ProgressBar::new_spinner().with_style(style.clone()).with_prefix(label)),
            );
        }
        for bar in by_branch.values() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
    }
    let show = |event: Event| {
        let line = describe(&event);
        let label = event.branch.label();
        match (terminal, by_branch.get(&label)) {
            (true, Some(bar)) => {
                bar.set_message(format!("{}: {line}", event.stage));
                if matches!(
                    event.kind,
                    EventKind::PoolVerified { .. } | EventKind::PoolFailed { .. }
                ) {
                    bar.finish();
                }
                if let EventKind::RegionFailed { region, .. } = &event.kind {
                    for (l, b) in &by_branch {
                        if l.starts_with(&format!("{region}/")) {
                            b.finish_with_message("not created: replication failed");
                        }
                    }
                }
            }
            _ => eprintln!("[{:>15}] {:<24} {line}", event.stage.as_str(), label),
        }
    };
    loop {
        tokio::select! {
            received = events.recv() => match received {
                Ok(event) => show(event),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            },
            _ = &mut stop => loop {
                match events.try_recv() {
                    Ok(event) => show(event),
                    Err(TryRecvError::Lagged(_)) => continue,
                    Err(_) => return,
                }
            },
        }
    }
}

/// One line saying what an event means (also used by `status` and `watch`).
pub(super) fn describe(event: &Event) -> String {
    match &event.kind {
        EventKind::RunStarted { regions, pools, .. } => {
            format!("run started: {} region(s), {} pool(s)", regions.len(), pools.len())
        }
        EventKind::Waiting { what } => format!("waiting for {what}"),
        EventKind::Retried { attempt, error } => format!("retry {attempt}: {error}"),
        EventKind::Throttled { retry_after_ms } => {
            format!("throttled (Retry-After {} ms)", retry_after_ms.unwrap_or(0))
        }
        EventKind::ResourceCreated { id } => format!("created {id}"),
        EventKind::RegionCompleted { region } => format!("replica in {region} completed"),
        EventKind::RegionFailed { region, reason } => format!("replication to {region} failed: {reason}"),
        EventKind::PoolCreated { pool_id } => format!("pool {pool_id} created"),
        EventKind::PoolVerified { pool_id } => format!("pool {pool_id} verified"),
        EventKind::PoolFailed { target, reason } => format!("pool {target} failed: {reason}"),
        EventKind::Promoted { version_id } => format!("promoted {version_id} to latest"),
        EventKind::PreviousPoolRetired { pool_id, action } => format!("previous pool {pool_id} {action}"),
        EventKind::RetirementFailed { reason } => format!("retiring previous pools failed: {reason}"),
        EventKind::RolloutFinished => "rollout finished".into(),
        EventKind::CleanUpScheduled { what } => format!("clean-up of the {} scheduled", what.as_str()),
        EventKind::ResourceDeleted { what, id } => format!("deleted {} {id}", what.as_str()),
        EventKind::CleanUpFinished { what, failed: None } => format!("clean-up of the {} finished", what.as_str()),
        EventKind::CleanUpFinished {
            what,
            failed: Some(reason),
        } => format!("clean-up of the {} gave up: {reason}", what.as_str()),
        EventKind::RunFailed { reason } => format!("run failed: {reason}"),
        EventKind::Parked { reason } => format!("message parked: {reason}"),
        EventKind::Replayed { message_id, error } => {
            format!("replayed parked message {message_id} (parked for: {error})")
        }
        EventKind::Cancelled => "stopped: the run was cancelled".into(),
        EventKind::CancelRequested => "cancel requested".into(),
        EventKind::DuplicateTrigger { .. } => "duplicate trigger (the run had started)".into(),
        EventKind::TriggerRejected { reason } => format!("trigger rejected: {reason}"),
        EventKind::DuplicateDropped { message_id } => {
            format!("dropped a stale copy of message {message_id} (another copy took the step)")
        }
    }
}

/// Azure requests the emulator answered, by method and resource kind.
fn azure_calls(emulator: &crate::emulator::Emulator) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for (api, method, path) in emulator.answered() {
        let kind = call_kind(api.as_str(), &path);
        *calls.entry(format!("{method} {kind}")).or_insert(0) += 1;
    }
    calls
}

/// `snapshots`, `galleries/images/versions`, `pools/nodes`, `token`, ... from a request path.
fn call_kind(api: &str, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match api {
        "aad" | "identity" => "token".into(),
        "batch" => segments
            .iter()
            .skip(2)
            .step_by(2)
            .copied()
            .collect::<Vec<_>>()
            .join("/"),
        _ => {
            if let Some(i) = segments.iter().position(|s| s.eq_ignore_ascii_case("locations")) {
                return segments.get(i + 2).map(|s| s.to_ascii_lowercase()).unwrap_or_default();
            }
            match segments.iter().position(|s| s.eq_ignore_ascii_case("providers")) {
                Some(i) if segments.len() > i + 2 => segments[i + 2..]
                    .iter()
                    .step_by(2)
                    .copied()
                    .collect::<Vec<_>>()
                    .join("/"),
                Some(_) => "providers".into(),
                None => "subscriptions".into(),
            }
        }
    }
}

/// What the run created and what it deleted (intermediates, old versions, retired pools).
fn resources(out: &mut String, prepared: &Prepared, events: &[Event]) {
    use std::fmt::Write;
    let _ = writeln!(out, "Resources created:");
    for event in events {
        match &event.kind {
            EventKind::ResourceCreated { id } => {
                let _ = writeln!(out, "  {id}");
            }
            EventKind::PoolCreated { pool_id } => {
                if let Some(pool) = prepared.plan.pools.iter().find(|p| p.pool_id == *pool_id) {
                    let _ = writeln!(out, "  {}/pools/{pool_id}", pool.account_url);
                }
            }
            _ => {}
        }
    }
    let deleted = crate::events::deleted(events);
    if !deleted.is_empty() {
        let _ = writeln!(out, "Resources deleted:");
        for item in deleted {
            let _ = writeln!(out, "  {item}");
        }
    }
}

fn summary(
    prepared: &Prepared,
    events: &[Event],
    timings: &Timings,
    wall: Duration,
    time_scale: f64,
    calls: Option<&BTreeMap<String, u64>>,
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let result = crate::events::run_result(events);
    let _ = writeln!(
        out,
        "\nRun of {} version {}: {}",
        prepared.spec.name,
        prepared.plan.version,
        match &result {
            RunResult::Succeeded => "succeeded".to_string(),
            RunResult::SucceededWithWarnings { warnings } => format!("succeeded with {} warning(s)", warnings.len()),
            RunResult::PartlySucceeded { failed } => format!("partly succeeded ({} failed)", failed.len()),
            RunResult::Failed { .. } => "failed".to_string(),
            RunResult::Cancelled { .. } => "cancelled".to_string(),
            RunResult::Running => "did not end".to_string(),
        }
    );
    resources(&mut out, prepared, events);
    let _ = writeln!(out, "Stages (wall; emulated = wall x {time_scale}):");
    let timings = timings.0.lock().expect("timings lock");
    for (stage, (first, last, steps)) in timings.iter() {
        let span = last.duration_since(*first);
        let _ = writeln!(
            out,
            "  {:<16} {:>8.2} s wall  {:>9}  {steps} step(s)",
            stage.as_str(),
            span.as_secs_f64(),
            crate::model::spec::duration::format(Duration::from_secs_f64(span.as_secs_f64() * time_scale))
        );
    }
    let _ = writeln!(
        out,
        "  {:<16} {:>8.2} s wall  {:>9}",
        "total",
        wall.as_secs_f64(),
        crate::model::spec::duration::format(Duration::from_secs_f64(wall.as_secs_f64() * time_scale))
    );
    let retries = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Retried { .. }))
        .count();
    let throttles = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Throttled { .. }))
        .count();
    let _ = writeln!(out, "Retries: {retries}; throttled: {throttles}");
    if let Some(calls) = calls {
        let total: u64 = calls.values().sum();
        let _ = writeln!(out, "Azure calls ({total}):");
        for (kind, n) in calls {
            let _ = writeln!(out, "  {n:>5}  {kind}");
        }
    }
    if let RunResult::PartlySucceeded { failed } = &result {
        for (pool, reason) in failed {
            let _ = writeln!(out, "Failed: {}/{}: {reason}", pool.region, pool.target);
        }
    }
    if let RunResult::Failed { reason } = &result {
        let _ = writeln!(out, "Failed: {reason}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_kinds() {
        assert_eq!(
            call_kind(
                "arm",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/snapshots/x"
            ),
            "snapshots"
        );
        assert_eq!(
            call_kind(
                "arm",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.0.0"
            ),
            "galleries/images/versions"
        );
        assert_eq!(
            call_kind(
                "arm",
                "/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/DiskOperations/1"
            ),
            "diskoperations"
        );
        assert_eq!(call_kind("batch", "/batch/acct/pools/p/nodes"), "pools/nodes");
        assert_eq!(call_kind("aad", "/t/oauth2/v2.0/token"), "token");
    }
}
