//! Every outcome of an invocation: completed with an untrusted result, blocked, unknown, a
//! tool error, an unreachable server, disabled servers and auth errors, deadlines,
//! truncation, captured payloads, and the metrics.
use super::*;

#[tokio::test]
async fn an_allowed_tool_completes_with_an_untrusted_result_and_an_audit_trail_without_payloads() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("search_issues", "always_allow").await;

        let (status, tools) = it.get(&it.alice, "/api/v1/tools").await;
        assert_eq!(status, 200, "{tools}");
        let tools = tools["tools"].as_array().expect("tools").clone();
        assert_eq!(tools.len(), 1, "only the allowed tool: {tools:?}");
        let tool = &tools[0];
        assert_eq!(tool["name"], format!("{PREFIX}search_issues"));
        assert_eq!(tool["tool_name"], "search_issues");
        assert_eq!(tool["server"]["id"], it.server_id.as_str());
        assert_eq!(tool["server"]["name"], "notion team");
        assert_eq!(tool["input_schema"]["required"], json!(["query"]));
        assert_eq!(tool["annotations"]["readOnlyHint"], true);
        assert_eq!(tool["state"], "always_allow");

        let (status, outcome) = it
            .post(
                &it.alice,
                "/api/v1/invocations",
                &json!({"invocation_id": "toolu_01A", "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "first"}, "conversation_id": "conv_42"}),
            )
            .await;
        assert_eq!(status, 200, "{outcome}");
        assert_eq!(outcome["outcome"], "completed", "{outcome}");
        assert_eq!(outcome["invocation_id"], "toolu_01A");
        let result = &outcome["result"];
        assert_eq!(result["untrusted"], true);
        assert_eq!(result["server"]["id"], it.server_id.as_str());
        assert_eq!(result["server"]["name"], "notion team");
        assert_eq!(result["tool"], "search_issues");
        assert_eq!(result["is_error"], false);
        assert_eq!(result["truncated"], false);
        assert_eq!(result["structured_content"]["issues"][0]["key"], "FX-1");
        assert_eq!(result["content"][0]["type"], "text");
        assert_eq!(it.setup.handle.tool_calls("search_issues"), 1);

        // The same id again: the recorded outcome, no second call.
        let again = it
            .invoke("toolu_01A", "search_issues", json!({"query": "first"}))
            .await;
        assert_eq!(again["outcome"], "completed");
        assert_eq!(again["result"], outcome["result"]);
        let (status, looked_up) = it.get(&it.alice, "/api/v1/invocations/toolu_01A").await;
        assert_eq!(status, 200, "{looked_up}");
        assert_eq!(looked_up["outcome"], "completed");
        assert_eq!(it.setup.handle.tool_calls("search_issues"), 1);
        // The same id for another request is refused.
        let (status, reused) = it
            .post(
                &it.alice,
                "/api/v1/invocations",
                &json!({"invocation_id": "toolu_01A", "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "other"}}),
            )
            .await;
        assert_eq!(status, 409, "{reused}");
        assert_eq!(reused["error"]["code"], "invocation_id_reused");

        // The audit: who, which tool, digests and sizes, duration; no payloads.
        let requested = events_of_type(&it.setup, "InvocationRequested").await;
        assert_eq!(requested.len(), 1);
        let request = &requested[0]["envelope"]["invocationRequested"];
        assert_eq!(request["userId"], ALICE);
        assert_eq!(request["toolName"], "search_issues");
        assert_eq!(request["conversationId"], "conv_42");
        assert_eq!(request["argumentsSha256"].as_str().map(str::len), Some(64));
        assert!(request.get("argumentsJson").is_none(), "{request}");
        assert_eq!(
            requested[0]["envelope"]["actor"]["userId"], ALICE,
            "{}",
            requested[0]
        );
        let completed = events_of_type(&it.setup, "InvocationCompleted").await;
        assert_eq!(completed.len(), 1);
        let done = &completed[0]["envelope"]["invocationCompleted"];
        assert_eq!(done["resultSha256"].as_str().map(str::len), Some(64));
        assert!(done["resultSizeBytes"].as_str().is_some(), "{done}");
        assert!(done.get("resultJson").is_none(), "{done}");
        // The allowed request recorded its start: no `InvocationStarted` follows.
        assert_eq!(request["started"], true, "{request}");
        assert_eq!(
            events_of_type(&it.setup, "InvocationStarted").await.len(),
            0
        );
        // Only the invocation's user (and auditors) see it.
        let (status, _) = it
            .get(
                &it.setup.app.token(MALLORY, &["analyst"]),
                "/api/v1/invocations/toolu_01A",
            )
            .await;
        assert_eq!(status, 404);
    }
}

#[tokio::test]
async fn blocked_unknown_and_tool_error_outcomes() {
    let it = connected(Store::Jsonl, settings()).await;
    let blocked = it
        .invoke("call_1", "create_issue", json!({"title": "x"}))
        .await;
    assert_eq!(blocked["outcome"], "rejected", "{blocked}");
    assert_eq!(blocked["reason"], "tool_blocked");
    let unknown = it.invoke("call_2", "no_such_tool", json!({})).await;
    assert_eq!(unknown["outcome"], "rejected");
    assert_eq!(unknown["reason"], "unknown_tool");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);

    it.set_state("flaky_report", "always_allow").await;
    let failed = it.invoke("call_3", "flaky_report", json!({})).await;
    assert_eq!(
        failed["outcome"], "completed",
        "a tool error is a result: {failed}"
    );
    assert_eq!(failed["result"]["is_error"], true);
    assert_eq!(
        failed["result"]["content"][0]["text"],
        "the report backend is down"
    );

    // A JSON-RPC error: failed, and the server's words come marked as the server's.
    it.set_state("picky_report", "always_allow").await;
    // Sessions opened: `server/discover` (stateless era) or `initialize`.
    let openings = || {
        it.setup
            .handle
            .mcp_requests()
            .iter()
            .filter(|r| matches!(r.method.as_deref(), Some("server/discover" | "initialize")))
            .count()
    };
    let opened = openings();
    assert!(opened > 0, "the earlier call opened a session");
    let refused = it.invoke("call_4", "picky_report", json!({})).await;
    assert_eq!(refused["outcome"], "failed", "{refused}");
    assert_eq!(refused["reason"], "mcp_protocol_error");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("JSON-RPC error -32602")
            && message.contains("untrusted: the server's words, not Switchboard's")
            && message.contains(&format!("{INJECTED:?}")),
        "{refused}"
    );
    // The exchange itself went well: the session is kept for the next call.
    it.completed("call_5", "flaky_report", json!({})).await;
    assert_eq!(openings(), opened);
}

/// A tool call is bounded by its invocation's deadline, not by the time limit of one
/// outbound request (OAuth, discovery).
#[tokio::test]
async fn a_tool_that_takes_longer_than_one_outbound_request_may_completes_within_its_deadline() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("slow_report", "always_allow").await;
    let began = std::time::Instant::now();
    let done = it
        .completed("call_slow_tool", "slow_report", json!({}))
        .await;
    assert_eq!(done["result"]["content"][0]["text"], "done at last");
    assert!(began.elapsed() >= SLOW_TOOL, "the tool took its time");
}

#[tokio::test]
async fn an_unreachable_server_fails_the_invocation_with_its_reason() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "always_allow").await;
    it.setup.handle.set_mcp_down(true);
    let failed = it
        .invoke("call_down", "create_issue", json!({"title": "x"}))
        .await;
    assert_eq!(failed["outcome"], "failed", "{failed}");
    // rmcp reports a 503 on tools/call as a transport failure or as a broken exchange,
    // depending on the era's transport; either way the reason says so.
    let reason = failed["reason"].as_str().unwrap_or_default();
    assert!(
        reason == "server_unreachable" || reason == "mcp_protocol_error",
        "{failed}"
    );
    assert!(failed["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(failed.get("result").is_none());
    assert_eq!(events_of_type(&it.setup, "InvocationFailed").await.len(), 1);
}

#[tokio::test]
async fn a_changed_always_allowed_tool_asks_for_approval() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    it.redefine(
        "search_issues",
        "Finds issues, and now also deletes stale ones.",
    )
    .await;
    let outcome = it
        .invoke("call_changed", "search_issues", json!({"query": "x"}))
        .await;
    assert_eq!(outcome["outcome"], "awaiting_approval", "{outcome}");
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
}

#[tokio::test]
async fn a_disabled_server_and_an_auth_error_reject_at_once() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;

    // Authorization gone: the refresh token revoked and the access token expired.
    it.setup.handle.revoke_refresh_tokens();
    it.setup.handle.expire_access_tokens();
    let server = domain::ServerId::parse(&it.server_id).expect("id");
    let alice = alice();
    let probed = it.setup.app.state.connections.probe(server, &alice).await;
    assert_eq!(probed.expect("probe"), connection::ProbeOutcome::AuthError);
    it.settle().await;
    let rejected = it
        .invoke("call_auth", "search_issues", json!({"query": "x"}))
        .await;
    assert_eq!(rejected["outcome"], "rejected", "{rejected}");
    assert_eq!(rejected["reason"], "auth_error");

    let admin = it.setup.app.token("admin@example.com", &["admin"]);
    let (status, body) = it
        .post(
            &admin,
            &format!("/api/v1/servers/{}/disable", it.server_id),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let rejected = it
        .invoke("call_disabled", "search_issues", json!({"query": "x"}))
        .await;
    assert_eq!(rejected["outcome"], "rejected", "{rejected}");
    assert_eq!(rejected["reason"], "server_disabled");
    let (_, tools) = it.get(&it.alice, "/api/v1/tools").await;
    assert_eq!(tools["tools"], json!([]));
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
}

#[tokio::test]
async fn a_user_without_a_connection_is_rejected_as_not_connected_on_both_stores() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("search_issues", "always_allow").await;
        // Bob never connected to the server Alice uses.
        let bob = it.setup.app.token("bob@example.com", &["analyst"]);
        let (status, never) = it
            .post(
                &bob,
                "/api/v1/invocations",
                &json!({"invocation_id": "call_bob", "tool": format!("{PREFIX}search_issues"), "arguments": {}}),
            )
            .await;
        assert_eq!(status, 200, "{never}");
        assert_eq!(never["reason"], "not_connected", "{store:?}: {never}");
        // A name no server offers is still unknown.
        let unknown = it.invoke("call_nothing", "no_such_tool", json!({})).await;
        assert_eq!(unknown["reason"], "unknown_tool", "{store:?}: {unknown}");
        it.disconnect().await;
        // The setting stays (it is the user's), but there is no authorization to call with.
        let rejected = it
            .invoke("call_gone", "search_issues", json!({"query": "x"}))
            .await;
        assert_eq!(rejected["outcome"], "rejected", "{store:?}: {rejected}");
        assert_eq!(rejected["reason"], "not_connected", "{store:?}: {rejected}");
        assert!(rejected["message"].is_string(), "{rejected}");
        let (_, tools) = it.get(&it.alice, "/api/v1/tools").await;
        assert_eq!(tools["tools"], json!([]), "{store:?}");
        assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
        // Each rejection is recorded once.
        let rejections = events_of_type(&it.setup, "InvocationRejected").await;
        assert_eq!(rejections.len(), 3, "{store:?}: {rejections:?}");
    }
}

#[tokio::test]
async fn sixty_four_parallel_invocations_of_one_user_all_complete() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("create_issue", "always_allow").await;
    let it = &it;
    let requests = (0..64).map(|n| {
        let body = json!({"invocation_id": format!("call_{n}"), "tool": format!("{PREFIX}create_issue"), "arguments": {"title": format!("Issue {n}")}});
        async move { it.post(&it.alice, "/api/v1/invocations", &body).await }
    });
    for (status, answer) in join_all(requests).await {
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["outcome"], "completed", "{answer}");
    }
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 64);
}

#[tokio::test]
async fn an_oversized_result_is_truncated_and_flagged() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("export_all", "always_allow").await;
    let outcome = it.invoke("call_big", "export_all", json!({})).await;
    assert_eq!(outcome["outcome"], "completed", "{}", outcome["reason"]);
    let result = &outcome["result"];
    assert_eq!(result["truncated"], true);
    let text = result["content"][0]["text"].as_str().expect("text");
    assert!(text.len() <= 1024 * 1024, "{}", text.len());
    assert!(text.len() > 1000 * 1000, "cut near the cap: {}", text.len());
    let completed = events_of_type(&it.setup, "InvocationCompleted").await;
    let done = &completed[0]["envelope"]["invocationCompleted"];
    assert_eq!(done["truncated"], true);
    let size: u64 = done["resultSizeBytes"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("size");
    assert!(size > testkit::EXPORT_ALL_BYTES as u64, "{size}");
}

#[tokio::test]
async fn captured_payloads_are_in_the_log_cut_to_fit_an_event_where_one_holds_less() {
    for store in [Store::Jsonl, Store::JetStream] {
        // Results up to 2 MiB, twice what one JetStream message holds (1 MiB by default).
        let capturing = invoker::InvokerSettings {
            capture_payloads: true,
            result_limit_bytes: 2 * 1024 * 1024,
            ..settings()
        };
        let it = connected(store, capturing).await;
        it.set_state("search_issues", "always_allow").await;
        it.set_state("export_all", "always_allow").await;
        let small = it
            .invoke("call_small", "search_issues", json!({"query": "x"}))
            .await;
        assert_eq!(small["outcome"], "completed", "{store:?}: {small}");
        let big = it.invoke("call_big", "export_all", json!({})).await;
        assert_eq!(big["outcome"], "completed", "{store:?}: {}", big["message"]);
        assert_eq!(big["result"]["truncated"], true);
        let whole_text = big["result"]["content"][0]["text"]
            .as_str()
            .expect("text")
            .len();
        assert!(whole_text > 1024 * 1024, "{store:?}: {whole_text}");

        let requested = events_of_type(&it.setup, "InvocationRequested").await;
        let request = requested
            .iter()
            .map(|e| &e["envelope"]["invocationRequested"])
            .find(|r| r["invocationId"] == "call_small")
            .expect("recorded");
        let arguments: Value =
            serde_json::from_str(request["argumentsJson"].as_str().expect("captured"))
                .expect("JSON");
        assert_eq!(arguments, json!({"query": "x"}), "{store:?}");
        let completed = events_of_type(&it.setup, "InvocationCompleted").await;
        let completion = |id: &str| {
            completed
                .iter()
                .map(|e| &e["envelope"]["invocationCompleted"])
                .find(|c| c["invocationId"] == id)
                .expect("recorded")
                .clone()
        };
        let captured = |completion: &Value| -> Value {
            serde_json::from_str(completion["resultJson"].as_str().expect("captured"))
                .expect("JSON")
        };
        let small_completion = completion("call_small");
        assert_eq!(captured(&small_completion), small["result"], "{store:?}");
        assert!(small_completion.get("resultHeldBy").is_none(), "{store:?}");
        let big_completion = completion("call_big");
        let big_captured = captured(&big_completion);
        let caller = it.setup.app.state.invoker.clone();
        match store {
            Store::Jsonl => {
                assert_eq!(big_captured, big["result"]);
                assert!(big_completion.get("resultHeldBy").is_none());
            }
            Store::JetStream => {
                // Cut to fit the event, flagged; the calling process holds the whole.
                let cut = big_captured["content"][0]["text"]
                    .as_str()
                    .expect("text")
                    .len();
                assert!(cut < 1024 * 1024 && cut > 1024 * 1024 / 2, "{cut}");
                assert_eq!(big_captured["truncated"], true);
                assert_eq!(big_completion["resultHeldBy"], caller.instance());
            }
        }

        // Another process (no way to ask the caller) answers from the log.
        let other = caller.another_instance();
        let look_up = |id: &'static str| {
            let other = other.clone();
            async move {
                let report = report_now(&other, id).await;
                assert_eq!(report.outcome, invoker::Outcome::Completed);
                result_of(report, "from the log")
            }
        };
        assert_eq!(look_up("call_small").await, small["result"], "{store:?}");
        assert_eq!(look_up("call_big").await, big_captured, "{store:?}");
        // The caller answers with the whole result.
        let whole = result_of(report_now(&caller, "call_big").await, "held");
        assert_eq!(whole, big["result"], "{store:?}");

        // Arguments an event cannot hold are refused up front, saying how much is taken
        // (under the 1 MiB setting, over what a message holds with the event around it).
        let blob = "a".repeat(1024 * 1024 - 4 * 1024);
        let context = service_kit::CommandContext::service("test");
        let answer = caller
            .invoke(
                &context,
                it.request("call_blob", "search_issues", json!({"query": blob})),
            )
            .await;
        match store {
            Store::Jsonl => {
                let report = answer.expect("taken: a JSONL event has no size limit");
                assert_eq!(report.outcome, invoker::Outcome::Completed);
            }
            Store::JetStream => {
                let error = answer.expect_err("refused");
                assert_eq!(error.code(), "arguments_too_large");
                assert!(
                    matches!(error, invoker::InvokerError::ArgumentsTooLarge { max, .. } if max < 1024 * 1024 - 4 * 1024),
                    "{error}"
                );
            }
        }
    }
}

/// Without payload capture no event holds the arguments: on JetStream, arguments up to the
/// setting that one event could not capture are taken, for a call and for an approval (the
/// vault keeps those, with no event around them).
#[tokio::test]
async fn without_capture_arguments_no_event_could_hold_are_taken() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    it.set_state("create_issue", "needs_approval").await;
    let caller = it.setup.app.state.invoker.clone();
    let context = service_kit::CommandContext::service("test");
    // Under the 1 MiB setting, over a 1 MiB message with an event around it.
    let blob = "a".repeat(1024 * 1024 - 4 * 1024);
    let called = caller
        .invoke(
            &context,
            it.request("call_blob", "search_issues", json!({"query": blob})),
        )
        .await
        .expect("taken");
    assert_eq!(called.outcome, invoker::Outcome::Completed);
    let waiting = caller
        .invoke(
            &context,
            it.request("call_blob_wait", "create_issue", json!({"title": blob})),
        )
        .await
        .expect("taken");
    assert_eq!(waiting.outcome, invoker::Outcome::AwaitingApproval);
    assert_eq!(it.kept_arguments().await.len(), 1);
}

#[tokio::test]
async fn a_call_past_its_deadline_fails_with_deadline_exceeded() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "always_allow").await;
    // The server refuses the token and the refresh hangs at the token endpoint: the call
    // cannot finish before the deadline.
    it.setup.handle.expire_access_tokens();
    let gate = it.setup.handle.pause_token_endpoint();
    let (status, outcome) = it
        .post(
            &it.alice,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_slow", "tool": format!("{PREFIX}create_issue"), "arguments": {"title": "x"}, "deadline_ms": 300}),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert_eq!(outcome["reason"], "deadline_exceeded");
    gate.release();
    let (status, bad) = it
        .post(
            &it.alice,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_bad_deadline", "tool": format!("{PREFIX}create_issue"), "arguments": {}, "deadline_ms": 0}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["code"], "deadline_invalid");
}

/// A call given up at its deadline is cancelled at the server, in both eras (MCP
/// cancellation: `notifications/cancelled` in a session, the request's closed stream in the
/// stateless era): the tool stops, instead of acting after its caller was told it failed.
#[tokio::test]
async fn a_call_past_its_deadline_is_cancelled_at_the_server() {
    for (fixture, template) in [
        (OAuthFixture::notion(), "notion"),
        (OAuthFixture::atlassian(), "atlassian"),
    ] {
        let it = connected_to(Store::Jsonl, fixture, template, settings()).await;
        it.set_state("slow_report", "always_allow").await;
        it.set_state("search_issues", "always_allow").await;
        // The session open first, so that the slow call reaches the tool well within its
        // deadline however busy the machine.
        let done = it
            .invoke("call_before", "search_issues", json!({"query": "x"}))
            .await;
        assert_eq!(done["outcome"], "completed", "{template}: {done}");
        let (status, outcome) = it
            .post(
                &it.alice,
                "/api/v1/invocations",
                &json!({"invocation_id": "call_given_up", "tool": format!("{}slow_report", it.prefix), "arguments": {}, "deadline_ms": 2000}),
            )
            .await;
        assert_eq!(status, 200, "{outcome}");
        assert_eq!(outcome["outcome"], "failed", "{template}: {outcome}");
        assert_eq!(outcome["reason"], "deadline_exceeded", "{template}");
        // Not cancelled, the tool answers after its time: the wait ends either way.
        let ended = tokio::time::timeout(SLOW_TOOL * 3, it.setup.handle.slow_calls_ended(1))
            .await
            .expect("the call ended at the server");
        assert_eq!(
            ended,
            [SlowCallEnd::Abandoned {
                tool: "slow_report".to_owned()
            }],
            "{template}"
        );
        // The session goes on serving calls.
        let done = it
            .invoke("call_after", "search_issues", json!({"query": "x"}))
            .await;
        assert_eq!(done["outcome"], "completed", "{template}: {done}");
    }
}

/// The deadline asked for with a request that waits for approval holds for its call too,
/// made when the user approves.
#[tokio::test]
async fn an_approved_call_keeps_to_the_deadline_its_request_asked_for() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let (status, waiting) = it
        .post(
            &it.alice,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_slow_approved", "tool": format!("{PREFIX}create_issue"), "arguments": {"title": "x"}, "deadline_ms": 300}),
        )
        .await;
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["outcome"], "awaiting_approval", "{waiting}");
    it.setup.handle.expire_access_tokens();
    let gate = it.setup.handle.pause_token_endpoint();
    let (status, outcome) = it.decide("call_slow_approved", "approve").await;
    gate.release();
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "failed", "{outcome}");
    assert_eq!(outcome["reason"], "deadline_exceeded");
    assert!(
        outcome["message"]
            .as_str()
            .is_some_and(|m| m.contains("300 ms")),
        "{outcome}"
    );
}

/// 48 of one user's calls at once reach the server together: none waits behind another in
/// the user's session (`rmcp`'s default sends 16 at a time; the others' deadlines would run
/// before they are even sent).
#[tokio::test]
async fn a_users_parallel_calls_reach_the_server_together() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("gather_report", "always_allow").await;
    let ids: Vec<String> = (0..48).map(|n| format!("gather_{n}")).collect();
    let calls = ids
        .iter()
        .map(|id| it.invoke(id, "gather_report", json!({})));
    for answer in futures_util::future::join_all(calls).await {
        assert_eq!(answer["outcome"], "completed", "{answer}");
        assert_eq!(answer["result"]["is_error"], false, "{answer}");
    }
    assert_eq!(it.setup.handle.tool_calls("gather_report"), 48);
}

/// `/metrics` shows each call to an MCP server by server and how it ended, and what waits:
/// approvals, open invocations, MCP sessions.
#[tokio::test]
async fn the_metrics_show_calls_by_server_and_what_waits() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    it.set_state("flaky_report", "always_allow").await;
    it.set_state("create_issue", "needs_approval").await;
    it.completed("call_counted", "search_issues", json!({"query": "x"}))
        .await;
    let flaky = it.invoke("call_flaky", "flaky_report", json!({})).await;
    assert_eq!(flaky["result"]["is_error"], true, "{flaky}");
    it.awaiting("call_waiting", "create_issue", json!({"title": "w"}))
        .await;

    let text = it
        .setup
        .app
        .get("/metrics", None)
        .await
        .text()
        .await
        .expect("text");
    let server = &it.server_id;
    for line in [
        format!(
            "switchboard_mcp_call_duration_seconds_count{{server=\"{server}\",result=\"completed\"}} 1"
        ),
        format!(
            "switchboard_mcp_call_duration_seconds_count{{server=\"{server}\",result=\"tool_error\"}} 1"
        ),
        "switchboard_approvals_pending 1".to_owned(),
        "switchboard_invocations_open 1".to_owned(),
        "switchboard_mcp_sessions_open 1".to_owned(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
}

/// A server that answers a call with a request for input (the 2026-07-28 `input_required`
/// result, here a question for the user), which Switchboard does not relay, fails the
/// invocation saying what it asked for — not as a broken protocol, and without the server's
/// words — and the session goes on serving calls.
#[tokio::test]
async fn a_tool_that_asks_for_input_fails_saying_what_it_asked_for() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("ask_report", "always_allow").await;
    it.set_state("search_issues", "always_allow").await;
    let failed = it.invoke("call_asks", "ask_report", json!({})).await;
    assert_eq!(failed["outcome"], "failed", "{failed}");
    assert_eq!(failed["reason"], "input_required", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.contains("a question for the user"), "{message}");
    assert!(!message.contains(INJECTED), "{message}");
    assert_eq!(it.setup.handle.tool_calls("ask_report"), 1);
    it.completed("call_after_asking", "search_issues", json!({"query": "x"}))
        .await;
}
