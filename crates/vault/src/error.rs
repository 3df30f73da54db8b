//! The vault's errors. None of them ever carries plaintext or key material: only entry
//! names, key ids, file paths and causes from the store.

use std::path::PathBuf;

use crate::name::SecretName;

/// Boxed cause from a store backend (IO or NATS).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong in the vault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VaultError {
    /// A compare-and-swap (or create-only write) lost: another writer changed the entry first.
    #[error(
        "vault entry `{name}` was changed by another writer first; re-read it and decide again"
    )]
    Conflict { name: SecretName },

    /// The authentication tag did not verify.
    #[error(
        "vault entry `{name}` could not be opened: it was modified, or sealed under another name or key; \
         delete it (the user reconnects) or restore it from a backup"
    )]
    Tampered { name: SecretName },

    /// The entry names a master key id that is not loaded.
    #[error(
        "vault entry `{name}` names master key `{key_id}`, which is not loaded; \
         add that key to the vault key file or SWITCHBOARD_VAULT_KEYS, or, if no key of that \
         id ever existed, the entry is damaged: delete it (the user reconnects) or restore it"
    )]
    UnknownKey { name: SecretName, key_id: String },

    /// The stored bytes are not a sealed value of a format this version understands.
    #[error(
        "vault entry `{name}` is malformed ({reason}); delete it, or upgrade if a newer Switchboard wrote it"
    )]
    Malformed { name: SecretName, reason: String },

    /// An entry name failed validation.
    #[error("invalid vault entry name: {reason}")]
    InvalidName { reason: String },

    /// Master key configuration is missing or wrong.
    #[error("vault key configuration: {reason}")]
    KeyConfig { reason: String },

    /// The random number generator or the cipher failed (should never happen).
    #[error("vault cryptography failed: {reason}")]
    Crypto { reason: &'static str },

    /// The store (file system or NATS) failed.
    #[error("the vault's store failed: {0}")]
    Store(#[source] StoreError),
}

impl VaultError {
    /// A stable machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            VaultError::Conflict { .. } => "vault_conflict",
            VaultError::Tampered { .. } => "vault_entry_tampered",
            VaultError::UnknownKey { .. } => "vault_unknown_key",
            VaultError::Malformed { .. } => "vault_entry_malformed",
            VaultError::InvalidName { .. } => "vault_invalid_name",
            VaultError::KeyConfig { .. } => "vault_key_config",
            VaultError::Crypto { .. } => "vault_crypto_failure",
            VaultError::Store(_) => "vault_store_unavailable",
        }
    }

    pub(crate) fn key_config(reason: impl Into<String>) -> VaultError {
        VaultError::KeyConfig {
            reason: reason.into(),
        }
    }

    /// Maps a store error for an operation on `name`; a store conflict becomes
    /// [`VaultError::Conflict`].
    pub(crate) fn from_store(name: &SecretName, error: StoreError) -> VaultError {
        match error {
            StoreError::Conflict => VaultError::Conflict { name: name.clone() },
            other => VaultError::Store(other),
        }
    }
}

/// What a [`SecretStore`](crate::SecretStore) adapter reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The expected revision did not match (or, for a create, the entry exists).
    #[error("the entry's revision is not the expected one")]
    Conflict,

    /// The file store directory is locked by another process.
    #[error(
        "the vault directory {path} is in use by another Switchboard process; stop it, or give this one its own data directory"
    )]
    Locked { path: PathBuf },

    /// A stored file could not be understood.
    #[error("vault file {path} is unreadable: {reason}; move it away and restart")]
    Corrupt { path: PathBuf, reason: String },

    /// The backend (IO, NATS) failed; `operation` says what the store was doing.
    #[error("{operation} failed: {source}")]
    Backend {
        operation: &'static str,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    pub(crate) fn backend(operation: &'static str, source: impl Into<BoxError>) -> StoreError {
        StoreError::Backend {
            operation,
            source: source.into(),
        }
    }
}
