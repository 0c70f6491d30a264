//! Azure's `Retry-After` remembered per resource (its host and path: the caller names it), for the
//! whole process. Azure throttles a principal, not one call: after a 429 (or a 503 with
//! `Retry-After`) on a resource, no request of this process goes to it before the time Azure
//! gave — whichever run, step or copy of a message asks next (two runs retiring the same old
//! pool, a step retried by another delivery). A request held back this way is answered here as
//! the throttling it would have met, with the time left as its `Retry-After`, so the caller waits
//! or reschedules exactly as for Azure's own answer.
//!
//! Requests of one resource go one at a time (`one_at_a_time`): a request that went out beside
//! another of the same resource, before that one's 429 came back, would ask Azure again inside
//! the Retry-After it was about to give. Holding the second until the first is answered makes
//! the rule exact, at the cost of a round trip where two requests of one resource coincide (two
//! pools' verify reading their version, two runs adding pools to one Batch account). The caller
//! names the lane; `http::lane_of` gives a read that picks by `$filter` a lane of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

use super::AzureError;

#[derive(Default)]
pub struct Throttles {
    /// Lower-cased resource (ARM and Batch ids are case-insensitive) → when it may be asked again.
    until: Mutex<HashMap<String, Instant>>,
    /// Lower-cased resource → the lane its requests queue in, while one is in flight or waiting.
    lanes: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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

    /// Waits until no other request of this process is out on `path`; the guard holds the path
    /// until the request it covers is answered (and any Retry-After recorded). Lanes nobody holds
    /// or waits for are dropped as others are taken, so the map holds only what is in flight.
    pub async fn one_at_a_time(&self, path: &str) -> OwnedMutexGuard<()> {
        let lane = {
            let mut lanes = self.lanes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            lanes.retain(|_, lane| Arc::strong_count(lane) > 1);
            Arc::clone(lanes.entry(path.to_ascii_lowercase()).or_default())
        };
        lane.lock_owned().await
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

    #[tokio::test]
    async fn a_path_is_asked_one_request_at_a_time_and_its_lane_goes_when_unused() {
        let throttles = Arc::new(Throttles::default());
        let first = throttles.one_at_a_time("/subscriptions/S/pools/P").await;
        let waiting = {
            let throttles = Arc::clone(&throttles);
            tokio::spawn(async move {
                let _second = throttles.one_at_a_time("/SUBSCRIPTIONS/s/pools/p").await;
                throttles.remaining("/subscriptions/S/pools/P")
            })
        };
        // Another path is not held up by this one.
        drop(throttles.one_at_a_time("/subscriptions/S/pools/other").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiting.is_finished(),
            "a second request of the path waits for the first"
        );
        // The first is answered with a 429: the second, let go, sees its Retry-After.
        throttles.record("/subscriptions/S/pools/P", Duration::from_secs(60));
        drop(first);
        let seen = waiting.await.unwrap();
        assert!(seen.is_some_and(|left| left > Duration::from_secs(59)), "{seen:?}");
        drop(throttles.one_at_a_time("/x").await);
        assert_eq!(throttles.lanes.lock().unwrap().len(), 1, "unused lanes are dropped");
    }
}
