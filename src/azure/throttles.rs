//! Azure's `Retry-After` remembered per resource, for the whole process. Azure throttles a
//! principal, not one call: after a 429 (or a 503 with `Retry-After`) on a path, no request of this
//! process goes to that path before the time Azure gave — whichever run, step or copy of a message
//! asks next (two runs retiring the same old pool, a step retried by another delivery). A request
//! held back this way is answered here as the throttling it would have met, with the time left as
//! its `Retry-After`, so the caller waits or reschedules exactly as for Azure's own answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::AzureError;

#[derive(Default)]
pub struct Throttles {
    /// Lower-cased path (ARM and Batch ids are case-insensitive) → when it may be asked again.
    until: Mutex<HashMap<String, Instant>>,
}

impl Throttles {
    /// The time left before `path` may be asked again, if any.
    pub fn remaining(&self, path: &str) -> Option<Duration> {
        let until = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let left = until
            .get(&path.to_ascii_lowercase())?
            .saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Azure said `path` may be asked again after `retry_after`. Expired entries go at the same
    /// time, so the map holds only what is throttled now.
    pub fn record(&self, path: &str, retry_after: Duration) {
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        until.retain(|_, at| *at > now);
        let at = now + retry_after;
        let entry = until.entry(path.to_ascii_lowercase()).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// The answer for a request held back: Azure's throttling, with the time left.
    pub fn held_back(operation: &str, left: Duration) -> AzureError {
        AzureError {
            operation: operation.to_string(),
            status: Some(429),
            code: Some("TooManyRequests".into()),
            message: format!(
                "not sent: Azure asked for {} ms more before this resource is asked again",
                left.as_millis()
            ),
            request_id: None,
            retry_after: Some(left),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_path_is_held_back_until_its_retry_after_and_case_does_not_matter() {
        let throttles = Throttles::default();
        throttles.record("/subscriptions/S/pools/P", Duration::from_millis(500));
        throttles.record("/subscriptions/S/pools/P", Duration::from_millis(200));
        assert_eq!(
            throttles.remaining("/SUBSCRIPTIONS/s/POOLS/p"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(throttles.remaining("/subscriptions/S/pools/other"), None);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(throttles.remaining("/subscriptions/S/pools/P"), None);
        throttles.record("/x", Duration::from_millis(1));
        assert_eq!(throttles.until.lock().unwrap().len(), 1, "expired entries are dropped");
        let error = Throttles::held_back("POST resize", Duration::from_millis(300));
        assert_eq!(
            (error.status, error.retry_after),
            (Some(429), Some(Duration::from_millis(300)))
        );
    }
}
