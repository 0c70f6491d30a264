//! CPU per pipeline at 100 concurrent nightly pipelines: sigrun as deployed (one worker consuming
//! every stage on RabbitMQ, as `deploy/` runs it at rest; the broker and every `sigrun submit`
//! counted) beside the SDK way (the official Azure
//! SDKs for Python, a thread per pipeline, `begin_*().result()` pollers). Goal: sigrun ≤ 0.2× the
//! SDK way.
//!
//! **Set-up.** An emulator runs in this process over TLS (its CPU is Azure's, counted by neither
//! way) at `SIGRUN_BENCH_SCALE` (default 200) with ARM's budget enforced. Its world is the
//! default one with `sigrunweu`'s quotas raised for the pools. `SIGRUN_BENCH_PIPELINES` pipelines
//! (default 100), each its own spec with its own image definition: snapshots of the build VM's
//! three disks, a managed image, the shared gallery, the version replicated to two regions,
//! intermediates deleted, one pool of two nodes verified with every node idle.
//!
//! **sigrun.** The workers (by default one `sigrun worker --all-stages`, as `deploy/` runs them:
//! one Deployment for every stage, KEDA's minimum of one replica; azure mode against the emulator,
//! shipped settings, the broker under a prefix of this run's own) start first. Then every pipeline is submitted at
//! once by its own `sigrun submit` process, as an event producer would, and the events stream
//! says when each run ended. Counted: the workers' CPU (utime + stime, `/proc/PID/stat`) from the
//! first submit to the last run's end, the broker's (`beam.smp`) over the same span, and the
//! submits' (this process's `cutime` + `cstime`, the children it waited for). The broker's share
//! includes what this bench's own reader of the events stream costs it: one reader beside the
//! workers', as one `sigrun watch` would be.
//!
//! **The SDK way.** `benches/sdk_way/nightly.py` runs the same pipelines, planned the same way
//! (the library's planner, another version) in one Python process with a thread each; its CPU is
//! the child's `cutime` + `cstime`. Python and its packages come from the virtualenv
//! `scripts/bench-env` makes (`SIGRUN_SDK_VENV`, default `~/.cache/sigrun/sdk-venv`).
//!
//! Printed: CPU per pipeline of each part and of each way, their ratio, wall time of each way,
//! and the requests each way made per pipeline (from the emulator's log). The bench fails unless
//! every pipeline of both ways succeeds and every worker exits 0 on SIGTERM.
//!
//! `cargo bench --bench concurrent`; `SIGRUN_BENCH_PIPELINES`, `SIGRUN_BENCH_SCALE`,
//! `SIGRUN_BENCH_WAYS` (`sigrun,sdk`: either alone to measure one), `SIGRUN_BENCH_WORKERS` (`one`,
//! the default: one `sigrun worker --all-stages`; `all:N`, N such processes, as KEDA scales them
//! out; `six`, one process per stage), `SIGRUN_BENCH_AMQP_URL` with `SIGRUN_BENCH_BROKER_PID` (its
//! `beam.smp`; default the one that boots `rabbit`) and `SIGRUN_BENCH_BROKER_METRICS` (its
//! Prometheus plugin's `/metrics`). The workers take settings from the environment as any worker
//! does (e.g. `SIGRUN__RUNTIME__FENCING=commit_first`); the header prints their fencing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sigrun::azure::client::AzureClient;
use sigrun::emulator::{Emulator, EmulatorOptions, World};
use sigrun::events::{Event, RunResult, run_result};
use sigrun::model::spec::PipelineSpec;
use sigrun::planner::{self, PlanInputs};
use time::OffsetDateTime;
use uuid::Uuid;

use common::control::Control;
use common::workers::{Worker, broker_pid, follow_events};

/// The versions each way publishes (every pipeline has its own definition).
const SIGRUN_VERSION: &str = "2026.1204.1";
const SDK_VERSION: &str = "2026.1204.2";
/// Every run of either way must end within this.
const LIMIT: Duration = Duration::from_secs(1800);
/// The SDK way's figure the issue measured, CPU-s per pipeline, by time scale.
const ISSUE_SDK_FIGURE: [(f64, f64); 2] = [(200.0, 0.25), (50.0, 0.35)];

struct Options {
    pipelines: usize,
    scale: f64,
    sigrun: bool,
    sdk: bool,
    /// sigrun's workers: one process per stage when `None`, or this many processes each consuming
    /// all six stages (one, as `deploy/` runs them at rest).
    all_stages: Option<usize>,
}

fn main() {
    if !common::measuring("concurrent") {
        return;
    }
    let ways: String = common::env_or("SIGRUN_BENCH_WAYS", "sigrun,sdk".to_string());
    let options = Options {
        pipelines: common::env_or("SIGRUN_BENCH_PIPELINES", 100),
        scale: common::env_or("SIGRUN_BENCH_SCALE", 200.0),
        sigrun: ways.split(',').any(|w| w.trim() == "sigrun"),
        sdk: ways.split(',').any(|w| w.trim() == "sdk"),
        all_stages: common::workers::layout(),
    };
    assert!(
        options.sigrun || options.sdk,
        "SIGRUN_BENCH_WAYS names neither `sigrun` nor `sdk`: {ways}"
    );
    let runtime = common::runtime();
    runtime.block_on(bench(options));
}

/// What one way cost.
struct Measured {
    /// (part, CPU) in the order printed.
    parts: Vec<(String, Duration)>,
    wall: Duration,
    requests: Vec<Value>,
    /// The broker's own counters over the measurement, by name (empty when not read).
    broker_counts: BTreeMap<String, f64>,
    /// sigrun's deliveries by stage and outcome (`sigrun_messages_handled_total`; empty for the SDK way).
    handled: BTreeMap<(String, String), f64>,
}

impl Measured {
    fn cpu(&self) -> Duration {
        self.parts.iter().map(|(_, cpu)| *cpu).sum()
    }
}

async fn bench(options: Options) {
    let venv = sdk_venv();
    if options.sdk {
        assert!(
            venv.join("bin/python").exists(),
            "the SDK way's Python is missing at {}: run scripts/bench-env",
            venv.display()
        );
    }
    let emulator = Emulator::start(EmulatorOptions {
        time_scale: options.scale,
        world: world(options.pipelines),
        ..Default::default()
    })
    .await
    .expect("the emulator starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let specs = write_specs(dir.path(), options.pipelines);
    println!(
        "== {} concurrent nightly pipelines, emulator at {}x, ARM's budget enforced, sigrun's workers: {}, \
         fencing {:?} ({})",
        options.pipelines,
        options.scale,
        common::workers::describe_layout(options.all_stages),
        // What the workers read: the shipped settings under this process's environment.
        common::worker_defaults().runtime.fencing,
        common::machine()
    );
    let control = Control::new(&emulator);
    let sigrun = if options.sigrun {
        Some(measure_sigrun(&emulator, &control, dir.path(), &specs, &options).await)
    } else {
        None
    };
    let sdk = if options.sdk {
        Some(measure_sdk(&emulator, &control, dir.path(), &specs, options.scale, &venv).await)
    } else {
        None
    };
    emulator.shutdown().await;
    report(&options, sigrun.as_ref(), sdk.as_ref());
}

fn sdk_venv() -> PathBuf {
    std::env::var_os("SIGRUN_SDK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sigrun/sdk-venv"))
}

/// The default world, `sigrunweu` able to hold both ways' pools.
fn world(pipelines: usize) -> World {
    let mut world = World::default_world();
    for account in world.batch_accounts.iter_mut().filter(|a| a.name == "sigrunweu") {
        account.pool_quota = u32::try_from(2 * pipelines + 10).unwrap_or(u32::MAX);
        account.dedicated_core_quota = 1_000_000;
        account.low_priority_core_quota = 1_000_000;
    }
    world
}

fn pipeline_name(i: usize) -> String {
    format!("cpu-{i:03}")
}

/// Pipeline `i`'s spec: the shipped nightly's source, image, gallery and first pool's account,
/// with its own definition, two regions and one pool of two nodes.
fn spec_text(i: usize) -> String {
    let name = pipeline_name(i);
    format!(
        r#"name = "{name}"
[source]
vm = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-imaging/providers/Microsoft.Compute/virtualMachines/build-ubuntu-2204"
[image]
resource_group = "rg-imaging"
region = "westeurope"
[gallery]
id = "/subscriptions/11111111-1111-4111-8111-111111111111/resourceGroups/rg-gallery/providers/Microsoft.Compute/galleries/sigrun_images"
create_if_missing = true
[definition]
name = "def-{name}"
os_type = "Linux"
os_state = "Generalized"
publisher = "contoso"
offer = "cpu-bench"
sku = "{name}"
hyper_v_generation = "V2"
[version]
scheme = "nightly"
[publish]
regions = [{{ name = "westeurope", replicas = 1 }}, {{ name = "eastus", replicas = 1 }}]
[[pools]]
target = "farm"
account = "/subscriptions/22222222-2222-4222-8222-222222222222/resourceGroups/rg-batch/providers/Microsoft.Batch/batchAccounts/sigrunweu"
vm_size = "Standard_D4s_v5"
dedicated_nodes = 2
node_agent_sku_id = "auto"
[verify]
min_idle_share = 1.0
deadline = "3h"
[retention]
intermediates = "delete"
"#
    )
}

/// Each pipeline's spec, written to `dir/pipelines/` (what `sigrun submit` reads) and parsed.
fn write_specs(dir: &Path, pipelines: usize) -> Vec<(PathBuf, PipelineSpec)> {
    let folder = dir.join("pipelines");
    std::fs::create_dir_all(&folder).expect("the specs' folder");
    (0..pipelines)
        .map(|i| {
            let path = folder.join(format!("{}.toml", pipeline_name(i)));
            let text = spec_text(i);
            std::fs::write(&path, &text).expect("write a spec");
            let spec = PipelineSpec::parse(&text, &path.display().to_string()).expect("the bench's spec parses");
            (path, spec)
        })
        .collect()
}

async fn measure_sigrun(
    emulator: &Emulator,
    control: &Control,
    dir: &Path,
    specs: &[(PathBuf, PipelineSpec)],
    options: &Options,
) -> Measured {
    let prefix = common::prefix("concurrent");
    let config = common::workers::write_config(emulator, dir, &prefix, options.scale, "");
    let settings = sigrun::config::Settings::load(Some(&config)).expect("the bench config loads");
    let bus = common::connect(settings.amqp.clone(), settings.delay_tiers()).await;
    let mut workers = Worker::start_layout(options.all_stages, &config, dir).await;
    let mut events = follow_events(&bus).await;
    let ticks = common::clock_ticks();
    let broker = broker_pid().expect("the broker's beam.smp process is readable here");
    let broker_before = common::cpu_time(broker, ticks);
    let workers_before: Vec<Duration> = workers.iter().map(|w| common::cpu_time(w.pid(), ticks)).collect();
    let children_before = common::children_cpu_time(ticks);
    let broker_counts_before = broker_counters().await;
    control.clear_log().await;
    let started = Instant::now();

    let submits = submit_all(&config, specs);
    let mut by_run: HashMap<Uuid, Vec<Event>> = HashMap::new();
    let wanted: HashMap<Uuid, String> = specs
        .iter()
        .map(|(_, spec)| (common::run_id(&spec.name, SIGRUN_VERSION), spec.name.clone()))
        .collect();
    let mut ended: BTreeMap<String, RunResult> = BTreeMap::new();
    while ended.len() < wanted.len() {
        let event = tokio::time::timeout_at((started + LIMIT).into(), events.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {} runs ended within {LIMIT:?}", ended.len(), wanted.len()))
            .expect("the events stream is open");
        let Some(name) = wanted.get(&event.run_id) else {
            continue;
        };
        let run = by_run.entry(event.run_id).or_default();
        run.push(event);
        let result = run_result(run);
        if result != RunResult::Running {
            ended.insert(name.clone(), result);
        }
        for worker in &mut workers {
            worker.check_alive();
        }
    }
    let wall = started.elapsed();
    let workers_cpu: Duration = workers
        .iter()
        .zip(&workers_before)
        .map(|(w, before)| common::cpu_time(w.pid(), ticks).saturating_sub(*before))
        .sum();
    let broker_cpu = common::cpu_time(broker, ticks).saturating_sub(broker_before);
    submits.await.expect("the submits");
    let submits_cpu = common::children_cpu_time(ticks).saturating_sub(children_before);
    let requests = control.requests().await;
    let broker_counts = counted_since(&broker_counts_before, &broker_counters().await);
    let mut handled: BTreeMap<(String, String), f64> = BTreeMap::new();
    for worker in &workers {
        for (key, n) in worker.handled_by_stage().await {
            *handled.entry(key).or_default() += n;
        }
    }

    for worker in &workers {
        worker.terminate();
    }
    for worker in &mut workers {
        let code = worker.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(code, Some(0), "worker {} exits 0 on SIGTERM", worker.name());
    }
    common::teardown(bus).await;
    let failed: Vec<_> = ended.iter().filter(|(_, r)| **r != RunResult::Succeeded).collect();
    assert!(failed.is_empty(), "every sigrun run succeeds: {failed:?}");
    Measured {
        parts: vec![
            (format!("{} worker process(es)", workers.len()), workers_cpu),
            ("broker (beam.smp)".into(), broker_cpu),
            (format!("{} submits", specs.len()), submits_cpu),
        ],
        wall,
        requests,
        broker_counts,
        handled,
    }
}

/// Every pipeline's `sigrun submit`, all at once; the task ends when each has exited 0.
fn submit_all(config: &Path, specs: &[(PathBuf, PipelineSpec)]) -> tokio::task::JoinHandle<()> {
    let children: Vec<(String, tokio::process::Child)> = specs
        .iter()
        .map(|(path, spec)| {
            let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sigrun"))
                .args(["submit", "--version", SIGRUN_VERSION, "--config"])
                .arg(config)
                .arg(path)
                .current_dir(common::root())
                .env_remove("SIGRUN_LOG")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("sigrun submit starts");
            (spec.name.clone(), child)
        })
        .collect();
    tokio::spawn(async move {
        for (name, child) in children {
            let output = child.wait_with_output().await.expect("wait for sigrun submit");
            assert!(
                output.status.success(),
                "sigrun submit of {name}: {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    })
}

async fn measure_sdk(
    emulator: &Emulator,
    control: &Control,
    dir: &Path,
    specs: &[(PathBuf, PipelineSpec)],
    scale: f64,
    venv: &Path,
) -> Measured {
    let job = dir.join("sdk-way.json");
    let text = serde_json::to_vec(&sdk_job(emulator, specs, scale).await).expect("the job serializes");
    std::fs::write(&job, text).expect("write the SDK way's job");
    let info = emulator.info();
    let ticks = common::clock_ticks();
    let children_before = common::children_cpu_time(ticks);
    control.clear_log().await;
    let started = Instant::now();
    let child = tokio::process::Command::new(venv.join("bin/python"))
        .arg(common::root().join("benches/sdk_way/nightly.py"))
        .arg(&job)
        .env("REQUESTS_CA_BUNDLE", info.ca_cert.as_deref().expect("TLS"))
        .env("NO_PROXY", "*")
        .stdin(std::process::Stdio::null())
        .output();
    let output = tokio::time::timeout(LIMIT, child)
        .await
        .unwrap_or_else(|_| panic!("the SDK way did not end within {LIMIT:?}"))
        .expect("the SDK way's Python runs");
    let wall = started.elapsed();
    let cpu = common::children_cpu_time(ticks).saturating_sub(children_before);
    let requests = control.requests().await;
    assert!(
        output.status.success(),
        "every pipeline of the SDK way succeeds ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Measured {
        parts: vec![("python (one process, a thread per pipeline)".into(), cpu)],
        wall,
        requests,
        broker_counts: BTreeMap::new(),
        handled: BTreeMap::new(),
    }
}

/// What `nightly.py` reads: the identity, the endpoints, and each pipeline's spec and plan at
/// [`SDK_VERSION`], planned as `sigrun submit` plans.
async fn sdk_job(emulator: &Emulator, specs: &[(PathBuf, PipelineSpec)], scale: f64) -> Value {
    let azure = AzureClient::new(&common::azure_settings(emulator)).expect("the Azure client builds");
    let inputs = PlanInputs {
        version: SDK_VERSION.into(),
        existing_version: false,
        existing_image: None,
        version_absent: false,
    };
    let mut pipelines = Vec::new();
    for (_, spec) in specs {
        let plan = planner::plan(spec, &inputs, &azure, OffsetDateTime::now_utc())
            .await
            .expect("the bench's pipeline plans");
        pipelines.push(json!({ "spec": spec, "plan": plan }));
    }
    let base = emulator.info().base_url.clone();
    json!({
        "tenant": common::TENANT,
        "client_id": common::CLIENT_ID,
        "client_secret": common::CLIENT_SECRET,
        "authority": base,
        "arm": base,
        "time_scale": scale,
        "pipelines": pipelines,
    })
}

fn report(options: &Options, sigrun: Option<&Measured>, sdk: Option<&Measured>) {
    let n = options.pipelines as f64;
    println!("\n{:<48} {:>10} {:>14}", "", "CPU (s)", "per pipeline");
    for (way, measured) in [("sigrun", sigrun), ("SDK way", sdk)] {
        let Some(measured) = measured else { continue };
        for (part, cpu) in &measured.parts {
            println!(
                "{:<48} {:>10.2} {:>11.1} ms",
                format!("{way}: {part}"),
                cpu.as_secs_f64(),
                1000.0 * cpu.as_secs_f64() / n
            );
        }
        let cpu = measured.cpu().as_secs_f64();
        println!(
            "{:<48} {:>10.2} {:>11.1} ms   wall {:.1} s, {:.1} requests per pipeline{}",
            format!("{way}: all"),
            cpu,
            1000.0 * cpu / n,
            measured.wall.as_secs_f64(),
            measured.requests.len() as f64 / n,
            throttled(&measured.requests)
        );
    }
    for (way, measured) in [("sigrun", sigrun), ("SDK way", sdk)] {
        if let Some(measured) = measured {
            println!("{way}, requests per pipeline: {}", request_kinds(&measured.requests, n));
        }
    }
    if let Some(sigrun) = sigrun.filter(|m| !m.broker_counts.is_empty()) {
        let counts: Vec<String> = sigrun
            .broker_counts
            .iter()
            .map(|(kind, count)| format!("{kind} {:.1}", count / n))
            .collect();
        println!("\nbroker, messages per pipeline (sigrun): {}", counts.join(", "));
    }
    if let Some(sigrun) = sigrun {
        let counts: Vec<String> = sigrun
            .handled
            .iter()
            .filter(|(_, count)| **count > 0.0)
            .map(|((stage, outcome), count)| format!("{stage} {outcome} {:.2}", count / n))
            .collect();
        println!(
            "\nsigrun, deliveries per pipeline by stage and outcome: {}",
            counts.join(", ")
        );
    }
    let issue = ISSUE_SDK_FIGURE.iter().find(|(scale, _)| *scale == options.scale);
    if let Some(sigrun) = sigrun {
        let per = sigrun.cpu().as_secs_f64() / n;
        if let Some(sdk) = sdk {
            let ratio = per / (sdk.cpu().as_secs_f64() / n);
            println!("\nsigrun / SDK way, CPU per pipeline: {ratio:.2} (goal ≤ 0.2)");
        }
        if let Some((_, figure)) = issue {
            println!(
                "sigrun / the issue's SDK figure at this scale ({figure} CPU-s): {:.2}",
                per / figure
            );
        }
    }
}

/// Where the broker's Prometheus plugin answers (`SIGRUN_BENCH_BROKER_METRICS`).
fn broker_metrics_url() -> String {
    common::env_or(
        "SIGRUN_BENCH_BROKER_METRICS",
        "http://127.0.0.1:15692/metrics".to_string(),
    )
}

/// The broker's global message counters (`rabbitmq_global_messages_*_total`), by name and queue
/// type; empty, with a note, when the plugin does not answer.
async fn broker_counters() -> BTreeMap<String, f64> {
    let url = broker_metrics_url();
    let text = match reqwest::get(&url).await.and_then(|r| r.error_for_status()) {
        Ok(answer) => answer.text().await.unwrap_or_default(),
        Err(error) => {
            println!("(the broker's counters are not read: {url}: {error})");
            return BTreeMap::new();
        }
    };
    text.lines()
        .filter(|l| l.starts_with("rabbitmq_global_messages_"))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            let short = name.trim_start_matches("rabbitmq_global_messages_");
            let kind = short.split('{').next()?.trim_end_matches("_total");
            let queue = short
                .split("queue_type=\"rabbit_")
                .nth(1)
                .and_then(|q| q.split('_').next())
                .map_or(String::new(), |q| format!(" ({q})"));
            Some((format!("{kind}{queue}"), value.parse::<f64>().ok()?))
        })
        .fold(BTreeMap::new(), |mut sums, (key, value)| {
            *sums.entry(key).or_default() += value;
            sums
        })
}

/// `after - before` for each counter that moved.
fn counted_since(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(key, value)| (key.clone(), value - before.get(key).copied().unwrap_or(0.0)))
        .filter(|(_, moved)| *moved > 0.0)
        .collect()
}

/// Requests per pipeline by method and what they were on (the collections named in the path).
fn request_kinds(requests: &[Value], pipelines: f64) -> String {
    const COLLECTIONS: &[&str] = &[
        "subscriptions",
        "resourcegroups",
        "virtualmachines",
        "disks",
        "snapshots",
        "images",
        "galleries",
        "versions",
        "operations",
        "batchaccounts",
        "pools",
        "nodes",
        "nodecounts",
        "supportedimages",
        "token",
        "locations",
        "skus",
        "quotas",
        "usages",
    ];
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for request in requests {
        let path = request["path"]
            .as_str()
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let on: Vec<&str> = path.split('/').filter(|s| COLLECTIONS.contains(s)).collect();
        let kind = format!("{} {}", request["method"].as_str().unwrap_or("?"), on.join("/"));
        *kinds.entry(kind).or_default() += 1;
    }
    let mut sorted: Vec<(String, u64)> = kinds.into_iter().collect();
    sorted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    sorted
        .iter()
        .map(|(kind, n)| format!("{kind} {:.1}", *n as f64 / pipelines))
        .collect::<Vec<_>>()
        .join(", ")
}

/// ", N throttled (429)" when any answer was a 429.
fn throttled(requests: &[Value]) -> String {
    let count = requests.iter().filter(|r| r["status"].as_u64() == Some(429)).count();
    if count == 0 {
        String::new()
    } else {
        format!(", {count} throttled (429)")
    }
}
