//! The metrics of the contract as real worker processes export them after a real run: two workers
//! (all stages) on the real broker and the emulator run the nightly pipeline; afterwards each
//! worker's `/metrics` agrees with the run — the run-level metrics (folded from the shared events
//! stream) are the same in both workers, replication reached 1 in every region, the verified pools'
//! idle nodes are what verify required, Azure requests were counted by status class — and
//! `promtool check metrics` finds nothing wrong with either scrape.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sigrun::events::RunResult;
use support::{Process, probe, sample};

const PIPELINE: &str = "nightly-ubuntu";
const REGIONS: [&str; 3] = ["westeurope", "eastus", "southeastasia"];
/// Pool targets of the nightly pipeline and their nodes (dedicated + low priority).
const POOLS: [(&str, f64); 2] = [("render", 2000.0), ("sim", 200.0)];
/// The nightly pipeline's `verify.min_idle_share`.
const MIN_IDLE_SHARE: f64 = 0.95;

async fn scrape(worker: &mut Process) -> String {
    let addr = worker.metrics_addr().await;
    probe(addr, "/metrics").await.expect("/metrics answers").body
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`key="value"`).
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|label| rest.contains(label))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// `promtool check metrics` on a scrape: its complaints, empty when clean.
fn promtool_check(metrics: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("promtool is needed ({e}): install it with `apt-get install -y prometheus` (Debian's package)")
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        text
    } else {
        format!("exit {}: {text}", out.status)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_export_metrics_that_agree_with_the_run() {
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;
    let mut workers = vec![
        setup.worker("worker-a", &["--all-stages"]),
        setup.worker("worker-b", &["--all-stages"]),
    ];
    for worker in &mut workers {
        let metrics = scrape(worker).await;
        // Known series exist before anything happened, so `increase()` sees the first run.
        let started = format!("sigrun_runs_started_total{{pipeline=\"{PIPELINE}\"}}");
        assert_eq!(sample(&metrics, &started), Some(0.0), "{metrics}");
        let failed =
            format!("sigrun_stage_failures_total{{pipeline=\"{PIPELINE}\",reason=\"timeout\",stage=\"verify\"}}");
        assert_eq!(sample(&metrics, &failed), Some(0.0), "{metrics}");
        assert_eq!(
            sample(
                &metrics,
                "sigrun_azure_requests_total{api=\"batch\",operation=\"add_pool\",status_class=\"2xx\"}"
            ),
            Some(0.0),
            "{metrics}"
        );
    }

    let run_id = setup.submit().await;
    let (result, history) = support::wait_for_run(&bus, run_id, &workers).await;
    let ended = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert_eq!(result, RunResult::Succeeded, "events: {history:#?}");

    // Each worker's run index reads the stream a few milliseconds behind; the last acks follow
    // the last events: wait until both have seen the end.
    let finished = format!("sigrun_runs_finished_total{{pipeline=\"{PIPELINE}\",result=\"succeeded\"}}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut scrapes = Vec::new();
    loop {
        scrapes.clear();
        for worker in &mut workers {
            scrapes.push(scrape(worker).await);
        }
        let verified: f64 = scrapes
            .iter()
            .map(|m| sum(m, "sigrun_stage_duration_seconds_count", &["stage=\"verify\""]))
            .sum();
        let all_finished = scrapes.iter().all(|m| sample(m, &finished) == Some(1.0));
        if (all_finished && verified >= 2.0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (i, metrics) in scrapes.iter().enumerate() {
        let worker = &workers[i];
        let report = worker.report();
        // Run level: the same in every worker.
        assert_eq!(sample(metrics, &finished), Some(1.0), "{metrics}{report}");
        assert_eq!(
            sample(
                metrics,
                &format!("sigrun_runs_started_total{{pipeline=\"{PIPELINE}\"}}")
            ),
            Some(1.0),
            "{metrics}"
        );
        for result in ["partly_succeeded", "failed", "cancelled"] {
            let series = format!("sigrun_runs_finished_total{{pipeline=\"{PIPELINE}\",result=\"{result}\"}}");
            assert_eq!(sample(metrics, &series), Some(0.0), "{metrics}");
        }
        assert_eq!(
            sum(metrics, "sigrun_runs_in_flight", &[]),
            0.0,
            "nothing in flight:\n{metrics}"
        );
        let published = sample(
            metrics,
            &format!("sigrun_last_successful_publish_timestamp_seconds{{pipeline=\"{PIPELINE}\"}}"),
        )
        .unwrap_or_else(|| panic!("last publish time exported:\n{metrics}"));
        assert!(
            (ended - published).abs() < 60.0,
            "last publish {published} is the run's end (~{ended})"
        );
        // Clean for Prometheus's own checker.
        let complaints = promtool_check(metrics);
        assert!(complaints.trim().is_empty(), "promtool check metrics: {complaints}");
    }

    // Per-worker metrics: whichever worker took the step recorded it; together they saw it all.
    let max_of = |series: &str| {
        scrapes
            .iter()
            .filter_map(|m| sample(m, series))
            .fold(f64::NAN, f64::max)
    };
    let total = |name: &str, labels: &[&str]| scrapes.iter().map(|m| sum(m, name, labels)).sum::<f64>();
    for region in REGIONS {
        let ratio = max_of(&format!(
            "sigrun_replication_progress_ratio{{pipeline=\"{PIPELINE}\",region=\"{region}\"}}"
        ));
        assert_eq!(ratio, 1.0, "replication to {region} complete");
    }
    for (pool, nodes) in POOLS {
        let idle = max_of(&format!(
            "sigrun_pool_nodes{{pipeline=\"{PIPELINE}\",pool=\"{pool}\",state=\"idle\"}}"
        ));
        let required = (MIN_IDLE_SHARE * nodes).ceil();
        assert!(
            idle >= required && idle <= nodes,
            "pool {pool}: {idle} idle nodes seen when it verified (needs {required} of {nodes})"
        );
        eprintln!("pool {pool}: {idle} of {nodes} nodes idle when verified");
    }
    let ok = total("sigrun_azure_requests_total", &["status_class=\"2xx\""]);
    let all = total("sigrun_azure_requests_total", &[]);
    assert!(ok > 0.0 && all >= ok, "Azure requests counted: {ok} 2xx of {all}");
    for (api, operation) in [("arm", "put_snapshot"), ("arm", "put_version"), ("batch", "add_pool")] {
        let labels = [&format!("api=\"{api}\"")[..], &format!("operation=\"{operation}\"")[..]];
        assert!(
            total("sigrun_azure_requests_total", &labels) >= 1.0,
            "{api} {operation} counted"
        );
        assert!(
            total("sigrun_azure_request_duration_seconds_count", &labels) >= 1.0,
            "{api} {operation} timed"
        );
    }
    assert_eq!(
        total("sigrun_stage_duration_seconds_count", &["stage=\"verify\""]),
        2.0,
        "both pool branches finished verify once"
    );
    assert!(total("sigrun_stage_duration_seconds_count", &["stage=\"snapshot\""]) >= 1.0);
    assert!(total("sigrun_handler_duration_seconds_count", &["stage=\"replicate\""]) >= 1.0);
    assert!(
        total(
            "sigrun_azure_operation_duration_seconds_count",
            &["operation=\"replication\""]
        ) >= 1.0,
        "replication timed start to end"
    );
    assert!(
        total(
            "sigrun_azure_operation_duration_seconds_count",
            &["operation=\"pool_allocation\""]
        ) >= 1.0
    );
    assert_eq!(total("sigrun_stage_failures_total", &[]), 0.0, "no failures");
    eprintln!("run {run_id}: {all} Azure requests counted ({ok} 2xx)");

    for worker in &mut workers {
        worker.stop().await;
    }
    support::delete_topology(bus, &settings).await;
}
