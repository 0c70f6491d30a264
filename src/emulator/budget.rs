//! The request budget Azure Resource Manager enforces since 2024: token buckets. Each subscription
//! has, for each principal and each kind of request (reads, writes, deletes), a bucket holding at
//! most `burst` tokens and refilled at `refill` tokens a second; a request takes one token, and a
//! request that finds its bucket empty is refused with 429 `SubscriptionRequestsThrottled` and a
//! `Retry-After` of the time until the next token. Beside the principal's buckets, a global bucket
//! per subscription and kind, 15 times as large and as fast, is shared by every principal. What is
//! left travels on every answer (`x-ms-ratelimit-remaining-subscription-{kind}` for the
//! principal's bucket, `-global-{kind}` for the subscription's).
//!
//! Choices where Azure's material is silent, on purpose:
//! - ARM also keys buckets by the region of the ARM instance that serves a request; the emulator
//!   is one instance, so one region.
//! - Buckets refill on the emulated clock, so a client pacing its looks in Azure time meets the
//!   budget it would meet in Azure whatever the time scale.
//! - The Batch data plane publishes no numbers; the emulator gives each (account, principal, kind)
//!   the principal-level ARM buckets, and no global bucket. Batch sends no remaining-count headers.
//! - A refused request takes no token.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;

/// Which bucket a request draws from: ARM's three kinds, by method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Reads,
    Writes,
    Deletes,
}

impl Kind {
    pub fn of(method: &http::Method) -> Kind {
        match *method {
            http::Method::GET | http::Method::HEAD => Kind::Reads,
            http::Method::DELETE => Kind::Deletes,
            _ => Kind::Writes,
        }
    }

    /// As in the headers: `x-ms-ratelimit-remaining-subscription-{plural}`.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Reads => "reads",
            Kind::Writes => "writes",
            Kind::Deletes => "deletes",
        }
    }

    /// As in ARM's throttling message: "Number of '{singular}' requests ...".
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Reads => "read",
            Kind::Writes => "write",
            Kind::Deletes => "delete",
        }
    }
}

/// One bucket's size and refill rate (tokens per emulated second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub burst: f64,
    pub refill: f64,
}

/// The buckets' sizes: per principal, and the factor of the subscription's global bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub reads: Limit,
    pub writes: Limit,
    pub deletes: Limit,
    pub global_factor: f64,
}

impl Limits {
    /// ARM's published defaults: reads 250 a burst, refilled 25 a second; writes and deletes 200
    /// and 10; the subscription's global bucket 15 times each.
    pub fn arm() -> Limits {
        Limits {
            reads: Limit {
                burst: 250.0,
                refill: 25.0,
            },
            writes: Limit {
                burst: 200.0,
                refill: 10.0,
            },
            deletes: Limit {
                burst: 200.0,
                refill: 10.0,
            },
            global_factor: 15.0,
        }
    }

    pub fn of(&self, kind: Kind) -> Limit {
        match kind {
            Kind::Reads => self.reads,
            Kind::Writes => self.writes,
            Kind::Deletes => self.deletes,
        }
    }

    fn global(&self, kind: Kind) -> Limit {
        let own = self.of(kind);
        Limit {
            burst: own.burst * self.global_factor,
            refill: own.refill * self.global_factor,
        }
    }
}

/// What a request's draw came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Draw {
    /// Taken; the tokens left in the principal's bucket and the global one (none for Batch).
    Taken { left: u64, global_left: Option<u64> },
    /// Refused: the next token comes in this many emulated seconds.
    Refused { wait_secs: f64 },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: OffsetDateTime,
}

impl Bucket {
    /// The bucket as it stands at `now`, refilled since it was last drawn from.
    fn refilled(self, limit: Limit, now: OffsetDateTime) -> Bucket {
        let elapsed = (now - self.at).as_seconds_f64().max(0.0);
        Bucket {
            tokens: (self.tokens + elapsed * limit.refill).min(limit.burst),
            at: now.max(self.at),
        }
    }

    /// Emulated seconds until this bucket holds a whole token.
    fn wait(self, limit: Limit) -> f64 {
        if self.tokens >= 1.0 {
            0.0
        } else {
            (1.0 - self.tokens) / limit.refill
        }
    }
}

/// Every bucket, or none when budgets are off.
pub struct Budgets {
    limits: Option<Limits>,
    buckets: Mutex<HashMap<(String, Kind), Bucket>>,
}

impl Budgets {
    pub fn new(limits: Option<Limits>) -> Budgets {
        Budgets {
            limits,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Draws one token for an ARM request of `principal` on subscription `sub`: from the
    /// principal's bucket and the subscription's global one, both or neither. `None` when off.
    pub fn draw_arm(&self, sub: &str, principal: &str, kind: Kind, now: OffsetDateTime) -> Option<Draw> {
        let limits = self.limits.as_ref()?;
        let sub = sub.to_ascii_lowercase();
        let own_key = (format!("arm|{sub}|{}", principal.to_ascii_lowercase()), kind);
        let global_key = (format!("arm|{sub}|*"), kind);
        Some(self.draw(&[(own_key, limits.of(kind)), (global_key, limits.global(kind))], now))
    }

    /// Draws one token for a Batch request of `principal` on `account` (see the module's note).
    pub fn draw_batch(&self, account: &str, principal: &str, kind: Kind, now: OffsetDateTime) -> Option<Draw> {
        let limits = self.limits.as_ref()?;
        let key = (
            format!(
                "batch|{}|{}",
                account.to_ascii_lowercase(),
                principal.to_ascii_lowercase()
            ),
            kind,
        );
        Some(self.draw(&[(key, limits.of(kind))], now))
    }

    fn draw(&self, buckets: &[((String, Kind), Limit)], now: OffsetDateTime) -> Draw {
        let mut all = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current: Vec<Bucket> = buckets
            .iter()
            .map(|(key, limit)| {
                let full = Bucket {
                    tokens: limit.burst,
                    at: now,
                };
                all.get(key).copied().unwrap_or(full).refilled(*limit, now)
            })
            .collect();
        let wait_secs = current
            .iter()
            .zip(buckets)
            .map(|(bucket, (_, limit))| bucket.wait(*limit))
            .fold(0.0, f64::max);
        if wait_secs > 0.0 {
            return Draw::Refused { wait_secs };
        }
        let mut left = current.iter().map(|b| (b.tokens - 1.0).floor().max(0.0) as u64);
        let draw = Draw::Taken {
            left: left.next().unwrap_or(0),
            global_left: left.next(),
        };
        for ((key, _), bucket) in buckets.iter().zip(current) {
            let spent = Bucket {
                tokens: bucket.tokens - 1.0,
                at: bucket.at,
            };
            all.insert(key.clone(), spent);
        }
        draw
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: f64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds_f64(1_000_000.0 + secs)
    }

    fn taken(draw: Option<Draw>) -> (u64, Option<u64>) {
        match draw {
            Some(Draw::Taken { left, global_left }) => (left, global_left),
            other => panic!("expected a token, got {other:?}"),
        }
    }

    #[test]
    fn a_burst_empties_the_bucket_and_the_refill_is_on_the_given_clock() {
        let budgets = Budgets::new(Some(Limits::arm()));
        for n in 1..=250u64 {
            let (left, global) = taken(budgets.draw_arm("S", "p", Kind::Reads, at(0.0)));
            assert_eq!(left, 250 - n);
            assert_eq!(global, Some(3750 - n));
        }
        match budgets.draw_arm("s", "P", Kind::Reads, at(0.0)) {
            Some(Draw::Refused { wait_secs }) => assert!((wait_secs - 0.04).abs() < 1e-9, "{wait_secs}"),
            other => panic!("{other:?}"),
        }
        // Other kinds, principals and subscriptions have buckets of their own.
        taken(budgets.draw_arm("s", "p", Kind::Writes, at(0.0)));
        taken(budgets.draw_arm("s", "q", Kind::Reads, at(0.0)));
        taken(budgets.draw_arm("t", "p", Kind::Reads, at(0.0)));
        // Two seconds later 50 tokens came back, no more.
        for _ in 0..50 {
            taken(budgets.draw_arm("s", "p", Kind::Reads, at(2.0)));
        }
        assert!(matches!(
            budgets.draw_arm("s", "p", Kind::Reads, at(2.0)),
            Some(Draw::Refused { .. })
        ));
        // An idle bucket fills up to its burst and not beyond.
        assert_eq!(taken(budgets.draw_arm("s", "p", Kind::Reads, at(1000.0))).0, 249);
    }

    #[test]
    fn the_global_bucket_binds_many_principals_together() {
        let mut limits = Limits::arm();
        limits.global_factor = 2.0;
        let budgets = Budgets::new(Some(limits));
        for p in ["a", "b"] {
            for _ in 0..200 {
                taken(budgets.draw_arm("s", p, Kind::Deletes, at(0.0)));
            }
        }
        // A third principal's own bucket is full, the subscription's is not.
        match budgets.draw_arm("s", "c", Kind::Deletes, at(0.0)) {
            Some(Draw::Refused { wait_secs }) => assert!((wait_secs - 0.05).abs() < 1e-9, "{wait_secs}"),
            other => panic!("{other:?}"),
        }
        // A refused request took nothing: c's own bucket is still full once the global refills.
        assert_eq!(taken(budgets.draw_arm("s", "c", Kind::Deletes, at(0.05))).0, 199);
    }

    #[test]
    fn batch_accounts_have_principal_buckets_only_and_off_means_no_budget() {
        let budgets = Budgets::new(Some(Limits::arm()));
        assert_eq!(
            taken(budgets.draw_batch("acct", "p", Kind::Writes, at(0.0))),
            (199, None)
        );
        let off = Budgets::new(None);
        assert_eq!(off.draw_arm("s", "p", Kind::Reads, at(0.0)), None);
        assert_eq!(off.draw_batch("a", "p", Kind::Reads, at(0.0)), None);
    }
}
