//! Results handed over when a process stops.
//!
//! Without payload capture a completed invocation's result lives only in the memory of the
//! process that made the call (the events hold its digest): an orchestrator that asks again
//! after that process stopped — its reply lost in a restart or a deploy — would learn that
//! the call completed, but not what it answered, and could not safely call again. So a
//! process that stops gracefully seals the results it holds in the vault
//! (`handed_over_results/<32 hex of the invocation's key>`), for as long as an invocation id
//! is remembered (the claim window), and a look-up that finds the result nowhere else reads
//! it there. A process killed outright hands nothing over; keeping every result durable as
//! it is made would cost every call another durable write. On JetStream a vault entry is a
//! message on the log's server: a result larger than one is handed over cut to fit.
use std::{sync::Arc, time::Duration};

use domain::{InvocationId, UserId, projections::invocation_key};
use futures_util::StreamExt as _;
use vault::{Secret, SecretName, VaultError};

use crate::{Invoker, ResultEnvelope};

/// Vault writes in flight at once while handing over.
const HANDOVER_WRITES: usize = 16;

fn entry_name(key: u128) -> SecretName {
    crate::service::vault_entry("handed_over_results", key)
}

impl Invoker {
    /// Seals the results this process holds in the vault, newest first, for the next start
    /// or another process to answer look-ups with; gives up on what is left after `within`.
    /// A result the vault does not take is skipped and logged. Returns how many were kept.
    /// Call it once requests have stopped.
    pub async fn hand_over_results(&self, within: Duration) -> usize {
        let held = crate::service::locked(&self.inner.results).newest_first();
        if held.is_empty() {
            return 0;
        }
        let held_count = held.len();
        let ttl = self
            .inner
            .read_models
            .open_invocations
            .read(domain::OpenInvocations::claim_window);
        let kept = std::sync::atomic::AtomicUsize::new(0);
        let writes = futures_util::stream::iter(held)
            .map(|(key, result)| self.hand_over(key, result, ttl))
            .buffer_unordered(HANDOVER_WRITES)
            .for_each(|handed| {
                if handed {
                    kept.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                std::future::ready(())
            });
        let finished = tokio::time::timeout(within, writes).await.is_ok();
        let kept = kept.into_inner();
        if finished {
            tracing::info!(kept, held = held_count, "results handed over in the vault");
        } else {
            tracing::warn!(
                kept,
                held = held_count,
                "handing results over took too long; the rest are lost with this process"
            );
        }
        kept
    }

    async fn hand_over(&self, key: u128, result: Arc<ResultEnvelope>, ttl: Duration) -> bool {
        // A result over a vault entry is handed over cut to fit, not lost.
        let (text, _) = self.storable_result(&result);
        if text.is_empty() {
            return false;
        }
        let name = entry_name(key);
        match self
            .vault()
            .put_with_ttl(&name, &Secret::from_slice(text.as_bytes()), ttl)
            .await
        {
            // Handed over already (by a process that had fetched it): results never change.
            Ok(_) | Err(VaultError::Conflict { .. }) => true,
            Err(error) => {
                tracing::warn!(%error, bytes = text.len(), "a result was not handed over");
                false
            }
        }
    }

    /// The result of `user`'s invocation `id` a stopped process handed over, if any (left
    /// there for other look-ups until it expires).
    pub(crate) async fn handed_over_result(
        &self,
        user: &UserId,
        id: &InvocationId,
    ) -> Option<Arc<ResultEnvelope>> {
        let name = entry_name(invocation_key(user.as_str(), id.as_str()));
        match self.vault().get(&name).await {
            Ok(Some((secret, _))) => serde_json::from_slice(secret.expose()).ok().map(Arc::new),
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(%error, "could not read a handed-over result");
                None
            }
        }
    }
}
