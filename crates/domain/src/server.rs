//! The Server aggregate: one configured MCP server (subject `server.<server_id>`).
//!
//! Rules: a name is unique across servers (after slugging); an update records only what
//! changed; enabling an enabled (disabling a disabled) server records nothing; a deleted server
//! refuses every command; a client registration records a vault reference, never a secret.
use std::time::SystemTime;

use proto::v1::{self as pb, envelope::Event};

use crate::projections::ServerDirectory;
use crate::time::to_timestamp;
use crate::{
    Aggregate, AuthorizationServer, CallbackKey, ClientId, DomainError, OAuthSettings,
    RegistrationMode, SecretRef, ServerDescription, ServerId, ServerName, ServerUrl,
};

/// Where a server is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerLifecycle {
    /// No events yet.
    #[default]
    Absent,
    Active,
    Deleted,
}

/// A server as its events describe it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerState {
    lifecycle: ServerLifecycle,
    /// The current configuration, in the shape of `ServerAdded` with every update applied.
    current: pb::ServerAdded,
    client: Option<pb::ServerClientRegistered>,
}

impl ServerState {
    pub fn lifecycle(&self) -> ServerLifecycle {
        self.lifecycle
    }

    pub fn is_enabled(&self) -> bool {
        self.lifecycle == ServerLifecycle::Active && self.current.enabled
    }

    pub fn name(&self) -> &str {
        &self.current.name
    }

    pub fn slug(&self) -> &str {
        &self.current.slug
    }

    pub fn description(&self) -> &str {
        &self.current.description
    }

    pub fn url(&self) -> &str {
        &self.current.url
    }

    pub fn catalog_entry_id(&self) -> &str {
        &self.current.catalog_entry_id
    }

    pub fn oauth(&self) -> Option<&pb::OAuthSettings> {
        self.current.oauth.as_ref()
    }

    /// The OAuth client Switchboard has at the server's authorization server, if any.
    pub fn client_registration(&self) -> Option<&pb::ServerClientRegistered> {
        self.client.as_ref()
    }
}

impl Aggregate for ServerState {
    fn apply(&mut self, event: &Event) {
        match event {
            Event::ServerAdded(added) => {
                self.lifecycle = ServerLifecycle::Active;
                self.current = added.clone();
            }
            Event::ServerUpdated(updated) => {
                let current = &mut self.current;
                if let Some(name) = &updated.name {
                    current.name.clone_from(name);
                }
                if let Some(slug) = &updated.slug {
                    current.slug.clone_from(slug);
                }
                if let Some(description) = &updated.description {
                    current.description.clone_from(description);
                }
                if let Some(url) = &updated.url {
                    current.url.clone_from(url);
                }
                if let Some(oauth) = &updated.oauth {
                    current.oauth = Some(oauth.clone());
                }
            }
            Event::ServerEnabled(_) => self.current.enabled = true,
            Event::ServerDisabled(_) => self.current.enabled = false,
            Event::ServerDeleted(_) => self.lifecycle = ServerLifecycle::Deleted,
            Event::ServerClientRegistered(registered) => self.client = Some(registered.clone()),
            _ => {}
        }
    }
}

/// What an admin (or the catalog service) asks of a server.
#[derive(Debug, Clone)]
pub enum ServerCommand {
    AddServer(AddServer),
    UpdateServer(UpdateServer),
    EnableServer,
    DisableServer {
        reason: String,
    },
    DeleteServer,
    /// Boxed: it is by far the largest command.
    RecordClientRegistration(Box<ClientRegistration>),
    /// An admin replaces a pre-registered client's id and/or secret (the secret's new vault
    /// reference). Clients registered automatically are not the admin's to edit.
    ReplaceClientCredentials {
        client_id: Option<ClientId>,
        client_secret_ref: Option<SecretRef>,
        /// How the client authenticates once it has a secret, for a client registered
        /// without one (`none`): the provider's documented method (a catalog template's), or
        /// `None` to choose from what the authorization server publishes.
        auth_method_with_secret: Option<&'static str>,
    },
}

#[derive(Debug, Clone)]
pub struct AddServer {
    pub name: ServerName,
    pub description: ServerDescription,
    pub url: ServerUrl,
    /// The catalog entry the server was created from; `None` for a custom URL.
    pub catalog_entry_id: Option<String>,
    pub oauth: OAuthSettings,
    pub enabled: bool,
}

/// The fields to set; `None` leaves a field as it is. There is no URL: a server's URL never
/// changes after it is added (its connections, tokens and tool settings belong to that URL,
/// the RFC 8707 `resource` its tokens were issued for). A request to change it is refused with
/// [`DomainError::ServerUrlImmutable`]; older `ServerUpdated` events that carry a URL still fold.
#[derive(Debug, Clone, Default)]
pub struct UpdateServer {
    pub name: Option<ServerName>,
    pub description: Option<ServerDescription>,
    pub oauth: Option<OAuthSettings>,
}

/// An OAuth client obtained at the server's authorization server. It has no field for the
/// client secret: the secret goes to the vault, and only its vault name comes here.
#[derive(Debug, Clone)]
pub struct ClientRegistration {
    pub registration_mode: RegistrationMode,
    pub client_id: ClientId,
    pub client_secret_ref: Option<SecretRef>,
    pub client_secret_expires_at: Option<SystemTime>,
    pub authorization_server: AuthorizationServer,
    /// RFC 9728 protected resource identifier (the RFC 8707 `resource` parameter).
    pub resource: String,
    /// `none`, `client_secret_basic` or `client_secret_post` (RFC 7591).
    pub token_endpoint_auth_method: String,
    /// The server's own redirect URL's last segment (`None`: the shared callback, as for a
    /// client ID metadata document, whose one document serves every server).
    pub callback_key: Option<CallbackKey>,
}

/// Longest reason an admin may give for disabling a server (users see it).
pub const MAX_DISABLE_REASON_CHARS: usize = 500;

/// Decides a command for the server `id`. `directory` is the current server list, for the
/// unique-name rule.
pub fn decide(
    state: &ServerState,
    id: ServerId,
    command: ServerCommand,
    directory: &ServerDirectory,
) -> Result<Vec<Event>, DomainError> {
    let server_id = || id.to_string();
    match (state.lifecycle, command) {
        (ServerLifecycle::Active, ServerCommand::AddServer(_)) => {
            Err(DomainError::ServerAlreadyExists)
        }
        (ServerLifecycle::Deleted, _) => Err(DomainError::ServerDeleted),
        (ServerLifecycle::Absent, ServerCommand::AddServer(add)) => {
            let slug = add.name.slug();
            ensure_slug_free(directory, &slug, id)?;
            Ok(vec![Event::ServerAdded(pb::ServerAdded {
                server_id: server_id(),
                name: add.name.as_str().to_owned(),
                slug: slug.as_str().to_owned(),
                description: add.description.as_str().to_owned(),
                url: add.url.as_str().to_owned(),
                catalog_entry_id: add.catalog_entry_id.unwrap_or_default(),
                oauth: Some(add.oauth.to_proto()),
                enabled: add.enabled,
            })])
        }
        (ServerLifecycle::Absent, _) => Err(DomainError::ServerNotFound),
        (ServerLifecycle::Active, ServerCommand::UpdateServer(update)) => {
            let current = &state.current;
            let mut changed = pb::ServerUpdated {
                server_id: server_id(),
                ..Default::default()
            };
            if let Some(name) = update.name.filter(|n| n.as_str() != current.name) {
                let slug = name.slug();
                if slug.as_str() != current.slug {
                    ensure_slug_free(directory, &slug, id)?;
                    changed.slug = Some(slug.as_str().to_owned());
                }
                changed.name = Some(name.as_str().to_owned());
                changed.previous_name = Some(current.name.clone());
            }
            changed.description = update
                .description
                .filter(|d| d.as_str() != current.description)
                .map(|d| d.as_str().to_owned());
            changed.previous_description = changed
                .description
                .as_ref()
                .map(|_| current.description.clone());
            changed.oauth = update
                .oauth
                .map(|o| o.to_proto())
                .filter(|o| Some(o) != current.oauth.as_ref());
            let nothing_changed =
                changed.name.is_none() && changed.description.is_none() && changed.oauth.is_none();
            if nothing_changed {
                Ok(vec![])
            } else {
                Ok(vec![Event::ServerUpdated(changed)])
            }
        }
        (ServerLifecycle::Active, ServerCommand::EnableServer) => {
            if state.current.enabled {
                Ok(vec![])
            } else {
                Ok(vec![Event::ServerEnabled(pb::ServerEnabled {
                    server_id: server_id(),
                })])
            }
        }
        (ServerLifecycle::Active, ServerCommand::DisableServer { reason }) => {
            if reason.chars().count() > MAX_DISABLE_REASON_CHARS
                || reason.chars().any(|c| c.is_control() && c != '\n')
            {
                return Err(DomainError::DisableReasonInvalid {
                    max: MAX_DISABLE_REASON_CHARS,
                });
            }
            if state.current.enabled {
                Ok(vec![Event::ServerDisabled(pb::ServerDisabled {
                    server_id: server_id(),
                    reason,
                })])
            } else {
                Ok(vec![])
            }
        }
        (ServerLifecycle::Active, ServerCommand::DeleteServer) => {
            Ok(vec![Event::ServerDeleted(pb::ServerDeleted {
                server_id: server_id(),
                name: state.current.name.clone(),
            })])
        }
        (
            ServerLifecycle::Active,
            ServerCommand::ReplaceClientCredentials {
                client_id,
                client_secret_ref,
                auth_method_with_secret,
            },
        ) => replace_client_credentials(
            state,
            server_id(),
            client_id,
            client_secret_ref,
            auth_method_with_secret,
        ),
        (ServerLifecycle::Active, ServerCommand::RecordClientRegistration(registration)) => {
            let registered = pb::ServerClientRegistered {
                server_id: server_id(),
                registration_mode: registration.registration_mode.to_proto() as i32,
                client_id: registration.client_id.as_str().to_owned(),
                client_secret_ref: registration
                    .client_secret_ref
                    .map(|r| r.as_str().to_owned())
                    .unwrap_or_default(),
                client_secret_expires_at: registration.client_secret_expires_at.map(to_timestamp),
                authorization_server: Some(registration.authorization_server.to_proto()),
                resource: registration.resource,
                token_endpoint_auth_method: registration.token_endpoint_auth_method,
                callback_key: registration
                    .callback_key
                    .map(|key| key.as_str().to_owned())
                    .unwrap_or_default(),
            };
            if state.client.as_ref() == Some(&registered) {
                Ok(vec![])
            } else {
                Ok(vec![Event::ServerClientRegistered(registered)])
            }
        }
    }
}

/// A pre-registered client's new credentials: `ServerUpdated` with the client id its OAuth
/// settings carry (when the id changes), and the registration with the new id and secret
/// reference (when anything changes).
fn replace_client_credentials(
    state: &ServerState,
    server_id: String,
    client_id: Option<ClientId>,
    client_secret_ref: Option<SecretRef>,
    auth_method_with_secret: Option<&'static str>,
) -> Result<Vec<Event>, DomainError> {
    let current = state
        .client
        .as_ref()
        .filter(|c| c.registration_mode == pb::RegistrationMode::Preconfigured as i32)
        .ok_or(DomainError::ClientCredentialsNotEditable)?;
    let mut registered = current.clone();
    if let Some(client_id) = client_id {
        registered.client_id = client_id.as_str().to_owned();
    }
    if let Some(secret_ref) = client_secret_ref {
        registered.client_secret_ref = secret_ref.as_str().to_owned();
        // A client registered without a secret sends none (`none`, or empty in events that
        // left the default): a secret is no use unless it is sent.
        if matches!(registered.token_endpoint_auth_method.as_str(), "none" | "") {
            let published = registered
                .authorization_server
                .as_ref()
                .map_or(&[][..], |server| {
                    &server.token_endpoint_auth_methods_supported[..]
                });
            registered.token_endpoint_auth_method = auth_method_with_secret
                .unwrap_or_else(|| crate::client_authentication_method(published, true))
                .to_owned();
        }
    }
    let mut events = Vec::new();
    if registered.client_id != current.client_id {
        let mut oauth = state.current.oauth.clone().unwrap_or_default();
        oauth.client_id.clone_from(&registered.client_id);
        events.push(Event::ServerUpdated(pb::ServerUpdated {
            server_id,
            oauth: Some(oauth),
            ..Default::default()
        }));
    }
    if registered != *current {
        events.push(Event::ServerClientRegistered(registered));
    }
    Ok(events)
}

fn ensure_slug_free(
    directory: &ServerDirectory,
    slug: &crate::Slug,
    id: ServerId,
) -> Result<(), DomainError> {
    match directory.slug_owner(slug.as_str()) {
        Some(owner) if owner != id => Err(DomainError::ServerNameTaken {
            slug: slug.as_str().to_owned(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::testing::Scenario;
    use crate::{UrlPolicy, server_url::ServerUrl};

    fn add(name: &str) -> AddServer {
        AddServer {
            name: ServerName::parse(name).unwrap(),
            description: ServerDescription::parse("Issues and pull requests").unwrap(),
            url: ServerUrl::parse("https://api.githubcopilot.com/mcp", UrlPolicy::STRICT).unwrap(),
            catalog_entry_id: Some("github".into()),
            oauth: OAuthSettings::new(["repo"], RegistrationMode::DynamicRegistration, None)
                .unwrap(),
            enabled: true,
        }
    }

    fn added(id: ServerId, name: &str, slug: &str) -> Event {
        Event::ServerAdded(pb::ServerAdded {
            server_id: id.to_string(),
            name: name.into(),
            slug: slug.into(),
            description: "Issues and pull requests".into(),
            url: "https://api.githubcopilot.com/mcp".into(),
            catalog_entry_id: "github".into(),
            oauth: Some(pb::OAuthSettings {
                scopes: vec!["repo".into()],
                registration_mode: pb::RegistrationMode::Dynamic as i32,
                client_id: String::new(),
            }),
            enabled: true,
        })
    }

    fn directory(events: &[Event]) -> ServerDirectory {
        let mut directory = ServerDirectory::default();
        for event in events {
            directory.apply_event(event);
        }
        directory
    }

    fn no_directory() -> ServerDirectory {
        ServerDirectory::default()
    }

    fn update() -> UpdateServer {
        UpdateServer::default()
    }

    #[test]
    fn adding_a_server_records_its_configuration() {
        let id = ServerId::new();
        let state = Scenario::<ServerState>::given([])
            .when(|s| {
                decide(
                    s,
                    id,
                    ServerCommand::AddServer(add("Production GitHub")),
                    &no_directory(),
                )
            })
            .then([added(id, "Production GitHub", "production_github")]);
        assert_eq!(state.lifecycle(), ServerLifecycle::Active);
        assert!(state.is_enabled());
        assert_eq!(state.slug(), "production_github");
    }

    #[test]
    fn server_name_must_be_unique_across_servers() {
        let other = ServerId::new();
        let directory = directory(&[added(other, "GitHub", "github")]);
        let id = ServerId::new();
        Scenario::<ServerState>::given([])
            .when(|s| decide(s, id, ServerCommand::AddServer(add("GitHub")), &directory))
            .then_error("server_name_taken");
    }

    #[test]
    fn server_name_uniqueness_is_case_insensitive_after_slugging() {
        let other = ServerId::new();
        let directory = directory(&[added(other, "Production GitHub", "production_github")]);
        let id = ServerId::new();
        for name in [
            "production github",
            "PRODUCTION-GITHUB",
            "Production_GitHub",
        ] {
            Scenario::<ServerState>::given([])
                .when(|s| decide(s, id, ServerCommand::AddServer(add(name)), &directory))
                .then_error("server_name_taken");
        }
    }

    #[test]
    fn a_deleted_servers_name_can_be_used_again() {
        let other = ServerId::new();
        let directory = directory(&[
            added(other, "GitHub", "github"),
            Event::ServerDeleted(pb::ServerDeleted {
                server_id: other.to_string(),
                ..Default::default()
            }),
        ]);
        let id = ServerId::new();
        Scenario::<ServerState>::given([])
            .when(|s| decide(s, id, ServerCommand::AddServer(add("GitHub")), &directory))
            .then([added(id, "GitHub", "github")]);
    }

    #[test]
    fn adding_an_existing_server_is_refused() {
        let id = ServerId::new();
        Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| {
                decide(
                    s,
                    id,
                    ServerCommand::AddServer(add("GitHub")),
                    &no_directory(),
                )
            })
            .then_error("server_already_exists");
    }

    #[test]
    fn commands_for_an_unknown_server_are_refused() {
        let id = ServerId::new();
        for command in [
            ServerCommand::EnableServer,
            ServerCommand::DisableServer { reason: "x".into() },
            ServerCommand::DeleteServer,
            ServerCommand::UpdateServer(update()),
        ] {
            Scenario::<ServerState>::given([])
                .when(|s| decide(s, id, command, &no_directory()))
                .then_error("server_not_found");
        }
    }

    #[test]
    fn update_records_only_the_fields_that_changed() {
        let id = ServerId::new();
        let command = UpdateServer {
            name: Some(ServerName::parse("GitHub").unwrap()),
            description: Some(ServerDescription::parse("Code, issues and PRs").unwrap()),
            oauth: Some(
                OAuthSettings::new(["repo"], RegistrationMode::DynamicRegistration, None).unwrap(),
            ),
        };
        let state = Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, ServerCommand::UpdateServer(command), &no_directory()))
            .then([Event::ServerUpdated(pb::ServerUpdated {
                server_id: id.to_string(),
                description: Some("Code, issues and PRs".into()),
                previous_description: Some("Issues and pull requests".into()),
                ..Default::default()
            })]);
        assert_eq!(state.description(), "Code, issues and PRs");
        assert_eq!(state.name(), "GitHub");
    }

    #[test]
    fn renaming_records_the_new_slug_only_when_it_changes() {
        let id = ServerId::new();
        let rename = |name: &str| {
            ServerCommand::UpdateServer(UpdateServer {
                name: Some(ServerName::parse(name).unwrap()),
                ..update()
            })
        };
        // Same slug, different spelling: only the name.
        Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, rename("Github"), &no_directory()))
            .then([Event::ServerUpdated(pb::ServerUpdated {
                server_id: id.to_string(),
                name: Some("Github".into()),
                previous_name: Some("GitHub".into()),
                ..Default::default()
            })]);
        let state = Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, rename("GitHub Prod"), &no_directory()))
            .then([Event::ServerUpdated(pb::ServerUpdated {
                server_id: id.to_string(),
                name: Some("GitHub Prod".into()),
                slug: Some("github_prod".into()),
                previous_name: Some("GitHub".into()),
                ..Default::default()
            })]);
        assert_eq!(state.slug(), "github_prod");
    }

    #[test]
    fn renaming_to_a_taken_name_is_refused_but_keeping_ones_own_is_not() {
        let id = ServerId::new();
        let other = ServerId::new();
        let history = [added(id, "GitHub", "github")];
        let directory = directory(&[history[0].clone(), added(other, "Jira", "jira")]);
        let rename = |name: &str| {
            ServerCommand::UpdateServer(UpdateServer {
                name: Some(ServerName::parse(name).unwrap()),
                ..update()
            })
        };
        Scenario::<ServerState>::given(history.clone())
            .when(|s| decide(s, id, rename("JIRA"), &directory))
            .then_error("server_name_taken");
        Scenario::<ServerState>::given(history)
            .when(|s| decide(s, id, rename("GITHUB"), &directory))
            .then([Event::ServerUpdated(pb::ServerUpdated {
                server_id: id.to_string(),
                name: Some("GITHUB".into()),
                previous_name: Some("GitHub".into()),
                ..Default::default()
            })]);
    }

    #[test]
    fn update_without_changes_records_nothing() {
        let id = ServerId::new();
        Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| {
                decide(
                    s,
                    id,
                    ServerCommand::UpdateServer(update()),
                    &no_directory(),
                )
            })
            .then_nothing();
        let same = UpdateServer {
            name: Some(ServerName::parse("GitHub").unwrap()),
            ..update()
        };
        Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, ServerCommand::UpdateServer(same), &no_directory()))
            .then_nothing();
    }

    #[test]
    fn a_url_change_recorded_by_an_older_version_still_folds() {
        // Earlier versions could record a URL change; history keeps its meaning.
        let id = ServerId::new();
        let state = ServerState::from_events(&[
            added(id, "GitHub", "github"),
            Event::ServerUpdated(pb::ServerUpdated {
                server_id: id.to_string(),
                url: Some("https://mcp.example.com/v2".into()),
                ..Default::default()
            }),
        ]);
        assert_eq!(state.url(), "https://mcp.example.com/v2");
        assert_eq!(
            DomainError::ServerUrlImmutable.code(),
            "server_url_immutable"
        );
    }

    #[test]
    fn enabling_and_disabling_are_idempotent() {
        let id = ServerId::new();
        let enabled = [added(id, "GitHub", "github")];
        Scenario::<ServerState>::given(enabled.clone())
            .when(|s| decide(s, id, ServerCommand::EnableServer, &no_directory()))
            .then_nothing();
        let state = Scenario::<ServerState>::given(enabled.clone())
            .when(|s| {
                let reason = "maintenance".to_owned();
                decide(
                    s,
                    id,
                    ServerCommand::DisableServer { reason },
                    &no_directory(),
                )
            })
            .then([Event::ServerDisabled(pb::ServerDisabled {
                server_id: id.to_string(),
                reason: "maintenance".into(),
            })]);
        assert!(!state.is_enabled());

        let disabled = [
            enabled[0].clone(),
            Event::ServerDisabled(pb::ServerDisabled {
                server_id: id.to_string(),
                reason: String::new(),
            }),
        ];
        Scenario::<ServerState>::given(disabled.clone())
            .when(|s| {
                let reason = "again".to_owned();
                decide(
                    s,
                    id,
                    ServerCommand::DisableServer { reason },
                    &no_directory(),
                )
            })
            .then_nothing();
        let state = Scenario::<ServerState>::given(disabled)
            .when(|s| decide(s, id, ServerCommand::EnableServer, &no_directory()))
            .then([Event::ServerEnabled(pb::ServerEnabled {
                server_id: id.to_string(),
            })]);
        assert!(state.is_enabled());
    }

    #[test]
    fn deleted_server_refuses_every_command() {
        let id = ServerId::new();
        let state = Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, ServerCommand::DeleteServer, &no_directory()))
            .then([Event::ServerDeleted(pb::ServerDeleted {
                server_id: id.to_string(),
                name: "GitHub".into(),
            })]);
        assert_eq!(state.lifecycle(), ServerLifecycle::Deleted);
        assert!(!state.is_enabled());

        let history = [
            added(id, "GitHub", "github"),
            Event::ServerDeleted(pb::ServerDeleted {
                server_id: id.to_string(),
                ..Default::default()
            }),
        ];
        for command in [
            ServerCommand::AddServer(add("GitHub")),
            ServerCommand::UpdateServer(update()),
            ServerCommand::EnableServer,
            ServerCommand::DisableServer { reason: "x".into() },
            ServerCommand::DeleteServer,
            ServerCommand::RecordClientRegistration(Box::new(registration())),
            ServerCommand::ReplaceClientCredentials {
                client_id: None,
                client_secret_ref: None,
                auth_method_with_secret: None,
            },
        ] {
            Scenario::<ServerState>::given(history.clone())
                .when(|s| decide(s, id, command, &no_directory()))
                .then_error("server_deleted");
        }
    }

    fn registration() -> ClientRegistration {
        let url = |u: &str| ServerUrl::parse(u, UrlPolicy::STRICT).unwrap();
        ClientRegistration {
            registration_mode: RegistrationMode::DynamicRegistration,
            client_id: ClientId::parse("client-123").unwrap(),
            client_secret_ref: Some(SecretRef::parse("client_secret/github").unwrap()),
            client_secret_expires_at: Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
            authorization_server: AuthorizationServer {
                issuer: "https://github.com/login/oauth".into(),
                authorization_endpoint: url("https://github.com/login/oauth/authorize"),
                token_endpoint: url("https://github.com/login/oauth/access_token"),
                revocation_endpoint: None,
                registration_endpoint: Some(url("https://github.com/login/oauth/register")),
                scopes_supported: vec!["repo".into()],
                code_challenge_methods_supported: vec!["S256".into()],
                authorization_response_iss_parameter_supported: false,
                token_endpoint_auth_methods_supported: vec![],
            },
            resource: "https://api.githubcopilot.com/mcp".into(),
            token_endpoint_auth_method: "client_secret_basic".into(),
            callback_key: None,
        }
    }

    #[test]
    fn client_registration_records_a_vault_reference_never_a_secret() {
        let id = ServerId::new();
        let (events, state) = Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| {
                let command = ServerCommand::RecordClientRegistration(Box::new(registration()));
                decide(s, id, command, &no_directory())
            })
            .then_events();
        let [Event::ServerClientRegistered(registered)] = events.as_slice() else {
            panic!("expected one ServerClientRegistered, got {events:?}");
        };
        assert_eq!(registered.client_id, "client-123");
        assert_eq!(registered.client_secret_ref, "client_secret/github");
        assert_eq!(
            registered.client_secret_expires_at.map(|t| t.seconds),
            Some(1_800_000_000)
        );
        assert_eq!(
            registered
                .authorization_server
                .as_ref()
                .map(|a| a.token_endpoint.as_str()),
            Some("https://github.com/login/oauth/access_token")
        );
        assert_eq!(state.client_registration(), Some(registered));
    }

    #[test]
    fn a_secret_given_to_a_client_without_one_is_sent_as_its_server_publishes() {
        let id = ServerId::new();
        let given = |method: &str, published: &[&str]| {
            let mut registration = registration();
            registration.registration_mode = RegistrationMode::Preconfigured;
            registration.client_secret_ref = None;
            registration.token_endpoint_auth_method = method.into();
            registration
                .authorization_server
                .token_endpoint_auth_methods_supported =
                published.iter().map(|m| (*m).to_owned()).collect();
            let mut history = vec![added(id, "GitHub", "github")];
            history.extend(
                decide(
                    &ServerState::from_events(&history),
                    id,
                    ServerCommand::RecordClientRegistration(Box::new(registration)),
                    &no_directory(),
                )
                .unwrap(),
            );
            history
        };
        let method_after = |history: Vec<Event>, template: Option<&'static str>| {
            let command = ServerCommand::ReplaceClientCredentials {
                client_id: None,
                client_secret_ref: Some(SecretRef::parse("server/x/2").unwrap()),
                auth_method_with_secret: template,
            };
            let (events, _) = Scenario::<ServerState>::given(history)
                .when(|s| decide(s, id, command, &no_directory()))
                .then_events();
            match events.as_slice() {
                [Event::ServerClientRegistered(registered)] => {
                    registered.token_endpoint_auth_method.clone()
                }
                other => panic!("expected one ServerClientRegistered, got {other:?}"),
            }
        };
        assert_eq!(
            method_after(given("none", &["client_secret_post"]), None),
            "client_secret_post"
        );
        assert_eq!(
            method_after(given("", &["client_secret_post", "none"]), None),
            "client_secret_post",
            "an empty method is a client without a secret too"
        );
        assert_eq!(
            method_after(given("none", &[]), None),
            "client_secret_basic"
        );
        assert_eq!(
            method_after(
                given("none", &["client_secret_post"]),
                Some("client_secret_basic")
            ),
            "client_secret_basic",
            "the provider's documented method wins"
        );
    }

    #[test]
    fn only_a_pre_registered_clients_credentials_are_replaced() {
        let id = ServerId::new();
        let registered = |mode: RegistrationMode| {
            let mut registration = registration();
            registration.registration_mode = mode;
            let command = ServerCommand::RecordClientRegistration(Box::new(registration));
            decide(
                &ServerState::from_events(&[added(id, "GitHub", "github")]),
                id,
                command,
                &no_directory(),
            )
            .unwrap()
        };
        let replace = |client_id: Option<&str>, secret: Option<&str>| {
            ServerCommand::ReplaceClientCredentials {
                client_id: client_id.map(|c| ClientId::parse(c).unwrap()),
                client_secret_ref: secret.map(|r| SecretRef::parse(r).unwrap()),
                auth_method_with_secret: Some("client_secret_post"),
            }
        };
        let dynamic = [
            vec![added(id, "GitHub", "github")],
            registered(RegistrationMode::DynamicRegistration),
        ]
        .concat();
        Scenario::<ServerState>::given(dynamic)
            .when(|s| decide(s, id, replace(Some("mine"), None), &no_directory()))
            .then_error("client_credentials_not_editable");
        Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| decide(s, id, replace(Some("mine"), None), &no_directory()))
            .then_error("client_credentials_not_editable");

        let preconfigured = [
            vec![added(id, "GitHub", "github")],
            registered(RegistrationMode::Preconfigured),
        ]
        .concat();
        // A new secret only: the registration names its new vault entry.
        let (events, _) = Scenario::<ServerState>::given(preconfigured.clone())
            .when(|s| decide(s, id, replace(None, Some("server/x/2")), &no_directory()))
            .then_events();
        let [Event::ServerClientRegistered(registered)] = events.as_slice() else {
            panic!("expected one ServerClientRegistered, got {events:?}");
        };
        assert_eq!(
            (
                registered.client_id.as_str(),
                registered.client_secret_ref.as_str()
            ),
            ("client-123", "server/x/2")
        );
        // A new client id: the OAuth settings and the registration both change.
        let (events, state) = Scenario::<ServerState>::given(preconfigured.clone())
            .when(|s| decide(s, id, replace(Some("client-789"), None), &no_directory()))
            .then_events();
        assert!(
            matches!(
                &events[..],
                [Event::ServerUpdated(_), Event::ServerClientRegistered(_)]
            ),
            "{events:?}"
        );
        assert_eq!(
            state.oauth().map(|o| o.client_id.as_str()),
            Some("client-789")
        );
        // A client registered without a secret (`none`) gets one: it is sent from now on,
        // the way the command says (the provider's, or the common default).
        let without_secret = {
            let mut registration = registration();
            registration.registration_mode = RegistrationMode::Preconfigured;
            registration.client_secret_ref = None;
            registration.token_endpoint_auth_method = "none".into();
            registration.callback_key = Some(CallbackKey::for_authorization_server(
                "https://github.com/login/oauth",
                "https://github.com/login/oauth/access_token",
            ));
            let command = ServerCommand::RecordClientRegistration(Box::new(registration));
            let state = ServerState::from_events(&[added(id, "GitHub", "github")]);
            [
                vec![added(id, "GitHub", "github")],
                decide(&state, id, command, &no_directory()).unwrap(),
            ]
            .concat()
        };
        let (events, _) = Scenario::<ServerState>::given(without_secret.clone())
            .when(|s| decide(s, id, replace(None, Some("server/x/3")), &no_directory()))
            .then_events();
        let [Event::ServerClientRegistered(registered)] = events.as_slice() else {
            panic!("expected one ServerClientRegistered, got {events:?}");
        };
        assert_eq!(registered.token_endpoint_auth_method, "client_secret_post");
        assert!(
            registered.callback_key.starts_with("github.com-"),
            "new credentials keep the redirect URL the provider knows: {registered:?}"
        );
        // A new client id alone leaves it without a secret, so `none` stays.
        let (events, _) = Scenario::<ServerState>::given(without_secret)
            .when(|s| decide(s, id, replace(Some("client-9"), None), &no_directory()))
            .then_events();
        let Some(Event::ServerClientRegistered(registered)) = events.last() else {
            panic!("expected a ServerClientRegistered, got {events:?}");
        };
        assert_eq!(registered.token_endpoint_auth_method, "none");
        // The same credentials again: nothing.
        Scenario::<ServerState>::given(preconfigured)
            .when(|s| {
                decide(
                    s,
                    id,
                    replace(Some("client-123"), Some("client_secret/github")),
                    &no_directory(),
                )
            })
            .then_nothing();
    }

    #[test]
    fn replayed_client_registration_records_nothing() {
        let id = ServerId::new();
        let (events, _) = Scenario::<ServerState>::given([added(id, "GitHub", "github")])
            .when(|s| {
                let command = ServerCommand::RecordClientRegistration(Box::new(registration()));
                decide(s, id, command, &no_directory())
            })
            .then_events();
        let history = [added(id, "GitHub", "github"), events[0].clone()];
        Scenario::<ServerState>::given(history.clone())
            .when(|s| {
                let command = ServerCommand::RecordClientRegistration(Box::new(registration()));
                decide(s, id, command, &no_directory())
            })
            .then_nothing();
        let mut renewed = registration();
        renewed.client_id = ClientId::parse("client-456").unwrap();
        let (events, _) = Scenario::<ServerState>::given(history)
            .when(|s| {
                let command = ServerCommand::RecordClientRegistration(Box::new(renewed));
                decide(s, id, command, &no_directory())
            })
            .then_events();
        assert_eq!(events.len(), 1, "a new client is recorded");
    }
}
