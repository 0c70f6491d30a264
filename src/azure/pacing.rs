//! Keeping a process inside Azure Resource Manager's request budget without a coordinator.
//!
//! ARM gives each subscription and principal a token bucket per kind of request (reads 250,
//! refilled 25 a second; writes and deletes 200, refilled 10) and says on every answer what is
//! left (`x-ms-ratelimit-remaining-subscription-{reads,writes,deletes}`). Every worker sharing a
//! subscription reads those headers, so each holds the same picture of the shared bucket, a
//! moment old, and keeps its own estimate between answers: the last count seen, less what it sent
//! since, plus the refill — but never more than the bucket's size less its own requests still in
//! flight: those have not drawn from Azure's bucket yet, which meanwhile may sit full and refill no
//! further (the first burst of a process waits for its token and connections before any arrives). A request goes out when the estimate stays above a *reserve* that
//! shrinks with the request's urgency: the least urgent look leaves a quarter of the bucket (by default)
//! to the others, the most urgent (a run's last stage) may take the last token. So when looks
//! outnumber the refill, the runs nearest to done go first and the rest wait for the refill instead
//! of meeting 429s. A process's estimate misses what others spent since its last answer and what
//! its own requests in flight have not yet drawn; the reserve absorbs that for all but the most
//! urgent requests, which can still meet a 429 (then honoured as Azure's word).
//!
//! Batch publishes no such headers: its accounts are paced only by the 429s they send, as is a
//! subscription whose 429 (`Retry-After`) says it is empty.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, Url};
use serde::Deserialize;
use tokio::time::Instant;

use super::config::SettingsError;

/// ARM's code for a request refused because its subscription's bucket is empty.
pub const BUDGET_THROTTLED: &str = "SubscriptionRequestsThrottled";

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Reads,
    Writes,
    Deletes,
}

impl Kind {
    pub fn of(method: &Method) -> Kind {
        match *method {
            Method::GET | Method::HEAD => Kind::Reads,
            Method::DELETE => Kind::Deletes,
            _ => Kind::Writes,
        }
    }

    fn header(self) -> &'static str {
        match self {
            Kind::Reads => "x-ms-ratelimit-remaining-subscription-reads",
            Kind::Writes => "x-ms-ratelimit-remaining-subscription-writes",
            Kind::Deletes => "x-ms-ratelimit-remaining-subscription-deletes",
        }
    }

    /// ARM's published bucket: (burst, refill per Azure second).
    fn limit(self) -> (f64, f64) {
        match self {
            Kind::Reads => (250.0, 25.0),
            Kind::Writes | Kind::Deletes => (200.0, 10.0),
        }
    }
}

/// `[azure.client.pacing]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PacingSettings {
    /// Pace requests to the subscription's budget at all.
    pub enabled: bool,
    /// Share of a bucket the least urgent request leaves to more urgent ones (0 to 0.9).
    pub reserve_share: f64,
    /// Longest a request waits in this process for its budget (Azure time) before its step is
    /// put off instead (a message on a delay tier holds no consumer).
    pub hold_ms: u64,
    /// Azure seconds per real second: 1 against Azure, the emulator's time scale against it.
    #[serde(skip)]
    pub time_scale: f64,
}

impl Default for PacingSettings {
    fn default() -> Self {
        PacingSettings {
            enabled: true,
            reserve_share: 0.25,
            hold_ms: 5_000,
            time_scale: 1.0,
        }
    }
}

impl PacingSettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(SettingsError::new(
                "pacing.time_scale",
                format!("{} is not a positive number", self.time_scale),
            ));
        }
        if !(0.0..=0.9).contains(&self.reserve_share) {
            return Err(SettingsError::new(
                "pacing.reserve_share",
                format!("{} is outside 0 to 0.9", self.reserve_share),
            ));
        }
        if self.hold_ms > 600_000 {
            return Err(SettingsError::new(
                "pacing.hold_ms",
                format!("{} is above 600000 (ten minutes)", self.hold_ms),
            ));
        }
        Ok(())
    }

    /// The longest in-process hold, in real time.
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms).div_f64(self.time_scale.max(1e-9))
    }
}

/// Whose bucket: a subscription (ARM) or a Batch account's endpoint, and the kind.
pub type Scope = (String, Kind);

/// The bucket of `url` for a request of `method`: `/subscriptions/{id}` for ARM, the account's
/// endpoint for Batch.
pub fn scope_of(method: &Method, url: &Url, arm: bool) -> Option<Scope> {
    let mut segments = url.path_segments()?;
    let first = segments.next()?;
    let key = if arm {
        if !first.eq_ignore_ascii_case("subscriptions") {
            return None;
        }
        format!("arm|{}", segments.next()?.to_ascii_lowercase())
    } else {
        // Azure: one host per account. The emulator: one host, the account after `/batch`.
        let account = if first.eq_ignore_ascii_case("batch") {
            segments.next()?
        } else {
            ""
        };
        format!("batch|{}|{}", url.host_str()?, account.to_ascii_lowercase())
    };
    Some((key, Kind::of(method)))
}

/// Whether Azure publishes `scope`'s budget (ARM) so that this process can count it; Batch's is
/// known only by its 429s.
fn counted(scope: &Scope) -> bool {
    scope.0.starts_with("arm|")
}

/// What is known of one bucket.
#[derive(Debug, Clone, Copy)]
struct Gauge {
    /// Tokens estimated at `at`; a bucket not heard of yet is taken as full, so a burst of first
    /// requests is paced by the bucket's size before any answer tells what others left.
    tokens: f64,
    at: Instant,
    /// A 429 said nothing is left until then.
    blocked_until: Option<Instant>,
    /// Requests admitted and not answered yet (counted buckets only).
    in_flight: u32,
}

impl Gauge {
    fn full(kind: Kind, now: Instant) -> Gauge {
        Gauge {
            tokens: kind.limit().0,
            at: now,
            blocked_until: None,
            in_flight: 0,
        }
    }

    /// The estimate at `now`: refilled at `refill` a second since `at`, up to the burst less what
    /// is in flight (Azure's bucket cannot refill past its size before those requests draw).
    fn estimate(&self, kind: Kind, refill: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + refill * elapsed).min(kind.limit().0 - f64::from(self.in_flight))
    }
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admit {
    Go,
    /// Not before this long from now.
    Wait(Duration),
}

pub struct Pacer {
    settings: PacingSettings,
    gauges: Mutex<HashMap<Scope, Gauge>>,
}

impl Pacer {
    pub fn new(settings: PacingSettings) -> Pacer {
        Pacer {
            settings,
            gauges: Mutex::new(HashMap::new()),
        }
    }

    /// Tokens a real second brings to a bucket of `kind`.
    fn refill(&self, kind: Kind) -> f64 {
        kind.limit().1 * self.settings.time_scale
    }

    /// May a request of `urgency` (0 least, 1 most) go to `scope` at `now`? Taking it counts it
    /// against the estimate.
    pub fn admit(&self, scope: &Scope, urgency: f64, now: Instant) -> Admit {
        if !self.settings.enabled {
            return Admit::Go;
        }
        let (burst, _) = scope.1.limit();
        let mut gauges = self.gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gauge = gauges.entry(scope.clone()).or_insert_with(|| Gauge::full(scope.1, now));
        if let Some(until) = gauge.blocked_until {
            if until > now {
                return Admit::Wait(until - now);
            }
            gauge.blocked_until = None;
        }
        if !counted(scope) {
            return Admit::Go;
        }
        let refill = self.refill(scope.1);
        let estimate = gauge.estimate(scope.1, refill, now);
        let reserve = burst * self.settings.reserve_share * (1.0 - urgency.clamp(0.0, 1.0));
        let short = reserve + 1.0 - estimate;
        if short > 0.0 {
            let wait = Duration::try_from_secs_f64(short / refill).unwrap_or(super::MAX_RETRY_AFTER);
            return Admit::Wait(wait.max(Duration::from_micros(100)));
        }
        gauge.tokens = estimate - 1.0;
        gauge.at = now;
        gauge.in_flight = gauge.in_flight.saturating_add(1);
        Admit::Go
    }

    /// A request `admit` let go to `scope` was answered, or will never be sent (an error before
    /// or instead of its answer).
    pub fn landed(&self, scope: &Scope) {
        if !counted(scope) {
            return;
        }
        let mut gauges = self.gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(gauge) = gauges.get_mut(scope) {
            gauge.in_flight = gauge.in_flight.saturating_sub(1);
        }
    }

    /// What an answer from `scope` said: the remaining count (ARM), or that the bucket is empty
    /// (`exhausted`: a 429 for want of tokens) until the time Azure gave.
    pub fn observe(
        &self,
        scope: &Scope,
        exhausted: bool,
        headers: &HeaderMap,
        retry_after: Option<Duration>,
        now: Instant,
    ) {
        let remaining = headers
            .get(scope.1.header())
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if remaining.is_none() && !exhausted {
            return;
        }
        let mut gauges = self.gauges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gauge = gauges.entry(scope.clone()).or_insert_with(|| Gauge::full(scope.1, now));
        if let Some(left) = remaining {
            // An answer only ever lowers the estimate: requests admitted after this one was sent
            // may not be drawn yet, so a higher count would let them be spent twice. The refill
            // is what raises it.
            gauge.tokens = gauge.estimate(scope.1, self.refill(scope.1), now).min(left as f64);
            gauge.at = now;
        }
        if exhausted {
            gauge.tokens = 0.0;
            gauge.at = now;
            let unstated =
                Duration::try_from_secs_f64(1.0 / self.settings.time_scale).unwrap_or(Duration::from_secs(1));
            let until = now + retry_after.unwrap_or(unstated);
            gauge.blocked_until = Some(gauge.blocked_until.map_or(until, |u| u.max(until)));
        }
    }
}

/// A request `admit` let go, until it lands (dropped: answered, failed, or abandoned).
pub struct InFlight<'a> {
    pub pacer: &'a Pacer,
    pub scope: &'a Scope,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.pacer.landed(self.scope);
    }
}

tokio::task_local! {
    static URGENCY: f64;
}

/// Runs `work` with its Azure requests at `urgency` (0 least, 1 most; the runtime gives a run's
/// later stages more). Requests outside any such scope (planning, operator commands) are at 0.5.
pub async fn with_urgency<F: std::future::Future>(urgency: f64, work: F) -> F::Output {
    URGENCY.scope(urgency, work).await
}

pub fn current_urgency() -> f64 {
    URGENCY.try_with(|u| *u).unwrap_or(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Half a bucket in reserve: round numbers for the arithmetic below.
    fn pacer() -> Pacer {
        Pacer::new(PacingSettings {
            reserve_share: 0.5,
            ..PacingSettings::default()
        })
    }

    fn remaining(kind: &str, n: u64) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let name = format!("x-ms-ratelimit-remaining-subscription-{kind}");
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            n.to_string().parse().unwrap(),
        );
        headers
    }

    fn reads() -> Scope {
        scope_of(
            &Method::GET,
            &Url::parse("https://arm/subscriptions/ABC/resourceGroups/x").unwrap(),
            true,
        )
        .unwrap()
    }

    #[test]
    fn scopes_are_the_subscription_or_the_batch_account() {
        assert_eq!(reads(), ("arm|abc".to_string(), Kind::Reads));
        let url = Url::parse("https://h:1/batch/acct/pools/p").unwrap();
        assert_eq!(
            scope_of(&Method::DELETE, &url, false),
            Some(("batch|h|acct".to_string(), Kind::Deletes))
        );
        assert_eq!(
            scope_of(&Method::GET, &Url::parse("https://arm/tenants").unwrap(), true),
            None
        );
    }

    #[test]
    fn a_bucket_not_heard_of_is_taken_as_full_and_answers_correct_it() {
        let p = pacer();
        let now = Instant::now();
        // A cold burst: the least urgent stop at the reserve, before any answer came.
        let mut went = 0;
        while p.admit(&reads(), 0.0, now) == Admit::Go {
            went += 1;
        }
        assert_eq!(went, 125);
        // An answer says others spent more: its count replaces the estimate.
        p.observe(&reads(), false, &remaining("reads", 10), None, now);
        assert!(matches!(p.admit(&reads(), 0.5, now), Admit::Wait(_)));
        assert_eq!(p.admit(&reads(), 1.0, now), Admit::Go);
        // A late answer from before those admissions counts more than is left: it does not raise
        // the estimate (the nine left would be spent twice).
        p.observe(&reads(), false, &remaining("reads", 200), None, now);
        let mut went = 0;
        while p.admit(&reads(), 1.0, now) == Admit::Go {
            went += 1;
        }
        assert_eq!(went, 9);
    }

    /// The first burst is admitted before any request has a token or a connection: until they
    /// arrive, Azure's bucket sits full and refills nothing, so the refill must not be counted on
    /// top of what they will draw.
    #[test]
    fn requests_in_flight_keep_the_refill_from_counting_twice() {
        let p = pacer();
        let start = Instant::now();
        let mut went = 0;
        while p.admit(&reads(), 0.0, start) == Admit::Go {
            went += 1;
        }
        assert_eq!(went, 125, "down to the reserve of 125");
        // A second later the refill (25) would let 25 more go; none of the 125 has arrived, so
        // Azure may still hold all 250 and draw the 125 only now: nothing goes.
        let later = start + Duration::from_secs(1);
        assert!(matches!(p.admit(&reads(), 0.0, later), Admit::Wait(_)));
        // Once they have landed, the refill counts.
        for _ in 0..125 {
            p.landed(&reads());
        }
        let mut went = 0;
        while p.admit(&reads(), 0.0, later) == Admit::Go {
            went += 1;
        }
        assert_eq!(went, 25);
        // Landing more than was admitted, or in a scope never admitted, is harmless.
        for _ in 0..100 {
            p.landed(&reads());
        }
        p.landed(&("batch|h|a".to_string(), Kind::Reads));
    }

    #[test]
    fn the_least_urgent_leave_the_reserve_to_the_most_urgent() {
        let p = pacer();
        let now = Instant::now();
        p.observe(&reads(), false, &remaining("reads", 130), None, now);
        // 125 is the least urgent reserve: five go, the sixth waits for a token (40 ms).
        for _ in 0..5 {
            assert_eq!(p.admit(&reads(), 0.0, now), Admit::Go);
        }
        match p.admit(&reads(), 0.0, now) {
            Admit::Wait(w) => assert_eq!(w.as_millis(), 40, "{w:?}"),
            other => panic!("{other:?}"),
        }
        // Half-urgent ones may go down to 62.5 tokens, the most urgent to the last token.
        let mut half = 0;
        while p.admit(&reads(), 0.5, now) == Admit::Go {
            half += 1;
        }
        assert_eq!(half, 62);
        let mut last = 0;
        while p.admit(&reads(), 1.0, now) == Admit::Go {
            last += 1;
        }
        assert_eq!(last, 63);
        // A second later 25 tokens came back.
        let later = now + Duration::from_secs(1);
        assert_eq!(p.admit(&reads(), 1.0, later), Admit::Go);
    }

    #[test]
    fn batch_is_paced_by_its_429s_alone() {
        let p = pacer();
        let now = Instant::now();
        let url = Url::parse("https://acct.westeurope.batch.azure.com/pools/p").unwrap();
        let batch = scope_of(&Method::GET, &url, false).unwrap();
        for _ in 0..1000 {
            assert_eq!(p.admit(&batch, 0.0, now), Admit::Go);
        }
        p.observe(&batch, true, &HeaderMap::new(), Some(Duration::from_secs(2)), now);
        assert_eq!(p.admit(&batch, 1.0, now), Admit::Wait(Duration::from_secs(2)));
    }

    #[test]
    fn a_throttled_answer_blocks_the_bucket_for_its_retry_after() {
        let p = pacer();
        let now = Instant::now();
        p.observe(&reads(), true, &HeaderMap::new(), Some(Duration::from_secs(3)), now);
        assert_eq!(p.admit(&reads(), 1.0, now), Admit::Wait(Duration::from_secs(3)));
        assert_eq!(p.admit(&reads(), 1.0, now + Duration::from_secs(3)), Admit::Go);
        // Other kinds and subscriptions are not touched.
        let writes = ("arm|abc".to_string(), Kind::Writes);
        assert_eq!(p.admit(&writes, 0.0, now), Admit::Go);
    }

    #[test]
    fn the_refill_follows_the_azure_clock_and_off_means_go() {
        let fast = Pacer::new(PacingSettings {
            time_scale: 100.0,
            reserve_share: 0.5,
            ..PacingSettings::default()
        });
        let now = Instant::now();
        fast.observe(&reads(), false, &remaining("reads", 0), None, now);
        match fast.admit(&reads(), 1.0, now) {
            Admit::Wait(w) => assert_eq!(w.as_micros(), 400, "{w:?}"),
            other => panic!("{other:?}"),
        }
        let off = Pacer::new(PacingSettings {
            enabled: false,
            ..PacingSettings::default()
        });
        off.observe(&reads(), true, &HeaderMap::new(), Some(Duration::from_secs(9)), now);
        assert_eq!(off.admit(&reads(), 1.0, now), Admit::Go);
    }
}
