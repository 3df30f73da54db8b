//! Each user's connection to a server: connect (the authorization URL), the OAuth callback,
//! the status, disconnect. A caller only ever sees and changes their own connection: there is
//! no user in these paths.
use axum::{
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use connection::{CallbackParams, ConnectionError, ConnectionReport};
use serde::{Deserialize, Serialize};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{Access, ApiError, ApiPath, ApiQuery, AppState, Caller, Permission, RouteSpec};

const CONNECT: Access = Access::AnyOf(&[Permission::ViewAndConnect]);

pub const ROUTES: &[RouteSpec] = &[
    RouteSpec::new(Method::POST, "/api/v1/servers/{id}/connection", CONNECT),
    RouteSpec::new(Method::GET, "/api/v1/servers/{id}/connection", CONNECT),
    RouteSpec::new(Method::DELETE, "/api/v1/servers/{id}/connection", CONNECT),
    RouteSpec::new(Method::GET, "/oauth/callback", Access::Public),
    RouteSpec::new(Method::POST, "/oauth/callback", Access::Public),
    RouteSpec::new(Method::GET, "/oauth/callback/{key}", Access::Public),
    RouteSpec::new(Method::POST, "/oauth/callback/{key}", Access::Public),
];

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(connect, connection_status, disconnect))
        .routes(routes!(oauth_callback, oauth_callback_confirmed))
        .routes(routes!(
            server_oauth_callback,
            server_oauth_callback_confirmed
        ))
}

/// Where to send the user's browser to authorize.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuthorizationStart {
    pub authorization_url: String,
    /// `pending` until the authorization server sends the user back.
    pub status: &'static str,
}

/// The caller's connection to a server.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectionView {
    pub server_id: String,
    /// `healthy`, `pending`, `auth_error`, `unreachable`, `disabled` or `not_connected`.
    pub status: &'static str,
    /// Why (an OAuth error, an unreachable server); absent when there is nothing to say.
    pub reason: Option<String>,
    /// When the status last changed.
    pub since: Option<String>,
    pub granted_scopes: Vec<String>,
    pub access_token_expires_at: Option<String>,
    /// How many tools the last discovery found (absent before the first).
    pub tool_count: Option<usize>,
}

impl ConnectionView {
    fn of(report: ConnectionReport) -> Self {
        ConnectionView {
            server_id: report.server_id.to_string(),
            status: report.status.as_str(),
            reason: Some(report.reason).filter(|r| !r.is_empty()),
            since: report.since.map(super::rfc3339),
            granted_scopes: report.granted_scopes,
            access_token_expires_at: report.access_token_expires_at.map(super::rfc3339),
            tool_count: report.tool_count,
        }
    }
}

/// What a disconnect did.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DisconnectView {
    pub status: &'static str,
    /// Whether the provider confirmed the revocation (some providers offer no way).
    pub tokens_revoked: bool,
}

/// Starts connecting the caller to a server: returns the authorization URL to open.
#[utoipa::path(post, path = "/api/v1/servers/{id}/connection", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "Open `authorization_url` in the browser", body = AuthorizationStart),
        (status = 404, description = "No such server", body = crate::ErrorBody),
        (status = 409, description = "Already connected, or the server is disabled", body = crate::ErrorBody),
        (status = 502, description = "The server's OAuth client could not be used", body = crate::ErrorBody),
    ))]
async fn connect(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<AuthorizationStart>, ApiError> {
    let id = super::server_id(&id)?;
    let (authorization_url, written) = state
        .connections
        .start_connection(&state.command_context(&caller), &caller.user, id)
        .await?;
    state.settle(&written).await;
    Ok(axum::Json(AuthorizationStart {
        authorization_url,
        status: "pending",
    }))
}

/// The caller's connection to a server.
#[utoipa::path(get, path = "/api/v1/servers/{id}/connection", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "The status", body = ConnectionView),
        (status = 404, description = "No such server", body = crate::ErrorBody),
    ))]
async fn connection_status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<ConnectionView>, ApiError> {
    let id = super::server_id(&id)?;
    Ok(axum::Json(ConnectionView::of(
        state.connections.status(&caller.user, id)?,
    )))
}

/// Disconnects the caller: tokens revoked at the provider where it allows, deleted here.
#[utoipa::path(delete, path = "/api/v1/servers/{id}/connection", tag = "connections", security(("bearer" = [])),
    params(("id" = String, Path, description = "The server's id")),
    responses(
        (status = 200, description = "Disconnected", body = DisconnectView),
        (status = 404, description = "Not connected", body = crate::ErrorBody),
    ))]
async fn disconnect(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::Json<DisconnectView>, ApiError> {
    let id = super::server_id(&id)?;
    let context = state.command_context(&caller);
    let done = state
        .connections
        .disconnect(&context, &caller.user, id, "the user disconnected")
        .await?;
    state.settle(&done.written).await;
    super::invocations::deny_pending_now_refused(&state, &context, &caller.user, id).await?;
    Ok(axum::Json(DisconnectView {
        status: "not_connected",
        tokens_revoked: done.tokens_revoked,
    }))
}

/// What the authorization server sends back (RFC 6749 §4.1.2, RFC 9207).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct CallbackQuery {
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// The OAuth redirect. From a browser (no token), a pending authorization is not finished
/// here: a page names the Switchboard user it will connect and asks the person in the browser
/// to confirm (a POST back here). The `state` binds the authorization to the user who started
/// it, not to the browser that brings it back, so a user who passed their authorization URL
/// to someone else would otherwise connect that person's account to their own user without
/// anyone seeing it. An error from the authorization server, a state that is not pending, or a
/// console that forwards the redirect with the user's token (checked against the state's
/// user) finish at once; the result is a page, or a redirect to the console's page for the
/// server.
#[utoipa::path(get, path = "/oauth/callback", tag = "oauth",
    params(CallbackQuery),
    responses(
        (status = 200, description = "The page that asks to confirm (a browser), or the page saying what happened (no console configured)", content_type = "text/html"),
        (status = 303, description = "To the console's page for the server"),
        (status = 400, description = "A page saying what went wrong", content_type = "text/html"),
    ))]
async fn oauth_callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<CallbackQuery>,
) -> Response {
    callback_landing(&state, &headers, query, None).await
}

/// The OAuth redirect of a server with its own redirect URL (every server but those whose
/// client is a client ID metadata document, and those registered before this existed): as
/// `GET /oauth/callback`, and an answer whose `state` another server's flow started is refused
/// (the mix-up defence of RFC 9700 §4.4.2: an authorization server can only send its answers
/// to the redirect URLs registered for its own client).
#[utoipa::path(get, path = "/oauth/callback/{key}", tag = "oauth",
    params(("key" = String, Path, description = "The server's callback key, as its redirect URL names it"), CallbackQuery),
    responses(
        (status = 200, description = "The page that asks to confirm (a browser), or the page saying what happened (no console configured)", content_type = "text/html"),
        (status = 303, description = "To the console's page for the server"),
        (status = 400, description = "A page saying what went wrong", content_type = "text/html"),
    ))]
async fn server_oauth_callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(key): ApiPath<String>,
    ApiQuery(query): ApiQuery<CallbackQuery>,
) -> Response {
    callback_landing(&state, &headers, query, Some(key)).await
}

/// A redirect landing at `/oauth/callback` (`key` `None`) or `/oauth/callback/{key}`.
async fn callback_landing(
    state: &AppState,
    headers: &HeaderMap,
    query: CallbackQuery,
    key: Option<String>,
) -> Response {
    // A console that forwards the redirect with the user's token gets the other-user check.
    let caller = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| state.auth.authenticate(Some(v)).ok());
    if caller.is_none()
        && query.error.is_none()
        && let Some(pending_state) = query.state.as_deref()
        && let Ok(Some((server_id, user))) = state
            .connections
            .pending_authorization(pending_state, key.as_deref())
            .await
    {
        return confirmation_page(state, server_id, &user, &query, key.as_deref());
    }
    finish_callback(
        state,
        caller.as_ref().map(|c| &c.user),
        CallbackParams {
            callback_key: key,
            code: query.code,
            state: query.state,
            iss: query.iss,
            error: query.error,
            error_description: query.error_description,
        },
    )
    .await
}

/// The confirmation the page posts: the redirect's parameters and the person's decision.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct CallbackConfirmation {
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    /// `connect`, or anything else to decline.
    pub decision: Option<String>,
}

/// The person in the browser confirms (or declines) the connection the page named.
#[utoipa::path(post, path = "/oauth/callback", tag = "oauth",
    request_body(content = CallbackConfirmation, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A page saying what happened (no console configured)", content_type = "text/html"),
        (status = 303, description = "To the console's page for the server"),
        (status = 400, description = "A page saying what went wrong", content_type = "text/html"),
    ))]
async fn oauth_callback_confirmed(State(state): State<AppState>, body: Bytes) -> Response {
    callback_confirmed(&state, &body, None).await
}

/// The person in the browser confirms (or declines) at a server's own redirect URL.
#[utoipa::path(post, path = "/oauth/callback/{key}", tag = "oauth",
    params(("key" = String, Path, description = "The server's callback key, as its redirect URL names it")),
    request_body(content = CallbackConfirmation, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "A page saying what happened (no console configured)", content_type = "text/html"),
        (status = 303, description = "To the console's page for the server"),
        (status = 400, description = "A page saying what went wrong", content_type = "text/html"),
    ))]
async fn server_oauth_callback_confirmed(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
    body: Bytes,
) -> Response {
    callback_confirmed(&state, &body, Some(key)).await
}

async fn callback_confirmed(state: &AppState, body: &[u8], key: Option<String>) -> Response {
    let mut form = CallbackConfirmation::default();
    for (name, value) in url::form_urlencoded::parse(body) {
        let field = match name.as_ref() {
            "code" => &mut form.code,
            "state" => &mut form.state,
            "iss" => &mut form.iss,
            "decision" => &mut form.decision,
            _ => continue,
        };
        *field = Some(value.into_owned());
    }
    let declined = form.decision.as_deref() != Some("connect");
    finish_callback(
        state,
        None,
        CallbackParams {
            callback_key: key,
            code: form.code.filter(|_| !declined),
            state: form.state,
            iss: form.iss,
            error: declined.then(|| "access_denied".to_owned()),
            error_description: declined
                .then(|| "the person in the browser declined at Switchboard".to_owned()),
        },
    )
    .await
}

/// The page that names the Switchboard user and the server before anything is connected.
fn confirmation_page(
    state: &AppState,
    server_id: domain::ServerId,
    user: &domain::UserId,
    query: &CallbackQuery,
    key: Option<&str>,
) -> Response {
    let server = state
        .read_models
        .servers
        .read(|d| d.get(server_id).map(|s| s.name.clone()))
        .unwrap_or_else(|| server_id.to_string());
    let hidden = |name: &str, value: Option<&str>| {
        value.map_or_else(String::new, |value| {
            format!(
                "<input type=\"hidden\" name=\"{name}\" value=\"{}\">",
                escape_html(value)
            )
        })
    };
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\">\
         <title>Switchboard: connect {server}?</title></head><body>\
         <h1>Connect {server}?</h1>\
         <p>This connects the account you just allowed at {server} to the Switchboard user \
         <strong>{user}</strong>: the AI acts as that account for them.</p>\
         <p>If you are not {user}, or did not start connecting, choose Cancel.</p>\
         <form method=\"post\" action=\"{action}\">{}{}{}\
         <button type=\"submit\" name=\"decision\" value=\"connect\">Connect</button> \
         <button type=\"submit\" name=\"decision\" value=\"cancel\">Cancel</button>\
         </form></body></html>",
        hidden("code", query.code.as_deref()),
        hidden("state", query.state.as_deref()),
        hidden("iss", query.iss.as_deref()),
        server = escape_html(&server),
        user = escape_html(user.as_str()),
        // Relative, so that a public URL with a path prefix works: the page's own path.
        action = escape_html(key.unwrap_or("callback")),
    );
    (
        [
            // Not to be framed (a click on Connect must be the person's own), kept or
            // passed on (the page holds the authorization code).
            (header::X_FRAME_OPTIONS, "DENY"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(page),
    )
        .into_response()
}

/// Finishes (or fails) the authorization and answers with the page or the redirect.
async fn finish_callback(
    state: &AppState,
    caller: Option<&domain::UserId>,
    params: CallbackParams,
) -> Response {
    let request_id = crate::error::current_request_id();
    let outcome = state
        .connections
        .complete_authorization(params, caller, &request_id)
        .await;
    if let Some(server_id) = outcome.server_id {
        // The status page the user lands on must show the outcome.
        let position = state.read_models.connections.position().max(
            state
                .log
                .last_sequence(eventlog::LogKind::Config)
                .await
                .unwrap_or(0),
        );
        state
            .read_models
            .wait_for_position(
                eventlog::LogKind::Config,
                position,
                state.settings.read_your_writes_timeout,
            )
            .await;
        if let Some(console) = &state.settings.console_url {
            let base = console.trim_end_matches('/');
            let target = match &outcome.result {
                Ok(()) => format!("{base}/servers/{server_id}?connection=connected"),
                Err(error) => format!(
                    "{base}/servers/{server_id}?connection=failed&error={}",
                    error.code()
                ),
            };
            return Redirect::to(&target).into_response();
        }
    }
    let (status, title, body) = match &outcome.result {
        Ok(()) => (
            StatusCode::OK,
            "Connected",
            "Switchboard is connected to the server as you. You can close this window.".to_owned(),
        ),
        // The store failed: its words (entry names, paths, the backend's errors) go to the
        // log, not to a browser that need not even be signed in.
        Err(error) if error.is_internal() => {
            let request_id = crate::error::current_request_id();
            tracing::error!(request_id = %request_id, "the OAuth callback failed: {error}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Not connected",
                format!(
                    "Something went wrong on Switchboard's side; try connecting again, and \
                     quote the request id {request_id} if you report it."
                ),
            )
        }
        Err(error) => (
            StatusCode::BAD_REQUEST,
            "Not connected",
            format!("{error}. {}", what_to_do(error)),
        ),
    };
    let code = outcome
        .result
        .as_ref()
        .err()
        .map(|e| format!("<p><code>{}</code></p>", e.code()))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Switchboard: {title}</title></head>\
         <body><h1>{title}</h1><p>{}</p>{code}</body></html>",
        escape_html(&body)
    );
    (status, Html(page)).into_response()
}

fn what_to_do(error: &ConnectionError) -> &'static str {
    match error {
        ConnectionError::AuthorizationDenied { code, .. } if code == "access_denied" => {
            "You declined the authorization; connect again if that was a mistake."
        }
        ConnectionError::StateInvalid => "Start connecting again from Switchboard.",
        ConnectionError::AuthorizationSuperseded | ConnectionError::AnsweredBefore { .. } => {
            "Switchboard shows the connection's current state; connect again only if it is not \
             connected."
        }
        ConnectionError::StateNotYours => {
            "Sign in as the user who started connecting, or start connecting yourself."
        }
        ConnectionError::CallbackMismatch => {
            "Start connecting again from Switchboard; if this happens again, ask an admin to \
             check the redirect URL registered for the server's OAuth client."
        }
        ConnectionError::ServerNotFound | ConnectionError::ServerDisabled => {
            "Ask an admin about this server."
        }
        _ => "Try connecting again; if it keeps failing, ask an admin to check the server.",
    }
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
