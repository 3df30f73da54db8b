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

    /// Opens the event log: on JetStream when `nats` is given, else the JSONL files under the
    /// data directory. A reader (an auditor beside a running Switchboard) takes no lock and
    /// creates nothing.
    pub async fn open_event_log(
        &self,
        nats: Option<&async_nats::Client>,
        access: Access,
    ) -> anyhow::Result<Arc<dyn EventLog>> {
        if let Some(client) = nats {
            let (client, config) = (client.clone(), self.jetstream_config());
            let log = match access {
                Access::ReadWrite => JetStreamLog::connect(client, config).await?,
                Access::ReadOnly => JetStreamLog::connect_existing(client, config).await?,
            };
            return Ok(Arc::new(log));
        }
        let dir = self.events_dir();
        let log = match access {
            Access::ReadWrite => JsonlLog::open(&dir, JsonlOptions::default())
                .await
                .with_context(|| format!("cannot open the event log in {}", dir.display()))?,
            Access::ReadOnly => {
                anyhow::ensure!(
                    dir.is_dir(),
                    "no event log in {} (set --data-dir, or --nats for JetStream)",
                    dir.display()
                );
                JsonlLog::open_read_only(&dir)
                    .await
                    .with_context(|| format!("cannot read the event log in {}", dir.display()))?
            }
        };
        Ok(Arc::new(log))
    }
}

/// Whether a command writes to the stores (a running service) or only reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    ReadOnly,
}

pub fn init_tracing(verbose: u8) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in files, pipes or service logs.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
