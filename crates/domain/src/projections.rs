//! Projections: read models folded from events across aggregates. Pure `apply`; the runner in
//! `eventlog` feeds them and keeps their checkpoints.
use std::collections::{BTreeMap, HashMap};

use proto::v1::{Envelope, envelope::Event};

use crate::ServerId;

mod open_invocations;
mod tool_states;

pub use open_invocations::{
    CLAIM_WINDOW, FinishedInvocation, Located, OpenInvocation, OpenInvocations, OpenStatus,
    invocation_key,
};
pub use tool_states::{ToolStates, ToolView};

/// One server as the server list shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerSummary {
    pub id: ServerId,
    pub name: String,
    pub slug: String,
    pub description: String,
    pub url: String,
    pub catalog_entry_id: String,
    pub enabled: bool,
    /// How Switchboard's OAuth client at the server's authorization server was obtained.
    pub registration_mode: Option<crate::RegistrationMode>,
    /// The last segment of the server's own redirect URL (`None`: the shared one).
    #[serde(default)]
    pub callback_key: Option<String>,
    /// Who added the server (a user id, or a service name) and when.
    pub created_by: String,
    pub created_at: Option<std::time::SystemTime>,
    /// Who changed it last and when (the add, until something changes).
    pub updated_by: String,
    pub updated_at: Option<std::time::SystemTime>,
}

/// Every server that exists (deleted ones are dropped), by id and by slug. The Server
/// aggregate's `decide` uses it for the unique-name rule. Serialisable as a projection
/// checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerDirectory {
    servers: BTreeMap<ServerId, ServerSummary>,
    by_slug: HashMap<String, ServerId>,
}

impl ServerDirectory {
    pub fn apply(&mut self, envelope: &Envelope) {
        let Some(event) = &envelope.event else {
            return;
        };
        self.apply_event(event);
        // Who and when, from the envelope.
        let server_id = match event {
            Event::ServerAdded(e) => &e.server_id,
            Event::ServerUpdated(e) => &e.server_id,
            Event::ServerEnabled(e) => &e.server_id,
            Event::ServerDisabled(e) => &e.server_id,
            Event::ServerClientRegistered(e) => &e.server_id,
            _ => return,
        };
        let Some(server) = self.server_mut(server_id) else {
            return;
        };
        let actor = match envelope.actor.as_ref().and_then(|a| a.kind.as_ref()) {
            Some(proto::v1::actor::Kind::UserId(user)) => user.clone(),
            Some(proto::v1::actor::Kind::Service(service)) => service.clone(),
            None => String::new(),
        };
        let at = envelope
            .occurred_at
            .as_ref()
            .map(crate::time::from_timestamp);
        if matches!(event, Event::ServerAdded(_)) {
            server.created_by.clone_from(&actor);
            server.created_at = at;
        }
        server.updated_by = actor;
        server.updated_at = at;
    }

    /// Folds one event in; events that are not about servers are ignored, and so are events
    /// with a malformed server id (this version never writes one).
    pub fn apply_event(&mut self, event: &Event) {
        match event {
            Event::ServerAdded(added) => {
                let Ok(id) = ServerId::parse(&added.server_id) else {
                    return;
                };
                if let Some(previous) = self.servers.get(&id).map(|s| s.slug.clone()) {
                    self.release_slug(&previous, id);
                }
                self.by_slug.insert(added.slug.clone(), id);
                self.servers.insert(
                    id,
                    ServerSummary {
                        id,
                        name: added.name.clone(),
                        slug: added.slug.clone(),
                        description: added.description.clone(),
                        url: added.url.clone(),
                        catalog_entry_id: added.catalog_entry_id.clone(),
                        enabled: added.enabled,
                        registration_mode: added.oauth.as_ref().and_then(|oauth| {
                            crate::RegistrationMode::from_proto(oauth.registration_mode).ok()
                        }),
                        callback_key: None,
                        created_by: String::new(),
                        created_at: None,
                        updated_by: String::new(),
                        updated_at: None,
                    },
                );
            }
            Event::ServerUpdated(updated) => {
                let Some(server) = self.server_mut(&updated.server_id) else {
                    return;
                };
                if let Some(name) = &updated.name {
                    server.name.clone_from(name);
                }
                if let Some(description) = &updated.description {
                    server.description.clone_from(description);
                }
                if let Some(oauth) = &updated.oauth {
                    server.registration_mode =
                        crate::RegistrationMode::from_proto(oauth.registration_mode).ok();
                }
                if let Some(url) = &updated.url {
                    server.url.clone_from(url);
                }
                if let Some(slug) = &updated.slug {
                    let id = server.id;
                    let previous = std::mem::replace(&mut server.slug, slug.clone());
                    self.release_slug(&previous, id);
                    self.by_slug.insert(slug.clone(), id);
                }
            }
            Event::ServerEnabled(enabled) => {
                if let Some(server) = self.server_mut(&enabled.server_id) {
                    server.enabled = true;
                }
            }
            Event::ServerClientRegistered(registered) => {
                if let Some(server) = self.server_mut(&registered.server_id) {
                    server.registration_mode =
                        crate::RegistrationMode::from_proto(registered.registration_mode).ok();
                    server.callback_key =
                        Some(registered.callback_key.clone()).filter(|key| !key.is_empty());
                }
            }
            Event::ServerDisabled(disabled) => {
                if let Some(server) = self.server_mut(&disabled.server_id) {
                    server.enabled = false;
                }
            }
            Event::ServerDeleted(deleted) => {
                let Ok(id) = ServerId::parse(&deleted.server_id) else {
                    return;
                };
                if let Some(server) = self.servers.remove(&id) {
                    self.release_slug(&server.slug, id);
                }
            }
            _ => {}
        }
    }

    /// Server `id` no longer holds `slug`. If another server holds it too (two adds that raced
    /// past the unique-name check), the slug stays taken, by that server.
    fn release_slug(&mut self, slug: &str, id: ServerId) {
        if self.by_slug.get(slug) != Some(&id) {
            return;
        }
        self.by_slug.remove(slug);
        if let Some(other) = self
            .servers
            .values()
            .find(|server| server.id != id && server.slug == slug)
        {
            self.by_slug.insert(slug.to_owned(), other.id);
        }
    }

    fn server_mut(&mut self, id: &str) -> Option<&mut ServerSummary> {
        let id = ServerId::parse(id).ok()?;
        self.servers.get_mut(&id)
    }

    /// The server whose slug is `slug`, if one exists.
    pub fn slug_owner(&self, slug: &str) -> Option<ServerId> {
        self.by_slug.get(slug).copied()
    }

    pub fn get(&self, id: ServerId) -> Option<&ServerSummary> {
        self.servers.get(&id)
    }

    pub fn by_slug(&self, slug: &str) -> Option<&ServerSummary> {
        self.slug_owner(slug).and_then(|id| self.servers.get(&id))
    }

    /// Every server, oldest first (ids are UUIDv7).
    pub fn iter(&self) -> impl Iterator<Item = &ServerSummary> {
        self.servers.values()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proto::v1 as pb;

    use super::*;

    fn added(id: ServerId, slug: &str) -> Event {
        Event::ServerAdded(pb::ServerAdded {
            server_id: id.to_string(),
            name: slug.to_uppercase(),
            slug: slug.into(),
            enabled: true,
            ..Default::default()
        })
    }

    #[test]
    fn directory_follows_adds_renames_disables_and_deletes() {
        let github = ServerId::new();
        let jira = ServerId::new();
        let mut directory = ServerDirectory::default();
        for event in [
            added(github, "github"),
            added(jira, "jira"),
            Event::ServerUpdated(pb::ServerUpdated {
                server_id: github.to_string(),
                name: Some("GitHub Prod".into()),
                slug: Some("github_prod".into()),
                ..Default::default()
            }),
            Event::ServerDisabled(pb::ServerDisabled {
                server_id: jira.to_string(),
                reason: String::new(),
            }),
        ] {
            directory.apply(&Envelope {
                event: Some(event),
                ..Default::default()
            });
        }
        assert_eq!(directory.slug_owner("github"), None);
        assert_eq!(directory.slug_owner("github_prod"), Some(github));
        assert_eq!(
            directory.get(github).map(|s| s.name.as_str()),
            Some("GitHub Prod")
        );
        assert_eq!(directory.by_slug("jira").map(|s| s.enabled), Some(false));
        let ids: Vec<ServerId> = directory.iter().map(|s| s.id).collect();
        assert_eq!(ids, [github, jira], "oldest first");

        directory.apply_event(&Event::ServerDeleted(pb::ServerDeleted {
            server_id: jira.to_string(),
            ..Default::default()
        }));
        assert_eq!(directory.slug_owner("jira"), None);
        assert_eq!(directory.len(), 1);
        // Events for unknown or malformed ids change nothing.
        directory.apply_event(&Event::ServerEnabled(pb::ServerEnabled {
            server_id: "nope".into(),
        }));
        directory.apply_event(&Event::ServerDeleted(pb::ServerDeleted {
            server_id: jira.to_string(),
            ..Default::default()
        }));
        assert_eq!(directory.len(), 1);
    }

    #[test]
    fn the_directory_records_who_added_and_changed_a_server_and_when() {
        let id = ServerId::new();
        let by = |user: &str, seconds: i64, event: Event| Envelope {
            actor: Some(pb::Actor {
                kind: Some(pb::actor::Kind::UserId(user.into())),
            }),
            occurred_at: Some(proto::Timestamp { seconds, nanos: 0 }),
            event: Some(event),
            ..Default::default()
        };
        let mut directory = ServerDirectory::default();
        let mut first = added(id, "github");
        if let Event::ServerAdded(added) = &mut first {
            added.oauth = Some(pb::OAuthSettings {
                registration_mode: pb::RegistrationMode::Dynamic as i32,
                ..Default::default()
            });
        }
        directory.apply(&by("ada@example.com", 100, first));
        directory.apply(&by(
            "bob@example.com",
            200,
            Event::ServerDisabled(pb::ServerDisabled {
                server_id: id.to_string(),
                reason: String::new(),
            }),
        ));
        let server = directory.get(id).expect("server");
        let at = |s: u64| Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(
            (server.created_by.as_str(), server.created_at),
            ("ada@example.com", at(100))
        );
        assert_eq!(
            (server.updated_by.as_str(), server.updated_at),
            ("bob@example.com", at(200))
        );
        assert_eq!(
            server.registration_mode,
            Some(crate::RegistrationMode::DynamicRegistration)
        );
        assert!(!server.enabled);
    }

    #[test]
    fn a_snapshot_restores_the_same_directory() {
        let mut directory = ServerDirectory::default();
        let [first, second] = [(); 2].map(|()| ServerId::new());
        directory.apply_event(&added(first, "github"));
        directory.apply_event(&added(second, "github"));
        let snapshot = serde_json::to_vec(&directory).expect("encodes");
        let restored: ServerDirectory = serde_json::from_slice(&snapshot).expect("decodes");
        assert_eq!(restored, directory);
        assert_eq!(restored.slug_owner("github"), Some(second));
    }

    #[test]
    fn a_slug_stays_taken_while_any_server_holds_it() {
        // Adds that raced past the unique-name check (the directory lags the log) leave two
        // servers with one slug; the slug is free only once neither holds it.
        let [first, second, third, fourth] = [(); 4].map(|()| ServerId::new());
        let mut directory = ServerDirectory::default();
        for (id, slug) in [
            (first, "github"),
            (second, "github"),
            (third, "jira"),
            (fourth, "jira"),
        ] {
            directory.apply_event(&added(id, slug));
        }
        directory.apply_event(&Event::ServerDeleted(pb::ServerDeleted {
            server_id: first.to_string(),
            ..Default::default()
        }));
        assert_eq!(directory.slug_owner("github"), Some(second));
        directory.apply_event(&Event::ServerDeleted(pb::ServerDeleted {
            server_id: second.to_string(),
            ..Default::default()
        }));
        assert_eq!(directory.slug_owner("github"), None);
        directory.apply_event(&Event::ServerUpdated(pb::ServerUpdated {
            server_id: fourth.to_string(),
            slug: Some("gitlab".into()),
            ..Default::default()
        }));
        assert_eq!(directory.slug_owner("jira"), Some(third));
        assert_eq!(directory.slug_owner("gitlab"), Some(fourth));
    }
}
