//! `replikv-server`: one replica. Everything but argument parsing lives in the library.

use clap::Parser;

// glibc malloc showed up as ~14 % of a server's CPU under write load; mimalloc halves that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
