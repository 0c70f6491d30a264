//! Chaos: overlapping runs of the nightly pipeline (distinct versions, some triggered twice) on a
//! worker process per stage and two consuming every stage (which step on within themselves, as
//! `deploy/` runs them), against the emulator injecting about one fault in five (429
//! with Retry-After, 500, 503, connections reset after the request took effect), while workers are
//! killed with SIGKILL every few seconds (and replaced), every broker connection is closed, and the
//! broker node is restarted — on a private RabbitMQ node of the test's own, with a fleet changing
//! fencing (the workers started claim first and commit first in turn). Then the same on a
//! three-node cluster of private nodes (quorum queues replicated on all three), one node killed
//! mid-run and started again. A `sigrun submit` that fails on an injected fault (its reads outlast
//! the client's retries) is tried again, as a producer would.
//!
//! What must hold, whatever happened: every run succeeds; one run per version (one `run_started`);
//! nothing created twice (the emulator's log; with workers committing first, twice by two
//! processes at most, two copies of a step stepping at once); in each account exactly the pools the runs planned;
//! no process asks a run's resource again before the Retry-After its 429 gave that process;
//! nothing parked; each (run, branch, stage) worked from one message id (the workers' logs); no
//! event recorded twice for a branch but retries; every worker still running exits 0 on SIGTERM.
//! The figures are printed.
//!
//! Sizes: `SIGRUN_CHAOS_RUNS` (default 4: what CI runs), `SIGRUN_CHAOS_KILL_EVERY_MS` (default
//! 2500), `SIGRUN_CHAOS_SEED`; `SIGRUN_CHAOS_FENCING` the cluster's fencing (default
//! `claim_first`, the shipped one). `SIGRUN_CHAOS_RUNS=20` is the size the closing notes quote.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use sigrun::events::{Event, EventKind, RunResult};
use sigrun::model::envelope::Stage;
use support::rabbit::RabbitNode;
use support::{Process, Setup};
use tokio::sync::Mutex;
use uuid::Uuid;

/// The two scenarios share the machine's two cores: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const FAULTS: &str = "429:p=0.05,retry_after=0.5;500:p=0.05;503:p=0.05;reset:p=0.05";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What happened to the system while the runs ran.
#[derive(Default, Debug)]
struct Disturbed {
    kills: usize,
    replacements: usize,
    connections_closed: usize,
    node_restarts: usize,
    nodes_killed: usize,
}

/// The workers and the replacements of the killed ones: one per stage, and two consuming every
/// stage (as `deploy/` runs them, stepping on within a process); each started with the next of
/// `configs` in turn (one per fencing, so a mixed fleet has both at every stage). A killed worker
/// is replaced by one of its own kind (`None`: all stages).
struct Fleet {
    setup: Arc<Setup>,
    configs: Vec<std::path::PathBuf>,
    alive: Vec<(Option<Stage>, Process)>,
    dead: Vec<Process>,
    started: usize,
}

impl Fleet {
    fn start(setup: Arc<Setup>, configs: Vec<std::path::PathBuf>) -> Fleet {
        let mut fleet = Fleet {
            setup,
            configs,
            alive: Vec::new(),
            dead: Vec::new(),
            started: 0,
        };
        for stage in Stage::ALL {
            fleet.spawn(Some(stage));
        }
        for _ in 0..2 {
            fleet.spawn(None);
        }
        fleet
    }

    fn spawn(&mut self, stage: Option<Stage>) {
        self.started += 1;
        let mut args = match stage {
            Some(stage) => vec!["--stage", stage.as_str()],
            None => vec!["--all-stages"],
        };
        args.extend(["--log", "warn,sigrun::runtime=debug", "--log-format", "json"]);
        let name = format!("{}-{}", stage.map_or("all", Stage::as_str), self.started);
        let config = &self.configs[self.started % self.configs.len()];
        let process = self.setup.worker_with_config(&name, config, &args);
        self.alive.push((stage, process));
    }

    /// SIGKILL to a random worker, and a replacement for its stage.
    async fn kill_one(&mut self, rng: &mut ChaCha8Rng) {
        let index = rng.random_range(0..self.alive.len());
        let (stage, mut victim) = self.alive.swap_remove(index);
        victim.signal("KILL");
        let _ = victim.wait(Duration::from_secs(10)).await;
        self.dead.push(victim);
        self.spawn(stage);
    }

    fn all(&self) -> impl Iterator<Item = &Process> {
        self.alive.iter().map(|(_, p)| p).chain(self.dead.iter())
    }

    fn report(&self) -> String {
        self.alive.iter().map(|(_, p)| p.report()).collect()
    }

    /// For a stall: each worker's last log lines about copies it put off or dropped, where a
    /// message that cycles without end shows itself, and its last warnings (a relay that could not
    /// send a due message on, a connection lost).
    fn put_off_report(&self) -> String {
        let mut report = String::new();
        for process in self.all() {
            let text = process.stdout_text() + &process.stderr_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("putting this copy off") || l.contains("stale copy") || l.contains("\"WARN\""))
                .collect();
            report.push_str(&format!("\n== {} ({} lines)\n", process.stdout.display(), lines.len()));
            for line in lines.iter().rev().take(8).rev() {
                report.push_str(&line.chars().take(700).collect::<String>());
                report.push('\n');
            }
        }
        report
    }
}

/// Publishes the runs' triggers, all at once: each version once, every other one a second time.
async fn submit_all(setup: &Setup, versions: &[String]) -> BTreeMap<String, Uuid> {
    let submits = versions
        .iter()
        .enumerate()
        .flat_map(|(i, version)| std::iter::repeat_n(version, if i % 2 == 0 { 2 } else { 1 }))
        .map(|version| async move { (version.clone(), setup.submit_version_retrying(version, 3).await) });
    let mut runs: BTreeMap<String, Uuid> = BTreeMap::new();
    for (version, run) in futures_util::future::join_all(submits).await {
        let known = *runs.entry(version.clone()).or_insert(run);
        assert_eq!(known, run, "{version}: the same version is the same run");
    }
    runs
}

/// Follows every run to its end; returns each run's history.
async fn wait_all(
    bus: &sigrun::bus::amqp::AmqpBus,
    runs: &BTreeMap<String, Uuid>,
) -> BTreeMap<String, (RunResult, Vec<Event>)> {
    let mut ended = BTreeMap::new();
    for (version, run) in runs {
        let (result, history) = support::wait_for_run(bus, *run, &[]).await;
        ended.insert(version.clone(), (result, history));
    }
    ended
}

/// Every check of the module's header, on what the runs left behind.
async fn check(
    setup: &Setup,
    runs: &BTreeMap<String, Uuid>,
    ended: &BTreeMap<String, (RunResult, Vec<Event>)>,
    fleet: &Fleet,
    copies_overlap: bool,
) -> Figures {
    let mut figures = Figures::default();
    for (version, (result, history)) in ended {
        assert_eq!(
            *result,
            RunResult::Succeeded,
            "{version}: {history:#?}{}",
            fleet.report()
        );
        let started = history
            .iter()
            .filter(|e| matches!(e.kind, EventKind::RunStarted { .. }))
            .count();
        assert_eq!(started, 1, "{version}: one admission");
        figures.dropped += history
            .iter()
            .filter(|e| matches!(e.kind, EventKind::DuplicateDropped { .. }))
            .count();
        figures.duplicate_triggers += history
            .iter()
            .filter(|e| matches!(e.kind, EventKind::DuplicateTrigger { .. }))
            .count();
        assert_each_event_once(version, history);
    }
    figures.succeeded = ended.len();
    setup.emu.set_faults("").await;
    let log = setup.emu.requests().await;
    figures.requests = log.len();
    figures.faults = log.iter().filter(|e| !e["fault"].is_null()).count();
    let logged = |what: &str| -> usize {
        fleet
            .all()
            .map(|p| (p.stdout_text() + &p.stderr_text()).matches(what).count())
            .sum()
    };
    figures.put_back = logged("could not be sent on");
    figures.carried_back = logged("carrying on the wait its step kept");
    assert_nothing_created_twice(&log, copies_overlap);
    assert_retry_after_honoured(&log);
    assert_pools_as_planned(setup, runs.len()).await;
    assert_one_message_per_step(fleet);
    figures
}

#[derive(Default, Debug)]
struct Figures {
    succeeded: usize,
    dropped: usize,
    duplicate_triggers: usize,
    requests: usize,
    faults: usize,
    /// Due messages a relay could not send on (the broker refused or the link broke) and put
    /// back on their tier, from the workers' logs.
    put_back: usize,
    /// Waits kept with a delivery that came back, carried on from the history by its next taker.
    carried_back: usize,
}

fn assert_each_event_once(version: &str, history: &[Event]) {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for event in history {
        if matches!(
            event.kind,
            EventKind::Retried { .. }
                | EventKind::Throttled { .. }
                // A note, not a record: two live copies of a waiting message may both say they wait.
                | EventKind::Waiting { .. }
                | EventKind::DuplicateDropped { .. }
                | EventKind::DuplicateTrigger { .. }
        ) {
            continue;
        }
        let key = format!(
            "{} {} {}",
            event.branch.label(),
            event.stage,
            serde_json::to_string(&event.kind).expect("events serialize")
        );
        *seen.entry(key).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "{version}: recorded more than once: {repeated:#?}");
}

/// Each resource PUT answered "created" at most once, each pool added once. A fleet with workers
/// committing first (`copies_overlap`) is allowed one exception per resource: two copies of one
/// step, delivered to two processes at the same time, may both step, and both ask Azure to make
/// what the step makes (claiming first is what keeps a second copy from stepping while one does).
/// Even then a resource is made by at most two requests, from two different processes: a process
/// making a resource twice is a repeated step that did not find what its earlier try made.
fn assert_nothing_created_twice(log: &[Value], copies_overlap: bool) {
    let mut created: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in log {
        let path = entry["path"].as_str().unwrap_or_default().to_ascii_lowercase();
        let status = entry["status"].as_u64().unwrap_or(0);
        let made = (entry["method"] == "PUT" && (status == 201 || status == 202))
            || (entry["method"] == "POST" && status == 201 && path.ends_with("/pools"));
        if made {
            let key = if path.ends_with("/pools") {
                format!("{path} #{}", entry["request_id"])
            } else {
                path
            };
            let by = entry["user_agent"].as_str().unwrap_or_default().to_string();
            created.entry(key).or_default().push(by);
        }
    }
    let overlapping = |by: &Vec<String>| by.len() == 2 && by[0] != by[1];
    let twice: Vec<_> = created
        .iter()
        .filter(|(_, by)| by.len() > 1 && !(copies_overlap && overlapping(by)))
        .collect();
    assert!(twice.is_empty(), "created twice: {twice:#?}");
    let overlapped = created.values().filter(|by| by.len() > 1).count();
    if overlapped > 0 {
        eprintln!("chaos: {overlapped} resources made by two copies of one step stepping at once");
    }
}

/// After a 429 on a run's own resource (its version, snapshots, image, pools, operations), the
/// process it answered (its `User-Agent` names the instance) does not ask the same path again
/// before the Retry-After it gave. (Another worker process may: it was not told, and Azure's
/// Retry-After is an answer to one client.)
fn assert_retry_after_honoured(log: &[Value]) {
    let own = |path: &str| {
        path.contains("2026-11") || path.contains("2026.11") || path.to_ascii_lowercase().contains("operations/")
    };
    for (i, e) in log.iter().enumerate().filter(|(_, e)| e["status"] == 429) {
        let path = e["path"].as_str().unwrap_or_default();
        if !own(path) {
            continue;
        }
        let wait = e["retry_after_ms"].as_f64().unwrap_or(0.0);
        // The process's next request of the path that arrived after the 429 was sent: one that
        // arrived before it (slowed by a fault, or just in flight beside it) was on its way
        // before the process could read the 429.
        let answered = e["elapsed_ms"].as_f64().unwrap_or(0.0);
        let Some(next) = log[i + 1..].iter().find(|n| {
            n["path"] == e["path"]
                && n["user_agent"] == e["user_agent"]
                && n["received_ms"].as_f64().unwrap_or(0.0) >= answered
        }) else {
            continue;
        };
        let gap = next["received_ms"].as_f64().unwrap_or(0.0) - answered;
        assert!(
            gap >= wait,
            "{path} asked again by {} {gap:.1} ms after a 429 with Retry-After {wait} ms",
            e["user_agent"]
        );
    }
}

/// Each account holds one pool per run: the render pools in westeurope, the sim pools in eastus.
async fn assert_pools_as_planned(setup: &Setup, runs: usize) {
    for (account, target) in [("sigrunweu", "render"), ("sigruneus", "sim")] {
        let token = setup.emu.batch_token().await;
        let url = format!(
            "{}/pools?api-version={}",
            setup.emu.batch_url(account),
            helpers::BATCH_API
        );
        let reply = setup.emu.get(&url, &token).await;
        let ids: Vec<&str> = reply.body["value"]
            .as_array()
            .map(|pools| pools.iter().filter_map(|p| p["id"].as_str()).collect())
            .unwrap_or_default();
        let ours = ids.iter().filter(|id| id.contains(&format!("-{target}-"))).count();
        assert_eq!(ours, runs, "{account}: one {target} pool per run: {ids:?}");
    }
}

/// From the workers' logs: each (run, branch, stage) was worked from one message id.
fn assert_one_message_per_step(fleet: &Fleet) {
    let mut ids: BTreeMap<(String, String, String), BTreeSet<String>> = BTreeMap::new();
    let mut lines = 0;
    for process in fleet.all() {
        for line in process.stderr_text().lines() {
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if entry["message"] != "stepped" {
                continue;
            }
            lines += 1;
            let field = |k: &str| entry[k].as_str().unwrap_or_default().to_string();
            ids.entry((field("run_id"), field("branch"), field("stage")))
                .or_default()
                .insert(field("message_id"));
        }
    }
    assert!(lines > 0, "the workers logged their steps");
    let several: Vec<_> = ids.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(several.is_empty(), "worked from several message ids: {several:#?}");
}

/// What remains parked under the prefix.
async fn parked(bus: &sigrun::bus::amqp::AmqpBus) -> usize {
    let browser = bus.browse_parked(1000).await.expect("browse the parked messages");
    let n = browser.messages().len();
    browser.close().await;
    n
}

/// A config for the chaos runs: the fencing, a short claim timeout (a killed holder's step is
/// taken over soon, claiming first), and the cluster's other nodes.
fn chaos_config(setup: &Setup, url: &str, others: &[String], fencing: &str) -> std::path::PathBuf {
    let base = setup.write_config("chaos-base.toml", url, helpers::PIPELINE_APP.1);
    let mut text = std::fs::read_to_string(&base).expect("the base config");
    text = text.replace(
        "[runtime]\n",
        &format!("[runtime]\nclaim_timeout_ms = 5000\nfencing = \"{fencing}\"\n"),
    );
    let cluster: Vec<String> = others.iter().map(|u| format!("\"{u}\"")).collect();
    text.push_str(&format!("cluster_urls = [{}]\n", cluster.join(", ")));
    let path = setup.dir.join(format!("chaos-{fencing}.toml"));
    std::fs::write(&path, text).expect("write the chaos config");
    path
}

/// What a scenario needs of its broker besides disturbing it: where its queues stand (printed
/// when runs stall) and putting it back whole once the runs have ended.
struct BrokerHooks<R, S> {
    report: R,
    restore: S,
}

/// Runs the scenario with a fleet of the `fencings` given (the first also reads the results):
/// `disturb` is called every kill interval with the elapsed share of the expected run time, and
/// does the broker's part.
async fn scenario(
    name: &str,
    url: String,
    others: Vec<String>,
    fencings: &[&str],
    mut disturb: impl FnMut(f64, &mut Disturbed),
    broker: BrokerHooks<impl Fn() -> String, impl FnOnce()>,
) {
    let runs = env_number("SIGRUN_CHAOS_RUNS", 4) as usize;
    let kill_every = Duration::from_millis(env_number("SIGRUN_CHAOS_KILL_EVERY_MS", 2500));
    let seed = env_number("SIGRUN_CHAOS_SEED", 7);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let setup = Arc::new(support::setup_scaled_on(FAULTS, &url, 100.0).await);
    let configs: Vec<_> = fencings
        .iter()
        .map(|fencing| chaos_config(&setup, &url, &others, fencing))
        .collect();
    let (bus, settings) = support::test_bus(&configs[0]).await;
    let mut fleet = Fleet::start(Arc::clone(&setup), configs);
    let versions: Vec<String> = (1..=runs).map(|n| format!("2026.1126.{n}")).collect();
    let began = Instant::now();
    let run_ids = submit_all(&setup, &versions).await;
    let mut disturbed = Disturbed::default();
    // Disturb while the runs run: a run takes about 40 s here undisturbed, more when many overlap.
    let expected = Duration::from_secs(45 + 2 * runs as u64);
    let mut following = Box::pin(wait_all(&bus, &run_ids));
    let mut reported_stall = false;
    let ended = loop {
        tokio::select! {
            ended = &mut following => break ended,
            () = tokio::time::sleep(kill_every) => {}
        }
        let share = began.elapsed().as_secs_f64() / expected.as_secs_f64();
        if share > 2.5 && !reported_stall {
            // Runs this late are stuck somewhere: say where the broker holds their messages.
            reported_stall = true;
            eprintln!(
                "chaos {name}: runs not ended after {:?}; the broker's queues:\n{}\nthe workers' put-off and dropped copies:{}",
                began.elapsed(),
                (broker.report)(),
                fleet.put_off_report()
            );
        }
        if share < 1.5 {
            fleet.kill_one(&mut rng).await;
            disturbed.kills += 1;
            disturbed.replacements += 1;
            disturb(share, &mut disturbed);
        }
    };
    drop(following);
    // The broker whole again (a node killed late may not be back yet) before checking and cleaning up.
    (broker.restore)();
    let copies_overlap = fencings.contains(&"commit_first");
    let figures = check(&setup, &run_ids, &ended, &fleet, copies_overlap).await;
    let left_parked = parked(&bus).await;
    assert_eq!(left_parked, 0, "nothing parked");
    let took = began.elapsed();
    let mut exit_codes = Vec::new();
    for (_, worker) in &mut fleet.alive {
        worker.signal("TERM");
        exit_codes.push(worker.wait(Duration::from_secs(30)).await);
    }
    assert!(
        exit_codes.iter().all(|c| *c == Some(0)),
        "every worker exits 0 on SIGTERM: {exit_codes:?}"
    );
    eprintln!(
        "chaos {name} (seed {seed}, fencing {fencings:?}): {}/{} runs succeeded in {:.0} s; {} workers killed and replaced, {} connection closes, {} node restarts, {} nodes killed; {} stale copies dropped, {} duplicate triggers; {} of {} requests faulted; {} due messages put back on their tier by a relay; {} kept waits carried on after their delivery came back; {} parked",
        figures.succeeded,
        runs,
        took.as_secs_f64(),
        disturbed.kills,
        disturbed.connections_closed,
        disturbed.node_restarts,
        disturbed.nodes_killed,
        figures.dropped,
        figures.duplicate_triggers,
        figures.faults,
        figures.requests,
        figures.put_back,
        figures.carried_back,
        left_parked,
    );
    support::delete_topology(bus, &settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_one_node() {
    let _one = ONE_AT_A_TIME.lock().await;
    let node = Arc::new(
        tokio::task::spawn_blocking(|| RabbitNode::start("sigrun-chaos"))
            .await
            .expect("a private node"),
    );
    let url = node.url();
    let report_node = Arc::clone(&node);
    let (mut closed, mut restarted) = (false, false);
    // A fleet changing over: at every stage one worker claims first and one commits first.
    scenario(
        "on one node",
        url,
        Vec::new(),
        &["commit_first", "claim_first"],
        |share, disturbed| {
            if share > 0.3 && !closed {
                closed = true;
                node.close_all_connections("sigrun chaos: every connection closed");
                disturbed.connections_closed += 1;
            } else if share > 0.6 && !restarted {
                restarted = true;
                node.stop();
                node.start_again();
                disturbed.node_restarts += 1;
            }
        },
        BrokerHooks {
            report: || report_node.queue_report(),
            restore: || {},
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_a_three_node_cluster_with_a_node_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let nodes = tokio::task::spawn_blocking(|| {
        let seed = RabbitNode::start("sigrun-chaos-a");
        let b = RabbitNode::start("sigrun-chaos-b");
        let c = RabbitNode::start("sigrun-chaos-c");
        b.join(&seed);
        c.join(&seed);
        [seed, b, c]
    })
    .await
    .expect("a three-node cluster");
    let members = nodes[0].ctl(&["cluster_status", "--formatter", "json"]);
    assert!(
        nodes.iter().all(|n| members.contains(&n.name)),
        "all three nodes in one cluster: {members}"
    );
    let nodes = Arc::new(nodes);
    let url = nodes[0].url();
    let others = vec![nodes[1].url(), nodes[2].url()];
    let (mut killed, mut back) = (false, false);
    let cluster = Arc::clone(&nodes);
    // The shipped fencing, or the one `SIGRUN_CHAOS_FENCING` names (the one-node scenario runs
    // both at once).
    let fencing = std::env::var("SIGRUN_CHAOS_FENCING").unwrap_or_else(|_| "claim_first".into());
    scenario(
        "on a three-node cluster",
        url,
        others,
        &[fencing.as_str()],
        move |share, disturbed| {
            // The node the workers connect to first (and where the queues were declared) dies.
            if share > 0.3 && !killed {
                killed = true;
                cluster[0].kill();
                disturbed.nodes_killed += 1;
            } else if share > 0.8 && !back {
                back = true;
                cluster[0].start_again();
                disturbed.node_restarts += 1;
            }
        },
        BrokerHooks {
            report: || nodes.iter().filter(|n| n.running()).map(|n| n.queue_report()).collect(),
            restore: || {
                if !nodes[0].running() {
                    nodes[0].start_again();
                }
            },
        },
    )
    .await;
}
