//! PNG plots of a run (throughput over time, latency CDF per operation) and of a peer
//! comparison, drawn with plotters' bitmap backend.
//!
//! Text needs a system font (found through fontconfig). A machine without one still gets
//! every plot, drawn without titles, tick labels and legends rather than not at all; the
//! colours are fixed (get blue, put red, all black) and documented in `loadgen/README.md`
//! so such a plot can still be read.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use plotters::style::FontStyle;
use thiserror::Error;

use crate::runner::RunReport;

const SIZE: (u32, u32) = (1000, 600);
const GET_COLOR: RGBColor = RGBColor(31, 119, 180);
const PUT_COLOR: RGBColor = RGBColor(214, 39, 40);
const ALL_COLOR: RGBColor = BLACK;
/// Bar colours of the comparison plot, one per target in order of appearance.
const SERIES_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A named, coloured line: `(name, colour, points)`.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

#[derive(Debug, Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

impl PlotError {
    fn new(path: &Path, error: impl std::fmt::Display) -> Self {
        PlotError {
            path: path.display().to_string(),
            message: error.to_string(),
        }
    }
}

/// Whether text can be drawn: plotters loads fonts lazily and fails the whole drawing when
/// none is found, so ask once up front.
pub fn fonts_available() -> bool {
    FontDesc::new(FontFamily::SansSerif, 14.0, FontStyle::Normal)
        .box_size("0")
        .is_ok()
}

/// Successful operations per second over the measured run, for get, put and both.
pub fn plot_throughput(path: &Path, title: &str, report: &RunReport) -> Result<(), PlotError> {
    let text = fonts_available();
    let mut series: [Series; 3] = [
        ("all", ALL_COLOR, Vec::new()),
        ("get", GET_COLOR, Vec::new()),
        ("put", PUT_COLOR, Vec::new()),
    ];
    for row in &report.timeline {
        let interval = report.interval_of(row);
        // A sliver of a second at the end holds a handful of operations whose rate is
        // noise; leave it off rather than draw a spike.
        if interval < 0.5 {
            continue;
        }
        // Each row is plotted at the middle of the time it covers.
        let x = row.second as f64 + interval / 2.0;
        series[0]
            .2
            .push((x, (row.get_ok + row.put_ok + row.scan_ok) as f64 / interval));
        series[1].2.push((x, row.get_ok as f64 / interval));
        series[2].2.push((x, row.put_ok as f64 / interval));
    }
    let x_max = report.elapsed.as_secs_f64().max(1.0);
    let y_max = series[0]
        .2
        .iter()
        .map(|&(_, y)| y)
        .fold(0.0, f64::max)
        .max(1.0)
        // Headroom for the legend in the upper right corner.
        * 1.3;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(15);
        if text {
            builder
                .caption(title, ("sans-serif", 22))
                .x_label_area_size(45)
                .y_label_area_size(80);
        }
        let mut chart = builder.build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("seconds since measuring started")
                .y_desc("successful operations per second")
                .y_label_formatter(&|v| format!("{v:.0}"));
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        for (name, color, points) in series.iter().filter(|(_, _, p)| !p.is_empty()) {
            // An op type the workload never issued stays off the plot.
            if points.iter().all(|&(_, y)| y == 0.0) && *name != "all" {
                continue;
            }
            let style = color.stroke_width(2);
            let drawn = chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
            if text {
                drawn
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| PlotError::new(path, e))
}

/// The latency distribution of each operation type as a CDF over a logarithmic latency axis.
pub fn plot_latency_cdf(path: &Path, title: &str, report: &RunReport) -> Result<(), PlotError> {
    let text = fonts_available();
    let all = report.all();
    let series = [
        ("all", ALL_COLOR, cdf_points(&all.latency)),
        ("get", GET_COLOR, cdf_points(&report.get.latency)),
        ("put", PUT_COLOR, cdf_points(&report.put.latency)),
    ];
    let lo = (all.latency.min().max(1) as f64 / 1.5).max(1.0);
    let hi = (all.latency.max().max(2) as f64 * 1.5).max(lo * 10.0);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(15);
        if text {
            builder
                .caption(title, ("sans-serif", 22))
                .x_label_area_size(45)
                .y_label_area_size(60);
        }
        let mut chart = builder.build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("latency (log scale)")
                .y_desc("percent of operations at or below")
                .y_label_formatter(&|v| format!("{v:.0}"))
                .x_label_formatter(&|v| format_us(*v));
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw()?;
        for (name, color, points) in series.iter().filter(|(_, _, p)| !p.is_empty()) {
            let style = color.stroke_width(2);
            let drawn = chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
            if text {
                drawn
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| PlotError::new(path, e))
}

/// A latency tick label: µs below a millisecond, ms above.
fn format_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{} ms", us / 1000.0)
    }
}

/// `(latency µs, percent of operations at or below it)` at every recorded value.
fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    h.iter_recorded()
        .map(|v| {
            (
                h.highest_equivalent(v.value_iterated_to()).max(1) as f64,
                v.quantile_iterated_to() * 100.0,
            )
        })
        .collect()
}

/// One bar of a comparison: `value` of `series` (a target) in `group` (a workload).
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub group: String,
    pub series: String,
    pub value: f64,
}

/// Grouped bar charts, one panel per metric: groups along x, one coloured bar per series.
/// `panels` pairs a y-axis title with its bars.
pub fn plot_comparison(
    path: &Path,
    title: &str,
    panels: &[(&str, Vec<Bar>)],
) -> Result<(), PlotError> {
    let text = fonts_available();
    let mut groups: Vec<String> = Vec::new();
    let mut series: Vec<String> = Vec::new();
    for bar in panels.iter().flat_map(|(_, bars)| bars) {
        if !groups.contains(&bar.group) {
            groups.push(bar.group.clone());
        }
        if !series.contains(&bar.series) {
            series.push(bar.series.clone());
        }
    }
    let height = 80 + 420 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        root.fill(&WHITE)?;
        let root = if text {
            root.titled(title, ("sans-serif", 24))?
        } else {
            root.clone()
        };
        let areas = root.split_evenly((panels.len().max(1), 1));
        let n_groups = groups.len().max(1);
        let width = 0.8 / series.len().max(1) as f64;
        for ((y_title, bars), area) in panels.iter().zip(areas.iter()) {
            // A logarithmic axis: peers differ by orders of magnitude (a 1-client put and a
            // 64-client get), and on a linear axis the small bars vanish.
            let y_max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(10.0) * 2.0;
            let y_min = bars
                .iter()
                .map(|b| b.value)
                .filter(|v| *v > 0.0)
                .fold(f64::INFINITY, f64::min)
                .min(y_max / 10.0);
            // A decade boundary well below the smallest bar, so that bar still shows.
            let y_min = 10f64.powf((y_min / 2.0).log10().floor()).max(0.1);
            let mut builder = ChartBuilder::on(area);
            builder.margin(15);
            if text {
                builder.x_label_area_size(40).y_label_area_size(90);
            }
            let mut chart =
                builder.build_cartesian_2d(0.0..n_groups as f64, (y_min..y_max).log_scale())?;
            let label_group = |x: &f64| {
                // Labels sit at group centres, x = i + 0.5.
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 1e-6 {
                    groups.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            };
            let mut mesh = chart.configure_mesh();
            mesh.disable_x_mesh();
            if text {
                mesh.y_desc(format!("{y_title} (log scale)"))
                    .y_label_formatter(&|v| format!("{v:.0}"))
                    .x_labels(2 * n_groups + 1)
                    .x_label_formatter(&label_group);
            } else {
                mesh.disable_x_axis().disable_y_axis();
            }
            mesh.draw()?;
            for (s, name) in series.iter().enumerate() {
                let color = SERIES_COLORS[s % SERIES_COLORS.len()];
                let rects: Vec<_> = bars
                    .iter()
                    .filter(|b| &b.series == name && b.value > 0.0)
                    .filter_map(|b| {
                        let g = groups.iter().position(|g| g == &b.group)? as f64;
                        let x0 = g + 0.1 + s as f64 * width;
                        Some(Rectangle::new(
                            [(x0, y_min), (x0 + width * 0.9, b.value)],
                            color.filled(),
                        ))
                    })
                    .collect();
                let drawn = chart.draw_series(rects)?;
                if text {
                    drawn.label(name.as_str()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                    });
                }
            }
            if text {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| PlotError::new(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::{OpStats, Second};
    use crate::target::TargetStats;
    use std::time::Duration;

    fn report() -> RunReport {
        let mut get = OpStats::default();
        let mut put = OpStats::default();
        let mut timeline = Vec::new();
        for s in 0..5u64 {
            let mut row = Second {
                second: s,
                get_ok: 100 + s * 10,
                put_ok: 50,
                scan_ok: 0,
                errors: 0,
                latency: Histogram::new_with_bounds(1, 1_000_000, 2).unwrap(),
            };
            row.latency.record(500).unwrap();
            timeline.push(row);
        }
        for us in 1..2000u64 {
            get.latency.record(us * 3).unwrap();
            put.latency.record(us * 7 + 900).unwrap();
        }
        RunReport {
            get,
            put,
            scan: OpStats::default(),
            elapsed: Duration::from_millis(4500),
            preload_time: Duration::ZERO,
            preload_errors: 0,
            timeline,
            stats: TargetStats::default(),
            interrupted: false,
        }
    }

    fn assert_png(path: &Path) {
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.len() > 1000, "{} is too small", path.display());
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn run_plots_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let throughput = dir.path().join("throughput.png");
        let cdf = dir.path().join("cdf.png");
        plot_throughput(&throughput, "test run", &report()).unwrap();
        plot_latency_cdf(&cdf, "test run", &report()).unwrap();
        assert_png(&throughput);
        assert_png(&cdf);
    }

    #[test]
    fn comparison_plot_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peers.png");
        let bar = |group: &str, series: &str, value| Bar {
            group: group.into(),
            series: series.into(),
            value,
        };
        let panels = [
            (
                "ops/s",
                vec![
                    bar("put 64c", "replikv", 900.0),
                    bar("put 64c", "etcd", 700.0),
                    bar("get 64c", "replikv", 5000.0),
                ],
            ),
            (
                "p99 µs",
                vec![
                    bar("put 64c", "replikv", 9000.0),
                    bar("get 64c", "redis", 300.0),
                ],
            ),
        ];
        plot_comparison(&path, "peers", &panels).unwrap();
        assert_png(&path);
    }

    #[test]
    fn empty_report_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let empty = RunReport {
            get: OpStats::default(),
            put: OpStats::default(),
            scan: OpStats::default(),
            elapsed: Duration::ZERO,
            preload_time: Duration::ZERO,
            preload_errors: 0,
            timeline: Vec::new(),
            stats: TargetStats::default(),
            interrupted: true,
        };
        plot_throughput(&dir.path().join("t.png"), "empty", &empty).unwrap();
        plot_latency_cdf(&dir.path().join("c.png"), "empty", &empty).unwrap();
    }

    #[test]
    fn cdf_ends_at_one_hundred_percent() {
        let r = report();
        let points = cdf_points(&r.get.latency);
        assert!((points.last().unwrap().1 - 100.0).abs() < 1e-9);
        assert!(points
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }
}
