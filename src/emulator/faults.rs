//! Fault injection, reproducible from a seed. A plan is a list of rules written as
//! `KIND[:PARAM,...]` separated by `;`, for example
//!
//! ```text
//! 429:p=0.1,retry_after=2;500:at=3|7;reset:p=0.05,api=arm;slow:p=0.2,delay_ms=300;
//! replication-fail:region=eastus,times=1;allocation-fail:pool=nightly-*;starttask-fail:share=0.1
//! ```
//!
//! Request faults (`429`, `500`, `503`, `reset`, `slow`) fire on a probability `p`, on an exact
//! schedule `at=N|M|...` (the Nth request the rule matched, from 1) or `every=N`; `api=arm|batch|aad|any`
//! (default arm and batch), `method=` and `path=` (a substring) narrow what they match, `times=` caps
//! how often they fire. Domain faults shape what Azure does: a region whose replication fails, a pool
//! whose allocation fails, a share of nodes whose start task fails. Each rule draws from its own
//! generator seeded from the plan's seed, so the same seed and the same requests give the same faults.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Which front door a request came through; faults and logs are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    Aad,
    Arm,
    Batch,
    Identity,
    Control,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Aad => "aad",
            Api::Arm => "arm",
            Api::Batch => "batch",
            Api::Identity => "identity",
            Api::Control => "control",
        }
    }
}

/// What a matched request fault does to the request.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestFault {
    Throttle { retry_after_secs: f64 },
    ServerError { status: u16 },
    Reset,
    Slow { delay_ms: u64 },
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    Request(RequestFault),
    ReplicationFail { region: String },
    AllocationFail { pool: String, code: String },
    StartTaskFail { pool: String, share: f64 },
}

#[derive(Debug, Clone, PartialEq)]
enum Trigger {
    Always,
    Probability(f64),
    At(Vec<u64>),
    Every(u64),
}

#[derive(Debug, Clone)]
struct Rule {
    text: String,
    kind: Kind,
    trigger: Trigger,
    apis: Vec<Api>,
    method: Option<String>,
    path: Option<String>,
    times: Option<u64>,
    seen: u64,
    fired: u64,
    rng: ChaCha8Rng,
}

#[derive(Debug, Clone)]
pub struct FaultPlan {
    seed: u64,
    rules: Vec<Rule>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("fault rule `{rule}`: {message}")]
pub struct FaultSpecError {
    pub rule: String,
    pub message: String,
}

/// One rule as the control API reports it.
#[derive(Debug, Serialize)]
pub struct RuleStatus {
    pub rule: String,
    pub matched: u64,
    pub fired: u64,
}

impl FaultPlan {
    pub fn none(seed: u64) -> FaultPlan {
        FaultPlan {
            seed,
            rules: Vec::new(),
        }
    }

    pub fn parse(spec: &str, seed: u64) -> Result<FaultPlan, FaultSpecError> {
        let mut rules = Vec::new();
        for (index, text) in spec.split(';').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            rules.push(parse_rule(text, seed, index as u64)?);
        }
        Ok(FaultPlan { seed, rules })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn status(&self) -> Vec<RuleStatus> {
        self.rules
            .iter()
            .map(|r| RuleStatus {
                rule: r.text.clone(),
                matched: r.seen,
                fired: r.fired,
            })
            .collect()
    }

    /// The fault (if any) for one incoming request. The first rule that fires wins.
    pub fn on_request(&mut self, api: Api, method: &str, path: &str) -> Option<RequestFault> {
        for rule in &mut self.rules {
            let Kind::Request(fault) = &rule.kind else { continue };
            if !rule.apis.contains(&api) {
                continue;
            }
            if rule.method.as_deref().is_some_and(|m| !m.eq_ignore_ascii_case(method)) {
                continue;
            }
            if rule
                .path
                .as_deref()
                .is_some_and(|p| !path.to_ascii_lowercase().contains(&p.to_ascii_lowercase()))
            {
                continue;
            }
            let fault = fault.clone();
            if rule.fire() {
                return Some(fault);
            }
        }
        None
    }

    /// Whether the replication of a new image version to `region` fails.
    pub fn replication_fails(&mut self, region: &str) -> bool {
        self.rules.iter_mut().any(|rule| match &rule.kind {
            Kind::ReplicationFail { region: r } if r.eq_ignore_ascii_case(region) || r == "*" => rule.fire(),
            _ => false,
        })
    }

    /// The resize error code if the allocation of `pool` fails.
    pub fn allocation_fails(&mut self, pool: &str) -> Option<String> {
        for rule in &mut self.rules {
            if let Kind::AllocationFail { pool: pattern, code } = &rule.kind
                && glob_match(pattern, pool)
            {
                let code = code.clone();
                if rule.fire() {
                    return Some(code);
                }
            }
        }
        None
    }

    /// The share of `pool`'s nodes whose start task fails (0 when no rule matches).
    pub fn start_task_failure_share(&mut self, pool: &str) -> f64 {
        for rule in &mut self.rules {
            if let Kind::StartTaskFail { pool: pattern, share } = &rule.kind
                && glob_match(pattern, pool)
            {
                let share = *share;
                if rule.fire() {
                    return share;
                }
            }
        }
        0.0
    }
}

impl Rule {
    /// Counts one match and decides whether the rule fires on it.
    fn fire(&mut self) -> bool {
        self.seen += 1;
        if self.times.is_some_and(|cap| self.fired >= cap) {
            return false;
        }
        // Draw on every match, fired or not, so a rule's decisions depend only on the seed and the
        // number of matches before it.
        let draw: f64 = self.rng.random();
        let fires = match &self.trigger {
            Trigger::Always => true,
            Trigger::Probability(p) => draw < *p,
            Trigger::At(list) => list.contains(&self.seen),
            Trigger::Every(n) => self.seen.is_multiple_of(*n),
        };
        if fires {
            self.fired += 1;
        }
        fires
    }
}

/// One rule, `KIND[:KEY=VALUE,...]`: every parameter is read first (the first bad one is the
/// error), then the kind picks the fault the parameters shape.
fn parse_rule(text: &str, seed: u64, index: u64) -> Result<Rule, FaultSpecError> {
    let err = |message: String| FaultSpecError {
        rule: text.to_string(),
        message,
    };
    let (kind_name, params) = text.split_once(':').unwrap_or((text, ""));
    let (mut matching, mut shape) = (Matching::default(), Shape::default());
    for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| err(format!("parameter `{param}` is not KEY=VALUE")))?;
        if !matching.set(key, value).map_err(&err)? && !shape.set(key, value).map_err(&err)? {
            return Err(err(format!("unknown parameter `{key}`")));
        }
    }
    let kind = shape.into_kind(kind_name.trim()).map_err(err)?;
    Ok(Rule {
        text: text.to_string(),
        kind,
        trigger: matching.trigger,
        apis: matching.apis,
        method: matching.method,
        path: matching.path,
        times: matching.times,
        seen: 0,
        fired: 0,
        rng: rule_rng(seed, index),
    })
}

/// Which requests and matches a rule fires on: its trigger (every match unless `p`, `at` or
/// `every` says otherwise), the front doors (ARM and Batch unless `api` says otherwise), the
/// method and path filters, and the cap on how often it fires.
struct Matching {
    trigger: Trigger,
    apis: Vec<Api>,
    method: Option<String>,
    path: Option<String>,
    times: Option<u64>,
}

impl Default for Matching {
    fn default() -> Matching {
        Matching {
            trigger: Trigger::Always,
            apis: vec![Api::Arm, Api::Batch],
            method: None,
            path: None,
            times: None,
        }
    }
}

impl Matching {
    /// Reads `key` if it is one of the matching parameters; `false` when it is not.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "p" => self.trigger = Trigger::Probability(fraction(key, value)?),
            "at" => {
                let list = value.split('|').map(|v| count(key, v)).collect::<Result<_, _>>()?;
                self.trigger = Trigger::At(list);
            }
            "every" => {
                let n = count(key, value)?;
                if n == 0 {
                    return Err("every must be at least 1".into());
                }
                self.trigger = Trigger::Every(n);
            }
            "times" => self.times = Some(count(key, value)?),
            "api" => self.apis = apis_named(value)?,
            "method" => self.method = Some(value.to_ascii_uppercase()),
            "path" => self.path = Some(value.to_string()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// What the fault does, for the kinds that read it: the throttle's `Retry-After`, the slow
/// answer's delay, the failing region, the pools a domain fault applies to (all unless `pool`
/// says otherwise), the share of failed start tasks and the allocation's error code.
struct Shape {
    retry_after: f64,
    delay_ms: u64,
    region: Option<String>,
    pool: String,
    share: Option<f64>,
    code: String,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape {
            retry_after: 1.0,
            delay_ms: 500,
            region: None,
            pool: "*".to_string(),
            share: None,
            code: "AllocationFailed".to_string(),
        }
    }
}

impl Shape {
    /// Reads `key` if it is one of the shaping parameters; `false` when it is not.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "retry_after" => self.retry_after = number(key, value)?,
            "delay_ms" => self.delay_ms = count(key, value)?,
            "region" => self.region = Some(value.to_string()),
            "pool" => self.pool = value.to_string(),
            "share" => self.share = Some(fraction(key, value)?),
            "code" => self.code = value.to_string(),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The fault a kind name stands for; `replication-fail` needs its region and `starttask-fail`
    /// its share, the others have defaults for what they read.
    fn into_kind(self, name: &str) -> Result<Kind, String> {
        Ok(match name {
            "429" => Kind::Request(RequestFault::Throttle {
                retry_after_secs: self.retry_after,
            }),
            "500" => Kind::Request(RequestFault::ServerError { status: 500 }),
            "503" => Kind::Request(RequestFault::ServerError { status: 503 }),
            "reset" => Kind::Request(RequestFault::Reset),
            "slow" => Kind::Request(RequestFault::Slow {
                delay_ms: self.delay_ms,
            }),
            "replication-fail" => Kind::ReplicationFail {
                region: self.region.ok_or("replication-fail needs region=NAME (or *)")?,
            },
            "allocation-fail" => Kind::AllocationFail {
                pool: self.pool,
                code: self.code,
            },
            "starttask-fail" => Kind::StartTaskFail {
                pool: self.pool,
                share: self.share.ok_or("starttask-fail needs share=FRACTION")?,
            },
            other => {
                return Err(format!(
                    "unknown fault `{other}` (429, 500, 503, reset, slow, replication-fail, allocation-fail, starttask-fail)"
                ));
            }
        })
    }
}

fn number(key: &str, value: &str) -> Result<f64, String> {
    value
        .parse::<f64>()
        .map_err(|_| format!("`{key}` wants a number, got `{value}`"))
}

fn count(key: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|_| format!("`{key}` wants a whole number, got `{value}`"))
}

/// A probability or a share: a number from 0 to 1.
fn fraction(key: &str, value: &str) -> Result<f64, String> {
    let n = number(key, value)?;
    if !(0.0..=1.0).contains(&n) {
        return Err(format!("{key} must be between 0 and 1, got {n}"));
    }
    Ok(n)
}

/// The front doors `api=` names: `aad` covers the managed identity endpoints too.
fn apis_named(value: &str) -> Result<Vec<Api>, String> {
    Ok(match value {
        "arm" => vec![Api::Arm],
        "batch" => vec![Api::Batch],
        "aad" => vec![Api::Aad, Api::Identity],
        "any" => vec![Api::Arm, Api::Batch, Api::Aad, Api::Identity],
        other => return Err(format!("api must be arm, batch, aad or any, got `{other}`")),
    })
}

/// Each rule draws from its own generator, seeded from the plan's seed and the rule's place in
/// the plan, so one rule's draws never shift another's.
fn rule_rng(seed: u64, index: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed ^ (index.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// `*` matches any run of characters; everything else matches itself, ignoring case.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.to_ascii_lowercase(), text.to_ascii_lowercase());
    let parts: Vec<&str> = p.split('*').collect();
    if parts.len() == 1 {
        return p == t;
    }
    let mut rest = t.as_str();
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(stripped) = rest.strip_prefix(part) else {
                return false;
            };
            rest = stripped;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else if let Some(pos) = rest.find(part) {
            rest = &rest[pos + part.len()..];
        } else {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decisions(spec: &str, seed: u64, n: usize) -> Vec<Option<RequestFault>> {
        let mut plan = FaultPlan::parse(spec, seed).unwrap();
        (0..n)
            .map(|_| plan.on_request(Api::Arm, "GET", "/subscriptions/x"))
            .collect()
    }

    #[test]
    fn same_seed_same_faults_other_seed_other_faults() {
        let a = decisions("429:p=0.3;500:p=0.1", 7, 200);
        assert_eq!(a, decisions("429:p=0.3;500:p=0.1", 7, 200));
        assert_ne!(a, decisions("429:p=0.3;500:p=0.1", 8, 200));
        let throttled = a
            .iter()
            .filter(|d| matches!(d, Some(RequestFault::Throttle { .. })))
            .count();
        assert!((40..=80).contains(&throttled), "about 30% of 200, got {throttled}");
    }

    #[test]
    fn exact_schedule_and_cap() {
        let d = decisions("503:at=2|4,times=1", 1, 5);
        let fired: Vec<usize> = d
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_some())
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(fired, vec![2]);
    }

    #[test]
    fn filters_narrow_matches() {
        let mut plan = FaultPlan::parse("reset:method=put,api=batch", 1).unwrap();
        assert_eq!(plan.on_request(Api::Arm, "PUT", "/x"), None);
        assert_eq!(plan.on_request(Api::Batch, "GET", "/x"), None);
        assert_eq!(plan.on_request(Api::Batch, "PUT", "/x"), Some(RequestFault::Reset));
    }

    #[test]
    fn domain_faults() {
        let mut plan = FaultPlan::parse(
            "replication-fail:region=eastus,times=1;allocation-fail:pool=big-*,code=X;starttask-fail:share=0.25",
            3,
        )
        .unwrap();
        assert!(plan.replication_fails("EastUS"));
        assert!(!plan.replication_fails("eastus"), "times=1 caps it");
        assert_eq!(plan.allocation_fails("big-pool").as_deref(), Some("X"));
        assert_eq!(plan.allocation_fails("small"), None);
        assert_eq!(plan.start_task_failure_share("any"), 0.25);
    }

    #[test]
    fn bad_specs_name_the_rule() {
        let err = FaultPlan::parse("429:p=2", 1).unwrap_err();
        assert_eq!(err.rule, "429:p=2");
        assert!(
            FaultPlan::parse("teapot", 1)
                .unwrap_err()
                .message
                .contains("unknown fault")
        );
        assert!(FaultPlan::parse("replication-fail", 1).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob_match("nightly-*", "Nightly-2026"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c", "abd"));
    }
}
