//! Workers survive losing the broker, on a private RabbitMQ node of the test's own (never the
//! shared one at 127.0.0.1:5672):
//!
//! - while a run is under way every connection is closed and the node is stopped and started
//!   again: every worker's `/readyz` goes 503 while it has no connection and 200 again within 10 s
//!   of the node accepting connections, and the run completes;
//! - a worker started while the node is down (connection refused) keeps trying with backoff, says
//!   503 on `/readyz`, never exits, and is ready and working within 10 s of the node coming back.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sigrun::bus::amqp::StreamOffset;
use sigrun::events::{EventKind, RunResult};
use support::rabbit::RabbitNode;
use support::{Process, probe};

/// The requirement: workers ready again within this long of the broker being back.
const BACK_WITHIN: Duration = Duration::from_secs(10);

fn accepts(node: &RabbitNode) -> bool {
    let addr: SocketAddr = format!("127.0.0.1:{}", node.amqp_port).parse().expect("an address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
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

/// A node started again: when its start command began, and when it returned.
struct Restart {
    starting: Instant,
    back: Instant,
}

/// Starts `node` again (off the runtime, which keeps serving the emulator and the probes).
async fn start_again(node: &Arc<RabbitNode>) -> Restart {
    let starting = Instant::now();
    let node = Arc::clone(node);
    tokio::task::spawn_blocking(move || node.start_again())
        .await
        .expect("starting the node again");
    Restart {
        starting,
        back: Instant::now(),
    }
}

/// Waits until a worker's `/readyz` turns 200 after the node's start began; returns how long
/// after the start command returned. The node accepts connections before its last boot step
/// ends, so a worker may be back a moment before the command returns: that took no time at all.
/// A 200 from before the start (the worker never noticed the node was gone) does not count.
async fn ready_after(transitions: &Transitions, restart: &Restart, worker: &Process, closed_at: Instant) -> Duration {
    loop {
        let seen = transitions.lock().expect("transitions lock").clone();
        if let Some((at, _)) = seen
            .iter()
            .find(|(at, status)| *at >= restart.starting && *status == 200)
        {
            return at.saturating_duration_since(restart.back);
        }
        assert!(
            restart.back.elapsed() < BACK_WITHIN + Duration::from_secs(20),
            "{} never ready again: {:?}{}",
            worker.command,
            relative(&seen, closed_at),
            worker.report()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_come_back_after_all_connections_close_and_the_broker_restarts() {
    let node = tokio::task::spawn_blocking(|| RabbitNode::start("sigrun-restart"))
        .await
        .expect("a private node");
    let setup = support::setup_on("", &node.url()).await;
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
    let node = Arc::new(node);
    let stopping = Arc::clone(&node);
    let (stop_began, stopped_at) = tokio::task::spawn_blocking(move || {
        stopping.close_all_connections("sigrun test: every connection closed");
        let stop_began = Instant::now();
        stopping.stop();
        (stop_began, Instant::now())
    })
    .await
    .expect("closing and stopping the node");
    assert!(!accepts(&node), "the node is down after it was stopped");
    let restart = start_again(&node).await;
    let back_at = restart.back;
    eprintln!(
        "broker: connections closed, node stopped in {:.2} s, down {:.2} s in all",
        (stopped_at - stop_began).as_secs_f64(),
        (back_at - closed_at).as_secs_f64()
    );

    // Every worker: not ready while cut off, ready again within BACK_WITHIN of the broker's return.
    let mut slowest = Duration::ZERO;
    for (i, (transitions, _)) in watched.iter().enumerate() {
        let took = ready_after(transitions, &restart, &workers[i], closed_at).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_the_broker_is_down_waits_for_it_and_never_exits() {
    let node = tokio::task::spawn_blocking(|| {
        let node = RabbitNode::start("sigrun-late");
        node.stop();
        node
    })
    .await
    .expect("a private node, stopped");
    let setup = support::setup_on("", &node.url()).await;
    let mut worker = setup.worker("late", &["--all-stages"]);
    let addr = worker.metrics_addr().await;
    let (transitions, watching) = watch_readiness(addr);
    let started_at = Instant::now();
    // Refused connections for a while: the worker stays up and not ready.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        worker.child.try_wait().expect("wait").is_none(),
        "the worker must not exit while the broker is down{}",
        worker.report()
    );
    let seen = transitions.lock().expect("transitions lock").clone();
    assert!(
        !seen.is_empty() && seen.iter().all(|(_, s)| *s == 503),
        "/readyz says 503 while the broker is down: {:?}",
        relative(&seen, started_at)
    );
    let node = Arc::new(node);
    let restart = start_again(&node).await;
    let took = ready_after(&transitions, &restart, &worker, started_at).await;
    eprintln!(
        "a worker started with the broker down: ready {:.2} s after it came back",
        took.as_secs_f64()
    );
    assert!(took <= BACK_WITHIN, "ready {took:?} after the broker was back");

    // And it works: a run submitted now completes.
    let (bus, settings) = support::test_bus(&setup.config).await;
    let run_id = setup.submit().await;
    let (result, history) = support::wait_for_run(&bus, run_id, std::slice::from_ref(&worker)).await;
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{}", worker.report());
    watching.abort();
    worker.stop().await;
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
