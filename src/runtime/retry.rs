//! What to do with a failed step, decided from the error's class alone: retry a transient failure
//! after an exponential, jittered delay; retry a throttled one no sooner than its `Retry-After`;
//! fail the branch on a permanent one, or once the step has been tried `max_attempts` times. Pure
//! functions: the message carries the attempt count, so no worker keeps any retry state.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::settings::RetrySettings;
use crate::azure::{AzureError, ErrorClass};
use crate::events::EventKind;

/// The runtime's answer to a failed step.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Try the step again after `delay`; `attempt` is the message's new count of failed tries.
    Retry {
        attempt: u32,
        delay: Duration,
        event: EventKind,
    },
    /// Fail the branch; `give_up` tells an exhausted retry budget from a permanent error.
    Fail { reason: String, give_up: bool },
}

/// The delay before retry number `retry` (1 for the first): `base · factor^(retry-1)`, capped at
/// `max_delay`, with jitter spreading it over `[d, 2d)` and the result capped at `max_delay` again,
/// so the setting is a true upper bound.
pub fn backoff_delay(policy: &RetrySettings, retry: u32) -> Duration {
    let mut builder = ExponentialBuilder::new()
        .with_min_delay(policy.base_delay)
        .with_factor(policy.factor)
        .with_max_delay(policy.max_delay)
        .without_max_times();
    if policy.jitter {
        builder = builder.with_jitter();
    }
    // The message carries only its count, so the sequence is rebuilt and walked to that retry.
    let step = usize::try_from(retry.max(1) - 1).unwrap_or(usize::MAX);
    builder
        .build()
        .nth(step)
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay)
}

/// Decides what follows `error` on a message that had failed `failed_before` times in a row.
pub fn decide(policy: &RetrySettings, failed_before: u32, error: &AzureError) -> Decision {
    let failures = failed_before.saturating_add(1);
    let class = error.class();
    if class == ErrorClass::Permanent {
        return Decision::Fail {
            reason: error.to_string(),
            give_up: false,
        };
    }
    if failures >= policy.max_attempts {
        return Decision::Fail {
            reason: format!("gave up after {failures} attempts: {error}"),
            give_up: true,
        };
    }
    // Whatever the class, Azure's word on when to come back is a floor.
    let backoff = backoff_delay(policy, failures).max(error.retry_after.unwrap_or_default());
    match class {
        ErrorClass::Throttled { retry_after } => Decision::Retry {
            attempt: failures,
            // The server's word is a floor, not a cap: never sooner, and still backing off.
            delay: backoff.max(retry_after.unwrap_or_default()),
            event: EventKind::Throttled {
                retry_after_ms: retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            },
        },
        _ => Decision::Retry {
            attempt: failures,
            delay: backoff,
            event: EventKind::Retried {
                attempt: failures,
                error: error.to_string(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: bool) -> RetrySettings {
        RetrySettings {
            base_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter,
            max_attempts: 8,
        }
    }

    fn throttled(retry_after: Option<Duration>) -> AzureError {
        AzureError {
            operation: "GET pool".into(),
            status: Some(429),
            code: Some("TooManyRequests".into()),
            message: "slow down".into(),
            request_id: None,
            retry_after,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let delays: Vec<u64> = (1..=11).map(|n| backoff_delay(&policy(false), n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn jitter_stays_within_its_band_and_under_the_cap() {
        for _ in 0..200 {
            for n in 1..=10 {
                let plain = backoff_delay(&policy(false), n);
                let jittered = backoff_delay(&policy(true), n);
                assert!(jittered >= plain, "retry {n}: {jittered:?} < {plain:?}");
                assert!(
                    jittered < plain * 2 || jittered == policy(true).max_delay,
                    "retry {n}: {jittered:?}"
                );
                assert!(jittered <= policy(true).max_delay);
            }
        }
    }

    #[test]
    fn transient_errors_retry_until_the_budget_is_spent() {
        let error = AzureError::network("GET x", "connection reset");
        match decide(&policy(false), 2, &error) {
            Decision::Retry { attempt, delay, event } => {
                assert_eq!((attempt, delay), (3, Duration::from_secs(4)));
                assert!(matches!(event, EventKind::Retried { attempt: 3, ref error } if error.contains("reset")));
            }
            other => panic!("{other:?}"),
        }
        match decide(&policy(false), 7, &error) {
            Decision::Fail { reason, give_up } => {
                assert!(give_up);
                assert!(reason.starts_with("gave up after 8 attempts: GET x"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn throttling_waits_at_least_retry_after() {
        let Decision::Retry { delay, event, .. } = decide(&policy(true), 0, &throttled(Some(Duration::from_secs(90))))
        else {
            panic!("throttling is retried");
        };
        assert_eq!(delay, Duration::from_secs(90));
        assert_eq!(
            event,
            EventKind::Throttled {
                retry_after_ms: Some(90_000)
            }
        );
        let Decision::Retry { delay, .. } = decide(&policy(false), 3, &throttled(Some(Duration::from_secs(2)))) else {
            panic!("throttling is retried");
        };
        assert_eq!(
            delay,
            Duration::from_secs(8),
            "backoff still grows past a short Retry-After"
        );
        let Decision::Retry { delay, .. } = decide(&policy(false), 0, &throttled(None)) else {
            panic!("throttling is retried");
        };
        assert_eq!(delay, Duration::from_secs(1));
    }

    #[test]
    fn permanent_errors_fail_at_once() {
        let error = AzureError::permanent("PUT image", "Specialized", "specialized images are refused");
        assert_eq!(
            decide(&policy(true), 0, &error),
            Decision::Fail {
                reason: error.to_string(),
                give_up: false
            }
        );
    }
}
