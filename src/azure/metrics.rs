//! The Azure client's metrics: every HTTP attempt counted by api, operation and status class and
//! timed, throttling answers, and the `Retry-After` time waited. `operation` is the fixed name of
//! the client call that made the request (`get_vm`, `put_snapshot`, `node_counts`…), carried to
//! `Http::send` as a task-local around each `AzureApi` call so no URL or resource name ever
//! becomes a label.

use std::future::Future;
use std::time::Duration;

use prometheus::{CounterVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::http::Audience;

tokio::task_local! {
    static OPERATION: &'static str;
}

/// Every client call and the API it goes to: the `operation` label's values.
pub const OPERATIONS: [(&str, &str); 31] = [
    ("arm", "get_vm"),
    ("arm", "provider_state"),
    ("arm", "list_locations"),
    ("arm", "batch_vm_sizes"),
    ("arm", "register_provider"),
    ("arm", "put_snapshot"),
    ("arm", "get_snapshot"),
    ("arm", "delete_snapshot"),
    ("arm", "put_image"),
    ("arm", "get_image"),
    ("arm", "delete_image"),
    ("arm", "get_gallery"),
    ("arm", "put_gallery"),
    ("arm", "get_definition"),
    ("arm", "put_definition"),
    ("arm", "list_versions"),
    ("arm", "put_version"),
    ("arm", "get_version"),
    ("arm", "delete_version"),
    ("arm", "set_exclude_from_latest"),
    ("arm", "set_target_regions"),
    ("arm", "operation_status"),
    ("arm", "get_batch_account"),
    ("batch", "supported_images"),
    ("batch", "add_pool"),
    ("batch", "get_pool"),
    ("batch", "list_pools"),
    ("batch", "node_counts"),
    ("batch", "resize_pool"),
    ("batch", "set_pool_metadata"),
    ("batch", "delete_pool"),
];

/// The `status_class` label's values.
pub const STATUS_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "error"];

/// Runs `call` with its requests labelled `operation`.
pub async fn named<F: Future>(operation: &'static str, call: F) -> F::Output {
    OPERATION.scope(operation, call).await
}

/// The operation of the client call under way, `other` outside one (a token check).
pub fn current_operation() -> &'static str {
    OPERATION.try_with(|op| *op).unwrap_or("other")
}

/// The Azure client's metrics, registered on a process's registry.
pub struct AzureMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    throttled: IntCounterVec,
    retry_after: CounterVec,
}

impl AzureMetrics {
    /// Registers the metrics on `registry`, every known api/operation/status class at 0.
    pub fn register(registry: &Registry) -> prometheus::Result<AzureMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "sigrun_azure_requests_total",
                "Azure HTTP requests (each attempt), by api, client operation and status class (error: no answer)",
            ),
            &["api", "operation", "status_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "sigrun_azure_request_duration_seconds",
                "Time of one Azure HTTP attempt, from sending to the whole answer read",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["api", "operation"],
        )?;
        let throttled = IntCounterVec::new(
            Opts::new(
                "sigrun_azure_throttled_total",
                "Azure answers that throttled: 429, and 503 with Retry-After",
            ),
            &["api", "operation"],
        )?;
        let retry_after = CounterVec::new(
            Opts::new(
                "sigrun_azure_retry_after_seconds_total",
                "Time Azure asked to wait with Retry-After: waited within a call, or handed back so the message is held that long",
            ),
            &["api"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(throttled.clone()))?;
        registry.register(Box::new(retry_after.clone()))?;
        for (api, operation) in OPERATIONS {
            for class in STATUS_CLASSES {
                requests.with_label_values(&[api, operation, class]);
            }
            throttled.with_label_values(&[api, operation]);
        }
        for api in ["arm", "batch"] {
            retry_after.with_label_values(&[api]);
        }
        Ok(AzureMetrics {
            requests,
            duration,
            throttled,
            retry_after,
        })
    }

    /// One attempt: its answer's status (`None`: no answer), how long it took, and whether it
    /// carried a `Retry-After`.
    pub(super) fn attempt(&self, audience: Audience, status: Option<u16>, elapsed: Duration, retry_after: bool) {
        let api = api_label(audience);
        let operation = current_operation();
        self.requests
            .with_label_values(&[api, operation, status_class(status)])
            .inc();
        self.duration
            .with_label_values(&[api, operation])
            .observe(elapsed.as_secs_f64());
        if status == Some(429) || (status == Some(503) && retry_after) {
            self.throttled.with_label_values(&[api, operation]).inc();
        }
    }

    /// Time waited before trying again because Azure said `Retry-After`.
    pub(super) fn waited(&self, audience: Audience, wait: Duration) {
        self.retry_after
            .with_label_values(&[api_label(audience)])
            .inc_by(wait.as_secs_f64());
    }
}

fn api_label(audience: Audience) -> &'static str {
    match audience {
        Audience::Arm => "arm",
        Audience::Batch => "batch",
    }
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(status_class(Some(200)), "2xx");
        assert_eq!(status_class(Some(202)), "2xx");
        assert_eq!(status_class(Some(304)), "3xx");
        assert_eq!(status_class(Some(429)), "4xx");
        assert_eq!(status_class(Some(503)), "5xx");
        assert_eq!(status_class(None), "error");
    }

    #[tokio::test]
    async fn attempts_are_labelled_by_the_call_under_way() {
        let registry = Registry::new();
        let metrics = AzureMetrics::register(&registry).unwrap();
        named("get_pool", async {
            metrics.attempt(Audience::Batch, Some(429), Duration::from_millis(3), true);
            metrics.attempt(Audience::Batch, Some(200), Duration::from_millis(3), false);
        })
        .await;
        metrics.attempt(Audience::Arm, Some(503), Duration::from_millis(3), false);
        metrics.waited(Audience::Batch, Duration::from_millis(1500));
        let count = |labels: &[&str]| metrics.requests.with_label_values(labels).get();
        assert_eq!(count(&["batch", "get_pool", "4xx"]), 1);
        assert_eq!(count(&["batch", "get_pool", "2xx"]), 1);
        assert_eq!(count(&["arm", "other", "5xx"]), 1);
        assert_eq!(metrics.throttled.with_label_values(&["batch", "get_pool"]).get(), 1);
        // A 503 without Retry-After is a server error, not throttling.
        assert_eq!(metrics.throttled.with_label_values(&["arm", "other"]).get(), 0);
        assert_eq!(metrics.retry_after.with_label_values(&["batch"]).get(), 1.5);
        // Known combinations exist from the start, so the first increase is seen.
        assert_eq!(count(&["arm", "put_snapshot", "5xx"]), 0);
        let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_string()).collect();
        assert!(names.contains(&"sigrun_azure_requests_total".to_string()), "{names:?}");
    }
}
