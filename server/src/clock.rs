//! The clock leases are measured on (docs/design.md §4, §10): `CLOCK_BOOTTIME` on Linux, which
//! keeps running while the machine is suspended. `CLOCK_MONOTONIC` (what `Instant` reads)
//! stops during a suspend, so a server that slept through one would wake believing its lease
//! still had the time it had when it went to sleep, and answer reads the rest of the cluster
//! has long since moved past.
//!
//! Only lease *validity* is measured here. Waits that protect others (a new primary's wait
//! for old leases to run out, a backup's loyalty to its primary) stay on `Instant`: a suspend
//! only makes them last longer, which is the safe direction.

use std::ops::{Add, Sub};
use std::time::Duration;

use crate::engine::{Now, Time};

/// A point on the boot clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    #[cfg(target_os = "linux")]
    pub fn now() -> BootInstant {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux
        // since 2.6.39, so the call cannot fail with valid arguments.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Elsewhere the monotonic clock is the best there is (it may stop during a suspend).
    #[cfg(not(target_os = "linux"))]
    pub fn now() -> BootInstant {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        BootInstant(START.get_or_init(std::time::Instant::now).elapsed())
    }

    /// Time from `earlier` to `self`, or `None` if `earlier` is later.
    pub fn checked_duration_since(self, earlier: BootInstant) -> Option<Duration> {
        self.0.checked_sub(earlier.0)
    }

    /// This point as the engine's plain time value (time since boot).
    pub fn as_time(self) -> Time {
        Time::from_duration(self.0)
    }
}

/// The replica's two clocks, read here and handed to the engine as plain [`Time`] values
/// (the engine never reads a clock): the boot clock for leases, and tokio's steady clock
/// (measured from when the replica opened) for waits that protect others.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    origin: tokio::time::Instant,
}

impl Clocks {
    pub fn new() -> Clocks {
        Clocks {
            origin: tokio::time::Instant::now(),
        }
    }

    /// Both clocks now.
    pub fn now(&self) -> Now {
        Now {
            steady: self.steady_now(),
            boot: self.boot_now(),
        }
    }

    /// The steady clock now.
    pub fn steady_now(&self) -> Time {
        Time::from_duration(tokio::time::Instant::now() - self.origin)
    }

    /// The boot clock now.
    pub fn boot_now(&self) -> Time {
        BootInstant::now().as_time()
    }

    /// The tokio instant of a steady-clock time, to sleep until it.
    pub fn steady_instant(&self, t: Time) -> tokio::time::Instant {
        self.origin + t.since_origin()
    }
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks::new()
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub for BootInstant {
    type Output = Duration;
    /// Saturates at zero, like `Instant`'s subtraction.
    fn sub(self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_clock_moves_forward_with_real_time() {
        let a = BootInstant::now();
        std::thread::sleep(Duration::from_millis(20));
        let b = BootInstant::now();
        assert!(b - a >= Duration::from_millis(20));
        assert_eq!(a.checked_duration_since(b), None);
        assert!(a + Duration::from_secs(1) > b);
    }
}
