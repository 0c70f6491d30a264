//! What the RabbitMQ benchmarks (`amqp_handoff`, `amqp_throughput`, `amqp_waiting`) share: the
//! broker they talk to and a name prefix of their own, the settings a worker would load, a real
//! nightly envelope (planned by the planner against an in-process emulator, so its size is the size
//! a run's message really has), percentiles, and reading a process's CPU time and peak memory from
//! `/proc`. Each bench binary uses a part of it.

#![allow(dead_code)]

pub mod control;
pub mod workers;

use std::path::PathBuf;
use std::time::Duration;

use sigrun::azure::AzureApi;
use sigrun::azure::client::AzureClient;
use sigrun::azure::config::{AzureSettings, CloudSettings, CredentialSettings, Secret};
use sigrun::bus::amqp::{AmqpBus, AmqpSettings};
use sigrun::config::Settings;
use sigrun::emulator::{Emulator, EmulatorOptions};
use sigrun::model::envelope::{Artifacts, Branch, ENVELOPE_VERSION, Envelope, Stage, new_traceparent};
use sigrun::model::plan::Plan;
use sigrun::model::spec::PipelineSpec;
use sigrun::planner::{self, PlanInputs};
use time::OffsetDateTime;
use uuid::Uuid;

pub const PIPELINE: &str = "pipelines/nightly-ubuntu.toml";
/// The version the nightly plan is made for; per-run versions replace it (see [`plan_for_version`]).
pub const BASE_VERSION: &str = "2026.1126.0";
/// The pipeline's identity in the emulator's default world.
pub const TENANT: &str = "72f988bf-0000-4000-8000-00000000c0de";
pub const CLIENT_ID: &str = "5a1b2c3d-0000-4000-8000-00000000a001";
pub const CLIENT_SECRET: &str = "emulator-secret-pipeline";

/// `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench targets without it, and
/// then they only have to build.
pub fn measuring(name: &str) -> bool {
    let yes = std::env::args().any(|a| a == "--bench");
    if !yes {
        println!("benches/{name}.rs measures only under `cargo bench --bench {name}`");
    }
    yes
}

/// A number from the environment, or the default.
pub fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={text}: not a number")),
        Err(_) => default,
    }
}

pub fn amqp_url() -> String {
    std::env::var("SIGRUN_BENCH_AMQP_URL")
        .or_else(|_| std::env::var("SIGRUN_TEST_AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A prefix of this bench run's own, so it shares the broker with tests and other runs.
pub fn prefix(bench: &str) -> String {
    format!("sigrun-bench-{bench}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

/// The settings a worker loads with no file (defaults + environment): the runtime's consumers and
/// tiers, the bus's prefetch.
pub fn worker_defaults() -> Settings {
    Settings::load(None).expect("the default settings load")
}

/// The default bus settings on `prefix` at the bench broker; events kept an hour.
pub fn amqp_settings(prefix: &str) -> AmqpSettings {
    AmqpSettings {
        url: amqp_url(),
        prefix: prefix.into(),
        event_max_age: "1h".into(),
        ..worker_defaults().amqp
    }
}

pub async fn connect(settings: AmqpSettings, tiers: Vec<Duration>) -> AmqpBus {
    let url = settings.redacted_url();
    match AmqpBus::connect(settings, tiers).await {
        Ok(bus) => bus,
        Err(error) => panic!(
            "RabbitMQ is not reachable at {url} ({error}). Start it with `rabbitmq-server -detached` \
             (or point SIGRUN_BENCH_AMQP_URL at a broker)"
        ),
    }
}

/// A plain lapin connection to the bench broker.
pub async fn raw_connection() -> lapin::Connection {
    match lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await {
        Ok(connection) => connection,
        Err(error) => panic!(
            "RabbitMQ is not reachable ({error}). Start it with `rabbitmq-server -detached` \
             (or point SIGRUN_BENCH_AMQP_URL at a broker)"
        ),
    }
}

/// Closes the bus and deletes its prefix's topology.
pub async fn teardown(bus: AmqpBus) {
    let (settings, tiers) = (bus.settings().clone(), bus.tiers().to_vec());
    bus.close().await;
    // Deleting a quorum queue that still holds 10,000 messages has failed with the broker's
    // INTERNAL_ERROR once: tried again, and never at the cost of what was measured.
    for attempt in 1..=3 {
        match AmqpBus::delete_topology(&settings, &tiers).await {
            Ok(()) => return,
            Err(error) if attempt < 3 => {
                eprintln!("deleting the bench topology failed ({error}); trying again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(error) => eprintln!(
                "warning: the bench topology (prefix {}) is left on the broker: {error}",
                settings.prefix
            ),
        }
    }
}

/// An emulator in this process with the pipeline's client and the nightly spec planned at
/// [`BASE_VERSION`].
pub struct Nightly {
    pub emulator: Emulator,
    pub azure: AzureClient,
    pub azure_settings: AzureSettings,
    pub spec: PipelineSpec,
    pub plan: Plan,
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn azure_settings(emulator: &Emulator) -> AzureSettings {
    let info = emulator.info();
    let mut settings = AzureSettings::new(CredentialSettings::ClientSecret {
        tenant_id: TENANT.into(),
        client_id: CLIENT_ID.into(),
        client_secret: Secret::new(CLIENT_SECRET),
    });
    settings.cloud = CloudSettings {
        authority_host: info.base_url.clone(),
        resource_manager: info.base_url.clone(),
        ..CloudSettings::default()
    };
    settings.extra_ca_cert = info.ca_cert.clone().map(Into::into);
    settings
}

/// Starts the emulator (TLS, default world, seed 0) at `time_scale`, with ARM's request budget
/// `budgets` (`None`: every request served), and plans the nightly spec.
pub async fn nightly(time_scale: f64, budgets: Option<sigrun::emulator::budget::Limits>) -> Nightly {
    let emulator = Emulator::start(EmulatorOptions {
        time_scale,
        budgets,
        ..Default::default()
    })
    .await
    .expect("the emulator starts");
    let azure_settings = azure_settings(&emulator);
    let azure = AzureClient::new(&azure_settings).expect("the Azure client builds");
    let spec = PipelineSpec::load(&root().join(PIPELINE)).expect("the nightly pipeline parses");
    let plan = plan(&spec, &azure, None).await;
    Nightly {
        emulator,
        azure,
        azure_settings,
        spec,
        plan,
    }
}

/// The nightly plan at [`BASE_VERSION`], optionally publishing from an existing managed image.
pub async fn plan(spec: &PipelineSpec, azure: &dyn AzureApi, image: Option<sigrun::model::ids::ImageId>) -> Plan {
    let inputs = PlanInputs {
        version: BASE_VERSION.into(),
        existing_version: false,
        existing_image: image,
        version_absent: false,
    };
    planner::plan(spec, &inputs, azure, OffsetDateTime::now_utc())
        .await
        .expect("the nightly pipeline plans against the emulator")
}

/// The plan made for [`BASE_VERSION`] with another version: every name the planner derived from
/// the version (the version id, image and snapshot names, pool ids, metadata) follows it.
pub fn plan_for_version(base: &Plan, version: &str) -> Plan {
    let text = serde_json::to_string(base).expect("plans serialize");
    let dashed = |v: &str| v.replace('.', "-");
    let text = text
        .replace(BASE_VERSION, version)
        .replace(&dashed(BASE_VERSION), &dashed(version));
    let plan: Plan = serde_json::from_str(&text).expect("the renamed plan parses");
    assert_eq!(plan.version_id.name(), version, "the version id follows the version");
    plan
}

/// A run's first message at `stage`, as `sigrun submit` builds it: the run id follows from the
/// pipeline and the version.
pub fn envelope(spec: &PipelineSpec, plan: &Plan, stage: Stage, artifacts: Artifacts) -> Envelope {
    let now = OffsetDateTime::now_utc();
    Envelope {
        v: ENVELOPE_VERSION,
        message_id: Uuid::new_v4(),
        run_id: run_id(&spec.name, &plan.version),
        pipeline: spec.name.clone(),
        version: plan.version.clone(),
        stage,
        branch: Branch::Trunk,
        spec: std::sync::Arc::new(spec.clone()),
        plan: std::sync::Arc::new(plan.clone()),
        artifacts,
        operation: None,
        not_before: None,
        attempt: 0,
        run_started: now,
        stage_started: now,
        traceparent: new_traceparent(),
        token: Uuid::nil(),
        made_by: Uuid::nil(),
        made_from: Uuid::nil(),
        admission: Uuid::nil(),
    }
}

pub fn run_id(pipeline: &str, version: &str) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("sigrun:{pipeline}:{version}").as_bytes())
}

/// The nightly run's first message (snapshot stage), from a short-lived emulator: what benches
/// that need a real message's size send.
pub async fn nightly_envelope() -> Envelope {
    let nightly = nightly(1.0, Some(sigrun::emulator::budget::Limits::arm())).await;
    let envelope = envelope(&nightly.spec, &nightly.plan, Stage::Snapshot, Artifacts::default());
    nightly.emulator.shutdown().await;
    envelope
}

/// Order statistics of a sample.
pub struct Stats {
    pub sorted: Vec<Duration>,
}

impl Stats {
    pub fn new(mut samples: Vec<Duration>) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        samples.sort();
        Stats { sorted: samples }
    }

    /// Nearest-rank percentile.
    pub fn pct(&self, p: f64) -> Duration {
        let rank = ((p / 100.0) * self.sorted.len() as f64).ceil() as usize;
        self.sorted[rank.clamp(1, self.sorted.len()) - 1]
    }

    pub fn mean(&self) -> Duration {
        self.sorted.iter().sum::<Duration>() / self.sorted.len() as u32
    }

    pub fn max(&self) -> Duration {
        *self.sorted.last().expect("not empty")
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The machine the numbers come from: cores, load, kernel, CPU model.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({model}), load average {}", load.join(" "))
}

/// Clock ticks per second of `/proc/PID/stat`'s times.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32, ticks: f64) -> Duration {
    // utime and stime: fields 14 and 15.
    stat_times(&format!("/proc/{pid}/stat"), 14, ticks)
}

/// CPU time (user + system) of the children this process has waited for (`cutime` + `cstime`).
pub fn children_cpu_time(ticks: f64) -> Duration {
    // cutime and cstime: fields 16 and 17.
    stat_times("/proc/self/stat", 16, ticks)
}

/// Fields `field` and `field + 1` (numbered from 1, as proc(5) does) of a `stat` file, in clock
/// ticks, summed as a duration.
fn stat_times(path: &str, field: usize, ticks: f64) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let after = &stat[stat.rfind(')').expect("stat has the command in parentheses") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |n: usize| -> f64 {
        fields[n - 3]
            .parse()
            .unwrap_or_else(|e| panic!("{path} field {n}: {e}"))
    };
    Duration::from_secs_f64((tick(field) + tick(field + 1)) / ticks)
}

/// The multi-threaded runtime every bench runs on: two worker threads, what a worker process
/// gets on this machine's two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A `kB` line of `/proc/PID/status` (`VmHWM`, `VmRSS`) in bytes.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
        * 1024
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
