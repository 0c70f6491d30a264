//! The request log the control API serves: every request the emulator answered (or cut), in order,
//! with enough to count calls by kind and to check that a client honoured `Retry-After`.

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Ctx;
use super::faults::Api;
use super::http::{Request, Response};

#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub seq: u64,
    /// Real time the answer was sent (RFC 3339).
    pub time: String,
    /// Real milliseconds since the emulator started (monotonic), at the answer.
    pub elapsed_ms: f64,
    /// The same when the request arrived: a request that arrived before an earlier answer was
    /// sent was on its way before the client could read that answer.
    pub received_ms: f64,
    pub api: Api,
    pub method: String,
    pub path: String,
    pub query: String,
    /// HTTP status sent; 0 when the connection was cut instead.
    pub status: u16,
    pub fault: Option<String>,
    /// `Retry-After` sent with the answer, in milliseconds of real time.
    pub retry_after_ms: Option<u64>,
    pub request_id: Option<String>,
    /// The client's `User-Agent` (sigrun's names its process), at most 200 characters.
    pub user_agent: Option<String>,
    /// Emulated time at the answer.
    pub emulated_time: String,
}

impl LogEntry {
    pub fn new(
        ctx: &Ctx,
        received_ms: f64,
        api: Api,
        request: &Request,
        status: u16,
        fault: Option<String>,
        response: &Response,
    ) -> LogEntry {
        let retry_after_ms = response
            .header("retry-after-ms")
            .and_then(|v| v.parse::<u64>().ok())
            .or_else(|| {
                response
                    .header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|s| s.saturating_mul(1000))
            });
        LogEntry {
            seq: ctx.next_seq(),
            time: OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default(),
            elapsed_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
            received_ms,
            api,
            method: request.method.to_string(),
            path: request.path.clone(),
            query: request
                .query
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&"),
            status,
            fault,
            retry_after_ms,
            request_id: response
                .header("x-ms-request-id")
                .or_else(|| response.header("request-id"))
                .map(str::to_string),
            user_agent: request.header("user-agent").map(|ua| ua.chars().take(200).collect()),
            emulated_time: ctx.clock.now().format(&Rfc3339).unwrap_or_default(),
        }
    }
}
