//! Jittered exponential backoff between attempts.

use std::time::Duration;

/// First backoff delay: short, because the usual cause (a server that is
/// down or not the primary) is fixed by going to the next server, not by
/// waiting.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(5);
/// Largest backoff delay: a view change takes a few hundred milliseconds
/// (docs/design.md §5), and a client should notice the new view soon after.
pub const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Delays doubling from [`INITIAL_BACKOFF`] to [`MAX_BACKOFF`], each drawn
/// uniformly from the upper half of the current step so that clients that
/// failed together do not retry in lockstep ("equal jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new() -> Self {
        Self {
            step: INITIAL_BACKOFF,
        }
    }

    /// The next delay, using `unit` (in `[0, 1)`) as the random draw.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = self.step / 2;
        let delay = half + half.mul_f64(unit);
        self.step = (self.step * 2).min(MAX_BACKOFF);
        delay
    }

    /// The next delay, with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let mut b = Backoff::new();
        let highs: Vec<u128> = (0..8).map(|_| b.next_with(1.0).as_millis()).collect();
        assert_eq!(highs, vec![5, 10, 20, 40, 80, 160, 200, 200]);
    }

    #[test]
    fn jitter_stays_within_upper_half_of_each_step() {
        let mut b = Backoff::new();
        for _ in 0..5 {
            b.next_with(0.5);
        }
        // Sixth step is 160 ms: delays fall in [80, 160].
        let mut low = b.clone();
        assert_eq!(low.next_with(0.0), Duration::from_millis(80));
        let mut any = b.clone();
        let d = any.next_delay();
        assert!(d >= Duration::from_millis(80) && d <= Duration::from_millis(160));
    }

    #[test]
    fn nonsense_draws_do_not_escape_the_bounds() {
        let mut b = Backoff::new();
        assert_eq!(b.next_with(f64::NAN), Duration::from_micros(2500));
        assert_eq!(b.next_with(7.0), Duration::from_millis(10));
    }
}
