//! `replikv-server`: one replica. Everything but argument parsing lives in the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    replikv_server::init_tracing();
    let opt = replikv_server::Opt::parse();
    match replikv_server::serve(opt).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replikv-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
