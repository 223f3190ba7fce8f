//! `replikv-sim`: runs seeds of the deterministic simulation (docs/simulator.md).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use replikv_sim::{run, Config, HEAL};

#[derive(Parser, Debug)]
#[command(about = "Deterministic simulation of replikv under seeded faults")]
struct Opt {
    /// Run this one seed and print its trace hash.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run this many seeds.
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of `--seeds`.
    #[arg(long, default_value_t = 0)]
    start: u64,
    #[arg(long, default_value_t = 5)]
    servers: usize,
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Simulated seconds of load and faults per seed (a quiet healing period follows).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Worker threads, each running whole seeds (a seed itself is single-threaded).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Add the retrying proxy on the append stream: an append whose receiver stays paused
    /// past the proxy's per-try timeout is sent again (docs/simulator.md).
    #[arg(long)]
    proxy_retries: bool,
    /// Turn one safety rule off (built with `--features rule-switches`): quorum,
    /// consecutive-lease, pending-read, install-wait, history-check, amnesia,
    /// session-dedup, commit-all-members.
    #[cfg(feature = "rule-switches")]
    #[arg(long)]
    rule_off: Option<String>,
}

/// Applies `--rule-off` in the calling thread (the switches are per thread).
fn switches(opt: &Opt) {
    #[cfg(feature = "rule-switches")]
    if let Some(name) = &opt.rule_off {
        let rule = replikv_sim::rule_by_name(name).unwrap_or_else(|| {
            eprintln!("unknown rule {name}");
            std::process::exit(2)
        });
        replikv_server::engine::rules::set(rule, false);
    }
    let _ = opt;
}

fn config(opt: &Opt, seed: u64) -> Config {
    Config {
        servers: opt.servers,
        clients: opt.clients,
        duration: Duration::from_secs(opt.duration),
        proxy_retries: opt.proxy_retries,
        ..Config::new(seed)
    }
}

fn repro(opt: &Opt, seed: u64) -> String {
    format!(
        "replikv-sim --seed {seed} --servers {} --clients {} --duration {}{}",
        opt.servers,
        opt.clients,
        opt.duration,
        if opt.proxy_retries {
            " --proxy-retries"
        } else {
            ""
        }
    )
}

/// Prints a failing seed: what broke, how to replay it, and the events before it.
fn explain(opt: &Opt, seed: u64) {
    switches(opt);
    let first = run(config(opt, seed));
    let traced = run(Config {
        trace: true,
        trace_until: first.culprit_at,
        ..config(opt, seed)
    });
    println!("seed {seed} FAILED:");
    for v in &traced.violations {
        println!("  {v}");
    }
    println!("  reproduce: {}", repro(opt, seed));
    println!("  last events before the violation:");
    for line in &traced.trace {
        println!("    {line}");
    }
}

fn main() -> ExitCode {
    let opt = Opt::parse();
    switches(&opt);
    if let Some(seed) = opt.seed {
        let r = run(config(&opt, seed));
        println!(
            "seed {seed} trace hash {:016x} events {} ops {} acked writes {} simulated {:.1} s{}{}",
            r.trace_hash,
            r.events,
            r.ops,
            r.acked_writes,
            r.simulated.as_secs_f64(),
            if opt.proxy_retries {
                format!(" proxy retries {}", r.proxy_retries)
            } else {
                String::new()
            },
            if r.unsettled {
                " (unsettled at the end)"
            } else {
                ""
            }
        );
        if r.violations.is_empty() {
            return ExitCode::SUCCESS;
        }
        explain(&opt, seed);
        return ExitCode::FAILURE;
    }
    let count = opt.seeds.unwrap_or(100);
    let started = Instant::now();
    let next = std::sync::atomic::AtomicU64::new(opt.start);
    let end = opt.start + count;
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..opt.jobs.max(1) {
            s.spawn(|| loop {
                switches(&opt);
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let r = run(config(&opt, seed));
                results.lock().expect("results").push(r);
            });
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|r| r.seed);
    let failed: Vec<u64> = results
        .iter()
        .filter(|r| !r.violations.is_empty())
        .map(|r| r.seed)
        .collect();
    let unsettled = results.iter().filter(|r| r.unsettled).count();
    let simulated: f64 = results.iter().map(|r| r.simulated.as_secs_f64()).sum();
    for &seed in failed.iter().take(3) {
        explain(&opt, seed);
    }
    let _ = HEAL;
    println!(
        "seeds {count} violations {} unsettled {unsettled} simulated {simulated:.0} s wall {wall:.1} s sim/wall {:.0} seeds/min {:.0}",
        failed.len(),
        simulated / wall.max(1e-9),
        count as f64 * 60.0 / wall.max(1e-9)
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!("failing seeds: {failed:?}");
        ExitCode::FAILURE
    }
}
