//! Where Switchboard keeps its state, and how to open it.
use std::{path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::Args;
use eventlog::{
    EventLog,
    jetstream::{JetStreamConfig, JetStreamLog},
    jsonl::{JsonlLog, JsonlOptions},
};

#[derive(Debug, Clone, Args)]
pub struct StoreOptions {
    /// Data directory of the embedded default (event logs, vault, key file, checkpoints).
    #[arg(long, global = true, env = "SWITCHBOARD_DATA_DIR", default_value_os_t = crate::cli::default_data_dir())]
    pub data_dir: PathBuf,
    /// NATS server URL: use JetStream for events and a JetStream KV bucket for secrets instead
    /// of the data directory.
    #[arg(long, global = true, env = "SWITCHBOARD_NATS_URL")]
    pub nats: Option<String>,
    /// Prefix of Switchboard's subjects, streams and buckets on NATS.
    #[arg(
        long,
        global = true,
        env = "SWITCHBOARD_NATS_PREFIX",
        default_value = "sb"
    )]
    pub nats_prefix: String,
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

    pub async fn connect_nats(&self) -> anyhow::Result<Option<async_nats::Client>> {
        let Some(url) = &self.nats else {
            return Ok(None);
        };
        let client = async_nats::connect(url.as_str())
            .await
            .with_context(|| format!("cannot connect to NATS at {url}"))?;
        Ok(Some(client))
    }

    fn jetstream_config(&self) -> JetStreamConfig {
        JetStreamConfig {
            prefix: self.nats_prefix.clone(),
            ..JetStreamConfig::default()
        }
    }

    /// Opens the event log for writing (the running service).
    pub async fn open_event_log(&self) -> anyhow::Result<Arc<dyn EventLog>> {
        if let Some(client) = self.connect_nats().await? {
            let log = JetStreamLog::connect(client, self.jetstream_config()).await?;
            return Ok(Arc::new(log));
        }
        let dir = self.events_dir();
        let log = JsonlLog::open(&dir, JsonlOptions::default())
            .await
            .with_context(|| format!("cannot open the event log in {}", dir.display()))?;
        Ok(Arc::new(log))
    }

    /// Opens the event log to read it, alongside a running Switchboard.
    pub async fn open_event_log_for_reading(&self) -> anyhow::Result<Arc<dyn EventLog>> {
        if let Some(client) = self.connect_nats().await? {
            let log = JetStreamLog::connect_existing(client, self.jetstream_config()).await?;
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
}

pub fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files, pipes or service logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
