//! The summary a person reads at the end of a run: what was measured, against what, and a
//! table of throughput and latency percentiles per operation type.

use std::fmt::Write;

use hdrhistogram::Histogram;

use crate::output::RunParams;
use crate::runner::{OpStats, RunReport, Stop};

fn latency(h: &Histogram<u64>, q: Option<f64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    let us = match q {
        Some(q) => h.value_at_quantile(q),
        None => h.max(),
    };
    us.to_string()
}

fn row(out: &mut String, name: &str, stats: &OpStats, report: &RunReport) {
    let h = &stats.latency;
    let _ = writeln!(
        out,
        "{name:<5} {:>10} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        stats.ok(),
        report.throughput(stats),
        latency(h, Some(0.5)),
        latency(h, Some(0.9)),
        latency(h, Some(0.99)),
        latency(h, Some(0.999)),
        latency(h, None),
        stats.errors,
    );
}

/// The end-of-run summary, several lines ending in a newline.
pub fn render(params: &RunParams, report: &RunReport) -> String {
    let mut out = String::new();
    let origin = if params.spawned {
        format!("spawned here, --sync {}", params.sync)
    } else if params.sync.is_empty() {
        params.server_addrs.join(",")
    } else {
        format!("{}, --sync {}", params.server_addrs.join(","), params.sync)
    };
    let _ = writeln!(
        out,
        "{} cluster of {} server{} ({origin}), route {}",
        params.target,
        params.servers,
        if params.servers == 1 { "" } else { "s" },
        params.route,
    );
    let workload = match params.workload.as_str() {
        "hotkey" => format!(
            "hotkey ({:.0}% of ops on {:.0}% of keys)",
            params.hot_ops * 100.0,
            params.hot_keys * 100.0
        ),
        "zipf" => format!("zipf (s = {})", params.zipf),
        other => other.to_string(),
    };
    let mode = match params.rate {
        Some(rate) => format!("open loop at {rate} ops/s"),
        None => "closed loop".into(),
    };
    let _ = writeln!(
        out,
        "workload {workload}, {:.0}% gets, {} keys, {}-byte values, {} clients, {mode}",
        params.read_ratio * 100.0,
        params.keys,
        params.value_size,
        params.clients,
    );
    let limit = match params.stop {
        Stop::Duration(_) => String::new(),
        Stop::Ops(n) => format!(" ({n} operations)"),
    };
    let preload = if params.preload {
        format!(
            "; preloaded {} keys in {:.1} s",
            params.keys,
            report.preload_time.as_secs_f64()
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "measured {:.2} s{limit} after {} s warm-up{preload}{}",
        report.elapsed.as_secs_f64(),
        params.warmup_s,
        if report.interrupted {
            " (interrupted)"
        } else {
            ""
        },
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "op", "ok", "ops/s", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
    );
    let all = report.all();
    row(&mut out, "get", &report.get, report);
    row(&mut out, "put", &report.put, report);
    if report.scan.ok() + report.scan.errors > 0 {
        row(&mut out, "scan", &report.scan, report);
    }
    row(&mut out, "all", &all, report);
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "retries {} of {} requests; {} write(s) with unknown outcome; {} get(s) found no value{}",
        report.stats.retries,
        report.stats.requests,
        all.unknown,
        report.get.not_found,
        if report.preload_errors > 0 {
            format!("; {} key(s) failed to preload", report.preload_errors)
        } else {
            String::new()
        },
    );
    out
}
