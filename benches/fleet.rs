//! A fleet of pipelines against Azure Resource Manager's enforced request budget.
//!
//! Starts the emulator in this process with ARM's token buckets on (reads 250 / 25 a second,
//! writes and deletes 200 / 10, per subscription and principal; see `emulator::budget`) in a world
//! of its own: `SIGRUN_FLEET_SUBSCRIPTIONS` subscriptions (default 4), each with a build VM, a
//! gallery and two Batch accounts. `SIGRUN_FLEET_PIPELINES` pipelines (default 1000) share them
//! round robin: each builds from its subscription's VM (three disks), publishes its own image
//! definition's nightly version to one region and verifies one pool of two nodes. All run at once
//! in this process the way `sigrun run` runs one (in-process bus, ledger, stage consumers), spread
//! over `SIGRUN_FLEET_WORKERS` runtimes (default 3), each with an Azure client of its own: the
//! workers share each subscription's budget with no coordinator but the headers Azure sends.
//!
//! Printed, all measured in the same run:
//! - every run's result (the bench fails unless all succeed);
//! - **throttled share**: 429 answers / all ARM and Batch requests (goal ≤ 1 %);
//! - **time / bound** (goal ≤ 1.1). The *bound* is what the budget and Azure's own durations allow
//!   together, the larger of:
//!   - the longest run's critical path: its snapshots (the longest disk copy) → managed image →
//!     image definition → version in its region → its pool allocated with both nodes idle, each
//!     the duration the emulator fixed when the operation started (the shared gallery is left
//!     out, which only shortens the bound);
//!   - the budget's time: for each bucket (subscription or Batch account, and kind), every
//!     distinct request the fleet made on it counted once — a look repeated is not needed, a
//!     resource never read cannot be known — less the bucket's burst, over its refill rate.
//!
//!   The time is emulated seconds from the first run's start to the last run's end.
//! - requests per run by kind, the time planning took, and process CPU.
//!
//! `SIGRUN_FLEET_SCALE` (default 10) is the emulator's clock; `SIGRUN_FLEET_PACING=0` runs the same
//! fleet with the clients' pacing off, for the side-by-side. `SIGRUN_FLEET_TRACE=1` prints where
//! the run that ended last spent its time (`=fleet-0100,fleet-0500` adds those runs).
//! `cargo bench --bench fleet`.
//!
//! The process allocates with jemalloc (its default settings: this process has many threads; the
//! `sigrun` binary sets one arena). The emulator's work (in Azure, not ours to pay for) churns
//! JSON values, and glibc's malloc took about a third of the process's CPU at it, in a measure
//! that changed from run to run (80–88 s, at times 45–60). The surges then fell behind the clock,
//! and the time measured the allocator more than sigrun's pacing.
//! `--features fleet-system-allocator` builds the bench on the system allocator, for the
//! side-by-side.

mod common;

#[cfg(not(feature = "fleet-system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Which allocator the process runs on, for the bench's first line.
const ALLOCATOR_NAME: &str = if cfg!(feature = "fleet-system-allocator") {
    "system allocator"
} else {
    "jemalloc"
};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use sigrun::admission::{self, Begun, Prepared, RunRequest};
use sigrun::azure::client::AzureClient;
use sigrun::bus::Bus;
use sigrun::bus::memory::MemoryBus;
use sigrun::emulator::budget::Limits;
use sigrun::emulator::world::{BatchAccount, ResourceGroup, Subscription};
use sigrun::emulator::{Emulator, EmulatorOptions, World};
use sigrun::events::{RunResult, run_result};
use sigrun::ledger::Ledger;
use sigrun::model::envelope::Stage;
use sigrun::model::spec::PipelineSpec;
use sigrun::model::trace::TraceParent;
use sigrun::runtime::{Clock, Handler, Runtime, StageHandler};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::oneshot;
use uuid::Uuid;

const GROUP: &str = "rg-fleet";
const REGION: &str = "westeurope";

struct Fleet {
    pipelines: usize,
    subscriptions: usize,
    workers: usize,
    scale: f64,
    /// Pace to the budget (`SIGRUN_FLEET_PACING=0` turns it off, for the side-by-side).
    pacing: bool,
}

fn main() {
    if !common::measuring("fleet") {
        return;
    }
    let fleet = Fleet {
        pipelines: common::env_or("SIGRUN_FLEET_PIPELINES", 1000),
        subscriptions: common::env_or("SIGRUN_FLEET_SUBSCRIPTIONS", 4),
        workers: common::env_or("SIGRUN_FLEET_WORKERS", 3),
        scale: common::env_or("SIGRUN_FLEET_SCALE", 10.0),
        pacing: common::env_or("SIGRUN_FLEET_PACING", 1u8) != 0,
    };
    let runtime = common::runtime();
    runtime.block_on(measure(&fleet));
}

fn subscription_id(i: usize) -> String {
    format!("f1ee7000-0000-4000-8000-{i:012}")
}

fn account_name(sub: usize, n: usize) -> String {
    format!("fleet{sub}x{n}")
}

/// The default world plus the fleet's subscriptions, each with a build VM (a copy of the default
/// world's, three disks) and two Batch accounts, the pipeline's app Contributor on each.
fn fleet_world(subscriptions: usize, pipelines: usize) -> World {
    let mut world = World::default_world();
    let tenant = world.tenants[0].id.clone();
    let vm = world.vms[0].clone();
    let account = world.batch_accounts[0].clone();
    for i in 0..subscriptions {
        let id = subscription_id(i);
        world.subscriptions.push(Subscription {
            id: id.clone(),
            tenant: tenant.clone(),
            name: format!("fleet-{i}"),
            registered_providers: vec!["Microsoft.Compute".into(), "Microsoft.Batch".into()],
            resource_groups: vec![ResourceGroup {
                name: GROUP.into(),
                location: REGION.into(),
            }],
        });
        let app = world
            .apps
            .iter_mut()
            .find(|a| a.client_id == common::CLIENT_ID)
            .expect("the pipeline's app");
        app.roles.push(sigrun::emulator::world::RoleAssignment {
            role: "Contributor".into(),
            scope: format!("/subscriptions/{id}"),
        });
        let mut build = vm.clone();
        build.subscription = id.clone();
        build.resource_group = GROUP.into();
        build.name = "build".into();
        build.location = REGION.into();
        world.vms.push(build);
        for n in 0..2 {
            world.batch_accounts.push(BatchAccount {
                name: account_name(i, n),
                subscription: id.clone(),
                resource_group: GROUP.into(),
                location: REGION.into(),
                pool_quota: u32::try_from(pipelines).unwrap_or(u32::MAX).saturating_add(10),
                dedicated_core_quota: 1_000_000,
                low_priority_core_quota: 1_000_000,
                ..account.clone()
            });
        }
    }
    world
}

fn pipeline_name(i: usize) -> String {
    format!("fleet-{i:04}")
}

fn spec(i: usize, subscriptions: usize) -> PipelineSpec {
    let sub_index = i % subscriptions;
    let sub = subscription_id(sub_index);
    let account = account_name(sub_index, (i / subscriptions) % 2);
    let name = pipeline_name(i);
    let text = format!(
        r#"name = "{name}"
[source]
vm = "/subscriptions/{sub}/resourceGroups/{GROUP}/providers/Microsoft.Compute/virtualMachines/build"
[image]
resource_group = "{GROUP}"
region = "{REGION}"
[gallery]
id = "/subscriptions/{sub}/resourceGroups/{GROUP}/providers/Microsoft.Compute/galleries/fleet_images"
create_if_missing = true
[definition]
name = "def-{name}"
os_type = "Linux"
os_state = "Generalized"
publisher = "contoso"
offer = "fleet"
sku = "{name}"
hyper_v_generation = "V2"
[version]
scheme = "nightly"
[publish]
regions = [{{ name = "{REGION}", replicas = 1 }}]
[[pools]]
target = "farm"
account = "/subscriptions/{sub}/resourceGroups/{GROUP}/providers/Microsoft.Batch/batchAccounts/{account}"
vm_size = "Standard_D4s_v5"
dedicated_nodes = 2
node_agent_sku_id = "auto"
[verify]
min_idle_share = 1.0
deadline = "3h"
[retention]
intermediates = "delete"
"#
    );
    PipelineSpec::parse(&text, &format!("{name}.toml")).expect("the fleet's spec parses")
}

/// The settings `sigrun run` would use against an emulator at `scale`, with the client pointed at
/// `emulator`.
fn settings(emulator: &Emulator, scale: f64, pacing: bool) -> (sigrun::config::Settings, sigrun::azure::AzureSettings) {
    let mut settings = common::worker_defaults();
    settings.emulator.time_scale = scale;
    let factor = 1.0 / scale;
    settings.stages.azure_time_factor = factor;
    settings.runtime.tiers = settings.delay_tiers();
    settings.runtime.consumers = 64;
    let retry = &mut settings.runtime.retry;
    retry.base_delay = retry.base_delay.mul_f64(factor).max(Duration::from_millis(1));
    retry.max_delay = retry.max_delay.mul_f64(factor).max(Duration::from_millis(2));
    let mut azure = common::azure_settings(emulator);
    azure.retry.min_delay_ms = azure.retry.min_delay_ms.min(50);
    azure.pacing.time_scale = scale;
    azure.pacing.enabled = pacing;
    (settings, azure)
}

async fn measure(fleet: &Fleet) {
    let world = fleet_world(fleet.subscriptions, fleet.pipelines);
    let emulator = Emulator::start(EmulatorOptions {
        world,
        time_scale: fleet.scale,
        budgets: Some(Limits::arm()),
        ..Default::default()
    })
    .await
    .expect("the emulator starts");
    let (settings, azure_settings) = settings(&emulator, fleet.scale, fleet.pacing);
    let clients: Vec<Arc<AzureClient>> = (0..fleet.workers.max(1))
        .map(|_| Arc::new(AzureClient::new(&azure_settings).expect("the Azure client builds")))
        .collect();
    let ticks = common::clock_ticks();
    let cpu_before = common::cpu_time(std::process::id(), ticks);

    let prepared = prepare_all(fleet, &clients[0]).await;
    // Let the buckets fill again after planning: the fleet's window starts with its bursts.
    tokio::time::sleep(Duration::from_secs_f64(25.0 / fleet.scale)).await;

    let bus = Arc::new(MemoryBus::new(settings.runtime.tiers.clone()));
    let ledger = Arc::new(Ledger::start(bus.clone(), settings.runtime.ledger(), None));
    let mut stops = Vec::new();
    let mut running = Vec::new();
    for client in &clients {
        let handler: Arc<dyn Handler> = Arc::new(
            StageHandler::new(client.clone(), settings.stages.clone())
                .with_runs(ledger.clone() as Arc<dyn sigrun::stages::Runs>),
        );
        let runtime = Runtime::new(
            bus.clone() as Arc<dyn Bus>,
            handler,
            Stage::ALL.to_vec(),
            settings.runtime.clone(),
        )
        .expect("runtime settings")
        .with_clock(Clock::System)
        .with_ledger(ledger.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        running.push(tokio::spawn(async move {
            runtime
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }));
    }

    let began = Instant::now();
    let began_at = OffsetDateTime::now_utc();
    let emulated_start = emulator.now();
    for p in &prepared {
        let entry = admission::entry_stage(None, p).expect("entry stage");
        match admission::begin(bus.as_ref(), &ledger, p, entry, &TraceParent::new())
            .await
            .expect("begin")
        {
            Begun::Started { .. } => {}
            other => panic!("{}: not started: {other:?}", p.spec.name),
        }
    }
    let runs: BTreeSet<Uuid> = prepared.iter().map(Prepared::run_id).collect();
    let admitted = began.elapsed();
    let results = follow(&bus, &runs, Duration::from_secs_f64(6.0 * 3600.0 / fleet.scale)).await;
    let wall = began.elapsed();
    let events = bus.events();
    let spans = run_spans(&events, began_at, fleet.scale);
    let last_kinds = last_kinds(&events);
    if std::env::var_os("SIGRUN_FLEET_TRACE").is_some() {
        trace_runs(&events, fleet.scale);
    }
    drop(events);
    let emulated_end = emulator.now();
    for stop in stops {
        let _ = stop.send(());
    }
    for task in running {
        let _ = task.await;
    }
    let cpu = common::cpu_time(std::process::id(), ticks) - cpu_before;
    let log = control(&emulator, "requests").await;
    let timelines = control(&emulator, "timelines").await;
    emulator.shutdown().await;

    report(
        fleet,
        &results,
        Window {
            start: emulated_start,
            end: emulated_end,
            wall,
            cpu,
            admitted,
            spans,
            last_kinds,
        },
        &log,
        &timelines,
        &prepared,
    );
}

/// Plans every pipeline, 32 at a time (reads only), as `sigrun submit` would before triggering.
async fn prepare_all(fleet: &Fleet, azure: &Arc<AzureClient>) -> Vec<Prepared> {
    let began = Instant::now();
    let planned = futures_util::stream::iter(0..fleet.pipelines)
        .map(|i| {
            let azure = azure.clone();
            let spec = spec(i, fleet.subscriptions);
            async move {
                let origin = format!("{}.toml", spec.name);
                // Throttled (without pacing it is): try again, as a submitter would.
                loop {
                    match admission::prepare(spec.clone(), &origin, &RunRequest::default(), azure.as_ref()).await {
                        Ok(prepared) => return prepared,
                        Err(admission::PrepareError::Transient { .. }) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("{origin} does not plan: {e}"),
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    println!(
        "planned {} pipelines in {:.1} s real (reads only, 32 at a time)",
        planned.len(),
        began.elapsed().as_secs_f64()
    );
    planned
}

/// Waits until every run has ended (or `limit` passes): run id → result.
async fn follow(bus: &MemoryBus, runs: &BTreeSet<Uuid>, limit: Duration) -> BTreeMap<Uuid, RunResult> {
    let deadline = Instant::now() + limit;
    // Each look reads only the records since the last: copying the whole history four times a
    // second would cost the fleet's own process CPU that grows with the run.
    let mut read = 0;
    let mut by_run: HashMap<Uuid, Vec<sigrun::events::Event>> = HashMap::new();
    let mut results: BTreeMap<Uuid, RunResult> = runs.iter().map(|id| (*id, RunResult::Running)).collect();
    loop {
        let records = bus.records_since(read);
        read += records.len();
        let mut changed = BTreeSet::new();
        for event in records.iter().flat_map(|record| record.events().iter().cloned()) {
            changed.insert(event.run_id);
            by_run.entry(event.run_id).or_default().push(event);
        }
        for id in changed {
            if let (Some(result), Some(events)) = (results.get_mut(&id), by_run.get(&id)) {
                *result = run_result(events);
            }
        }
        let open = results.values().filter(|r| **r == RunResult::Running).count();
        if open == 0 || Instant::now() > deadline {
            return results;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The runs `SIGRUN_FLEET_TRACE` names (`fleet-0100,fleet-0500`), beside the run that ended last.
fn traced_runs() -> Vec<String> {
    let names = std::env::var("SIGRUN_FLEET_TRACE").unwrap_or_default();
    names.split(',').filter_map(run_named_in).map(str::to_string).collect()
}

/// `SIGRUN_FLEET_TRACE`: the five runs that ended last and the runs it names, each event at its
/// emulated second from the fleet's first event.
fn trace_runs(events: &[sigrun::events::Event], scale: f64) {
    let Some(first) = events.first().map(|e| e.at) else {
        return;
    };
    let mut by_run: BTreeMap<Uuid, Vec<&sigrun::events::Event>> = BTreeMap::new();
    for event in events {
        by_run.entry(event.run_id).or_default().push(event);
    }
    let mut runs: Vec<_> = by_run.values().collect();
    runs.sort_by_key(|events| events.last().map(|e| e.at));
    let named = traced_runs();
    // In the order they ended, each once: the named ones, and the last five.
    let chosen = runs
        .iter()
        .enumerate()
        .filter(|(i, events)| i + 5 >= runs.len() || named.contains(&events[0].pipeline));
    for (_, events) in chosen {
        println!("  {}:", events[0].pipeline);
        for e in events.iter() {
            let at = (e.at - first).as_seconds_f64() * scale;
            println!("    {at:>7.0} s  {} {:?} {}", e.stage, e.branch, e.kind.name());
        }
    }
}

async fn control(emulator: &Emulator, what: &str) -> Value {
    let info = emulator.info();
    let pem = std::fs::read(info.ca_cert.as_ref().expect("TLS")).expect("read the CA");
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem).expect("CA"))
        .build()
        .expect("client");
    client
        .get(format!("{}/{what}", info.control_url))
        .send()
        .await
        .expect("control API")
        .json()
        .await
        .expect("JSON")
}

struct Window {
    start: OffsetDateTime,
    end: OffsetDateTime,
    wall: Duration,
    cpu: Duration,
    /// Real time the admissions took, from the first to the last.
    admitted: Duration,
    /// Each pipeline's run: when it started and ended, emulated seconds from the first admission.
    spans: BTreeMap<String, (f64, f64)>,
    /// How many runs ended with each kind of event (a run whose clean-up ended last waited on it).
    last_kinds: BTreeMap<&'static str, usize>,
}

/// How many runs ended with each kind of event.
fn last_kinds(events: &[sigrun::events::Event]) -> BTreeMap<&'static str, usize> {
    let mut last: HashMap<Uuid, &sigrun::events::Event> = HashMap::new();
    for event in events {
        let entry = last.entry(event.run_id).or_insert(event);
        if event.at >= entry.at {
            *entry = event;
        }
    }
    let mut kinds = BTreeMap::new();
    for event in last.values() {
        *kinds.entry(event.kind.name()).or_default() += 1;
    }
    kinds
}

impl Window {
    /// The run that ended last, with its span.
    fn ended_last(&self) -> Option<(&String, &(f64, f64))> {
        self.spans.iter().max_by(|a, b| a.1.1.total_cmp(&b.1.1))
    }
}

/// When each pipeline's run started (its first event) and ended (its last), in emulated seconds
/// from `began_at`.
fn run_spans(events: &[sigrun::events::Event], began_at: OffsetDateTime, scale: f64) -> BTreeMap<String, (f64, f64)> {
    let mut spans: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for event in events {
        let at = (event.at - began_at).as_seconds_f64() * scale;
        let span = spans.entry(event.pipeline.clone()).or_insert((at, at));
        span.0 = span.0.min(at);
        span.1 = span.1.max(at);
    }
    spans
}

fn stamp(v: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().unwrap_or(""), &Rfc3339).expect("RFC 3339 time")
}

fn secs(from: OffsetDateTime, to: OffsetDateTime) -> f64 {
    (to - from).as_seconds_f64()
}

/// The bucket a logged request drew from: (subscription or account, kind).
fn bucket(api: &str, method: &str, path: &str) -> Option<(String, &'static str)> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let scope = match api {
        "arm" => format!("subscription {}", segments.get(1)?.to_ascii_lowercase()),
        "batch" => format!("account {}", segments.get(1)?.to_ascii_lowercase()),
        _ => return None,
    };
    let kind = match method {
        "GET" | "HEAD" => "reads",
        "DELETE" => "deletes",
        _ => "writes",
    };
    Some((scope, kind))
}

fn limit_of(kind: &str) -> (f64, f64) {
    let limits = Limits::arm();
    let limit = match kind {
        "reads" => limits.reads,
        "deletes" => limits.deletes,
        _ => limits.writes,
    };
    (limit.burst, limit.refill)
}

/// Emulated seconds the budget needs for every distinct request of the window, and its bucket.
fn budget_bound(requests: &[&Value]) -> (f64, String) {
    let mut distinct: HashMap<(String, &'static str), BTreeSet<(String, String)>> = HashMap::new();
    for e in requests {
        let (method, path) = (e["method"].as_str().unwrap_or(""), e["path"].as_str().unwrap_or(""));
        if let Some(key) = bucket(e["api"].as_str().unwrap_or(""), method, path) {
            distinct
                .entry(key)
                .or_default()
                .insert((method.to_string(), path.to_ascii_lowercase()));
        }
    }
    distinct
        .iter()
        .map(|((scope, kind), set)| {
            let (burst, refill) = limit_of(kind);
            let secs = (set.len() as f64 - burst).max(0.0) / refill;
            (secs, format!("{kind} of {scope}: {} distinct requests", set.len()))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, "none".into()))
}

/// Each run's critical path by pipeline, from the durations the emulator fixed (see the header).
fn critical_paths(timelines: &Value, prepared: &[Prepared]) -> BTreeMap<String, f64> {
    let ops = timelines["operations"].as_array().expect("operations");
    let pools = timelines["pools"].as_array().expect("pools");
    let mut paths = BTreeMap::new();
    for p in prepared {
        let name = p.spec.name.to_ascii_lowercase();
        let put = |what: &str| -> f64 {
            ops.iter()
                .filter(|op| op["kind"] == "Put")
                .filter(|op| {
                    let id = op["resource"].as_str().unwrap_or("").to_ascii_lowercase();
                    id.contains(what) && id.contains(&name) && !id.contains("/versions/")
                })
                .map(|op| secs(stamp(&op["started"]), stamp(&op["ends"])))
                .fold(0.0, f64::max)
        };
        let version = replica_regions(timelines, &name)
            .map(|r| secs(stamp(&r["starts"]), stamp(&r["ends"])))
            .fold(0.0, f64::max);
        let pool = pools
            .iter()
            .filter(|pool| pool["id"].as_str().unwrap_or("").to_ascii_lowercase().contains(&name))
            .map(|pool| secs(stamp(&pool["created"]), pool_ready(pool)))
            .fold(0.0, f64::max);
        let total = put("/snapshots/") + put("/images/") + put("/galleries/") + version + pool;
        paths.insert(p.spec.name.clone(), total);
    }
    paths
}

/// The regions of the versions whose id holds `name`, as the emulator's timelines show them.
fn replica_regions<'a>(timelines: &'a Value, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    timelines["replication"]
        .as_array()
        .expect("replication")
        .iter()
        .filter(move |r| r["resource"].as_str().unwrap_or("").to_ascii_lowercase().contains(name))
        .flat_map(|r| r["regions"].as_array().into_iter().flatten())
}

/// When a pool was ready: its allocation over and its last node idle.
fn pool_ready(pool: &Value) -> OffsetDateTime {
    let allocated = stamp(&pool["allocation"]["ends"]);
    let idle = pool["idle_at"].as_array().into_iter().flatten().map(stamp).max();
    idle.map_or(allocated, |idle| idle.max(allocated))
}

/// The median, 90th percentile and worst of `values` (nearest rank; zeros when there are none).
fn spread(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        values
            .get(((values.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    (at(0.5), at(0.9), at(1.0))
}

/// Each run's delay at every link of its chain, in emulated seconds: from the fleet's start to its
/// first snapshot PUT, from each operation's end to the write that acts on it (snapshots → image,
/// image → definition, definition → version, replica → pool), and from its pool being idle to the
/// verdict (the pool's metadata PATCH), and from the verdict to the run's end (its rollout and
/// clean-up). Printed as median, 90th percentile and worst over the runs:
/// where the runs' time past their own critical paths goes.
fn link_delays(log: &Value, timelines: &Value, prepared: &[Prepared], window: &Window) {
    let start = window.start;
    let tracing = std::env::var_os("SIGRUN_FLEET_TRACE").is_some();
    let last = window.ended_last().map(|(name, _)| name);
    let traced = traced_runs();
    let requests = log["requests"].as_array().expect("requests");
    // Each run's requests, by the pipeline name in their path (the name is the runs' own prefix).
    let mut by_run: HashMap<&str, Vec<&Value>> = HashMap::new();
    for e in requests {
        if let Some(name) = run_named_in(e["path"].as_str().unwrap_or("")) {
            by_run.entry(name).or_default().push(e);
        }
    }
    let ops = timelines["operations"].as_array().expect("operations");
    let first_request = |method: &str, name: &str, what: &dyn Fn(&str) -> bool| -> Option<OffsetDateTime> {
        by_run
            .get(run_named_in(name)?)?
            .iter()
            .filter(|e| e["method"] == method)
            .filter(|e| {
                let path = e["path"].as_str().unwrap_or("").to_ascii_lowercase();
                path.contains(name) && what(&path)
            })
            .map(|e| stamp(&e["emulated_time"]))
            .min()
    };
    let op_end = |name: &str, what: &dyn Fn(&str) -> bool| -> Option<OffsetDateTime> {
        ops.iter()
            .filter(|op| op["kind"] == "Put")
            .filter(|op| {
                let id = op["resource"].as_str().unwrap_or("").to_ascii_lowercase();
                id.contains(name) && what(&id)
            })
            .map(|op| stamp(&op["ends"]))
            .max()
    };
    let snapshots = |p: &str| p.contains("/snapshots/");
    let image = |p: &str| p.contains("/images/") && !p.contains("/galleries/");
    let definition = |p: &str| p.contains("/galleries/") && p.contains("/images/") && !p.contains("/versions/");
    let version = |p: &str| p.contains("/versions/");
    let pool_of = |name: &str| {
        timelines["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .find(|pool| pool["id"].as_str().unwrap_or("").to_ascii_lowercase().contains(name))
            .cloned()
    };
    let replica_end = |name: &str| replica_regions(timelines, name).map(|r| stamp(&r["ends"])).max();
    let names = [
        "start → snapshots",
        "snapshots → image",
        "image → definition",
        "definition → version",
        "replica → pool",
        "idle → verified",
        "verified → run's end",
    ];
    let mut delays: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for p in prepared {
        let name = p.spec.name.to_ascii_lowercase();
        let pool = pool_of(&name);
        let idle = pool.as_ref().map(pool_ready);
        let pool_id = pool
            .as_ref()
            .and_then(|pool| pool["id"].as_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let verified = first_request("PATCH", &pool_id, &|p| p.contains("/pools/"));
        // The run's end as its last event (emulated seconds from the admissions' start), on the
        // emulator's clock: the window starts with the admissions.
        let run_end = window
            .spans
            .get(&p.spec.name)
            .map(|(_, end)| start + time::Duration::seconds_f64(*end));
        let links = [
            (Some(start), first_request("PUT", &name, &snapshots)),
            (op_end(&name, &snapshots), first_request("PUT", &name, &image)),
            (op_end(&name, &image), first_request("PUT", &name, &definition)),
            (op_end(&name, &definition), first_request("PUT", &name, &version)),
            (replica_end(&name), pool.as_ref().map(|pool| stamp(&pool["created"]))),
            (idle, verified),
            (verified, run_end),
        ];
        if tracing && (last.is_some_and(|last| *last == p.spec.name) || traced.contains(&p.spec.name)) {
            trace_run(&name, requests, &links, start);
        }
        for (i, link) in links.iter().enumerate() {
            if let (Some(from), Some(to)) = link {
                delays[i].push(secs(*from, *to));
            }
        }
    }
    let line: Vec<String> = names
        .iter()
        .zip(&mut delays)
        .map(|(name, d)| {
            let (median, p90, worst) = spread(d);
            format!("{name} {median:.0} / {p90:.0} / {worst:.0}")
        })
        .collect();
    println!(
        "  delay at each link, median / 90th percentile / worst (emulated s): {}",
        line.join(", ")
    );
}

/// The pipeline whose name (`fleet-NNNN`, [`pipeline_name`]) a path holds.
fn run_named_in(path: &str) -> Option<&str> {
    path.match_indices("fleet-").find_map(|(at, _)| {
        let name = path.get(at..at + 10)?;
        name[6..].bytes().all(|b| b.is_ascii_digit()).then_some(name)
    })
}

/// `SIGRUN_FLEET_TRACE`: the run that ended last and the runs it names, each of its requests and
/// each link's ends at emulated seconds from the fleet's start.
fn trace_run(
    name: &str,
    requests: &[Value],
    links: &[(Option<OffsetDateTime>, Option<OffsetDateTime>)],
    start: OffsetDateTime,
) {
    println!("  requests of {name} (emulated s from the fleet's start):");
    for e in requests {
        let path = e["path"].as_str().unwrap_or("").to_ascii_lowercase();
        if path.contains(name) || e["query"].as_str().unwrap_or("").to_ascii_lowercase().contains(name) {
            let at = secs(start, stamp(&e["emulated_time"]));
            println!(
                "    {at:>7.0} s  {} {} {}",
                e["method"].as_str().unwrap_or(""),
                path,
                e["status"]
            );
        }
    }
    let at = |t: &Option<OffsetDateTime>| t.map_or("-".to_string(), |t| format!("{:.0}", secs(start, t)));
    let ends: Vec<String> = links
        .iter()
        .map(|(from, to)| format!("{} → {}", at(from), at(to)))
        .collect();
    println!("    links: {}", ends.join(", "));
}

/// Where the time beyond the longest critical path went: the admissions' span, and for the run
/// that ended last, when it started and how far it ran past its own critical path; and over all
/// runs, how far each ran past its own (median, 90th percentile, worst).
fn where_the_time_went(window: &Window, paths: &BTreeMap<String, f64>, scale: f64) {
    let over_path = |name: &String, (start, end): &(f64, f64)| Some(end - start - paths.get(name)?);
    let mut over: Vec<f64> = window
        .spans
        .iter()
        .filter_map(|(name, span)| over_path(name, span))
        .collect();
    let worst = window
        .spans
        .iter()
        .filter_map(|(name, span)| Some((over_path(name, span)?, name)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map_or("none", |(_, name)| name.as_str());
    let (median, p90, most) = spread(&mut over);
    println!(
        "  admissions took {:.0} s emulated; runs' time past their own critical path: median {median:.0} s, 90th percentile {p90:.0} s, worst {most:.0} s ({worst})",
        window.admitted.as_secs_f64() * scale,
    );
    println!("  runs by their last event: {:?}", window.last_kinds);
    if let Some((name, (start, end))) = window.ended_last() {
        let path = paths.get(name).copied().unwrap_or(0.0);
        println!(
            "  ended last: {name}, started at {start:.0} s, critical path {path:.0} s, ended at {end:.0} s ({:.0} s past its path)",
            end - start - path
        );
    }
}

fn report(
    fleet: &Fleet,
    results: &BTreeMap<Uuid, RunResult>,
    window: Window,
    log: &Value,
    timelines: &Value,
    prepared: &[Prepared],
) {
    let mut by_result: BTreeMap<String, usize> = BTreeMap::new();
    for result in results.values() {
        *by_result
            .entry(
                format!("{result:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_default() += 1;
    }
    let all: Vec<&Value> = log["requests"].as_array().expect("requests").iter().collect();
    let in_window: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|e| e["api"] == "arm" || e["api"] == "batch")
        .filter(|e| {
            let at = stamp(&e["emulated_time"]);
            at >= window.start && at <= window.end
        })
        .collect();
    let throttled = in_window.iter().filter(|e| e["status"] == 429).count();
    let (budget_secs, budget_bucket) = budget_bound(&in_window);
    let paths = critical_paths(timelines, prepared);
    let (path_run, path_secs) = paths
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(("none".to_string(), 0.0), |(name, secs)| (name.clone(), *secs));
    let bound = budget_secs.max(path_secs);
    let took = secs(window.start, window.end);
    let mut kinds: BTreeMap<&'static str, usize> = BTreeMap::new();
    for e in &in_window {
        let method = e["method"].as_str().unwrap_or("");
        if let Some((_, kind)) = bucket(
            e["api"].as_str().unwrap_or(""),
            method,
            e["path"].as_str().unwrap_or(""),
        ) {
            *kinds.entry(kind).or_default() += 1;
        }
    }
    let n = fleet.pipelines.max(1) as f64;
    println!(
        "fleet: {} pipelines on {} subscriptions ({} accounts), {} workers, clock {}x, ARM budgets enforced, pacing {}, {}",
        fleet.pipelines,
        fleet.subscriptions,
        fleet.subscriptions * 2,
        fleet.workers,
        fleet.scale,
        if fleet.pacing { "on" } else { "off" },
        ALLOCATOR_NAME,
    );
    println!("  results: {by_result:?}");
    println!(
        "  requests: {} in the window ({:.1} per run: {})",
        in_window.len(),
        in_window.len() as f64 / n,
        kinds
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", *v as f64 / n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  throttled answers: {throttled} of {} ({:.2} %, goal <= 1 %)",
        in_window.len(),
        100.0 * throttled as f64 / in_window.len().max(1) as f64
    );
    println!("  budget's time: {budget_secs:.0} s emulated ({budget_bucket})");
    println!("  longest critical path: {path_secs:.0} s emulated ({path_run})");
    println!(
        "  took {took:.0} s emulated ({:.1} s real); time / bound = {:.3} (goal <= 1.1)",
        window.wall.as_secs_f64(),
        took / bound.max(1e-9)
    );
    where_the_time_went(&window, &paths, fleet.scale);
    link_delays(log, timelines, prepared, &window);
    println!(
        "  process CPU {:.1} s ({:.1} ms per pipeline, emulator included)",
        window.cpu.as_secs_f64(),
        window.cpu.as_secs_f64() * 1000.0 / n
    );
    let failed = results.values().filter(|r| **r != RunResult::Succeeded).count();
    assert_eq!(failed, 0, "every run succeeds: {by_result:?}");
}
