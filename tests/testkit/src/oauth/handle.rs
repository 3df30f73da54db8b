//! The test's side of a running fixture: what reached it, and levers to change its behaviour.
use std::{
    fmt,
    sync::{Arc, Weak},
    time::Instant,
};

use tokio::sync::watch;

use super::{ClientAuthMethod, OAuthFixture, RevocationStyle, Shared};
use crate::mcp_fixture::FixtureTool;

/// A handle on a started fixture's state (see [`super::OAuthFixture::start`]); cheap to clone.
#[derive(Clone)]
pub struct FixtureHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for FixtureHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixtureHandle")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Which kind of token something was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Access,
    Refresh,
}

/// One request that reached a revocation endpoint, accepted or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The token string presented.
    pub token: String,
    pub token_type_hint: Option<String>,
    /// Which endpoint it reached.
    pub style: RevocationStyle,
    /// How the client authenticated (`None` for Slack, which takes the token as the bearer).
    pub client_auth: ClientAuthMethod,
    pub client_id: Option<String>,
    /// What the token was, if the fixture issued it.
    pub kind: Option<TokenKind>,
    /// The request was accepted (client authenticated, well formed).
    pub accepted: bool,
}

/// The query of a `GET /authorize` (or of the request a consent decision answers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthorizationRequestSeen {
    pub response_type: Option<String>,
    pub client_id: Option<String>,
    pub redirect_uri: Option<String>,
    pub state: Option<String>,
    pub scope: Option<String>,
    pub resource: Option<String>,
    pub code_challenge: Option<String>,
    pub code_challenge_method: Option<String>,
    /// `fixture_user`, or [`super::DEFAULT_USER`].
    pub user: String,
}

/// A `POST /token`, as far as it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestSeen {
    pub grant_type: Option<String>,
    pub resource: Option<String>,
    pub scope: Option<String>,
    /// How the client authenticated: Basic header, secret in the body, or neither.
    pub client_auth: ClientAuthMethod,
    /// From the Basic header or the body.
    pub client_id: Option<String>,
}

/// One request that reached the MCP endpoint with a valid token (or any, without OAuth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRequestSeen {
    /// `POST`, `GET` or `DELETE`.
    pub http_method: String,
    /// The JSON-RPC method of a POST, e.g. `tools/list`.
    pub method: Option<String>,
    /// `MCP-Protocol-Version`, else the version an `initialize` or the request's `_meta` names.
    pub protocol_version: Option<String>,
    pub session_id: Option<String>,
    pub user: String,
}

impl FixtureHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> FixtureHandle {
        FixtureHandle { shared }
    }

    /// The configuration the fixture was started with.
    #[must_use]
    pub fn fixture(&self) -> OAuthFixture {
        self.shared.config.clone()
    }

    /// Every `POST /token`, any grant (also those refused).
    #[must_use]
    pub fn token_requests(&self) -> usize {
        self.shared.state().token_requests.len()
    }

    /// The `POST /token`s with this `grant_type` (`authorization_code`, `refresh_token`).
    #[must_use]
    pub fn token_requests_for(&self, grant_type: &str) -> usize {
        self.shared
            .state()
            .token_requests
            .iter()
            .filter(|g| *g == grant_type)
            .count()
    }

    /// Every access token, refresh token, authorization code and client secret this fixture
    /// ever issued, and the pre-registered client's secret: what must never show in a log,
    /// an event or an answer.
    #[must_use]
    pub fn issued_secrets(&self) -> Vec<String> {
        self.shared.state().issued.clone()
    }

    /// What reached the revocation endpoint(s), in order.
    #[must_use]
    pub fn revocations(&self) -> Vec<Revocation> {
        self.shared.state().revocations.clone()
    }

    /// Every refresh token issued so far answers `invalid_grant` from now on, as when the
    /// user revokes the grant at the provider. Access tokens keep working until they expire.
    pub fn revoke_refresh_tokens(&self) {
        let mut state = self.shared.state();
        for grant in &mut state.grants {
            grant.current_refresh = None;
            grant.previous_refresh = None;
        }
    }

    /// Every access token issued so far is expired: the MCP endpoint answers 401 with
    /// `WWW-Authenticate: Bearer error="invalid_token"`. Tokens issued later work.
    pub fn expire_access_tokens(&self) {
        let mut state = self.shared.state();
        let now = Instant::now();
        for access in state.access_tokens.values_mut() {
            access.expires_at = access.expires_at.min(now);
        }
    }

    /// While down, the MCP endpoint answers 503 (the authorization server keeps working).
    /// To refuse connections altogether, drop (or [`crate::FixtureServer::shutdown`]) the
    /// server instead: that closes the listener and every open connection.
    pub fn set_mcp_down(&self, down: bool) {
        self.shared.state().mcp_down = down;
    }

    /// Replaces the tool list of every user without a list of their own. Open sessions
    /// (sessions era) get `notifications/tools/list_changed`, as do `subscriptions/listen`
    /// subscriptions (stateless era).
    pub fn set_tools(&self, tools: Vec<FixtureTool>) {
        self.shared.state().default_tools = tools;
        self.tools_changed(None);
    }

    /// Gives `user` (the `fixture_user` of the authorization) a tool list of their own. Their
    /// open sessions get `notifications/tools/list_changed` (subscriptions: all of them).
    pub fn set_tools_for(&self, user: &str, tools: Vec<FixtureTool>) {
        self.shared
            .state()
            .user_tools
            .insert(user.to_owned(), tools);
        self.tools_changed(Some(user));
    }

    fn tools_changed(&self, user: Option<&str>) {
        self.shared.tools_changed.send_modify(|n| *n += 1);
        let peers: Vec<_> = self
            .shared
            .state()
            .session_peers
            .iter()
            .filter(|(u, _)| user.is_none_or(|user| u == user))
            .map(|(_, peer)| peer.clone())
            .collect();
        if peers.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            for peer in peers {
                if peer.notify_tool_list_changed().await.is_err() {
                    // The session is gone.
                    shared
                        .state()
                        .session_peers
                        .retain(|(_, p)| !p.is_transport_closed());
                }
            }
        });
    }

    /// The arguments of every `tools/call` of `tool` that reached the handler, in order.
    #[must_use]
    pub fn tool_call_arguments(&self, tool: &str) -> Vec<serde_json::Value> {
        self.shared
            .state()
            .tool_call_arguments
            .get(tool)
            .cloned()
            .unwrap_or_default()
    }

    /// `tools/call`s of `tool` (also refused or failed ones that reached the handler).
    #[must_use]
    pub fn tool_calls(&self, tool: &str) -> usize {
        self.shared
            .state()
            .tool_calls
            .get(tool)
            .copied()
            .unwrap_or(0)
    }

    /// The RFC 7009 endpoint refuses to revoke refresh tokens (`unsupported_token_type`,
    /// RFC 7009 §2.2.1) and still revokes access tokens.
    pub fn refuse_refresh_token_revocation(&self) {
        self.shared.state().refuse_refresh_token_revocation = true;
    }

    /// Makes the server broken: the last page of its tool list names the first page's
    /// cursor as the next (a client that follows cursors blindly never ends).
    pub fn page_tools_in_a_circle(&self, circle: bool) {
        self.shared.state().tool_pages_in_a_circle = circle;
    }

    /// `tools/list` requests (each page counts).
    #[must_use]
    pub fn tools_list_requests(&self) -> usize {
        self.shared.state().tools_list_requests
    }

    /// Holds every `POST /token` inside the handler (before it looks at the grant) until the
    /// gate is released or dropped.
    #[must_use]
    pub fn pause_token_endpoint(&self) -> TokenGate {
        let inner = Arc::new(GateInner {
            arrived: watch::Sender::new(0),
            open: watch::Sender::new(false),
        });
        *self.shared.gate() = Some(inner.clone());
        TokenGate {
            inner,
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The last `GET /authorize` (or consent decision).
    #[must_use]
    pub fn last_authorization_request(&self) -> Option<AuthorizationRequestSeen> {
        self.shared.state().last_authorization.clone()
    }

    /// `GET /authorize` requests so far.
    #[must_use]
    pub fn authorization_requests(&self) -> usize {
        self.shared.state().authorization_requests
    }

    /// The last `POST /token`.
    #[must_use]
    pub fn last_token_request(&self) -> Option<TokenRequestSeen> {
        self.shared.state().last_token.clone()
    }

    /// Dynamic registrations so far.
    #[must_use]
    pub fn registrations(&self) -> usize {
        self.shared.state().registrations
    }

    /// Restricts the pre-registered client to these exact redirect URIs (by default it
    /// accepts any, as the test rarely knows Switchboard's callback URL before starting it).
    pub fn set_pre_registered_redirect_uris(&self, uris: Vec<String>) {
        if let Some(client) = self
            .shared
            .state()
            .clients
            .get_mut(super::PRE_REGISTERED_CLIENT_ID)
        {
            client.redirect_uris = Some(uris);
        }
    }

    /// The requests that passed the MCP endpoint's token check, in order.
    #[must_use]
    pub fn mcp_requests(&self) -> Vec<McpRequestSeen> {
        self.shared.state().mcp_requests.clone()
    }

    /// Waits until `at_least` requests to the MCP endpoint (ones that passed the token
    /// check) match `matches`, seen before or after the call, and returns them all.
    pub async fn mcp_requests_where(
        &self,
        at_least: usize,
        matches: impl Fn(&McpRequestSeen) -> bool,
    ) -> Vec<McpRequestSeen> {
        let mut seen = self.shared.mcp_requests_seen.subscribe();
        loop {
            let found: Vec<McpRequestSeen> = self
                .shared
                .state()
                .mcp_requests
                .iter()
                .filter(|request| matches(request))
                .cloned()
                .collect();
            if found.len() >= at_least {
                return found;
            }
            if seen.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Sessions the MCP endpoint opened (an `initialize` answered with `Mcp-Session-Id`).
    #[must_use]
    pub fn sessions_opened(&self) -> usize {
        self.shared.state().sessions_opened
    }

    /// How the calls of slow tools ([`crate::ToolOutput::Slow`]) ended, once `n` of them
    /// have: answered after their time, or abandoned by the server on the client's
    /// cancellation.
    pub async fn slow_calls_ended(&self, n: usize) -> Vec<crate::SlowCallEnd> {
        let mut ended = self.shared.slow_calls_ended.subscribe();
        let _ = ended.wait_for(|ended| ended.len() >= n).await;
        ended.borrow().clone()
    }
}

pub(crate) struct GateInner {
    /// Requests that reached the gate while it was held.
    pub(crate) arrived: watch::Sender<usize>,
    pub(crate) open: watch::Sender<bool>,
}

impl GateInner {
    /// Waits (inside the token handler) until the gate opens.
    pub(crate) async fn pass(&self) {
        let mut open = self.open.subscribe();
        self.arrived.send_modify(|n| *n += 1);
        let _ = open.wait_for(|open| *open).await;
    }
}

/// Holds `POST /token` requests while it lives (see [`FixtureHandle::pause_token_endpoint`]).
/// Dropping it releases them too.
pub struct TokenGate {
    inner: Arc<GateInner>,
    shared: Weak<Shared>,
}

impl fmt::Debug for TokenGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGate")
            .field("arrived", &*self.inner.arrived.borrow())
            .finish_non_exhaustive()
    }
}

impl TokenGate {
    /// Resolves once `n` requests have reached the gate (and wait there).
    pub async fn arrived(&self, n: usize) {
        let mut arrived = self.inner.arrived.subscribe();
        let _ = arrived.wait_for(|arrived| *arrived >= n).await;
    }

    /// Lets the held requests go on, and later ones pass.
    pub fn release(self) {
        drop(self);
    }
}

impl Drop for TokenGate {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            let mut gate = shared.gate();
            if gate
                .as_ref()
                .is_some_and(|current| Arc::ptr_eq(current, &self.inner))
            {
                *gate = None;
            }
        }
        self.inner.open.send_replace(true);
    }
}
