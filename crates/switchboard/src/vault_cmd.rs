//! `switchboard vault …` (wired once the vault crate lands).
use crate::{cli::VaultCommand, configuration::StoreOptions};

pub async fn open_vault(_store: &StoreOptions, _create_key_file: bool) -> anyhow::Result<vault::Vault> {
    anyhow::bail!("the vault is not wired yet")
}

pub async fn run(_store: &StoreOptions, _command: VaultCommand) -> anyhow::Result<()> {
    anyhow::bail!("the vault is not wired yet")
}
