//! `switchboard up`: opens the event log and the vault and keeps them open until Ctrl-C.
//!
//! The services and the HTTP API (catalog, connection, policy, invoker, gateway) are wired in
//! here as their issues land; today `up` prepares and checks the stores the services run on.
use anyhow::Context;

use crate::configuration::StoreOptions;

pub async fn run(store: &StoreOptions) -> anyhow::Result<()> {
    let log = store.open_event_log().await?;
    let vault = crate::vault_cmd::open_vault(store, true).await?;
    let mut positions = Vec::new();
    for kind in eventlog::LogKind::ALL {
        positions.push(format!("{kind}: {}", log.last_sequence(kind).await?));
    }
    let entries = vault.names().await.context("listing vault entries")?.len();
    match &store.nats {
        Some(url) => {
            tracing::info!(%url, prefix = %store.nats_prefix, "switchboard is up on JetStream")
        }
        None => {
            tracing::info!(data_dir = %store.data_dir.display(), "switchboard is up on the embedded default")
        }
    }
    tracing::info!(events = %positions.join(", "), vault_entries = entries, "stores open; Ctrl-C or SIGTERM stops");
    shutdown_signal().await?;
    tracing::info!("shutting down");
    Ok(())
}

/// Ctrl-C or SIGTERM (what service managers and container runtimes send).
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listening for Ctrl-C"),
        _ = terminate.recv() => Ok(()),
    }
}
