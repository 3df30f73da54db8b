//! The terminal walk-through: commands that drive a running `switchboard up` over its HTTP API
//! with a bearer token, for a person without a console. Each prints what happened and, when
//! something failed, what to do about it.
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::configuration::Settings;

/// Where the API is and who is asking.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The bearer token [env: SWITCHBOARD_TOKEN]; mint one with `switchboard token`.
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The running Switchboard [env: SWITCHBOARD_URL]; by default its public URL, else
    /// `http://<listen>`.
    #[arg(long, env = "SWITCHBOARD_URL")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The server: its name, slug or id.
    pub server: String,
    /// Give up waiting for the authorization after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DisconnectArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The server: its name, slug or id.
    pub server: String,
}

#[derive(Debug, Clone, Args)]
pub struct ToolsArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// Only this server's tools (name, slug or id), with every state, Blocked included.
    #[arg(long)]
    pub server: Option<String>,
    /// The tools this user may use now (for an orchestrator token: `invoke_for_users`).
    #[arg(long)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateChoice {
    /// Always allow.
    Always,
    /// Needs approval.
    Approval,
    /// Blocked.
    Block,
}

impl StateChoice {
    fn api(self) -> &'static str {
        match self {
            StateChoice::Always => "always_allow",
            StateChoice::Approval => "needs_approval",
            StateChoice::Block => "blocked",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct AllowArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The server: its name, slug or id.
    pub server: String,
    /// The tool (its name on the server, or its exposed name), or with --category the
    /// category `read_only` or `write_delete`.
    pub tool: String,
    /// always, approval or block.
    #[arg(value_enum)]
    pub state: StateChoice,
    /// TOOL names a category: every tool of it now.
    #[arg(long)]
    pub category: bool,
}

#[derive(Debug, Clone, Args)]
pub struct InvokeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The tool's exposed name (`<server slug>__<tool>`), as `switchboard tools` lists it.
    pub tool: String,
    /// The arguments: a JSON object.
    #[arg(default_value = "{}")]
    pub arguments: String,
    /// Invoke for this user (an orchestrator token).
    #[arg(long)]
    pub user: Option<String>,
    /// The invocation id (the orchestrator's own id for the call); a new one by default.
    /// Sending the same id again gives the same outcome without calling the server again.
    #[arg(long)]
    pub id: Option<String>,
    /// Wait this many seconds for an approval before returning.
    #[arg(long, default_value_t = 600)]
    pub wait: u64,
}

#[derive(Debug, Clone, Args)]
pub struct DecideArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The invocation id, as `switchboard approvals` lists it.
    pub id: String,
    /// For the tool's later requests too: approving sets it to Always allow, denying blocks
    /// it (and denies your other requests of it that wait).
    #[arg(long)]
    pub always: bool,
}

#[derive(Debug, Args)]
pub struct DenyArgs {
    #[command(flatten)]
    pub decide: DecideArgs,
    /// Why, for the AI (at most 500 characters): the invocation's outcome carries it.
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// From this RFC 3339 time (default: 24 hours ago).
    #[arg(long)]
    pub since: Option<String>,
    /// Only these event types, comma-separated (e.g. `InvocationRequested,InvocationDenied`).
    #[arg(long = "type")]
    pub types: Option<String>,
}

#[derive(Debug, Args)]
pub struct WithdrawArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    /// The invocation id.
    pub id: String,
    /// The user the invocation is for (an orchestrator token).
    #[arg(long)]
    pub user: Option<String>,
}

/// How long an ordinary request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a request that makes a tool call (an invocation, an approval) may take: the
/// longest call deadline Switchboard allows by default (10 minutes) and a margin. The call's
/// own deadline ends it sooner.
const CALL_TIMEOUT: Duration = Duration::from_secs(11 * 60);

/// A request Switchboard did not answer in time: it may still be working on it (told apart
/// from other failures, so that a tool call's caller learns how to get the outcome).
#[derive(Debug, thiserror::Error)]
#[error("Switchboard at {base} did not answer within {seconds} s")]
struct TimedOut {
    base: String,
    seconds: u64,
}

/// `error`, with `hint` (what to do about work that may still be going on) when it is a
/// time-out; any other error as it is.
fn if_timed_out(error: anyhow::Error, hint: impl FnOnce() -> String) -> anyhow::Error {
    if error.is::<TimedOut>() {
        error.context(hint())
    } else {
        error
    }
}

/// An HTTP client for the API, with the caller's token.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(args: &ApiArgs, settings: &Settings) -> anyhow::Result<Api> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let Some(token) = args.token.clone().filter(|t| !t.is_empty()) else {
            bail!(
                "no token: set SWITCHBOARD_TOKEN or pass --token (mint one with \
                 `switchboard token --user you@example.com --role analyst`)"
            );
        };
        let base = args
            .url
            .clone()
            .or_else(|| settings.public_url.clone())
            .unwrap_or_else(|| {
                // As `up` serves it: HTTPS where it has a certificate.
                let scheme = if settings.tls.cert_file.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{}", settings.listen)
            });
        // Each request sets its own time limit (see `call_within`).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("setting up the HTTP client")?;
        Ok(Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call_within(method, path, body, REQUEST_TIMEOUT).await
    }

    /// A request that may take up to `limit` (a tool call's does: it waits for the tool).
    async fn call_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        limit: Duration,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(limit);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow::anyhow!(
                    "no Switchboard answers at {}: start one with `switchboard up`, or point \
                     --url / SWITCHBOARD_URL at it",
                    self.base
                )
            } else if e.is_timeout() {
                anyhow::Error::new(TimedOut {
                    base: self.base.clone(),
                    seconds: limit.as_secs(),
                })
            } else {
                anyhow::anyhow!("the request to {} failed: {e}", self.base)
            }
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body);
        }
        let code = body["error"]["code"].as_str().unwrap_or("");
        let message = body["error"]["message"].as_str().unwrap_or(&text);
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " — the token is missing, expired or not for this Switchboard; mint a new one \
                 with `switchboard token`"
            }
            StatusCode::FORBIDDEN => " — your roles do not allow this",
            _ => "",
        };
        bail!("{message} ({code}, HTTP {}){hint}", status.as_u16())
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(Method::GET, path, None).await
    }

    /// The server named `wanted` (name, slug or id).
    async fn server(&self, wanted: &str) -> anyhow::Result<Value> {
        let list = self.get("/api/v1/servers").await?;
        let servers = list["servers"].as_array().cloned().unwrap_or_default();
        let found = servers.into_iter().find(|s| {
            [&s["id"], &s["name"], &s["slug"]]
                .iter()
                .any(|v| v.as_str().is_some_and(|v| v.eq_ignore_ascii_case(wanted)))
        });
        found.with_context(|| {
            format!("there is no server {wanted:?}; `switchboard servers` lists them")
        })
    }
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("")
}

/// `/api/v1/<segments…>[?<query>]`, each segment and query value percent-encoded by `url`.
fn api_path(segments: &[&str], query: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://switchboard/api/v1/").expect("a valid base URL");
    url.path_segments_mut()
        .expect("an http URL has a path")
        .pop_if_empty()
        .extend(segments);
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// `switchboard servers`: every server, with the caller's connection to it.
pub async fn servers(args: &ApiArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(args, settings)?;
    let list = api.get("/api/v1/servers").await?;
    let servers = list["servers"].as_array().cloned().unwrap_or_default();
    if servers.is_empty() {
        println!("No servers yet. An admin adds one: POST /api/v1/servers (or `up --demo`).");
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<15} ID",
        "SERVER", "ENABLED", "YOUR CONNECTION"
    );
    for server in servers {
        let id = text(&server["id"]);
        let status = api
            .get(&format!("/api/v1/servers/{id}/connection"))
            .await
            .map(|s| text(&s["status"]).to_owned())
            .unwrap_or_else(|_| "?".to_owned());
        println!(
            "{:<24} {:<10} {:<15} {id}",
            text(&server["name"]),
            if server["enabled"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            status
        );
    }
    Ok(())
}

/// `switchboard connect SERVER`: prints the authorization URL and waits until the connection
/// is healthy or has failed.
pub async fn connect(args: &ConnectArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let server = api.server(&args.server).await?;
    let id = text(&server["id"]).to_owned();
    let started = api
        .call(
            Method::POST,
            &format!("/api/v1/servers/{id}/connection"),
            None,
        )
        .await?;
    println!(
        "Open this URL in a browser and allow access; Switchboard's page then names the user \
         the account is connected to — press Connect:\n\n  {}\n",
        text(&started["authorization_url"])
    );
    eprint!("Waiting for the authorization");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let status = api.get(&format!("/api/v1/servers/{id}/connection")).await?;
        match text(&status["status"]) {
            "pending" => {}
            "healthy" => {
                eprintln!();
                println!(
                    "Connected to {}: {} tools. Every tool is Blocked until you allow it: \
                     `switchboard tools --server {}`.",
                    text(&server["name"]),
                    status["tool_count"],
                    text(&server["slug"])
                );
                return Ok(());
            }
            other => {
                eprintln!();
                bail!(
                    "the connection is {other}: {}. Run `switchboard connect {}` to try again.",
                    text(&status["reason"]),
                    args.server
                );
            }
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!();
            bail!(
                "no authorization arrived in {} s; run `switchboard connect {}` again",
                args.timeout,
                args.server
            );
        }
        eprint!(".");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `switchboard disconnect SERVER`: ends the caller's connection (tokens revoked at the
/// provider where it allows, deleted here).
pub async fn disconnect(args: &DisconnectArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let server = api.server(&args.server).await?;
    let id = text(&server["id"]).to_owned();
    let done = api
        .call(
            Method::DELETE,
            &format!("/api/v1/servers/{id}/connection"),
            None,
        )
        .await?;
    println!(
        "Disconnected from {}{}. `switchboard connect {}` connects again.",
        text(&server["name"]),
        if done["tokens_revoked"] == true {
            " (the provider revoked the tokens)"
        } else {
            " (the tokens are deleted here; the provider offers no revocation, or did not confirm it)"
        },
        text(&server["slug"])
    );
    Ok(())
}

/// `switchboard tools`: the caller's tools and their states.
pub async fn tools(args: &ToolsArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    if let (Some(_), Some(_)) = (&args.user, &args.server) {
        bail!(
            "--user lists the tools the AI may use for that user, on every server; it does not \
             combine with --server (which lists your own tools on one server, blocked ones too)"
        );
    }
    if args.server.is_none() {
        // The tools the AI may use now (Always allow or Needs approval).
        let usable = match &args.user {
            // Another user's tools or nothing: an error must not turn into a list of the
            // caller's own tools.
            Some(user) => Some(api.get(&api_path(&["tools"], &[("user", user)])).await?),
            // A token without the orchestrator's permissions gets its own tools per server.
            None => api.get("/api/v1/tools").await.ok(),
        };
        if let Some(usable) = usable {
            let tools = usable["tools"].as_array().cloned().unwrap_or_default();
            println!("{:<40} {:<15} SERVER", "TOOL", "STATE");
            for tool in &tools {
                println!(
                    "{:<40} {:<15} {}",
                    text(&tool["name"]),
                    text(&tool["state"]),
                    text(&tool["server"]["name"])
                );
            }
            println!(
                "{} usable tool(s). Blocked tools are not listed: `switchboard tools --server S` shows them all.",
                tools.len()
            );
            return Ok(());
        }
    }
    let servers = match &args.server {
        Some(wanted) => vec![api.server(wanted).await?],
        None => api.get("/api/v1/servers").await?["servers"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    };
    println!("{:<40} {:<15} {:<13} CHANGED", "TOOL", "STATE", "CATEGORY");
    let mut count = 0;
    for server in servers {
        let id = text(&server["id"]);
        let listed = api.get(&format!("/api/v1/servers/{id}/tools")).await?;
        for tool in listed["tools"].as_array().cloned().unwrap_or_default() {
            count += 1;
            println!(
                "{:<40} {:<15} {:<13} {}",
                text(&tool["exposed_name"]),
                text(&tool["state"]),
                text(&tool["category"]),
                if tool["changed"].as_bool() == Some(true) {
                    "changed"
                } else {
                    ""
                }
            );
        }
    }
    if count == 0 {
        println!("No tools: connect to a server first (`switchboard connect SERVER`).");
    }
    Ok(())
}

/// `switchboard allow SERVER TOOL always|approval|block`.
pub async fn allow(args: &AllowArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let server = api.server(&args.server).await?;
    let id = text(&server["id"]);
    let body = json!({"state": args.state.api()});
    if args.category {
        let answer = api
            .call(
                Method::PUT,
                &api_path(&["servers", id, "categories", &args.tool], &[]),
                Some(body),
            )
            .await?;
        // The answer lists every tool of the server; count this category's.
        let changed = answer["tools"].as_array().map_or(0, |tools| {
            tools
                .iter()
                .filter(|t| {
                    text(&t["category"]) == args.tool && text(&t["state"]) == args.state.api()
                })
                .count()
        });
        println!(
            "{}: {} tool(s) now {}.",
            args.tool,
            changed,
            args.state.api()
        );
        return Ok(());
    }
    // The tool by its name on the server, or by its exposed name.
    let listed = api.get(&format!("/api/v1/servers/{id}/tools")).await?;
    let tool = listed["tools"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .find(|t| text(&t["name"]) == args.tool || text(&t["exposed_name"]) == args.tool)
        .with_context(|| {
            format!(
                "{} has no tool {:?}; `switchboard tools --server {}` lists them",
                text(&server["name"]),
                args.tool,
                args.server
            )
        })?;
    let name = text(&tool["name"]);
    api.call(
        Method::PUT,
        &api_path(&["servers", id, "tools", name], &[]),
        Some(body),
    )
    .await?;
    println!(
        "{} is now {}.",
        text(&tool["exposed_name"]),
        args.state.api()
    );
    Ok(())
}

fn print_outcome(answer: &Value) {
    let outcome = text(&answer["outcome"]);
    let id = text(&answer["invocation_id"]);
    match outcome {
        "completed" => {
            println!(
                "completed ({id}); the result (untrusted: the server's words, not Switchboard's):"
            );
            println!(
                "{}",
                serde_json::to_string_pretty(&answer["result"]).unwrap_or_default()
            );
        }
        "awaiting_approval" => println!(
            "awaiting approval ({id}): approve it with `switchboard approve {id}` (or deny it)"
        ),
        other => {
            let mut line = format!("{other} ({id})");
            for said in [text(&answer["reason"]), text(&answer["message"])] {
                if !said.is_empty() {
                    line.push_str(": ");
                    line.push_str(said);
                }
            }
            println!("{line}");
        }
    }
}

/// `switchboard invoke TOOL '{json}'`: asks for an invocation and, when it needs approval,
/// waits for the decision.
pub async fn invoke(args: &InvokeArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let arguments: Value = serde_json::from_str(&args.arguments)
        .context("the arguments are not JSON; give an object, e.g. '{\"query\": \"bug\"}'")?;
    if !arguments.is_object() {
        bail!("the arguments must be a JSON object, e.g. '{{\"query\": \"bug\"}}'");
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7()));
    let mut body = json!({"invocation_id": id, "tool": args.tool, "arguments": arguments});
    if let Some(user) = &args.user {
        body["user"] = json!(user);
    }
    let answer = api
        .call_within(
            Method::POST,
            "/api/v1/invocations",
            Some(body),
            CALL_TIMEOUT,
        )
        .await
        .map_err(|error| {
            if_timed_out(error, || {
                format!(
                    "invocation {id} may still be running: `switchboard invoke --id {id} …` \
                     with the same tool and arguments gets its outcome (the tool is never \
                     called twice for one id)"
                )
            })
        })?;
    print_outcome(&answer);
    if text(&answer["outcome"]) != "awaiting_approval" {
        return Ok(());
    }
    eprint!("Waiting for the decision");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    loop {
        if tokio::time::Instant::now() >= deadline {
            eprintln!();
            println!("Still awaiting approval; `switchboard approvals` lists it.");
            return Ok(());
        }
        // At most 10 s a request, never past the caller's own wait.
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_secs()
            .clamp(1, 10)
            .to_string();
        // An orchestrator asks about the user's invocation, as it asked for it.
        let mut query = vec![("wait", wait.as_str())];
        if let Some(user) = &args.user {
            query.push(("user", user.as_str()));
        }
        let now = api.get(&api_path(&["invocations", &id], &query)).await?;
        // Approved, the call runs: still not the final outcome.
        if !matches!(text(&now["outcome"]), "awaiting_approval" | "running") {
            eprintln!();
            print_outcome(&now);
            return Ok(());
        }
        eprint!(".");
    }
}

/// `switchboard withdraw ID`: withdraws an invocation, as its orchestrator would; prints the
/// outcome (a running call's, once it is cancelled or finished).
pub async fn withdraw(args: &WithdrawArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let query: Vec<(&str, &str)> = args
        .user
        .as_deref()
        .map(|user| ("user", user))
        .into_iter()
        .collect();
    let answer = api
        .call_within(
            Method::POST,
            &api_path(&["invocations", &args.id, "withdraw"], &query),
            None,
            REQUEST_TIMEOUT,
        )
        .await?;
    print_outcome(&answer);
    Ok(())
}

/// `switchboard approvals`: the caller's pending approvals.
pub async fn approvals(args: &ApiArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(args, settings)?;
    let list = api.get("/api/v1/approvals").await?;
    let pending = list["approvals"].as_array().cloned().unwrap_or_default();
    if pending.is_empty() {
        println!("Nothing awaits your approval.");
        return Ok(());
    }
    for approval in pending {
        // The category says what the tool may do (`write_delete`); a tool changed since it
        // was set is worth a look before approving.
        let mut notes: Vec<String> = Vec::new();
        if let Some(category) = approval["category"].as_str() {
            notes.push(category.to_owned());
        }
        if approval["tool_changed"] == true {
            notes.push("changed since you set it".to_owned());
        }
        if let Some(conversation) = approval["conversation_id"].as_str() {
            notes.push(format!("conversation {conversation}"));
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!("  ({})", notes.join(", "))
        };
        println!(
            "{}  {}  {}{notes}\n    arguments: {}",
            text(&approval["invocation_id"]),
            text(&approval["tool"]),
            text(&approval["server"]["name"]),
            approval["arguments"]
        );
    }
    println!(
        "Decide with `switchboard approve ID` or `switchboard deny ID` (with `--always`, for the tool's later requests too)."
    );
    Ok(())
}

/// `switchboard approve ID` / `switchboard deny ID`.
/// Approves (`denial` `None`) or denies, with the reason given (empty: none).
pub async fn decide(
    args: &DecideArgs,
    settings: &Settings,
    denial: Option<&str>,
) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let (decision, mut body) = match denial {
        None => ("approve", json!({"decision": "approve"})),
        Some("") => ("deny", json!({"decision": "deny"})),
        Some(reason) => ("deny", json!({"decision": "deny", "reason": reason})),
    };
    if args.always {
        body["always"] = json!(true);
    }
    // An approval makes the call and answers with its outcome.
    let answer = api
        .call_within(
            Method::POST,
            &api_path(&["approvals", &args.id], &[]),
            Some(body),
            CALL_TIMEOUT,
        )
        .await
        .map_err(|error| {
            if_timed_out(error, || {
                format!(
                    "the decision on {} may have been recorded and its call be running: \
                     `switchboard approvals` lists it while it waits, GET \
                     /api/v1/invocations/{} shows where it stands",
                    args.id, args.id
                )
            })
        })?;
    if answer.get("outcome").is_some() {
        print_outcome(&answer);
    } else {
        println!("{}d {}.", decision, args.id);
    }
    if args.always {
        let setting = if denial.is_some() {
            "blocked"
        } else {
            "always_allow"
        };
        println!("The tool is now {setting} for its later requests.");
    }
    Ok(())
}

/// The most events `switchboard history` prints: a terminal's worth; narrow with `--since`
/// or `--type` for more.
const HISTORY_MAX_EVENTS: usize = 10_000;

/// `switchboard history`: your own events (`GET /api/v1/me/events`), oldest first — what
/// was done as you, and by whom.
pub async fn history(args: &HistoryArgs, settings: &Settings) -> anyhow::Result<()> {
    let api = Api::new(&args.api, settings)?;
    let since = match &args.since {
        Some(since) => since.clone(),
        None => (chrono::Utc::now() - chrono::Duration::hours(24))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    };
    let mut query = vec![("since", since.as_str()), ("limit", "1000")];
    if let Some(types) = &args.types {
        query.push(("type", types.as_str()));
    }
    let mut cursor: Option<String> = None;
    let mut printed = 0;
    loop {
        let mut page_query = query.clone();
        if let Some(cursor) = &cursor {
            page_query.push(("cursor", cursor.as_str()));
        }
        let page = api.get(&api_path(&["me", "events"], &page_query)).await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            println!("{}", history_line(event));
        }
        printed += events.len();
        let more = page["partial"] == true || events.len() == 1000;
        if !more || printed >= HISTORY_MAX_EVENTS {
            if more {
                println!("… more: narrow it with --since or --type.");
            }
            break;
        }
        cursor = page["next"].as_str().map(str::to_owned);
    }
    if printed == 0 {
        println!("Nothing since {since}.");
    }
    Ok(())
}

/// One event as a line: when, what, by whom, and the invocation or tool it is about.
fn history_line(event: &Value) -> String {
    let envelope = &event["envelope"];
    let by = envelope["actor"]["userId"]
        .as_str()
        .or_else(|| envelope["actor"]["service"].as_str())
        .unwrap_or("?");
    let body = crate::audit::envelope_body(envelope).unwrap_or(&Value::Null);
    let mut about: Vec<String> = Vec::new();
    for (field, label) in [
        ("invocationId", "invocation"),
        ("exposedToolName", "tool"),
        ("toolName", "tool"),
        ("state", "state"),
        ("errorCode", "reason"),
        ("reason", "reason"),
    ] {
        if let Some(value) = body[field].as_str().filter(|v| !v.is_empty()) {
            if about.iter().any(|a| a.starts_with(&format!("{label} "))) {
                continue;
            }
            // `TOOL_STATE_ALWAYS_ALLOW` as the API spells it: `always_allow`.
            let value = value
                .strip_prefix("TOOL_STATE_")
                .map_or_else(|| value.to_owned(), str::to_ascii_lowercase);
            about.push(format!("{label} {value}"));
        }
    }
    // To the second: the lines are in the order of the log.
    let at = chrono::DateTime::parse_from_rfc3339(text(&envelope["occurredAt"])).map_or_else(
        |_| text(&envelope["occurredAt"]).to_owned(),
        |at| {
            at.with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        },
    );
    format!(
        "{at}  {:<28} by {by}{}",
        text(&event["type"]),
        if about.is_empty() {
            String::new()
        } else {
            format!("  ({})", about.join(", "))
        }
    )
}
