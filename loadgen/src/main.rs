use std::process::ExitCode;

use clap::{Parser, Subcommand};
use replikv_loadgen::bench::{self, BenchError, RunArgs};
use replikv_loadgen::{compare, report};
use replikv_testkit::ServerCommand;

// The servers `--spawn` starts run in this binary too: see replikv-server's allocator note.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for replikv (and etcd and Redis on the same workloads).
///
/// Without a subcommand it runs one benchmark, e.g. `--spawn 3 --duration 10s`.
#[derive(Parser)]
#[command(
    name = "replikv-loadgen",
    version,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print summary CSVs as a Markdown table and optionally plot them side by side.
    Compare(compare::CompareArgs),
    /// Run one replikv server in this process (how `--spawn` starts its cluster, so that no
    /// separate server binary has to be built).
    #[command(hide = true)]
    Server(Box<replikv_server::Opt>),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Server(opt)) => {
            replikv_server::init_tracing();
            match replikv_server::serve(*opt).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("replikv-server: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Compare(args)) => match compare::run(&args) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("replikv-loadgen compare: {e}");
                ExitCode::FAILURE
            }
        },
        None => run_bench(cli.run).await,
    }
}

async fn run_bench(args: RunArgs) -> ExitCode {
    init_tracing();
    let server = match std::env::current_exe() {
        Ok(exe) => ServerCommand::new(exe, vec!["server".into()]),
        Err(e) => {
            eprintln!("replikv-loadgen: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    match bench::run(args, server).await {
        Ok(outcome) => {
            print!("{}", report::render(&outcome.params, &outcome.report));
            for file in &outcome.files {
                println!("wrote {}", file.display());
            }
            if outcome.report.all().ok() == 0 {
                eprintln!("replikv-loadgen: no operation succeeded");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(BenchError::Args(message)) => {
            eprintln!("replikv-loadgen: {message}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("replikv-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings only by default: the progress bar and summary are the output; `RUST_LOG=debug`
/// shows every failed operation.
fn init_tracing() {
    replikv_server::init_tracing_with_default("warn");
}
