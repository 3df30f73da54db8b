//! The fixture's MCP endpoint: `rmcp`'s streamable HTTP server (an issue tracker's tools)
//! behind a bearer-token check against the fixture's authorization server.
//!
//! - **Eras.** [`McpEra::Stateless`] is `rmcp`'s server without sessions: a client that
//!   starts with `server/discover` speaks protocol 2026-07-28; a client that starts with
//!   `initialize` is served too, statelessly, on the newest version with a handshake
//!   (2025-11-25). [`McpEra::Sessions`] speaks 2025-11-25 only, with `Mcp-Session-Id`
//!   sessions. `rmcp`'s server answers `server/discover` even in session mode (with the
//!   supported versions, which makes a 2026-07-28 client fail rather than fall back), so the
//!   fixture answers it itself as a 2025-11-25 server does (400, JSON-RPC "method not found",
//!   which `rmcp`'s `Auto` client takes as a legacy server), and refuses any request naming
//!   2026-07-28 (400, as for an unknown `MCP-Protocol-Version`).
//! - **Tool changes.** [`crate::FixtureHandle::set_tools`] sends
//!   `notifications/tools/list_changed` to open sessions (sessions era) and on
//!   `subscriptions/listen` streams (stateless era, 2026-07-28); a stateless client that holds
//!   no subscription learns nothing until it lists again.
//! - **Scopes.** Any valid token may list and call tools; a destructive tool
//!   (`destructive: Some(true)`) also needs `issues:write`, else the HTTP answer is the
//!   [`crate::ScopeChallenge`] (403 or 401, `error="insufficient_scope"`).
use std::{borrow::Cow, sync::Arc};

use axum::{
    body::Body,
    extract::Request,
    http::{StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
    routing::{MethodRouter, any},
};
use rmcp::{
    ErrorData as McpError, RoleServer, ServerHandler,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, Implementation,
        InitializeRequestParams, InitializeResult, ListToolsResult, PaginatedRequestParams,
        ProtocolVersion, ServerCapabilities, ServerConfig, SubscriptionFilter, Tool,
    },
    service::{RequestContext, SubscriptionContext},
    transport::{
        StreamableHttpServerConfig, StreamableHttpService,
        streamable_http_server::session::local::LocalSessionManager,
    },
};
use serde_json::{Value, json};

use crate::oauth::{
    Caller, DEFAULT_USER, McpRequestSeen, READ_SCOPE, ScopeChallenge, Shared, TokenCheck,
    WRITE_SCOPE, bearer, origin,
};

/// Which revision of MCP the fixture's endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum McpEra {
    /// Protocol 2026-07-28 without sessions (`rmcp`'s stateless server); `initialize` is
    /// served statelessly too.
    Stateless,
    /// Protocol 2025-11-25 only (what `initialize` negotiates, whatever the client asks), with
    /// `Mcp-Session-Id` sessions; `server/discover` and requests naming 2026-07-28 are refused.
    Sessions,
}

/// What a fixture tool answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolOutput {
    /// One text block.
    Text(String),
    /// `structuredContent`, and its JSON text as a text block.
    Structured(Value),
    /// A text block of this many bytes.
    Oversized(usize),
    /// `isError: true` with this text.
    Error(String),
    /// No result: a JSON-RPC error (`-32602`, invalid params) with this message.
    JsonRpcError(String),
    /// One text block, sent `after` the call arrived: a tool that takes its time.
    Slow {
        after: std::time::Duration,
        text: String,
    },
    /// Answers only once `calls` calls of it are in at the same time (each waits for the
    /// others): `together`; after 10 s of waiting, `isError` with how many came.
    Together { calls: usize },
    /// No result: the 2026-07-28 `input_required` answer, asking the user a question
    /// (`elicitation/create`) with this message.
    AsksTheUser(String),
}

/// A tool of the fixture server.
#[derive(Debug, Clone, PartialEq)]
pub struct FixtureTool {
    pub name: String,
    pub title: Option<String>,
    pub description: String,
    pub input_schema: Value,
    pub output_schema: Option<Value>,
    /// `annotations.readOnlyHint`.
    pub read_only: Option<bool>,
    /// `annotations.destructiveHint`; a destructive tool needs `issues:write`.
    pub destructive: Option<bool>,
    pub output: ToolOutput,
}

/// The size of `export_all`'s answer in [`FixtureTool::standard_set`].
pub const EXPORT_ALL_BYTES: usize = 5 * 1024 * 1024;
/// Tools per `tools/list` page.
pub const TOOLS_PAGE_SIZE: usize = 2;

impl FixtureTool {
    /// An issue tracker: `search_issues` (read-only, structured output), `create_issue`,
    /// `delete_issue` (destructive: needs `issues:write`) and `export_all` (read-only,
    /// [`EXPORT_ALL_BYTES`] of text).
    #[must_use]
    pub fn standard_set() -> Vec<FixtureTool> {
        vec![
            FixtureTool {
                name: "search_issues".to_owned(),
                title: Some("Search issues".to_owned()),
                description: "Finds issues whose title contains the query.".to_owned(),
                input_schema: json!({
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"],
                }),
                output_schema: Some(json!({
                    "type": "object",
                    "properties": {"issues": {"type": "array", "items": {"type": "object"}}},
                    "required": ["issues"],
                })),
                read_only: Some(true),
                destructive: Some(false),
                output: ToolOutput::Structured(json!({
                    "issues": [{"key": "FX-1", "title": "The first issue"}],
                })),
            },
            FixtureTool {
                name: "create_issue".to_owned(),
                title: Some("Create an issue".to_owned()),
                description: "Creates an issue.".to_owned(),
                input_schema: json!({
                    "type": "object",
                    "properties": {"title": {"type": "string"}, "body": {"type": "string"}},
                    "required": ["title"],
                }),
                output_schema: None,
                read_only: Some(false),
                destructive: Some(false),
                output: ToolOutput::Text("Created FX-2".to_owned()),
            },
            FixtureTool {
                name: "delete_issue".to_owned(),
                title: Some("Delete an issue".to_owned()),
                description: "Deletes an issue for good.".to_owned(),
                input_schema: json!({
                    "type": "object",
                    "properties": {"key": {"type": "string"}},
                    "required": ["key"],
                }),
                output_schema: None,
                read_only: Some(false),
                destructive: Some(true),
                output: ToolOutput::Text("Deleted".to_owned()),
            },
            FixtureTool {
                name: "export_all".to_owned(),
                title: Some("Export every issue".to_owned()),
                description: "Exports the whole tracker as text.".to_owned(),
                input_schema: json!({"type": "object", "properties": {}}),
                output_schema: None,
                read_only: Some(true),
                destructive: Some(false),
                output: ToolOutput::Oversized(EXPORT_ALL_BYTES),
            },
        ]
    }

    /// The tool as `tools/list` shows it.
    fn definition(&self) -> Value {
        let mut tool = json!({
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
        });
        if let Some(title) = &self.title {
            tool["title"] = json!(title);
        }
        if let Some(schema) = &self.output_schema {
            tool["outputSchema"] = schema.clone();
        }
        let mut annotations = json!({});
        if let Some(read_only) = self.read_only {
            annotations["readOnlyHint"] = json!(read_only);
        }
        if let Some(destructive) = self.destructive {
            annotations["destructiveHint"] = json!(destructive);
        }
        if annotations != json!({}) {
            tool["annotations"] = annotations;
        }
        tool
    }

    fn needs_write_scope(&self) -> bool {
        self.destructive == Some(true)
    }

    /// The tool's answer, or the message of its JSON-RPC error.
    fn result(&self) -> Result<Value, String> {
        Ok(match &self.output {
            ToolOutput::Text(text) | ToolOutput::Slow { text, .. } => {
                json!({"content": [{"type": "text", "text": text}]})
            }
            ToolOutput::Structured(value) => json!({
                "content": [{"type": "text", "text": value.to_string()}],
                "structuredContent": value,
            }),
            ToolOutput::Oversized(bytes) => {
                let line = "FX-0000 an exported issue line\n";
                let text: String = line.chars().cycle().take(*bytes).collect();
                json!({"content": [{"type": "text", "text": text}]})
            }
            ToolOutput::Error(text) => json!({
                "content": [{"type": "text", "text": text}],
                "isError": true,
            }),
            ToolOutput::JsonRpcError(message) => return Err(message.clone()),
            ToolOutput::Together { .. } => {
                json!({"content": [{"type": "text", "text": "together"}]})
            }
            ToolOutput::AsksTheUser(question) => json!({
                "resultType": "input_required",
                "inputRequests": {
                    "project": {
                        "method": "elicitation/create",
                        "params": {
                            "mode": "form",
                            "message": question,
                            "requestedSchema": {
                                "type": "object",
                                "properties": {"project": {"type": "string"}},
                            },
                        },
                    },
                },
                "requestState": "fixture-state",
            }),
        })
    }

    /// How long the tool takes before it answers.
    fn delay(&self) -> std::time::Duration {
        match &self.output {
            ToolOutput::Slow { after, .. } => *after,
            _ => std::time::Duration::ZERO,
        }
    }
}

/// How a call of a slow tool ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlowCallEnd {
    /// The tool took its time and answered.
    Answered { tool: String },
    /// The client cancelled the call before the tool answered.
    Abandoned { tool: String },
}

/// Records how a slow call ended when it ends, also when its future is dropped.
struct SlowCall<'a> {
    shared: &'a Shared,
    tool: String,
    answered: bool,
}

impl Drop for SlowCall<'_> {
    fn drop(&mut self) {
        let tool = std::mem::take(&mut self.tool);
        let end = if self.answered {
            SlowCallEnd::Answered { tool }
        } else {
            SlowCallEnd::Abandoned { tool }
        };
        self.shared
            .slow_calls_ended
            .send_modify(|ended| ended.push(end));
    }
}

/// The tool-list version when the HTTP request arrived (a subscription opened by it reports
/// changes after that).
#[derive(Debug, Clone, Copy)]
struct ToolsVersion(u64);

#[derive(Clone)]
struct FixtureMcp {
    shared: Arc<Shared>,
}

fn caller_of(extensions: &rmcp::model::Extensions) -> Option<Caller> {
    extensions
        .get::<Parts>()
        .and_then(|parts| parts.extensions.get::<Caller>())
        .cloned()
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, McpError> {
    serde_json::from_value(value).map_err(|e| McpError::internal_error(e.to_string(), None))
}

impl ServerHandler for FixtureMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
        .with_server_info(Implementation::new("fixture-issues", "1.0.0"))
    }

    fn supported_protocol_versions(&self) -> Cow<'static, [ProtocolVersion]> {
        match self.shared.config.mcp_era {
            McpEra::Stateless => Cow::Borrowed(ProtocolVersion::KNOWN_VERSIONS),
            McpEra::Sessions => Cow::Borrowed(SESSIONS_ERA_VERSIONS),
        }
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        context.peer.set_peer_info(request.clone());
        if self.shared.config.mcp_era == McpEra::Sessions {
            let user = caller_of(&context.extensions).map_or_else(String::new, |c| c.user);
            self.shared
                .state()
                .session_peers
                .push((user, context.peer.clone()));
        }
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let user = caller_of(&context.extensions).map_or_else(String::new, |c| c.user);
        let page = {
            let mut state = self.shared.state();
            state.tools_list_requests += 1;
            let tools = state.tools_for(&user);
            let start = match request.and_then(|r| r.cursor) {
                None => 0,
                Some(cursor) => cursor
                    .parse::<usize>()
                    .ok()
                    .filter(|start| *start < tools.len())
                    .ok_or_else(|| McpError::invalid_params("the cursor is not valid", None))?,
            };
            let end = (start + TOOLS_PAGE_SIZE).min(tools.len());
            let definitions: Vec<Value> = tools[start..end]
                .iter()
                .map(FixtureTool::definition)
                .collect();
            let mut page = json!({"tools": definitions});
            if end < tools.len() {
                page["nextCursor"] = json!(end.to_string());
            } else if state.tool_pages_in_a_circle {
                page["nextCursor"] = json!("0");
            }
            page
        };
        from_json(page)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let user = caller_of(&context.extensions).map_or_else(String::new, |c| c.user);
        let result = {
            let mut state = self.shared.state();
            *state
                .tool_calls
                .entry(request.name.to_string())
                .or_default() += 1;
            state
                .tool_call_arguments
                .entry(request.name.to_string())
                .or_default()
                .push(request.arguments.clone().map_or(Value::Null, Value::Object));
            let found = state
                .tools_for(&user)
                .iter()
                .find(|tool| tool.name == request.name)
                .map(|tool| {
                    let together = match tool.output {
                        ToolOutput::Together { calls } => Some(calls),
                        _ => None,
                    };
                    (tool.delay(), tool.result(), together)
                });
            found.map(|(delay, result, together)| {
                // A `Together` tool counts the calls that reached it.
                let gathering = together.map(|calls| {
                    let arrived = state
                        .arrived
                        .entry(request.name.to_string())
                        .or_insert_with(|| tokio::sync::watch::Sender::new(0));
                    arrived.send_modify(|n| *n += 1);
                    (calls, arrived.subscribe())
                });
                (delay, result, gathering)
            })
        };
        let Some((delay, result, gathering)) = result else {
            return Err(McpError::invalid_params(
                format!("unknown tool: {}", request.name),
                None,
            ));
        };
        if let Some((calls, mut arrived)) = gathering {
            let waited = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                arrived.wait_for(|n| *n >= calls),
            )
            .await
            .is_ok();
            if !waited {
                let came = *arrived.borrow();
                return Ok(CallToolResponse::Complete(from_json::<CallToolResult>(
                    json!({
                        "content": [{"type": "text", "text": format!("only {came} of {calls} came together")}],
                        "isError": true,
                    }),
                )?));
            }
        }
        if !delay.is_zero() {
            // Ended by the client's cancellation: `notifications/cancelled` (sessions era)
            // cancels the context, a closed request (stateless era) drops this future.
            let mut ending = SlowCall {
                shared: &self.shared,
                tool: request.name.to_string(),
                answered: false,
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => ending.answered = true,
                () = context.ct.cancelled() => {
                    return Err(McpError::internal_error("cancelled by the client", None));
                }
            }
        }
        let result = result.map_err(|message| McpError::invalid_params(message, None))?;
        if result["resultType"] == "input_required" {
            return Ok(CallToolResponse::InputRequired(from_json(result)?));
        }
        Ok(CallToolResponse::Complete(from_json::<CallToolResult>(
            result,
        )?))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        let definition = self
            .shared
            .state()
            .default_tools
            .iter()
            .find(|tool| tool.name == name)?
            .definition();
        serde_json::from_value(definition).ok()
    }

    fn accepted_subscription_filter(
        &self,
        _requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        Some(SubscriptionFilter::builder().tools_list_changed().build())
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let mut seen = context
            .request_context()
            .extensions
            .get::<Parts>()
            .and_then(|parts| parts.extensions.get::<ToolsVersion>())
            .map_or_else(|| *self.shared.tools_changed.borrow(), |v| v.0);
        let mut changes = self.shared.tools_changed.subscribe();
        loop {
            let next = tokio::select! {
                () = context.cancelled() => None,
                changed = changes.wait_for(|version| *version != seen) => {
                    changed.ok().map(|version| *version)
                }
            };
            let Some(version) = next else {
                return Ok(());
            };
            seen = version;
            if context.sink().notify_tool_list_changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

/// What the sessions era speaks.
const SESSIONS_ERA_VERSIONS: &[ProtocolVersion] = &[ProtocolVersion::V_2025_11_25];

/// Largest request body the endpoint reads.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// The `/mcp` route: the token check, then `rmcp`.
pub(crate) fn entry(shared: Arc<Shared>) -> MethodRouter {
    let sessions = shared.config.mcp_era == McpEra::Sessions;
    let config = StreamableHttpServerConfig::default()
        // Tests use names like `fixture.test`, mapped to loopback by their resolver.
        .disable_allowed_hosts()
        .with_legacy_session_mode(sessions)
        .with_json_response(!sessions);
    let handler = FixtureMcp {
        shared: shared.clone(),
    };
    let service = StreamableHttpService::new(
        move || Ok(handler.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    any(move |request: Request| {
        let (shared, service) = (shared.clone(), service.clone());
        async move { serve(&shared, &service, request).await }
    })
}

/// The `WWW-Authenticate` challenge: `error` (e.g. `invalid_token`) and the scope to name.
fn challenge(shared: &Shared, origin: &str, error: Option<(&str, &str)>, scope: &str) -> String {
    let mut parts = Vec::new();
    if let Some((error, description)) = error {
        parts.push(format!("error=\"{error}\""));
        parts.push(format!("error_description=\"{description}\""));
    }
    if shared.config.protected_resource_metadata {
        parts.push(format!(
            "resource_metadata=\"{origin}/.well-known/oauth-protected-resource/mcp\""
        ));
        parts.push(format!("scope=\"{scope}\""));
    } else {
        parts.insert(0, "realm=\"mcp\"".to_owned());
        if error.is_some() {
            parts.push(format!("scope=\"{scope}\""));
        }
    }
    format!("Bearer {}", parts.join(", "))
}

fn refuse(status: StatusCode, challenge: String) -> Response {
    (status, [(header::WWW_AUTHENTICATE, challenge)]).into_response()
}

/// The version a JSON-RPC request names: `MCP-Protocol-Version`, `initialize`'s
/// `protocolVersion`, or its `_meta`.
fn protocol_version(parts: &Parts, message: &Value) -> Option<String> {
    parts
        .headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            message["params"]["protocolVersion"]
                .as_str()
                .or_else(|| {
                    message["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"].as_str()
                })
                .map(str::to_owned)
        })
}

async fn serve(
    shared: &Shared,
    service: &StreamableHttpService<FixtureMcp, LocalSessionManager>,
    request: Request,
) -> Response {
    let config = &shared.config;
    if let Some(target) = config.redirect_mcp_to {
        return Redirect::temporary(target).into_response();
    }
    if shared.state().mcp_down {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "The fixture MCP server is down\n",
        )
            .into_response();
    }
    let origin = origin(request.headers());
    let caller = if config.requires_oauth {
        let Some(token) = bearer(request.headers()) else {
            return refuse(
                StatusCode::UNAUTHORIZED,
                challenge(shared, &origin, None, READ_SCOPE),
            );
        };
        let check = shared
            .state()
            .check_access_token(&token, &format!("{origin}/mcp"));
        match check {
            TokenCheck::Valid(caller) => caller,
            TokenCheck::Invalid(why) => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    challenge(shared, &origin, Some(("invalid_token", why)), READ_SCOPE),
                );
            }
        }
    } else {
        Caller {
            user: DEFAULT_USER.to_owned(),
            scopes: vec![READ_SCOPE.to_owned(), WRITE_SCOPE.to_owned()],
        }
    };

    let (mut parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY).await else {
        return (StatusCode::PAYLOAD_TOO_LARGE, "The request is too large\n").into_response();
    };
    let message: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let method = message["method"].as_str().map(str::to_owned);
    let version = protocol_version(&parts, &message);
    let session_id = parts
        .headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    shared.state().mcp_requests.push(McpRequestSeen {
        http_method: parts.method.to_string(),
        method: method.clone(),
        protocol_version: version.clone(),
        session_id,
        user: caller.user.clone(),
    });
    shared.mcp_requests_seen.send_modify(|n| *n += 1);

    if config.mcp_era == McpEra::Sessions {
        if method.as_deref() == Some("server/discover") {
            let error = json!({
                "jsonrpc": "2.0",
                "id": message["id"],
                "error": {"code": -32601, "message": "Method not found: server/discover"},
            });
            return (StatusCode::BAD_REQUEST, axum::Json(error)).into_response();
        }
        let initialize = method.as_deref() == Some("initialize");
        if !initialize
            && version
                .as_deref()
                .is_some_and(|v| v > ProtocolVersion::V_2025_11_25.as_str())
        {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "Bad Request: Unsupported MCP-Protocol-Version: {}",
                    version.unwrap_or_default()
                ),
            )
                .into_response();
        }
    }

    if method.as_deref() == Some("tools/call")
        && let Some(name) = message["params"]["name"].as_str()
    {
        let needs_write = shared
            .state()
            .tools_for(&caller.user)
            .iter()
            .any(|tool| tool.name == name && tool.needs_write_scope());
        if needs_write && !caller.scopes.iter().any(|s| s == WRITE_SCOPE) {
            let status = match config.scope_challenge {
                ScopeChallenge::Forbidden => StatusCode::FORBIDDEN,
                ScopeChallenge::Unauthorized => StatusCode::UNAUTHORIZED,
            };
            let description = format!("The tool {name} needs the scope {WRITE_SCOPE}");
            return refuse(
                status,
                challenge(
                    shared,
                    &origin,
                    Some(("insufficient_scope", &description)),
                    &format!("{READ_SCOPE} {WRITE_SCOPE}"),
                ),
            );
        }
    }

    parts.extensions.insert(caller);
    parts
        .extensions
        .insert(ToolsVersion(*shared.tools_changed.borrow()));
    let response = service
        .handle(Request::from_parts(parts, Body::from(body)))
        .await;
    if method.as_deref() == Some("initialize") && response.headers().contains_key("mcp-session-id")
    {
        shared.state().sessions_opened += 1;
    }
    response.map(Body::new)
}
