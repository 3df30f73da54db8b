//! The connection service: its parts, its settings, and what every command needs — the
//! server's OAuth client as recorded, and an `rmcp` authorization manager set up for one user.
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use catalog::{Catalog, RevocationApi};
use domain::{
    Aggregate, ServerId, UserId,
    connection::{ConnectionCommand, ConnectionId, ConnectionState, decide},
    server::{ServerLifecycle, ServerState},
};
use eventlog::{AggregateKind, EventLog, Subject};
use mcp::{Allowance, GuardedOAuthHttp, OutboundClient, RevocationMethod};
use proto::v1 as pb;
use rmcp::transport::auth::{AuthorizationManager, AuthorizationMetadata, OAuthClientConfig};
use service_kit::{CommandContext, EnvelopeBuilder, ReadModels, Written, execute};
use tokio::sync::watch;
use url::Url;
use vault::{SecretName, Vault};

use crate::ConnectionError;
use crate::answers::AnswerLocks;
use crate::stores::{VaultCredentialStore, VaultStateStore};

/// How the connection service behaves.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// The shared OAuth redirect URL, `<public_url>/oauth/callback`; a server whose
    /// registration recorded a callback key has its own, `<redirect_url>/<key>`.
    pub redirect_url: String,
    /// How long an authorization may take (the `state` entry's time-to-live).
    pub state_ttl: Duration,
    /// How long one process may hold a connection's refresh lease (a crash frees it then).
    pub refresh_lease: Duration,
    /// Refresh an access token when less than this remains of its life.
    pub refresh_ahead: Duration,
    /// How often a healthy connection is probed (and its tools listed again), ± 20 %.
    pub health_interval: Duration,
    /// First wait before probing an unreachable connection again; doubles up to the interval.
    pub unreachable_backoff: Duration,
    /// At most this many probes at a time per process.
    pub probe_concurrency: usize,
}

impl ConnectionSettings {
    /// The redirect URL a server's client was registered with.
    pub fn redirect_url_for(&self, registration: &pb::ServerClientRegistered) -> String {
        if registration.callback_key.is_empty() {
            self.redirect_url.clone()
        } else {
            format!("{}/{}", self.redirect_url, registration.callback_key)
        }
    }

    pub fn new(redirect_url: impl Into<String>) -> Self {
        ConnectionSettings {
            redirect_url: redirect_url.into(),
            state_ttl: vault::DEFAULT_STATE_TTL,
            refresh_lease: Duration::from_secs(30),
            refresh_ahead: Duration::from_secs(60),
            health_interval: Duration::from_secs(300),
            unreachable_backoff: Duration::from_secs(5),
            probe_concurrency: 8,
        }
    }
}

/// The connection service. Cheap to clone.
#[derive(Clone)]
pub struct ConnectionService {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnectionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionService")
            .field("redirect_url", &self.inner.settings.redirect_url)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub log: Arc<dyn EventLog>,
    pub vault: Vault,
    pub read_models: ReadModels,
    pub envelopes: EnvelopeBuilder,
    pub outbound: OutboundClient,
    pub catalog: Arc<Catalog>,
    pub settings: ConnectionSettings,
    /// Counts the times a refresh waited for another holder of the lease (a test seam: a
    /// test proves a second refresher really waited).
    pub lease_waits: watch::Sender<u64>,
    /// Counts lease renewals (a test seam: a test holds a lease past its time-to-live).
    pub lease_renewals: watch::Sender<u64>,
    /// Counts tool-list listeners that are in place, and discoveries a notice caused (test
    /// seams: a test changes the tools once a listener is there, and waits for the discovery).
    pub listeners_ready: watch::Sender<u64>,
    pub notice_discoveries: watch::Sender<u64>,
    /// Answers with one `state` take turns here (see `answers.rs`); `answer_waits` counts the
    /// times an answer found another in flight, here or marked at work on another process
    /// (a test seam).
    pub answer_locks: AnswerLocks,
    pub answer_waits: watch::Sender<u64>,
}

/// A server's OAuth client as its events recorded it, with the secret from the vault.
pub(crate) struct ServerOAuth {
    pub server_id: ServerId,
    pub url: Url,
    pub enabled: bool,
    pub scopes: Vec<String>,
    pub registration: pb::ServerClientRegistered,
    pub client_secret: Option<String>,
    pub allowances: &'static [Allowance],
    pub revocation_api: Option<RevocationApi>,
}

impl ServerOAuth {
    /// `none`, `client_secret_basic` or `client_secret_post`, consistent with whether there
    /// is a secret (a secret added or removed by an edit changes it).
    pub fn auth_method(&self) -> &str {
        let recorded = self.registration.token_endpoint_auth_method.as_str();
        match (self.client_secret.is_some(), recorded) {
            (false, _) => "none",
            (true, "client_secret_post") => "client_secret_post",
            (true, _) => "client_secret_basic",
        }
    }

    pub fn revocation_method(&self) -> RevocationMethod {
        match &self.revocation_api {
            Some(RevocationApi::GitHubApplications { base }) => match Url::parse(base) {
                Ok(api_base) => RevocationMethod::GitHubApi { api_base },
                Err(_) => RevocationMethod::Unsupported,
            },
            Some(RevocationApi::SlackAuthRevoke { url }) => match Url::parse(url) {
                Ok(url) => RevocationMethod::SlackAuthRevoke { url },
                Err(_) => RevocationMethod::Unsupported,
            },
            None => self
                .registration
                .authorization_server
                .as_ref()
                .map(|a| a.revocation_endpoint.as_str())
                .filter(|e| !e.is_empty())
                .and_then(|e| Url::parse(e).ok())
                .map_or(RevocationMethod::Unsupported, |endpoint| {
                    RevocationMethod::Rfc7009 { endpoint }
                }),
        }
    }

    pub fn client_authentication(&self) -> mcp::ClientAuthentication {
        mcp::ClientAuthentication {
            client_id: self.registration.client_id.clone(),
            client_secret: self.client_secret.clone(),
            method: self.auth_method().to_owned(),
        }
    }
}

pub(crate) fn connection_subject(id: &ConnectionId) -> Result<Subject, ConnectionError> {
    Subject::for_aggregate(
        AggregateKind::Connection,
        &[&id.server_id.to_string(), id.user_id.key().as_str()],
    )
    .map_err(|e| ConnectionError::Command(e.into()))
}

impl ConnectionService {
    pub fn new(
        log: Arc<dyn EventLog>,
        vault: Vault,
        read_models: ReadModels,
        envelopes: EnvelopeBuilder,
        outbound: OutboundClient,
        catalog: Arc<Catalog>,
        settings: ConnectionSettings,
    ) -> Self {
        ConnectionService {
            inner: Arc::new(Inner {
                log,
                vault,
                read_models,
                envelopes,
                outbound,
                catalog,
                settings,
                lease_waits: watch::Sender::new(0),
                lease_renewals: watch::Sender::new(0),
                listeners_ready: watch::Sender::new(0),
                notice_discoveries: watch::Sender::new(0),
                answer_locks: AnswerLocks::default(),
                answer_waits: watch::Sender::new(0),
            }),
        }
    }

    /// Another instance over the same stores and settings, sharing nothing in memory: what a
    /// second process is to this one (tests of cross-process coordination use it).
    pub fn another_instance(&self) -> ConnectionService {
        self.another_instance_with_settings(|_| {})
    }

    /// Like [`ConnectionService::another_instance`], with `change` made to the settings (a
    /// test shortens the refresh lease).
    pub fn another_instance_with_settings(
        &self,
        change: impl FnOnce(&mut ConnectionSettings),
    ) -> ConnectionService {
        let inner = &self.inner;
        let mut settings = inner.settings.clone();
        change(&mut settings);
        ConnectionService::new(
            inner.log.clone(),
            inner.vault.clone(),
            inner.read_models.clone(),
            inner.envelopes.clone(),
            inner.outbound.clone(),
            inner.catalog.clone(),
            settings,
        )
    }

    /// The vault the service keeps its secrets in (the invoker keeps the arguments of
    /// invocations waiting for approval there too).
    pub fn vault(&self) -> &Vault {
        &self.inner.vault
    }

    /// Like [`ConnectionService::another_instance`], over `vault` (the same store seen with
    /// another clock, in tests).
    pub fn another_instance_with_vault(&self, vault: Vault) -> ConnectionService {
        let inner = &self.inner;
        ConnectionService::new(
            inner.log.clone(),
            vault,
            inner.read_models.clone(),
            inner.envelopes.clone(),
            inner.outbound.clone(),
            inner.catalog.clone(),
            inner.settings.clone(),
        )
    }

    pub fn settings(&self) -> &ConnectionSettings {
        &self.inner.settings
    }

    pub fn read_models(&self) -> &ReadModels {
        &self.inner.read_models
    }

    /// How many times a refresh here waited for another process's (or task's) refresh.
    pub fn lease_waits(&self) -> watch::Receiver<u64> {
        self.inner.lease_waits.subscribe()
    }

    /// Counts the renewals of leases held longer than a third of their time-to-live.
    pub fn lease_renewals(&self) -> watch::Receiver<u64> {
        self.inner.lease_renewals.subscribe()
    }

    /// How many authorization answers here waited for another answer with the same `state`.
    pub fn answer_waits(&self) -> watch::Receiver<u64> {
        self.inner.answer_waits.subscribe()
    }

    /// How many tool-list listeners have been put in place so far.
    pub fn listeners_ready(&self) -> watch::Receiver<u64> {
        self.inner.listeners_ready.subscribe()
    }

    /// How many discoveries a tool-list notice has caused so far.
    pub fn notice_discoveries(&self) -> watch::Receiver<u64> {
        self.inner.notice_discoveries.subscribe()
    }

    /// Runs one connection command through the command path.
    pub(crate) async fn run(
        &self,
        context: &CommandContext,
        id: &ConnectionId,
        commands: Vec<ConnectionCommand>,
    ) -> Result<Written, ConnectionError> {
        let subject = connection_subject(id)?;
        let now = self.inner.envelopes.clock().now();
        let written = execute::<ConnectionState, _>(
            self.inner.log.as_ref(),
            &self.inner.envelopes,
            &subject,
            context,
            |state| {
                let mut state = state.clone();
                let mut events = Vec::new();
                for command in &commands {
                    let decided = decide(&state, id, command.clone(), now)?;
                    for event in &decided {
                        state.apply(event);
                    }
                    events.extend(decided);
                }
                Ok(events)
            },
        )
        .await?;
        Ok(written)
    }

    /// Records that the connection's authorization failed (`code`, a sentence).
    pub(crate) async fn record_auth_failure(
        &self,
        context: &CommandContext,
        id: &ConnectionId,
        flow: Option<&str>,
        code: &str,
        message: &str,
    ) -> Result<(), ConnectionError> {
        self.run(
            context,
            id,
            vec![ConnectionCommand::RecordAuthFailure {
                flow: flow.map(str::to_owned),
                error_code: code.to_owned(),
                message: message.to_owned(),
            }],
        )
        .await?;
        Ok(())
    }

    /// The connection's state, read from its events.
    pub(crate) async fn load(&self, id: &ConnectionId) -> Result<ConnectionState, ConnectionError> {
        let history = self
            .inner
            .log
            .read_aggregate(&connection_subject(id)?)
            .await
            .map_err(|e| ConnectionError::Command(e.into()))?;
        Ok(ConnectionState::from_events(
            history
                .events
                .iter()
                .filter_map(|e| e.envelope.event.as_ref()),
        ))
    }

    /// The server's OAuth client. `allow_deleted`: also for a deleted server (to revoke its
    /// users' tokens).
    pub(crate) async fn server_oauth(
        &self,
        server_id: ServerId,
        allow_deleted: bool,
    ) -> Result<ServerOAuth, ConnectionError> {
        let subject = Subject::for_aggregate(AggregateKind::Server, &[&server_id.to_string()])
            .map_err(|e| ConnectionError::Command(e.into()))?;
        let history = self
            .inner
            .log
            .read_aggregate(&subject)
            .await
            .map_err(|e| ConnectionError::Command(e.into()))?;
        let state = ServerState::from_events(
            history
                .events
                .iter()
                .filter_map(|e| e.envelope.event.as_ref()),
        );
        match state.lifecycle() {
            ServerLifecycle::Active => {}
            ServerLifecycle::Deleted if allow_deleted => {}
            _ => return Err(ConnectionError::ServerNotFound),
        }
        let registration = state
            .client_registration()
            .cloned()
            .ok_or(ConnectionError::ServerNotRegistered)?;
        let client_secret = if registration.client_secret_ref.is_empty() {
            None
        } else {
            let name = SecretName::parse(registration.client_secret_ref.clone())?;
            self.inner
                .vault
                .get(&name)
                .await?
                .and_then(|(secret, _)| secret.expose_str().map(str::to_owned))
        };
        let url = Url::parse(state.url()).map_err(|_| ConnectionError::ServerNotFound)?;
        let template = self.inner.catalog.get(state.catalog_entry_id());
        Ok(ServerOAuth {
            server_id,
            url,
            enabled: state.is_enabled(),
            scopes: state.oauth().map(|o| o.scopes.clone()).unwrap_or_default(),
            registration,
            client_secret,
            allowances: template.map_or(&[], |t| t.allowances),
            revocation_api: template.and_then(|t| t.revocation_api.clone()),
        })
    }

    /// An `rmcp` authorization manager for one user at `server`, without discovery: the
    /// metadata and the client are the ones recorded when the server was added.
    pub(crate) async fn manager(
        &self,
        server: &ServerOAuth,
        user: &UserId,
        credentials: Option<VaultCredentialStore>,
    ) -> Result<AuthorizationManager, ConnectionError> {
        let oauth_error = ConnectionError::from_oauth;
        let http =
            GuardedOAuthHttp::with_allowances(self.inner.outbound.clone(), server.allowances);
        let mut manager =
            AuthorizationManager::new_with_oauth_http_client(server.url.clone(), Arc::new(http))
                .await
                .map_err(oauth_error)?;
        let recorded = server
            .registration
            .authorization_server
            .clone()
            .unwrap_or_default();
        let mut metadata = AuthorizationMetadata::default();
        metadata.authorization_endpoint = recorded.authorization_endpoint;
        metadata.token_endpoint = recorded.token_endpoint;
        metadata.issuer = Some(recorded.issuer).filter(|i| !i.is_empty());
        metadata.scopes_supported = Some(recorded.scopes_supported);
        metadata.code_challenge_methods_supported = Some(recorded.code_challenge_methods_supported);
        let mut extra = HashMap::new();
        extra.insert(
            "authorization_response_iss_parameter_supported".to_owned(),
            serde_json::Value::Bool(recorded.authorization_response_iss_parameter_supported),
        );
        // rmcp picks `client_secret_post` only when the metadata offers nothing else; say
        // exactly what the registration uses.
        extra.insert(
            "token_endpoint_auth_methods_supported".to_owned(),
            serde_json::json!([server.auth_method()]),
        );
        metadata.additional_fields = extra;
        manager.set_metadata(metadata);
        let mut config = OAuthClientConfig::new(
            server.registration.client_id.clone(),
            self.inner.settings.redirect_url_for(&server.registration),
        )
        .with_scopes(server.scopes.clone());
        if let Some(secret) = &server.client_secret {
            config = config.with_client_secret(secret.clone());
        }
        manager.configure_client(config).map_err(oauth_error)?;
        manager.set_state_store(VaultStateStore {
            vault: self.inner.vault.clone(),
            server_id: server.server_id,
            user_id: user.clone(),
            ttl: self.inner.settings.state_ttl,
        });
        if let Some(credentials) = credentials {
            manager.set_credential_store(credentials);
        }
        Ok(manager)
    }
}
