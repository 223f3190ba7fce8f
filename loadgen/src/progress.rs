//! The live progress bar: preload progress, then measured time (or operations) with the
//! current throughput and error count, polled from [`Live`].

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::runner::{Live, Phase, Stop};

const TICK: Duration = Duration::from_millis(200);
/// Throughput shown is averaged over this window, long enough to be steady, short enough
/// to show a failover as it happens.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Whether a bar should be drawn: never into a pipe or file (it would fill logs with
/// redraws), never with `--quiet`.
pub fn should_draw(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}

/// Draws the bar until the run reaches [`Phase::Done`]; await the handle to clear it.
pub fn spawn(live: Arc<Live>, stop: Stop, keys: u64, draw: bool) -> JoinHandle<()> {
    let bar = if draw {
        ProgressBar::with_draw_target(Some(keys), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    tokio::spawn(async move {
        let measure_style =
            ProgressStyle::with_template("{spinner} {prefix:>9} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(measure_style.clone());
        bar.set_prefix("preload");
        let mut shown = Phase::Preload;
        // (time, count) samples inside the rate window.
        let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
        let mut measure_started = None;
        let mut ticker = tokio::time::interval(TICK);
        loop {
            ticker.tick().await;
            let phase = live.phase();
            if phase != shown {
                shown = phase;
                // The rate shown changes meaning (keys written, then operations).
                samples.clear();
                match phase {
                    Phase::Preload => {}
                    Phase::Warmup => {
                        bar.set_prefix("warm-up");
                        bar.set_length(0);
                        bar.set_position(0);
                    }
                    Phase::Measure => {
                        measure_started = Some(Instant::now());
                        bar.set_prefix("measure");
                        match stop {
                            Stop::Duration(d) => bar.set_length(d.as_secs()),
                            Stop::Ops(n) => bar.set_length(n),
                        }
                    }
                    Phase::Done => break,
                }
            }
            let ops = live.ops.load(Ordering::Relaxed);
            let preloaded = live.preloaded.load(Ordering::Relaxed);
            let (count, unit) = match shown {
                Phase::Preload => (preloaded, "keys/s"),
                _ => (ops, "ops/s"),
            };
            let errors = live.errors.load(Ordering::Relaxed);
            let now = Instant::now();
            samples.push_back((now, count));
            while samples
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                samples.pop_front();
            }
            let rate = match (samples.front(), samples.back()) {
                (Some(&(t0, o0)), Some(&(t1, o1))) if t1 > t0 => {
                    (o1 - o0) as f64 / (t1 - t0).as_secs_f64()
                }
                _ => 0.0,
            };
            match shown {
                Phase::Preload => bar.set_position(preloaded),
                Phase::Measure => match (stop, measure_started) {
                    (Stop::Duration(_), Some(t)) => bar.set_position(t.elapsed().as_secs()),
                    _ => bar.set_position(ops),
                },
                _ => {}
            }
            bar.set_message(format!("{rate:>9.0} {unit}  {errors} errors"));
        }
        bar.finish_and_clear();
    })
}
