//! `switchboard up`: opens the event log and the vault and keeps them open until Ctrl-C or
//! SIGTERM. SIGHUP reloads the vault's master keys and re-encrypts every entry under the
//! current one, while the process keeps serving (how `vault rotate` reaches a running embedded
//! instance, whose vault directory only this process may open).
//!
//! The services and the HTTP API (catalog, connection, policy, invoker, gateway) are wired in
//! here as their issues land; today `up` prepares and checks the stores the services run on.
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use vault::{KeyRing, Vault};

use crate::configuration::{Access, StoreOptions};

pub async fn run(store: &StoreOptions) -> anyhow::Result<()> {
    // One connection for both stores on JetStream.
    let nats = store.connect_nats().await?;
    let log = store
        .open_event_log(nats.as_ref(), Access::ReadWrite)
        .await?;
    let vault = crate::vault_cmd::open_vault(store, nats.as_ref(), true).await?;
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

    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    tracing::info!(
        pid = std::process::id(),
        events = %positions.join(", "),
        vault_entries = entries,
        "stores open; Ctrl-C or SIGTERM stops, SIGHUP reloads the vault keys and re-encrypts"
    );
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                result.context("listening for Ctrl-C")?;
                break;
            }
            _ = terminate.recv() => break,
            _ = hangup.recv() => reload_keys_and_rotate(store, &vault).await,
        }
    }
    tracing::info!("shutting down");
    Ok(())
}

/// Loads the master keys again and re-encrypts every entry not sealed under the current key.
/// A failure is logged and leaves the running vault on the keys it had.
async fn reload_keys_and_rotate(store: &StoreOptions, vault: &Vault) {
    let keys = match KeyRing::load_from_env_or_file(&store.key_file()) {
        Ok(keys) => keys,
        Err(error) => {
            tracing::error!(%error, "vault keys not reloaded; still using the previous keys");
            return;
        }
    };
    vault.set_keyring(keys);
    match vault.rotate().await {
        Ok(report) if report.is_complete() => tracing::info!(
            current_key = %report.current_key,
            reencrypted = report.reencrypted,
            already_current = report.already_current,
            "vault keys reloaded; every entry re-encrypted under the current key"
        ),
        Ok(report) => {
            for problem in &report.problems {
                tracing::error!(entry = %problem.name, error = %problem.error, "vault entry not re-encrypted");
            }
        }
        Err(error) => tracing::error!(%error, "vault re-encryption failed"),
    }
}
