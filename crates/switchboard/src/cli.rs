//! Command-line interface.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    audit,
    configuration::{GlobalArgs, Settings},
    token, up, vault_cmd,
    walkthrough::{
        self, AllowArgs, ApiArgs, ConnectArgs, DecideArgs, DenyArgs, DisconnectArgs, HistoryArgs,
        InvokeArgs, ToolsArgs, WithdrawArgs,
    },
};

#[derive(Debug, Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Lets an AI act in remote MCP servers on behalf of each user, safely."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    /// More log output (repeat for more). RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run Switchboard: on the embedded default (JSONL event log and file vault under the data
    /// directory), or on JetStream with --nats. Serves the HTTP API.
    Up(UpArgs),
    /// Print a signed development token (HS256, with the configured or generated secret).
    Token(TokenArgs),
    /// Print the effective configuration (file, environment and flags merged), secrets
    /// redacted.
    Config,
    /// Read the audit history (the event stream).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Manage the secrets vault.
    #[command(subcommand)]
    Vault(VaultCommand),
    /// List the servers and your connection to each (talks to a running `up`).
    Servers(ApiArgs),
    /// Connect to a server: prints the authorization URL, waits until the connection is
    /// healthy or failed.
    Connect(ConnectArgs),
    /// End your connection to a server (its tokens revoked at the provider where it allows).
    Disconnect(DisconnectArgs),
    /// List your tools and their states.
    Tools(ToolsArgs),
    /// Set a tool (or with --category, a category) to always, approval or block.
    Allow(AllowArgs),
    /// Invoke a tool as the AI would; waits for approval when the tool needs it.
    Invoke(InvokeArgs),
    /// List the invocations waiting for your approval.
    Approvals(ApiArgs),
    /// Approve an invocation that waits for you.
    Approve(DecideArgs),
    /// Deny an invocation that waits for you.
    Deny(DenyArgs),
    /// Withdraw an invocation no longer wanted, as the orchestrator would: one waiting for
    /// approval leaves the approvals; one whose call runs has it cancelled.
    Withdraw(WithdrawArgs),
    /// Your own history: your connections, settings, approvals and every invocation made as
    /// you, with who did each (from 24 hours ago, or --since).
    History(HistoryArgs),
}

#[derive(Debug, Clone, Default, Args)]
pub struct UpArgs {
    /// Address the HTTP API listens on [env: SWITCHBOARD_LISTEN] [default: 127.0.0.1:8080].
    #[arg(long)]
    pub listen: Option<String>,
    /// Base of every URL Switchboard hands out [env: SWITCHBOARD_PUBLIC_URL].
    #[arg(long)]
    pub public_url: Option<String>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also start, inside this process on loopback, a demo OAuth authorization server and a
    /// demo MCP server (an issue tracker), add it to the catalog and (first start only) to
    /// the server list, and print tokens and the next commands.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user the token is for (its `sub`).
    #[arg(long)]
    pub user: String,
    /// A role (repeatable): admin, analyst, analyst_read_only, orchestrator, or a custom one.
    #[arg(long = "role", required = true)]
    pub roles: Vec<String>,
    /// How long the token is valid: e.g. 30m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = token::parse_ttl)]
    pub ttl: std::time::Duration,
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
    /// Only events about this server (its id): its own events and name claims, its
    /// connections and tool settings, and the requests of invocations of it.
    #[arg(long)]
    pub server: Option<String>,
    /// Only events about this user (their subjects) or caused by them (their user id).
    #[arg(long)]
    pub user: Option<String>,
    /// Only the events of this invocation id (every user's invocation with that id).
    #[arg(long)]
    pub invocation: Option<String>,
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

pub async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    let store = settings.store();
    match command {
        Command::Up(args) => up::run(settings, args.demo).await,
        Command::Token(args) => token::print(&settings, &args),
        Command::Config => {
            print!("{}", settings.redacted_toml()?);
            Ok(())
        }
        Command::Audit(AuditCommand::Replay(args)) => audit::replay(&store, &args).await,
        Command::Audit(AuditCommand::Servers { at }) => audit::servers(&store, at).await,
        Command::Vault(command) => vault_cmd::run(&store, command).await,
        Command::Servers(args) => walkthrough::servers(&args, &settings).await,
        Command::Connect(args) => walkthrough::connect(&args, &settings).await,
        Command::Disconnect(args) => walkthrough::disconnect(&args, &settings).await,
        Command::Tools(args) => walkthrough::tools(&args, &settings).await,
        Command::Allow(args) => walkthrough::allow(&args, &settings).await,
        Command::Invoke(args) => walkthrough::invoke(&args, &settings).await,
        Command::Approvals(args) => walkthrough::approvals(&args, &settings).await,
        Command::Approve(args) => walkthrough::decide(&args, &settings, None).await,
        Command::Deny(args) => {
            let reason = args.reason.unwrap_or_default();
            walkthrough::decide(&args.decide, &settings, Some(&reason)).await
        }
        Command::Withdraw(args) => walkthrough::withdraw(&args, &settings).await,
        Command::History(args) => walkthrough::history(&args, &settings).await,
    }
}
