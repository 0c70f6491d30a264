//! How fast the web page answers with a long history: the runs page (`/`) and one run's page
//! (`/runs/{id}`) over 10,000 runs in the index, each run 40 events (a nightly's trunk, two pools,
//! waits and retries). Goals: the runs page under 200 ms, a run page under 50 ms.
//!
//! The index is built in this process (the same `RunIndex::apply` the server feeds from the events
//! stream), then the pages are rendered as the handlers render them, `SIGRUN_BENCH_REPEAT` times
//! (default 20) each; the table prints the median and the worst. Rendering is all a request does
//! besides a read lock, so this is a request's cost without the socket.
//! `SIGRUN_BENCH_RUNS` changes the history's size. Run with `cargo bench --bench ui_pages`.

use std::time::{Duration, Instant};

use sigrun::events::{Event, EventKind, PoolRef};
use sigrun::model::envelope::{Branch, Stage};
use sigrun::ui::index::{Filter, RunIndex};
use sigrun::ui::pages;
use time::OffsetDateTime;
use uuid::Uuid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One nightly's 40 events, starting at `start`.
fn run_events(n: usize, start: OffsetDateTime) -> Vec<Event> {
    let run_id = Uuid::from_u128(n as u128 + 1);
    let pool = |region: &str, target: &str| Branch::Pool {
        region: region.into(),
        target: target.into(),
    };
    let at = |s: i64| start + time::Duration::seconds(s);
    let event = |s: i64, stage: Stage, branch: Branch, kind: EventKind| Event {
        run_id,
        pipeline: if n.is_multiple_of(3) {
            "windows-nightly"
        } else {
            "nightly-ubuntu"
        }
        .into(),
        version: format!("2026.{}.0", 1000 + n),
        stage,
        branch,
        at: at(s),
        kind,
    };
    let mut events = vec![event(
        0,
        Stage::Snapshot,
        Branch::Trunk,
        EventKind::RunStarted {
            regions: vec!["westeurope".into(), "eastus".into()],
            pools: vec![
                PoolRef {
                    region: "westeurope".into(),
                    target: "render".into(),
                },
                PoolRef {
                    region: "eastus".into(),
                    target: "sim".into(),
                },
            ],
            rollout: true,
        },
    )];
    for (i, stage) in [
        Stage::Snapshot,
        Stage::ImageCreate,
        Stage::GalleryPublish,
        Stage::Replicate,
    ]
    .into_iter()
    .enumerate()
    {
        let s = 60 * i as i64;
        events.push(event(
            s + 1,
            stage,
            Branch::Trunk,
            EventKind::Waiting { what: "x".into() },
        ));
        events.push(event(
            s + 2,
            stage,
            Branch::Trunk,
            EventKind::Retried {
                attempt: 1,
                error: "HTTP 429".into(),
            },
        ));
        events.push(event(
            s + 3,
            stage,
            Branch::Trunk,
            EventKind::ResourceCreated {
                id: format!("/subscriptions/s/r/{n}-{i}"),
            },
        ));
    }
    for region in ["westeurope", "eastus"] {
        events.push(event(
            300,
            Stage::Replicate,
            Branch::Trunk,
            EventKind::RegionCompleted { region: region.into() },
        ));
    }
    for (region, target) in [("westeurope", "render"), ("eastus", "sim")] {
        for k in 0..10 {
            let stage = if k < 3 { Stage::PoolCreate } else { Stage::Verify };
            events.push(event(
                310 + 10 * k,
                stage,
                pool(region, target),
                EventKind::Waiting { what: "nodes".into() },
            ));
        }
        events.push(event(
            420,
            Stage::Verify,
            pool(region, target),
            EventKind::PoolVerified {
                pool_id: format!("{target}-{n}"),
            },
        ));
        events.push(event(
            430,
            Stage::Verify,
            pool(region, target),
            EventKind::RolloutFinished,
        ));
    }
    events.truncate(40);
    events
}

fn timed(repeat: usize, mut render: impl FnMut() -> usize) -> (Duration, Duration, usize) {
    let mut times: Vec<Duration> = Vec::with_capacity(repeat);
    let mut bytes = 0;
    for _ in 0..repeat {
        let started = Instant::now();
        bytes = render();
        times.push(started.elapsed());
    }
    times.sort_unstable();
    (times[times.len() / 2], times[times.len() - 1], bytes)
}

fn main() {
    let runs = env_usize("SIGRUN_BENCH_RUNS", 10_000);
    let repeat = env_usize("SIGRUN_BENCH_REPEAT", 20).max(1);
    let mut index = RunIndex::default();
    let base = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
    let built = Instant::now();
    for n in 0..runs {
        for event in run_events(n, base + time::Duration::minutes(n as i64)) {
            index.apply(event);
        }
    }
    println!(
        "index: {runs} runs × 40 events folded in {:.2} s",
        built.elapsed().as_secs_f64()
    );
    let all = Filter::default();
    let runs_page = timed(repeat, || {
        pages::runs_page(&index.recent(&all, 200), &index.pipelines(), &all).len()
    });
    let one = Uuid::from_u128(runs as u128 / 2 + 1);
    let run_page = timed(repeat, || {
        pages::run_page(index.run(&one).expect("the run"), Some(Ok(Vec::new())), false).len()
    });
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>8}",
        "page", "median", "worst", "goal", "bytes"
    );
    for (name, (median, worst, bytes), goal) in [("runs (/)", runs_page, 200), ("run (/runs/{id})", run_page, 50)] {
        println!(
            "{name:<22} {:>8.2}ms {:>8.2}ms {:>8}ms {bytes:>8}",
            median.as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3,
            goal
        );
    }
}
