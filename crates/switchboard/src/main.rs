//! The `switchboard` binary: a thin shell over the library crates. Parsing and wiring only.
use clap::Parser;

mod audit;
mod cli;
mod configuration;
mod demo_cmd;
mod token;
mod up;
mod vault_cmd;
mod walkthrough;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let settings = match configuration::Settings::load(&cli.global) {
        Ok(mut settings) => {
            if let cli::Command::Up(up) = &cli.command {
                up::apply_flags(&mut settings, up);
            }
            settings
        }
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    configuration::init_tracing(cli.verbose, settings.log.format);
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
    match runtime.block_on(cli::run(cli.command, settings)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("switchboard: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
