use std::process::ExitCode;

use clap::Parser;
use replikv_chaos::{ChaosArgs, ChaosCommand};

// The servers the nemesis spawns run in this binary too: see replikv-server's allocator
// note.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The replikv nemesis: spawns a cluster, injects faults while recording clients run, then
/// checks that no acknowledged write was lost and that the history is linearizable.
#[derive(Parser)]
#[command(name = "replikv-chaos", version)]
struct Cli {
    #[command(flatten)]
    args: ChaosArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(ChaosCommand::Server(opt)) = cli.args.command {
        replikv_server::init_tracing();
        return match replikv_server::serve(*opt).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("replikv-server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match replikv_chaos::run(cli.args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("replikv-chaos: {e}");
            ExitCode::FAILURE
        }
    }
}
