//! The dashboard and alert rules against a real Prometheus: six `sigrun worker` processes (one per
//! stage, on a prefix of the test's own) run a nightly pipeline against the emulator (with two
//! injected throttles) while Prometheus (Debian's `prometheus` package) scrapes them every second,
//! together with the broker's Prometheus plugin (`/metrics/per-object` on 127.0.0.1:15692), and
//! loads the alert rules of deploy/prometheus/rules. After the run, every query of every dashboard
//! in deploy/grafana/dashboards (read at test time, variables replaced as deploy/prometheus/checks.py
//! does) must return data through Prometheus's HTTP API, the panels' values must agree with what the
//! run did (one run started and succeeded, replication complete in every region, the pools' nodes,
//! nothing parked, the publish time, six workers up), every alert rule must be evaluated without
//! error, and `promtool check metrics` must find nothing to say about any worker's `/metrics`.

#[path = "it/helpers.rs"]
mod helpers;
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use serde_json::{Value, json};

use sigrun::bus::amqp::AmqpBus;
use sigrun::events::RunResult;
use support::{Process, probe, wait_for_status};

const STAGES: [&str; 6] = [
    "snapshot",
    "image-create",
    "gallery-publish",
    "replicate",
    "pool-create",
    "verify",
];
/// The broker's Prometheus plugin.
const RABBITMQ_PLUGIN: &str = "127.0.0.1:15692";
/// Throttled Azure requests (Retry-After 1 s): the throttling panels have something to show and the
/// run still succeeds. The emulator's request log says how many 429s it answered. Set once `sigrun
/// submit` (which plans against Azure too, and serves no metrics) has exited, so every 429 goes to
/// a worker.
const FAULTS: &str = "429:at=4|9,retry_after=1";
/// What the nightly pipeline (pipelines/nightly-ubuntu.toml) does.
const PIPELINE: &str = "nightly-ubuntu";
const REGIONS: [&str; 3] = ["westeurope", "eastus", "southeastasia"];
/// Pool target → nodes (dedicated + low priority).
const POOLS: [(&str, f64); 2] = [("render", 2000.0), ("sim", 200.0)];
/// `[verify] min_idle_share`: a pool passes verification with this share of its nodes idle.
const MIN_IDLE_SHARE: f64 = 0.95;
/// How long the queries may take to show the run (the broker's own statistics refresh every 5 s).
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// `prometheus` and `promtool` are installed; panics saying how to install them.
fn require_prometheus() {
    for tool in ["prometheus", "promtool"] {
        let ran = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            ran.is_ok_and(|status| status.success()),
            "`{tool}` is not installed: install Prometheus with `apt-get install -y prometheus` \
             (it brings prometheus and promtool)"
        );
    }
}

/// The broker's Prometheus plugin answers; panics saying how to enable it.
async fn require_rabbitmq_plugin() {
    let addr: SocketAddr = RABBITMQ_PLUGIN.parse().expect("plugin address");
    let answer = probe(addr, "/metrics/per-object").await;
    assert!(
        answer
            .as_ref()
            .is_some_and(|a| a.status == 200 && a.body.contains("rabbitmq_")),
        "RabbitMQ's Prometheus plugin does not answer on {RABBITMQ_PLUGIN} (answer: {:?}): enable it \
         with `rabbitmq-plugins enable rabbitmq_prometheus`",
        answer.map(|a| a.status)
    );
}

/// A free TCP port on 127.0.0.1 (free when asked; Prometheus binds it right after).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// One sample of a query's result: its labels and value.
type Sample = (BTreeMap<String, String>, f64);
type Samples = Vec<Sample>;

/// The Prometheus server of the test, killed when dropped (its data lives in the test's temp dir).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    client: reqwest::Client,
}

impl Prometheus {
    /// Writes prometheus.yml (1 s scrapes of the workers and the broker plugin, the dashboard's
    /// alert rules) into `dir` and starts Prometheus on it.
    fn start(dir: &Path, workers: &[(&str, SocketAddr)]) -> Prometheus {
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules/*.yml");
        let worker_targets: String = workers
            .iter()
            .map(|(stage, addr)| {
                // `worker_stage`, not `stage`: the workers' own series carry a `stage` label.
                format!("      - targets: [\"{addr}\"]\n        labels: {{worker_stage: {stage}}}\n")
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sigrun-worker\n    static_configs:\n{worker_targets}\
             \x20 - job_name: rabbitmq\n    metrics_path: /metrics/per-object\n    static_configs:\n\
             \x20     - targets: [\"{RABBITMQ_PLUGIN}\"]\n",
            rules = rules.display()
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, &config).expect("write prometheus.yml");
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config_file)
            .output()
            .expect("promtool runs");
        assert!(
            check.status.success(),
            "promtool check config refuses the test's prometheus.yml:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("address");
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("prometheus.out")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("prometheus starts");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client");
        Prometheus {
            child,
            addr,
            log,
            client,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/{path}` with `params`; the `data` of a successful answer, or why there is none.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let reply = self
            .client
            .get(format!("http://{}/api/v1/{path}", self.addr))
            .query(params)
            .send()
            .await
            .map_err(|e| format!("/api/v1/{path}: {e}"))?;
        let status = reply.status();
        let body: Value = reply.json().await.map_err(|e| format!("/api/v1/{path}: {e}"))?;
        if !status.is_success() || body["status"] != "success" {
            return Err(format!("/api/v1/{path} {params:?}: {status} {body}"));
        }
        Ok(body["data"].clone())
    }

    /// An instant query: the samples of its result as (labels, value).
    async fn query(&self, expr: &str) -> Result<Samples, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        let value_of = |pair: &Value| pair[1].as_str().and_then(|v| v.parse::<f64>().ok());
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|sample| {
                    let labels = serde_json::from_value(sample["metric"].clone()).ok()?;
                    Some((labels, value_of(&sample["value"])?))
                })
                .collect()),
            Some("scalar") => Ok(value_of(&data["result"])
                .map(|v| vec![(BTreeMap::new(), v)])
                .unwrap_or_default()),
            other => Err(format!("{expr}: unexpected result type {other:?}")),
        }
    }

    /// Waits until Prometheus is ready and every target has been scraped successfully.
    async fn wait_for_targets(&mut self, expected: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log_text());
            }
            match self.api("targets", &[("state", "active")]).await {
                Ok(data) => {
                    let targets = data["activeTargets"].as_array().cloned().unwrap_or_default();
                    let up = targets.iter().filter(|t| t["health"] == "up").count();
                    if targets.len() == expected && up == expected {
                        return;
                    }
                    last = format!("{up} of {} targets up: {targets:#?}", targets.len());
                }
                Err(error) => last = error,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "Prometheus did not scrape all {expected} targets within 60 s; last: {last}\n{}",
            self.log_text()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One query of a dashboard with Grafana's variables replaced: where it comes from (dashboard,
/// panel, title, refId, as checks.py names it), which substitution (`all` pipelines or `one`), and
/// the PromQL.
struct DashboardQuery {
    variant: String,
    place: String,
    expr: String,
}

/// Every query of every dashboard, read now (not a copy), extracted and substituted by
/// deploy/prometheus/checks.py's own functions: its SUBSTITUTIONS (`$__rate_interval` 5m and
/// `$__range` 1d cover the whole test) with the test's prefix. Panics with checks.py's problems if the dashboards do not pass its layout checks.
fn dashboard_queries(prefix: &str) -> Vec<DashboardQuery> {
    const EXTRACT: &str = r#"
import json, sys
sys.path.insert(0, "deploy/prometheus")
import checks
overrides = json.loads(sys.argv[1])
problems = checks.Problems()
queries = []
for path in sorted(checks.DASHBOARDS.glob("*.json")):
    name = str(path.relative_to(checks.ROOT))
    dashboard = json.loads(path.read_text())
    variables = checks.check_layout(name, dashboard, problems)
    for where, _, expr in checks.queries_of(name, dashboard, variables, problems):
        for variant, values in checks.SUBSTITUTIONS.items():
            expr_here = checks.substitute(expr, {**values, **overrides})
            queries.append({"variant": variant, "place": where, "expr": expr_here})
print(json.dumps({"queries": queries, "problems": problems.items}))
"#;
    let overrides = json!({ "prefix": prefix });
    let output = Command::new("python3")
        .args(["-c", EXTRACT, &overrides.to_string()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 runs deploy/prometheus/checks.py (apt-get install -y python3)");
    assert!(
        output.status.success(),
        "deploy/prometheus/checks.py could not list the dashboard queries: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let listed: Value = serde_json::from_slice(&output.stdout).expect("checks.py prints JSON");
    let problems = listed["problems"].as_array().cloned().unwrap_or_default();
    assert!(problems.is_empty(), "the dashboards fail checks.py: {problems:#?}");
    let queries: Vec<DashboardQuery> = listed["queries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| DashboardQuery {
            variant: q["variant"].as_str().unwrap_or_default().to_string(),
            place: q["place"].as_str().unwrap_or_default().to_string(),
            expr: q["expr"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    assert!(
        !queries.is_empty(),
        "no dashboard query found in deploy/grafana/dashboards"
    );
    queries
}

/// The panel query whose place (as checks.py names it) contains `title` and `query REF`, in the
/// `one` (pipeline nightly-ubuntu) variant.
fn panel<'a>(queries: &'a [DashboardQuery], title: &str, reference: &str) -> Result<&'a DashboardQuery, String> {
    let title = format!("'{title}' query {reference}");
    queries
        .iter()
        .find(|q| q.variant == "one" && q.place.contains(&title))
        .ok_or_else(|| format!("no dashboard panel {title} (the value checks look panels up by title)"))
}

/// Everything that should hold once Prometheus has seen the run; the list of what does not (empty:
/// all holds), plus a summary of the values read.
async fn check_everything(
    prometheus: &Prometheus,
    queries: &[DashboardQuery],
    started_at: f64,
    alert_count: usize,
    throttles: &Throttles,
) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut measured = Vec::new();

    // Every query returns data: a non-empty result with at least one number (not only NaN, which a
    // panel shows as nothing). A query ending in `> 0` (failures) lists only what went wrong: after
    // a run that succeeded it must return nothing, and the same query without the filter must
    // return data (the series are there, at zero).
    for query in queries {
        let expr = match query.expr.trim_end().strip_suffix("> 0") {
            None => query.expr.as_str(),
            Some(unfiltered) => {
                match prometheus.query(&query.expr).await {
                    Ok(samples) if samples.is_empty() => {}
                    other => problems.push(format!(
                        "{} [{}]: lists something after a run without failures: {other:?}",
                        query.place, query.variant
                    )),
                }
                unfiltered
            }
        };
        match prometheus.query(expr).await {
            Err(error) => problems.push(format!("{} [{}]: query failed: {error}", query.place, query.variant)),
            Ok(samples) if samples.is_empty() => {
                problems.push(format!("{} [{}]: returned nothing: {expr}", query.place, query.variant))
            }
            Ok(samples) if samples.iter().all(|(_, v)| v.is_nan()) => problems.push(format!(
                "{} [{}]: returned only NaN ({} series): {expr}",
                query.place,
                query.variant,
                samples.len()
            )),
            Ok(_) => {}
        }
    }

    // The pipeline variable offers the run's pipeline.
    let pipelines = prometheus
        .api("label/pipeline/values", &[("match[]", "{__name__=~\"sigrun_.+\"}")])
        .await;
    match pipelines {
        Ok(values) if values.as_array().is_some_and(|v| v.iter().any(|p| p == PIPELINE)) => {}
        other => problems.push(format!("the pipeline variable does not offer {PIPELINE}: {other:?}")),
    }

    // The panels' values agree with the run.
    let mut expect = |what: &str, got: Result<Samples, String>, check: &dyn Fn(&[Sample]) -> bool| match got {
        Ok(samples) => {
            let shown: Vec<String> = samples
                .iter()
                .map(|(labels, value)| {
                    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{{{}}} {value}", labels.join(","))
                })
                .collect();
            measured.push(format!("{what}: {}", shown.join("; ")));
            if !check(&samples) {
                problems.push(format!("{what}: got {}", shown.join("; ")));
            }
        }
        Err(error) => problems.push(format!("{what}: {error}")),
    };
    async fn via(prometheus: &Prometheus, query: Result<&DashboardQuery, String>) -> Result<Samples, String> {
        prometheus.query(&query?.expr).await
    }
    let label = |labels: &BTreeMap<String, String>, name: &str| labels.get(name).cloned().unwrap_or_default();
    let only = |samples: &[Sample], want: f64| samples.len() == 1 && (samples[0].1 - want).abs() < 1e-9;
    // Counters' increase over a window is extrapolated slightly: one run reads as ~1.
    let about = |value: f64, want: f64| (value - want).abs() < 0.2;

    expect(
        "runs started (panel 'Runs started') = 1",
        via(prometheus, panel(queries, "Runs started", "A")).await,
        &|s| s.len() == 1 && about(s[0].1, 1.0),
    );
    expect(
        "runs finished (panel 'Runs finished by result'): succeeded = 1, no other result",
        via(prometheus, panel(queries, "Runs finished by result", "A")).await,
        &|s| {
            s.iter()
                .any(|(l, v)| label(l, "result") == "succeeded" && about(*v, 1.0))
                && s.iter().all(|(l, v)| label(l, "result") == "succeeded" || *v < 0.2)
        },
    );
    expect(
        "runs in flight now (panel 'Runs in flight') = 0",
        via(prometheus, panel(queries, "Runs in flight", "A")).await,
        &|s| only(s, 0.0),
    );
    expect(
        "workers up (panel 'Workers up' A) = 6",
        via(prometheus, panel(queries, "Workers up", "A")).await,
        &|s| only(s, 6.0),
    );
    expect(
        "worker targets (panel 'Workers up' B) = 6",
        via(prometheus, panel(queries, "Workers up", "B")).await,
        &|s| only(s, 6.0),
    );
    expect(
        "workers connected to the broker (panel 'Worker targets' C) = 6",
        via(prometheus, panel(queries, "Worker targets", "C")).await,
        &|s| only(s, 6.0),
    );
    expect(
        "parked messages (panel 'Parked messages', stat) = 0",
        via(prometheus, panel(queries, "Parked messages", "A")).await,
        &|s| only(s, 0.0),
    );
    expect(
        "replication progress (panel 'Replication progress now') = 1 in each region",
        via(prometheus, panel(queries, "Replication progress now", "A")).await,
        &|s| {
            s.len() == REGIONS.len()
                && REGIONS.iter().all(|region| {
                    s.iter()
                        .any(|(l, v)| label(l, "region") == *region && label(l, "pipeline") == PIPELINE && *v == 1.0)
                })
        },
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let since_test_start = now - started_at;
    expect(
        "time since the last successful publish (panel) within the test's time",
        via(
            prometheus,
            panel(queries, "Time since the last successful publish", "A"),
        )
        .await,
        &|s| s.len() == 1 && s[0].1 >= 0.0 && s[0].1 <= since_test_start + 5.0,
    );
    expect(
        "pool nodes (panel 'Pool nodes by state'): each pool's nodes add up to its target, \
         idle at least the verified share",
        via(prometheus, panel(queries, "Pool nodes by state", "A")).await,
        &|s| {
            POOLS.iter().all(|(pool, target)| {
                let of_pool = || s.iter().filter(|(l, _)| label(l, "pool") == *pool);
                let total: f64 = of_pool().map(|(_, v)| v).sum();
                let idle: f64 = of_pool()
                    .filter(|(l, _)| label(l, "state") == "idle")
                    .map(|(_, v)| v)
                    .sum();
                total == *target && idle >= MIN_IDLE_SHARE * target
            })
        },
    );
    expect(
        "unhealthy nodes (panel 'Unhealthy nodes per pool') = 0 for both pools",
        via(prometheus, panel(queries, "Unhealthy nodes per pool", "A")).await,
        &|s| s.len() == POOLS.len() && s.iter().all(|(_, v)| *v == 0.0),
    );
    expect(
        &format!(
            "throttled Azure requests = the emulator's 429 answers ({}: {:?})",
            throttles.answers, throttles.requests
        ),
        prometheus.query("sum(sigrun_azure_throttled_total)").await,
        &|s| only(s, throttles.answers as f64),
    );
    expect(
        &format!(
            "Retry-After waited = what the 429s asked ({} s)",
            throttles.retry_after_seconds
        ),
        prometheus.query("sum(sigrun_azure_retry_after_seconds_total)").await,
        &|s| s.len() == 1 && (s[0].1 - throttles.retry_after_seconds).abs() < 0.01,
    );
    expect(
        "verify messages done = the two pools",
        prometheus
            .query("sum(sigrun_messages_handled_total{stage=\"verify\",outcome=\"done\"})")
            .await,
        &|s| only(s, 2.0),
    );

    // The alert rules are loaded and every one evaluates without error.
    match prometheus.api("rules", &[("type", "alert")]).await {
        Err(error) => problems.push(format!("alert rules: {error}")),
        Ok(data) => {
            let rules: Vec<Value> = data["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            if rules.len() != alert_count {
                problems.push(format!(
                    "{} alert rules loaded, deploy/prometheus/rules defines {alert_count}",
                    rules.len()
                ));
            }
            for rule in &rules {
                if rule["health"] != "ok" {
                    problems.push(format!(
                        "alert {} is not healthy: health {} lastError {}",
                        rule["name"], rule["health"], rule["lastError"]
                    ));
                }
            }
            let firing: Vec<String> = rules
                .iter()
                .filter(|r| r["state"] != "inactive")
                .map(|r| format!("{} ({})", r["name"], r["state"]))
                .collect();
            measured.push(format!(
                "{} alert rules evaluated; pending or firing: {firing:?}",
                rules.len()
            ));
        }
    }
    (problems, measured)
}

/// The throttling answers the emulator gave (from its request log).
struct Throttles {
    answers: usize,
    /// `api METHOD path` of each throttled request.
    requests: Vec<String>,
    retry_after_seconds: f64,
}

async fn throttles_answered(emu: &helpers::TestEmulator) -> Throttles {
    let throttled: Vec<Value> = emu
        .requests()
        .await
        .into_iter()
        .filter(|entry| entry["status"] == 429)
        .collect();
    Throttles {
        answers: throttled.len(),
        requests: throttled
            .iter()
            .map(|e| {
                format!(
                    "{} {} {}",
                    e["api"].as_str().unwrap_or("?"),
                    e["method"].as_str().unwrap_or("?"),
                    e["path"].as_str().unwrap_or("?")
                )
            })
            .collect(),
        retry_after_seconds: throttled
            .iter()
            .filter_map(|entry| entry["retry_after_ms"].as_f64())
            .sum::<f64>()
            / 1000.0,
    }
}

/// `promtool check metrics` on a scrape: what it says (empty: clean).
fn promtool_check_metrics(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("(exit {:?}) {}", output.status.code(), said.trim())
    }
}

/// The number of alert rules deploy/prometheus/rules/*.yml define (`- alert:` lines).
fn alert_rules_defined() -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules");
    std::fs::read_dir(&dir)
        .expect("deploy/prometheus/rules")
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|e| e == "yml"))
        .map(|entry| {
            std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .lines()
                .filter(|line| line.trim_start().starts_with("- alert:"))
                .count()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_that_agrees_with_a_run_prometheus_scraped() {
    require_prometheus();
    require_rabbitmq_plugin().await;
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let setup = support::setup("").await;
    let (bus, settings) = support::test_bus(&setup.config).await;

    let scenario = async {
        let mut workers = Vec::new();
        let mut addrs = Vec::new();
        for stage in STAGES {
            let mut worker = setup.worker(stage, &["--stage", stage]);
            addrs.push((stage, worker.metrics_addr().await));
            workers.push(worker);
        }
        for (stage, addr) in &addrs {
            wait_for_status(*addr, "/readyz", 200, Duration::from_secs(30), stage).await;
        }
        let mut prometheus = Prometheus::start(&setup.dir, &addrs);
        prometheus.wait_for_targets(STAGES.len() + 1).await;
        // A few scrapes before the run: counters' first values are there to increase from.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let run_id = setup.submit().await;
        setup.emu.set_faults(FAULTS).await;
        let (result, history) = support::wait_for_run(&bus, run_id, &workers).await;
        let logs = || workers.iter().map(Process::report).collect::<String>();
        assert_eq!(result, RunResult::Succeeded, "events: {history:#?}{}", logs());
        eprintln!(
            "run {run_id} succeeded {:.1} s after the test started",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64()
                - started_at
        );

        // promtool on every worker's /metrics, after the run (every series it made is there).
        let mut lint = Vec::new();
        for (stage, addr) in &addrs {
            let metrics = probe(*addr, "/metrics").await.expect("/metrics answers");
            assert_eq!(metrics.status, 200);
            let said = promtool_check_metrics(&metrics.body);
            if !said.is_empty() {
                lint.push(format!("worker {stage} ({addr}): {said}"));
            }
        }

        let throttles = throttles_answered(&setup.emu).await;
        assert!(throttles.answers > 0, "the emulator answered no 429 ({FAULTS})");
        let queries = dashboard_queries(&setup.prefix);
        let alert_count = alert_rules_defined();
        assert!(alert_count > 0, "deploy/prometheus/rules defines no alert");
        let settle_began = Instant::now();
        let (problems, measured) = loop {
            let (problems, measured) =
                check_everything(&prometheus, &queries, started_at, alert_count, &throttles).await;
            if problems.is_empty() || settle_began.elapsed() > SETTLE_LIMIT {
                break (problems, measured);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        eprintln!(
            "{} dashboard queries ({} per variant), checked {:.1} s after the run:\n  {}",
            queries.len(),
            queries.iter().filter(|q| q.variant == "one").count(),
            settle_began.elapsed().as_secs_f64(),
            measured.join("\n  ")
        );
        assert!(
            problems.is_empty() && lint.is_empty(),
            "after {SETTLE_LIMIT:?} of Prometheus scraping a finished run, {} problem(s):\n  {}\n\
             promtool check metrics:\n  {}\nmeasured:\n  {}",
            problems.len() + lint.len(),
            problems.join("\n  "),
            if lint.is_empty() {
                "clean".to_string()
            } else {
                lint.join("\n  ")
            },
            measured.join("\n  ")
        );

        for worker in &mut workers {
            worker.stop().await;
        }
        drop(prometheus);
    };
    // Whatever happened, Prometheus and the workers are gone (dropped with the scenario) and the
    // test's topology is deleted before the outcome is reported.
    let outcome = std::panic::AssertUnwindSafe(scenario).catch_unwind().await;
    bus.close().await;
    AmqpBus::delete_topology(&settings.amqp, &settings.delay_tiers())
        .await
        .expect("delete the test topology");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
