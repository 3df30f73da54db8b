//! Command-line interface.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{audit, configuration::StoreOptions, up, vault_cmd};

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Lets an AI act in remote MCP servers on behalf of each user, safely."
)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreOptions,

    /// More log output (repeat for more). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run Switchboard: on the embedded default (JSONL event log and file vault under the data
    /// directory), or on JetStream with --nats.
    Up,
    /// Read the audit history (the event stream).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage the secrets vault.
    #[command(subcommand)]
    Vault(VaultCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the event history, oldest first.
    Replay(ReplayArgs),
    /// Print the configured servers as they were at a position of the config log.
    Servers {
        /// Config log sequence to stop at (inclusive); the latest state if left out.
        #[arg(long)]
        at: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Which log to read.
    #[arg(long, value_enum, default_value_t = LogChoice::All)]
    pub log: LogChoice,
    /// Only events whose aggregate subject matches, NATS wildcards allowed:
    /// `server.>`, `connection.*.alice_40example_2Ecom`.
    #[arg(long)]
    pub subject: Option<String>,
    /// Only events of these types (repeatable or comma-separated), e.g. ServerAdded.
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only events that occurred at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// Only events that occurred before this RFC 3339 time.
    #[arg(long)]
    pub until: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    pub format: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogChoice {
    All,
    Config,
    Invocations,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One JSON object per line.
    Json,
    /// A readable table.
    Table,
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Re-encrypt every entry under the current master key. With --new-key, first add a new
    /// key to the key file and make it current. Services keep running meanwhile.
    Rotate {
        #[arg(long)]
        new_key: bool,
        /// After re-encrypting, remove this key id from the key file (refused while any entry
        /// still needs it).
        #[arg(long)]
        retire: Option<String>,
    },
    /// Open every entry and report any that cannot be opened.
    Check,
}

/// Where the embedded default keeps its files unless told otherwise.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("switchboard-data")
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up => up::run(&cli.store).await,
        Command::Audit(AuditCommand::Replay(args)) => audit::replay(&cli.store, &args).await,
        Command::Audit(AuditCommand::Servers { at }) => audit::servers(&cli.store, at).await,
        Command::Vault(command) => vault_cmd::run(&cli.store, command).await,
    }
}
