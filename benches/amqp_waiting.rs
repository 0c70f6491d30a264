//! What the workers cost while 10,000 runs wait on Azure: each worker's peak memory and its share
//! of a core (goals: ≤ 32 MiB and ≤ 5 % of a core per worker).
//!
//! **Set-up.** An emulator runs in this process over real sockets (TLS, default world, time scale
//! 1: Azure's own durations in real time). The built binary's `sigrun worker`s, laid out as
//! `SIGRUN_BENCH_WORKERS` says (`one`, the default: one `--all-stages` process, as `deploy/` runs
//! them; `all:N`; `six`: `--stage X`, one per stage), read a config like the one `tests/it/workers.rs` writes (azure mode
//! against the emulator, the broker under a prefix of this run's own). The nightly pipeline's
//! managed image is made once beforehand (snapshots, image, gallery, definition, through the
//! library's Azure client, with the emulated clock jumped past each operation), and every run
//! publishes from it: what `sigrun submit --image-id` starts.
//!
//! **The runs.** `SIGRUN_BENCH_RUNS` (default 10,000) runs of the nightly pipeline, versions
//! `2026.1127.1`…, each with its own plan (the planner's plan with the version's names), its own
//! `RunStarted` event and first message at `gallery-publish`, published with confirms (64 in
//! flight) by the library's `AmqpBus`. They are built with the library rather than sent as
//! triggers or by 10,000 `sigrun submit` processes: the bench is about the waiting, and a
//! process per run (planning against Azure each time) would make the set-up take far longer than
//! the measurement, with nothing of it measured. From there the workers do the pipeline's real
//! work: `gallery-publish` checks the gallery and definition and PUTs the image version (three
//! target regions, four replicas in the source region), `replicate` reads its replication status,
//! and each run then **waits on a real Azure operation**: the version's replication, about 17
//! minutes of emulated (= real) time in its source region, longer in the others. Up to
//! `runtime.held_waits` waiting runs (64) stay with the worker consuming `replicate` that looked,
//! their deliveries unacked, and are looked at again from there; every other one sits on a delay
//! tier on the broker, and each time it comes back that stage reads the version again (a GET with `$expand=ReplicationStatus` to the
//! emulator), publishes it back to a tier and acks. `SIGRUN__RUNTIME__HELD_WAITS=0` sends every
//! wait round the broker.
//!
//! **The pace of the looks** is the configured poll interval: `stages.poll_default` and
//! `stages.poll_max` are both set to `SIGRUN_BENCH_POLL_S` (default 30 s, the shipped
//! `poll_default`), so every waiting run is looked at every 30 s: 10,000 / 30 ≈ 333 looks a
//! second. With the shipped `poll_max` (10 min) `replicate` times its looks from the progress it
//! reads and looks far less often; `SIGRUN_BENCH_POLL_S=0` keeps the shipped stage settings. (Real
//! ARM would throttle 333 reads a second in one subscription long before the workers mind; the
//! emulator only reports its rate-limit headers.)
//!
//! **The measurement.** Once every run has had its first look (its `Waiting` event for
//! `replication` is in the events stream), the window starts (`SIGRUN_BENCH_WINDOW_S`, default
//! 60 s): each worker's CPU time (utime + stime from `/proc/PID/stat`) at both ends, its `VmRSS`
//! and `RssAnon` (its own part: the rest is mostly the binary's code, about 14 MiB mapped from the
//! same file by every worker on a host) every second, and its `VmHWM` (peak RSS since it started, the ramp included) at the end; the
//! emulator's request log for the window says how many looks there were. The broker's Erlang VM
//! (`beam.smp`, when it is found) and this process (emulator + event reader) are measured the same
//! way for context. At the end the events say that no run failed, completed a region or was
//! parked, and SIGTERM stops every worker with exit 0. The prefix's topology is deleted.
//!
//! With the shipped settings the looks of runs started together stay together (the second 30 s
//! after the first, the next ones up to 10 minutes later, from the progress read): a short window
//! then sees a burst or nothing, depending on where it falls; measure those with a window of a
//! whole cycle (`SIGRUN_BENCH_POLL_S=0 SIGRUN_BENCH_WINDOW_S=660`), or start the window later
//! (`SIGRUN_BENCH_SETTLE_S`, default 0).
//!
//! **Fenced runs.** By default the runs are started unfenced (no ledger token), as messages from
//! before the ledger would be: what a waiting run costs apart from fencing. With
//! `SIGRUN_BENCH_FENCED=1` each run starts as an admission would start it, with a commit in the
//! stream that makes its first message live, so every step is claimed and committed and every
//! worker's ledger keeps the run's slots, claims and spent tokens while it waits.
//!
//! `cargo bench --bench amqp_waiting`; `SIGRUN_BENCH_RUNS`, `SIGRUN_BENCH_WINDOW_S`,
//! `SIGRUN_BENCH_POLL_S`, `SIGRUN_BENCH_SETTLE_S`, `SIGRUN_BENCH_FENCED`, `SIGRUN_BENCH_WORKERS`,
//! `SIGRUN_BENCH_AMQP_URL`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sigrun::azure::AzureApi;
use sigrun::azure::api::{DefinitionRequest, ImageRequest, SnapshotRequest, Tags};
use sigrun::bus::Bus;
use sigrun::bus::amqp::AmqpBus;
use sigrun::config::Settings;
use sigrun::events::{Event, EventKind, PoolRef};
use sigrun::ledger::record::{Commit, Record, Successor};
use sigrun::model::envelope::{Artifacts, Branch, SnapshotArtifact, Stage};
use sigrun::model::ids::ImageId;
use time::OffsetDateTime;
use uuid::Uuid;

use common::control::Control;
use common::workers::{Worker, broker_pid, follow_events};
use common::{Nightly, mib};

/// Each step of the set-up (a worker starting, all runs waiting) must end within this.
const SETUP_LIMIT: Duration = Duration::from_secs(1800);
const PUBLISH_IN_FLIGHT: usize = 64;

fn main() {
    if !common::measuring("amqp_waiting") {
        return;
    }
    let options = Options {
        runs: common::env_or("SIGRUN_BENCH_RUNS", 10_000),
        window: Duration::from_secs(common::env_or("SIGRUN_BENCH_WINDOW_S", 60)),
        poll_s: common::env_or("SIGRUN_BENCH_POLL_S", 30),
        settle: Duration::from_secs(common::env_or("SIGRUN_BENCH_SETTLE_S", 0)),
        fenced: common::env_or("SIGRUN_BENCH_FENCED", 0u8) == 1,
        all_stages: common::workers::layout(),
    };
    let runtime = common::runtime();
    runtime.block_on(bench(options));
}

struct Options {
    runs: usize,
    window: Duration,
    /// Seconds between looks at a waiting run; 0 = the shipped stage settings.
    poll_s: u64,
    /// From all runs waiting to the window's start.
    settle: Duration,
    /// Start each run with an admission's commit, so its steps are fenced by the ledger.
    fenced: bool,
    /// The workers' layout (`common::workers::layout`).
    all_stages: Option<usize>,
}

async fn bench(options: Options) {
    let began = Instant::now();
    // ARM's request budget off: 10,000 runs in one subscription looked at every 30 s want 333
    // reads a second, 13 times what ARM allows, so paced they would never all wait at once in the
    // window. This bench measures what a waiting run costs the workers and the broker; the fleet
    // bench measures pacing against the budget.
    let nightly = common::nightly(1.0, None).await;
    let image = make_image(&nightly).await;
    let base = common::plan(&nightly.spec, &nightly.azure, Some(image.clone())).await;

    let prefix = common::prefix("waiting");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(&nightly, dir.path(), &prefix, options.poll_s);
    let settings = Settings::load(Some(&config)).expect("the bench config loads");
    let bus = Arc::new(common::connect(settings.amqp.clone(), settings.delay_tiers()).await);

    println!(
        "== the workers while runs wait on Azure: {} ({})",
        common::workers::describe_layout(options.all_stages),
        common::machine()
    );
    println!(
        "broker {} (prefix {prefix}); {} runs; looks {}; window {} s after {} s",
        settings.amqp.redacted_url(),
        options.runs,
        if options.poll_s == 0 {
            "paced by the shipped stage settings".to_string()
        } else {
            format!("every {} s", options.poll_s)
        },
        options.window.as_secs(),
        options.settle.as_secs()
    );
    if options.fenced {
        println!("runs fenced: each started by an admission's commit");
    }

    let mut workers = Worker::start_layout(options.all_stages, &config, dir.path()).await;

    // CPU time so far of everything measured, so the ramp's share can be told apart.
    let ticks = common::clock_ticks();
    let broker = broker_pid();
    // The broker's memory before any run: what the runs add is measured above it.
    let broker_idle = broker.map(|pid| common::status_kib(pid, "VmRSS"));
    let me = std::process::id();
    let mut measured: Vec<(String, u32)> = workers
        .iter()
        .map(|w| (format!("worker {}", w.name()), w.pid()))
        .collect();
    if let Some(pid) = broker {
        measured.push(("rabbitmq (beam.smp)".into(), pid));
    }
    measured.push(("bench process (emulator, reader)".into(), me));
    let before_ramp: Vec<Duration> = measured.iter().map(|(_, pid)| common::cpu_time(*pid, ticks)).collect();

    // The runs: RunStarted and the first message, 64 runs in flight.
    let publishing_started = Instant::now();
    let publisher = {
        let bus = Arc::clone(&bus);
        let spec = nightly.spec.clone();
        let (base, image, runs, fenced) = (base.clone(), image.clone(), options.runs, options.fenced);
        tokio::spawn(async move {
            futures_util::stream::iter(1..=runs)
                .map(|i| {
                    let bus = Arc::clone(&bus);
                    let (spec, base, image) = (&spec, &base, &image);
                    async move { start_run(bus.as_ref(), spec, base, image, i, fenced).await }
                })
                .buffer_unordered(PUBLISH_IN_FLIGHT)
                .collect::<Vec<()>>()
                .await;
            Instant::now()
        })
    };

    // Every run's first look, from the events stream.
    let mut history = History::default();
    let mut events = follow_events(&bus).await;
    let deadline = Instant::now() + SETUP_LIMIT;
    let mut last_report = Instant::now();
    while history.waiting.len() < options.runs {
        if let Ok(event) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            history.add(&event.expect("the events stream is open"));
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            println!(
                "  {:>6.1} s: {} runs started, {} waiting on replication{}",
                publishing_started.elapsed().as_secs_f64(),
                history.started.len(),
                history.waiting.len(),
                history.trouble()
            );
        }
        for worker in &mut workers {
            worker.check_alive();
        }
        assert!(
            Instant::now() < deadline,
            "not every run was waiting within {SETUP_LIMIT:?}{}",
            history.trouble()
        );
    }
    let published = publisher.await.expect("the publisher");
    let all_waiting = Instant::now();
    println!(
        "  all {} runs published in {:.1} s and waiting on replication after {:.1} s",
        options.runs,
        (published - publishing_started).as_secs_f64(),
        (all_waiting - publishing_started).as_secs_f64()
    );

    // The window, after the settling time.
    let settled = Instant::now() + options.settle;
    while Instant::now() < settled {
        if let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(1), events.recv()).await {
            history.add(&event);
        }
        for worker in &mut workers {
            worker.check_alive();
        }
    }
    let control = Control::new(&nightly.emulator);
    control.clear_log().await;
    let mut watched: Vec<Watched> = measured
        .into_iter()
        .zip(before_ramp)
        .map(|((name, pid), before)| Watched::new(name, pid, ticks, before))
        .collect();
    let replicate = workers
        .iter()
        .find(|w| w.consumes(Stage::Replicate))
        .expect("a replicate worker");
    let handled_before = replicate.handled(Stage::Replicate).await;
    let window_started = Instant::now();
    while window_started.elapsed() < options.window {
        // Keep reading the stream meanwhile, so a run that fails or finishes in the window shows.
        let second = Instant::now() + Duration::from_secs(1);
        while let Ok(Some(event)) = tokio::time::timeout_at(second.into(), events.recv()).await {
            history.add(&event);
        }
        for w in &mut watched {
            w.sample();
        }
        for worker in &mut workers {
            worker.check_alive();
        }
    }
    let window = window_started.elapsed();
    for w in &mut watched {
        w.finish(window);
    }
    let replicate = workers
        .iter()
        .find(|w| w.consumes(Stage::Replicate))
        .expect("a replicate worker");
    let handled_after = replicate.handled(Stage::Replicate).await;
    let handled: BTreeMap<String, f64> = handled_after
        .iter()
        .map(|(outcome, n)| (outcome.clone(), n - handled_before.get(outcome).copied().unwrap_or(0.0)))
        .collect();
    let requests = requests(&control).await;
    // Whatever the stream still holds from the window.
    while let Ok(event) = events.try_recv() {
        history.add(&event);
    }

    // The end: SIGTERM, exit codes, topology.
    let mut exits = Vec::new();
    for worker in &workers {
        worker.terminate();
    }
    for worker in &mut workers {
        exits.push((worker.name(), worker.wait_exit(Duration::from_secs(30)).await));
    }
    let bus = Arc::into_inner(bus).expect("the publisher let go of the bus");
    common::teardown(bus).await;
    nightly.emulator.shutdown().await;

    report(&options, &watched, &requests, &history, &exits, window);
    broker_memory_per_run(&watched, broker_idle, options.runs);
    idle_hops(&handled);
    println!("(whole bench {:.0} s)", began.elapsed().as_secs_f64());
    let failed: Vec<_> = exits.iter().filter(|(_, code)| *code != Some(0)).collect();
    assert!(failed.is_empty(), "every worker exits 0 on SIGTERM: {failed:?}");
    assert!(
        history.clean(),
        "no run may fail, finish a region or be parked while waiting{}",
        history.trouble()
    );
}

/// The shared managed image every run publishes from: the nightly plan's snapshots of the build
/// VM, then the image, the gallery and the definition, the emulated clock jumped past each.
async fn make_image(nightly: &Nightly) -> ImageId {
    let azure = &nightly.azure;
    let control = Control::new(&nightly.emulator);
    let build = nightly.plan.build.as_ref().expect("the nightly pipeline builds");
    let tags = Tags::new();
    for snapshot in &build.snapshots {
        let request = SnapshotRequest {
            location: build.region.clone(),
            source: snapshot.source.clone(),
            tags: tags.clone(),
        };
        azure.put_snapshot(&snapshot.id, &request).await.expect("snapshot");
    }
    control.advance(Duration::from_secs(2 * 3600)).await;
    let os = build.snapshots.iter().find(|s| s.lun.is_none()).expect("an OS disk");
    let request = ImageRequest {
        location: build.region.clone(),
        os_type: build.os_type.clone(),
        hyper_v_generation: build.hyper_v_generation.clone(),
        os_snapshot: os.id.clone(),
        data_snapshots: build
            .snapshots
            .iter()
            .filter_map(|s| s.lun.map(|lun| (lun, s.id.clone())))
            .collect(),
        tags: tags.clone(),
    };
    azure.put_image(&build.image, &request).await.expect("image");
    let plan = &nightly.plan;
    azure
        .put_gallery(&plan.gallery, &plan.gallery_region, &tags)
        .await
        .expect("gallery");
    control.advance(Duration::from_secs(2 * 3600)).await;
    let definition = &nightly.spec.definition;
    let request = DefinitionRequest {
        location: plan.gallery_region.clone(),
        os_type: definition.os_type.as_str().to_string(),
        os_state: definition.os_state.clone(),
        hyper_v_generation: definition.hyper_v_generation.clone(),
        publisher: definition.publisher.clone(),
        offer: definition.offer.clone(),
        sku: definition.sku.clone(),
        tags,
    };
    azure
        .put_definition(&plan.definition, &request)
        .await
        .expect("definition");
    control.advance(Duration::from_secs(3600)).await;
    let image = azure.get_image(&build.image).await.expect("read the image");
    assert_eq!(
        image.map(|i| i.provisioning_state.to_string()).as_deref(),
        Some("Succeeded"),
        "the shared image is made"
    );
    let definition = azure
        .get_definition(&plan.definition)
        .await
        .expect("read the definition");
    assert_eq!(
        definition.map(|d| d.provisioning_state.to_string()).as_deref(),
        Some("Succeeded"),
        "the definition is made"
    );
    build.image.clone()
}

/// The workers' config: the emulator's budget is off (see `bench`), so the clients' pacing is too
/// (pacing to ARM's published rates would hold the looks back to 25 reads a second all the same);
/// the looks' pace.
fn write_config(nightly: &Nightly, dir: &Path, prefix: &str, poll_s: u64) -> PathBuf {
    let mut extra = String::from("[azure.client.pacing]\nenabled = false\n");
    if poll_s != 0 {
        extra.push_str(&format!(
            "\n[stages]\npoll_default = \"{poll_s}s\"\npoll_max = \"{poll_s}s\"\n"
        ));
    }
    common::workers::write_config(&nightly.emulator, dir, prefix, 1.0, &extra)
}

/// Publishes run `i`: its `RunStarted` event, then its first message at `gallery-publish`.
/// Fenced: the event goes in a commit that makes the message live, as an admission's does.
async fn start_run(
    bus: &AmqpBus,
    spec: &sigrun::model::spec::PipelineSpec,
    base: &sigrun::model::plan::Plan,
    image: &ImageId,
    i: usize,
    fenced: bool,
) {
    let version = format!("2026.1127.{i}");
    let mut plan = common::plan_for_version(base, &version);
    if let Some(build) = plan.build.as_mut() {
        // The shared image's name came from the base version; it stays what it is.
        build.image = image.clone();
    }
    // As `sigrun submit --image-id` starts a run: the snapshots it names and the image.
    let artifacts = Artifacts {
        snapshots: plan
            .build
            .as_ref()
            .map(|b| {
                b.snapshots
                    .iter()
                    .map(|s| SnapshotArtifact {
                        lun: s.lun,
                        id: s.id.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        image: Some(image.clone()),
        ..Artifacts::default()
    };
    let mut message = common::envelope(spec, &plan, Stage::GalleryPublish, artifacts);
    let started = Event {
        run_id: message.run_id,
        pipeline: spec.name.clone(),
        version: version.clone(),
        stage: Stage::GalleryPublish,
        branch: Branch::Trunk,
        at: OffsetDateTime::now_utc(),
        kind: EventKind::RunStarted {
            rollout: false,
            regions: plan.regions.iter().map(|r| r.name.clone()).collect(),
            pools: plan
                .pools
                .iter()
                .map(|p| PoolRef {
                    region: p.region.clone(),
                    target: p.target.clone(),
                })
                .collect(),
        },
    };
    if fenced {
        let admission = Uuid::new_v4();
        (message.token, message.made_by, message.admission) = (Uuid::new_v4(), admission, admission);
        let commit = Commit {
            kept: None,
            run_id: message.run_id,
            pipeline: spec.name.clone(),
            claim: admission,
            consumed: None,
            successors: vec![Successor {
                message_id: message.message_id,
                token: message.token,
                stage: message.stage,
                branch: message.branch.clone(),
            }],
            events: vec![started],
        };
        bus.publish_record(&Record::Commit(commit))
            .await
            .expect("publish the admission's commit");
    } else {
        bus.publish_event(&started).await.expect("publish RunStarted");
    }
    bus.publish(Stage::GalleryPublish, &message.encode(), None)
        .await
        .expect("publish the first message");
}

/// What the events stream said about the runs.
#[derive(Default)]
struct History {
    started: HashSet<Uuid>,
    waiting: HashSet<Uuid>,
    /// Events that should not happen while the runs wait, by kind.
    unexpected: BTreeMap<String, u64>,
    first_unexpected: Option<String>,
}

impl History {
    fn add(&mut self, event: &Event) {
        match &event.kind {
            EventKind::RunStarted { .. } => {
                self.started.insert(event.run_id);
            }
            EventKind::Waiting { what } if what == "replication" => {
                self.waiting.insert(event.run_id);
            }
            EventKind::Waiting { .. } | EventKind::ResourceCreated { .. } => {}
            other => {
                let name = serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v["kind"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "event".into());
                *self.unexpected.entry(name).or_default() += 1;
                self.first_unexpected
                    .get_or_insert_with(|| format!("{} {}: {other:?}", event.run_id, event.stage));
            }
        }
    }

    fn clean(&self) -> bool {
        self.unexpected.is_empty()
    }

    fn trouble(&self) -> String {
        match &self.first_unexpected {
            None => String::new(),
            Some(first) => format!("; unexpected events {:?}, the first: {first}", self.unexpected),
        }
    }
}

/// A process measured over the window.
struct Watched {
    name: String,
    pid: u32,
    ticks: f64,
    cpu_before: Duration,
    /// CPU used from the first run published to the window (the settling time included).
    cpu_ramp: Duration,
    rss_max: u64,
    /// The most of its RSS that was its own (`RssAnon`): the rest is mostly the binary's code,
    /// mapped from the same file by every worker on the host and counted in each one's RSS.
    anon_max: u64,
    cpu_window: Duration,
    share: f64,
    peak: u64,
}

impl Watched {
    /// Starts watching; `before_ramp` is its CPU time when the first run was published.
    fn new(name: String, pid: u32, ticks: f64, before_ramp: Duration) -> Watched {
        let cpu_before = common::cpu_time(pid, ticks);
        Watched {
            name,
            pid,
            ticks,
            cpu_before,
            cpu_ramp: cpu_before.saturating_sub(before_ramp),
            rss_max: common::status_kib(pid, "VmRSS"),
            anon_max: common::status_kib(pid, "RssAnon"),
            cpu_window: Duration::ZERO,
            share: 0.0,
            peak: 0,
        }
    }

    fn sample(&mut self) {
        self.rss_max = self.rss_max.max(common::status_kib(self.pid, "VmRSS"));
        self.anon_max = self.anon_max.max(common::status_kib(self.pid, "RssAnon"));
    }

    fn finish(&mut self, window: Duration) {
        self.sample();
        self.cpu_window = common::cpu_time(self.pid, self.ticks).saturating_sub(self.cpu_before);
        self.share = self.cpu_window.as_secs_f64() / window.as_secs_f64();
        self.peak = common::status_kib(self.pid, "VmHWM");
    }
}

/// Requests answered since the log was cleared: (kind, count), kind = method and resource type.
async fn requests(control: &Control) -> BTreeMap<String, u64> {
    let mut kinds = BTreeMap::new();
    for entry in control.requests().await {
        let method = entry["method"].as_str().unwrap_or("");
        let path = entry["path"].as_str().unwrap_or("").to_ascii_lowercase();
        let status = entry["status"].as_u64().unwrap_or(0);
        let what = if path.contains("/versions/") {
            "image version"
        } else if path.contains("/operations/") || path.contains("operations/") {
            "operation status"
        } else if path.contains("oauth2") {
            "token"
        } else {
            "other"
        };
        let class = if (200..300).contains(&status) {
            String::new()
        } else {
            format!(" ({status})")
        };
        *kinds.entry(format!("{method} {what}{class}")).or_default() += 1;
    }
    kinds
}

/// The broker's memory per waiting run: its RSS in the window above its RSS before the first run
/// (goal ≤ 16 KB). Its peak RSS is no measure on a broker that ran before the bench.
fn broker_memory_per_run(watched: &[Watched], idle: Option<u64>, runs: usize) {
    let (Some(idle), Some(broker)) = (idle, watched.iter().find(|w| w.name.starts_with("rabbitmq"))) else {
        println!("\nbroker memory per waiting run: not measured (no broker process found)");
        return;
    };
    let added = broker.rss_max.saturating_sub(idle);
    println!(
        "\nbroker memory: {:.1} MiB before the first run, {:.1} MiB in the window: {:.1} KB per waiting run (goal ≤ 16)",
        mib(idle),
        mib(broker.rss_max),
        added as f64 / 1000.0 / runs.max(1) as f64
    );
}

/// How many of `replicate`'s deliveries in the window made no Azure call: back before they were
/// due (`early`) beside the looks that read the version and went back to wait (`waiting`).
/// Goal: early ≤ 5 % of the waiting deliveries.
fn idle_hops(handled: &BTreeMap<String, f64>) {
    let early = handled.get("early").copied().unwrap_or(0.0);
    let waiting = handled.get("waiting").copied().unwrap_or(0.0);
    let all = early + waiting;
    println!(
        "\nreplicate's waiting deliveries in the window: {all:.0}: {waiting:.0} looks (an Azure read each), \
         {early:.0} back before due with no Azure call ({:.1} %; goal ≤ 5 %)",
        if all > 0.0 { 100.0 * early / all } else { 0.0 }
    );
}

fn report(
    options: &Options,
    watched: &[Watched],
    requests: &BTreeMap<String, u64>,
    history: &History,
    exits: &[(&str, Option<i32>)],
    window: Duration,
) {
    let secs = window.as_secs_f64();
    println!();
    println!(
        "{:<34} {:>12} {:>14} {:>14} {:>12} {:>10} {:>12}",
        "process", "peak RSS", "RSS in window", "own in window", "CPU window", "of a core", "CPU ramp"
    );
    for w in watched {
        println!(
            "{:<34} {:>8.1} MiB {:>10.1} MiB {:>10.1} MiB {:>10.2} s {:>9.2} % {:>10.1} s",
            w.name,
            mib(w.peak),
            mib(w.rss_max),
            mib(w.anon_max),
            w.cpu_window.as_secs_f64(),
            100.0 * w.share,
            w.cpu_ramp.as_secs_f64()
        );
    }
    println!("(peak RSS = VmHWM since the process started; own = RssAnon, the RSS not mapped from a file: the");
    println!(" rest is mostly the binary's code, shared by every worker on the host; CPU ramp = from the first");
    println!(" run published to the window)");
    println!("\nemulator requests in the {secs:.1} s window:");
    for (kind, n) in requests {
        println!("  {n:>8}  {kind}  ({:.1}/s)", *n as f64 / secs);
    }
    let looks = requests.get("GET image version").copied().unwrap_or(0);
    // The worker that looks: `replicate`'s own, or the one consuming every stage.
    let looker = ["worker replicate", "worker all"];
    if let Some(replicate) = watched.iter().find(|w| looker.contains(&w.name.as_str()))
        && looks > 0
    {
        println!(
            "{}: {looks} looks ({:.1}/s for {} runs), {:.0} µs of CPU per look",
            replicate.name,
            looks as f64 / secs,
            options.runs,
            replicate.cpu_window.as_secs_f64() * 1e6 / looks as f64
        );
    }
    // Beside each other: what a waiting run costs the workers and the broker that holds its message.
    let worker_cpu: f64 = watched
        .iter()
        .filter(|w| w.name.starts_with("worker "))
        .map(|w| w.cpu_window.as_secs_f64())
        .sum();
    if let Some(broker) = watched.iter().find(|w| w.name.starts_with("rabbitmq")) {
        let per_run_minute = |cpu: f64| 1000.0 * cpu / options.runs as f64 / (secs / 60.0);
        // Below a clock tick of the workers' CPU a ratio says nothing.
        let ratio = if worker_cpu >= 0.01 {
            format!("{:.2}", broker.cpu_window.as_secs_f64() / worker_cpu)
        } else {
            "n/a".to_string()
        };
        println!(
            "CPU per waiting run per minute: workers {:.2} ms, broker {:.2} ms (broker / workers {ratio})",
            per_run_minute(worker_cpu),
            per_run_minute(broker.cpu_window.as_secs_f64()),
        );
    }
    println!(
        "runs: {} started, {} waiting on replication; unexpected events: {}",
        history.started.len(),
        history.waiting.len(),
        if history.clean() {
            "none".to_string()
        } else {
            format!("{:?}", history.unexpected)
        }
    );
    let codes: Vec<String> = exits
        .iter()
        .map(|(stage, code)| format!("{stage} {}", code.map_or("killed".into(), |c| c.to_string())))
        .collect();
    println!("exit codes on SIGTERM: {}", codes.join(", "));
    let workers: Vec<&Watched> = watched.iter().filter(|w| w.name.starts_with("worker ")).collect();
    let peak = workers.iter().map(|w| w.peak).max().unwrap_or(0);
    let share = workers.iter().map(|w| w.share).fold(0.0, f64::max);
    println!(
        "\nWORKERS: highest peak RSS {:.1} MiB (goal ≤ 32), highest CPU {:.2} % of a core (goal ≤ 5): {}",
        mib(peak),
        100.0 * share,
        if mib(peak) <= 32.0 && share <= 0.05 {
            "met"
        } else {
            "NOT MET"
        }
    );
}
