//! `switchboard vault rotate` and `switchboard vault check`, and opening the vault for `up`.
use std::sync::Arc;

use anyhow::Context;
use vault::{FileStore, KeyFile, KeyId, KeyRing, KvStore, SecretStore, StoreError, Vault};

use crate::{cli::VaultCommand, configuration::StoreOptions};

/// Opens the vault: the file store under the data directory, or the JetStream KV bucket with
/// `--nats`. Master keys come from `SWITCHBOARD_VAULT_KEYS` or the key file; `up` generates
/// the key file on first start (and says so loudly) — on JetStream only while the shared
/// bucket is empty.
pub async fn open_vault(
    store: &StoreOptions,
    nats: Option<&async_nats::Client>,
    generate_key_file: bool,
) -> anyhow::Result<Vault> {
    let secrets: Arc<dyn SecretStore> = match nats {
        Some(client) => {
            let bucket = format!("{}_vault", store.nats_prefix());
            Arc::new(
                KvStore::open(async_nats::jetstream::new(client.clone()), &bucket)
                    .await
                    .with_context(|| format!("cannot open the vault bucket {bucket}"))?,
            )
        }
        None => {
            let dir = store.vault_dir();
            Arc::new(
                FileStore::open(&dir)
                    .with_context(|| format!("cannot open the vault in {}", dir.display()))?,
            )
        }
    };
    let key_file = store.key_file();
    let generate = generate_key_file && std::env::var_os(vault::KEYS_ENV_VAR).is_none();
    if generate && nats.is_some() && !key_file.exists() {
        // A shared bucket: a key made up here could open nothing the other replicas sealed,
        // and they could open nothing sealed with it. Only the first host of an empty vault
        // makes the key; every other one is given it.
        let entries = secrets
            .names()
            .await
            .context("cannot list the vault bucket's entries")?;
        if !entries.is_empty() {
            anyhow::bail!(
                "the vault bucket holds {} entries and this host has no vault key: give it the \
                 key file of the host that made them ({}) or set {}",
                entries.len(),
                key_file.display(),
                vault::KEYS_ENV_VAR
            );
        }
    }
    let keys = if generate {
        KeyRing::load_or_generate(&key_file)
    } else {
        KeyRing::load_from_env_or_file(&key_file)
    }
    .with_context(|| {
        format!(
            "cannot load the vault's master keys ({})",
            key_file.display()
        )
    })?;
    Ok(Vault::new(secrets, keys))
}

pub async fn run(store: &StoreOptions, command: VaultCommand) -> anyhow::Result<()> {
    let nats = store.connect_nats().await?;
    let vault = match open_vault(store, nats.as_ref(), false).await {
        Ok(vault) => vault,
        Err(error) if is_locked(&error) => {
            if let VaultCommand::Rotate {
                new_key: true,
                retire: None,
            } = command
            {
                return add_key_for_running_instance(store);
            }
            return Err(error.context(
                "the vault belongs to a running `switchboard up`: rotate it live with \
                 `switchboard vault rotate --new-key` followed by SIGHUP to that process, and \
                 retire or check keys once it is stopped",
            ));
        }
        Err(error) => return Err(error),
    };
    match command {
        VaultCommand::Check => check(&vault).await,
        VaultCommand::Rotate { new_key, retire } => rotate(store, &vault, new_key, retire).await,
    }
}

/// Whether opening failed because a running `switchboard up` owns the vault directory.
fn is_locked(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::Locked { .. })
        )
    })
}

/// The embedded vault is open in a running `switchboard up`: add the new current key to the
/// key file, and let that process re-encrypt on SIGHUP, so services never stop.
fn add_key_for_running_instance(store: &StoreOptions) -> anyhow::Result<()> {
    add_current_key(&mut load_key_file(store)?)?;
    eprintln!(
        "the vault is open in a running `switchboard up`: send it SIGHUP (kill -HUP <pid>, the \
         pid is in its start-up log) to re-encrypt every entry while it keeps serving"
    );
    Ok(())
}

/// Adds a new master key to the key file, makes it current and saves the file.
fn add_current_key(key_file: &mut KeyFile) -> anyhow::Result<()> {
    let id = key_file.add_new_key(true)?;
    key_file.save()?;
    eprintln!(
        "added master key {id} to {} and made it current",
        key_file.path().display()
    );
    Ok(())
}

fn load_key_file(store: &StoreOptions) -> anyhow::Result<KeyFile> {
    anyhow::ensure!(
        std::env::var_os(vault::KEYS_ENV_VAR).is_none(),
        "--new-key and --retire edit the key file, but the keys come from {}; \
         change that variable instead",
        vault::KEYS_ENV_VAR
    );
    Ok(KeyFile::load(store.key_file())?)
}

async fn check(vault: &Vault) -> anyhow::Result<()> {
    let report = vault.check().await?;
    eprintln!(
        "vault check: {} entries examined, {} opened, {} expired",
        report.examined, report.opened, report.expired
    );
    for (key, count) in &report.by_key {
        eprintln!("  key {key}: {count} entries");
    }
    for problem in &report.problems {
        eprintln!("  cannot open {}: {}", problem.name, problem.error);
    }
    for location in &report.unreadable {
        eprintln!("  damaged {location}: cannot tell which entry it holds");
    }
    anyhow::ensure!(
        report.is_healthy(),
        "{} vault entries cannot be opened",
        report.problems.len() + report.unreadable.len()
    );
    Ok(())
}

async fn rotate(
    store: &StoreOptions,
    vault: &Vault,
    new_key: bool,
    retire: Option<String>,
) -> anyhow::Result<()> {
    let mut key_file = (new_key || retire.is_some())
        .then(|| load_key_file(store))
        .transpose()?;
    if new_key && let Some(key_file) = key_file.as_mut() {
        add_current_key(key_file)?;
        vault.set_keyring(key_file.keyring()?);
    }
    let report = vault.rotate().await?;
    eprintln!(
        "vault rotate: {} entries examined, {} re-encrypted under {}, {} already current, {} expired removed",
        report.examined,
        report.reencrypted,
        report.current_key,
        report.already_current,
        report.expired_removed
    );
    for problem in &report.problems {
        eprintln!("  not re-encrypted {}: {}", problem.name, problem.error);
    }
    anyhow::ensure!(
        report.is_complete(),
        "{} entries were not re-encrypted; run `switchboard vault check`",
        report.problems.len()
    );
    if let (Some(id), Some(key_file)) = (retire, key_file.as_mut()) {
        let id = KeyId::parse(id)?;
        vault.retire_key(key_file, &id).await?;
        eprintln!("retired master key {id}");
    }
    Ok(())
}
