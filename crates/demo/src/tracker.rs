//! The demo MCP server: an in-memory issue tracker served by `rmcp`'s streamable HTTP server
//! (stateless, JSON answers) behind a bearer-token check against the tokens the demo
//! authorization server issued; its RFC 9728 metadata; and `GET /demo/stats`.
use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get},
};
use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, ListToolsResult,
        PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
    },
    service::RequestContext,
    transport::{
        StreamableHttpServerConfig, StreamableHttpService,
        streamable_http_server::session::local::LocalSessionManager,
    },
};
use serde_json::{Value, json};

use crate::{
    SCOPES,
    state::{Issue, Shared, TokenCheck},
};

/// The size of `export_all`'s answer: beyond Switchboard's 1 MiB result cap.
pub(crate) const EXPORT_ALL_BYTES: usize = 3 * 512 * 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let config = StreamableHttpServerConfig::default()
        // The endpoint is reached as 127.0.0.1:<port>; rmcp's Host check guards against DNS
        // rebinding from a browser, which the bearer-token check below already defeats.
        .disable_allowed_hosts()
        .with_legacy_session_mode(false)
        .with_json_response(true);
    let handler = Tracker {
        shared: shared.clone(),
    };
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let (metadata, stats, mcp) = (shared.clone(), shared.clone(), shared);
    Router::new()
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(move || async move { Json(resource_metadata(&metadata)) }),
        )
        .route(
            "/demo/stats",
            get(move || async move { Json(stats.stats()) }),
        )
        .route(
            "/mcp",
            any(move |request: Request| {
                let (shared, service) = (mcp.clone(), service.clone());
                async move { serve(&shared, &service, request).await }
            }),
        )
}

fn resource_metadata(shared: &Shared) -> Value {
    json!({
        "resource": shared.resource,
        "authorization_servers": [shared.issuer],
        "scopes_supported": SCOPES,
        "bearer_methods_supported": ["header"],
        "resource_name": crate::SERVER_NAME,
    })
}

/// The token of an `Authorization: Bearer` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

async fn serve(
    shared: &Shared,
    service: &StreamableHttpService<Tracker, LocalSessionManager>,
    request: Request,
) -> Response {
    let check = match bearer(request.headers()) {
        None => TokenCheck::Invalid(""),
        Some(token) => shared.state().check_access_token(token),
    };
    if let TokenCheck::Invalid(why) = check {
        // RFC 6750 §3 and RFC 9728 §5.1: where to find out how to get a token.
        let mut challenge = String::from("Bearer ");
        if !why.is_empty() {
            challenge.push_str(&format!(
                "error=\"invalid_token\", error_description=\"{why}\", "
            ));
        }
        challenge.push_str(&format!(
            "resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp\", scope=\"{}\"",
            shared.mcp_origin,
            SCOPES.join(" ")
        ));
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response();
    }
    service.handle(request).await.map(Body::new)
}

#[derive(Clone)]
struct Tracker {
    shared: Arc<Shared>,
}

fn tool_definitions() -> Value {
    json!([
        {
            "name": "search_issues",
            "title": "Search issues",
            "description": "Finds issues whose title or text contains the query (case-insensitive).",
            "inputSchema": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
            "outputSchema": {
                "type": "object",
                "properties": {"issues": {"type": "array", "items": {"type": "object"}}},
                "required": ["issues"],
            },
            "annotations": {"readOnlyHint": true, "destructiveHint": false},
        },
        {
            "name": "create_issue",
            "title": "Create an issue",
            "description": "Creates an issue.",
            "inputSchema": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                "required": ["title"],
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": false},
        },
        {
            "name": "delete_issue",
            "title": "Delete an issue",
            "description": "Deletes an issue for good.",
            "inputSchema": {
                "type": "object",
                "properties": {"key": {"type": "string"}},
                "required": ["key"],
            },
            "annotations": {"readOnlyHint": false, "destructiveHint": true},
        },
        {
            "name": "export_all",
            "title": "Export every issue",
            "description": "Exports the whole tracker as text (a large answer).",
            "inputSchema": {"type": "object", "properties": {}},
            "annotations": {"readOnlyHint": true, "destructiveHint": false},
        },
    ])
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, McpError> {
    serde_json::from_value(value).map_err(|e| McpError::internal_error(e.to_string(), None))
}

fn text(text: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": text.into()}]})
}

fn tool_error(message: impl Into<String>) -> Value {
    json!({"content": [{"type": "text", "text": message.into()}], "isError": true})
}

impl Tracker {
    /// Runs a tool on the tracker: the result as MCP JSON.
    fn run(&self, name: &str, arguments: &serde_json::Map<String, Value>) -> Option<Value> {
        let argument = |name: &str| arguments.get(name).and_then(Value::as_str);
        let mut state = self.shared.state();
        *state.stats.tool_calls.entry(name.to_owned()).or_default() += 1;
        let result = match name {
            "search_issues" => {
                let Some(query) = argument("query") else {
                    return Some(tool_error("query is required"));
                };
                let query = query.to_lowercase();
                let found: Vec<&Issue> = state
                    .issues
                    .iter()
                    .filter(|issue| {
                        issue.title.to_lowercase().contains(&query)
                            || issue.body.to_lowercase().contains(&query)
                    })
                    .collect();
                let value = json!({"issues": found});
                json!({
                    "content": [{"type": "text", "text": value.to_string()}],
                    "structuredContent": value,
                })
            }
            "create_issue" => {
                let Some(title) = argument("title").filter(|t| !t.trim().is_empty()) else {
                    return Some(tool_error("title is required"));
                };
                let key = format!("DEMO-{}", state.next_issue);
                state.next_issue += 1;
                let issue = Issue {
                    key: key.clone(),
                    title: title.chars().take(200).collect(),
                    body: argument("body")
                        .unwrap_or_default()
                        .chars()
                        .take(2000)
                        .collect(),
                };
                state.issues.push(issue);
                text(format!("Created {key}"))
            }
            "delete_issue" => {
                let Some(key) = argument("key") else {
                    return Some(tool_error("key is required"));
                };
                let before = state.issues.len();
                state.issues.retain(|issue| issue.key != key);
                if state.issues.len() < before {
                    text(format!("Deleted {key}"))
                } else {
                    tool_error(format!("There is no issue {key}"))
                }
            }
            "export_all" => {
                let mut export = String::with_capacity(EXPORT_ALL_BYTES + 256);
                'fill: loop {
                    for issue in &state.issues {
                        export
                            .push_str(&format!("{}\t{}\t{}\n", issue.key, issue.title, issue.body));
                        if export.len() >= EXPORT_ALL_BYTES {
                            break 'fill;
                        }
                    }
                    if state.issues.is_empty() {
                        export.push_str("(no issues)\n");
                        break;
                    }
                }
                text(export)
            }
            _ => return None,
        };
        Some(result)
    }
}

impl ServerHandler for Tracker {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("switchboard-demo-issues", "1.0.0"))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        from_json(json!({"tools": tool_definitions()}))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let arguments = request.arguments.clone().unwrap_or_default();
        let Some(result) = self.run(&request.name, &arguments) else {
            return Err(McpError::invalid_params(
                format!("unknown tool: {}", request.name),
                None,
            ));
        };
        Ok(CallToolResponse::Complete(from_json::<CallToolResult>(
            result,
        )?))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        let definitions = tool_definitions();
        let definition = definitions
            .as_array()?
            .iter()
            .find(|tool| tool["name"] == name)?
            .clone();
        serde_json::from_value(definition).ok()
    }
}
