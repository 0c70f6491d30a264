//! Emulated time. Azure operations take minutes to hours; `--time-scale N` makes N emulated seconds
//! pass per real second so a test or a dry run can watch them finish quickly.
//!
//! Only resource lifecycles run on this clock. Token lifetimes, `Retry-After` for injected throttling
//! and the request log stay on real time: clients measure those with their own clocks.

use std::sync::Mutex;
use std::time::{Duration as StdDuration, Instant};

use time::{Duration, OffsetDateTime};

/// A point on the emulated clock.
pub type EmuTime = OffsetDateTime;

/// Where the emulated clock stops: far enough that no timeline reaches it, near enough that
/// adding an operation's duration to it cannot overflow.
const END_OF_TIME: OffsetDateTime = time::macros::datetime!(9000-01-01 0:00 UTC);

#[derive(Debug)]
pub struct Clock {
    scale: f64,
    anchor: Mutex<Anchor>,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    real: Instant,
    emulated: OffsetDateTime,
}

impl Clock {
    /// A clock that reads `start` now and runs `scale` times faster than real time.
    pub fn new(scale: f64, start: OffsetDateTime) -> Clock {
        assert!(scale > 0.0 && scale.is_finite(), "time scale must be a positive number");
        Clock {
            scale,
            anchor: Mutex::new(Anchor {
                real: Instant::now(),
                emulated: start,
            }),
        }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn now(&self) -> EmuTime {
        let anchor = *self.anchor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let real = anchor.real.elapsed().as_secs_f64();
        // Saturates at the end of the representable time rather than panicking on a clock run
        // far ahead (a huge scale over a long time, or many jumps).
        Duration::checked_seconds_f64(real * self.scale)
            .and_then(|ahead| anchor.emulated.checked_add(ahead))
            .unwrap_or(END_OF_TIME)
    }

    /// Jumps the emulated clock forward (the control API uses this to finish operations at once);
    /// false, and no jump, when it would pass the end of representable time.
    pub fn advance(&self, by: Duration) -> bool {
        let mut anchor = self.anchor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match anchor.emulated.checked_add(by).filter(|t| *t < END_OF_TIME) {
            Some(later) => {
                anchor.emulated = later;
                true
            }
            None => false,
        }
    }

    /// How long a client waits in real time for `emulated` to pass; at a tiny time scale that is
    /// longer than a `Duration` holds, and saturates rather than panicking the request.
    pub fn to_real(&self, emulated: Duration) -> StdDuration {
        let secs = emulated.as_seconds_f64().max(0.0) / self.scale;
        StdDuration::try_from_secs_f64(secs).unwrap_or(StdDuration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_longer_than_a_duration_holds_saturates() {
        let clock = Clock::new(1e-15, OffsetDateTime::UNIX_EPOCH + Duration::days(20_000));
        assert_eq!(clock.to_real(Duration::days(3650)), StdDuration::MAX);
        assert_eq!(clock.to_real(Duration::seconds(-5)), StdDuration::ZERO);
    }

    #[test]
    fn scaled_clock_runs_faster_and_advances() {
        let start = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
        let clock = Clock::new(3600.0, start);
        std::thread::sleep(StdDuration::from_millis(20));
        let elapsed = clock.now() - start;
        assert!(
            elapsed >= Duration::seconds(60),
            "20 ms at 3600x is over a minute, got {elapsed}"
        );
        assert!(clock.advance(Duration::hours(2)));
        assert!(clock.now() - start >= Duration::hours(2));
        assert_eq!(clock.to_real(Duration::hours(1)), StdDuration::from_secs(1));
        // Far ahead, it stops at the end of time instead of panicking.
        let mut jumps = 0;
        while clock.advance(Duration::seconds(1_000_000_000)) {
            jumps += 1;
        }
        assert!(jumps > 100, "{jumps}");
        assert!(clock.now() <= END_OF_TIME);
        let fast = Clock::new(1e6, OffsetDateTime::now_utc() + Duration::days(365 * 6900));
        std::thread::sleep(StdDuration::from_millis(5));
        assert!(fast.now() <= END_OF_TIME);
    }
}
