//! `rmcp`'s two storage seams over the vault: the user's tokens ([`VaultCredentialStore`])
//! and the pending authorization's `state` with its PKCE verifier ([`VaultStateStore`]).
//!
//! Vault names (never a secret in a name):
//! - `connection/<server id>/<user key>`: the tokens (`rmcp`'s `StoredCredentials`, JSON);
//! - `oauth_state/<state>`: the pending authorization, bound to the user and the server, with
//!   a 10-minute time-to-live, taken once;
//! - `oauth_state_answered/<state>`: what the answer that spent that `state` came to, for a
//!   repeated answer, as long-lived (see `answers.rs`);
//! - `oauth_state_answering/<state>`: an answer with that `state` is at work (two minutes):
//!   a repeat on another process waits for its outcome (see `answers.rs`);
//! - `connection_refresh/<server id>/<user key>`: the refresh lease (see `tokens.rs`);
//! - `connection_refresh_rejected/<server id>/<user key>/<revision>`: the tokens at that
//!   revision have a refresh token the authorization server rejected (10 minutes).
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use domain::{ServerId, UserId};
use rmcp::transport::auth::{
    AuthError, CredentialStore, StateStore, StoredAuthorizationState, StoredCredentials,
};
use serde::{Deserialize, Serialize};
use vault::{Revision, Secret, SecretName, Vault, VaultError};

/// Longest `state` accepted from a callback (Switchboard's are 22 characters).
const MAX_STATE_LEN: usize = 128;

pub(crate) fn credentials_name(server_id: ServerId, user: &UserId) -> SecretName {
    // Server ids are UUIDs and user keys `[A-Za-z0-9_-]`: always a valid name.
    SecretName::parse(format!("connection/{server_id}/{}", user.key()))
        .expect("a server id and a user key make a valid vault name")
}

pub(crate) fn refresh_lease_name(server_id: ServerId, user: &UserId) -> SecretName {
    SecretName::parse(format!("connection_refresh/{server_id}/{}", user.key()))
        .expect("a server id and a user key make a valid vault name")
}

/// Marks that the authorization server rejected the refresh token of the tokens' entry at
/// `revision`: callers that waited on the refresh lease, and later ones, fail at once instead
/// of sending the same dead refresh token again. New tokens are a new revision.
pub(crate) fn refresh_rejected_name(
    server_id: ServerId,
    user: &UserId,
    revision: Revision,
) -> SecretName {
    SecretName::parse(format!(
        "connection_refresh_rejected/{server_id}/{}/{}",
        user.key(),
        revision.get()
    ))
    .expect("a server id, a user key and a number make a valid vault name")
}

/// The vault name of a `state` from a callback, or `None` if it cannot be one of ours.
pub(crate) fn state_name(state: &str) -> Option<SecretName> {
    if state.is_empty()
        || state.len() > MAX_STATE_LEN
        || !state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    SecretName::parse(format!("oauth_state/{state}")).ok()
}

/// Where the outcome of the answer that spent `state` is noted (see `answers.rs`).
pub(crate) fn answered_name(state: &str) -> Option<SecretName> {
    state_name(state)?;
    SecretName::parse(format!("oauth_state_answered/{state}")).ok()
}

/// Where an answer with `state` marks that it is at work (see `answers.rs`).
pub(crate) fn answering_name(state: &str) -> Option<SecretName> {
    state_name(state)?;
    SecretName::parse(format!("oauth_state_answering/{state}")).ok()
}

/// What the vault keeps for a pending authorization.
#[derive(Serialize, Deserialize)]
pub(crate) struct PendingAuthorization {
    pub server_id: ServerId,
    pub user_id: String,
    pub state: StoredAuthorizationState,
}

/// Reads a pending authorization without consuming it (to learn whose it is).
pub(crate) async fn peek_pending(
    vault: &Vault,
    state: &str,
) -> Result<Option<PendingAuthorization>, VaultError> {
    let Some(name) = state_name(state) else {
        return Ok(None);
    };
    let Some((secret, _)) = vault.get(&name).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice(secret.expose()).ok())
}

fn store_error(error: impl std::fmt::Display) -> AuthError {
    AuthError::CredentialStoreError(error.to_string())
}

/// `rmcp`'s state store for one user's authorization at one server.
#[derive(Debug, Clone)]
pub(crate) struct VaultStateStore {
    pub vault: Vault,
    pub server_id: ServerId,
    pub user_id: UserId,
    pub ttl: Duration,
}

#[async_trait]
impl StateStore for VaultStateStore {
    async fn save(
        &self,
        csrf_token: &str,
        state: StoredAuthorizationState,
    ) -> Result<(), AuthError> {
        let name = state_name(csrf_token)
            .ok_or_else(|| AuthError::InternalError("unusable state".to_owned()))?;
        let pending = PendingAuthorization {
            server_id: self.server_id,
            user_id: self.user_id.as_str().to_owned(),
            state,
        };
        let bytes = serde_json::to_vec(&pending).map_err(store_error)?;
        self.vault
            .put_with_ttl(&name, &Secret::new(bytes), self.ttl)
            .await
            .map_err(store_error)?;
        Ok(())
    }

    async fn load(&self, csrf_token: &str) -> Result<Option<StoredAuthorizationState>, AuthError> {
        let pending = peek_pending(&self.vault, csrf_token)
            .await
            .map_err(store_error)?;
        Ok(pending
            .filter(|p| p.server_id == self.server_id && p.user_id == self.user_id.as_str())
            .map(|p| p.state))
    }

    /// Takes the entry: of two callbacks with the same `state`, only one gets past this.
    async fn delete(&self, csrf_token: &str) -> Result<(), AuthError> {
        let name = state_name(csrf_token)
            .ok_or_else(|| AuthError::InternalError("unusable state".to_owned()))?;
        match self.vault.take(&name).await.map_err(store_error)? {
            Some(_) => Ok(()),
            None => Err(AuthError::InternalError(STATE_ALREADY_USED.to_owned())),
        }
    }
}

/// The marker the state store's `delete` fails with when the state was used meanwhile.
pub(crate) const STATE_ALREADY_USED: &str = "authorization state already used";

/// The pauses before each new try of a token write the vault's store failed (a moment of
/// NATS away, a full disk being cleared): about 1.3 s in all, inside a request's time.
const SAVE_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
];

/// `rmcp`'s credential store for one connection: compare-and-swap on the revision it loaded,
/// so a write based on stale tokens never replaces newer ones.
#[derive(Debug, Clone)]
pub(crate) struct VaultCredentialStore {
    pub vault: Vault,
    pub name: SecretName,
    /// The revision `load` saw (`None`: the entry did not exist).
    pub loaded: Arc<Mutex<Option<Revision>>>,
    /// Replace whatever is there (a new authorization replaces old tokens).
    pub overwrite: bool,
    /// Tokens `save` was given and could not store: issued, and in no vault (see
    /// [`VaultCredentialStore::take_unsaved`]).
    pub unsaved: Arc<Mutex<Option<StoredCredentials>>>,
}

impl VaultCredentialStore {
    pub fn new(vault: Vault, name: SecretName, overwrite: bool) -> Self {
        VaultCredentialStore {
            vault,
            name,
            loaded: Arc::default(),
            overwrite,
            unsaved: Arc::default(),
        }
    }

    /// The tokens the last `save` could not store, if it failed: a new authorization's
    /// tokens then belong to nobody and are revoked rather than left live at the provider.
    pub fn take_unsaved(&self) -> Option<StoredCredentials> {
        self.unsaved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn set_loaded(&self, revision: Option<Revision>) {
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = revision;
    }

    fn loaded(&self) -> Option<Revision> {
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads a connection's tokens and the entry's revision.
pub(crate) async fn load_credentials(
    vault: &Vault,
    name: &SecretName,
) -> Result<Option<(StoredCredentials, Revision)>, VaultError> {
    let Some((secret, revision)) = vault.get(name).await? else {
        return Ok(None);
    };
    match serde_json::from_slice(secret.expose()) {
        Ok(credentials) => Ok(Some((credentials, revision))),
        // The error names the JSON position, never the text: that is a token.
        Err(error) => Err(VaultError::Malformed {
            name: name.clone(),
            reason: format!(
                "the stored tokens are not readable (line {}, column {})",
                error.line(),
                error.column()
            ),
        }),
    }
}

#[async_trait]
impl CredentialStore for VaultCredentialStore {
    async fn load(&self) -> Result<Option<StoredCredentials>, AuthError> {
        match load_credentials(&self.vault, &self.name)
            .await
            .map_err(store_error)?
        {
            Some((credentials, revision)) => {
                self.set_loaded(Some(revision));
                Ok(Some(credentials))
            }
            None => {
                self.set_loaded(None);
                Ok(None)
            }
        }
    }

    /// Stores the tokens, trying a failed write again; tokens it could not store are kept
    /// for [`VaultCredentialStore::take_unsaved`].
    async fn save(&self, credentials: StoredCredentials) -> Result<(), AuthError> {
        let saved = self.try_save(&credentials).await;
        if saved.is_err() {
            *self.unsaved.lock().unwrap_or_else(|p| p.into_inner()) = Some(credentials);
        }
        saved
    }

    async fn clear(&self) -> Result<(), AuthError> {
        self.vault.delete(&self.name).await.map_err(store_error)
    }
}

impl VaultCredentialStore {
    /// Tries a failed write again (see [`SAVE_RETRY_PAUSES`]): after a refresh, the provider
    /// may already have revoked the refresh token these tokens replace, so tokens given up
    /// here can cost the user a new authorization.
    async fn try_save(&self, credentials: &StoredCredentials) -> Result<(), AuthError> {
        let bytes = Secret::new(serde_json::to_vec(credentials).map_err(store_error)?);
        let mut pauses = SAVE_RETRY_PAUSES.iter();
        let mut failed_before = false;
        loop {
            let written = if self.overwrite {
                self.vault.put(&self.name, &bytes).await
            } else {
                self.vault
                    .compare_and_swap(&self.name, self.loaded(), &bytes)
                    .await
            };
            match written {
                Ok(revision) => {
                    self.set_loaded(Some(revision));
                    return Ok(());
                }
                // A write reported as failed may have been stored all the same (its answer
                // lost on the way back): then the entry holds exactly these tokens.
                Err(conflict @ VaultError::Conflict { .. }) if failed_before => {
                    return match self.vault.get(&self.name).await {
                        Ok(Some((stored, revision))) if stored.expose() == bytes.expose() => {
                            self.set_loaded(Some(revision));
                            Ok(())
                        }
                        _ => Err(store_error(conflict)),
                    };
                }
                Err(failure @ VaultError::Store(_)) => {
                    let Some(pause) = pauses.next() else {
                        return Err(store_error(failure));
                    };
                    tracing::warn!(entry = %self.name, "storing a connection's tokens failed; trying again in {pause:?}: {failure}");
                    failed_before = true;
                    tokio::time::sleep(*pause).await;
                }
                Err(other) => return Err(store_error(other)),
            }
        }
    }
}
