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
        anchor.emulated + Duration::seconds_f64(real * self.scale)
    }

    /// Jumps the emulated clock forward (the control API uses this to finish operations at once).
    pub fn advance(&self, by: Duration) {
        let mut anchor = self.anchor.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        anchor.emulated += by;
    }

    /// How long a client waits in real time for `emulated` to pass.
    pub fn to_real(&self, emulated: Duration) -> StdDuration {
        let secs = emulated.as_seconds_f64().max(0.0) / self.scale;
        StdDuration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        clock.advance(Duration::hours(2));
        assert!(clock.now() - start >= Duration::hours(2));
        assert_eq!(clock.to_real(Duration::hours(1)), StdDuration::from_secs(1));
    }
}
