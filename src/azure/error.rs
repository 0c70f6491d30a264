//! `AzureError`: one failed Azure call, classified. It names the operation, the HTTP status, Azure's
//! error code and the request id — never a token, a secret or an authorization header.

use std::time::Duration;

/// How the runtime treats an error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorClass {
    /// Network trouble or a 5xx: retry with backoff.
    Transient,
    /// 429 (or a throttling code): retry no sooner than `retry_after`.
    Throttled { retry_after: Option<Duration> },
    /// The request is wrong or forbidden: retrying will not help.
    Permanent,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation}: {}{}{}{}",
    status.map(|s| format!("HTTP {s} ")).unwrap_or_default(),
    code.as_deref().map(|c| format!("{c}: ")).unwrap_or_default(),
    message,
    request_id.as_deref().map(|r| format!(" (request id {r})")).unwrap_or_default())]
pub struct AzureError {
    /// What was attempted, e.g. `PUT snapshot nightly-2026-1126-0-os`.
    pub operation: String,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: String,
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
}

/// The code of a request this process held back to stay inside the budget.
const PACED: &str = "SigrunPaced";

/// Azure error codes that mean "try again later" even on a 4xx.
const RETRYABLE_CODES: &[&str] = &[
    "TooManyRequests",
    "OperationNotAllowed.TooManyRequests",
    "ServerBusy",
    "InternalServerError",
    "ServiceUnavailable",
    "RetryableError",
    "AnotherOperationInProgress",
    "OperationPreempted",
];

impl AzureError {
    pub fn network(operation: impl Into<String>, message: impl Into<String>) -> AzureError {
        AzureError {
            operation: operation.into(),
            status: None,
            code: None,
            message: message.into(),
            request_id: None,
            retry_after: None,
        }
    }

    /// A request not sent: the subscription's budget (as this process estimates it) has no token
    /// for it before `wait`. Throttling that never reached Azure: the step is put off, and it
    /// counts as no failed attempt.
    pub fn paced(operation: &str, wait: Duration) -> AzureError {
        AzureError {
            operation: operation.to_string(),
            status: Some(429),
            code: Some(PACED.to_string()),
            message: format!(
                "not sent: the subscription's request budget has room for it in {} ms",
                wait.as_millis()
            ),
            request_id: None,
            retry_after: Some(wait),
        }
    }

    /// Whether this is [`AzureError::paced`].
    pub fn is_paced(&self) -> bool {
        self.status == Some(429) && self.code.as_deref() == Some(PACED)
    }

    /// A failure the pipeline itself detects (a rule broken, a state Azure reports as Failed).
    pub fn permanent(operation: impl Into<String>, code: &str, message: impl Into<String>) -> AzureError {
        AzureError {
            operation: operation.into(),
            status: None,
            code: Some(code.to_string()),
            message: message.into(),
            request_id: None,
            retry_after: None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self.status {
            None if self.code.is_none() => ErrorClass::Transient,
            None => ErrorClass::Permanent,
            Some(429) => ErrorClass::Throttled {
                retry_after: self.retry_after,
            },
            Some(408) | Some(500..=599) => ErrorClass::Transient,
            Some(409)
                if self.code.as_deref() == Some("OperationNotAllowed")
                    || self.code.as_deref() == Some("PoolNotSteady") =>
            {
                ErrorClass::Transient
            }
            Some(_) if self.code.as_deref().is_some_and(|c| RETRYABLE_CODES.contains(&c)) => {
                if self.code.as_deref() == Some("TooManyRequests") {
                    ErrorClass::Throttled {
                        retry_after: self.retry_after,
                    }
                } else {
                    ErrorClass::Transient
                }
            }
            Some(_) => ErrorClass::Permanent,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, code: &str) -> AzureError {
        AzureError {
            operation: "GET x".into(),
            status: Some(status),
            code: Some(code.into()),
            message: "m".into(),
            request_id: Some("r".into()),
            retry_after: Some(Duration::from_secs(2)),
        }
    }

    #[test]
    fn classes() {
        assert_eq!(http(503, "ServiceUnavailable").class(), ErrorClass::Transient);
        assert_eq!(
            http(429, "TooManyRequests").class(),
            ErrorClass::Throttled {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert_eq!(http(400, "InvalidParameter").class(), ErrorClass::Permanent);
        assert_eq!(http(403, "AuthorizationFailed").class(), ErrorClass::Permanent);
        assert_eq!(http(409, "OperationNotAllowed").class(), ErrorClass::Transient);
        assert_eq!(
            AzureError::network("GET x", "connection reset").class(),
            ErrorClass::Transient
        );
        assert_eq!(
            AzureError::permanent("x", "Specialized", "m").class(),
            ErrorClass::Permanent
        );
        let text = http(400, "InvalidParameter").to_string();
        assert_eq!(text, "GET x: HTTP 400 InvalidParameter: m (request id r)");
    }
}
