//! replikv-loadgen: benchmarks replikv (and, on the same workloads, etcd and Redis). The
//! nemesis that tests it under faults is `replikv-chaos`.
//!
//! - [`workload`]: seeded key choosers (uniform, hot-key, Zipf), operation mix, values.
//! - [`target`]: [`target::Target`], one client session to replikv, etcd or Redis with the
//!   same `get` / `put`.
//! - [`peers`]: the etcd (v3 gRPC KV) and Redis (with `WAIT`) clients behind `Target`.
//! - [`runner`]: the engine: preload, closed- or open-loop clients, warm-up, histograms,
//!   per-second timeline; no I/O of its own.
//! - [`bench`]: the command-line run: spawn or find the cluster, run, write results.
//! - [`progress`]: the live progress bar.
//! - [`report`]: the end-of-run summary table.
//! - [`output`]: the timeline and summary CSVs (columns documented in `loadgen/README.md`).
//! - [`plot`]: PNG plots (throughput over time, latency CDF, peer comparison).
//! - [`compare`]: reads summary CSVs back into a Markdown table and a comparison plot.

pub mod bench;
pub mod compare;
pub mod output;
pub mod peers;
pub mod plot;
pub mod progress;
pub mod report;
pub mod runner;
pub mod target;
pub mod workload;
