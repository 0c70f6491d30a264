//! [`Telemetry`]: the metrics a sigrun process exports, in a Prometheus registry it owns. The
//! runtime reports handled messages and what their steps measured through [`Observer`]; the run
//! history (fed in stream order through [`Observer::event`]) gives the run-level metrics; the
//! Azure client counts its requests in the [`AzureMetrics`] registered here; the bus gauge is
//! sampled when scraped.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use super::runs::{RESULTS, RunChange, RunTracker};
use crate::azure::AzureMetrics;
use crate::events::{DeletedKind, Event, EventKind};
use crate::model::envelope::Stage;
use crate::runtime::{Handled, Observer};
use crate::stages::{FailureClass, Observation};

/// Batch node states set to 0 when a reading of a pool does not list them, so a state a pool's
/// nodes left reads 0 rather than its last count.
const NODE_STATES: [&str; 11] = [
    "idle",
    "running",
    "starting",
    "starttaskfailed",
    "unusable",
    "creating",
    "rebooting",
    "preempted",
    "leavingpool",
    "offline",
    "waitingforstarttask",
];

/// Long-running operations by the envelope's `InFlight::what`, as the `operation` label names them.
fn operation_label(what: &str) -> Option<&'static str> {
    match what {
        "snapshots" => Some("snapshot"),
        "image" => Some("image"),
        "image_version" => Some("image_version"),
        "replication" => Some("replication"),
        "allocation" => Some("pool_allocation"),
        _ => None,
    }
}

/// The process's metrics. Share it behind an `Arc`.
pub struct Telemetry {
    registry: Registry,
    bus_connected: IntGauge,
    stages: StageMetrics,
    observed: ObservedMetrics,
    history: RunMetrics,
    quota: QuotaMetrics,
    azure: Arc<AzureMetrics>,
    runs: Mutex<RunTracker>,
    /// Configured pipelines: other names (from an undecodable message) are labelled `unknown`.
    pipelines: Vec<String>,
}

/// What the runtime reports of each message it handles and of each branch's stages.
struct StageMetrics {
    messages_handled: IntCounterVec,
    handler_duration: HistogramVec,
    stage_duration: HistogramVec,
    stage_failures: IntCounterVec,
}

/// What steps saw of Azure: long-running operations, replication, the nodes of a pool verified.
struct ObservedMetrics {
    operation_duration: HistogramVec,
    replication: GaugeVec,
    pool_nodes: IntGaugeVec,
}

/// The quota watch's readings.
struct QuotaMetrics {
    headroom: IntGaugeVec,
    need: IntGaugeVec,
}

impl QuotaMetrics {
    fn register(registry: &Registry) -> QuotaMetrics {
        QuotaMetrics {
            headroom: register(
                registry,
                int_gauge(
                    "sigrun_batch_quota_headroom",
                    "What a Batch account's quota leaves: the limit less what its pools hold now, as the quota watch \
                     last read it",
                    &["account", "quota"],
                ),
            ),
            need: register(
                registry,
                int_gauge(
                    "sigrun_pipeline_quota_need",
                    "What a pipeline's next run adds to a Batch account's quota (pools, net of the pipeline's retired \
                     ones; or vCPUs of their nodes)",
                    &["pipeline", "account", "quota"],
                ),
            ),
        }
    }
}

/// Run-level metrics, from the shared run history (the same in every worker).
struct RunMetrics {
    started: IntCounterVec,
    finished: IntCounterVec,
    in_flight: IntGaugeVec,
    last_publish: GaugeVec,
    deleted: IntCounterVec,
}

/// One handler step: milliseconds to, at worst, tens of seconds.
const STEP_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// A stage or a long-running Azure operation: a second to four hours.
const LONG_BUCKETS: [f64; 13] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels).expect("a valid metric")
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

fn int_gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

/// Registers `metric` and hands it back (the registry keeps a clone; both share the values).
fn register<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

/// `sigrun_build_info`: always 1, its label the version.
fn register_build_info(registry: &Registry) {
    let build_info = register(
        registry,
        int_gauge(
            "sigrun_build_info",
            "Always 1; the version of this sigrun build",
            &["version"],
        ),
    );
    build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
}

/// `sigrun_bus_connected`, 1 until the bus says otherwise.
fn register_bus_connected(registry: &Registry) -> IntGauge {
    let bus_connected = register(
        registry,
        IntGauge::new(
            "sigrun_bus_connected",
            "1 while connected to the message bus (always 1 for the in-process bus of `sigrun run`)",
        )
        .expect("a valid metric"),
    );
    bus_connected.set(1);
    bus_connected
}

impl StageMetrics {
    fn register(registry: &Registry) -> StageMetrics {
        let metrics = StageMetrics {
            messages_handled: register(
                registry,
                counter(
                    "sigrun_messages_handled_total",
                    "Stage messages handled to the end (acked), by stage and outcome: advanced, waiting, early \
                     (back before it was due, no step), done, failed (the stage failed the branch), retried, \
                     parked, cancelled (the run was cancelled), dropped (a stale copy)",
                    &["stage", "outcome"],
                ),
            ),
            handler_duration: register(
                registry,
                histogram(
                    "sigrun_handler_duration_seconds",
                    "Time in the stage handler (one step) per message",
                    &["stage"],
                    STEP_BUCKETS.to_vec(),
                ),
            ),
            stage_duration: register(
                registry,
                histogram(
                    "sigrun_stage_duration_seconds",
                    "Per run and branch: from entering a stage to finishing it (advanced or done)",
                    &["pipeline", "stage"],
                    LONG_BUCKETS.to_vec(),
                ),
            ),
            stage_failures: register(
                registry,
                counter(
                    "sigrun_stage_failures_total",
                    "Branch and region failures by pipeline, stage and reason class",
                    &["pipeline", "stage", "reason"],
                ),
            ),
        };
        // Every known series from the start, so the first increase is seen by `increase()`.
        for stage in Stage::ALL {
            for outcome in Handled::ALL {
                metrics
                    .messages_handled
                    .with_label_values(&[stage.as_str(), outcome.as_str()]);
            }
        }
        metrics
    }
}

impl ObservedMetrics {
    fn register(registry: &Registry) -> ObservedMetrics {
        ObservedMetrics {
            operation_duration: register(
                registry,
                histogram(
                    "sigrun_azure_operation_duration_seconds",
                    "Long-running Azure operations: from the start to the terminal state seen",
                    &["operation"],
                    LONG_BUCKETS.to_vec(),
                ),
            ),
            replication: register(
                registry,
                gauge(
                    "sigrun_replication_progress_ratio",
                    "0-1: the latest image version's replication to a region, as the replicate stage last saw it",
                    &["pipeline", "region"],
                ),
            ),
            pool_nodes: register(
                registry,
                int_gauge(
                    "sigrun_pool_nodes",
                    "Nodes of the pool being verified by Batch node state, as the verify stage last saw them",
                    &["pipeline", "pool", "state"],
                ),
            ),
        }
    }
}

impl RunMetrics {
    fn register(registry: &Registry) -> RunMetrics {
        let metrics = RunMetrics {
            started: register(
                registry,
                counter(
                    "sigrun_runs_started_total",
                    "Runs admitted (from the shared run history: the same in every worker)",
                    &["pipeline"],
                ),
            ),
            finished: register(
                registry,
                counter(
                    "sigrun_runs_finished_total",
                    "Runs ended, by result (from the shared run history: the same in every worker)",
                    &["pipeline", "result"],
                ),
            ),
            in_flight: register(
                registry,
                int_gauge(
                    "sigrun_runs_in_flight",
                    "Branches of unfinished runs at each stage (from the shared run history: the same in every \
                     worker)",
                    &["stage"],
                ),
            ),
            last_publish: register(
                registry,
                gauge(
                    "sigrun_last_successful_publish_timestamp_seconds",
                    "Unix time the last run that published an image version ended succeeded or partly succeeded",
                    &["pipeline"],
                ),
            ),
            deleted: register(
                registry,
                counter(
                    "sigrun_resources_deleted_total",
                    "Resources runs deleted (intermediates, old versions, retired pools), by kind (from the shared \
                     run history: the same in every worker)",
                    &["pipeline", "kind"],
                ),
            ),
        };
        // Every stage from the start, so an idle stage reads 0 rather than nothing.
        for stage in Stage::ALL {
            metrics.in_flight.with_label_values(&[stage.as_str()]).set(0);
        }
        metrics
    }
}

impl Telemetry {
    /// A registry of its own holding every metric above (build info, the bus, stages, what steps
    /// saw of Azure, runs, and the Azure client's [`AzureMetrics`]), the series known up front at 0.
    pub fn new() -> Telemetry {
        let registry = Registry::new();
        register_build_info(&registry);
        let bus_connected = register_bus_connected(&registry);
        let stages = StageMetrics::register(&registry);
        let observed = ObservedMetrics::register(&registry);
        let history = RunMetrics::register(&registry);
        let quota = QuotaMetrics::register(&registry);
        let azure = Arc::new(AzureMetrics::register(&registry).expect("metric names are unique"));
        Telemetry {
            registry,
            bus_connected,
            stages,
            observed,
            history,
            quota,
            azure,
            runs: Mutex::new(RunTracker::default()),
            pipelines: Vec::new(),
        }
    }

    /// Declares the configured pipelines: their counters start at 0, and only they (and the
    /// pipelines of admitted runs) become labels.
    pub fn with_pipelines(mut self, pipelines: impl IntoIterator<Item = String>) -> Telemetry {
        for pipeline in pipelines {
            self.init_pipeline(&pipeline);
            self.pipelines.push(pipeline);
        }
        self
    }

    /// A pipeline known only once the process runs (`sigrun run`'s): its counters start at 0.
    pub fn declare_pipeline(&self, pipeline: &str) {
        self.init_pipeline(pipeline);
    }

    fn init_pipeline(&self, pipeline: &str) {
        {
            self.history.started.with_label_values(&[pipeline]);
            for result in RESULTS {
                self.history.finished.with_label_values(&[pipeline, result]);
            }
            for kind in DeletedKind::ALL {
                self.history.deleted.with_label_values(&[pipeline, kind.as_str()]);
            }
            for stage in Stage::ALL {
                for class in FailureClass::ALL {
                    self.stages
                        .stage_failures
                        .with_label_values(&[pipeline, stage.as_str(), class.as_str()]);
                }
            }
        }
    }

    /// The Azure client's metrics (give them to `AzureClient::with_metrics`).
    pub fn azure(&self) -> Arc<AzureMetrics> {
        Arc::clone(&self.azure)
    }

    fn pipeline_label<'a>(&self, pipeline: &'a str) -> &'a str {
        if self.pipelines.is_empty() || self.pipelines.iter().any(|p| p == pipeline) {
            pipeline
        } else {
            "unknown"
        }
    }

    /// A quota reading of `pipeline`'s accounts (the quota watch's).
    pub fn quota_reading(&self, pipeline: &str, uses: &[crate::model::plan::QuotaUse]) {
        let pipeline = self.pipeline_label(pipeline);
        for quota in uses {
            let labels = [quota.account.as_str(), quota.quota.as_str()];
            let headroom = i64::from(quota.limit) - i64::try_from(quota.in_use).unwrap_or(i64::MAX);
            self.quota.headroom.with_label_values(&labels).set(headroom);
            let need = i64::try_from(quota.adds).unwrap_or(i64::MAX);
            self.quota
                .need
                .with_label_values(&[pipeline, labels[0], labels[1]])
                .set(need);
        }
    }

    /// Where further metrics register.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn set_bus_connected(&self, connected: bool) {
        self.bus_connected.set(i64::from(connected));
    }

    /// Every metric in the Prometheus text format (`text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("the text encoder writes to memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Observer for Telemetry {
    fn handled(&self, stage: Stage, outcome: Handled) {
        self.stages
            .messages_handled
            .with_label_values(&[stage.as_str(), outcome.as_str()])
            .inc();
    }

    fn handler_time(&self, stage: Stage, elapsed: Duration) {
        self.stages
            .handler_duration
            .with_label_values(&[stage.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    fn stage_finished(&self, pipeline: &str, stage: Stage, elapsed: Duration) {
        self.stages
            .stage_duration
            .with_label_values(&[pipeline, stage.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    fn stage_failed(&self, pipeline: &str, stage: Stage, class: FailureClass) {
        self.stages
            .stage_failures
            .with_label_values(&[self.pipeline_label(pipeline), stage.as_str(), class.as_str()])
            .inc();
    }

    fn operation_finished(&self, what: &str, elapsed: Duration) {
        if let Some(operation) = operation_label(what) {
            self.observed
                .operation_duration
                .with_label_values(&[operation])
                .observe(elapsed.as_secs_f64());
        }
    }

    fn observed(&self, pipeline: &str, observation: &Observation) {
        match observation {
            Observation::Replication { region, ratio } => {
                self.observed
                    .replication
                    .with_label_values(&[pipeline, region])
                    .set(*ratio);
            }
            Observation::PoolNodes { target, by_state } => {
                for state in NODE_STATES {
                    if !by_state.iter().any(|(s, _)| s == state) {
                        self.observed
                            .pool_nodes
                            .with_label_values(&[pipeline, target, state])
                            .set(0);
                    }
                }
                for (state, count) in by_state {
                    self.observed
                        .pool_nodes
                        .with_label_values(&[pipeline, target, state])
                        .set(i64::from(*count));
                }
            }
            Observation::Failure(_) => {}
        }
    }

    fn event(&self, event: &Event) {
        if let EventKind::ResourceDeleted { what, .. } = &event.kind {
            let pipeline = self.pipeline_label(&event.pipeline);
            self.history.deleted.with_label_values(&[pipeline, what.as_str()]).inc();
        }
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        for change in runs.apply(event) {
            match change {
                RunChange::Started { pipeline } => self.history.started.with_label_values(&[&pipeline]).inc(),
                RunChange::Finished { pipeline, result, at } => {
                    self.history.finished.with_label_values(&[&pipeline, result]).inc();
                    if matches!(result, "succeeded" | "partly_succeeded") {
                        let gauge = self.history.last_publish.with_label_values(&[&pipeline]);
                        let at = at.unix_timestamp_nanos() as f64 / 1e9;
                        if at > gauge.get() {
                            gauge.set(at);
                        }
                    }
                }
            }
        }
        for stage in Stage::ALL {
            self.history
                .in_flight
                .with_label_values(&[stage.as_str()])
                .set(runs.in_flight(stage) as i64);
        }
    }
}

/// The content type of [`Telemetry::render`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_and_counts_outcomes_by_stage() {
        let telemetry = Telemetry::new();
        telemetry.handled(Stage::Snapshot, Handled::Advanced);
        telemetry.handled(Stage::Snapshot, Handled::Advanced);
        telemetry.handled(Stage::Verify, Handled::Parked);
        telemetry.set_bus_connected(false);
        let text = telemetry.render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("sigrun_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains("sigrun_messages_handled_total{outcome=\"advanced\",stage=\"snapshot\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("sigrun_messages_handled_total{outcome=\"parked\",stage=\"verify\"} 1"),
            "{text}"
        );
        assert!(text.contains("sigrun_bus_connected 0"), "{text}");
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4");
        // A registry of its own: the global default registry is untouched.
        assert!(prometheus::gather().iter().all(|f| !f.name().starts_with("sigrun_")));
    }

    #[test]
    fn exports_deletions_by_kind_and_the_quota_watchs_readings() {
        use crate::events::{DeletedKind, EventKind};
        use crate::model::envelope::{Branch, Intermediate};
        use crate::model::plan::QuotaUse;

        let telemetry = Telemetry::new().with_pipelines(["nightly".to_string()]);
        assert!(
            telemetry
                .render()
                .contains("sigrun_resources_deleted_total{kind=\"image_version\",pipeline=\"nightly\"} 0")
        );
        let deleted = |what| Event {
            run_id: uuid::Uuid::from_u128(9),
            pipeline: "nightly".into(),
            version: "1.0.0".into(),
            stage: Stage::ImageCreate,
            branch: Branch::CleanUp {
                what: Intermediate::Snapshots,
            },
            at: time::OffsetDateTime::UNIX_EPOCH,
            kind: EventKind::ResourceDeleted {
                what,
                id: "/subscriptions/x".into(),
            },
        };
        telemetry.event(&deleted(DeletedKind::Snapshot));
        telemetry.event(&deleted(DeletedKind::Snapshot));
        telemetry.event(&deleted(DeletedKind::Pool));
        let quota = |quota: &str, limit, in_use, adds| QuotaUse {
            account: "sigrunweu".into(),
            quota: quota.into(),
            limit,
            in_use,
            adds,
        };
        telemetry.quota_reading(
            "nightly",
            &[
                quota("poolQuota", 150, 152, 1),
                quota("dedicatedCoreQuota", 200, 40, 32),
            ],
        );
        let text = telemetry.render();
        for series in [
            "sigrun_resources_deleted_total{kind=\"snapshot\",pipeline=\"nightly\"} 2",
            "sigrun_resources_deleted_total{kind=\"pool\",pipeline=\"nightly\"} 1",
            "sigrun_batch_quota_headroom{account=\"sigrunweu\",quota=\"poolQuota\"} -2",
            "sigrun_batch_quota_headroom{account=\"sigrunweu\",quota=\"dedicatedCoreQuota\"} 160",
            "sigrun_pipeline_quota_need{account=\"sigrunweu\",pipeline=\"nightly\",quota=\"dedicatedCoreQuota\"} 32",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }

    #[test]
    fn exports_run_level_metrics_from_events_and_what_steps_saw() {
        use crate::events::{EventKind, PoolRef};
        use crate::model::envelope::Branch;
        use time::OffsetDateTime;
        use uuid::Uuid;

        let telemetry = Telemetry::new().with_pipelines(["nightly".to_string()]);
        let text = telemetry.render();
        for series in [
            "sigrun_runs_started_total{pipeline=\"nightly\"} 0",
            "sigrun_runs_finished_total{pipeline=\"nightly\",result=\"succeeded\"} 0",
            "sigrun_stage_failures_total{pipeline=\"nightly\",reason=\"gave_up\",stage=\"snapshot\"} 0",
            "sigrun_messages_handled_total{outcome=\"retried\",stage=\"verify\"} 0",
            "sigrun_runs_in_flight{stage=\"replicate\"} 0",
        ] {
            assert!(text.contains(series), "{series} pre-initialised:\n{text}");
        }
        let at = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let event = |stage, branch, kind| Event {
            run_id: Uuid::from_u128(7),
            pipeline: "nightly".into(),
            version: "1.0.0".into(),
            stage,
            branch,
            at,
            kind,
        };
        let pool = Branch::Pool {
            region: "eastus".into(),
            target: "cpu".into(),
        };
        telemetry.event(&event(
            Stage::Replicate,
            Branch::Trunk,
            EventKind::RunStarted {
                rollout: false,
                regions: vec!["eastus".into()],
                pools: vec![PoolRef {
                    region: "eastus".into(),
                    target: "cpu".into(),
                }],
            },
        ));
        assert!(
            telemetry
                .render()
                .contains("sigrun_runs_in_flight{stage=\"replicate\"} 1")
        );
        telemetry.event(&event(
            Stage::Replicate,
            Branch::Trunk,
            EventKind::RegionCompleted {
                region: "eastus".into(),
            },
        ));
        telemetry.event(&event(
            Stage::Verify,
            pool.clone(),
            EventKind::Waiting { what: "nodes".into() },
        ));
        assert!(telemetry.render().contains("sigrun_runs_in_flight{stage=\"verify\"} 1"));
        telemetry.event(&event(
            Stage::Verify,
            pool,
            EventKind::PoolVerified { pool_id: "p".into() },
        ));
        telemetry.observed(
            "nightly",
            &Observation::PoolNodes {
                target: "cpu".into(),
                by_state: vec![("idle".into(), 9), ("starting".into(), 1)],
            },
        );
        telemetry.observed(
            "nightly",
            &Observation::Replication {
                region: "eastus".into(),
                ratio: 1.0,
            },
        );
        telemetry.stage_failed("not-a-pipeline", Stage::Verify, FailureClass::Malformed);
        let text = telemetry.render();
        for series in [
            "sigrun_runs_started_total{pipeline=\"nightly\"} 1",
            "sigrun_runs_finished_total{pipeline=\"nightly\",result=\"succeeded\"} 1",
            "sigrun_runs_in_flight{stage=\"verify\"} 0",
            "sigrun_last_successful_publish_timestamp_seconds{pipeline=\"nightly\"} 1800000000",
            "sigrun_pool_nodes{pipeline=\"nightly\",pool=\"cpu\",state=\"idle\"} 9",
            "sigrun_pool_nodes{pipeline=\"nightly\",pool=\"cpu\",state=\"unusable\"} 0",
            "sigrun_replication_progress_ratio{pipeline=\"nightly\",region=\"eastus\"} 1",
            // A pipeline name from an undecodable message is not a label of its own.
            "sigrun_stage_failures_total{pipeline=\"unknown\",reason=\"malformed\",stage=\"verify\"} 1",
        ] {
            assert!(text.contains(series), "{series}:\n{text}");
        }
    }
}
