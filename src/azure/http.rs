//! One HTTP exchange with Azure, done right once for every operation: the bearer token for the
//! right audience (ARM or Batch; Batch only ever with Azure AD, never Shared Key), a client request
//! id, JSON bodies in each API's content type, ARM's and Batch's error bodies turned into
//! `AzureError` (status, code, request id, `Retry-After`), and short retries of what passes in
//! seconds (network failures, 408, 429, 5xx) that never resend before `Retry-After` has passed.
//! Each attempt is logged at debug level with method, path, status, request id and duration;
//! headers, tokens and bodies are never logged.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use backon::{ExponentialBuilder, Retryable};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, Url};
use serde_json::Value;
use tokio::sync::OwnedMutexGuard;
use url::Position;

use super::config::{AzureSettings, RetrySettings, SettingsError};
use super::error::AzureError;
use super::metrics::AzureMetrics;
use super::pacing::{self, Admit, Pacer};
use super::throttles::Throttles;

/// Which API a request goes to; it picks the token scope and the header conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Arm,
    Batch,
}

/// Batch wants this content type on request bodies (its spec's `consumes`).
const BATCH_CONTENT_TYPE: &str = "application/json; odata=minimalmetadata";

/// `sigrun/VERSION (instance ID)`: the instance is random per process, so Azure's activity log
/// (and the emulator's request log) tells which worker asked — what an operator needs when one
/// process misbehaves, and how the chaos test checks each process honours `Retry-After`.
fn user_agent() -> String {
    static INSTANCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let instance = INSTANCE.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..12].to_string());
    format!("sigrun/{} (instance {instance})", env!("CARGO_PKG_VERSION"))
}

/// Idle connections kept open to one host. reqwest keeps every connection a burst opened (for
/// 90 s, without a bound), each with its TLS and HTTP buffers: a worker looking at thousands of
/// waiting runs kept 25 to the same host and 2 MiB more memory. Within ARM's budget (35 requests
/// a second per subscription, each 0.1–1 s) a worker seldom has more than 16 requests in flight
/// to one host, so those stay open and a burst beyond them costs a handshake each.
const IDLE_CONNECTIONS_PER_HOST: usize = 16;

/// The reqwest client all Azure traffic (token requests included) goes through.
pub fn build_client(settings: &AzureSettings) -> Result<reqwest::Client, SettingsError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent())
        .timeout(settings.request_timeout())
        .connect_timeout(settings.request_timeout().min(Duration::from_secs(10)))
        // Azure's APIs answer, they do not redirect; following one could carry a token elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_HOST);
    if let Some(path) = &settings.extra_ca_cert {
        let key = "extra_ca_cert";
        let pem =
            std::fs::read(path).map_err(|e| SettingsError::new(key, format!("cannot read {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| SettingsError::new(key, format!("{} is not a PEM bundle: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(SettingsError::new(
                key,
                format!("{} holds no certificate", path.display()),
            ));
        }
        // Merged with the system roots, so the same client still reaches real Azure.
        builder = builder.tls_certs_merge(certs);
    }
    builder
        .build()
        .map_err(|e| SettingsError::new("extra_ca_cert", format!("cannot build the HTTP client: {e}")))
}

/// One request to make.
pub struct Call<'a> {
    pub method: Method,
    pub url: Url,
    pub audience: Audience,
    pub body: Option<&'a Value>,
    /// What is attempted, for errors and logs, e.g. `PUT snapshot nightly-os`.
    pub operation: String,
}

impl<'a> Call<'a> {
    pub fn new(method: Method, url: Url, audience: Audience, operation: impl Into<String>) -> Call<'a> {
        Call {
            method,
            url,
            audience,
            body: None,
            operation: operation.into(),
        }
    }

    pub fn body(mut self, body: &'a Value) -> Call<'a> {
        self.body = Some(body);
        self
    }
}

/// A successful answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    /// `Null` when the answer had no body.
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(&self.headers)
    }
}

/// Why an attempt failed: getting the token (the credential retries on its own) or the request.
enum Failure {
    Token(AzureError),
    Http(AzureError),
}

impl Failure {
    fn error(&self) -> &AzureError {
        match self {
            Failure::Token(e) | Failure::Http(e) => e,
        }
    }

    fn into_error(self) -> AzureError {
        match self {
            Failure::Token(e) | Failure::Http(e) => e,
        }
    }

    /// Worth another try within this call: network trouble and the statuses Azure's own SDKs retry.
    fn retry_here(&self) -> bool {
        match self {
            Failure::Token(_) => false,
            Failure::Http(e) => match e.status {
                None => e.code.is_none(),
                Some(status) => matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
            },
        }
    }
}

tokio::task_local! {
    static HAND_BACK_RETRY_AFTER: bool;
}

/// Runs `work` with every Azure answer that carries a `Retry-After` handed back to it at once
/// instead of waited out inside the client: a stage step's runtime then holds the step's message
/// until then, so the wait is written into the run's state (and a worker killed meanwhile leaves
/// no copy that would look again sooner).
pub async fn hand_back_retry_after<F: std::future::Future>(work: F) -> F::Output {
    HAND_BACK_RETRY_AFTER.scope(true, work).await
}

/// Sends requests with tokens and retries; shared by the ARM and Batch halves of the client.
pub struct Http {
    client: reqwest::Client,
    credential: Arc<dyn TokenCredential>,
    arm_scope: String,
    batch_scope: String,
    retry: RetrySettings,
    /// Set once, when the process exports metrics.
    metrics: OnceLock<Arc<AzureMetrics>>,
    /// Paths Azure asked this process not to ask again yet.
    throttles: Throttles,
    /// What is left of each subscription's request budget, as far as this process knows.
    pacer: Pacer,
    /// Longest a request waits here for its budget before it is handed back.
    pacing_hold: Duration,
}

impl Http {
    pub fn new(client: reqwest::Client, credential: Arc<dyn TokenCredential>, settings: &AzureSettings) -> Http {
        Http {
            client,
            credential,
            arm_scope: settings.cloud.arm_scope.clone(),
            batch_scope: settings.cloud.batch_scope.clone(),
            retry: settings.retry.clone(),
            metrics: OnceLock::new(),
            throttles: Throttles::default(),
            pacer: Pacer::new(settings.pacing.clone()),
            pacing_hold: settings.pacing.hold(),
        }
    }

    /// Counts every attempt from now on in `metrics` (the first call wins).
    pub fn set_metrics(&self, metrics: Arc<AzureMetrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn record_attempt(&self, audience: Audience, status: Option<u16>, elapsed: Duration, retry_after: bool) {
        if let Some(metrics) = self.metrics.get() {
            metrics.attempt(audience, status, elapsed, retry_after);
        }
    }

    /// Sends `call`, retrying transient failures; a 4xx/5xx that is not retried (or still fails)
    /// comes back as the `AzureError` Azure's body describes. Inside [`hand_back_retry_after`], an
    /// answer with a `Retry-After` is not waited out here but returned at once.
    pub async fn send(&self, call: &Call<'_>) -> Result<Reply, AzureError> {
        // One id for all attempts, so Azure support can join them.
        let client_request_id = uuid::Uuid::new_v4().to_string();
        let attempts = AtomicU32::new(0);
        let started = Instant::now();
        let budget = self.retry.max_total();
        let backoff = ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.retry.min_delay())
            .with_max_delay(self.retry.max_delay())
            .with_max_times(self.retry.max_attempts.saturating_sub(1) as usize);
        let attempt = || self.attempt(call, &client_request_id, attempts.fetch_add(1, Ordering::Relaxed) + 1);
        attempt
            .retry(backoff)
            .when(Failure::retry_here)
            .adjust(|failure: &Failure, proposed| {
                // Held back for the budget: the caller puts the step off (see `paced`).
                if failure.error().is_paced() {
                    return None;
                }
                // `None` from the backoff means the attempts are used up.
                let backoff = proposed?;
                // Azure said when to come back: exactly then, never sooner (nor later, as a
                // backoff of our own would add nothing but delay).
                let wait = failure.error().retry_after.unwrap_or(backoff);
                let asked = failure.error().retry_after.is_some();
                let handed_back = (asked && HAND_BACK_RETRY_AFTER.try_with(|h| *h).unwrap_or(false))
                    // Longer than this call may wait: the caller gets the error with its
                    // `retry_after` and reschedules.
                    || started.elapsed() + wait > budget;
                // Waited here or, handed back, by the caller (the runtime holds the message at
                // least that long): counted either way, so the metric is all of Azure's asking.
                if asked && let Some(metrics) = self.metrics.get() {
                    metrics.waited(call.audience, wait);
                }
                (!handed_back).then_some(wait)
            })
            .notify(|failure: &Failure, wait| {
                let e = failure.error();
                tracing::debug!(
                    operation = %call.operation,
                    status = e.status,
                    code = e.code.as_deref(),
                    wait_ms = wait.as_millis() as u64,
                    "azure request will be retried"
                );
            })
            .await
            .map_err(Failure::into_error)
    }

    /// Gets a token for `audience` (the credential caches it): whether calls could be made now.
    pub async fn check_token(&self, audience: Audience) -> Result<(), AzureError> {
        let scope = match audience {
            Audience::Arm => &self.arm_scope,
            Audience::Batch => &self.batch_scope,
        };
        self.credential
            .get_token(&[scope.as_str()], None)
            .await
            .map(|_| ())
            .map_err(|e| token_error(scope, e))
    }

    /// The HTTP request of one attempt: token, ids and body as each API wants them.
    fn request(&self, call: &Call<'_>, token: &str, client_request_id: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .request(call.method.clone(), call.url.clone())
            // bearer_auth marks the header sensitive, which keeps it out of reqwest's own Debug.
            .bearer_auth(token)
            .header(ACCEPT, "application/json");
        request = match call.audience {
            Audience::Arm => request.header("x-ms-client-request-id", client_request_id),
            Audience::Batch => request.header("client-request-id", client_request_id),
        };
        if let Some(body) = call.body {
            let content_type = match call.audience {
                Audience::Arm => "application/json",
                Audience::Batch => BATCH_CONTENT_TYPE,
            };
            let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
            request = request.header(CONTENT_TYPE, content_type).body(bytes);
        } else if call.method == Method::POST {
            // ARM and Batch want a length on a bodiless POST (register, resize without body).
            request = request.header(reqwest::header::CONTENT_LENGTH, "0");
        }
        request
    }

    /// Waits until the request's budget admits it: here, for at most the pacing hold inside a
    /// step (longer, it is handed back as `AzureError::paced` and the step is put off on a delay
    /// tier instead of holding a consumer), and at most as long as a call may retry outside one
    /// (longer, the caller gets the paced error, a throttling with its `retry_after`). The request is
    /// in flight for the pacer until what this returns is dropped.
    async fn paced<'a>(&'a self, call: &Call<'_>, scope: &'a pacing::Scope) -> Result<pacing::InFlight<'a>, Failure> {
        let urgency = pacing::current_urgency();
        let limit = self.wait_limit();
        let started = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let wait = match self.pacer.admit(scope, urgency, now) {
                Admit::Go => {
                    return Ok(pacing::InFlight {
                        pacer: &self.pacer,
                        scope,
                    });
                }
                Admit::Wait(wait) => wait,
            };
            if now.saturating_duration_since(started) + wait > limit {
                return Err(Failure::Http(AzureError::paced(&call.operation, wait)));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Held back, as Azure's own 429 would, while a Retry-After on the call's resource runs.
    fn not_throttled(&self, call: &Call<'_>) -> Result<(), Failure> {
        match self.throttles.remaining(resource_of(&call.url)) {
            Some(left) => Err(Failure::Http(Throttles::held_back(&call.operation, left))),
            None => Ok(()),
        }
    }

    /// The longest a request waits here for its budget: inside a step the pacing hold (longer,
    /// it is handed back as `AzureError::paced` and the step is put off on a delay tier instead of
    /// holding a consumer); outside one as long as a call may retry.
    fn wait_limit(&self) -> Duration {
        let handing_back = HAND_BACK_RETRY_AFTER.try_with(|h| *h).unwrap_or(false);
        if handing_back {
            self.pacing_hold
        } else {
            self.longest_wait()
        }
    }

    /// As long as a call may retry (and never shorter than the pacing hold).
    fn longest_wait(&self) -> Duration {
        self.pacing_hold.max(self.retry.max_total())
    }

    /// The call's turn on its resource: one request of it at a time in this process, checked
    /// again once it is this one's turn (a 429 that came back while it waited holds it back, never
    /// sent; only a request of this resource records its Retry-After, so none can appear while the
    /// lane is held). A lane is held for one round trip, which the request timeout bounds, not for
    /// Azure time (the pacing hold, which a fast emulated clock makes milliseconds): a turn that
    /// does not come within as long as a call may retry is handed back as paced, never sent.
    async fn turn(&self, call: &Call<'_>) -> Result<OwnedMutexGuard<()>, Failure> {
        let limit = self.longest_wait();
        let lane = tokio::time::timeout(limit, self.throttles.one_at_a_time(&lane_of(&call.url)))
            .await
            .map_err(|_| Failure::Http(AzureError::paced(&call.operation, limit)))?;
        self.not_throttled(call)?;
        Ok(lane)
    }

    /// Sends one request and reads its whole answer. A throttling's Retry-After is remembered as
    /// soon as its headers are read, so it holds even when the body is lost; a network failure is
    /// recorded and handed back as one.
    async fn exchange(
        &self,
        call: &Call<'_>,
        token: &str,
        client_request_id: &str,
        attempt: u32,
    ) -> Result<Answer, Failure> {
        let request = self.request(call, token, client_request_id);
        let sent = Instant::now();
        let failed = |err: reqwest::Error| {
            let message = describe(&err);
            tracing::debug!(
                method = %call.method,
                path = call.url.path(),
                attempt,
                elapsed_ms = sent.elapsed().as_millis() as u64,
                error = message,
                "azure request failed"
            );
            self.record_attempt(call.audience, None, sent.elapsed(), false);
            Failure::Http(AzureError::network(call.operation.clone(), message))
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if let (429 | 503, Some(wait)) = (status, retry_after(&headers)) {
            self.throttles.record(resource_of(&call.url), wait);
        }
        let body = response.bytes().await.map_err(failed)?;
        Ok(Answer {
            status,
            headers,
            body,
            sent,
        })
    }

    async fn attempt(&self, call: &Call<'_>, client_request_id: &str, attempt: u32) -> Result<Reply, Failure> {
        self.not_throttled(call)?;
        // The token first: it costs no budget and never reaches the resource.
        let scope = match call.audience {
            Audience::Arm => &self.arm_scope,
            Audience::Batch => &self.batch_scope,
        };
        let token = self
            .credential
            .get_token(&[scope.as_str()], None)
            .await
            .map_err(|e| Failure::Token(token_error(scope, e)))?;
        let bucket = pacing::scope_of(&call.method, &call.url, call.audience == Audience::Arm);
        // Held until this attempt ends: the pacer counts it in flight until then.
        let _in_flight = match &bucket {
            Some(bucket) => Some(self.paced(call, bucket).await?),
            None => None,
        };
        // The lane last, so it is held for the exchange alone: a request waiting for its budget
        // holds up no other request of its resource.
        let _lane = self.turn(call).await?;
        super::writes::note_sent(&call.method);
        let answer = self
            .exchange(call, token.token.secret(), client_request_id, attempt)
            .await?;
        let Answer {
            status, headers, sent, ..
        } = &answer;
        self.record_attempt(
            call.audience,
            Some(*status),
            sent.elapsed(),
            retry_after(headers).is_some(),
        );
        if let Some(bucket) = &bucket {
            self.observe_budget(call, bucket, &answer);
        }
        tracing::debug!(
            method = %call.method,
            path = call.url.path(),
            status,
            request_id = request_id(headers).as_deref(),
            attempt,
            elapsed_ms = sent.elapsed().as_millis() as u64,
            "azure request"
        );
        reply(call, answer)
    }

    /// What an answer tells the pacer about the budget. A 429 empties the bucket only when it is
    /// the budget's own (ARM says so by its code; Batch, which sends no counts, by any 429); a
    /// per-resource throttle stays with `throttles`, held for its resource alone.
    fn observe_budget(&self, call: &Call<'_>, bucket: &pacing::Scope, answer: &Answer) {
        let exhausted = answer.status == 429
            && (call.audience == Audience::Batch
                || error_code(&answer.body).as_deref() == Some(pacing::BUDGET_THROTTLED));
        let now = tokio::time::Instant::now();
        let headers = &answer.headers;
        self.pacer
            .observe(bucket, exhausted, headers, retry_after(headers), now);
    }
}

/// One answer, whole: status, headers, body, and when its request was sent.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: bytes::Bytes,
    sent: Instant,
}

/// The answer as the caller takes it: Azure's error, or the body as JSON (`null` when empty).
fn reply(call: &Call<'_>, answer: Answer) -> Result<Reply, Failure> {
    let Answer {
        status, headers, body, ..
    } = answer;
    if status >= 400 {
        return Err(Failure::Http(parse_error(&call.operation, status, &headers, &body)));
    }
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            Failure::Http(AzureError {
                operation: call.operation.clone(),
                status: Some(status),
                code: Some("UnexpectedResponse".into()),
                message: format!("the answer is not JSON: {e}"),
                request_id: request_id(&headers),
                retry_after: None,
            })
        })?
    };
    Ok(Reply { status, headers, body })
}

/// What a Retry-After is remembered for and what requests queue on: the host (with its port) and
/// the path, so a Batch account's `/pools/p` is not another account's, and the resource's reads
/// with different queries (`$expand`, `api-version`) are one.
fn resource_of(url: &Url) -> &str {
    &url[Position::BeforeHost..Position::AfterPath]
}

/// What requests queue on: the resource, and the `$filter` of a read that picks within a
/// collection (each pool's `/nodecounts?$filter=poolId eq '…'` is a question of its own, and one
/// Batch account's pools should not wait on each other's).
fn lane_of(url: &Url) -> String {
    let resource = resource_of(url);
    match url.query_pairs().find(|(key, _)| key == "$filter") {
        Some((_, filter)) => format!("{resource}?$filter={filter}"),
        None => resource.to_string(),
    }
}

/// A reqwest failure as text: what went wrong and its causes, without the URL (its query is
/// nobody's business in a log line).
fn describe(err: &reqwest::Error) -> String {
    let mut text = if err.is_timeout() {
        "timed out".to_string()
    } else if err.is_connect() {
        "could not connect".to_string()
    } else if err.is_body() || err.is_decode() {
        "failed while reading the answer".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `x-ms-request-id` (ARM) or `request-id` (Batch).
pub fn request_id(headers: &HeaderMap) -> Option<String> {
    ["x-ms-request-id", "request-id"]
        .iter()
        .find_map(|name| headers.get(*name).and_then(|v| v.to_str().ok()))
        .map(str::to_string)
}

/// How long Azure asks to wait: the millisecond headers when present (they are precise), else
/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    stated_retry_after(headers).map(|wait| wait.min(MAX_RETRY_AFTER))
}

/// The longest wait a `Retry-After` is taken for. Azure asks for seconds to minutes; a header
/// beyond a day (a broken proxy, a hostile answer) is read as a day, so no deadline computed from
/// it can overflow.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

fn stated_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    for name in ["retry-after-ms", "x-ms-retry-after-ms"] {
        let Some(value) = text(name) else { continue };
        // Whole milliseconds exactly; a fractional value through f64.
        if let Ok(ms) = value.parse::<u64>() {
            return Some(Duration::from_millis(ms));
        }
        if let Some(wait) = value.parse::<f64>().ok().and_then(|ms| seconds(ms / 1000.0)) {
            return Some(wait);
        }
    }
    let value = text("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let date = time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc2822).ok()?;
    let wait = date - time::OffsetDateTime::now_utc();
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// A non-negative number of seconds as a wait (one too long for a `Duration` is the longest).
fn seconds(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0).then(|| Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER))
}

/// An error answer as an `AzureError`. Understands ARM's `{"error":{"code","message","details"}}`,
/// Batch's `{"code","message":{"value"},"values"}` and Entra's `{"error","error_description"}`.
pub fn parse_error(operation: &str, status: u16, headers: &HeaderMap, body: &[u8]) -> AzureError {
    let (code, mut message) = match serde_json::from_slice::<Value>(body) {
        Ok(json) => error_fields(&json),
        Err(_) => (None, snippet(&String::from_utf8_lossy(body))),
    };
    if message.is_empty() {
        message = reqwest::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error")
            .to_string();
    }
    AzureError {
        operation: operation.to_string(),
        status: Some(status),
        code,
        message,
        request_id: request_id(headers),
        retry_after: retry_after(headers),
    }
}

/// Azure's error code in an error body, if it has one.
fn error_code(body: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|json| error_fields(&json).0)
}

fn error_fields(json: &Value) -> (Option<String>, String) {
    let text = |v: &Value| v.as_str().map(str::to_string);
    if let Some(error) = json.get("error").filter(|e| e.is_object()) {
        let mut message = error["message"].as_str().unwrap_or_default().to_string();
        if let Some(details) = error["details"].as_array() {
            let parts: Vec<String> = details
                .iter()
                .filter_map(|d| {
                    let code = d["code"].as_str()?;
                    Some(format!("{code}: {}", d["message"].as_str().unwrap_or_default()))
                })
                .collect();
            if !parts.is_empty() {
                message = format!("{message} [{}]", parts.join("; "));
            }
        }
        return (text(&error["code"]), message);
    }
    if let Some(code) = text(&json["code"]) {
        let raw = json["message"]["value"]
            .as_str()
            .or_else(|| json["message"].as_str())
            .unwrap_or_default();
        // Batch appends "\nRequestId:...\nTime:..." to every message; the request id is kept apart.
        let mut message = raw.split("\nRequestId:").next().unwrap_or_default().trim().to_string();
        if let Some(values) = json["values"].as_array() {
            let parts: Vec<String> = values
                .iter()
                .filter_map(|v| {
                    Some(format!(
                        "{}={}",
                        v["key"].as_str()?,
                        v["value"].as_str().unwrap_or_default()
                    ))
                })
                .collect();
            if !parts.is_empty() {
                message = format!("{message} ({})", parts.join(", "));
            }
        }
        return (Some(code), message);
    }
    if let Some(code) = text(&json["error"]) {
        let description = json["error_description"].as_str().unwrap_or_default();
        return (Some(code), description.lines().next().unwrap_or_default().to_string());
    }
    (None, snippet(&json.to_string()))
}

fn snippet(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// A failed token request as an `AzureError`: Entra's answer when there was one (a wrong secret is
/// permanent, a throttled or failing authority is not), a network failure, or a credential that
/// cannot work at all (no `az` login, no token file).
fn token_error(scope: &str, err: azure_core::Error) -> AzureError {
    let operation = format!("get token for {scope}");
    let mut cause: Option<&azure_core::Error> = Some(&err);
    let mut network = false;
    while let Some(e) = cause {
        match e.kind() {
            azure_core::error::ErrorKind::HttpResponse { status, error_code, .. } => {
                return AzureError {
                    operation,
                    status: Some(u16::from(*status)),
                    code: Some(
                        error_code
                            .as_deref()
                            .map(|c| format!("AADSTS{c}"))
                            .unwrap_or_else(|| "CredentialFailed".into()),
                    ),
                    message: err.to_string(),
                    request_id: None,
                    retry_after: None,
                };
            }
            azure_core::error::ErrorKind::Connection | azure_core::error::ErrorKind::Io => network = true,
            _ => {}
        }
        cause = e.get_ref().and_then(|inner| inner.downcast_ref::<azure_core::Error>());
    }
    let message = err.to_string();
    if let Some(code) = aadsts_code(&message) {
        // Entra answered with an error, but azure_identity 1.0 could not read its body (it borrows
        // `error_description`, which fails on the `\r\n` escapes Entra always puts there), so the
        // status is lost; the AADSTS code in the message still says what happened.
        return AzureError::permanent(operation, &code, message);
    }
    if network {
        AzureError::network(operation, message)
    } else {
        AzureError::permanent(operation, "CredentialUnavailable", message)
    }
}

/// The first `AADSTS<digits>` in `text`.
fn aadsts_code(text: &str) -> Option<String> {
    let start = text.find("AADSTS")?;
    let digits: String = text[start + 6..].chars().take_while(char::is_ascii_digit).collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;
    use crate::azure::ErrorClass;

    #[test]
    fn a_resource_is_its_host_and_path_whatever_the_query() {
        let url = |u: &str| Url::parse(u).unwrap();
        let a = url("https://a.westeurope.batch.azure.com/pools/p?api-version=2024-07-01.20.0");
        let b = url("https://b.westeurope.batch.azure.com/pools/p?api-version=2024-07-01.20.0");
        assert_eq!(resource_of(&a), "a.westeurope.batch.azure.com/pools/p");
        assert_ne!(
            resource_of(&a),
            resource_of(&b),
            "another account's pool of the same name"
        );
        let version = "https://management.azure.com/subscriptions/s/versions/1.0.0";
        let expanded = url(&format!("{version}?api-version=2024-03-03&$expand=ReplicationStatus"));
        assert_eq!(resource_of(&expanded), resource_of(&url(version)));
        assert_eq!(resource_of(&url("https://127.0.0.1:8443/x")), "127.0.0.1:8443/x");
        // Each pool's node counts are their own lane; a version's reads share one.
        let counts = |pool: &str| {
            url(&format!(
                "https://a.b.batch.azure.com/nodecounts?$filter=poolId eq '{pool}'"
            ))
        };
        assert_ne!(lane_of(&counts("p1")), lane_of(&counts("p2")));
        assert_eq!(lane_of(&expanded), resource_of(&expanded));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn arm_error_body() {
        let body = br#"{"error":{"code":"InvalidParameter","message":"Duplicate regions are not allowed.","target":"publishingProfile.targetRegions"}}"#;
        let h = headers(&[("x-ms-request-id", "rid-1"), ("x-ms-correlation-request-id", "c")]);
        let err = parse_error("PUT version 1.0.0", 400, &h, body);
        assert_eq!(err.status, Some(400));
        assert_eq!(err.code.as_deref(), Some("InvalidParameter"));
        assert_eq!(err.message, "Duplicate regions are not allowed.");
        assert_eq!(err.request_id.as_deref(), Some("rid-1"));
        assert_eq!(err.class(), ErrorClass::Permanent);
    }

    #[test]
    fn arm_error_with_details() {
        let body = br#"{"error":{"code":"OperationNotAllowed","message":"Throttled.","details":[{"code":"TooManyRequests","message":"HighCostGet30Min"}]}}"#;
        let err = parse_error("GET x", 409, &HeaderMap::new(), body);
        assert_eq!(err.message, "Throttled. [TooManyRequests: HighCostGet30Min]");
    }

    #[test]
    fn batch_error_body() {
        let body = br#"{"odata.metadata":"https://a.westeurope.batch.azure.com/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element","code":"InvalidPropertyValue","message":{"lang":"en-US","value":"The value provided for one of the properties in the request body is invalid.\nRequestId:0d0e\nTime:2026-01-01T00:00:00Z"},"values":[{"key":"PropertyName","value":"resizeTimeout"},{"key":"Reason","value":"too short"}]}"#;
        let h = headers(&[("request-id", "0d0e")]);
        let err = parse_error("POST pool p", 400, &h, body);
        assert_eq!(err.code.as_deref(), Some("InvalidPropertyValue"));
        assert_eq!(
            err.message,
            "The value provided for one of the properties in the request body is invalid. (PropertyName=resizeTimeout, Reason=too short)"
        );
        assert_eq!(err.request_id.as_deref(), Some("0d0e"));
    }

    #[test]
    fn throttling_prefers_milliseconds() {
        for absurd in ["1e300", "18446744073709551615", "99999999999999999999999"] {
            for name in ["retry-after", "retry-after-ms", "x-ms-retry-after-ms"] {
                let h = headers(&[(name, absurd)]);
                assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER), "{name}: {absurd}");
            }
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        let h = headers(&[("retry-after", "1"), ("retry-after-ms", "300"), ("request-id", "r")]);
        let body = br#"{"code":"TooManyRequests","message":{"value":"busy"}}"#;
        let err = parse_error("GET pool", 429, &h, body);
        assert_eq!(err.retry_after, Some(Duration::from_millis(300)));
        assert_eq!(
            err.class(),
            ErrorClass::Throttled {
                retry_after: Some(Duration::from_millis(300))
            }
        );
        let h = headers(&[("x-ms-retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")])), None);
        let past = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after(&past), Some(Duration::ZERO));
        let soon = time::OffsetDateTime::now_utc() + time::Duration::seconds(120);
        let text = soon.format(&time::format_description::well_known::Rfc2822).unwrap();
        let wait = retry_after(&headers(&[("retry-after", &text)])).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
    }

    #[test]
    fn odd_bodies_still_make_errors() {
        let err = parse_error("GET x", 502, &HeaderMap::new(), b"<html>Bad Gateway</html>");
        assert_eq!(err.code, None);
        assert_eq!(err.message, "<html>Bad Gateway</html>");
        assert_eq!(err.class(), ErrorClass::Transient);
        let err = parse_error("GET x", 503, &HeaderMap::new(), b"");
        assert_eq!(err.message, "Service Unavailable");
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#;
        let err = parse_error("token", 401, &HeaderMap::new(), body);
        assert_eq!(err.code.as_deref(), Some("invalid_client"));
        assert_eq!(err.message, "AADSTS7000215: Invalid client secret provided.");
    }

    #[test]
    fn aadsts_codes_are_found_in_messages() {
        let text = "ClientSecretCredential authentication failed. invalid type: string \"AADSTS7000215: Invalid client secret\"";
        assert_eq!(aadsts_code(text).as_deref(), Some("AADSTS7000215"));
        assert_eq!(aadsts_code("AADSTS: nothing"), None);
        assert_eq!(aadsts_code("no code"), None);
    }

    #[test]
    fn what_is_retried_here() {
        let http = |status| Failure::Http(parse_error("x", status, &HeaderMap::new(), b""));
        assert!(http(429).retry_here());
        assert!(http(503).retry_here());
        assert!(http(408).retry_here());
        assert!(!http(400).retry_here());
        assert!(!http(409).retry_here());
        assert!(!http(501).retry_here());
        assert!(Failure::Http(AzureError::network("x", "reset")).retry_here());
        assert!(!Failure::Token(AzureError::network("x", "reset")).retry_here());
    }
}
