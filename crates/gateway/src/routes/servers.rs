//! The catalog and the configured servers: everyone with `view_and_connect` sees them; admins
//! with `manage_servers` edit, enable, disable and delete them. (Adding a server comes with
//! OAuth discovery and registration.)
use axum::{
    body::Bytes,
    extract::State,
    http::{Method, StatusCode},
};
use domain::{DomainError, ServerId, projections::ServerSummary};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, ApiJson, ApiPath, AppState, Caller, Permission, RouteSpec};

const SEE: Access = Access::AnyOf(&[Permission::ViewAndConnect, Permission::ManageServers]);
const MANAGE: Access = Access::AnyOf(&[Permission::ManageServers]);

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(Method::GET, "/api/v1/catalog", SEE),
    RouteSpec::new(Method::POST, "/api/v1/servers/discover", MANAGE),
    RouteSpec::new(Method::POST, "/api/v1/servers", MANAGE),
    RouteSpec::new(Method::GET, "/api/v1/servers", SEE),
    RouteSpec::new(Method::GET, "/api/v1/servers/{id}", SEE),
    RouteSpec::new(Method::PATCH, "/api/v1/servers/{id}", MANAGE),
    RouteSpec::new(Method::DELETE, "/api/v1/servers/{id}", MANAGE),
    RouteSpec::new(Method::POST, "/api/v1/servers/{id}/enable", MANAGE),
    RouteSpec::new(Method::POST, "/api/v1/servers/{id}/disable", MANAGE),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(catalog))
        .routes(routes!(discover_server))
        .routes(routes!(list_servers, add_server))
        .routes(routes!(get_server, edit_server, delete_server))
        .routes(routes!(enable_server))
        .routes(routes!(disable_server))
}

/// One catalog tile.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateView {
    /// `atlassian`, `github`, `notion`, `pagerduty`, `slack` or `custom`.
    pub id: &'static str,
    pub name: &'static str,
    /// The MCP endpoint; absent for `custom` (the admin gives it).
    pub url: Option<String>,
    pub description: &'static str,
    /// Where the provider's OAuth departs from the MCP specification, allowed for servers
    /// added from this template only.
    #[schema(value_type = Vec<String>)]
    pub allowances: &'static [catalog::Allowance],
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CatalogView {
    pub templates: Vec<TemplateView>,
}

/// The templates servers are added from.
#[utoipa::path(get, path = "/api/v1/catalog", tag = "servers", security(("bearer" = [])),
    responses((status = 200, description = "The catalog", body = CatalogView)))]
async fn catalog(State(state): State<AppState>) -> axum::Json<CatalogView> {
    let templates = state
        .servers
        .catalog()
        .templates()
        .iter()
        .map(|t| TemplateView {
            id: t.id,
            name: t.name,
            url: t.url.clone(),
            description: t.description,
            allowances: t.allowances,
        })
        .collect();
    axum::Json(CatalogView { templates })
}

/// A configured server.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerView {
    pub id: String,
    pub name: String,
    /// Prefixes the server's tools: `<slug>__<tool>`.
    pub slug: String,
    pub url: String,
    /// Handed to the AI as context.
    pub description: String,
    /// The catalog template it was added from (`custom` for a URL).
    pub template: String,
    pub enabled: bool,
    /// `dynamic_registration`, `preconfigured` or `client_metadata_document`.
    pub registration_mode: Option<&'static str>,
    /// The redirect URL the server's OAuth client is registered with (a pre-registered
    /// client's registration at the provider must list it).
    pub redirect_url: Option<String>,
    pub created_by: String,
    pub created_at: Option<String>,
    pub updated_by: String,
    pub updated_at: Option<String>,
}

impl ServerView {
    fn of(server: &ServerSummary, oauth: &catalog::OAuthClientSettings) -> Self {
        ServerView {
            id: server.id.to_string(),
            name: server.name.clone(),
            slug: server.slug.clone(),
            url: server.url.clone(),
            description: server.description.clone(),
            template: if server.catalog_entry_id.is_empty() {
                catalog::CUSTOM_TEMPLATE.to_owned()
            } else {
                server.catalog_entry_id.clone()
            },
            enabled: server.enabled,
            registration_mode: server.registration_mode.map(|m| m.as_str()),
            redirect_url: server.registration_mode.map(|_| {
                let key = server
                    .callback_key
                    .as_deref()
                    .map(domain::CallbackKey::parse);
                oauth.redirect_url_for(key.and_then(Result::ok).as_ref())
            }),
            created_by: server.created_by.clone(),
            created_at: server.created_at.map(super::rfc3339),
            updated_by: server.updated_by.clone(),
            updated_at: server.updated_at.map(super::rfc3339),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerList {
    pub servers: Vec<ServerView>,
    /// Paging cursor; absent: this is the whole list.
    pub next: Option<String>,
}

/// A server to add: a catalog template, or `custom` (or no template) with its URL.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewServer {
    /// 1–24 letters, digits, spaces, `_` and `-`; unique after slugging (it prefixes tools).
    pub name: String,
    /// A catalog template id (`github`, …, `custom`).
    pub template: Option<String>,
    /// The MCP endpoint (`https://`); fixed by a provider template.
    pub url: Option<String>,
    /// Handed to the AI as context.
    pub description: Option<String>,
    /// A client registered with the provider beforehand.
    pub client_id: Option<String>,
    /// Its secret; stored in the vault, never in an event.
    pub client_secret: Option<String>,
}

/// What to discover: a template or a URL (and whether a pre-registered client will be given).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverServer {
    pub template: Option<String>,
    pub url: Option<String>,
    /// A pre-registered client id the admin will give (makes the mode `preconfigured`).
    pub client_id: Option<String>,
}

/// The OAuth set-up discovery found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DiscoveryView {
    /// The protected resource: the RFC 8707 `resource` tokens are asked for.
    pub resource: String,
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub registration_endpoint: Option<String>,
    pub revocation_endpoint: Option<String>,
    /// The scopes a connection asks for.
    pub scopes: Vec<String>,
    /// `preconfigured`, `client_metadata_document`, `dynamic_registration` or
    /// `manual_credentials_required`.
    #[schema(value_type = String)]
    pub registration_mode: mcp::RegistrationPlan,
    /// The redirect URL to register with the provider (when credentials are needed, or a
    /// pre-registered client id was given): the server's own.
    pub redirect_url: Option<String>,
    /// Found through protected-resource metadata (`false`: an older server's root metadata).
    pub via_protected_resource_metadata: bool,
}

/// Finds a server's OAuth set-up (the console's "Next" step). Changes nothing.
#[utoipa::path(post, path = "/api/v1/servers/discover", tag = "servers", security(("bearer" = [])),
    request_body = DiscoverServer,
    responses(
        (status = 200, description = "What was found", body = DiscoveryView),
        (status = 422, description = "The server is refused, with the rule", body = crate::ErrorBody),
        (status = 502, description = "The server or its authorization server did not answer", body = crate::ErrorBody),
    ))]
async fn discover_server(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<DiscoverServer>,
) -> Result<axum::Json<DiscoveryView>, ApiError> {
    let input = catalog::AddServerInput {
        template: request.template,
        url: request.url,
        client_id: request.client_id,
        ..catalog::AddServerInput::default()
    };
    let found = state.servers.discover(&input).await?;
    let manual = matches!(
        found.registration,
        mcp::RegistrationPlan::ManualCredentialsRequired | mcp::RegistrationPlan::Preconfigured
    );
    let redirect_url = manual.then(|| state.servers.oauth().redirect_url_of(&found));
    Ok(axum::Json(DiscoveryView {
        resource: found.resource,
        issuer: found.issuer,
        authorization_endpoint: found.authorization_endpoint,
        token_endpoint: found.token_endpoint,
        registration_endpoint: found.registration_endpoint,
        revocation_endpoint: found.revocation_endpoint,
        scopes: found.scopes,
        registration_mode: found.registration,
        redirect_url,
        via_protected_resource_metadata: found.via_protected_resource_metadata,
    }))
}

/// Adds a server: OAuth discovery and client registration, bound to the discovered issuer.
#[utoipa::path(post, path = "/api/v1/servers", tag = "servers", security(("bearer" = [])),
    request_body = NewServer,
    responses(
        (status = 201, description = "The server", body = ServerView),
        (status = 409, description = "The name is taken", body = crate::ErrorBody),
        (status = 422, description = "A value or the server is refused, with the rule", body = crate::ErrorBody),
        (status = 502, description = "The server or its authorization server did not answer", body = crate::ErrorBody),
    ))]
async fn add_server(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<NewServer>,
) -> Result<(StatusCode, axum::Json<ServerView>), ApiError> {
    let input = catalog::AddServerInput {
        name: request.name,
        template: request.template,
        url: request.url,
        description: request.description,
        client_id: request.client_id,
        client_secret: request.client_secret,
    };
    let (id, written) = state
        .servers
        .add_server(&state.command_context(&caller), input)
        .await?;
    Ok((StatusCode::CREATED, view_after(&state, id, &written).await?))
}

/// Every configured server, oldest first.
#[utoipa::path(get, path = "/api/v1/servers", tag = "servers", security(("bearer" = [])),
    responses((status = 200, description = "The servers", body = ServerList)))]
async fn list_servers(State(state): State<AppState>) -> axum::Json<ServerList> {
    let servers = state.read_models.servers.read(|directory| {
        directory
            .iter()
            .map(|server| ServerView::of(server, state.servers.oauth()))
            .collect()
    });
    axum::Json(ServerList {
        servers,
        next: None,
    })
}

/// The server as the read models show it once they reflect `written` (read-your-writes).
async fn view_after(
    state: &AppState,
    id: ServerId,
    written: &service_kit::Written,
) -> Result<axum::Json<ServerView>, ApiError> {
    state.settle(written).await;
    Ok(axum::Json(view(state, id)?))
}

fn view(state: &AppState, id: ServerId) -> Result<ServerView, ApiError> {
    state
        .read_models
        .servers
        .read(|directory| {
            directory
                .get(id)
                .map(|server| ServerView::of(server, state.servers.oauth()))
        })
        .ok_or_else(|| DomainError::ServerNotFound.into())
}

/// One server.
#[utoipa::path(get, path = "/api/v1/servers/{id}", tag = "servers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "The server", body = ServerView),
        (status = 404, description = "No such server", body = crate::ErrorBody),
    ))]
async fn get_server(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ServerView>, ApiError> {
    Ok(axum::Json(view(&state, super::server_id(&id)?)?))
}

/// What an edit may change. The URL never changes; sending one is refused with
/// `server_url_immutable`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditServer {
    /// 1–24 letters, digits, spaces, `_` and `-`; unique after slugging.
    pub name: Option<String>,
    pub description: Option<String>,
    /// A pre-registered client's new client id (other registrations cannot be edited).
    pub client_id: Option<String>,
    /// A pre-registered client's new secret; stored in the vault, never in an event.
    pub client_secret: Option<String>,
    /// Refused: a server's URL never changes.
    #[schema(value_type = Option<String>)]
    pub url: Option<serde_json::Value>,
}

/// Renames a server, changes its description, or replaces a pre-registered client's credentials.
#[utoipa::path(patch, path = "/api/v1/servers/{id}", tag = "servers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    request_body = EditServer,
    responses(
        (status = 200, description = "The server as changed", body = ServerView),
        (status = 404, description = "No such server", body = crate::ErrorBody),
        (status = 409, description = "The name is taken", body = crate::ErrorBody),
        (status = 422, description = "A value is not valid, or the URL was sent", body = crate::ErrorBody),
    ))]
async fn edit_server(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(edit): ApiJson<EditServer>,
) -> Result<axum::Json<ServerView>, ApiError> {
    let id = super::server_id(&id)?;
    if edit.url.is_some() {
        return Err(DomainError::ServerUrlImmutable.into());
    }
    let input = catalog::EditServerInput {
        name: edit.name,
        description: edit.description,
        client_id: edit.client_id,
        client_secret: edit.client_secret,
    };
    let written = state
        .servers
        .edit_server(&state.command_context(&caller), id, input)
        .await?;
    view_after(&state, id, &written).await
}

/// Deletes a server for everyone. Requests waiting for approval on it fail
/// (`server_disabled`).
#[utoipa::path(delete, path = "/api/v1/servers/{id}", tag = "servers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such server", body = crate::ErrorBody),
        (status = 410, description = "Already deleted", body = crate::ErrorBody),
    ))]
async fn delete_server(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let id = super::server_id(&id)?;
    let written = state
        .servers
        .delete_server(&state.command_context(&caller), id)
        .await?;
    state.settle(&written).await;
    super::invocations::fail_pending_on_server_gone(&state, &caller, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Makes a server's tools available again.
#[utoipa::path(post, path = "/api/v1/servers/{id}/enable", tag = "servers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "The server, enabled", body = ServerView),
        (status = 404, description = "No such server", body = crate::ErrorBody),
    ))]
async fn enable_server(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ServerView>, ApiError> {
    let id = super::server_id(&id)?;
    let written = state
        .servers
        .enable_server(&state.command_context(&caller), id)
        .await?;
    view_after(&state, id, &written).await
}

/// Why a server is disabled (optional body).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableServer {
    /// Shown to users and recorded in the audit log.
    #[serde(default)]
    pub reason: String,
}

/// Keeps the server visible and makes its tools unavailable. Requests waiting for approval
/// on it fail (`server_disabled`).
#[utoipa::path(post, path = "/api/v1/servers/{id}/disable", tag = "servers", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    request_body(content = Option<DisableServer>, description = "Optional"),
    responses(
        (status = 200, description = "The server, disabled", body = ServerView),
        (status = 404, description = "No such server", body = crate::ErrorBody),
    ))]
async fn disable_server(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    body: Bytes,
) -> Result<axum::Json<ServerView>, ApiError> {
    let id = super::server_id(&id)?;
    let disable: DisableServer = if body.iter().all(u8::is_ascii_whitespace) {
        DisableServer::default()
    } else {
        // As every other route tells them apart: not JSON at all, or JSON of the wrong shape.
        serde_json::from_slice(&body).map_err(|e| {
            let code = if e.is_syntax() || e.is_eof() {
                "malformed_json"
            } else {
                "invalid_body"
            };
            ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
        })?
    };
    let written = state
        .servers
        .disable_server(&state.command_context(&caller), id, disable.reason)
        .await?;
    state.settle(&written).await;
    super::invocations::fail_pending_on_server_gone(&state, &caller, id).await?;
    Ok(axum::Json(view(&state, id)?))
}
