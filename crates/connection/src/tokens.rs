//! A connection's access token: handed out while it is fresh, refreshed shortly before it
//! expires and after the server refuses it — by one refresher at a time across every process
//! sharing the vault.
//!
//! The refresh lease is a create-only vault entry with a time-to-live (a crashed holder frees
//! it by expiring). Whoever holds it re-reads the tokens first: if they changed since the
//! caller saw its stale token, another refresher already did the work and no request goes to
//! the token endpoint. The others wait until the tokens change or the lease goes, then use the
//! new tokens.
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use domain::{
    ServerId, TokenFingerprint, UserId,
    connection::{ConnectionCommand, ConnectionId},
};
use mcp::McpCallError;
use oauth2::TokenResponse as _;
use rmcp::transport::auth::{AuthError, StoredCredentials};
use service_kit::CommandContext;
use vault::{Secret, VaultError};

use crate::stores::{
    VaultCredentialStore, credentials_name, load_credentials, refresh_lease_name,
    refresh_rejected_name,
};
use crate::{ConnectionError, ConnectionService};

/// The service name on the events a refresh records (no user asked for it).
const SERVICE: &str = "connection";

/// How long a refresher that got `invalid_grant` waits for another refresher's tokens before
/// it calls the grant gone.
const RACE_GRACE: Duration = Duration::from_secs(2);

/// How long a rejected refresh token is remembered: longer than any wait on the lease, and
/// short enough that the marks of abandoned connections go by themselves.
const REJECTION_REMEMBERED: Duration = Duration::from_secs(600);

fn access_token_of(credentials: &StoredCredentials) -> Option<&str> {
    credentials
        .token_response
        .as_ref()
        .map(|t| t.access_token().secret().as_str())
}

fn refresh_token_of(credentials: &StoredCredentials) -> Option<&str> {
    credentials
        .token_response
        .as_ref()
        .and_then(|t| t.refresh_token())
        .map(|t| t.secret().as_str())
}

/// When the access token expires, if the server said.
fn expires_at(credentials: &StoredCredentials) -> Option<SystemTime> {
    let lifetime = credentials.token_response.as_ref()?.expires_in()?;
    let received = UNIX_EPOCH.checked_add(Duration::from_secs(credentials.token_received_at?))?;
    Some(expiry_after(received, lifetime))
}

/// Lifetimes longer than this are taken as this: any authorization server may say what it
/// likes in `expires_in`, and a time that far off is "does not expire" for every purpose.
const LONGEST_TOKEN_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// When a token received at `received` with `lifetime` expires, never overflowing.
pub(crate) fn expiry_after(received: SystemTime, lifetime: Duration) -> SystemTime {
    let lifetime = lifetime.min(LONGEST_TOKEN_LIFETIME);
    received
        .checked_add(lifetime)
        .unwrap_or_else(|| UNIX_EPOCH + LONGEST_TOKEN_LIFETIME)
}

impl ConnectionService {
    fn service_context(&self) -> CommandContext {
        CommandContext::service(SERVICE)
    }

    /// A usable access token for the user's connection: the stored one, or a refreshed one
    /// when it expires within `refresh_ahead`.
    pub async fn access_token(
        &self,
        server_id: ServerId,
        user: &UserId,
    ) -> Result<String, ConnectionError> {
        let name = credentials_name(server_id, user);
        let (credentials, _) = load_credentials(&self.inner.vault, &name)
            .await?
            .ok_or(ConnectionError::NotConnected)?;
        let token = access_token_of(&credentials)
            .ok_or(ConnectionError::NotConnected)?
            .to_owned();
        let expiring = expires_at(&credentials)
            .is_some_and(|at| at <= SystemTime::now() + self.inner.settings.refresh_ahead);
        if expiring && refresh_token_of(&credentials).is_some() {
            return self.refresh(server_id, user, &token).await;
        }
        Ok(token)
    }

    /// When the connection's access token expires, if the server said.
    pub async fn token_expires_at(
        &self,
        server_id: ServerId,
        user: &UserId,
    ) -> Result<Option<SystemTime>, ConnectionError> {
        let name = credentials_name(server_id, user);
        Ok(load_credentials(&self.inner.vault, &name)
            .await?
            .and_then(|(credentials, _)| expires_at(&credentials)))
    }

    /// Replaces `stale` (a token the server refused, or one about to expire) with a fresh
    /// one; at most one refresh per connection at a time across processes.
    pub async fn refresh(
        &self,
        server_id: ServerId,
        user: &UserId,
        stale: &str,
    ) -> Result<String, ConnectionError> {
        let name = credentials_name(server_id, user);
        let lease = refresh_lease_name(server_id, user);
        let lease_ttl = self.inner.settings.refresh_lease;
        let give_up = tokio::time::Instant::now() + lease_ttl * 2;
        loop {
            let (credentials, revision) = load_credentials(&self.inner.vault, &name)
                .await?
                .ok_or(ConnectionError::NotConnected)?;
            if let Some(current) = access_token_of(&credentials)
                && current != stale
            {
                return Ok(current.to_owned());
            }
            if self
                .inner
                .vault
                .get(&refresh_rejected_name(server_id, user, revision))
                .await?
                .is_some()
            {
                return Err(ConnectionError::ReauthorizationRequired {
                    reason: "the authorization server rejected the refresh token".to_owned(),
                });
            }
            match self
                .inner
                .vault
                .put_with_ttl(&lease, &Secret::from_slice(b"refreshing"), lease_ttl)
                .await
            {
                Ok(held) => {
                    let refreshing = self.refresh_holding_lease(server_id, user, stale);
                    return self
                        .under_lease(&lease, held, b"refreshing", refreshing)
                        .await;
                }
                Err(VaultError::Conflict { .. }) => {
                    self.inner.lease_waits.send_modify(|n| *n += 1);
                    if !self
                        .wait_for_change(&name, revision, Some(&lease), give_up)
                        .await?
                    {
                        return Err(ConnectionError::RefreshUnavailable {
                            reason: "another refresh of this connection did not finish".to_owned(),
                        });
                    }
                }
                Err(other) => return Err(other.into()),
            }
        }
    }

    /// Runs `work` holding the connection's refresh lease, waiting for a refresh in flight to
    /// finish first: no refresh rotates the tokens while `work` reads and removes them (a
    /// disconnect must revoke the tokens that are stored, not ones a refresh replaced under
    /// it).
    pub(crate) async fn holding_refresh_lease<T>(
        &self,
        server_id: ServerId,
        user: &UserId,
        work: impl std::future::Future<Output = Result<T, ConnectionError>>,
    ) -> Result<T, ConnectionError> {
        let lease = refresh_lease_name(server_id, user);
        let lease_ttl = self.inner.settings.refresh_lease;
        let give_up = tokio::time::Instant::now() + lease_ttl * 2;
        let held = loop {
            match self
                .inner
                .vault
                .put_with_ttl(&lease, &Secret::from_slice(b"held"), lease_ttl)
                .await
            {
                Ok(held) => break held,
                Err(VaultError::Conflict { .. }) => {
                    self.inner.lease_waits.send_modify(|n| *n += 1);
                    // Until the holder releases it, or its lease runs out (a crashed holder).
                    let Some((_, holding)) = self.inner.vault.get(&lease).await? else {
                        continue;
                    };
                    if !self.wait_for_change(&lease, holding, None, give_up).await? {
                        return Err(ConnectionError::RefreshUnavailable {
                            reason: "a token refresh of this connection did not finish; try again"
                                .to_owned(),
                        });
                    }
                }
                Err(other) => return Err(other.into()),
            }
        };
        self.under_lease(&lease, held, b"held", work).await
    }

    /// Runs `work` holding `lease` (taken at revision `held`), then releases it. The lease
    /// is renewed every third of its time-to-live while the work lasts: a refresh or a
    /// disconnect slowed by a provider (a revocation endpoint taking its full timeout,
    /// twice) keeps it, so no other refresh rotates the tokens under it; the time-to-live
    /// still frees the lease of a holder that crashed. The release deletes only this
    /// holder's own lease: one that lapsed anyway (a stalled process) and was taken since is
    /// a successor's, left alone.
    async fn under_lease<T>(
        &self,
        lease: &vault::SecretName,
        mut held: vault::Revision,
        marker: &[u8],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let ttl = self.inner.settings.refresh_lease;
        let mut work = std::pin::pin!(work);
        let mut lost = false;
        let output = loop {
            tokio::select! {
                output = &mut work => break output,
                () = tokio::time::sleep(ttl / 3), if !lost => {
                    match self
                        .inner
                        .vault
                        .renew(lease, held, &Secret::from_slice(marker), ttl)
                        .await
                    {
                        Ok(renewed) => {
                            held = renewed;
                            self.inner.lease_renewals.send_modify(|n| *n += 1);
                        }
                        Err(VaultError::Conflict { .. }) => {
                            // Expired before it could be renewed (a stalled process) and
                            // maybe taken: the work goes on, the lease is not ours to keep.
                            tracing::warn!(lease = lease.as_str(), "a lease expired while held");
                            lost = true;
                        }
                        Err(error) => {
                            tracing::warn!(%error, lease = lease.as_str(), "could not renew a lease; trying again");
                        }
                    }
                }
            }
        };
        match self.inner.vault.delete_if_revision(lease, held).await {
            Ok(()) => {}
            Err(VaultError::Conflict { .. }) => {
                tracing::debug!(
                    lease = lease.as_str(),
                    "a lease lapsed while held; a successor's lease is left alone"
                );
            }
            Err(error) => {
                tracing::warn!(%error, lease = lease.as_str(), "could not release a lease (it expires by itself)");
            }
        }
        output
    }

    /// Waits until the tokens' revision is no longer `seen` (or the entry is gone) — or, with
    /// `lease`, until that lease is gone (released, or expired with a crashed holder) — at
    /// most until `until`. Returns whether it saw such a change.
    async fn wait_for_change(
        &self,
        name: &vault::SecretName,
        seen: vault::Revision,
        lease: Option<&vault::SecretName>,
        until: tokio::time::Instant,
    ) -> Result<bool, ConnectionError> {
        let mut pause = Duration::from_millis(5);
        loop {
            let changed = match self.inner.vault.get(name).await? {
                Some((_, revision)) => revision != seen,
                None => true,
            };
            let released = match lease {
                Some(lease) => self.inner.vault.get(lease).await?.is_none(),
                None => false,
            };
            if changed || released {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    async fn refresh_holding_lease(
        &self,
        server_id: ServerId,
        user: &UserId,
        stale: &str,
    ) -> Result<String, ConnectionError> {
        let name = credentials_name(server_id, user);
        let (before, before_revision) = load_credentials(&self.inner.vault, &name)
            .await?
            .ok_or(ConnectionError::NotConnected)?;
        if let Some(current) = access_token_of(&before)
            && current != stale
        {
            return Ok(current.to_owned());
        }
        let server = self.server_oauth(server_id, false).await?;
        let store = VaultCredentialStore::new(self.inner.vault.clone(), name.clone(), false);
        let manager = self.manager(&server, user, Some(store)).await?;
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        match manager.refresh_token().await {
            Ok(token) => {
                let (after, _) = load_credentials(&self.inner.vault, &name)
                    .await?
                    .ok_or(ConnectionError::NotConnected)?;
                let rotated = refresh_token_of(&after) != refresh_token_of(&before);
                self.run(
                    &self.service_context(),
                    &id,
                    vec![ConnectionCommand::RecordTokensRefreshed {
                        granted_scopes: after.granted_scopes.clone(),
                        access_token_expires_at: expires_at(&after),
                        token_fingerprint: TokenFingerprint::of(token.access_token().secret()),
                        refresh_token_rotated: rotated,
                    }],
                )
                .await?;
                Ok(token.access_token().secret().clone())
            }
            Err(AuthError::TokenRefreshRejected(reason)) => {
                // A provider with two live refresh tokens (Notion) answers `invalid_grant` to
                // the loser of a race (two refreshers when a lease expired under a slow one).
                // The winner may not have stored its tokens yet: give it a moment. If the
                // tokens change, the winner's work stands and the connection is fine.
                let grace = tokio::time::Instant::now() + RACE_GRACE;
                if self
                    .wait_for_change(&name, before_revision, None, grace)
                    .await?
                    && let Some((now, _)) = load_credentials(&self.inner.vault, &name).await?
                    && let Some(token) = access_token_of(&now)
                {
                    return Ok(token.to_owned());
                }
                let reason = reason.chars().take(300).collect::<String>();
                let rejected = refresh_rejected_name(server_id, user, before_revision);
                match self
                    .inner
                    .vault
                    .put_with_ttl(
                        &rejected,
                        &Secret::from_slice(b"rejected"),
                        REJECTION_REMEMBERED,
                    )
                    .await
                {
                    Ok(_) | Err(VaultError::Conflict { .. }) => {}
                    Err(error) => tracing::warn!(
                        server = %server_id,
                        "could not remember the rejected refresh token (waiters will try it once more): {error}"
                    ),
                }
                self.record_auth_failure(
                    &self.service_context(),
                    &id,
                    None,
                    "invalid_grant",
                    "the authorization server rejected the refresh token",
                )
                .await?;
                Err(ConnectionError::ReauthorizationRequired { reason })
            }
            Err(AuthError::AuthorizationRequired) => {
                self.record_auth_failure(
                    &self.service_context(),
                    &id,
                    None,
                    "invalid_token",
                    "the access token was refused and there is no refresh token",
                )
                .await?;
                Err(ConnectionError::ReauthorizationRequired {
                    reason: "no refresh token".to_owned(),
                })
            }
            Err(AuthError::CredentialStoreError(reason)) => {
                Err(ConnectionError::CredentialStore { reason })
            }
            Err(other) => Err(ConnectionError::RefreshUnavailable {
                reason: other.to_string().chars().take(300).collect(),
            }),
        }
    }

    /// Records that the server wants scopes the grant lacks (a 403 `insufficient_scope`): an
    /// auth error whose reason names them, so that the next connect asks for them together
    /// with the scopes the user has.
    pub async fn record_scope_required(
        &self,
        server_id: ServerId,
        user: &UserId,
        required_scope: &str,
    ) -> Result<(), ConnectionError> {
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        self.record_auth_failure(
            &self.service_context(),
            &id,
            None,
            "insufficient_scope",
            &required_scope.chars().take(300).collect::<String>(),
        )
        .await?;
        Ok(())
    }

    /// Runs `call` with the connection's access token; after a 401, refreshes once and runs
    /// it again. A second 401 means the authorization is gone: recorded as an auth error.
    pub async fn with_token<T, F, Fut>(
        &self,
        server_id: ServerId,
        user: &UserId,
        call: F,
    ) -> Result<T, ConnectionError>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = Result<T, McpCallError>>,
    {
        let token = self.access_token(server_id, user).await?;
        match call(token.clone()).await {
            Err(McpCallError::Unauthorized { .. }) => {}
            other => return other.map_err(ConnectionError::from),
        }
        let fresh = self.refresh(server_id, user, &token).await?;
        match call(fresh).await {
            Err(McpCallError::Unauthorized { .. }) => {
                let id = ConnectionId {
                    server_id,
                    user_id: user.clone(),
                };
                self.record_auth_failure(
                    &self.service_context(),
                    &id,
                    None,
                    "invalid_token",
                    "the server refused a freshly refreshed token",
                )
                .await?;
                Err(ConnectionError::ReauthorizationRequired {
                    reason: "the server refused a freshly refreshed token".to_owned(),
                })
            }
            other => other.map_err(ConnectionError::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{LONGEST_TOKEN_LIFETIME, expiry_after};

    #[test]
    fn an_absurd_expires_in_is_a_long_lifetime_not_a_panic() {
        let received = UNIX_EPOCH + Duration::from_secs(1_764_936_000);
        assert_eq!(
            expiry_after(received, Duration::from_secs(3600)),
            received + Duration::from_secs(3600)
        );
        // What `expires_in` values of 2^64 - 1 and 8.3e12 seconds become.
        for lifetime in [Duration::MAX, Duration::from_secs(8_300_000_000_000)] {
            assert_eq!(
                expiry_after(received, lifetime),
                received + LONGEST_TOKEN_LIFETIME
            );
        }
    }
}
