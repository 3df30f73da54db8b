//! The `switchboard` binary: a thin shell over the library crates. Parsing and wiring only.
use clap::Parser;

mod audit;
mod cli;
mod configuration;
mod up;
mod vault_cmd;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    configuration::init_tracing(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("switchboard: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
