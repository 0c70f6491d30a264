//! Workers survive losing the broker: while a run is under way, every broker connection is closed
//! (`rabbitmqctl close_all_connections`) and then the broker itself is restarted (the node stopped
//! with `rabbitmqctl stop` and started again with `rabbitmq-server -detached`). Every worker's
//! `/readyz` must go 503 while it has no connection and 200 again within 10 s of the broker
//! accepting connections, and the run must complete.
//!
//! This disturbs every other client of the broker, so it is a binary of its own with one test:
//! `cargo test` runs test binaries one after another, so no other broker test runs meanwhile. On a
//! shared machine it also waits (bounded) until no other client is connected before it stops the
//! broker, and a guard starts the broker again if the test fails half way.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigrun::bus::amqp::StreamOffset;
use sigrun::events::{EventKind, RunResult};
use support::{Process, probe, rabbitmqctl};

/// The requirement: workers ready again within this long of the broker being back.
const BACK_WITHIN: Duration = Duration::from_secs(10);
const BROKER: &str = "127.0.0.1:5672";

fn broker_accepts() -> bool {
    let addr: SocketAddr = BROKER.parse().expect("an address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Starts the broker node in the background. Its output goes nowhere: the node outlives this
/// process and must not hold the test's (or CI's) output pipes open.
fn start_broker() -> std::io::Result<std::process::ExitStatus> {
    Command::new("rabbitmq-server")
        .arg("-detached")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

fn await_startup() -> bool {
    Command::new("rabbitmqctl")
        .args(["await_startup", "--timeout", "60"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits until the broker accepts TCP connections; returns when it did.
fn wait_broker_accepts(limit: Duration) -> Instant {
    let began = Instant::now();
    while began.elapsed() < limit {
        if broker_accepts() {
            return Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("RabbitMQ did not accept connections on {BROKER} within {limit:?} of being started");
}

/// Starts the broker again when the test ends with it down (a failure half way), so the machine is
/// left as it was found.
struct BrokerGuard;

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if !broker_accepts() {
            eprintln!("broker_restart: the broker is down; starting it again");
            let _ = start_broker();
        }
        if !await_startup() {
            eprintln!("broker_restart: RabbitMQ did not finish starting; start it with `rabbitmq-server -detached`");
        }
    }
}

/// Names of the connections open on the broker now.
fn connections() -> Vec<String> {
    rabbitmqctl(&["list_connections", "-q", "--no-table-headers", "name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// `/readyz` of one worker, sampled every 25 ms: each change of status with when it happened.
type Transitions = Arc<Mutex<Vec<(Instant, u16)>>>;

fn watch_readiness(addr: SocketAddr) -> (Transitions, tokio::task::JoinHandle<()>) {
    let transitions: Transitions = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&transitions);
    let task = tokio::spawn(async move {
        loop {
            // 0: no answer at all (which must not happen: the process stays up).
            let status = probe(addr, "/readyz").await.map_or(0, |a| a.status);
            {
                let mut seen = recorded.lock().expect("transitions lock");
                if seen.last().is_none_or(|(_, last)| *last != status) {
                    seen.push((Instant::now(), status));
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    (transitions, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_back_after_all_connections_close_and_the_broker_restarts() {
    let _guard = BrokerGuard;
    assert!(
        broker_accepts(),
        "{}",
        support::broker_down_help("nothing listens on 127.0.0.1:5672")
    );
    // Nobody else may be using the broker when it is stopped under them (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let others = connections();
        if others.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "other clients stay connected to the broker this test restarts: {others:?}"
        );
        eprintln!(
            "broker_restart: waiting for {} other connection(s) to close",
            others.len()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let mut workers: Vec<Process> = ["worker0", "worker1"]
        .iter()
        .map(|name| setup.worker(name, &["--all-stages"]))
        .collect();
    let mut watched = Vec::new();
    for worker in &mut workers {
        let addr = worker.metrics_addr().await;
        support::wait_for_status(addr, "/readyz", 200, Duration::from_secs(30), "a started worker").await;
        watched.push(watch_readiness(addr));
    }

    let run_id = setup.submit().await;
    // Under way: the first resource created, the run not ended.
    let mut reader = bus
        .read_events(StreamOffset::First)
        .await
        .expect("read the events stream");
    let limit = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let streamed = tokio::time::timeout_at(limit, reader.next())
            .await
            .expect("the run gets under way")
            .expect("the stream is open")
            .expect("an event");
        if streamed.event.run_id == run_id && matches!(streamed.event.kind, EventKind::ResourceCreated { .. }) {
            break;
        }
    }
    reader.close().await;

    // Blocking commands run off the runtime, which keeps serving the emulator and the probes.
    let closed_at = Instant::now();
    let (stop_began, stopped_at) = tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["close_all_connections", "sigrun test: every connection closed"]);
        let stop_began = Instant::now();
        rabbitmqctl(&["stop"]);
        (stop_began, Instant::now())
    })
    .await
    .expect("closing and stopping the broker");
    assert!(!broker_accepts(), "the broker is down after rabbitmqctl stop");
    let started = tokio::task::spawn_blocking(start_broker)
        .await
        .expect("starting the broker");
    assert!(
        started.as_ref().is_ok_and(|s| s.success()),
        "rabbitmq-server -detached: {started:?}"
    );
    let back_at = tokio::task::spawn_blocking(|| wait_broker_accepts(Duration::from_secs(120)))
        .await
        .expect("waiting for the broker");
    let booted = tokio::task::spawn_blocking(await_startup)
        .await
        .expect("rabbitmqctl await_startup");
    assert!(booted, "the restarted broker finished booting");
    eprintln!(
        "broker: connections closed, node stopped in {:.2} s, accepting again {:.2} s after the start (down {:.2} s in all)",
        (stopped_at - stop_began).as_secs_f64(),
        (back_at - stopped_at).as_secs_f64(),
        (back_at - closed_at).as_secs_f64()
    );

    // Every worker: not ready while cut off, ready again within BACK_WITHIN of the broker's return.
    let mut slowest = Duration::ZERO;
    for (i, (transitions, _)) in watched.iter().enumerate() {
        let ready_again = loop {
            let seen = transitions.lock().expect("transitions lock").clone();
            let ready = seen
                .iter()
                .find(|(at, status)| *at > back_at && *status == 200)
                .map(|(at, _)| *at);
            if let Some(at) = ready {
                break at;
            }
            assert!(
                back_at.elapsed() < BACK_WITHIN + Duration::from_secs(20),
                "worker{i} never ready again: {:?}{}",
                relative(&seen, closed_at),
                workers[i].report()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let seen = transitions.lock().expect("transitions lock").clone();
        assert!(
            seen.iter().any(|(at, s)| *at > closed_at && *at < back_at && *s == 503),
            "worker{i}'s /readyz said 503 while the broker was gone: {:?}",
            relative(&seen, closed_at)
        );
        assert!(
            seen.iter().all(|(_, s)| *s != 0),
            "worker{i} stayed up and answered every probe: {:?}",
            relative(&seen, closed_at)
        );
        let took = ready_again.saturating_duration_since(back_at);
        eprintln!(
            "worker{i}: /readyz 200 {:.2} s after the broker was back; transitions (s since the close): {:?}",
            took.as_secs_f64(),
            relative(&seen, closed_at)
        );
        assert!(
            took <= BACK_WITHIN,
            "worker{i} ready {took:?} after the broker was back"
        );
        slowest = slowest.max(took);
    }
    eprintln!("slowest worker back: {:.2} s after the broker", slowest.as_secs_f64());

    let (result, history) = support::wait_for_run(&bus, run_id, &workers).await;
    let logs: String = workers.iter().map(Process::report).collect();
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{logs}");
    for (_, task) in &watched {
        task.abort();
    }
    for worker in &mut workers {
        worker.stop().await;
    }
    support::delete_topology(bus, &settings).await;
}

/// Transitions as (seconds since `origin`, status), for messages.
fn relative(seen: &[(Instant, u16)], origin: Instant) -> Vec<(f64, u16)> {
    seen.iter()
        .map(|(at, s)| {
            let secs = if *at >= origin {
                (*at - origin).as_secs_f64()
            } else {
                -(origin - *at).as_secs_f64()
            };
            ((secs * 100.0).round() / 100.0, *s)
        })
        .collect()
}
