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

/// mimalloc, not glibc's malloc: under load Switchboard's threads allocate and free small
/// buffers concurrently, and glibc's arena locks and frees took about a fifth of the CPU of
/// an invocation; with mimalloc, invocations at 64 in flight went up by 35–70% (`cargo bench
/// -p gateway --bench invoke`, which uses it too, paired runs). Built not to ask for
/// transparent huge pages (the workspace's `no_thp` feature): mimalloc gives freed memory
/// back and touches it again later, and each touch of a huge page zeroed 2 MiB — 6% of all
/// CPU at 64 invocations in flight in a profile. (On a host whose THP setting is `always`
/// rather than `madvise`, `MIMALLOC_ALLOW_THP=0` does the same: see docs/architecture.md.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
