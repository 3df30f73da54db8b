//! The connection directory: every user's connection to every server as the API shows it
//! (status, why, since when, scopes, token expiry), folded from connection events. The
//! connection service answers status requests from it, walks it for health probes, and finds
//! a deleted server's connections in it.
use std::collections::BTreeMap;
use std::time::SystemTime;

use proto::v1::{Envelope, envelope::Event};

use crate::ServerId;
use crate::connection::{ConnectionStatus, PendingFlows};
use crate::time::{from_optional_timestamp, from_timestamp};

/// One connection as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionView {
    pub server_id: ServerId,
    pub user_id: String,
    pub status: ConnectionStatus,
    /// Why the status is what it is (an OAuth error code and message, an unreachable reason);
    /// empty when there is nothing to say.
    pub reason: String,
    /// When the status last changed.
    pub since: Option<SystemTime>,
    pub granted_scopes: Vec<String>,
    pub access_token_expires_at: Option<SystemTime>,
    /// How many tools the last discovery found; `None` before the first discovery.
    pub tool_count: Option<usize>,
    /// The authorization flows it waits for (as the aggregate keeps them).
    #[serde(default, skip_serializing_if = "PendingFlows::is_empty")]
    pub pending_flows: PendingFlows,
}

/// What the API calls a connection's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiConnectionStatus {
    Healthy,
    Pending,
    AuthError,
    Unreachable,
    Disabled,
    NotConnected,
}

impl ApiConnectionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiConnectionStatus::Healthy => "healthy",
            ApiConnectionStatus::Pending => "pending",
            ApiConnectionStatus::AuthError => "auth_error",
            ApiConnectionStatus::Unreachable => "unreachable",
            ApiConnectionStatus::Disabled => "disabled",
            ApiConnectionStatus::NotConnected => "not_connected",
        }
    }
}

impl ConnectionView {
    /// The status the API reports: a disabled server shows `disabled` for every connection
    /// (and the connection's own status again once enabled); a connection is `healthy` once
    /// its first tool discovery is recorded, `pending` from the start of the authorization
    /// until then.
    pub fn api_status(&self, server_enabled: bool) -> ApiConnectionStatus {
        if !server_enabled && self.status != ConnectionStatus::NotConnected {
            return ApiConnectionStatus::Disabled;
        }
        match self.status {
            ConnectionStatus::NotConnected | ConnectionStatus::Disconnected => {
                ApiConnectionStatus::NotConnected
            }
            ConnectionStatus::Authorizing => ApiConnectionStatus::Pending,
            ConnectionStatus::Connected if self.tool_count.is_none() => {
                ApiConnectionStatus::Pending
            }
            ConnectionStatus::Connected => ApiConnectionStatus::Healthy,
            ConnectionStatus::AuthError => ApiConnectionStatus::AuthError,
            ConnectionStatus::Unreachable => ApiConnectionStatus::Unreachable,
        }
    }
}

/// Every live connection (disconnected ones are dropped), by server and user.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionDirectory {
    /// Server → user id → connection (nested rather than keyed by pairs, so the checkpoint is
    /// plain JSON objects).
    connections: BTreeMap<ServerId, BTreeMap<String, ConnectionView>>,
}

impl ConnectionDirectory {
    pub fn get(&self, server_id: ServerId, user_id: &str) -> Option<&ConnectionView> {
        self.connections.get(&server_id)?.get(user_id)
    }

    /// The connections of one server.
    pub fn of_server(&self, server_id: ServerId) -> impl Iterator<Item = &ConnectionView> {
        self.connections
            .get(&server_id)
            .into_iter()
            .flat_map(BTreeMap::values)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConnectionView> {
        self.connections.values().flat_map(BTreeMap::values)
    }

    pub fn len(&self) -> usize {
        self.connections.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Folds one event in; events of other aggregates, and events with a malformed server id
    /// (this version never writes one), are ignored.
    pub fn apply(&mut self, envelope: &Envelope) {
        let Some(event) = &envelope.event else {
            return;
        };
        let at = envelope.occurred_at.as_ref().map(from_timestamp);
        let (server_id, user_id) = match event {
            Event::ConnectionStarted(e) => (&e.server_id, &e.user_id),
            Event::ConnectionEstablished(e) => (&e.server_id, &e.user_id),
            Event::TokensRefreshed(e) => (&e.server_id, &e.user_id),
            Event::ConnectionAuthFailed(e) => (&e.server_id, &e.user_id),
            Event::ConnectionUnreachable(e) => (&e.server_id, &e.user_id),
            Event::ConnectionRecovered(e) => (&e.server_id, &e.user_id),
            Event::ToolsDiscovered(e) => (&e.server_id, &e.user_id),
            Event::ConnectionDisconnected(e) => (&e.server_id, &e.user_id),
            _ => return,
        };
        let Ok(server_id) = ServerId::parse(server_id) else {
            return;
        };
        if let Event::ConnectionDisconnected(_) = event {
            if let Some(users) = self.connections.get_mut(&server_id) {
                users.remove(user_id);
                if users.is_empty() {
                    self.connections.remove(&server_id);
                }
            }
            return;
        }
        let users = self.connections.entry(server_id).or_default();
        let view = users
            .entry(user_id.clone())
            .or_insert_with(|| ConnectionView {
                server_id,
                user_id: user_id.clone(),
                status: ConnectionStatus::NotConnected,
                reason: String::new(),
                since: at,
                granted_scopes: Vec::new(),
                access_token_expires_at: None,
                tool_count: None,
                pending_flows: PendingFlows::default(),
            });
        let before = view.status;
        match event {
            Event::ConnectionStarted(e) => {
                view.pending_flows
                    .started(&e.flow, view.status == ConnectionStatus::Authorizing);
                view.status = ConnectionStatus::Authorizing;
                view.reason.clear();
            }
            Event::ConnectionEstablished(e) => {
                view.pending_flows.clear();
                view.status = ConnectionStatus::Connected;
                view.reason.clear();
                view.granted_scopes.clone_from(&e.granted_scopes);
                view.access_token_expires_at =
                    from_optional_timestamp(e.access_token_expires_at.as_ref());
                // A reconnect keeps the tools already known (the aggregate does too, so an
                // unchanged list records nothing); a first connection has none yet.
            }
            Event::TokensRefreshed(e) => {
                if view.status == ConnectionStatus::AuthError {
                    view.status = ConnectionStatus::Connected;
                    view.reason.clear();
                }
                view.granted_scopes.clone_from(&e.granted_scopes);
                view.access_token_expires_at =
                    from_optional_timestamp(e.access_token_expires_at.as_ref());
            }
            Event::ConnectionAuthFailed(e) => {
                // One flow's refusal leaves the connection waiting for another's answer.
                let waiting = view.status == ConnectionStatus::Authorizing;
                if view.pending_flows.failed(&e.flow, waiting) {
                    view.status = ConnectionStatus::AuthError;
                    view.reason = if e.message.is_empty() {
                        e.error_code.clone()
                    } else {
                        format!("{}: {}", e.error_code, e.message)
                    };
                }
            }
            Event::ConnectionUnreachable(e) => {
                view.status = ConnectionStatus::Unreachable;
                view.reason.clone_from(&e.reason);
            }
            Event::ConnectionRecovered(_) if view.status == ConnectionStatus::Unreachable => {
                view.status = ConnectionStatus::Connected;
                view.reason.clear();
            }
            Event::ToolsDiscovered(e) => view.tool_count = Some(e.tools.len()),
            _ => {}
        }
        if view.status != before
            || matches!(event, Event::ToolsDiscovered(_)) && view.since.is_none()
        {
            view.since = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use proto::v1 as pb;

    use super::*;

    fn envelope(event: Event, seconds: i64) -> Envelope {
        Envelope {
            occurred_at: Some(proto::Timestamp { seconds, nanos: 0 }),
            event: Some(event),
            ..Envelope::default()
        }
    }

    fn fold(events: Vec<(Event, i64)>) -> ConnectionDirectory {
        let mut directory = ConnectionDirectory::default();
        for (event, at) in events {
            directory.apply(&envelope(event, at));
        }
        directory
    }

    #[test]
    fn a_connection_is_pending_until_its_first_discovery_then_healthy() {
        let server = ServerId::new();
        let s = server.to_string();
        let u = "alice".to_owned();
        let started = Event::ConnectionStarted(pb::ConnectionStarted {
            server_id: s.clone(),
            user_id: u.clone(),
            ..Default::default()
        });
        let established = Event::ConnectionEstablished(pb::ConnectionEstablished {
            server_id: s.clone(),
            user_id: u.clone(),
            granted_scopes: vec!["issues:read".into()],
            ..Default::default()
        });
        let discovered = Event::ToolsDiscovered(pb::ToolsDiscovered {
            server_id: s.clone(),
            user_id: u.clone(),
            ..Default::default()
        });
        let directory = fold(vec![(started.clone(), 1)]);
        assert_eq!(
            directory.get(server, "alice").unwrap().api_status(true),
            ApiConnectionStatus::Pending
        );
        let directory = fold(vec![(started.clone(), 1), (established.clone(), 2)]);
        assert_eq!(
            directory.get(server, "alice").unwrap().api_status(true),
            ApiConnectionStatus::Pending
        );
        let directory = fold(vec![(started, 1), (established, 2), (discovered, 3)]);
        let view = directory.get(server, "alice").unwrap();
        assert_eq!(view.api_status(true), ApiConnectionStatus::Healthy);
        assert_eq!(view.granted_scopes, vec!["issues:read".to_owned()]);
        assert_eq!(view.api_status(false), ApiConnectionStatus::Disabled);
        assert_eq!(directory.of_server(server).count(), 1);
        assert_eq!(directory.of_server(ServerId::new()).count(), 0);
    }

    #[test]
    fn one_flows_refusal_shows_pending_while_another_flow_waits() {
        let server = ServerId::new();
        let (s, u) = (server.to_string(), "alice".to_owned());
        let started = |flow: &str| {
            Event::ConnectionStarted(pb::ConnectionStarted {
                server_id: s.clone(),
                user_id: u.clone(),
                flow: flow.into(),
                ..Default::default()
            })
        };
        let refused = |flow: &str| {
            Event::ConnectionAuthFailed(pb::ConnectionAuthFailed {
                server_id: s.clone(),
                user_id: u.clone(),
                error_code: "access_denied".into(),
                flow: flow.into(),
                ..Default::default()
            })
        };
        let mut directory = fold(vec![
            (started("f1"), 1),
            (started("f2"), 2),
            (refused("f1"), 3),
        ]);
        let view = directory.get(server, "alice").unwrap();
        assert_eq!(view.api_status(true), ApiConnectionStatus::Pending);
        assert!(view.reason.is_empty());
        // It survives a checkpoint: the next refusal, of the last flow, fails it.
        directory = serde_json::from_str(&serde_json::to_string(&directory).unwrap()).unwrap();
        directory.apply(&envelope(refused("f2"), 4));
        let view = directory.get(server, "alice").unwrap();
        assert_eq!(view.api_status(true), ApiConnectionStatus::AuthError);
        assert!(view.reason.starts_with("access_denied"), "{}", view.reason);
    }

    #[test]
    fn unreachable_and_recovered_flip_the_status_and_the_reason() {
        let server = ServerId::new();
        let s = server.to_string();
        let u = "bob".to_owned();
        let directory = fold(vec![
            (
                Event::ConnectionEstablished(pb::ConnectionEstablished {
                    server_id: s.clone(),
                    user_id: u.clone(),
                    ..Default::default()
                }),
                1,
            ),
            (
                Event::ToolsDiscovered(pb::ToolsDiscovered {
                    server_id: s.clone(),
                    user_id: u.clone(),
                    ..Default::default()
                }),
                2,
            ),
            (
                Event::ConnectionUnreachable(pb::ConnectionUnreachable {
                    server_id: s.clone(),
                    user_id: u.clone(),
                    reason: "HTTP 503".into(),
                }),
                3,
            ),
        ]);
        let view = directory.get(server, "bob").unwrap();
        assert_eq!(view.api_status(true), ApiConnectionStatus::Unreachable);
        assert_eq!(view.reason, "HTTP 503");
        let mut directory = directory;
        directory.apply(&envelope(
            Event::ConnectionRecovered(pb::ConnectionRecovered {
                server_id: s.clone(),
                user_id: u.clone(),
            }),
            4,
        ));
        let view = directory.get(server, "bob").unwrap();
        assert_eq!(view.api_status(true), ApiConnectionStatus::Healthy);
        assert!(view.reason.is_empty());
        directory.apply(&envelope(
            Event::ConnectionDisconnected(pb::ConnectionDisconnected {
                server_id: s,
                user_id: u,
                ..Default::default()
            }),
            5,
        ));
        assert!(directory.get(server, "bob").is_none());
        assert!(directory.is_empty());
    }

    #[test]
    fn the_directory_survives_a_checkpoint_round_trip() {
        let server = ServerId::new();
        let directory = fold(vec![(
            Event::ConnectionStarted(pb::ConnectionStarted {
                server_id: server.to_string(),
                user_id: "carol@example.com".into(),
                ..Default::default()
            }),
            7,
        )]);
        let json = serde_json::to_vec(&directory).unwrap();
        let restored: ConnectionDirectory = serde_json::from_slice(&json).unwrap();
        assert_eq!(restored, directory);
        assert_eq!(restored.len(), 1);
    }
}
