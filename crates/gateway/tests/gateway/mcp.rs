//! Switchboard as one MCP server (`POST /mcp`), through `rmcp`'s own client of both protocol
//! eras: the user's usable tools listed, an allowed call answered with the tool's result
//! marked untrusted, a blocked tool refused without a call, an unknown one a protocol error
//! (and no secret of the provider's in any answer), a Needs-approval call waiting (with
//! progress) until the user approves or denies it, one call per client-given invocation id,
//! a call the client cancels withdrawn, a listening client told of changed tools, and the
//! orchestrator naming the user.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway::auth::{TokenRequest, mint_token};
use rmcp::{
    ClientHandler, ClientServiceExt, RoleClient, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, ClientConfig, ClientRequest,
        ElicitRequestParams, ElicitResult, ElicitationAction, ElicitationCapability,
        FormElicitationCapability, InputRequiredResult, InputResponses, NumberOrString,
        ProgressNotificationParam, ProgressToken, ProtocolVersion, Request, RequestMetaObject,
        ServerNotification, SubscriptionFilter,
    },
    service::{ClientLifecycleMode, NotificationContext, PeerRequestOptions, RunningService},
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};
use testkit::SlowCallEnd;
use tokio::sync::mpsc;

use crate::invocations::{ALICE, Invoking, connected, settings};
use crate::support::{Options, SECRET, Store, TestApp};

/// An MCP client that passes on the progress notifications it gets.
#[derive(Clone)]
struct Watching {
    progress: mpsc::UnboundedSender<ProgressNotificationParam>,
}

impl ClientHandler for Watching {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self.progress.send(params);
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::default()
    }
}

type Client = RunningService<RoleClient, Watching>;

/// An MCP client of `/mcp` (with `query`, if any) signed in with `token`, speaking the
/// 2025-11-25 protocol (`initialize`) or the 2026-07-28 one (discovery, stateless).
async fn client(
    it: &Invoking,
    token: &str,
    query: &str,
    stateless: bool,
) -> (Client, mpsc::UnboundedReceiver<ProgressNotificationParam>) {
    let (progress, progressed) = mpsc::unbounded_channel();
    let client = connect(it, token, query, stateless, Watching { progress }).await;
    (client, progressed)
}

/// `handler` as an MCP client of `/mcp{query}`, signed in with `token`, in either era.
async fn connect<H: ClientHandler>(
    it: &Invoking,
    token: &str,
    query: &str,
    stateless: bool,
    handler: H,
) -> RunningService<RoleClient, H> {
    let transport = StreamableHttpClientTransport::with_client(
        it.setup.app.client.clone(),
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp{query}", it.setup.app.url))
            .auth_header(token.to_owned()),
    );
    if stateless {
        handler
            .serve_with_lifecycle(
                transport,
                ClientLifecycleMode::Discover {
                    preferred_versions: vec![ProtocolVersion::V_2026_07_28],
                },
            )
            .await
    } else {
        handler.serve(transport).await
    }
    .expect("an MCP client of /mcp")
}

fn call(it: &Invoking, tool: &str, arguments: Value) -> CallToolRequestParams {
    let Value::Object(arguments) = arguments else {
        panic!("arguments are an object");
    };
    CallToolRequestParams::new(format!("{}{tool}", it.prefix)).with_arguments(arguments)
}

/// `params` with a progress token, the client's own invocation id and a conversation in
/// `_meta`.
fn tracked(mut params: CallToolRequestParams, id: &str) -> CallToolRequestParams {
    let mut meta = RequestMetaObject::with_progress_token(ProgressToken(NumberOrString::String(
        id.to_owned().into(),
    )));
    meta.0
        .insert("switchboard/invocation_id".to_owned(), json!(id));
    meta.0.insert(
        "switchboard/conversation_id".to_owned(),
        json!("conversation-7"),
    );
    params.meta = Some(meta);
    params
}

fn meta(result: &CallToolResult, key: &str) -> Value {
    result
        .meta
        .as_ref()
        .and_then(|meta| meta.get(key))
        .cloned()
        .unwrap_or(Value::Null)
}

fn text(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|text| text.text.clone()))
        .collect()
}

/// What a raw request to `/mcp` accepts: both answer types, as the transport requires, or
/// only JSON.
enum Accept {
    Both,
    JsonOnly,
}

/// A POST of `body` to `/mcp{query}`, as a client without `rmcp` sends it.
async fn post(
    it: &Invoking,
    token: Option<&str>,
    query: &str,
    accept: Accept,
    body: &Value,
) -> reqwest::Response {
    let accept = match accept {
        Accept::Both => "application/json, text/event-stream",
        Accept::JsonOnly => "application/json",
    };
    let mut request = it
        .setup
        .app
        .client
        .post(format!("{}/mcp{query}", it.setup.app.url))
        .header("accept", accept)
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn an_mcp_client_uses_the_users_tools_under_their_settings() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    it.set_state("create_issue", "needs_approval").await;
    let handle = &it.setup.handle;
    // Everything the endpoint answers, searched for the provider's secrets at the end.
    let mut answered = String::new();

    for stateless in [false, true] {
        let (mcp, _) = client(&it, &it.alice, "", stateless).await;
        // Only what Alice may use: the blocked tools are not offered.
        let tools = mcp.list_all_tools().await.expect("tools/list");
        answered.push_str(&serde_json::to_string(&tools).expect("JSON"));
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(
            names,
            [
                format!("{}create_issue", it.prefix),
                format!("{}search_issues", it.prefix)
            ],
            "stateless: {stateless}"
        );
        let search = &tools[1];
        assert_eq!(search.title.as_deref(), Some("Search issues"));
        assert_eq!(
            search.description.as_deref(),
            Some("Finds issues whose title contains the query.")
        );
        assert_eq!(search.input_schema["required"], json!(["query"]));
        assert!(search.output_schema.is_some());
        assert_eq!(
            search
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.read_only_hint),
            Some(true)
        );
        let search_meta = search.meta.as_ref().expect("_meta");
        assert_eq!(search_meta["switchboard/state"], "always_allow");
        assert_eq!(search_meta["switchboard/tool_name"], "search_issues");
        assert_eq!(search_meta["switchboard/server"]["id"], it.server_id);
        assert_eq!(search_meta["switchboard/server"]["name"], "notion team");
        assert_eq!(
            tools[0].meta.as_ref().expect("_meta")["switchboard/state"],
            "needs_approval"
        );

        // Allowed: called with Alice's token, the answer as the tool gave it, untrusted.
        let calls = handle.tool_calls("search_issues");
        let found = mcp
            .call_tool(call(&it, "search_issues", json!({"query": "first"})))
            .await
            .expect("tools/call");
        answered.push_str(&serde_json::to_string(&found).expect("JSON"));
        assert_eq!(handle.tool_calls("search_issues"), calls + 1);
        assert_ne!(found.is_error, Some(true), "{found:?}");
        assert_eq!(
            found.structured_content,
            Some(json!({"issues": [{"key": "FX-1", "title": "The first issue"}]}))
        );
        assert_eq!(meta(&found, "switchboard/untrusted"), true);
        assert_eq!(meta(&found, "switchboard/outcome"), "completed");
        assert_eq!(meta(&found, "switchboard/server")["id"], it.server_id);
        assert_eq!(meta(&found, "switchboard/tool_name"), "search_issues");
        assert_eq!(meta(&found, "switchboard/truncated"), false);
        let id = meta(&found, "switchboard/invocation_id");
        assert!(
            id.as_str().is_some_and(|id| id.starts_with("mcp-")),
            "a fresh invocation id: {id}"
        );
        // The invocation is Alice's, as any other: its status over HTTP says so.
        let (status, outcome) = it
            .get(
                &it.alice,
                &format!("/api/v1/invocations/{}", id.as_str().unwrap_or_default()),
            )
            .await;
        assert_eq!((status, &outcome["outcome"]), (200, &json!("completed")));

        // Blocked: refused as a tool error the AI can read, and never called.
        let deletes = handle.tool_calls("delete_issue");
        let refused = mcp
            .call_tool(call(&it, "delete_issue", json!({"key": "FX-1"})))
            .await
            .expect("tools/call");
        answered.push_str(&serde_json::to_string(&refused).expect("JSON"));
        assert_eq!(refused.is_error, Some(true));
        assert_eq!(meta(&refused, "switchboard/outcome"), "rejected");
        assert_eq!(meta(&refused, "switchboard/reason"), "tool_blocked");
        assert!(
            text(&refused).contains("tool_blocked"),
            "{}",
            text(&refused)
        );
        assert_eq!(handle.tool_calls("delete_issue"), deletes);

        // No such tool: a protocol error.
        let unknown = mcp
            .call_tool(CallToolRequestParams::new("nothing__here"))
            .await
            .expect_err("an unknown tool");
        answered.push_str(&unknown.to_string());
        assert!(
            unknown.to_string().contains("unknown tool: nothing__here"),
            "{unknown}"
        );
        mcp.cancel().await.expect("closed");
    }
    let secrets = handle.issued_secrets();
    assert!(!secrets.is_empty(), "the fixture issued tokens");
    for secret in &secrets {
        assert!(
            !answered.contains(secret.as_str()),
            "a secret the provider issued is in an MCP answer"
        );
    }
}

#[tokio::test]
async fn an_mcp_call_that_needs_approval_waits_for_the_users_decision() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let handle = &it.setup.handle;
    let (mcp, mut progressed) = client(&it, &it.alice, "", false).await;

    // Approved: the call waits, says so in a progress notification, and then is made.
    let waiting = {
        let peer = mcp.peer().clone();
        let params = tracked(
            call(&it, "create_issue", json!({"title": "A"})),
            "mcp-approve-1",
        );
        tokio::spawn(async move { peer.call_tool(params).await })
    };
    // (Under the token `rmcp`'s client put in for its own progress tracking.)
    let told = progressed.recv().await.expect("a progress notification");
    let message = told.message.unwrap_or_default();
    assert!(
        message.contains(ALICE) && message.contains("mcp-approve-1"),
        "{message}"
    );
    // It waits among Alice's approvals, with what the AI asked.
    let (status, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(status, 200, "{approvals}");
    assert_eq!(approvals["approvals"][0]["invocation_id"], "mcp-approve-1");
    assert_eq!(
        approvals["approvals"][0]["arguments"],
        json!({"title": "A"})
    );
    assert_eq!(
        approvals["approvals"][0]["conversation_id"],
        "conversation-7"
    );
    assert_eq!(handle.tool_calls("create_issue"), 0);
    let (status, decided) = it.decide("mcp-approve-1", "approve").await;
    assert_eq!(status, 200, "{decided}");
    let created = waiting.await.expect("joined").expect("tools/call");
    assert_ne!(created.is_error, Some(true), "{created:?}");
    assert_eq!(text(&created), "Created FX-2");
    assert_eq!(meta(&created, "switchboard/untrusted"), true);
    assert_eq!(handle.tool_calls("create_issue"), 1);

    // The same id again: the recorded outcome, no second call.
    let again = mcp
        .call_tool(tracked(
            call(&it, "create_issue", json!({"title": "A"})),
            "mcp-approve-1",
        ))
        .await
        .expect("tools/call");
    assert_eq!(text(&again), "Created FX-2");
    assert_eq!(handle.tool_calls("create_issue"), 1);

    // Denied, with a reason: a tool error that tells the AI the user's reason.
    let waiting = {
        let peer = mcp.peer().clone();
        let params = tracked(
            call(&it, "create_issue", json!({"title": "B"})),
            "mcp-deny-1",
        );
        tokio::spawn(async move { peer.call_tool(params).await })
    };
    let told = progressed.recv().await.expect("a progress notification");
    let message = told.message.unwrap_or_default();
    assert!(message.contains("mcp-deny-1"), "{message}");
    let (status, decided) = it
        .post(
            &it.alice,
            "/api/v1/approvals/mcp-deny-1",
            &json!({"decision": "deny", "reason": "Not in this project."}),
        )
        .await;
    assert_eq!(status, 200, "{decided}");
    let denied = waiting.await.expect("joined").expect("tools/call");
    assert_eq!(denied.is_error, Some(true));
    assert_eq!(meta(&denied, "switchboard/outcome"), "denied");
    assert!(
        text(&denied).contains("The user denied this call")
            && text(&denied).contains("Not in this project."),
        "{}",
        text(&denied)
    );
    assert_eq!(handle.tool_calls("create_issue"), 1);
    mcp.cancel().await.expect("closed");
}

/// An MCP client of the 2026-07-28 protocol that can put forms to its user: it hands on
/// each approval prompt it gets and answers it with the next of `answers`.
#[derive(Clone)]
struct Prompting {
    asked: mpsc::UnboundedSender<(String, Value)>,
    answers: Arc<Mutex<VecDeque<ElicitResult>>>,
    progress: mpsc::UnboundedSender<ProgressNotificationParam>,
}

impl ClientHandler for Prompting {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self.progress.send(params);
    }

    async fn create_elicitation(
        &self,
        request: ElicitRequestParams,
        _context: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<ElicitResult, rmcp::ErrorData> {
        let ElicitRequestParams::FormElicitationParams {
            message,
            requested_schema,
            ..
        } = request
        else {
            panic!("a form: {request:?}");
        };
        let schema = serde_json::to_value(&requested_schema).expect("JSON");
        let _ = self.asked.send((message, schema));
        let answer = self.answers.lock().expect("answers").pop_front();
        answer.ok_or_else(|| rmcp::ErrorData::internal_error("asked unexpectedly", None))
    }

    fn get_info(&self) -> ClientConfig {
        let mut config = ClientConfig::default();
        config.capabilities.elicitation =
            Some(ElicitationCapability::new().with_form(FormElicitationCapability::new()));
        config
    }
}

/// A [`Prompting`] client of `/mcp{query}` signed in with `token` (the 2026-07-28
/// protocol), with the prompts it was given, the answers it is to give and the progress it
/// was told.
struct PromptingClient {
    mcp: RunningService<RoleClient, Prompting>,
    prompts: mpsc::UnboundedReceiver<(String, Value)>,
    answers: Arc<Mutex<VecDeque<ElicitResult>>>,
    progressed: mpsc::UnboundedReceiver<ProgressNotificationParam>,
}

async fn prompting_client(it: &Invoking, token: &str, query: &str) -> PromptingClient {
    let (asked, prompts) = mpsc::unbounded_channel();
    let (progress, progressed) = mpsc::unbounded_channel();
    let answers = Arc::new(Mutex::new(VecDeque::new()));
    let prompting = Prompting {
        asked,
        answers: answers.clone(),
        progress,
    };
    let mcp = connect(it, token, query, true, prompting).await;
    PromptingClient {
        mcp,
        prompts,
        answers,
        progressed,
    }
}

fn accepted(content: Value) -> ElicitResult {
    let mut answer = ElicitResult::new(ElicitationAction::Accept);
    answer.content = Some(content);
    answer
}

#[tokio::test]
async fn an_mcp_client_puts_the_approval_to_its_user() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let handle = &it.setup.handle;
    let PromptingClient {
        mcp,
        mut prompts,
        answers,
        ..
    } = prompting_client(&it, &it.alice, "").await;
    let answer_with = |answer: ElicitResult| answers.lock().expect("answers").push_back(answer);

    // Approved in the client's form: the call is made once, and its answer is the tool's.
    answer_with(accepted(json!({"decision": "approve"})));
    // (Bounded: without the prompt the call would wait for a decision nobody makes.)
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        mcp.call_tool(tracked(
            call(&it, "create_issue", json!({"title": "A"})),
            "mcp-prompt-1",
        )),
    )
    .await
    .expect("the user was asked in the client, not left waiting")
    .expect("tools/call");
    assert_eq!(text(&created), "Created FX-2", "{created:?}");
    assert_eq!(meta(&created, "switchboard/untrusted"), true);
    assert_eq!(meta(&created, "switchboard/invocation_id"), "mcp-prompt-1");
    assert_eq!(handle.tool_calls("create_issue"), 1);
    let (message, schema) = prompts.try_recv().expect("the user was asked");
    for shown in [
        ALICE,
        "create_issue",
        "notion team",
        "\"title\": \"A\"",
        "mcp-prompt-1",
        "conversation-7",
    ] {
        assert!(message.contains(shown), "{shown} in: {message}");
    }
    assert_eq!(schema["required"], json!(["decision"]), "{schema}");
    assert_eq!(
        schema["properties"]["decision"]["enum"],
        json!(["approve", "deny"]),
        "{schema}"
    );
    assert_eq!(schema["properties"]["reason"]["type"], "string", "{schema}");
    assert_eq!(
        schema["properties"]["always"]["type"], "boolean",
        "{schema}"
    );
    // Recorded as the user's own decision: the invocation's status says so, and it waits
    // among her approvals no more.
    let (status, outcome) = it.get(&it.alice, "/api/v1/invocations/mcp-prompt-1").await;
    assert_eq!((status, &outcome["outcome"]), (200, &json!("completed")));
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"], json!([]), "{approvals}");
    // The same id again: the recorded outcome, no second call, no second question.
    let again = mcp
        .call_tool(tracked(
            call(&it, "create_issue", json!({"title": "A"})),
            "mcp-prompt-1",
        ))
        .await
        .expect("tools/call");
    assert_eq!(text(&again), "Created FX-2");
    assert_eq!(handle.tool_calls("create_issue"), 1);
    assert!(prompts.try_recv().is_err(), "asked again");

    // A form sent back without a decision is asked again; then denied with a reason, which
    // the AI reads.
    answer_with(accepted(json!({})));
    answer_with(accepted(
        json!({"decision": "deny", "reason": "Not in\u{7}this project."}),
    ));
    let denied = mcp
        .call_tool(call(&it, "create_issue", json!({"title": "B"})))
        .await
        .expect("tools/call");
    assert_eq!(std::iter::from_fn(|| prompts.try_recv().ok()).count(), 2);
    assert_eq!(denied.is_error, Some(true));
    assert_eq!(meta(&denied, "switchboard/outcome"), "denied");
    assert!(
        text(&denied).contains("Not in this project."),
        "{}",
        text(&denied)
    );
    // The prompt as the client gets it, with the state to call again with: the same
    // request under it is answered; another one (other arguments) is refused as a reused
    // id, and so is a state Switchboard did not give.
    let first = mcp
        .call_tool_once(call(&it, "create_issue", json!({"title": "H"})))
        .await
        .expect("tools/call");
    let CallToolResponse::InputRequired(prompt) = first else {
        panic!("a prompt: {first:?}");
    };
    assert_eq!(std::iter::from_fn(|| prompts.try_recv().ok()).count(), 0);
    let asked_with = prompt.request_state.clone().expect("a requestState");
    let requests = prompt.input_requests.expect("the prompt");
    assert_eq!(
        requests.keys().collect::<Vec<_>>(),
        ["switchboard/approval"]
    );
    let other = mcp
        .call_tool_once(
            call(&it, "create_issue", json!({"title": "I"})).with_request_state(&asked_with),
        )
        .await
        .expect_err("another request under the prompt's state");
    assert!(
        other
            .to_string()
            .contains("already used for a different request"),
        "{other}"
    );
    let forged = mcp
        .call_tool_once(
            call(&it, "create_issue", json!({"title": "H"})).with_request_state("mcp-prompt-1"),
        )
        .await
        .expect_err("a state Switchboard did not give");
    assert!(
        forged
            .to_string()
            .contains("requestState is not one Switchboard gave"),
        "{forged}"
    );
    let declined = mcp
        .call_tool_once(
            call(&it, "create_issue", json!({"title": "H"}))
                .with_request_state(&asked_with)
                .with_input_responses(InputResponses::from([(
                    "switchboard/approval".to_owned(),
                    json!({"action": "decline"}),
                )])),
        )
        .await
        .expect("tools/call");
    let CallToolResponse::Complete(declined) = declined else {
        panic!("an outcome: {declined:?}");
    };
    assert_eq!(meta(&declined, "switchboard/outcome"), "denied");

    // Declined: denied. Cancelled: withdrawn. Neither calls the tool.
    answer_with(ElicitResult::new(ElicitationAction::Decline));
    let declined = mcp
        .call_tool(call(&it, "create_issue", json!({"title": "C"})))
        .await
        .expect("tools/call");
    assert_eq!(meta(&declined, "switchboard/outcome"), "denied");
    assert_eq!(std::iter::from_fn(|| prompts.try_recv().ok()).count(), 1);
    answer_with(ElicitResult::new(ElicitationAction::Cancel));
    let cancelled = mcp
        .call_tool(call(&it, "create_issue", json!({"title": "D"})))
        .await
        .expect("tools/call");
    assert_eq!(meta(&cancelled, "switchboard/outcome"), "denied");
    assert_eq!(meta(&cancelled, "switchboard/reason"), "withdrawn");
    assert_eq!(std::iter::from_fn(|| prompts.try_recv().ok()).count(), 1);
    assert_eq!(handle.tool_calls("create_issue"), 1);

    // Approved from now on: called, and the tool is Always allow, asked about no more.
    answer_with(accepted(json!({"decision": "approve", "always": true})));
    let created = mcp
        .call_tool(call(&it, "create_issue", json!({"title": "F"})))
        .await
        .expect("tools/call");
    assert_eq!(meta(&created, "switchboard/outcome"), "completed");
    assert_eq!(std::iter::from_fn(|| prompts.try_recv().ok()).count(), 1);
    let tools = mcp.list_all_tools().await.expect("tools/list");
    let create = tools
        .iter()
        .find(|tool| tool.name.ends_with("create_issue"))
        .expect("listed");
    assert_eq!(
        create.meta.as_ref().expect("_meta")["switchboard/state"],
        "always_allow"
    );
    let created = mcp
        .call_tool(call(&it, "create_issue", json!({"title": "G"})))
        .await
        .expect("tools/call");
    assert_eq!(meta(&created, "switchboard/outcome"), "completed");
    assert!(prompts.try_recv().is_err(), "asked about an allowed tool");
    assert_eq!(handle.tool_calls("create_issue"), 3);
    assert!(answers.lock().expect("answers").is_empty());
    mcp.cancel().await.expect("closed");
    it.set_state("create_issue", "needs_approval").await;

    // An orchestrator acting for Alice is never asked: her decision is hers. Its call
    // waits among her approvals until she makes it.
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let PromptingClient {
        mcp: acting,
        prompts: mut asked_acting,
        mut progressed,
        ..
    } = prompting_client(&it, &orchestrator, &format!("?user={ALICE}")).await;
    let mut waiting = {
        let peer = acting.peer().clone();
        let params = tracked(
            call(&it, "create_issue", json!({"title": "E"})),
            "mcp-prompt-orchestrated",
        );
        tokio::spawn(async move { peer.call_tool(params).await })
    };
    // (Waiting, it tells the client so.)
    let told = tokio::select! {
        told = progressed.recv() => told.expect("a progress notification"),
        early = &mut waiting => panic!("answered before Alice decided: {early:?}"),
    };
    let message = told.message.unwrap_or_default();
    assert!(message.contains("mcp-prompt-orchestrated"), "{message}");
    let (status, decided) = it.decide("mcp-prompt-orchestrated", "approve").await;
    assert_eq!(status, 200, "{decided}");
    let created = waiting.await.expect("joined").expect("tools/call");
    assert_eq!(meta(&created, "switchboard/outcome"), "completed");
    assert!(
        asked_acting.try_recv().is_err(),
        "the orchestrator's client was asked"
    );
    assert_eq!(handle.tool_calls("create_issue"), 4);
    acting.cancel().await.expect("closed");
}

/// "From now on" applies to the tool the prompt showed: when the server changed it before
/// the answer, nothing is decided or set, and the user is asked again about what it is now.
#[tokio::test]
async fn an_approval_prompt_answered_after_the_tool_changed_is_asked_again() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let PromptingClient { mcp, .. } = prompting_client(&it, &it.alice, "").await;
    let request = || call(&it, "create_issue", json!({"title": "K"}));
    let prompt_of = |response: CallToolResponse| match response {
        CallToolResponse::InputRequired(prompt) => prompt,
        other => panic!("a prompt: {other:?}"),
    };
    let message_of = |prompt: &InputRequiredResult| {
        let requests = serde_json::to_value(&prompt.input_requests).expect("JSON");
        requests["switchboard/approval"]["params"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let approve_always = || {
        InputResponses::from([(
            "switchboard/approval".to_owned(),
            json!({"action": "accept", "content": {"decision": "approve", "always": true}}),
        )])
    };
    let first = prompt_of(mcp.call_tool_once(request()).await.expect("tools/call"));
    let seen = first.request_state.clone().expect("a requestState");

    it.redefine(
        "create_issue",
        "Creates an issue, and closes every other one.",
    )
    .await;
    let again = prompt_of(
        mcp.call_tool_once(
            request()
                .with_request_state(&seen)
                .with_input_responses(approve_always()),
        )
        .await
        .expect("tools/call"),
    );
    let message = message_of(&again);
    assert!(
        message.contains("closes every other one")
            && message.contains("changed this tool since you last set it"),
        "{message}"
    );
    let now_seen = again.request_state.clone().expect("a requestState");
    assert_ne!(now_seen, seen);
    assert_eq!(it.tool_state("create_issue").await, "needs_approval");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);

    let answered = mcp
        .call_tool_once(
            request()
                .with_request_state(&now_seen)
                .with_input_responses(approve_always()),
        )
        .await
        .expect("tools/call");
    let CallToolResponse::Complete(created) = answered else {
        panic!("an outcome: {answered:?}");
    };
    assert_eq!(meta(&created, "switchboard/outcome"), "completed");
    assert_eq!(it.tool_state("create_issue").await, "always_allow");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
    mcp.cancel().await.expect("closed");
}

#[tokio::test]
async fn an_orchestrator_names_the_user_of_mcp_requests_and_nobody_else_may() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let query = format!("?user={ALICE}");
    let (mcp, _) = client(&it, &orchestrator, &query, false).await;
    let tools = mcp.list_all_tools().await.expect("tools/list");
    assert_eq!(tools.len(), 1, "Alice's one usable tool: {tools:?}");
    let found = mcp
        .call_tool(call(&it, "search_issues", json!({"query": "first"})))
        .await
        .expect("tools/call");
    assert_eq!(meta(&found, "switchboard/outcome"), "completed");
    mcp.cancel().await.expect("closed");

    // Another user may not act as Alice; nor may anyone without a token.
    let initialize = json!({
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                   "clientInfo": {"name": "test", "version": "1"}},
    });
    let mallory = it.setup.app.token("mallory@example.com", &["analyst"]);
    for (token, status) in [(Some(mallory.as_str()), 403), (None, 401)] {
        let response = post(&it, token, &query, Accept::Both, &initialize).await;
        assert_eq!(response.status(), status);
    }
    // A plain `tools/list` POST, as the README shows it with curl: no initialization needed.
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let listed: Value = post(&it, Some(&it.alice), "", Accept::Both, &list)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        listed["result"]["tools"][0]["name"],
        format!("{}search_issues", it.prefix),
        "{listed}"
    );
    // Stateless: no stream to open with a GET, which the transport answers with 405.
    let streamed = it.setup.app.get("/mcp", Some(&it.alice)).await;
    assert_eq!(streamed.status(), 405);
    // A request the transport cannot take is refused in the API's shape, saying why.
    let response = post(&it, Some(&it.alice), "", Accept::JsonOnly, &initialize).await;
    assert_eq!(response.status(), 406);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "mcp_transport_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| message.contains("text/event-stream")),
        "{body}"
    );
}

#[tokio::test]
async fn a_call_the_mcp_client_cancels_is_withdrawn_at_the_server() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("slow_report", "always_allow").await;
    let handle = &it.setup.handle;
    for (n, stateless) in [false, true].into_iter().enumerate() {
        let (mcp, _) = client(&it, &it.alice, "", stateless).await;
        let id = format!("mcp-cancel-{stateless}");
        let calls = handle
            .mcp_requests_where(0, |seen| seen.method.as_deref() == Some("tools/call"))
            .await
            .len();
        let request = ClientRequest::CallToolRequest(Request::new(tracked(
            call(&it, "slow_report", json!({})),
            &id,
        )));
        let running = mcp
            .peer()
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await
            .expect("sent");
        // The call reached the server; then the client gives up on it.
        handle
            .mcp_requests_where(calls + 1, |seen| {
                seen.method.as_deref() == Some("tools/call")
            })
            .await;
        running
            .cancel(Some("the user stopped".to_owned()))
            .await
            .expect("cancelled");
        let (status, outcome) = it
            .get(&it.alice, &format!("/api/v1/invocations/{id}?wait=20"))
            .await;
        assert_eq!(status, 200, "{outcome}");
        assert_eq!(
            (&outcome["outcome"], &outcome["reason"]),
            (&json!("failed"), &json!("withdrawn")),
            "stateless: {stateless}: {outcome}"
        );
        // Cancelled at the server too, not left to run.
        let ended = handle.slow_calls_ended(n + 1).await;
        assert_eq!(
            ended[n],
            SlowCallEnd::Abandoned {
                tool: "slow_report".to_owned()
            }
        );
        mcp.cancel().await.expect("closed");
    }
}

/// Whether the next notification of `listening` says the tool list changed. Bounded, so that
/// one that never comes fails the test instead of hanging it.
async fn told_of_a_change(listening: &mut rmcp::service::Subscription) -> bool {
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(30), listening.next()).await,
        Ok(Ok(Some(ServerNotification::ToolListChangedNotification(_))))
    )
}

#[tokio::test]
async fn an_mcp_client_listening_is_told_when_the_users_tools_change() {
    let it = connected(Store::Jsonl, settings()).await;
    // `subscriptions/listen` is the 2026-07-28 protocol's: a stateless client.
    let (mcp, _) = client(&it, &it.alice, "", true).await;
    let announced = mcp
        .peer_info()
        .and_then(|info| info.capabilities.tools.clone())
        .and_then(|tools| tools.list_changed);
    assert_eq!(announced, Some(true));
    let mut filter = SubscriptionFilter::new();
    filter.tools_list_changed = Some(true);
    let mut listening = mcp.peer().listen(filter).await.expect("listening");
    assert_eq!(listening.acknowledged().tools_list_changed, Some(true));
    // The first at once: whatever changed before the server began to follow changes.
    assert!(told_of_a_change(&mut listening).await);
    assert!(mcp.list_all_tools().await.expect("tools/list").is_empty());

    // Alice allows a tool: told, and the list offers it.
    it.set_state("search_issues", "always_allow").await;
    assert!(told_of_a_change(&mut listening).await);
    let tools = mcp.list_all_tools().await.expect("tools/list");
    assert_eq!(tools.len(), 1, "{tools:?}");

    // And blocks it again: told again.
    it.set_state("search_issues", "blocked").await;
    assert!(told_of_a_change(&mut listening).await);
    assert!(mcp.list_all_tools().await.expect("tools/list").is_empty());

    // A subscription is one of the caller's live-update streams: at most 16 at once.
    let mut held = vec![listening];
    while held.len() < gateway::routes::stream::MAX_STREAMS_PER_USER {
        let mut filter = SubscriptionFilter::new();
        filter.tools_list_changed = Some(true);
        held.push(mcp.peer().listen(filter).await.expect("listening"));
    }
    let mut filter = SubscriptionFilter::new();
    filter.tools_list_changed = Some(true);
    // (`rmcp` acknowledges a subscription before the server's handler runs: the refusal
    // ends it at once.)
    let mut refused = mcp.peer().listen(filter).await.expect("acknowledged");
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), refused.next())
        .await
        .expect("ended at once");
    assert!(
        ended.as_ref().is_err_and(|error| error
            .to_string()
            .contains("live-update streams open already")),
        "{ended:?}"
    );
    // One the client gives up gives its slot back (once the server has seen it go: a new
    // subscription is refused until then, so it is tried again, a bounded number of times).
    drop(held.pop());
    let mut listening_again = false;
    for _ in 0..100 {
        let mut filter = SubscriptionFilter::new();
        filter.tools_list_changed = Some(true);
        let mut again = mcp.peer().listen(filter).await.expect("acknowledged");
        if told_of_a_change(&mut again).await {
            listening_again = true;
            held.push(again);
            break;
        }
    }
    assert!(
        listening_again,
        "the slot of a subscription given up came back"
    );
    mcp.cancel().await.expect("closed");
}

#[tokio::test]
async fn an_mcp_client_finds_how_to_sign_in() {
    // Tokens verified with a key alone (the embedded default): the resource, no server.
    let app = TestApp::start(Store::Jsonl).await;
    let response = app
        .get("/.well-known/oauth-protected-resource/mcp", None)
        .await;
    assert_eq!(response.status(), 200);
    let metadata: Value = response.json().await.expect("JSON");
    // (The test app's public URL is where it listens.)
    let public_url = app.url.clone();
    assert_eq!(
        metadata["resource"],
        format!("{public_url}/mcp"),
        "{metadata}"
    );
    assert_eq!(metadata["bearer_methods_supported"], json!(["header"]));
    assert!(
        metadata.get("authorization_servers").is_none(),
        "{metadata}"
    );
    // A request without a token is told where that metadata is (RFC 9728 §5.1).
    let refused = app
        .client
        .post(format!("{}/mcp", app.url))
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok()),
        Some(
            format!(
                "Bearer resource_metadata=\"{public_url}/.well-known/oauth-protected-resource/mcp\""
            )
            .as_str()
        )
    );
    // Other routes keep the plain challenge.
    let elsewhere = app.get("/api/v1/me", None).await;
    assert_eq!(
        elsewhere
            .headers()
            .get("www-authenticate")
            .map(|value| value.as_bytes()),
        Some(&b"Bearer"[..])
    );

    // Tokens from an authorization server (`auth.issuer`): that server is named.
    let app = TestApp::start_with_options(
        Store::Jsonl,
        Options {
            issuer: Some("https://id.example.com".to_owned()),
            ..Options::default()
        },
    )
    .await;
    let metadata: Value = app
        .get("/.well-known/oauth-protected-resource/mcp", None)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        metadata["authorization_servers"],
        json!(["https://id.example.com"])
    );

    // What that server gives an MCP client that names the endpoint as its resource (RFC
    // 8707): a token whose audience is the endpoint's URL. It opens `/mcp`, and only that;
    // Switchboard's own audience opens everything.
    let app = TestApp::start_with_options(
        Store::Jsonl,
        Options {
            issuer: Some("https://id.example.com".to_owned()),
            audience: Some("switchboard".to_owned()),
            ..Options::default()
        },
    )
    .await;
    let token_for = |audience: &str| {
        mint_token(
            SECRET,
            &TokenRequest {
                user: "alice@example.com",
                roles: &["analyst".to_owned()],
                ttl: Duration::from_secs(600),
                issuer: Some("https://id.example.com"),
                audience: Some(audience),
                roles_claim: "roles",
            },
        )
        .expect("token")
    };
    let list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"});
    let list_with = |token: String| {
        app.client
            .post(format!("{}/mcp", app.url))
            .header("accept", "application/json, text/event-stream")
            .bearer_auth(token)
            .json(&list)
            .send()
    };
    let for_endpoint = token_for(&format!("{}/mcp", app.url));
    let listed = list_with(for_endpoint.clone()).await.expect("request");
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.expect("JSON");
    assert_eq!(listed["result"]["tools"], json!([]), "{listed}");
    let refused = app.get("/api/v1/me", Some(&for_endpoint)).await;
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.expect("JSON");
    assert_eq!(
        body["error"]["message"],
        format!(
            "the token is for the MCP endpoint ({}/mcp) alone; this route takes tokens for \
             switchboard",
            app.url
        ),
        "{body}"
    );
    let for_switchboard = token_for("switchboard");
    assert_eq!(
        app.get("/api/v1/me", Some(&for_switchboard)).await.status(),
        200
    );
    assert_eq!(
        list_with(for_switchboard).await.expect("request").status(),
        200
    );
    // A token for another resource opens neither, and the MCP client is told where to look.
    let elsewhere = list_with(token_for("https://other.example.com/mcp"))
        .await
        .expect("request");
    assert_eq!(elsewhere.status(), 401);
    assert!(
        elsewhere
            .headers()
            .get("www-authenticate")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|challenge| challenge.contains("resource_metadata=")),
    );
}
