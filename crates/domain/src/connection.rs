//! The Connection aggregate: one user's OAuth link to one server (subject
//! `connection.<server_id>.<user_key>`).
//!
//! Events record changes, not polls: a health check or a tool re-discovery that finds nothing
//! new records nothing, and a replayed command (same data) records nothing twice.
use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use proto::v1::{self as pb, envelope::Event};

use crate::time::{from_optional_timestamp, to_timestamp};
use crate::{Aggregate, DomainError, ServerId, TokenFingerprint, ToolName, UserId};

/// Which connection: one user × one server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub server_id: ServerId,
    pub user_id: UserId,
}

impl ConnectionId {
    /// The aggregate's subject, relative to the deployment's prefix.
    pub fn subject(&self) -> String {
        format!("connection.{}.{}", self.server_id, self.user_id.key())
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// Never connected.
    #[default]
    NotConnected,
    /// The user is in the OAuth authorization-code flow.
    Authorizing,
    Connected,
    /// The authorization failed or the tokens stopped working; the user has to connect again
    /// (or a later refresh succeeds).
    AuthError,
    /// Connected, but the server did not answer the last health check.
    Unreachable,
    /// The user disconnected (tokens deleted, revoked where the server allows).
    Disconnected,
}

impl ConnectionStatus {
    /// The API spelling, e.g. `auth_error`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionStatus::NotConnected => "not_connected",
            ConnectionStatus::Authorizing => "authorizing",
            ConnectionStatus::Connected => "connected",
            ConnectionStatus::AuthError => "auth_error",
            ConnectionStatus::Unreachable => "unreachable",
            ConnectionStatus::Disconnected => "disconnected",
        }
    }

    /// Whether the connection can hold tokens in this status (it may still be unreachable).
    /// `AuthError` can also follow a first authorization that failed, before any token:
    /// [`ConnectionState::token_fingerprint`] is empty then.
    pub fn has_tokens(self) -> bool {
        matches!(
            self,
            ConnectionStatus::Connected
                | ConnectionStatus::Unreachable
                | ConnectionStatus::AuthError
        )
    }
}

/// A connection as its events describe it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionState {
    status: ConnectionStatus,
    requested_scopes: Vec<String>,
    authorization_expires_at: Option<SystemTime>,
    granted_scopes: Vec<String>,
    access_token_expires_at: Option<SystemTime>,
    token_fingerprint: String,
    has_refresh_token: bool,
    last_auth_error_code: String,
    pending_flows: PendingFlows,
    /// Tool name → definition hash, as last discovered; `None` until the first discovery of
    /// this connection (reset by a disconnect).
    tools: Option<BTreeMap<String, String>>,
}

/// Connect pressed more often than this keeps only the newest flows' answers usable.
const MAX_PENDING_FLOWS: usize = 16;

/// The authorization flows started since a connection last connected or disconnected
/// (newest last, at most [`MAX_PENDING_FLOWS`]): only their answers finish it, and one
/// flow's refusal fails it only when no other flow is waiting. An empty flow is one an older
/// version started without recording it; any answer may finish that.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct PendingFlows(Vec<String>);

impl PendingFlows {
    /// A flow started (`ConnectionStarted`); `waiting`: the connection already waited for
    /// an authorization (else earlier flows are over).
    pub fn started(&mut self, flow: &str, waiting: bool) {
        if !waiting {
            self.0.clear();
        }
        self.0.retain(|pending| pending != flow);
        self.0.push(flow.to_owned());
        if self.0.len() > MAX_PENDING_FLOWS {
            self.0.remove(0);
        }
    }

    /// A failure (`ConnectionAuthFailed` of `flow`, empty for the tokens'): whether the
    /// connection fails, or still waits for another flow's answer.
    pub fn failed(&mut self, flow: &str, waiting: bool) -> bool {
        self.0.retain(|pending| pending != flow);
        let fails = flow.is_empty() || !waiting || self.0.is_empty();
        if fails {
            self.0.clear();
        }
        fails
    }

    /// The connection connected, or disconnected: every flow is over.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn contains(&self, flow: &str) -> bool {
        self.0
            .iter()
            .any(|pending| pending == flow || pending.is_empty())
    }

    fn newest(&self) -> Option<&String> {
        self.0.last()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ConnectionState {
    pub fn status(&self) -> ConnectionStatus {
        self.status
    }

    /// Whether an answer of `flow` may finish (or fail) the connection: it waits for an
    /// authorization and `flow` started since it last connected or disconnected.
    pub fn awaits_flow(&self, flow: &str) -> bool {
        self.status == ConnectionStatus::Authorizing && self.pending_flows.contains(flow)
    }

    pub fn granted_scopes(&self) -> &[String] {
        &self.granted_scopes
    }

    pub fn access_token_expires_at(&self) -> Option<SystemTime> {
        self.access_token_expires_at
    }

    pub fn token_fingerprint(&self) -> &str {
        &self.token_fingerprint
    }

    pub fn has_refresh_token(&self) -> bool {
        self.has_refresh_token
    }

    /// The OAuth error code of the last authorization failure, while in `AuthError`.
    pub fn last_auth_error_code(&self) -> &str {
        &self.last_auth_error_code
    }

    /// The discovered tools and their definition hashes, in name order.
    pub fn tools(&self) -> impl Iterator<Item = (&str, &str)> {
        self.tools
            .iter()
            .flatten()
            .map(|(name, hash)| (name.as_str(), hash.as_str()))
    }
}

impl Aggregate for ConnectionState {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::ConnectionStarted(started) => {
                self.pending_flows
                    .started(&started.flow, self.status == ConnectionStatus::Authorizing);
                self.status = ConnectionStatus::Authorizing;
                self.requested_scopes.clone_from(&started.requested_scopes);
                self.authorization_expires_at =
                    from_optional_timestamp(started.authorization_expires_at.as_ref());
            }
            Event::ConnectionEstablished(established) => {
                self.status = ConnectionStatus::Connected;
                self.granted_scopes.clone_from(&established.granted_scopes);
                self.access_token_expires_at =
                    from_optional_timestamp(established.access_token_expires_at.as_ref());
                self.token_fingerprint
                    .clone_from(&established.token_fingerprint);
                self.has_refresh_token = established.has_refresh_token;
                self.authorization_expires_at = None;
                self.last_auth_error_code.clear();
                self.pending_flows.clear();
            }
            Event::TokensRefreshed(refreshed) => {
                if self.status == ConnectionStatus::AuthError {
                    self.status = ConnectionStatus::Connected;
                    self.last_auth_error_code.clear();
                }
                self.granted_scopes.clone_from(&refreshed.granted_scopes);
                self.access_token_expires_at =
                    from_optional_timestamp(refreshed.access_token_expires_at.as_ref());
                self.token_fingerprint
                    .clone_from(&refreshed.token_fingerprint);
            }
            Event::ConnectionAuthFailed(failed) => {
                // One flow's refusal leaves the connection waiting for the others' answers.
                let waiting = self.status == ConnectionStatus::Authorizing;
                if self.pending_flows.failed(&failed.flow, waiting) {
                    self.status = ConnectionStatus::AuthError;
                    self.last_auth_error_code.clone_from(&failed.error_code);
                }
            }
            Event::ConnectionUnreachable(_) => self.status = ConnectionStatus::Unreachable,
            Event::ConnectionRecovered(_) if self.status == ConnectionStatus::Unreachable => {
                self.status = ConnectionStatus::Connected;
            }
            Event::ToolsDiscovered(discovered) => {
                self.tools = Some(
                    discovered
                        .tools
                        .iter()
                        .map(|tool| (tool.name.clone(), tool.definition_hash.clone()))
                        .collect(),
                );
            }
            Event::ConnectionDisconnected(_) => {
                *self = ConnectionState {
                    status: ConnectionStatus::Disconnected,
                    ..ConnectionState::default()
                };
            }
            _ => {}
        }
    }
}

/// What the connection service asks of a connection.
#[derive(Debug, Clone)]
pub enum ConnectionCommand {
    /// The user begins the OAuth flow (its `state` and PKCE verifier go to the vault).
    StartConnection {
        /// The flow's id: [`flow_of_state`] of its `state`.
        flow: String,
        requested_scopes: Vec<String>,
        authorization_expires_at: SystemTime,
    },
    /// The authorization server issued tokens for the pending authorization `flow`.
    CompleteAuthorization {
        flow: String,
        granted_scopes: Vec<String>,
        access_token_expires_at: Option<SystemTime>,
        token_fingerprint: TokenFingerprint,
        has_refresh_token: bool,
    },
    RecordTokensRefreshed {
        granted_scopes: Vec<String>,
        access_token_expires_at: Option<SystemTime>,
        token_fingerprint: TokenFingerprint,
        refresh_token_rotated: bool,
    },
    /// The authorization flow `flow` (`None`: the connection's tokens, a refresh) failed
    /// (`error_code`: RFC 6749 §5.2 or a Switchboard code, e.g. `invalid_grant`).
    RecordAuthFailure {
        flow: Option<String>,
        error_code: String,
        message: String,
    },
    /// A health check did not reach the server.
    RecordUnreachable { reason: String },
    /// A health check reached the server again.
    RecordRecovered,
    /// The server's current tool list (each with its `definition_hash`).
    RecordDiscoveredTools { tools: Vec<pb::ToolDefinition> },
    Disconnect {
        reason: String,
        tokens_revoked: bool,
    },
}

/// The id an authorization flow is recorded under: 16 hex digits of SHA-256 of its OAuth
/// `state`, which tells flows apart without writing the state down.
pub fn flow_of_state(state: &str) -> String {
    TokenFingerprint::of(state).as_str().to_owned()
}

/// Decides a command for the connection `id` at time `now`.
pub fn decide(
    state: &ConnectionState,
    id: &ConnectionId,
    command: ConnectionCommand,
    now: SystemTime,
) -> Result<Vec<Event>, DomainError> {
    use ConnectionStatus as Status;
    let server_id = || id.server_id.to_string();
    let user_id = || id.user_id.as_str().to_owned();
    match command {
        ConnectionCommand::StartConnection {
            flow,
            requested_scopes,
            authorization_expires_at,
        } => match state.status {
            Status::Connected | Status::Unreachable => Err(DomainError::AlreadyConnected),
            Status::Authorizing
                if state.pending_flows.newest() == Some(&flow)
                    && state.requested_scopes == requested_scopes
                    && state.authorization_expires_at == Some(authorization_expires_at) =>
            {
                Ok(vec![])
            }
            _ => Ok(vec![Event::ConnectionStarted(pb::ConnectionStarted {
                server_id: server_id(),
                user_id: user_id(),
                requested_scopes,
                authorization_expires_at: Some(to_timestamp(authorization_expires_at)),
                flow,
            })]),
        },
        ConnectionCommand::CompleteAuthorization {
            flow,
            granted_scopes,
            access_token_expires_at,
            token_fingerprint,
            has_refresh_token,
        } => {
            if state.status == Status::Connected
                && state.token_fingerprint == token_fingerprint.as_str()
            {
                return Ok(vec![]);
            }
            if !state.awaits_flow(&flow) {
                return Err(DomainError::ConnectionNotAuthorizing);
            }
            if state
                .authorization_expires_at
                .is_some_and(|expiry| now > expiry)
            {
                return Err(DomainError::AuthorizationExpired);
            }
            Ok(vec![Event::ConnectionEstablished(
                pb::ConnectionEstablished {
                    server_id: server_id(),
                    user_id: user_id(),
                    granted_scopes,
                    access_token_expires_at: access_token_expires_at.map(to_timestamp),
                    token_fingerprint: token_fingerprint.as_str().to_owned(),
                    has_refresh_token,
                    flow,
                },
            )])
        }
        ConnectionCommand::RecordTokensRefreshed {
            granted_scopes,
            access_token_expires_at,
            token_fingerprint,
            refresh_token_rotated,
        } => {
            // An auth error after a failed *first* authorization holds no tokens to refresh.
            if !state.status.has_tokens() || state.token_fingerprint.is_empty() {
                return Err(DomainError::NotConnected);
            }
            if state.status != Status::AuthError
                && state.token_fingerprint == token_fingerprint.as_str()
            {
                return Ok(vec![]);
            }
            Ok(vec![Event::TokensRefreshed(pb::TokensRefreshed {
                server_id: server_id(),
                user_id: user_id(),
                granted_scopes,
                access_token_expires_at: access_token_expires_at.map(to_timestamp),
                token_fingerprint: token_fingerprint.as_str().to_owned(),
                refresh_token_rotated,
            })])
        }
        ConnectionCommand::RecordAuthFailure {
            flow,
            error_code,
            message,
        } => {
            match (&flow, state.status) {
                // An authorization's answer counts only while its flow is awaited.
                (Some(flow), _) if !state.awaits_flow(flow) => {
                    return Err(DomainError::ConnectionNotAuthorizing);
                }
                (Some(_), _) => {}
                (None, Status::NotConnected | Status::Disconnected) => {
                    return Err(DomainError::NotConnected);
                }
                (None, Status::AuthError) if state.last_auth_error_code == error_code => {
                    return Ok(vec![]);
                }
                (None, _) => {}
            }
            Ok(vec![Event::ConnectionAuthFailed(
                pb::ConnectionAuthFailed {
                    server_id: server_id(),
                    user_id: user_id(),
                    error_code,
                    message,
                    flow: flow.unwrap_or_default(),
                },
            )])
        }
        // Only a flip is an event. A connection that is not connected has nothing to be
        // unreachable from; an auth error outranks reachability.
        ConnectionCommand::RecordUnreachable { reason } => match state.status {
            Status::Connected => Ok(vec![Event::ConnectionUnreachable(
                pb::ConnectionUnreachable {
                    server_id: server_id(),
                    user_id: user_id(),
                    reason,
                },
            )]),
            _ => Ok(vec![]),
        },
        ConnectionCommand::RecordRecovered => match state.status {
            Status::Unreachable => Ok(vec![Event::ConnectionRecovered(pb::ConnectionRecovered {
                server_id: server_id(),
                user_id: user_id(),
            })]),
            _ => Ok(vec![]),
        },
        ConnectionCommand::RecordDiscoveredTools { tools } => {
            if !matches!(state.status, Status::Connected | Status::Unreachable) {
                return Err(DomainError::NotConnected);
            }
            discover_tools(state, tools, server_id(), user_id())
        }
        ConnectionCommand::Disconnect {
            reason,
            tokens_revoked,
        } => match state.status {
            Status::NotConnected | Status::Disconnected => Ok(vec![]),
            _ => Ok(vec![Event::ConnectionDisconnected(
                pb::ConnectionDisconnected {
                    server_id: server_id(),
                    user_id: user_id(),
                    reason,
                    tokens_revoked,
                },
            )]),
        },
    }
}

fn discover_tools(
    state: &ConnectionState,
    tools: Vec<pb::ToolDefinition>,
    server_id: String,
    user_id: String,
) -> Result<Vec<Event>, DomainError> {
    let mut seen = HashSet::with_capacity(tools.len());
    for tool in &tools {
        ToolName::parse(&tool.name)?;
        if tool.definition_hash.is_empty() {
            return Err(DomainError::ToolDefinitionHashMissing {
                tool: tool.name.clone(),
            });
        }
        if !seen.insert(tool.name.as_str()) {
            return Err(DomainError::ToolDuplicate {
                tool: tool.name.clone(),
            });
        }
    }
    let empty = BTreeMap::new();
    let known = state.tools.as_ref().unwrap_or(&empty);
    let mut added = Vec::new();
    let mut redefined = Vec::new();
    for tool in &tools {
        match known.get(&tool.name) {
            None => added.push(tool.name.clone()),
            Some(hash) if *hash != tool.definition_hash => redefined.push(tool.name.clone()),
            Some(_) => {}
        }
    }
    let removed: Vec<String> = known
        .keys()
        .filter(|name| !seen.contains(name.as_str()))
        .cloned()
        .collect();
    let first_discovery = state.tools.is_none();
    if !first_discovery && added.is_empty() && removed.is_empty() && redefined.is_empty() {
        return Ok(vec![]);
    }
    Ok(vec![Event::ToolsDiscovered(pb::ToolsDiscovered {
        server_id,
        user_id,
        tools,
        added,
        removed,
        redefined,
    })])
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::testing::Scenario;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn id() -> ConnectionId {
        ConnectionId {
            server_id: ServerId::parse("0190f3c4-a8b2-7c3d-9e1f-0123456789ab").unwrap(),
            user_id: UserId::parse("alice@example.com").unwrap(),
        }
    }

    fn start(expires: u64) -> ConnectionCommand {
        ConnectionCommand::StartConnection {
            flow: "f1".into(),
            requested_scopes: vec!["repo".into()],
            authorization_expires_at: at(expires),
        }
    }

    fn started(expires: u64) -> Event {
        started_as("f1", expires)
    }

    fn started_as(flow: &str, expires: u64) -> Event {
        Event::ConnectionStarted(pb::ConnectionStarted {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            requested_scopes: vec!["repo".into()],
            authorization_expires_at: Some(to_timestamp(at(expires))),
            flow: flow.into(),
        })
    }

    fn fingerprint(token: &str) -> TokenFingerprint {
        TokenFingerprint::of(token)
    }

    fn complete(token: &str) -> ConnectionCommand {
        complete_as("f1", token)
    }

    fn complete_as(flow: &str, token: &str) -> ConnectionCommand {
        ConnectionCommand::CompleteAuthorization {
            flow: flow.into(),
            granted_scopes: vec!["repo".into()],
            access_token_expires_at: Some(at(5_000)),
            token_fingerprint: fingerprint(token),
            has_refresh_token: true,
        }
    }

    fn established(token: &str) -> Event {
        established_as("f1", token)
    }

    fn established_as(flow: &str, token: &str) -> Event {
        Event::ConnectionEstablished(pb::ConnectionEstablished {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            granted_scopes: vec!["repo".into()],
            access_token_expires_at: Some(to_timestamp(at(5_000))),
            token_fingerprint: fingerprint(token).as_str().to_owned(),
            has_refresh_token: true,
            flow: flow.into(),
        })
    }

    fn connected() -> Vec<Event> {
        vec![started(1_600), established("token-1")]
    }

    fn unreachable() -> Event {
        Event::ConnectionUnreachable(pb::ConnectionUnreachable {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            reason: "timeout".into(),
        })
    }

    fn auth_failed(code: &str) -> Event {
        auth_failed_as("", code)
    }

    fn auth_failed_as(flow: &str, code: &str) -> Event {
        Event::ConnectionAuthFailed(pb::ConnectionAuthFailed {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            error_code: code.into(),
            message: "refresh token expired".into(),
            flow: flow.into(),
        })
    }

    fn refuse_as(flow: &str, code: &str) -> ConnectionCommand {
        ConnectionCommand::RecordAuthFailure {
            flow: Some(flow.into()),
            error_code: code.into(),
            message: "refresh token expired".into(),
        }
    }

    fn tool(name: &str, hash: &str) -> pb::ToolDefinition {
        pb::ToolDefinition {
            name: name.into(),
            definition_hash: hash.into(),
            ..Default::default()
        }
    }

    fn discovered(
        tools: &[(&str, &str)],
        added: &[&str],
        removed: &[&str],
        redefined: &[&str],
    ) -> Event {
        let strings = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect();
        Event::ToolsDiscovered(pb::ToolsDiscovered {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            tools: tools.iter().map(|(n, h)| tool(n, h)).collect(),
            added: strings(added),
            removed: strings(removed),
            redefined: strings(redefined),
        })
    }

    fn discover(tools: &[(&str, &str)]) -> ConnectionCommand {
        ConnectionCommand::RecordDiscoveredTools {
            tools: tools.iter().map(|(n, h)| tool(n, h)).collect(),
        }
    }

    fn decide_at(
        seconds: u64,
        command: ConnectionCommand,
    ) -> impl FnOnce(&ConnectionState) -> Result<Vec<Event>, DomainError> {
        move |state| decide(state, &id(), command, at(seconds))
    }

    #[test]
    fn subject_uses_the_user_key() {
        assert_eq!(
            id().subject(),
            "connection.0190f3c4-a8b2-7c3d-9e1f-0123456789ab.alice_40example_2Ecom"
        );
    }

    #[test]
    fn starting_a_connection_records_connection_started() {
        let state = Scenario::<ConnectionState>::given([])
            .when(decide_at(1_000, start(1_600)))
            .then([started(1_600)]);
        assert_eq!(state.status(), ConnectionStatus::Authorizing);
    }

    #[test]
    fn replayed_connection_start_is_idempotent() {
        Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(1_001, start(1_600)))
            .then_nothing();
    }

    #[test]
    fn starting_again_while_authorizing_restarts_the_flow() {
        Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(1_700, start(2_300)))
            .then([started(2_300)]);
    }

    #[test]
    fn starting_while_connected_is_refused() {
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, start(2_600)))
            .then_error("already_connected");
    }

    #[test]
    fn connecting_again_after_an_auth_error_or_a_disconnect_is_allowed() {
        let mut history = connected();
        history.push(auth_failed("invalid_grant"));
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(2_000, start(2_600)))
            .then([started(2_600)]);
        let mut history = connected();
        history.push(disconnected(true));
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(2_000, start(2_600)))
            .then([started(2_600)]);
    }

    #[test]
    fn completing_the_authorization_connects() {
        let state = Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(1_100, complete("token-1")))
            .then([established("token-1")]);
        assert_eq!(state.status(), ConnectionStatus::Connected);
        assert_eq!(state.token_fingerprint(), fingerprint("token-1").as_str());
        assert!(state.has_refresh_token());
    }

    #[test]
    fn replayed_authorization_completion_is_idempotent() {
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(1_100, complete("token-1")))
            .then_nothing();
    }

    #[test]
    fn completing_without_a_pending_authorization_is_refused() {
        Scenario::<ConnectionState>::given([])
            .when(decide_at(1_100, complete("token-1")))
            .then_error("connection_not_authorizing");
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(1_100, complete("token-2")))
            .then_error("connection_not_authorizing");
    }

    #[test]
    fn completing_an_expired_authorization_is_refused() {
        Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(1_601, complete("token-1")))
            .then_error("authorization_expired");
    }

    #[test]
    fn refreshed_tokens_are_recorded_once() {
        let refresh = |token: &str| ConnectionCommand::RecordTokensRefreshed {
            granted_scopes: vec!["repo".into()],
            access_token_expires_at: Some(at(9_000)),
            token_fingerprint: fingerprint(token),
            refresh_token_rotated: true,
        };
        let refreshed = Event::TokensRefreshed(pb::TokensRefreshed {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            granted_scopes: vec!["repo".into()],
            access_token_expires_at: Some(to_timestamp(at(9_000))),
            token_fingerprint: fingerprint("token-2").as_str().to_owned(),
            refresh_token_rotated: true,
        });
        let state = Scenario::<ConnectionState>::given(connected())
            .when(decide_at(4_000, refresh("token-2")))
            .then([refreshed.clone()]);
        assert_eq!(state.access_token_expires_at(), Some(at(9_000)));

        let mut history = connected();
        history.push(refreshed.clone());
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(4_001, refresh("token-2")))
            .then_nothing();

        Scenario::<ConnectionState>::given([])
            .when(decide_at(4_000, refresh("token-2")))
            .then_error("not_connected");
    }

    #[test]
    fn a_refresh_without_tokens_after_a_failed_first_authorization_is_refused() {
        Scenario::<ConnectionState>::given([started(1_600), auth_failed("access_denied")])
            .when(decide_at(
                1_000,
                ConnectionCommand::RecordTokensRefreshed {
                    granted_scopes: vec!["repo".into()],
                    access_token_expires_at: None,
                    token_fingerprint: fingerprint("token-1"),
                    refresh_token_rotated: false,
                },
            ))
            .then_error("not_connected");
    }

    #[test]
    fn a_successful_refresh_clears_an_auth_error() {
        let mut history = connected();
        history.push(auth_failed("temporarily_unavailable"));
        let (events, state) = Scenario::<ConnectionState>::given(history)
            .when(decide_at(
                4_000,
                ConnectionCommand::RecordTokensRefreshed {
                    granted_scopes: vec!["repo".into()],
                    access_token_expires_at: None,
                    token_fingerprint: fingerprint("token-1"),
                    refresh_token_rotated: false,
                },
            ))
            .then_events();
        assert_eq!(events.len(), 1);
        assert_eq!(state.status(), ConnectionStatus::Connected);
    }

    #[test]
    fn auth_failures_are_recorded_when_they_change() {
        let failure = |code: &str| ConnectionCommand::RecordAuthFailure {
            flow: None,
            error_code: code.into(),
            message: "refresh token expired".into(),
        };
        let state = Scenario::<ConnectionState>::given(connected())
            .when(decide_at(4_000, failure("invalid_grant")))
            .then([auth_failed("invalid_grant")]);
        assert_eq!(state.status(), ConnectionStatus::AuthError);
        assert_eq!(state.last_auth_error_code(), "invalid_grant");

        let mut history = connected();
        history.push(auth_failed("invalid_grant"));
        Scenario::<ConnectionState>::given(history.clone())
            .when(decide_at(4_001, failure("invalid_grant")))
            .then_nothing();
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(4_001, failure("invalid_client")))
            .then([auth_failed("invalid_client")]);
        // A user who refused consent ends the flow in an auth error.
        let state = Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(1_100, refuse_as("f1", "access_denied")))
            .then([auth_failed_as("f1", "access_denied")]);
        assert_eq!(state.status(), ConnectionStatus::AuthError);
        assert_eq!(state.last_auth_error_code(), "access_denied");
        Scenario::<ConnectionState>::given([])
            .when(decide_at(1_100, failure("invalid_grant")))
            .then_error("not_connected");
    }

    #[test]
    fn a_refusal_of_one_flow_leaves_the_connection_waiting_for_the_others() {
        // Connect pressed twice; the person says no in one tab and yes in the other.
        let both = [started_as("f1", 1_600), started_as("f2", 1_700)];
        let state = Scenario::<ConnectionState>::given(both.clone())
            .when(decide_at(1_100, refuse_as("f1", "access_denied")))
            .then([auth_failed_as("f1", "access_denied")]);
        assert_eq!(state.status(), ConnectionStatus::Authorizing);
        assert!(!state.awaits_flow("f1") && state.awaits_flow("f2"));
        let mut refused_one = both.to_vec();
        refused_one.push(auth_failed_as("f1", "access_denied"));
        Scenario::<ConnectionState>::given(refused_one.clone())
            .when(decide_at(1_200, complete_as("f2", "token-2")))
            .then([established_as("f2", "token-2")]);
        Scenario::<ConnectionState>::given(refused_one.clone())
            .when(decide_at(1_200, complete_as("f1", "token-1")))
            .then_error("connection_not_authorizing");
        // The last flow's refusal fails the connection.
        let state = Scenario::<ConnectionState>::given(refused_one)
            .when(decide_at(1_200, refuse_as("f2", "access_denied")))
            .then([auth_failed_as("f2", "access_denied")]);
        assert_eq!(state.status(), ConnectionStatus::AuthError);
        // Once one flow connected, the other's answers finish and fail nothing.
        let mut connected_by_one = both.to_vec();
        connected_by_one.push(established_as("f2", "token-2"));
        Scenario::<ConnectionState>::given(connected_by_one.clone())
            .when(decide_at(1_200, refuse_as("f1", "access_denied")))
            .then_error("connection_not_authorizing");
        Scenario::<ConnectionState>::given(connected_by_one)
            .when(decide_at(1_200, complete_as("f1", "token-1")))
            .then_error("connection_not_authorizing");
    }

    #[test]
    fn a_flow_started_before_a_disconnect_finishes_nothing_after_it() {
        let disconnected = Event::ConnectionDisconnected(pb::ConnectionDisconnected {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            reason: "user".into(),
            tokens_revoked: false,
        });
        let history = [
            started_as("f1", 1_600),
            disconnected,
            started_as("f2", 1_700),
        ];
        Scenario::<ConnectionState>::given(history.clone())
            .when(decide_at(1_200, complete_as("f1", "token-1")))
            .then_error("connection_not_authorizing");
        Scenario::<ConnectionState>::given(history.clone())
            .when(decide_at(1_200, refuse_as("f1", "access_denied")))
            .then_error("connection_not_authorizing");
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(1_200, complete_as("f2", "token-2")))
            .then([established_as("f2", "token-2")]);
    }

    #[test]
    fn a_flow_an_older_version_started_is_answered_as_before() {
        // Its `ConnectionStarted` names no flow: any answer may finish it.
        Scenario::<ConnectionState>::given([started_as("", 1_600)])
            .when(decide_at(1_200, complete_as("f9", "token-1")))
            .then([established_as("f9", "token-1")]);
    }

    #[test]
    fn unreachable_is_recorded_only_when_the_status_flips() {
        let state = Scenario::<ConnectionState>::given(connected())
            .when(decide_at(
                4_000,
                ConnectionCommand::RecordUnreachable {
                    reason: "timeout".into(),
                },
            ))
            .then([unreachable()]);
        assert_eq!(state.status(), ConnectionStatus::Unreachable);

        let mut history = connected();
        history.push(unreachable());
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(
                4_060,
                ConnectionCommand::RecordUnreachable {
                    reason: "timeout".into(),
                },
            ))
            .then_nothing();
        // Not connected: nothing to be unreachable from.
        Scenario::<ConnectionState>::given([])
            .when(decide_at(
                4_060,
                ConnectionCommand::RecordUnreachable {
                    reason: "timeout".into(),
                },
            ))
            .then_nothing();
    }

    #[test]
    fn recovery_is_recorded_only_after_unreachable() {
        let mut history = connected();
        history.push(unreachable());
        let state = Scenario::<ConnectionState>::given(history)
            .when(decide_at(4_100, ConnectionCommand::RecordRecovered))
            .then([Event::ConnectionRecovered(pb::ConnectionRecovered {
                server_id: id().server_id.to_string(),
                user_id: "alice@example.com".into(),
            })]);
        assert_eq!(state.status(), ConnectionStatus::Connected);

        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(4_100, ConnectionCommand::RecordRecovered))
            .then_nothing();
    }

    #[test]
    fn first_tool_discovery_is_always_recorded() {
        let state = Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, discover(&[("a", "h1"), ("b", "h2")])))
            .then([discovered(
                &[("a", "h1"), ("b", "h2")],
                &["a", "b"],
                &[],
                &[],
            )]);
        assert_eq!(
            state.tools().collect::<Vec<_>>(),
            [("a", "h1"), ("b", "h2")]
        );
        // Even an empty list, the first time.
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, discover(&[])))
            .then([discovered(&[], &[], &[], &[])]);
    }

    #[test]
    fn rediscovering_the_same_tools_records_nothing() {
        let mut history = connected();
        history.push(discovered(
            &[("a", "h1"), ("b", "h2")],
            &["a", "b"],
            &[],
            &[],
        ));
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(3_000, discover(&[("b", "h2"), ("a", "h1")])))
            .then_nothing();
    }

    #[test]
    fn rediscovery_records_added_removed_and_redefined_tools() {
        let mut history = connected();
        history.push(discovered(
            &[("a", "h1"), ("b", "h2"), ("c", "h3")],
            &["a", "b", "c"],
            &[],
            &[],
        ));
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(
                3_000,
                discover(&[("a", "h1"), ("b", "h2-new"), ("d", "h4")]),
            ))
            .then([discovered(
                &[("a", "h1"), ("b", "h2-new"), ("d", "h4")],
                &["d"],
                &["c"],
                &["b"],
            )]);
    }

    #[test]
    fn discovered_tool_lists_must_be_well_formed() {
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, discover(&[("a", "h1"), ("a", "h2")])))
            .then_error("tool_duplicate");
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, discover(&[("a", "")])))
            .then_error("tool_definition_hash_missing");
        Scenario::<ConnectionState>::given(connected())
            .when(decide_at(2_000, discover(&[("bad name", "h1")])))
            .then_error("tool_name_invalid_character");
        Scenario::<ConnectionState>::given([started(1_600)])
            .when(decide_at(2_000, discover(&[("a", "h1")])))
            .then_error("not_connected");
    }

    fn disconnected(tokens_revoked: bool) -> Event {
        Event::ConnectionDisconnected(pb::ConnectionDisconnected {
            server_id: id().server_id.to_string(),
            user_id: "alice@example.com".into(),
            reason: "user".into(),
            tokens_revoked,
        })
    }

    #[test]
    fn disconnecting_records_whether_tokens_were_revoked() {
        let mut history = connected();
        history.push(discovered(&[("a", "h1")], &["a"], &[], &[]));
        let state = Scenario::<ConnectionState>::given(history)
            .when(decide_at(
                5_000,
                ConnectionCommand::Disconnect {
                    reason: "user".into(),
                    tokens_revoked: true,
                },
            ))
            .then([disconnected(true)]);
        assert_eq!(state.status(), ConnectionStatus::Disconnected);
        assert_eq!(state.token_fingerprint(), "");
        assert_eq!(state.tools().count(), 0);
    }

    #[test]
    fn disconnecting_when_not_connected_records_nothing() {
        for history in [vec![], {
            let mut h = connected();
            h.push(disconnected(false));
            h
        }] {
            Scenario::<ConnectionState>::given(history)
                .when(decide_at(
                    5_000,
                    ConnectionCommand::Disconnect {
                        reason: "user".into(),
                        tokens_revoked: false,
                    },
                ))
                .then_nothing();
        }
    }

    #[test]
    fn the_first_discovery_after_reconnecting_is_recorded_again() {
        let mut history = connected();
        history.push(discovered(&[("a", "h1")], &["a"], &[], &[]));
        history.push(disconnected(true));
        history.push(started(6_600));
        history.push(established("token-3"));
        Scenario::<ConnectionState>::given(history)
            .when(decide_at(6_100, discover(&[("a", "h1")])))
            .then([discovered(&[("a", "h1")], &["a"], &[], &[])]);
    }
}
