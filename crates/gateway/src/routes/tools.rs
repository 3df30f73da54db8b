//! The caller's tool settings: each tool of a server they are connected to, and what the AI
//! may do with it (Always allow, Needs approval, Blocked), per tool and per category.
//!
//! Own data only: the routes take no user parameter; every read and change is the signed-in
//! caller's. A change answers once the tool-state projection shows it (read-your-writes).
use axum::{extract::State, http::Method};
use domain::{DomainError, ServerId, ToolCategory, ToolState, ToolView};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, ApiJson, ApiPath, AppState, Caller, Permission, RouteSpec};

const OWN: Access = Access::AnyOf(&[Permission::ViewAndConnect]);

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(Method::GET, "/api/v1/servers/{id}/tools", OWN),
    RouteSpec::new(Method::PUT, "/api/v1/servers/{id}/tools/{tool}", OWN),
    RouteSpec::new(
        Method::PUT,
        "/api/v1/servers/{id}/categories/{category}",
        OWN,
    ),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_tools))
        .routes(routes!(set_tool_state))
        .routes(routes!(set_category_state))
}

/// One of the caller's tools.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolItem {
    /// The tool's name on its server.
    pub name: String,
    /// The name the AI calls it by: `<server slug>__<tool>` (≤ 64 of `[A-Za-z0-9_-]`, a hash
    /// suffix when that does not fit or clashes).
    pub exposed_name: Option<String>,
    pub title: String,
    pub description: String,
    /// `read_only` (the server's `readOnlyHint`) or `write_delete` (everything else).
    pub category: &'static str,
    /// `always_allow`, `needs_approval` or `blocked`.
    pub state: &'static str,
    /// The current definition: send it back with a change to make sure it is the one you saw.
    pub definition_hash: String,
    /// The definition changed since you set this tool; set it again to confirm.
    pub changed: bool,
}

impl ToolItem {
    fn of(view: &ToolView<'_>) -> Self {
        ToolItem {
            name: view.name.to_owned(),
            exposed_name: view.exposed_name.map(str::to_owned),
            title: view.title.to_owned(),
            description: view.description.to_owned(),
            category: view.category.as_str(),
            state: view.state.as_str(),
            definition_hash: view.definition_hash.to_owned(),
            changed: view.changed,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolList {
    /// By name; empty when you are not connected to the server.
    pub tools: Vec<ToolItem>,
}

/// A new state for one tool.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetToolState {
    /// `always_allow`, `needs_approval` or `blocked`.
    pub state: String,
    /// The definition you decided about (the tool's `definition_hash`); refused with 409
    /// `tool_definition_changed` when the server has changed the tool since.
    pub definition_hash: Option<String>,
}

/// A new state for every tool of a category.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetCategoryState {
    /// `always_allow`, `needs_approval` or `blocked`.
    pub state: String,
}

fn tool_state(text: &str) -> Result<ToolState, ApiError> {
    ToolState::parse(text).map_err(|_| {
        ApiError::bad_request(
            "invalid_tool_state",
            "state must be one of always_allow, needs_approval, blocked",
        )
    })
}

fn existing_server(state: &AppState, text: &str) -> Result<ServerId, ApiError> {
    let id = super::server_id(text)?;
    if state.read_models.servers.read(|d| d.get(id).is_none()) {
        return Err(DomainError::ServerNotFound.into());
    }
    Ok(id)
}

fn tool_list(state: &AppState, caller: &Caller, server: ServerId) -> ToolList {
    let mut tools: Vec<ToolItem> = state.read_models.tool_states.read(|states| {
        states
            .tools_of(&caller.user, server)
            .map(|view| ToolItem::of(&view))
            .collect()
    });
    tools.sort_by(|a, b| a.name.cmp(&b.name));
    ToolList { tools }
}

/// Your tools of one server, with their states. Empty when you are not connected to it.
#[utoipa::path(get, path = "/api/v1/servers/{id}/tools", tag = "tools", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "Your tools of the server", body = ToolList),
        (status = 404, description = "No such server", body = crate::ErrorBody),
    ))]
async fn list_tools(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ToolList>, ApiError> {
    let server = existing_server(&state, &id)?;
    Ok(axum::Json(tool_list(&state, &caller, server)))
}

/// Sets what the AI may do with one of your tools.
#[utoipa::path(put, path = "/api/v1/servers/{id}/tools/{tool}", tag = "tools", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The server's id"),
        ("tool" = String, Path, description = "The tool's name on the server"),
    ),
    request_body = SetToolState,
    responses(
        (status = 200, description = "The tool as set", body = ToolItem),
        (status = 400, description = "The state is not one of the three", body = crate::ErrorBody),
        (status = 404, description = "No such server, you are not connected to it, or it offers you no such tool", body = crate::ErrorBody),
        (status = 409, description = "The definition changed since you saw it", body = crate::ErrorBody),
    ))]
async fn set_tool_state(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, tool)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<SetToolState>,
) -> Result<axum::Json<ToolItem>, ApiError> {
    let server = existing_server(&state, &id)?;
    let new_state = tool_state(&request.state)?;
    let context = state.command_context(&caller);
    let written = state
        .policy
        .set_tool_state(
            &context,
            &caller.user,
            server,
            &tool,
            new_state,
            request.definition_hash,
        )
        .await?;
    state.settle(&written).await;
    if new_state == ToolState::Blocked {
        super::invocations::deny_pending_now_refused(&state, &context, &caller.user, server)
            .await?;
    }
    state
        .read_models
        .tool_states
        .read(|states| {
            states
                .tool(&caller.user, server, &tool)
                .map(|view| ToolItem::of(&view))
        })
        .map(axum::Json)
        .ok_or_else(|| DomainError::ToolNotFound { tool }.into())
}

/// Sets what the AI may do with every tool of a category the server offers you now. Tools
/// that appear later start Blocked.
#[utoipa::path(put, path = "/api/v1/servers/{id}/categories/{category}", tag = "tools", security(("bearer" = [])),
    params(
        ("id" = String, Path, description = "The server's id"),
        ("category" = String, Path, description = "`read_only` or `write_delete`"),
    ),
    request_body = SetCategoryState,
    responses(
        (status = 200, description = "All your tools of the server, as set", body = ToolList),
        (status = 400, description = "The category or state is not one of the allowed values", body = crate::ErrorBody),
        (status = 404, description = "No such server, or you are not connected to it", body = crate::ErrorBody),
    ))]
async fn set_category_state(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, category)): ApiPath<(String, String)>,
    ApiJson(request): ApiJson<SetCategoryState>,
) -> Result<axum::Json<ToolList>, ApiError> {
    let server = existing_server(&state, &id)?;
    let category = ToolCategory::parse(&category).map_err(|_| {
        ApiError::bad_request(
            "invalid_tool_category",
            "the category must be read_only or write_delete",
        )
    })?;
    let new_state = tool_state(&request.state)?;
    let context = state.command_context(&caller);
    let written = state
        .policy
        .set_category_state(&context, &caller.user, server, category, new_state)
        .await?;
    state.settle(&written).await;
    if new_state == ToolState::Blocked {
        super::invocations::deny_pending_now_refused(&state, &context, &caller.user, server)
            .await?;
    }
    Ok(axum::Json(tool_list(&state, &caller, server)))
}
