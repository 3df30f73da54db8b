//! The arguments of invocations waiting for their user's approval, kept in the vault.
//!
//! Without payload capture the invocation events hold only the arguments' digest and size —
//! the audit log must not hold payloads nobody chose to capture — yet the user decides on
//! the arguments, and whichever process records the approval makes the call with them. So
//! the process that wins an invocation's claim seals them in the vault
//! (`invocation_arguments/<32 hex of the invocation's key>`) before it records that the invocation
//! waits, and the decision takes them out again: the approved call reads them once, a denial
//! or an expiry deletes them. The entry's time-to-live outlasts the wait, so an entry a
//! stopped process left behind is removed with the vault's other expired entries.
//!
//! What comes back is checked against the recorded digest: the call is made with the
//! arguments the user saw and the log describes, or not at all.
use domain::{InvocationId, UserId, projections::invocation_key};
use proto::v1 as pb;
use vault::{Secret, SecretName, VaultError};

use crate::{Invoker, result::sha256_hex};

/// Why an approved call has no arguments to go with.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ArgumentsUnavailable {
    #[error("the arguments are no longer in the vault (expired or removed)")]
    Gone,
    #[error("the arguments in the vault do not match the recorded digest")]
    Mismatch,
    #[error(transparent)]
    Vault(#[from] VaultError),
}

fn entry_name(user: &UserId, id: &InvocationId) -> SecretName {
    crate::service::vault_entry(
        "invocation_arguments",
        invocation_key(user.as_str(), id.as_str()),
    )
}

/// Whether the arguments of the invocation `request` records are in the vault rather than in
/// the event (no capture; earlier builds recorded them in the event while it waited).
pub(crate) fn kept_in_vault(request: &pb::InvocationRequested) -> bool {
    request.arguments_json.is_empty() && !request.started
}

impl Invoker {
    /// Seals an awaiting invocation's arguments in the vault for as long as the user may
    /// take to decide, and the longest a decided call may wait for its start after that.
    pub(crate) async fn keep_pending_arguments(
        &self,
        user: &UserId,
        id: &InvocationId,
        arguments_json: &str,
    ) -> Result<(), VaultError> {
        let settings = &self.inner.settings;
        let ttl = settings.approval_timeout + settings.stalled_after();
        let name = entry_name(user, id);
        let secret = Secret::from_slice(arguments_json.as_bytes());
        match self.vault().put_with_ttl(&name, &secret, ttl).await {
            Ok(_) => Ok(()),
            Err(VaultError::Conflict { .. }) => {
                // Left by an earlier invocation with this id, past the claim window (a short
                // one) and not yet expired: only the winner of this claim writes here, so
                // it is replaced.
                self.vault().delete(&name).await?;
                self.vault()
                    .put_with_ttl(&name, &secret, ttl)
                    .await
                    .map(|_| ())
            }
            Err(error) => Err(error),
        }
    }

    /// The arguments `request` (awaiting, approved) was made with, taken out of the vault
    /// when they are kept there: the approved call reads them once.
    pub(crate) async fn take_pending_arguments(
        &self,
        user: &UserId,
        id: &InvocationId,
        request: &pb::InvocationRequested,
    ) -> Result<String, ArgumentsUnavailable> {
        if !kept_in_vault(request) {
            return Ok(request.arguments_json.clone());
        }
        self.kept_arguments(user, id, &request.arguments_sha256, Read::Take)
            .await
    }

    /// The arguments of a pending approval, for its user to see (left in the vault); the
    /// open invocation holds them when they were recorded.
    pub(crate) async fn read_pending_arguments(
        &self,
        pending: &domain::OpenInvocation,
    ) -> Result<String, ArgumentsUnavailable> {
        if !pending.arguments_json.is_empty() {
            return Ok(pending.arguments_json.clone());
        }
        let (Ok(user), Ok(id)) = (
            UserId::parse(&pending.user_id),
            InvocationId::parse(&pending.invocation_id),
        ) else {
            return Err(ArgumentsUnavailable::Gone);
        };
        self.kept_arguments(&user, &id, &pending.arguments_sha256, Read::Leave)
            .await
    }

    /// The arguments the vault keeps for `user`'s invocation `id`, when they are the ones
    /// recorded by `arguments_sha256`.
    async fn kept_arguments(
        &self,
        user: &UserId,
        id: &InvocationId,
        arguments_sha256: &str,
        read: Read,
    ) -> Result<String, ArgumentsUnavailable> {
        let name = entry_name(user, id);
        let secret = match read {
            Read::Take => self.vault().take(&name).await?,
            Read::Leave => self.vault().get(&name).await?.map(|(secret, _)| secret),
        }
        .ok_or(ArgumentsUnavailable::Gone)?;
        let text = secret.expose_str().ok_or(ArgumentsUnavailable::Mismatch)?;
        if sha256_hex(text.as_bytes()) != arguments_sha256 {
            return Err(ArgumentsUnavailable::Mismatch);
        }
        Ok(text.to_owned())
    }

    /// Deletes the arguments of an invocation that will not be called (denied, expired,
    /// interrupted before it waited). A failure is only logged: the entry expires anyway.
    pub(crate) async fn forget_pending_arguments(
        &self,
        user: &UserId,
        id: &InvocationId,
        request: Option<&pb::InvocationRequested>,
    ) {
        if !request.is_some_and(kept_in_vault) {
            return;
        }
        let name = entry_name(user, id);
        if let Err(error) = self.vault().delete(&name).await {
            tracing::warn!(
                %error,
                entry = name.as_str(),
                "could not delete the arguments of a closed invocation; they expire with the entry"
            );
        }
    }

    pub(crate) fn vault(&self) -> &vault::Vault {
        self.inner.connections.vault()
    }
}

/// Whether reading kept arguments takes them out of the vault.
enum Read {
    Take,
    Leave,
}
