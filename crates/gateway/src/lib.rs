//! Switchboard's HTTP API: the front door a console, the OAuth redirect, an orchestrator and
//! people trying Switchboard use.
//!
//! - [`auth`]: bearer JWT → [`Caller`]; permissions and roles.
//! - [`routes`]: one module per capability and the one permission table ([`routes::table`]).
//! - [`ApiError`]: every error as `{"error": {"code", "message", "request_id"}}`.
//! - [`server`]: the HTTP(S) server with graceful shutdown.
//!
//! A handler extracts (typed, validated), calls a service and shapes the reply; no business
//! rule lives here.
pub mod auth;
mod error;
mod extract;
mod metrics;
mod middleware;
pub mod openapi;
pub mod routes;
pub mod server;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{Router, extract::DefaultBodyLimit, http::Method};
use eventlog::EventLog;
use service_kit::{EnvelopeBuilder, ReadModels};
use tokio_util::sync::CancellationToken;

pub use auth::{Authenticator, Caller, Permission, Permissions, Resource, RoleTable};
pub use error::{ApiError, ErrorBody};
pub use extract::{ApiJson, ApiPath, ApiQuery};
pub use metrics::Metrics;
pub use routes::{Access, RouteSpec};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The base of every URL Switchboard hands out (OAuth redirect, links).
    pub public_url: String,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long a call that changed something waits for the read models to show the change
    /// before it answers anyway.
    pub read_your_writes_timeout: Duration,
    /// Events buffered for one live-update client. When the buffer is full the stream waits
    /// for the client to take one, up to `stream_send_timeout`.
    pub stream_buffer: usize,
    /// How long a live-update stream waits for a client with a full buffer to take an event
    /// before it disconnects it (the client resumes with `Last-Event-ID`). A client reading
    /// slower than the log grows still catches up; one that stopped reading lets go.
    pub stream_send_timeout: Duration,
    /// Interval of keep-alive comments on live-update streams.
    pub stream_keep_alive: Duration,
    /// The console's base URL (`console.url`): the OAuth callback sends the browser to its
    /// page for the server. `None`: the callback answers with a short page of its own.
    pub console_url: Option<String>,
    /// Whether `/mcp` puts a call that needs approval to the user in their MCP client, when
    /// it can show a form (`invocations.mcp_approval_prompts`).
    pub mcp_approval_prompts: bool,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            public_url: "http://127.0.0.1:8080".to_owned(),
            body_limit: 1024 * 1024,
            read_your_writes_timeout: Duration::from_secs(5),
            stream_buffer: 1024,
            stream_send_timeout: Duration::from_secs(30),
            stream_keep_alive: Duration::from_secs(15),
            console_url: None,
            mcp_approval_prompts: true,
        }
    }
}

/// What every handler can reach. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState(Arc<AppInner>);

#[derive(Debug)]
pub struct AppInner {
    pub log: Arc<dyn EventLog>,
    pub vault: vault::Vault,
    pub read_models: ReadModels,
    pub envelopes: EnvelopeBuilder,
    pub auth: Authenticator,
    pub metrics: Metrics,
    pub settings: GatewaySettings,
    /// Cancelled when the process shuts down: live-update streams end on it.
    pub shutdown: CancellationToken,
    /// The catalog service.
    pub servers: catalog::ServerCommands,
    /// The policy service: each user's tool settings.
    pub policy: policy::PolicyCommands,
    /// The connection service.
    pub connections: connection::ConnectionService,
    /// The invoker service: the orchestrator's tools, invocations and the users' approvals.
    pub invoker: invoker::Invoker,
    /// The permission table by path: each method the path serves, with its access and the
    /// resource it belongs to.
    routes: HashMap<&'static str, Vec<(Method, Access, Resource)>>,
    /// The live-update streams open, by user (MCP subscriptions count too).
    stream_slots: Arc<routes::stream::StreamSlots>,
    /// The MCP endpoint (`/mcp`): the callers' tools as one MCP server.
    mcp: routes::mcp::McpService,
}

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// What the API is built on.
#[derive(Debug)]
pub struct AppParts {
    pub log: Arc<dyn EventLog>,
    pub vault: vault::Vault,
    pub read_models: ReadModels,
    pub envelopes: EnvelopeBuilder,
    pub auth: Authenticator,
    pub metrics: Metrics,
    pub settings: GatewaySettings,
    pub shutdown: CancellationToken,
    pub catalog: Arc<catalog::Catalog>,
    /// The one client for every request Switchboard makes to servers and providers.
    pub outbound: mcp::OutboundClient,
    /// Where client ID metadata documents say Switchboard's document is
    /// (`oauth.client_metadata_url`); `None`: `<public_url>/oauth/client-metadata.json`.
    pub client_metadata_url: Option<String>,
    /// The connection service's tuning; `None`: the defaults. Its redirect URL is always
    /// `<public_url>/oauth/callback`.
    pub connection_settings: Option<connection::ConnectionSettings>,
    /// The invoker's settings; `None`: the defaults.
    pub invoker_settings: Option<invoker::InvokerSettings>,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        let mut routes: HashMap<&'static str, Vec<(Method, Access, Resource)>> = HashMap::new();
        for route in routes::table() {
            routes.entry(route.path).or_default().push((
                route.method,
                route.access,
                route.resource,
            ));
        }
        let public_url = parts.settings.public_url.trim_end_matches('/').to_owned();
        let oauth = catalog::OAuthClientSettings {
            redirect_url: format!("{public_url}/oauth/callback"),
            client_metadata_url: parts
                .client_metadata_url
                .unwrap_or_else(|| format!("{public_url}/oauth/client-metadata.json")),
            client_name: "Switchboard".to_owned(),
        };
        let mut connection_settings = parts
            .connection_settings
            .unwrap_or_else(|| connection::ConnectionSettings::new(""));
        connection_settings
            .redirect_url
            .clone_from(&oauth.redirect_url);
        let connections = connection::ConnectionService::new(
            parts.log.clone(),
            parts.vault.clone(),
            parts.read_models.clone(),
            parts.envelopes.clone(),
            parts.outbound.clone(),
            parts.catalog.clone(),
            connection_settings,
        );
        let invoker = invoker::Invoker::new(
            parts.log.clone(),
            parts.read_models.clone(),
            parts.envelopes.clone(),
            connections.clone(),
            parts.outbound.clone(),
            parts.invoker_settings.unwrap_or_default(),
        );
        let servers = catalog::ServerCommands::new(
            parts.log.clone(),
            parts.envelopes.clone(),
            parts.read_models.clone(),
            parts.catalog,
            parts.outbound,
            parts.vault.clone(),
            oauth,
        );
        let policy = policy::PolicyCommands::new(
            parts.log.clone(),
            parts.envelopes.clone(),
            parts.read_models.clone(),
        );
        parts.metrics.register_invoker(&invoker);
        let body_limit = parts.settings.body_limit;
        AppState(Arc::new_cyclic(|app| AppInner {
            mcp: routes::mcp::service(app.clone(), body_limit, &parts.shutdown),
            servers,
            policy,
            connections,
            invoker,
            log: parts.log,
            vault: parts.vault,
            read_models: parts.read_models,
            envelopes: parts.envelopes,
            auth: parts
                .auth
                .with_mcp_endpoint(&routes::mcp::endpoint_url(&public_url)),
            metrics: parts.metrics,
            settings: parts.settings,
            shutdown: parts.shutdown,
            routes,
            stream_slots: Arc::default(),
        }))
    }

    /// The access the permission table declares for a route: `Err` for a path it does not
    /// know, `Ok(None)` for a method it does not declare on a path it knows. A HEAD request
    /// is a GET without the body (axum answers it with the GET handler), so it needs what
    /// the GET needs.
    pub(crate) fn access(
        &self,
        method: &Method,
        path: &str,
    ) -> Result<Option<(Access, Resource)>, ()> {
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        Ok(self
            .routes
            .get(path)
            .ok_or(())?
            .iter()
            .find(|(declared, _, _)| declared == method)
            .map(|(_, access, resource)| (*access, *resource)))
    }

    /// The context of a command a signed-in user sends in the request being answered.
    pub fn command_context(&self, caller: &Caller) -> service_kit::CommandContext {
        service_kit::CommandContext::user(caller.user.clone(), &*error::current_request_id())
    }

    /// Waits until the read models show what a command wrote (read-your-writes), so that a GET
    /// right after the answer sees the change. Bounded: a late read model is logged, and the
    /// answer goes out anyway (the change is stored).
    pub async fn settle(&self, written: &service_kit::Written) {
        if !self
            .read_models
            .wait_for(written, self.settings.read_your_writes_timeout)
            .await
        {
            tracing::warn!(
                subject = written.subject.as_str(),
                version = written.version,
                "read models did not show the change in time"
            );
        }
    }

    /// The route's path as a `'static` label, for metrics without an allocation per request.
    pub(crate) fn route_label(&self, path: &str) -> &'static str {
        self.routes
            .get_key_value(path)
            .map_or("unmatched", |(path, _)| *path)
    }
}

/// The whole API: every capability's routes, the permission check, request ids, errors and
/// metrics.
pub fn app(state: AppState) -> Router {
    let (router, _) = routes::router().split_for_parts();
    let body_limit = state.settings.body_limit;
    router
        .fallback(middleware::not_found)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::authorize,
        ))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::request_context,
        ))
        .with_state(state)
}
