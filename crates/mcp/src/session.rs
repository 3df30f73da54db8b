//! Talking MCP to a server as one user: `rmcp`'s streamable HTTP client over the outbound
//! guard's HTTP client (connection reuse on; `rmcp`'s own default turns it off), with the
//! user's bearer token. `rmcp` negotiates the protocol era: the 2026-07-28 stateless protocol,
//! or the 2025-11-25 protocol with its session. The era a server spoke is remembered
//! ([`ProtocolEras`]), so the next session to it opens in that era straight away instead of
//! probing with `server/discover` first.
use std::error::Error as StdError;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rmcp::{
    ClientHandler, RoleClient,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, InputRequest, JsonObject,
        PaginatedRequestParams, ProtocolVersion, SubscriptionFilter, Tool,
    },
    service::{
        ClientInitializeError, ClientLifecycleMode, ClientServiceExt, NotificationContext,
        RunningService, ServiceError,
    },
    transport::{
        StreamableHttpClientTransport,
        streamable_http_client::{
            AuthRequiredError, HttpStatusError, InsufficientScopeError,
            StreamableHttpClientTransportConfig,
        },
    },
};
use tokio::sync::Notify;
use url::Url;

use crate::{OutboundClient, OutboundError};

/// Why an MCP request did not give an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum McpCallError {
    /// 401: the token is missing, expired or revoked (`challenge` is the `WWW-Authenticate`
    /// header, which names no secret).
    #[error("the server refused the access token (HTTP 401)")]
    Unauthorized { challenge: String },
    /// 403 `insufficient_scope` (or a 401 naming a scope): the grant lacks `required_scope`.
    #[error("the access token lacks a scope the server requires{}", required_scope.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    InsufficientScope { required_scope: Option<String> },
    /// The server could not be reached, or answered with a server error (network, TLS, 5xx,
    /// 429, time-out).
    #[error("the server is unreachable: {reason}")]
    Unreachable { reason: String },
    /// The outbound rules refused the request.
    #[error(transparent)]
    Refused(#[from] OutboundError),
    /// The server answered, but not as the MCP specification says.
    #[error("the server's answer broke the MCP protocol: {reason}")]
    Protocol { reason: String },
    /// The server answered with a JSON-RPC error (what MCP calls a protocol error: an unknown
    /// tool, invalid arguments, …). Its message is the server's text, shown as such: whoever
    /// reads the sentence (an AI among them) is told it is the server's, not Switchboard's.
    #[error(
        "the server answered with JSON-RPC error {code}; its message (untrusted: the server's \
         words, not Switchboard's): {message:?}"
    )]
    ErrorAnswer { code: i32, message: String },
    /// The server asked for input before the tool can finish (the 2026-07-28 protocol's
    /// `input_required` result: a question for the user, a completion from the model, the
    /// client's roots), which Switchboard does not relay; `asked` names the kinds.
    #[error(
        "the server asked for input Switchboard does not relay ({asked}); the tool did not \
         finish"
    )]
    InputRequired { asked: String },
}

impl McpCallError {
    pub fn code(&self) -> &'static str {
        match self {
            McpCallError::Unauthorized { .. } => "upstream_unauthorized",
            McpCallError::InsufficientScope { .. } => "insufficient_scope",
            McpCallError::Unreachable { .. } => "server_unreachable",
            McpCallError::Refused(_) => "address_refused",
            McpCallError::Protocol { .. } | McpCallError::ErrorAnswer { .. } => {
                "mcp_protocol_error"
            }
            McpCallError::InputRequired { .. } => "input_required",
        }
    }

    /// The exchange itself worked (the server answered in the protocol): the session that
    /// carried it is still good.
    pub fn is_an_answer(&self) -> bool {
        matches!(
            self,
            McpCallError::ErrorAnswer { .. } | McpCallError::InputRequired { .. }
        )
    }
}

/// What the client side does with what a server sends unasked: a tool-list change wakes
/// whoever waits on [`McpSession::tools_changed`].
#[derive(Debug, Clone, Default)]
pub struct SessionEvents {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for SessionEvents {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_changed.notify_one();
    }
}

/// An MCP client session for one user at one server.
#[derive(Debug)]
pub struct McpSession {
    service: RunningService<RoleClient, SessionEvents>,
    events: SessionEvents,
}

/// Largest JSON answer accepted from an MCP server.
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// Calls one session (one user's connection to one server) sends at a time. `rmcp`'s default
/// is 16 POSTs whose answer is JSON: an orchestrator running 64 of a user's calls in parallel
/// would have 48 of them queue inside the transport, their deadlines running before they are
/// even sent.
const MAX_CALLS_IN_FLIGHT: usize = 256;

/// Most pages of `tools/list` followed, and most tools taken, from one server. Far above
/// any real server's list (the largest public ones list about a hundred tools), far below
/// what would exhaust memory.
const MAX_TOOL_PAGES: usize = 64;
const MAX_TOOLS: usize = 5_000;
/// Longest a whole tool list may take (real servers answer in well under a second a page).
const MAX_TOOL_LIST_TIME: Duration = Duration::from_secs(60);

/// What an MCP server spoke when a session was last opened to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolEra {
    /// `server/discover` and the stateless protocol (2026-07-28 and later), at this version.
    Stateless(ProtocolVersion),
    /// `initialize` and a session (2025-11-25 and before).
    Sessions,
}

impl ProtocolEra {
    fn of(version: &ProtocolVersion) -> ProtocolEra {
        if version.has_initialize() {
            ProtocolEra::Sessions
        } else {
            ProtocolEra::Stateless(version.clone())
        }
    }

    fn lifecycle(&self) -> ClientLifecycleMode {
        match self {
            ProtocolEra::Stateless(version) => ClientLifecycleMode::Discover {
                preferred_versions: vec![version.clone()],
            },
            ProtocolEra::Sessions => ClientLifecycleMode::Initialize,
        }
    }
}

/// How long a server's era is trusted. After it the next session negotiates again, so a
/// server that moved to a newer era is spoken to in it within the hour (a server that stopped
/// speaking its remembered era is found at once: opening in it fails and is retried).
const ERA_MEMORY: Duration = Duration::from_secs(3600);

/// Servers remembered at most; beyond it the memory starts again (it only saves round trips).
const ERA_MEMORY_ENTRIES: usize = 4096;

/// The protocol era each MCP server (by URL) spoke when a session to it was last opened.
/// Without it every new session — after a token refresh, a failed call, a restart of the
/// connection's session — would probe a 2025-11-25 server with `server/discover` before its
/// `initialize`: one round trip more per reopen. Cheap to clone; clones share the memory.
#[derive(Debug, Clone, Default)]
pub struct ProtocolEras {
    known: Arc<Mutex<HashMap<String, (ProtocolEra, Instant)>>>,
}

impl ProtocolEras {
    /// The era `url` spoke, if that was recently enough to trust.
    pub fn get(&self, url: &Url) -> Option<ProtocolEra> {
        self.lock()
            .get(url.as_str())
            .filter(|(_, learned)| learned.elapsed() < ERA_MEMORY)
            .map(|(era, _)| era.clone())
    }

    /// Remembers that `url` spoke `era` (as [`McpSession::open`] does on each session).
    pub fn remember(&self, url: &Url, era: ProtocolEra) {
        let mut known = self.lock();
        if known.len() >= ERA_MEMORY_ENTRIES && !known.contains_key(url.as_str()) {
            known.clear();
        }
        known.insert(url.as_str().to_owned(), (era, Instant::now()));
    }

    fn forget(&self, url: &Url) {
        self.lock().remove(url.as_str());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ProtocolEra, Instant)>> {
        // A panic while holding the lock leaves the map as it was: keep using it.
        self.known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl McpSession {
    /// Opens a session at `url` with `access_token`: in the era the server spoke last time
    /// (remembered by `outbound`), else negotiated — `server/discover` first (the 2026-07-28
    /// stateless protocol), and for a server that does not know it the 2025-11-25
    /// `initialize` and its session. A server that no longer speaks its remembered era is
    /// negotiated with again at once.
    pub async fn open(
        outbound: &OutboundClient,
        url: &Url,
        access_token: &str,
    ) -> Result<McpSession, McpCallError> {
        outbound.check_url(url)?;
        // The transport's requests have no time limit of their own (a tool call keeps to
        // its invocation's deadline, a notification stream lives as long as the server
        // keeps it): opening is bounded here.
        tokio::time::timeout(
            outbound.policy().request_timeout,
            Self::open_checked(outbound, url, access_token),
        )
        .await
        .map_err(|_| McpCallError::Unreachable {
            reason: "the server did not answer the session's opening in time".to_owned(),
        })?
    }

    async fn open_checked(
        outbound: &OutboundClient,
        url: &Url,
        access_token: &str,
    ) -> Result<McpSession, McpCallError> {
        let eras = outbound.protocol_eras();
        let remembered = eras.get(url);
        let opened = match &remembered {
            Some(era) => {
                match Self::open_in(outbound, url, access_token, era.lifecycle()).await {
                    // Whatever the server answered, it was not its old era's handshake.
                    Err(
                        error @ (McpCallError::Protocol { .. } | McpCallError::ErrorAnswer { .. }),
                    ) => {
                        let reason = error.to_string();
                        // The host only: a URL may carry a secret in its query.
                        tracing::debug!(
                            host = url.host_str().unwrap_or_default(),
                            %reason,
                            "the server left its remembered protocol era; negotiating"
                        );
                        eras.forget(url);
                        Self::open_in(outbound, url, access_token, negotiate()).await
                    }
                    other => other,
                }
            }
            None => Self::open_in(outbound, url, access_token, negotiate()).await,
        }?;
        if let Some(info) = opened.service.peer().peer_info() {
            let era = ProtocolEra::of(&info.protocol_version);
            if remembered.as_ref() != Some(&era) {
                eras.remember(url, era);
            }
        }
        Ok(opened)
    }

    async fn open_in(
        outbound: &OutboundClient,
        url: &Url,
        access_token: &str,
        lifecycle: ClientLifecycleMode,
    ) -> Result<McpSession, McpCallError> {
        let config = StreamableHttpClientTransportConfig::with_uri(url.as_str())
            .auth_header(access_token)
            .max_json_response_size(MAX_ANSWER_BYTES)
            .max_concurrent_requests(MAX_CALLS_IN_FLIGHT);
        let transport = StreamableHttpClientTransport::with_client(outbound.http().clone(), config);
        let events = SessionEvents::default();
        let service = events
            .clone()
            .serve_with_lifecycle(transport, lifecycle)
            .await
            .map_err(|e| classify_init(&e))?;
        Ok(McpSession { service, events })
    }

    /// The protocol version the session speaks (`2026-07-28`, `2025-11-25`, …).
    pub fn protocol_version(&self) -> Option<String> {
        self.service
            .peer()
            .peer_info()
            .map(|info| info.protocol_version.to_string())
    }

    /// Returns when the server says its tool list changed: on a `subscriptions/listen` stream
    /// (2026-07-28), or as a notification on the session (2025-11-25). An error means the
    /// session or the stream ended; open a new session to listen again.
    /// `listening` is called once the server has accepted the subscription (or at once on a
    /// session, whose notifications need none).
    pub async fn tools_changed(&self, listening: impl FnOnce()) -> Result<(), McpCallError> {
        let stateless = self
            .protocol_version()
            .is_some_and(|v| v.as_str() >= "2026-07-28");
        if stateless {
            let mut subscription = self
                .service
                .peer()
                .listen(SubscriptionFilter::builder().tools_list_changed().build())
                .await
                .map_err(|e| classify_service(&e))?;
            listening();
            match subscription.next().await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(McpCallError::Unreachable {
                    reason: "the server ended the notification stream".to_owned(),
                }),
                Err(error) => Err(classify_service(&error)),
            }
        } else {
            listening();
            self.events.tools_changed.notified().await;
            Ok(())
        }
    }

    /// Every tool, following `nextCursor` to the end — within bounds: a server that pages
    /// on and on (a fresh cursor each time, a repeated one, pages of megabytes, slow pages)
    /// is refused rather than followed until memory or patience runs out. Each page is
    /// bounded in time by `page_timeout`, the whole list by [`MAX_TOOL_LIST_TIME`] (a probe
    /// of one hostile server must not hold up the monitor's other probes for long).
    pub async fn list_tools(&self, page_timeout: Duration) -> Result<Vec<Tool>, McpCallError> {
        tokio::time::timeout(MAX_TOOL_LIST_TIME, self.list_pages(page_timeout))
            .await
            .map_err(|_| McpCallError::Unreachable {
                reason: format!(
                    "the server did not list its tools within {} s",
                    MAX_TOOL_LIST_TIME.as_secs()
                ),
            })?
    }

    async fn list_pages(&self, page_timeout: Duration) -> Result<Vec<Tool>, McpCallError> {
        let peer = self.service.peer();
        let mut tools: Vec<Tool> = Vec::new();
        let mut cursors_seen: HashSet<String> = HashSet::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_TOOL_PAGES {
            let params = PaginatedRequestParams::default().with_cursor(cursor.take());
            let page = tokio::time::timeout(page_timeout, peer.list_tools(Some(params)))
                .await
                .map_err(|_| McpCallError::Unreachable {
                    reason: "the server did not answer tools/list in time".to_owned(),
                })?
                .map_err(|e| classify_service(&e))?;
            tools.extend(page.tools);
            if tools.len() > MAX_TOOLS {
                return Err(McpCallError::Protocol {
                    reason: format!("the server lists more than {MAX_TOOLS} tools"),
                });
            }
            match page.next_cursor {
                None => return Ok(tools),
                Some(next) if !cursors_seen.insert(next.clone()) => {
                    return Err(McpCallError::Protocol {
                        reason: "the server's tool list pages in a circle (a cursor came back)"
                            .to_owned(),
                    });
                }
                Some(next) => cursor = Some(next),
            }
        }
        Err(McpCallError::Protocol {
            reason: format!("the server's tool list runs over more than {MAX_TOOL_PAGES} pages"),
        })
    }

    /// Calls one tool (`tools/call`) with `arguments`. A result with `isError` is a result:
    /// the tool ran and reported a failure; only a failed exchange is an error.
    ///
    /// Dropping the future before the answer (an invocation's deadline) cancels the call at
    /// the server: `rmcp` sends `notifications/cancelled`, which in the stateless era closes
    /// the request's stream instead. Keep the call in this future for that reason: a call
    /// spawned apart would run on at the server after its caller was told it failed.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: JsonObject,
    ) -> Result<CallToolResult, McpCallError> {
        let mut params = CallToolRequestParams::new(name.to_owned());
        params.arguments = Some(arguments);
        let response = self
            .service
            .peer()
            .call_tool_once(params)
            .await
            .map_err(|e| classify_service(&e))?;
        match response {
            CallToolResponse::Complete(result) => Ok(result),
            CallToolResponse::InputRequired(asked) => {
                let mut kinds: Vec<&str> = asked
                    .input_requests
                    .iter()
                    .flat_map(|requests| requests.values())
                    .map(|request| match request {
                        InputRequest::Elicitation(_) => "a question for the user",
                        InputRequest::CreateMessage(_) => "a completion from the model",
                        InputRequest::ListRoots(_) => "the client's roots",
                        _ => "a kind of input this version does not know",
                    })
                    .collect();
                kinds.sort_unstable();
                kinds.dedup();
                Err(McpCallError::InputRequired {
                    asked: if kinds.is_empty() {
                        "nothing named".to_owned()
                    } else {
                        kinds.join(", ")
                    },
                })
            }
            // Switchboard never asks for a task (SEP-2663), so one is not an answer to it.
            CallToolResponse::Task(_) => Err(McpCallError::Protocol {
                reason: "the server answered with a task, which was not asked for".to_owned(),
            }),
            _ => Err(McpCallError::Protocol {
                reason: "the server answered tools/call with an unknown kind of result".to_owned(),
            }),
        }
    }

    /// Ends the session (a `DELETE` for the 2025-11-25 era); errors are of no interest then.
    pub async fn close(self) {
        let _ = self.service.cancel().await;
    }
}

/// The era negotiation: `server/discover` for 2026-07-28, falling back to `initialize`.
fn negotiate() -> ClientLifecycleMode {
    ClientLifecycleMode::Auto {
        preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        legacy_version: None,
    }
}

/// Lists a server's tools in a session opened and closed for it.
pub async fn list_tools(
    outbound: &OutboundClient,
    url: &Url,
    access_token: &str,
) -> Result<Vec<Tool>, McpCallError> {
    let session = McpSession::open(outbound, url, access_token).await?;
    let tools = session.list_tools(outbound.policy().request_timeout).await;
    session.close().await;
    tools
}

fn classify_init(error: &ClientInitializeError) -> McpCallError {
    match error.auth_challenge() {
        Some(challenge) => classify_challenge(challenge),
        None => classify_chain(error),
    }
}

/// A `WWW-Authenticate` challenge: `insufficient_scope` names the scope the grant lacks;
/// anything else means the token is not accepted.
fn classify_challenge(challenge: &str) -> McpCallError {
    if challenge.contains("insufficient_scope") {
        let required_scope = challenge
            .split("scope=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(str::to_owned);
        McpCallError::InsufficientScope { required_scope }
    } else {
        McpCallError::Unauthorized {
            challenge: truncate(challenge),
        }
    }
}

fn classify_service(error: &ServiceError) -> McpCallError {
    match error {
        ServiceError::McpError(data) => McpCallError::ErrorAnswer {
            code: data.code.0,
            message: truncate(&data.message),
        },
        ServiceError::Timeout { .. } => McpCallError::Unreachable {
            reason: "the server did not answer in time".to_owned(),
        },
        other => match other.auth_challenge() {
            Some(challenge) => classify_challenge(challenge),
            None => classify_chain(other),
        },
    }
}

/// Walks the error's sources for what the HTTP exchange said.
fn classify_chain(error: &(dyn StdError + 'static)) -> McpCallError {
    let mut source: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(auth) = current.downcast_ref::<AuthRequiredError>() {
            return McpCallError::Unauthorized {
                challenge: truncate(&auth.www_authenticate_header),
            };
        }
        if let Some(scope) = current.downcast_ref::<InsufficientScopeError>() {
            return McpCallError::InsufficientScope {
                required_scope: scope.required_scope.clone(),
            };
        }
        if let Some(status) = current.downcast_ref::<HttpStatusError>() {
            return McpCallError::Unreachable {
                reason: format!("the server answered HTTP {}", status.status),
            };
        }
        if let Some(http) = current.downcast_ref::<reqwest::Error>() {
            if let Some(status) = http.status()
                && status.is_client_error()
            {
                return McpCallError::Protocol {
                    reason: format!("the server answered HTTP {}", status.as_u16()),
                };
            }
            return McpCallError::Unreachable {
                reason: describe_transport_error(http),
            };
        }
        if current.downcast_ref::<std::io::Error>().is_some() {
            return McpCallError::Unreachable {
                reason: truncate(&current.to_string()),
            };
        }
        source = current.source();
    }
    McpCallError::Protocol {
        reason: truncate(&error.to_string()),
    }
}

fn describe_transport_error(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "the server did not answer in time".to_owned();
    }
    // The innermost cause says what happened (refused, reset, certificate); the URL is left
    // out (`without_url`), since a URL may carry a secret in its query.
    let mut reason = String::from(if error.is_connect() {
        "cannot connect"
    } else {
        "the request failed"
    });
    let mut source = StdError::source(error);
    let mut innermost = None;
    while let Some(current) = source {
        innermost = Some(current.to_string());
        source = current.source();
    }
    if let Some(detail) = innermost {
        reason.push_str(": ");
        reason.push_str(&detail);
    }
    truncate(&reason)
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}
