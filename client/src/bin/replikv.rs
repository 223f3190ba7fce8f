//! `replikv get|put|delete|status`: see [`replikv_client::cli`].

fn main() -> std::process::ExitCode {
    replikv_client::cli::main()
}
