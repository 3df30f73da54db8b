//! The fixture's state, shared by every request handler and the [`super::FixtureHandle`].
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use rmcp::{Peer, RoleServer};
use tokio::sync::watch;

use super::{
    AuthorizationRequestSeen, ClientAuthMethod, McpRequestSeen, OAuthFixture,
    PRE_REGISTERED_CLIENT_ID, PRE_REGISTERED_CLIENT_SECRET, Revocation, TokenRequestSeen,
    handle::GateInner,
};
use crate::mcp_fixture::FixtureTool;

/// Everything the fixture's handlers share.
pub(crate) struct Shared {
    pub(crate) config: OAuthFixture,
    state: Mutex<State>,
    /// The token gate in force, if any.
    pub(crate) gate: Mutex<Option<Arc<GateInner>>>,
    /// Bumped whenever a tool list changes (subscriptions of the stateless era listen to it).
    pub(crate) tools_changed: watch::Sender<u64>,
    /// How each call of a slow tool ended, in order.
    pub(crate) slow_calls_ended: watch::Sender<Vec<crate::SlowCallEnd>>,
    /// Bumped whenever the MCP endpoint records a request (`State::mcp_requests`).
    pub(crate) mcp_requests_seen: watch::Sender<usize>,
}

/// Who a valid access token speaks for, as the MCP handler sees it.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub(crate) user: String,
    pub(crate) scopes: Vec<String>,
}

pub(crate) struct Client {
    pub(crate) secret: Option<String>,
    pub(crate) method: ClientAuthMethod,
    /// Exact redirect URIs; `None`: any (the pre-registered client until a test sets them).
    pub(crate) redirect_uris: Option<Vec<String>>,
}

pub(crate) struct Code {
    pub(crate) client_id: String,
    pub(crate) redirect_uri: Option<String>,
    pub(crate) challenge: String,
    pub(crate) challenge_method: String,
    pub(crate) resource: Option<String>,
    pub(crate) scopes: Vec<String>,
    pub(crate) user: String,
    pub(crate) issued_at: Instant,
    /// The grant its first use created (a replay revokes it).
    pub(crate) used_for: Option<usize>,
}

pub(crate) struct Grant {
    pub(crate) client_id: String,
    pub(crate) user: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) resource: Option<String>,
    pub(crate) revoked: bool,
    pub(crate) current_refresh: Option<String>,
    pub(crate) previous_refresh: Option<String>,
}

pub(crate) struct AccessToken {
    pub(crate) grant: usize,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires_at: Instant,
    /// Expired by [`super::FixtureHandle::expire_access_tokens`] or revoked.
    pub(crate) dead: bool,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) clients: HashMap<String, Client>,
    pub(crate) registrations: usize,
    pub(crate) codes: HashMap<String, Code>,
    pub(crate) grants: Vec<Grant>,
    pub(crate) access_tokens: HashMap<String, AccessToken>,
    /// Refresh token → its grant (validity is the grant's current/previous pair).
    pub(crate) refresh_tokens: HashMap<String, usize>,
    pub(crate) issued: Vec<String>,
    pub(crate) token_requests: Vec<String>,
    pub(crate) authorization_requests: usize,
    pub(crate) revocations: Vec<Revocation>,
    pub(crate) last_authorization: Option<AuthorizationRequestSeen>,
    pub(crate) last_token: Option<TokenRequestSeen>,
    /// Refresh requests between arrival and answer: request number → grant.
    pub(crate) refreshes_in_flight: HashMap<u64, usize>,
    /// In-flight refreshes that lost to a concurrent one of the same grant.
    pub(crate) refresh_losers: HashSet<u64>,
    pub(crate) next_request: u64,
    pub(crate) mcp_down: bool,
    pub(crate) default_tools: Vec<FixtureTool>,
    pub(crate) user_tools: HashMap<String, Vec<FixtureTool>>,
    pub(crate) tool_calls: HashMap<String, usize>,
    /// The arguments of every `tools/call`, by tool, in arrival order.
    pub(crate) tool_call_arguments: HashMap<String, Vec<serde_json::Value>>,
    /// Per tool, the calls that reached it (for [`crate::ToolOutput::Together`]).
    pub(crate) arrived: HashMap<String, tokio::sync::watch::Sender<usize>>,
    pub(crate) tools_list_requests: usize,
    /// The RFC 7009 endpoint answers `unsupported_token_type` for refresh tokens.
    pub(crate) refuse_refresh_token_revocation: bool,
    /// A broken server: the last page of `tools/list` points back at the first.
    pub(crate) tool_pages_in_a_circle: bool,
    pub(crate) mcp_requests: Vec<McpRequestSeen>,
    pub(crate) sessions_opened: usize,
    /// Open sessions (sessions era), with their user, for `notifications/tools/list_changed`.
    pub(crate) session_peers: Vec<(String, Peer<RoleServer>)>,
}

impl Shared {
    pub(crate) fn new(config: OAuthFixture) -> Shared {
        let mut state = State {
            default_tools: FixtureTool::standard_set(),
            ..State::default()
        };
        state.clients.insert(
            PRE_REGISTERED_CLIENT_ID.to_owned(),
            Client {
                secret: Some(PRE_REGISTERED_CLIENT_SECRET.to_owned()),
                method: config.pre_registered_auth_method,
                redirect_uris: None,
            },
        );
        state.issued.push(PRE_REGISTERED_CLIENT_SECRET.to_owned());
        Shared {
            config,
            state: Mutex::new(state),
            gate: Mutex::new(None),
            tools_changed: watch::Sender::new(0),
            slow_calls_ended: watch::Sender::new(Vec::new()),
            mcp_requests_seen: watch::Sender::new(0),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn gate(&self) -> MutexGuard<'_, Option<Arc<GateInner>>> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the MCP endpoint makes of a bearer token.
pub(crate) enum TokenCheck {
    Valid(Caller),
    /// Unknown, expired, revoked, or for another resource.
    Invalid(&'static str),
}

impl State {
    /// An opaque random secret with a recognisable `prefix`, recorded as issued.
    pub(crate) fn mint(&mut self, prefix: &str) -> String {
        let secret = format!("{prefix}{}", random_text());
        self.issued.push(secret.clone());
        secret
    }

    pub(crate) fn check_access_token(&self, token: &str, resource: &str) -> TokenCheck {
        let Some(access) = self.access_tokens.get(token) else {
            return TokenCheck::Invalid("The access token is not known");
        };
        let Some(grant) = self.grants.get(access.grant) else {
            return TokenCheck::Invalid("The access token is not known");
        };
        if access.dead || grant.revoked {
            return TokenCheck::Invalid("The access token expired or was revoked");
        }
        if Instant::now() >= access.expires_at {
            return TokenCheck::Invalid("The access token expired");
        }
        if grant.resource.as_deref().is_some_and(|r| r != resource) {
            return TokenCheck::Invalid("The access token is for another resource");
        }
        TokenCheck::Valid(Caller {
            user: grant.user.clone(),
            scopes: access.scopes.clone(),
        })
    }

    /// Revokes a grant: its refresh tokens and access tokens stop working.
    pub(crate) fn revoke_grant(&mut self, grant: usize) {
        if let Some(grant_state) = self.grants.get_mut(grant) {
            grant_state.revoked = true;
            grant_state.current_refresh = None;
            grant_state.previous_refresh = None;
        }
        for access in self.access_tokens.values_mut() {
            if access.grant == grant {
                access.dead = true;
            }
        }
    }

    /// The tools `user` sees.
    pub(crate) fn tools_for(&self, user: &str) -> &[FixtureTool] {
        self.user_tools.get(user).unwrap_or(&self.default_tools)
    }
}

/// 32 random bytes, base64url.
fn random_text() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut bytes = [0_u8; 32];
    // The system random source does not fail short of a broken system; should it, a counter
    // still keeps every secret distinct (merely guessable, in a test).
    if SystemRandom::new().fill(&mut bytes).is_err() {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&n.to_le_bytes());
    }
    URL_SAFE_NO_PAD.encode(bytes)
}
