//! `RuntimeSettings`: how many consumers, the delay tiers the bus is built with, the retry policy
//! for transient and throttled Azure errors, and how long shutdown waits for in-flight work. Read
//! from configuration strictly (unknown keys are errors) with defaults for everything. Durations are
//! written in milliseconds (`*_ms`) so the tiny tiers of tests and the long ones of production use
//! the same notation.

use std::time::Duration;

use serde::Deserialize;

use crate::ledger::Fencing;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Deliveries handled at once by one process.
    pub consumers: usize,
    /// The delay tiers, shortest first. The bus is built with them (the RabbitMQ bus declares one
    /// queue per tier); the runtime asks the bus, so the two cannot disagree at run time.
    #[serde(rename = "tiers_ms", deserialize_with = "millis_list::deserialize")]
    pub tiers: Vec<Duration>,
    pub retry: RetrySettings,
    /// On shutdown, how long in-flight deliveries may take to finish before they are abandoned
    /// (an abandoned delivery goes back to its queue unacked).
    #[serde(rename = "shutdown_grace_ms", deserialize_with = "millis::deserialize")]
    pub shutdown_grace: Duration,
    /// A step's claim in the ledger not committed within this long may be taken over by another
    /// copy of its message (its holder died); the holder itself gives up at half of it.
    #[serde(rename = "claim_timeout_ms", deserialize_with = "millis::deserialize")]
    pub claim_timeout: Duration,
    /// How a step that records something and wrote to Azure is fenced: `claim_first` (a claim
    /// and a commit, the default) or `commit_first` (one history record a step; workers from
    /// before it cannot read its messages). A step that only read, and an admission, commit first
    /// either way (`Ledger::fencing_for`).
    pub fencing: Fencing,
    /// Deliveries a process holds per stage it consumes (waits for their next look, messages not
    /// due yet) instead of sending them round a delay tier (`runtime::held`); 0 sends every wait
    /// round the broker.
    pub held_waits: usize,
    /// The longest one delivery is held across its looks before its message goes on a delay tier
    /// (below the broker's `consumer_timeout`, 30 minutes by default). Real time, never scaled.
    #[serde(rename = "hold_max_ms", deserialize_with = "millis::deserialize")]
    pub hold_max: Duration,
    /// A step with a successor due now of a stage this process consumes steps it on at once,
    /// within its own fenced step, instead of sending it through that stage's queue: no quorum
    /// message and no history record for the hop (the step's other successors go on as before).
    /// False sends every successor through its queue.
    pub step_on: bool,
    /// A fenced step with a successor that is a wait of a stage this process consumes, due later,
    /// keeps that successor (the one due last, if several are) with its own delivery (unacked, held here until due) instead of
    /// publishing it: the commit holds the successor, so if the delivery comes back (this worker
    /// died) its next taker carries the wait on. No quorum message for the wait. Workers from
    /// before it cannot read such commits: switch only once none is left.
    pub keep_waits: bool,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings {
            consumers: 4,
            tiers: [1, 5, 30, 120, 600].map(Duration::from_secs).to_vec(),
            retry: RetrySettings::default(),
            shutdown_grace: Duration::from_secs(30),
            claim_timeout: Duration::from_secs(20),
            fencing: Fencing::default(),
            held_waits: 64,
            hold_max: Duration::from_secs(10 * 60),
            step_on: true,
            keep_waits: true,
        }
    }
}

/// Delay tiers on a faster clock: each scaled, at least a millisecond, still strictly increasing.
pub fn scaled_tiers(tiers: &[Duration], factor: f64) -> Vec<Duration> {
    let mut out: Vec<Duration> = Vec::new();
    for tier in tiers {
        let mut t = tier.mul_f64(factor).max(Duration::from_millis(1));
        if let Some(last) = out.last()
            && t <= *last
        {
            t = *last + Duration::from_millis(1);
        }
        out.push(t);
    }
    out
}

/// Retries of a step whose Azure call failed transiently or was throttled: exponential backoff with
/// jitter (computed with `backon`), counted in the message's `attempt`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// The delay before the first retry.
    #[serde(rename = "base_delay_ms", deserialize_with = "millis::deserialize")]
    pub base_delay: Duration,
    pub factor: f32,
    /// No retry waits longer than this (a throttled call's `Retry-After` excepted).
    #[serde(rename = "max_delay_ms", deserialize_with = "millis::deserialize")]
    pub max_delay: Duration,
    /// Spread each delay over `[d, 2d)` so a burst of failures does not come back as a burst.
    pub jitter: bool,
    /// Tries of one step, the first included, before the branch fails with the last error.
    pub max_attempts: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            base_delay: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: true,
            max_attempts: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("runtime setting `{key}`: {message}")]
pub struct SettingsError {
    pub key: &'static str,
    pub message: String,
}

impl RuntimeSettings {
    /// The ledger's settings: the claim timeout, and the time a claim may take to come by.
    pub fn ledger(&self) -> crate::ledger::LedgerSettings {
        crate::ledger::LedgerSettings {
            claim_timeout: self.claim_timeout,
            read_limit: Duration::from_secs(30),
            fencing: self.fencing,
        }
    }

    /// Checks what serde cannot: the shapes the runtime relies on.
    pub fn check(&self) -> Result<(), SettingsError> {
        let bad = |key, message: String| Err(SettingsError { key, message });
        if !(1..=256).contains(&self.consumers) {
            return bad("consumers", format!("{} is outside 1–256", self.consumers));
        }
        if self.tiers.len() > 20 || self.tiers.iter().any(|t| *t > Duration::from_secs(86_400)) {
            return bad("tiers_ms", "at most 20 delays, each at most a day (86400000)".into());
        }
        for (key, value, max) in [
            ("shutdown_grace_ms", self.shutdown_grace, Duration::from_secs(3600)),
            ("claim_timeout_ms", self.claim_timeout, Duration::from_secs(3600)),
            ("hold_max_ms", self.hold_max, Duration::from_secs(25 * 60)),
            ("retry.max_delay_ms", self.retry.max_delay, Duration::from_secs(86_400)),
        ] {
            if value > max {
                return bad(key, format!("{} ms is above {} ms", value.as_millis(), max.as_millis()));
            }
        }
        if self.held_waits > 4096 {
            return bad("held_waits", format!("{} is above 4096", self.held_waits));
        }
        if self.retry.max_attempts > 1000 {
            return bad(
                "retry.max_attempts",
                format!("{} is above 1000", self.retry.max_attempts),
            );
        }
        if self.claim_timeout < Duration::from_millis(100) {
            return bad(
                "claim_timeout_ms",
                format!(
                    "{} ms: must be at least 100 (a step's publishes must fit in half of it)",
                    self.claim_timeout.as_millis()
                ),
            );
        }
        if self.tiers.is_empty() || self.tiers[0].is_zero() || self.tiers.windows(2).any(|w| w[0] >= w[1]) {
            return bad(
                "tiers_ms",
                format!(
                    "{:?}: give at least one delay, each above zero and longer than the one before",
                    self.tiers.iter().map(Duration::as_millis).collect::<Vec<_>>()
                ),
            );
        }
        let retry = &self.retry;
        if retry.max_attempts == 0 {
            return bad("retry.max_attempts", "must be at least 1 (the first try)".into());
        }
        if !(1.0..=100.0).contains(&retry.factor) {
            return bad(
                "retry.factor",
                format!("{}: must be a number from 1 to 100", retry.factor),
            );
        }
        if retry.base_delay.is_zero() || retry.base_delay > retry.max_delay {
            return bad(
                "retry.base_delay_ms",
                format!(
                    "{} ms: must be above zero and at most max_delay_ms ({} ms)",
                    retry.base_delay.as_millis(),
                    retry.max_delay.as_millis()
                ),
            );
        }
        Ok(())
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

mod millis_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Ok(Vec::<u64>::deserialize(d)?
            .into_iter()
            .map(Duration::from_millis)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_scale_and_stay_increasing() {
        let tiers = [1, 5, 30, 120, 600].map(Duration::from_secs);
        let scaled = scaled_tiers(&tiers, 1.0 / 200.0);
        assert_eq!(scaled[0], Duration::from_millis(5));
        assert_eq!(scaled[4], Duration::from_secs(3));
        let tiny = scaled_tiers(&tiers, 1e-9);
        assert!(tiny.windows(2).all(|w| w[0] < w[1]), "{tiny:?}");
    }

    #[test]
    fn defaults_apply_to_what_is_not_written() {
        let settings: RuntimeSettings = toml::from_str("consumers = 2\n[retry]\nmax_attempts = 3\n").unwrap();
        assert_eq!(settings.consumers, 2);
        assert_eq!(settings.retry.max_attempts, 3);
        assert_eq!(settings.retry.base_delay, Duration::from_secs(1));
        assert_eq!(settings.tiers, RuntimeSettings::default().tiers);
        settings.check().unwrap();
        RuntimeSettings::default().check().unwrap();
    }

    #[test]
    fn durations_are_milliseconds() {
        let settings: RuntimeSettings =
            toml::from_str("tiers_ms = [10, 50, 200]\nshutdown_grace_ms = 1500\n[retry]\nbase_delay_ms = 5\n").unwrap();
        assert_eq!(settings.tiers, [10, 50, 200].map(Duration::from_millis).to_vec());
        assert_eq!(settings.shutdown_grace, Duration::from_millis(1500));
        assert_eq!(settings.retry.base_delay, Duration::from_millis(5));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<RuntimeSettings>("[retry]\nmax_attempt = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_attempt"), "{err}");
        assert!(toml::from_str::<RuntimeSettings>("tiers = [1]\n").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let check = |text: &str| {
            toml::from_str::<RuntimeSettings>(text)
                .unwrap()
                .check()
                .unwrap_err()
                .key
        };
        assert_eq!(check("consumers = 0"), "consumers");
        assert_eq!(check("tiers_ms = []"), "tiers_ms");
        assert_eq!(check("tiers_ms = [50, 10]"), "tiers_ms");
        assert_eq!(check("tiers_ms = [0, 10]"), "tiers_ms");
        assert_eq!(check("[retry]\nmax_attempts = 0"), "retry.max_attempts");
        assert_eq!(check("[retry]\nfactor = 0.5"), "retry.factor");
        assert_eq!(check("[retry]\nbase_delay_ms = 600000"), "retry.base_delay_ms");
        assert_eq!(check("held_waits = 5000"), "held_waits");
        assert_eq!(check("hold_max_ms = 1800000"), "hold_max_ms");
    }
}
