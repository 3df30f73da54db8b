//! Configuration: one TOML file (`--config` / `SWITCHBOARD_CONFIG`), `SWITCHBOARD_*`
//! environment variables over it, flags over both, merged by figment. Unknown keys are refused
//! with their name. Secrets may come from files. `docs/configuration.md` lists every setting;
//! a test keeps it complete.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use eventlog::{
    EventLog,
    jetstream::{JetStreamConfig, JetStreamLog},
    jsonl::{JsonlLog, JsonlOptions},
    projection::{CheckpointStore, FileCheckpointStore},
};
use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// The flags every command takes; each overrides its setting from the file and environment.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalArgs {
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded default (event logs, vault, key file, checkpoints).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// NATS server URL: use JetStream for events and a JetStream KV bucket for secrets instead
    /// of the data directory.
    #[arg(long, global = true)]
    pub nats: Option<String>,
    /// Prefix of Switchboard's subjects, streams and buckets on NATS.
    #[arg(long, global = true)]
    pub nats_prefix: Option<String>,
}

/// Every setting. Field names are the TOML keys; [`ENV_VARS`] maps the environment onto them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Address the HTTP API listens on.
    pub listen: String,
    /// Base of every URL Switchboard hands out; `http://<listen>` (or https with TLS) if unset.
    pub public_url: Option<String>,
    pub tls: TlsSettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    /// Custom roles (or redefined default roles): `[roles.<name>] permissions = [...]`.
    pub roles: BTreeMap<String, RoleSettings>,
    pub nats: NatsSettings,
    pub log: LogSettings,
    pub console: ConsoleSettings,
    pub events: EventSettings,
    pub outbound: OutboundSettings,
    pub oauth: OAuthSettings,
    pub invocations: InvocationSettings,
}

/// The invoker's settings (`[invocations]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvocationSettings {
    /// Seconds a *Needs approval* invocation waits for its user before it expires.
    pub approval_timeout_secs: u64,
    /// Largest result handed back, in bytes; more is cut and flagged `truncated`.
    pub result_limit_bytes: usize,
    /// Record arguments and results in the invocation events (off: digests and sizes only).
    pub capture_payloads: bool,
    /// Milliseconds a call may take when the request names no deadline.
    pub default_deadline_ms: u64,
    /// The longest deadline a request may name, in milliseconds.
    pub max_deadline_ms: u64,
    /// Seconds a finished invocation's id stays claimed: a request repeating it within this
    /// gets the recorded outcome and never runs again; later it is taken to be new. A restart
    /// folds this much of the invocations log again. At least the log's dedupe window.
    pub claim_window_secs: u64,
    /// Results each process keeps in memory for a repeated request or a status look-up of a
    /// completed invocation (the events hold only digests unless payloads are captured).
    pub result_cache_entries: usize,
    /// Seconds an MCP session may go unused before it is closed (the server told, in the
    /// sessions era); the next call opens a new one.
    pub mcp_session_idle_secs: u64,
    /// Requests one user may have waiting for their approval at once; one more that would
    /// wait is rejected (`too_many_pending_approvals`).
    pub max_pending_approvals: usize,
    /// Ask for approvals in the user's own MCP client: a `/mcp` call that needs approval,
    /// from a client that can show a form (2026-07-28, `elicitation`), is answered with
    /// an approval prompt the client puts to the user. Off: such calls wait for the
    /// user's decision in Switchboard (the API, `switchboard approve`), as for every
    /// other client.
    pub mcp_approval_prompts: bool,
}

impl Default for InvocationSettings {
    fn default() -> Self {
        let defaults = invoker::InvokerSettings::default();
        InvocationSettings {
            approval_timeout_secs: defaults.approval_timeout.as_secs(),
            result_limit_bytes: defaults.result_limit_bytes,
            capture_payloads: defaults.capture_payloads,
            default_deadline_ms: u64::try_from(defaults.default_deadline.as_millis())
                .unwrap_or(u64::MAX),
            max_deadline_ms: u64::try_from(defaults.max_deadline.as_millis()).unwrap_or(u64::MAX),
            claim_window_secs: domain::CLAIM_WINDOW.as_secs(),
            result_cache_entries: defaults.result_cache_entries,
            mcp_session_idle_secs: defaults.session_idle.as_secs(),
            max_pending_approvals: defaults.max_pending_approvals,
            mcp_approval_prompts: gateway::GatewaySettings::default().mcp_approval_prompts,
        }
    }
}

impl InvocationSettings {
    pub fn invoker_settings(&self) -> invoker::InvokerSettings {
        invoker::InvokerSettings {
            approval_timeout: Duration::from_secs(self.approval_timeout_secs.max(1)),
            result_limit_bytes: self.result_limit_bytes,
            capture_payloads: self.capture_payloads,
            default_deadline: Duration::from_millis(self.default_deadline_ms.max(1)),
            max_deadline: Duration::from_millis(self.max_deadline_ms.max(1)),
            result_cache_entries: self.result_cache_entries,
            session_idle: Duration::from_secs(self.mcp_session_idle_secs.max(1)),
            max_pending_approvals: self.max_pending_approvals,
            ..invoker::InvokerSettings::default()
        }
    }

    /// The read models' settings; refuses a claim window shorter than the log's dedupe
    /// window, which upholds a claim for that long anyway (a shorter setting would promise
    /// what does not happen).
    pub fn read_model_settings(&self) -> anyhow::Result<service_kit::ReadModelSettings> {
        let floor = eventlog::DEDUPE_WINDOW.as_secs();
        if self.claim_window_secs < floor {
            anyhow::bail!(
                "invocations.claim_window_secs is {}; it must be at least {floor} (the event \
                 log's dedupe window)",
                self.claim_window_secs
            );
        }
        Ok(service_kit::ReadModelSettings {
            claim_window: Duration::from_secs(self.claim_window_secs),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundSettings {
    /// Allow requests to loopback addresses, and plain http:// to loopback hosts. For
    /// development and tests only: logged loudly when on.
    pub allow_loopback: bool,
    /// Extra trust anchors (PEM) for outbound TLS, besides the system's.
    pub extra_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthSettings {
    /// The URL Switchboard presents as its client id where client ID metadata documents are
    /// supported; by default `<public_url>/oauth/client-metadata.json`, which it serves.
    pub client_metadata_url: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("switchboard-data"),
            listen: "127.0.0.1:8080".to_owned(),
            public_url: None,
            tls: TlsSettings::default(),
            http: HttpSettings::default(),
            auth: AuthSettings::default(),
            roles: BTreeMap::new(),
            nats: NatsSettings::default(),
            log: LogSettings::default(),
            console: ConsoleSettings::default(),
            events: EventSettings::default(),
            outbound: OutboundSettings::default(),
            oauth: OAuthSettings::default(),
            invocations: InvocationSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// Days invocation events are kept, on both stores (0: forever). The configuration log
    /// keeps everything.
    pub invocation_retention_days: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            invocation_retention_days: 400,
        }
    }
}

impl EventSettings {
    pub fn invocation_retention(&self) -> Option<Duration> {
        (self.invocation_retention_days > 0)
            .then(|| Duration::from_secs(self.invocation_retention_days.saturating_mul(86_400)))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// PEM certificate chain (leaf first). With `key_file`, the API is served over HTTPS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the certificate.
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Seconds in-flight requests get to finish at shutdown.
    pub shutdown_grace_secs: u64,
    /// Events buffered per live-update client; one that takes nothing for 30 s with its
    /// buffer full is disconnected.
    pub stream_buffer: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            body_limit: 1024 * 1024,
            shutdown_grace_secs: 10,
            stream_buffer: 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// HS256 shared secret. Prefer `jwt_secret_file`.
    pub jwt_secret: Option<String>,
    /// File holding the HS256 shared secret.
    pub jwt_secret_file: Option<PathBuf>,
    /// JWKS file with the public keys (RS256, ES256, EdDSA) tokens are signed with.
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Claim holding the caller's roles (a list of names).
    pub roles_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            jwt_secret: None,
            jwt_secret_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            roles_claim: "roles".to_owned(),
            leeway_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSettings {
    pub permissions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// NATS server URL(s), comma-separated. Unset: the embedded default (no NATS).
    pub url: Option<String>,
    pub prefix: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// File holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and NKey seed).
    pub creds_file: Option<PathBuf>,
    /// CA certificate(s) to verify the NATS server with (PEM); implies TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS (PEM).
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        NatsSettings {
            url: None,
            prefix: "sb".to_owned(),
            user: None,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            nkey_seed_file: None,
            creds_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Text on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// The console's base URL, where the OAuth callback sends the user afterwards.
    pub url: Option<String>,
}

/// Environment variable → setting. Only these variables are read (others starting with
/// `SWITCHBOARD_`, such as the CLI's `SWITCHBOARD_TOKEN`, are not settings).
pub const ENV_VARS: &[(&str, &str)] = &[
    ("SWITCHBOARD_DATA_DIR", "data_dir"),
    ("SWITCHBOARD_LISTEN", "listen"),
    ("SWITCHBOARD_PUBLIC_URL", "public_url"),
    ("SWITCHBOARD_TLS_CERT_FILE", "tls.cert_file"),
    ("SWITCHBOARD_TLS_KEY_FILE", "tls.key_file"),
    ("SWITCHBOARD_BODY_LIMIT", "http.body_limit"),
    (
        "SWITCHBOARD_SHUTDOWN_GRACE_SECS",
        "http.shutdown_grace_secs",
    ),
    ("SWITCHBOARD_STREAM_BUFFER", "http.stream_buffer"),
    (
        "SWITCHBOARD_APPROVAL_TIMEOUT_SECS",
        "invocations.approval_timeout_secs",
    ),
    (
        "SWITCHBOARD_CAPTURE_PAYLOADS",
        "invocations.capture_payloads",
    ),
    (
        "SWITCHBOARD_CLAIM_WINDOW_SECS",
        "invocations.claim_window_secs",
    ),
    (
        "SWITCHBOARD_RESULT_CACHE_ENTRIES",
        "invocations.result_cache_entries",
    ),
    (
        "SWITCHBOARD_MCP_SESSION_IDLE_SECS",
        "invocations.mcp_session_idle_secs",
    ),
    (
        "SWITCHBOARD_MAX_PENDING_APPROVALS",
        "invocations.max_pending_approvals",
    ),
    (
        "SWITCHBOARD_MCP_APPROVAL_PROMPTS",
        "invocations.mcp_approval_prompts",
    ),
    ("SWITCHBOARD_JWT_SECRET", "auth.jwt_secret"),
    ("SWITCHBOARD_JWT_SECRET_FILE", "auth.jwt_secret_file"),
    ("SWITCHBOARD_JWKS_FILE", "auth.jwks_file"),
    ("SWITCHBOARD_JWT_ISSUER", "auth.issuer"),
    ("SWITCHBOARD_JWT_AUDIENCE", "auth.audience"),
    ("SWITCHBOARD_ROLES_CLAIM", "auth.roles_claim"),
    ("SWITCHBOARD_JWT_LEEWAY_SECS", "auth.leeway_secs"),
    ("SWITCHBOARD_NATS_URL", "nats.url"),
    ("SWITCHBOARD_NATS_PREFIX", "nats.prefix"),
    ("SWITCHBOARD_NATS_USER", "nats.user"),
    ("SWITCHBOARD_NATS_PASSWORD", "nats.password"),
    ("SWITCHBOARD_NATS_PASSWORD_FILE", "nats.password_file"),
    ("SWITCHBOARD_NATS_TOKEN", "nats.token"),
    ("SWITCHBOARD_NATS_TOKEN_FILE", "nats.token_file"),
    ("SWITCHBOARD_NATS_NKEY_SEED_FILE", "nats.nkey_seed_file"),
    ("SWITCHBOARD_NATS_CREDS_FILE", "nats.creds_file"),
    ("SWITCHBOARD_NATS_CA_FILE", "nats.ca_file"),
    ("SWITCHBOARD_NATS_CLIENT_CERT_FILE", "nats.client_cert_file"),
    ("SWITCHBOARD_NATS_CLIENT_KEY_FILE", "nats.client_key_file"),
    ("SWITCHBOARD_LOG_FORMAT", "log.format"),
    ("SWITCHBOARD_CONSOLE_URL", "console.url"),
    (
        "SWITCHBOARD_INVOCATION_RETENTION_DAYS",
        "events.invocation_retention_days",
    ),
    ("SWITCHBOARD_ALLOW_LOOPBACK", "outbound.allow_loopback"),
    ("SWITCHBOARD_EXTRA_CA_FILE", "outbound.extra_ca_file"),
    (
        "SWITCHBOARD_CLIENT_METADATA_URL",
        "oauth.client_metadata_url",
    ),
];

/// The settings whose environment variable holds a number or a boolean.
const NUMERIC_KEYS: &[&str] = &[
    "outbound.allow_loopback",
    "http.body_limit",
    "http.shutdown_grace_secs",
    "http.stream_buffer",
    "auth.leeway_secs",
    "events.invocation_retention_days",
    "invocations.approval_timeout_secs",
    "invocations.capture_payloads",
    "invocations.claim_window_secs",
    "invocations.result_cache_entries",
    "invocations.mcp_session_idle_secs",
    "invocations.max_pending_approvals",
    "invocations.mcp_approval_prompts",
];

/// The settings that hold secrets: never printed, never logged.
const SECRET_KEYS: &[&str] = &["auth.jwt_secret", "nats.password", "nats.token"];

impl Settings {
    /// Defaults, then the file, then the environment, then the flags.
    pub fn load(args: &GlobalArgs) -> anyhow::Result<Settings> {
        Self::figment(args, std::env::vars())
            .extract()
            .map_err(|error| anyhow::anyhow!(describe_figment_error(error)))
    }

    /// The merge, with the environment passed in (tests).
    pub fn figment(args: &GlobalArgs, env: impl IntoIterator<Item = (String, String)>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = &args.config {
            figment = figment.merge(Toml::file_exact(file));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        for (var, key) in ENV_VARS {
            if let Some((_, value)) = env.iter().find(|(name, _)| name == var) {
                // Numbers and booleans are parsed; everything else stays text, so that a
                // secret or a name that looks like a number is not turned into one.
                let value: figment::value::Value = if NUMERIC_KEYS.contains(key) {
                    value.parse().unwrap_or_else(|_| value.as_str().into())
                } else {
                    value.as_str().into()
                };
                figment = figment.merge(Serialized::global(key, value));
            }
        }
        if let Some(data_dir) = &args.data_dir {
            figment = figment.merge(Serialized::global("data_dir", data_dir));
        }
        if let Some(url) = &args.nats {
            figment = figment.merge(Serialized::global("nats.url", url));
        }
        if let Some(prefix) = &args.nats_prefix {
            figment = figment.merge(Serialized::global("nats.prefix", prefix));
        }
        figment
    }

    /// The effective configuration as TOML, secrets replaced by `<redacted>`.
    pub fn redacted_toml(&self) -> anyhow::Result<String> {
        let mut value = toml::Value::try_from(self).context("rendering the configuration")?;
        for key in SECRET_KEYS {
            let mut table = &mut value;
            let mut parts = key.split('.').peekable();
            while let Some(part) = parts.next() {
                let Some(inner) = table.as_table_mut() else {
                    break;
                };
                if parts.peek().is_none() {
                    if inner.contains_key(part) {
                        inner.insert(part.to_owned(), toml::Value::String("<redacted>".into()));
                    }
                    break;
                }
                match inner.get_mut(part) {
                    Some(next) => table = next,
                    None => break,
                }
            }
        }
        if let (Some(url), Some(nats)) = (
            self.nats.url.as_deref(),
            value.get_mut("nats").and_then(toml::Value::as_table_mut),
        ) {
            nats.insert("url".into(), toml::Value::String(redact_url(url)));
        }
        toml::to_string_pretty(&value).context("rendering the configuration")
    }

    pub fn store(&self) -> StoreOptions {
        StoreOptions {
            data_dir: self.data_dir.clone(),
            nats: self.nats.clone(),
            invocation_retention: self.events.invocation_retention(),
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.http.shutdown_grace_secs)
    }
}

/// Figment's errors name the key and where it came from; say what to do about unknown keys.
fn describe_figment_error(error: figment::Error) -> String {
    let mut lines = Vec::new();
    for error in error {
        let mut line = error.to_string();
        if let figment::error::Kind::UnknownField(field, _) = &error.kind {
            let path = error.path.join(".");
            line = format!(
                "unknown setting `{}` ({line}); see docs/configuration.md for every setting",
                if path.is_empty() { field.clone() } else { path }
            );
        }
        lines.push(line);
    }
    format!("the configuration is not valid: {}", lines.join("; "))
}

/// A URL with any user name, password or token taken out, for logs and messages.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match one.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://<redacted>@{host}"),
                None => one.to_owned(),
            },
            None => match one.rsplit_once('@') {
                Some((_, host)) => format!("<redacted>@{host}"),
                None => one.to_owned(),
            },
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads a secret from a file: the whole file, trailing newline removed.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the {what} from {}", path.display()))?;
    let text = text.trim_end_matches(['\n', '\r']).to_owned();
    anyhow::ensure!(
        !text.is_empty(),
        "the {what} file {} is empty",
        path.display()
    );
    Ok(text)
}

/// Where Switchboard keeps its state, and how to open it.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub data_dir: PathBuf,
    pub nats: NatsSettings,
    /// How long invocation events are kept (`None`: forever).
    pub invocation_retention: Option<Duration>,
}

/// The opened stores.
#[derive(Debug)]
pub struct Stores {
    pub log: Arc<dyn EventLog>,
    pub checkpoints: Arc<dyn CheckpointStore>,
    /// The JSONL log, to close it at shutdown (JetStream needs no closing).
    pub jsonl: Option<Arc<JsonlLog>>,
}

impl StoreOptions {
    pub fn events_dir(&self) -> PathBuf {
        self.data_dir.join("events")
    }

    pub fn vault_dir(&self) -> PathBuf {
        self.data_dir.join("vault")
    }

    pub fn key_file(&self) -> PathBuf {
        self.data_dir.join("vault.keys")
    }

    pub fn checkpoints_dir(&self) -> PathBuf {
        self.data_dir.join("checkpoints")
    }

    pub fn nats_prefix(&self) -> &str {
        &self.nats.prefix
    }

    /// The NATS URL without credentials, for messages.
    pub fn nats_display(&self) -> Option<String> {
        self.nats.url.as_deref().map(redact_url)
    }

    /// Connects to NATS with the configured credentials and TLS. Credentials written into the
    /// URL are moved into the connect options, so that neither Switchboard's messages nor the
    /// NATS client's own log lines ever show them.
    pub async fn connect_nats(&self) -> anyhow::Result<Option<async_nats::Client>> {
        let Some(url) = &self.nats.url else {
            return Ok(None);
        };
        let shown = redact_url(url);
        let (servers, from_url) = split_credentials(url)
            .with_context(|| format!("the NATS URL {shown} could not be read"))?;
        let settings = &self.nats;
        // Reconnect attempts stay close together, so appends resume promptly after a restart.
        let mut options =
            eventlog::jetstream::reconnect_promptly(async_nats::ConnectOptions::new());
        if let Some((user, password)) = from_url {
            options = match password {
                Some(password) => options.user_and_password(user, password),
                None => options.token(user),
            };
        }
        if let Some(user) = &settings.user {
            let password = match (&settings.password, &settings.password_file) {
                (Some(password), _) => password.clone(),
                (None, Some(file)) => read_secret_file(file, "NATS password")?,
                (None, None) => {
                    anyhow::bail!("nats.user is set without nats.password or nats.password_file")
                }
            };
            options = options.user_and_password(user.clone(), password);
        }
        match (&settings.token, &settings.token_file) {
            (Some(token), _) => options = options.token(token.clone()),
            (None, Some(file)) => options = options.token(read_secret_file(file, "NATS token")?),
            (None, None) => {}
        }
        if let Some(file) = &settings.nkey_seed_file {
            options = options.nkey(read_secret_file(file, "NATS NKey seed")?);
        }
        if let Some(file) = &settings.creds_file {
            options = options.credentials_file(file).await.with_context(|| {
                format!("cannot read the NATS credentials file {}", file.display())
            })?;
        }
        if let Some(ca) = &settings.ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&settings.client_cert_file, &settings.client_key_file) {
            (Some(cert), Some(key)) => {
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true)
            }
            (None, None) => {}
            _ => anyhow::bail!("nats.client_cert_file and nats.client_key_file go together"),
        }
        let client = options
            .connect(servers.as_str())
            .await
            .with_context(|| format!("cannot connect to NATS at {shown}"))?;
        Ok(Some(client))
    }

    fn jetstream_config(&self) -> JetStreamConfig {
        let defaults = JetStreamConfig::default();
        JetStreamConfig {
            prefix: self.nats.prefix.clone(),
            // JetStream's max_age 0 keeps messages forever.
            invocation_retention: self.invocation_retention.unwrap_or(Duration::ZERO),
            ..defaults
        }
    }

    /// Opens the event log for reading (an auditor beside a running Switchboard): on
    /// JetStream when NATS is configured, else the JSONL files under the data directory. Takes
    /// no lock and creates nothing.
    pub async fn open_event_log_for_reading(
        &self,
        nats: Option<&async_nats::Client>,
    ) -> anyhow::Result<Arc<dyn EventLog>> {
        if let Some(client) = nats {
            let log =
                JetStreamLog::connect_existing(client.clone(), self.jetstream_config()).await?;
            return Ok(Arc::new(log));
        }
        let dir = self.events_dir();
        anyhow::ensure!(
            dir.is_dir(),
            "no event log in {} (set --data-dir, or --nats for JetStream)",
            dir.display()
        );
        let log = JsonlLog::open_read_only(&dir)
            .await
            .with_context(|| format!("cannot read the event log in {}", dir.display()))?;
        Ok(Arc::new(log))
    }

    /// Opens the event log and the checkpoint store for a running Switchboard.
    pub async fn open_stores(&self, nats: Option<&async_nats::Client>) -> anyhow::Result<Stores> {
        if let Some(client) = nats {
            let log = JetStreamLog::connect(client.clone(), self.jetstream_config()).await?;
            let checkpoints = log
                .checkpoint_store()
                .await
                .context("cannot open the checkpoint bucket")?;
            return Ok(Stores {
                log: Arc::new(log),
                checkpoints: Arc::new(checkpoints),
                jsonl: None,
            });
        }
        let dir = self.events_dir();
        let log = Arc::new(
            JsonlLog::open(
                &dir,
                JsonlOptions {
                    invocation_retention: self.invocation_retention,
                    ..JsonlOptions::default()
                },
            )
            .await
            .with_context(|| format!("cannot open the event log in {}", dir.display()))?,
        );
        let checkpoints_dir = self.checkpoints_dir();
        let checkpoints = FileCheckpointStore::open(&checkpoints_dir).with_context(|| {
            format!(
                "cannot open the checkpoints in {}",
                checkpoints_dir.display()
            )
        })?;
        Ok(Stores {
            log: log.clone(),
            checkpoints: Arc::new(checkpoints),
            jsonl: Some(log),
        })
    }
}

/// Takes `user:password@` or `token@` out of each server URL.
#[allow(clippy::type_complexity)]
fn split_credentials(urls: &str) -> anyhow::Result<(String, Option<(String, Option<String>)>)> {
    let mut credentials = None;
    let mut servers = Vec::new();
    for one in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (scheme, rest) = one.split_once("://").unwrap_or(("nats", one));
        match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let found = match userinfo.split_once(':') {
                    Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
                    None => (userinfo.to_owned(), None),
                };
                if credentials.as_ref().is_some_and(|c| *c != found) {
                    anyhow::bail!("the server URLs carry different credentials");
                }
                credentials = Some(found);
                servers.push(format!("{scheme}://{host}"));
            }
            None => servers.push(format!("{scheme}://{rest}")),
        }
    }
    anyhow::ensure!(!servers.is_empty(), "no server URL given");
    Ok((servers.join(","), credentials))
}

pub fn init_tracing(verbose: u8, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // rmcp's debug lines include the OAuth authorization code; keep it at info unless the
    // operator names rmcp explicitly in RUST_LOG.
    let names_rmcp = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("rmcp"));
    if !names_rmcp && let Ok(directive) = "rmcp=info".parse() {
        filter = filter.add_directive(directive);
    }
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Auto => !terminal,
        LogFormat::Text => false,
        LogFormat::Json => true,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // When stderr goes away (a closed pipe, a restarted log collector) the subscriber would
        // report the failed write with `eprintln!`, which panics on the same closed stderr and
        // takes the whole process down. Losing log lines is better than losing the service.
        .log_internal_errors(false);
    if json {
        builder.json().with_current_span(true).init();
    } else {
        // Colours only for a person at a terminal, not in files, pipes or service logs.
        builder.with_ansi(terminal).init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The settings these environment variables give, with no flags and no file.
    fn from_env(pairs: &[(&str, &str)]) -> Settings {
        Settings::figment(&GlobalArgs::default(), env(pairs))
            .extract()
            .expect("valid")
    }

    #[test]
    fn flags_win_over_environment_over_file_over_defaults() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("switchboard.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\npublic_url = \"https://file.example\"\n[nats]\nprefix = \"fromfile\"\n",
        )
        .expect("write");
        let args = GlobalArgs {
            config: Some(file),
            nats_prefix: Some("fromflag".into()),
            ..GlobalArgs::default()
        };
        let settings: Settings = Settings::figment(
            &args,
            env(&[
                ("SWITCHBOARD_PUBLIC_URL", "https://env.example"),
                ("SWITCHBOARD_BODY_LIMIT", "2048"),
            ]),
        )
        .extract()
        .expect("valid");
        assert_eq!(settings.listen, "127.0.0.1:9000", "from the file");
        assert_eq!(
            settings.public_url.as_deref(),
            Some("https://env.example"),
            "env over file"
        );
        assert_eq!(settings.nats.prefix, "fromflag", "flag over file");
        assert_eq!(settings.http.body_limit, 2048, "env, parsed as a number");
        assert_eq!(settings.auth.roles_claim, "roles", "default");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("switchboard.toml");
        std::fs::write(&file, "[auth]\nroles_clam = \"groups\"\n").expect("write");
        let args = GlobalArgs {
            config: Some(file),
            ..GlobalArgs::default()
        };
        let error = Settings::figment(&args, env(&[]))
            .extract::<Settings>()
            .map_err(describe_figment_error)
            .expect_err("refused");
        assert!(error.contains("roles_clam"), "{error}");
    }

    #[test]
    fn the_result_cache_is_a_setting() {
        let settings = from_env(&[("SWITCHBOARD_RESULT_CACHE_ENTRIES", "50000")]);
        assert_eq!(
            settings.invocations.invoker_settings().result_cache_entries,
            50_000
        );
        assert_eq!(
            Settings::default()
                .invocations
                .invoker_settings()
                .result_cache_entries,
            invoker::InvokerSettings::default().result_cache_entries
        );
    }

    #[test]
    fn the_claim_window_is_a_setting_no_shorter_than_the_logs_dedupe_window() {
        let settings = |value: &str| from_env(&[("SWITCHBOARD_CLAIM_WINDOW_SECS", value)]);
        let day = settings("86400").invocations.read_model_settings();
        assert_eq!(
            day.expect("accepted").claim_window,
            Duration::from_secs(86_400)
        );
        let defaults = Settings::default().invocations.read_model_settings();
        assert_eq!(
            defaults.expect("accepted").claim_window,
            domain::CLAIM_WINDOW
        );
        let error = settings("60")
            .invocations
            .read_model_settings()
            .expect_err("refused")
            .to_string();
        assert!(
            error.contains("invocations.claim_window_secs is 60") && error.contains("120"),
            "{error}"
        );
    }

    #[test]
    fn a_secret_that_looks_like_a_number_stays_text() {
        let settings = from_env(&[("SWITCHBOARD_JWT_SECRET", "12345")]);
        assert_eq!(settings.auth.jwt_secret.as_deref(), Some("12345"));
    }

    #[test]
    fn the_printed_configuration_redacts_secrets() {
        let settings = from_env(&[
            ("SWITCHBOARD_JWT_SECRET", "s3cret-jwt"),
            (
                "SWITCHBOARD_NATS_URL",
                "nats://alice:hunter2@127.0.0.1:4222",
            ),
            ("SWITCHBOARD_NATS_TOKEN", "tok-123"),
        ]);
        let printed = settings.redacted_toml().expect("renders");
        for secret in ["s3cret-jwt", "hunter2", "alice", "tok-123"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(printed.contains("127.0.0.1:4222"), "{printed}");
    }

    #[test]
    fn credentials_in_the_nats_url_move_to_the_options() {
        let (servers, credentials) =
            split_credentials("nats://alice:pw@a:4222, tls://alice:pw@b:4222").expect("parses");
        assert_eq!(servers, "nats://a:4222,tls://b:4222");
        assert_eq!(credentials, Some(("alice".into(), Some("pw".into()))));
        let (_, token) = split_credentials("nats://tok@a:4222").expect("parses");
        assert_eq!(token, Some(("tok".into(), None)));
        assert_eq!(
            redact_url("nats://alice:pw@a:4222"),
            "nats://<redacted>@a:4222"
        );
    }

    #[test]
    fn every_setting_and_variable_is_documented() {
        let doc = include_str!("../../../docs/configuration.md");
        for (var, key) in ENV_VARS {
            assert!(
                doc.contains(var),
                "{var} missing from docs/configuration.md"
            );
            assert!(
                doc.contains(&format!("`{key}`")),
                "{key} missing from docs/configuration.md"
            );
        }
        let value = toml::Value::try_from(Settings::default()).expect("renders");
        let mut keys = Vec::new();
        collect_keys(&value, "", &mut keys);
        for key in keys {
            assert!(
                doc.contains(&format!("`{key}`")),
                "{key} missing from docs/configuration.md"
            );
        }
    }

    fn collect_keys(value: &toml::Value, prefix: &str, keys: &mut Vec<String>) {
        if let Some(table) = value.as_table() {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                if value.is_table() && path != "roles" {
                    collect_keys(value, &path, keys);
                } else {
                    keys.push(path);
                }
            }
        }
    }
}
