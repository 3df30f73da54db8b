//! What a user does with a connection: connect, come back from the authorization server,
//! look at its status, disconnect.
use std::time::SystemTime;

use domain::{
    ApiConnectionStatus, ServerId, TokenFingerprint, UserId,
    connection::{ConnectionCommand, ConnectionId, ConnectionStatus, flow_of_state},
};
use mcp::TokensToRevoke;
use rmcp::transport::auth::{AuthError, StoredAuthorizationState, StoredCredentials};
use service_kit::{CommandContext, Written};

use vault::{Secret, VaultError};

use crate::answers::{ANSWERING_TTL, AnswerNote, FIRST_ANSWER_WAIT};
use crate::stores::{
    STATE_ALREADY_USED, VaultCredentialStore, answered_name, answering_name, credentials_name,
    load_credentials, peek_pending, state_name,
};
use crate::{ConnectionError, ConnectionService};

/// Longest error text from an authorization server that is kept (events, pages).
const MAX_PROVIDER_TEXT: usize = 300;

/// What `GET /oauth/callback` received.
#[derive(Debug, Clone, Default)]
pub struct CallbackParams {
    /// The last segment of the path it came to (`/oauth/callback/<key>`); `None` at the shared
    /// `/oauth/callback`. It must be the one the `state`'s server registered.
    pub callback_key: Option<String>,
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// How a callback ended, and for which server and user when the `state` said so.
#[derive(Debug)]
pub struct CallbackOutcome {
    pub server_id: Option<ServerId>,
    pub user_id: Option<UserId>,
    pub result: Result<(), ConnectionError>,
}

/// A connection as the API reports it.
#[derive(Debug, Clone)]
pub struct ConnectionReport {
    pub server_id: ServerId,
    pub status: ApiConnectionStatus,
    pub reason: String,
    pub since: Option<SystemTime>,
    pub granted_scopes: Vec<String>,
    pub access_token_expires_at: Option<SystemTime>,
    pub tool_count: Option<usize>,
}

/// What a disconnect did.
#[derive(Debug)]
pub struct Disconnected {
    /// Whether the provider confirmed the revocation.
    pub tokens_revoked: bool,
    pub written: Written,
}

fn provider_text(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_PROVIDER_TEXT)
        .collect()
}

/// The scopes a previous `insufficient_scope` said were missing (kept in the reason).
fn required_scopes(reason: &str) -> Vec<String> {
    reason
        .strip_prefix("insufficient_scope: ")
        .map(|scopes| scopes.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

impl ConnectionService {
    /// Begins a user's OAuth authorization at a server: returns the authorization URL (PKCE
    /// S256, a single-use `state` bound to the user and server, the `resource`); the
    /// connection is pending until the callback.
    pub async fn start_connection(
        &self,
        context: &CommandContext,
        user: &UserId,
        server_id: ServerId,
    ) -> Result<(String, Written), ConnectionError> {
        let server = self.server_oauth(server_id, false).await?;
        if !server.enabled {
            return Err(ConnectionError::ServerDisabled);
        }
        // The scopes the MCP specification says to ask for (the challenge's, else the
        // resource's), plus any a server asked for since (a scope step-up), plus what the
        // user had: a reconnect must not lose scopes.
        let mut scopes = server.scopes.clone();
        if let Some(view) = self
            .inner
            .read_models
            .connections
            .read(|d| d.get(server_id, user.as_str()).cloned())
        {
            scopes.extend(view.granted_scopes.iter().cloned());
            scopes.extend(required_scopes(&view.reason));
        }
        let mut seen = std::collections::HashSet::new();
        scopes.retain(|s| seen.insert(s.clone()));
        // Refuse before a `state` is created when the domain would.
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        let state = self.load(&id).await?;
        if matches!(
            state.status(),
            ConnectionStatus::Connected | ConnectionStatus::Unreachable
        ) {
            return Err(domain::DomainError::AlreadyConnected.into());
        }
        let manager = self.manager(&server, user, None).await?;
        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let url = manager
            .get_authorization_url(&scope_refs)
            .await
            .map_err(ConnectionError::from_oauth)?;
        // The flow is recorded by its `state`'s fingerprint, which `rmcp` put in the URL.
        let flow = url::Url::parse(&url)
            .ok()
            .and_then(|url| {
                url.query_pairs()
                    .find(|(name, _)| name == "state")
                    .map(|(_, state)| flow_of_state(&state))
            })
            .ok_or_else(|| ConnectionError::OAuthClient {
                reason: "the authorization URL carries no state".to_owned(),
            })?;
        let expires_at = self.inner.envelopes.clock().now() + self.inner.settings.state_ttl;
        let written = self
            .run(
                context,
                &id,
                vec![ConnectionCommand::StartConnection {
                    flow,
                    requested_scopes: scopes,
                    authorization_expires_at: expires_at,
                }],
            )
            .await?;
        Ok((url, written))
    }

    /// Whose pending authorization `state` is, and for which server, without using it: the
    /// page that asks the person in the browser to confirm names them. `None` for a state
    /// that is not (or no longer) pending.
    ///
    /// `callback_key`: the path's key, as in [`CallbackParams`]; an answer at another
    /// server's redirect URL is not pending here (finishing it refuses it).
    pub async fn pending_authorization(
        &self,
        state: &str,
        callback_key: Option<&str>,
    ) -> Result<Option<(ServerId, UserId)>, ConnectionError> {
        if state_name(state).is_none() {
            return Ok(None);
        }
        let Some(pending) = peek_pending(&self.inner.vault, state).await? else {
            return Ok(None);
        };
        let Ok(user) = UserId::parse(&pending.user_id) else {
            return Ok(None);
        };
        self.check_callback_key(pending.server_id, callback_key)
            .await?;
        Ok(Some((pending.server_id, user)))
    }

    /// Refuses an answer that came back to a redirect URL other than the one the server's
    /// client was registered with: the authorization server that sent it is not the one the
    /// flow started with (RFC 9700 §4.4.2). The `state` is left alone, so a mix-up cannot
    /// spend a legitimate flow's state.
    async fn check_callback_key(
        &self,
        server_id: ServerId,
        callback_key: Option<&str>,
    ) -> Result<(), ConnectionError> {
        let server = self.server_oauth(server_id, false).await?;
        let registered = Some(server.registration.callback_key.as_str()).filter(|k| !k.is_empty());
        if registered == callback_key {
            return Ok(());
        }
        tracing::warn!(
            server = %server_id,
            registered = registered.unwrap_or("(shared)"),
            received = %callback_key.unwrap_or("(shared)").chars().take(80).collect::<String>(),
            "an authorization answer came back to another server's redirect URL; not used"
        );
        Err(ConnectionError::CallbackMismatch)
    }

    /// Handles the authorization server's redirect back. `caller`: the signed-in user, when
    /// the request carried a token (a browser following the redirect usually does not); a
    /// `state` started by someone else is refused then, and stays usable for its owner.
    ///
    /// The answer runs to its end even if the request that brought it goes away (a browser
    /// abandons the first request when Connect is pressed twice): stopped halfway, it would
    /// leave the `state` spent and the tokens stored with nothing recorded.
    pub async fn complete_authorization(
        &self,
        params: CallbackParams,
        caller: Option<&UserId>,
        request_id: &str,
    ) -> CallbackOutcome {
        let service = self.clone();
        let caller = caller.cloned();
        let request_id = request_id.to_owned();
        tokio::spawn(async move {
            service
                .answer_authorization(params, caller.as_ref(), &request_id)
                .await
        })
        .await
        .unwrap_or_else(|ended| CallbackOutcome {
            server_id: None,
            user_id: None,
            result: Err(ConnectionError::Internal {
                reason: format!(
                    "the authorization answer's task ended without an outcome: {ended}"
                ),
            }),
        })
    }

    async fn answer_authorization(
        &self,
        params: CallbackParams,
        caller: Option<&UserId>,
        request_id: &str,
    ) -> CallbackOutcome {
        let state = params.state.clone().unwrap_or_default();
        let Some(state) = Some(state.as_str()).filter(|s| state_name(s).is_some()) else {
            return CallbackOutcome {
                server_id: None,
                user_id: None,
                result: Err(ConnectionError::StateInvalid),
            };
        };
        let _turn = self
            .inner
            .answer_locks
            .turn(state, &self.inner.answer_waits)
            .await;
        let pending = match peek_pending(&self.inner.vault, state).await {
            Ok(Some(pending)) => pending,
            Ok(None) => return self.answered_before(state, caller).await,
            Err(error) => {
                return CallbackOutcome {
                    server_id: None,
                    user_id: None,
                    result: Err(error.into()),
                };
            }
        };
        let Ok(user) = UserId::parse(&pending.user_id) else {
            return CallbackOutcome {
                server_id: None,
                user_id: None,
                result: Err(ConnectionError::StateInvalid),
            };
        };
        let server_id = pending.server_id;
        // Marked before the `state` may be spent, for a repeat on another process; only
        // this answer's own mark is cleared at its end (another's stands while it works).
        let answering = answering_name(state);
        let mut marked = None;
        if let Some(answering) = &answering {
            match self
                .inner
                .vault
                .put_with_ttl(answering, &Secret::from_slice(b"answering"), ANSWERING_TTL)
                .await
            {
                Ok(revision) => marked = Some(revision),
                Err(VaultError::Conflict { .. }) => {}
                Err(error) => tracing::warn!(
                    server = %server_id,
                    "could not mark an authorization answer at work (a repeat elsewhere may call it unknown): {error}"
                ),
            }
        }
        let mut outcome = None;
        let result = if caller.is_some_and(|caller| *caller != user) {
            Err(ConnectionError::StateNotYours)
        } else if let Err(error) = self
            .check_callback_key(server_id, params.callback_key.as_deref())
            .await
        {
            Err(error)
        } else {
            let context = CommandContext::user(user.clone(), request_id);
            // One answer at a time per connection, across processes, and none while a
            // refresh or a disconnect is at work (the connection's refresh lease): of two
            // flows' answers that arrive together the second finds the first connected and
            // exchanges nothing, so no second grant is left live at the provider, nor
            // replaces the tokens the event records; a disconnect either comes first (the
            // answer is stale) or revokes what the answer stored.
            let finish = self.finish_authorization(
                &context,
                &user,
                server_id,
                state,
                &pending.state,
                params,
            );
            let result = self.holding_refresh_lease(server_id, &user, finish).await;
            // Healthy after the first discovery; a server that is down now makes the
            // connection unreachable, which the health probe will lift. (Outside the lease:
            // a probe may refresh.)
            if result.is_ok()
                && let Err(error) = self.probe(server_id, &user).await
            {
                tracing::warn!(server = %server_id, code = error.code(), "the first tool discovery failed: {error}");
            }
            if matches!(&result, Err(ConnectionError::AnsweredBefore { first }) if first.is_empty())
            {
                // The same answer at another process spent the `state` first: its outcome
                // is this one's too.
                outcome = Some(self.answered_before(state, Some(&user)).await);
            } else {
                self.note_answer(state, server_id, &user, &result).await;
            }
            result
        };
        if let (Some(answering), Some(revision)) = (&answering, marked)
            && let Err(error) = self
                .inner
                .vault
                .delete_if_revision(answering, revision)
                .await
        {
            tracing::debug!(server = %server_id, "could not clear an answer's mark (it expires): {error}");
        }
        outcome.unwrap_or(CallbackOutcome {
            server_id: Some(server_id),
            user_id: Some(user),
            result,
        })
    }

    /// Records a flow's failed answer; a flow that stopped being awaited meanwhile (another
    /// answer connected, the user disconnected) is stale, and its failure records nothing.
    async fn record_answer_failure(
        &self,
        context: &CommandContext,
        id: &ConnectionId,
        flow: &str,
        code: &str,
        message: &str,
    ) -> Result<(), ConnectionError> {
        match self
            .record_auth_failure(context, id, Some(flow), code, message)
            .await
        {
            Err(ConnectionError::Domain(domain::DomainError::ConnectionNotAuthorizing)) => {
                Err(ConnectionError::AuthorizationSuperseded)
            }
            other => other,
        }
    }

    /// Leaves what the answer came to for a repeated one, if it spent the `state` (an answer
    /// refused before that — an issuer that does not match, say — leaves it for the real one).
    async fn note_answer(
        &self,
        state: &str,
        server_id: ServerId,
        user: &UserId,
        result: &Result<(), ConnectionError>,
    ) {
        if matches!(result, Err(ConnectionError::AnsweredBefore { .. })) {
            return;
        }
        let (Some(name), Ok(None)) = (
            answered_name(state),
            peek_pending(&self.inner.vault, state).await,
        ) else {
            return;
        };
        let note = AnswerNote::of(server_id, user.as_str(), result);
        let Ok(bytes) = serde_json::to_vec(&note) else {
            return;
        };
        match self
            .inner
            .vault
            .put_with_ttl(&name, &Secret::new(bytes), self.inner.settings.state_ttl)
            .await
        {
            Ok(_) | Err(VaultError::Conflict { .. }) => {}
            Err(error) => tracing::warn!(
                server = %server_id,
                "could not note the authorization's outcome (a repeated answer will call it unknown): {error}"
            ),
        }
    }

    /// The answer to a `state` that is no longer pending: what the answer that spent it came
    /// to, if that is noted, else an unknown authorization.
    async fn answered_before(&self, state: &str, caller: Option<&UserId>) -> CallbackOutcome {
        let unknown = CallbackOutcome {
            server_id: None,
            user_id: None,
            result: Err(ConnectionError::StateInvalid),
        };
        let (Some(name), Some(answering)) = (answered_name(state), answering_name(state)) else {
            return unknown;
        };
        // An answer at work on another process: wait for what it comes to.
        let give_up = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
        let mut pause = std::time::Duration::from_millis(50);
        let note = loop {
            let noted = match self.inner.vault.get(&name).await {
                Ok(Some((secret, _))) => serde_json::from_slice::<AnswerNote>(secret.expose()).ok(),
                Ok(None) => None,
                Err(error) => {
                    return CallbackOutcome {
                        result: Err(error.into()),
                        ..unknown
                    };
                }
            };
            if noted.is_some() {
                break noted;
            }
            let at_work = matches!(self.inner.vault.get(&answering).await, Ok(Some(_)));
            if !at_work {
                break None;
            }
            if tokio::time::Instant::now() + pause > give_up {
                return CallbackOutcome {
                    result: Err(ConnectionError::AnsweredBefore {
                        first: "another request with this authorization is still at work; \
                                reload the connection's page to see how it ended"
                            .to_owned(),
                    }),
                    ..unknown
                };
            }
            self.inner.answer_waits.send_modify(|n| *n += 1);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        };
        let Some(note) = note else {
            return unknown;
        };
        let Ok(user) = UserId::parse(&note.user_id) else {
            return unknown;
        };
        if caller.is_some_and(|caller| *caller != user) {
            return CallbackOutcome {
                result: Err(ConnectionError::StateNotYours),
                ..unknown
            };
        }
        CallbackOutcome {
            server_id: Some(note.server_id),
            user_id: Some(user),
            result: note.result(),
        }
    }

    /// Uses (or refuses) an answer; run holding the connection's refresh lease.
    async fn finish_authorization(
        &self,
        context: &CommandContext,
        user: &UserId,
        server_id: ServerId,
        state: &str,
        pending: &StoredAuthorizationState,
        params: CallbackParams,
    ) -> Result<(), ConnectionError> {
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        // Only a connection waiting for this flow's answer takes it. A second flow started
        // while the first was pending keeps a valid state; once either finished, or the user
        // disconnected, the other is stale: its code is not exchanged (no tokens to overwrite
        // the working ones or to linger at the provider) and its failure records nothing.
        // One flow's refusal while another waits fails nothing either (see `PendingFlows`).
        let flow = flow_of_state(state);
        if !self.load(&id).await?.awaits_flow(&flow) {
            let name = state_name(state).ok_or(ConnectionError::StateInvalid)?;
            self.inner.vault.take(&name).await?;
            return Err(ConnectionError::AuthorizationSuperseded);
        }
        if let Some(error) = params.error {
            // RFC 9207 §2.4: an error answer is checked like a code (`rmcp` checks only
            // those), and before the state is spent: at a shared redirect URL a mixed-up or
            // hostile authorization server must not fail another server's pending flow.
            check_error_answer_issuer(pending, params.iss.as_deref())?;
            // The state is used up by this answer either way.
            let name = state_name(state).ok_or(ConnectionError::StateInvalid)?;
            if self.inner.vault.take(&name).await?.is_none() {
                return Err(ConnectionError::StateInvalid);
            }
            let code = provider_text(&error);
            let description = params.error_description.as_deref().map(provider_text);
            self.record_answer_failure(
                context,
                &id,
                &flow,
                &code,
                description.as_deref().unwrap_or_default(),
            )
            .await?;
            return Err(ConnectionError::AuthorizationDenied { code, description });
        }
        let Some(code) = params.code.filter(|c| !c.is_empty()) else {
            return Err(ConnectionError::AuthorizationDenied {
                code: "invalid_request".to_owned(),
                description: Some("the answer has neither a code nor an error".to_owned()),
            });
        };
        let server = self.server_oauth(server_id, false).await?;
        let name = credentials_name(server_id, user);
        let store = VaultCredentialStore::new(self.inner.vault.clone(), name.clone(), true);
        let manager = self.manager(&server, user, Some(store.clone())).await?;
        let exchanged = manager
            .exchange_code_for_token_with_issuer(&code, state, params.iss.as_deref())
            .await;
        let token = match exchanged {
            Ok(token) => token,
            Err(AuthError::AuthorizationServerMismatch {
                expected_issuer,
                received_issuer,
            }) => {
                return Err(ConnectionError::IssuerMismatch {
                    expected: expected_issuer,
                    received: provider_text(&received_issuer),
                });
            }
            Err(AuthError::AuthorizationServerMissingIssuer { expected_issuer }) => {
                return Err(ConnectionError::IssuerMismatch {
                    expected: expected_issuer,
                    received: "(no issuer)".to_owned(),
                });
            }
            // Another process took the `state` between the check above and the exchange (an
            // answer sent twice, to two processes): that answer's outcome stands.
            // (An empty `first`: the caller waits for that answer's noted outcome.)
            Err(AuthError::InternalError(message)) if message == STATE_ALREADY_USED => {
                return Err(ConnectionError::AnsweredBefore {
                    first: String::new(),
                });
            }
            Err(AuthError::InternalError(message)) if message.contains("state not found") => {
                return Err(ConnectionError::StateInvalid);
            }
            Err(AuthError::TokenExchangeFailed(reason)) => {
                let reason = provider_text(&reason);
                let code = oauth_error_code(&reason).unwrap_or("token_exchange_failed");
                self.record_answer_failure(context, &id, &flow, code, &reason)
                    .await?;
                return Err(ConnectionError::TokenExchangeFailed { reason });
            }
            Err(other) => {
                // Tokens issued that the vault would not take belong to nobody now: revoked,
                // not left live at the provider (this authorization is a grant of its own).
                if let Some(unsaved) = store.take_unsaved() {
                    let revoked = self.revoke(server_id, &unsaved).await;
                    tracing::warn!(
                        server = %server_id,
                        revoked,
                        "the tokens of a new authorization could not be stored; asked the provider to revoke them"
                    );
                }
                return Err(ConnectionError::from_oauth(other));
            }
        };
        use oauth2::TokenResponse as _;
        let stored = load_credentials(&self.inner.vault, &name).await?;
        let granted_scopes = stored
            .as_ref()
            .map(|(c, _)| c.granted_scopes.clone())
            .unwrap_or_default();
        let recorded = self
            .run(
                context,
                &id,
                vec![ConnectionCommand::CompleteAuthorization {
                    flow,
                    granted_scopes,
                    access_token_expires_at: token
                        .expires_in()
                        .map(|lifetime| crate::tokens::expiry_after(SystemTime::now(), lifetime)),
                    token_fingerprint: TokenFingerprint::of(token.access_token().secret()),
                    has_refresh_token: token.refresh_token().is_some(),
                }],
            )
            .await;
        if let Err(error) = recorded {
            // The connection stopped waiting between the check above and now. Disconnected (or
            // failed): these tokens must not linger. Connected by a flow that finished at the
            // same moment: the entry holds that flow's tokens or these, both a grant of this
            // user at this server, and deleting it would leave a connection reported healthy
            // with no tokens.
            let connected_meanwhile = matches!(
                self.load(&id).await.map(|state| state.status()),
                Ok(ConnectionStatus::Connected | ConnectionStatus::Unreachable)
            );
            if !connected_meanwhile {
                let _ = self.inner.vault.delete(&name).await;
            }
            return Err(error);
        }
        Ok(())
    }

    /// The caller's connection to a server, as the API reports it.
    pub fn status(
        &self,
        user: &UserId,
        server_id: ServerId,
    ) -> Result<ConnectionReport, ConnectionError> {
        let enabled = self
            .inner
            .read_models
            .servers
            .read(|d| d.get(server_id).map(|s| s.enabled))
            .ok_or(ConnectionError::ServerNotFound)?;
        let view = self
            .inner
            .read_models
            .connections
            .read(|d| d.get(server_id, user.as_str()).cloned());
        Ok(match view {
            Some(view) => ConnectionReport {
                server_id,
                status: view.api_status(enabled),
                reason: view.reason.clone(),
                since: view.since,
                granted_scopes: view.granted_scopes.clone(),
                access_token_expires_at: view.access_token_expires_at,
                tool_count: view.tool_count,
            },
            None => ConnectionReport {
                server_id,
                status: ApiConnectionStatus::NotConnected,
                reason: String::new(),
                since: None,
                granted_scopes: Vec::new(),
                access_token_expires_at: None,
                tool_count: None,
            },
        })
    }

    /// Disconnects a user from a server: revokes the tokens at the provider (where it has a
    /// way), deletes them from the vault, records whether the revocation succeeded.
    pub async fn disconnect(
        &self,
        context: &CommandContext,
        user: &UserId,
        server_id: ServerId,
        reason: &str,
    ) -> Result<Disconnected, ConnectionError> {
        let id = ConnectionId {
            server_id,
            user_id: user.clone(),
        };
        // Held while the tokens are read, revoked and deleted: a refresh that rotated them in
        // between would leave its new refresh token live at the provider.
        let tokens_revoked = self
            .holding_refresh_lease(server_id, user, self.revoke_and_delete(&id))
            .await?;
        let written = self
            .run(
                context,
                &id,
                vec![ConnectionCommand::Disconnect {
                    reason: reason.to_owned(),
                    tokens_revoked,
                }],
            )
            .await?;
        Ok(Disconnected {
            tokens_revoked,
            written,
        })
    }

    /// Revokes the connection's tokens at the provider (where it has a way) and deletes them;
    /// whether the provider confirmed the revocation.
    async fn revoke_and_delete(&self, id: &ConnectionId) -> Result<bool, ConnectionError> {
        let (server_id, user) = (id.server_id, &id.user_id);
        let name = credentials_name(server_id, user);
        let credentials = load_credentials(&self.inner.vault, &name).await?;
        let state = self.load(id).await?;
        if credentials.is_none()
            && matches!(
                state.status(),
                ConnectionStatus::NotConnected | ConnectionStatus::Disconnected
            )
        {
            return Err(ConnectionError::NotConnected);
        }
        let mut tokens_revoked = false;
        if let Some((credentials, _)) = &credentials {
            tokens_revoked = self.revoke(server_id, credentials).await;
            self.inner.vault.delete(&name).await?;
        }
        Ok(tokens_revoked)
    }

    /// Revokes `credentials` at the server's provider; whether the provider confirmed it.
    async fn revoke(&self, server_id: ServerId, credentials: &StoredCredentials) -> bool {
        let server = match self.server_oauth(server_id, true).await {
            Ok(server) => server,
            Err(error) => {
                tracing::warn!(
                    server = %server_id,
                    code = error.code(),
                    "cannot revoke: the server's OAuth client is unknown"
                );
                return false;
            }
        };
        use oauth2::TokenResponse as _;
        let token = credentials.token_response.as_ref();
        let outcome = mcp::revoke_tokens(
            &self.inner.outbound,
            &server.revocation_method(),
            &server.client_authentication(),
            TokensToRevoke {
                access_token: token.map(|t| t.access_token().secret().as_str()),
                refresh_token: token
                    .and_then(|t| t.refresh_token())
                    .map(|t| t.secret().as_str()),
            },
        )
        .await;
        match outcome {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    server = %server_id,
                    "the provider did not confirm the revocation: {error}"
                );
                false
            }
        }
    }
}

/// The RFC 9207 check of an error answer's `iss`, by the rules `rmcp` applies to a code's.
fn check_error_answer_issuer(
    pending: &StoredAuthorizationState,
    received: Option<&str>,
) -> Result<(), ConnectionError> {
    let mismatch = |expected: &str, received: &str| ConnectionError::IssuerMismatch {
        expected: expected.to_owned(),
        received: provider_text(received),
    };
    match (pending.expected_issuer.as_deref(), received) {
        (Some(expected), Some(received)) if received != expected => {
            Err(mismatch(expected, received))
        }
        (Some(expected), None) if pending.require_issuer => Err(mismatch(expected, "(no issuer)")),
        (None, Some(received)) => Err(mismatch("(none recorded)", received)),
        (None, None) if pending.require_issuer => Err(mismatch("(none recorded)", "(no issuer)")),
        _ => Ok(()),
    }
}

/// The RFC 6749 §5.2 error code at the start of an `oauth2` error text, if one is there.
pub(crate) fn oauth_error_code(text: &str) -> Option<&'static str> {
    const CODES: [&str; 7] = [
        "invalid_grant",
        "invalid_client",
        "invalid_request",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
    ];
    CODES.into_iter().find(|code| text.contains(code))
}
