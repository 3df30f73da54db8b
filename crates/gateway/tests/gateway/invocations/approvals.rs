//! Approvals: granted, denied, expired and refused to someone else; what happens to
//! requests waiting while their tool, connection or server changes; decisions made
//! `always`.
use super::*;

#[tokio::test]
async fn approval_granted_denied_expired_and_refused_to_someone_else() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "needs_approval").await;
        it.awaiting("call_a", "create_issue", json!({"title": "Bug"}))
            .await;
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
        // Payloads are not captured: the log has the arguments' digest, the vault the
        // arguments, sealed, until Alice decides.
        let requested = it.requested_event("call_a").await;
        assert!(requested.get("argumentsJson").is_none(), "{requested}");
        assert_eq!(
            requested["argumentsSha256"].as_str().map(str::len),
            Some(64)
        );
        assert_eq!(it.kept_arguments().await.len(), 1);
        // Listed at once (read-your-writes), without waiting for the read model here.
        let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
        let approvals = approvals["approvals"]
            .as_array()
            .expect("approvals")
            .clone();
        assert_eq!(approvals.len(), 1, "{approvals:?}");
        assert_eq!(approvals[0]["invocation_id"], "call_a");
        assert_eq!(approvals[0]["tool"], format!("{PREFIX}create_issue"));
        assert_eq!(approvals[0]["arguments"], json!({"title": "Bug"}));
        assert_eq!(approvals[0]["server"]["name"], "notion team");
        assert!(approvals[0].get("conversation_id").is_none(), "none given");
        // What the user decides on beyond the name: the tool as its server describes it.
        assert_eq!(approvals[0]["title"], "Create an issue");
        assert_eq!(approvals[0]["description"], "Creates an issue.");
        assert_eq!(approvals[0]["category"], "write_delete");
        assert_eq!(approvals[0]["annotations"]["readOnlyHint"], false);
        assert_eq!(approvals[0]["tool_changed"], false);
        // The definition the user saw, for a setting that applies to it alone.
        let (_, tools) = it
            .get(
                &it.alice,
                &format!("/api/v1/servers/{}/tools", it.server_id),
            )
            .await;
        let listed = tools["tools"]
            .as_array()
            .and_then(|tools| tools.iter().find(|t| t["name"] == "create_issue"))
            .expect("listed");
        assert_eq!(approvals[0]["definition_hash"], listed["definition_hash"]);
        assert!(
            approvals[0]["definition_hash"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
        );

        // Someone else cannot decide it (nor see it).
        let mallory = it.setup.app.token(MALLORY, &["analyst"]);
        let (status, refused) = it
            .post(
                &mallory,
                "/api/v1/approvals/call_a",
                &json!({"decision": "approve"}),
            )
            .await;
        assert_eq!(status, 404, "{refused}");
        let (_, theirs) = it.get(&mallory, "/api/v1/approvals").await;
        assert_eq!(theirs["approvals"], json!([]));

        // The user approves: the call runs, once.
        let (status, approved) = it.decide("call_a", "approve").await;
        assert_eq!(status, 200, "{approved}");
        assert_eq!(approved["outcome"], "completed");
        assert_eq!(approved["result"]["content"][0]["text"], "Created FX-2");
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
        assert_eq!(
            it.setup.handle.tool_call_arguments("create_issue"),
            vec![json!({"title": "Bug"})],
            "called with the arguments Alice approved"
        );
        assert_eq!(
            it.kept_arguments().await,
            Vec::<String>::new(),
            "taken by the call"
        );
        let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
        assert_eq!(
            approvals["approvals"],
            json!([]),
            "decided: no longer listed"
        );
        let (status, again) = it.decide("call_a", "deny").await;
        assert_eq!(status, 409, "decided once: {again}");
        let (_, status_now) = it.get(&it.alice, "/api/v1/invocations/call_a").await;
        assert_eq!(status_now["outcome"], "completed");

        // Denied.
        it.awaiting("call_b", "create_issue", json!({"title": "No"}))
            .await;
        // A reason goes with a denial only, as text of at most 500 characters.
        for (body, what) in [
            (json!({"decision": "approve", "reason": "fine"}), "approve"),
            (
                json!({"decision": "deny", "reason": "x".repeat(501)}),
                "long",
            ),
            (json!({"decision": "deny", "reason": "a\u{0}b"}), "control"),
        ] {
            let (status, refused) = it.post(&it.alice, "/api/v1/approvals/call_b", &body).await;
            assert_eq!(status, 400, "{what}: {refused}");
            assert_eq!(refused["error"]["code"], "reason_invalid", "{what}");
        }
        let (status, denied) = it
            .post(
                &it.alice,
                "/api/v1/approvals/call_b",
                &json!({"decision": "deny", "reason": " Wrong project;\nuse FX. "}),
            )
            .await;
        assert_eq!(status, 200, "{denied}");
        assert_eq!(denied["outcome"], "denied");
        assert_eq!(denied["reason"], "denied_by_user", "{denied}");
        assert_eq!(denied["message"], "Wrong project;\nuse FX.", "{denied}");
        assert_eq!(
            it.kept_arguments().await,
            Vec::<String>::new(),
            "deleted on denial"
        );
        let (_, looked_up) = it.get(&it.alice, "/api/v1/invocations/call_b").await;
        assert_eq!(looked_up["outcome"], "denied");
        assert_eq!(
            looked_up["message"], "Wrong project;\nuse FX.",
            "{looked_up}"
        );
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
    }
}

#[tokio::test]
async fn an_unanswered_approval_expires() {
    let it = connected(
        Store::Jsonl,
        invoker::InvokerSettings {
            approval_timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .await;
    it.set_state("create_issue", "needs_approval").await;
    it.awaiting("call_late", "create_issue", json!({"title": "Late"}))
        .await;
    // The orchestrator waits for the final outcome; the sweeper expires it.
    let (status, expired) = it
        .get(&it.alice, "/api/v1/invocations/call_late?wait=30")
        .await;
    assert_eq!(status, 200, "{expired}");
    assert_eq!(expired["outcome"], "expired", "{expired}");
    assert_eq!(expired["reason"], "approval_expired");
    let (status, late) = it.decide("call_late", "approve").await;
    assert_eq!(status, 410, "the approval window closed: {late}");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
    assert_eq!(
        it.kept_arguments().await,
        Vec::<String>::new(),
        "deleted on expiry"
    );
}

#[tokio::test]
async fn an_approval_whose_kept_arguments_are_gone_fails_without_a_call() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.awaiting("call_lost", "create_issue", json!({"title": "Lost"}))
        .await;
    let kept = it.kept_arguments().await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    // The vault loses the entry (restored from an older backup, removed by hand).
    let name = vault::SecretName::parse(kept[0].clone()).expect("name");
    it.setup.app.vault.delete(&name).await.expect("delete");

    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"][0]["invocation_id"], "call_lost");
    assert_eq!(approvals["approvals"][0]["arguments"], Value::Null);
    let (status, approved) = it.decide("call_lost", "approve").await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["outcome"], "failed", "{approved}");
    assert_eq!(approved["reason"], "arguments_unavailable");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// The sweeper closes a claim whose process did not follow it up in time; that process,
/// slow (here its vault write held) rather than stopped, then records the wait: its caller
/// is told what the log says — failed — not `awaiting_approval`, and nothing is left pending.
#[tokio::test]
async fn a_wait_recorded_after_the_sweeper_closed_its_claim_answers_the_recorded_outcome() {
    use futures_util::StreamExt;
    let (clock, it) = connected_on_a_manual_clock().await;
    it.set_state("create_issue", "needs_approval").await;
    let invoker = it.setup.app.state.invoker.clone();
    let held = it
        .setup
        .app
        .vault_faults
        .hold_next_write("invocation_arguments/");
    let mut invocations = it
        .setup
        .app
        .log
        .subscribe(eventlog::LogKind::Invocations, 1, None)
        .await
        .expect("subscribe");
    let context = service_kit::CommandContext::service("test");
    let request = it.request("call_slow_wait", "create_issue", json!({"title": "Slow"}));
    let invoking = tokio::spawn(async move { invoker.invoke(&context, request).await });
    // Claimed, and held at the vault before the wait is recorded.
    held.reached.notified().await;
    clock.advance(Duration::from_secs(60));
    // The sweeper (every 50 ms) finds the claim unsettled and closes it.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = invocations.next().await.expect("stream").expect("event");
            if matches!(
                event.envelope.event,
                Some(domain::Event::InvocationFailed(ref e)) if e.invocation_id == "call_slow_wait"
            ) {
                return;
            }
        }
    })
    .await
    .expect("the sweeper closed the claim");
    held.release.notify_one();
    let report = invoking.await.expect("task").expect("invoke");
    assert_eq!(report.outcome, invoker::Outcome::Failed, "{report:?}");
    assert_eq!(report.reason.as_deref(), Some("interrupted"));
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"], json!([]));
    assert_eq!(it.kept_arguments().await, Vec::<String>::new());
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// An entry an earlier invocation with the same id left (ids are reusable after the claim
/// window) is replaced by the new claim's arguments, not a reason to fail it.
#[tokio::test]
async fn arguments_left_under_a_reused_id_are_replaced() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let key = domain::projections::invocation_key(ALICE, "call_reused");
    let name = vault::SecretName::parse(format!("invocation_arguments/{key:032x}")).expect("name");
    it.setup
        .app
        .vault
        .put_with_ttl(
            &name,
            &vault::Secret::from_slice(br#"{"title":"Old"}"#),
            Duration::from_secs(600),
        )
        .await
        .expect("a stale entry");
    it.awaiting("call_reused", "create_issue", json!({"title": "New"}))
        .await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approvals["approvals"][0]["arguments"],
        json!({"title": "New"})
    );
    assert_eq!(it.kept_arguments().await, vec![name.as_str().to_owned()]);
}

#[tokio::test]
async fn arguments_the_vault_will_not_keep_fail_the_invocation_before_it_waits() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.setup
        .app
        .vault_faults
        .fail_next_writes("invocation_arguments/", 1);
    let failed = it
        .invoke("call_unkept", "create_issue", json!({"title": "Unkept"}))
        .await;
    assert_eq!(it.setup.app.vault_faults.failed(), 1);
    assert_eq!(failed["outcome"], "failed", "{failed}");
    assert_eq!(failed["reason"], "arguments_not_kept");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"], json!([]), "never listed");
    assert!(
        events_of_type(&it.setup, "InvocationAwaitingApproval")
            .await
            .is_empty()
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

#[tokio::test]
async fn pending_approvals_and_outcomes_reach_the_users_live_stream() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let response = it
        .setup
        .app
        .client
        .get(format!("{}/api/v1/stream", it.setup.app.url))
        .bearer_auth(&it.alice)
        .send()
        .await
        .expect("subscribe");
    let mut stream = crate::support::SseReader::new(response);
    it.awaiting("call_live", "create_issue", json!({"title": "Live"}))
        .await;
    let mut seen = Vec::new();
    while !seen.contains(&"InvocationAwaitingApproval".to_owned()) {
        let event = stream.next().await.expect("an event");
        seen.push(event.event);
    }
    assert!(seen.contains(&"InvocationRequested".to_owned()), "{seen:?}");
    let (status, _) = it.decide("call_live", "approve").await;
    assert_eq!(status, 200);
    loop {
        let event = stream.next().await.expect("an event");
        if event.event == "InvocationCompleted" {
            break;
        }
    }
}

/// An approval given to a request whose tool was blocked, or whose connection was removed,
/// while it waited never calls the server: the settings in force at the call decide, and
/// the invocation fails saying which. (Blocking and disconnecting over HTTP deny such
/// requests at once, below; this is the approval that comes first — here the changes are
/// made through the services, without that step.)
#[tokio::test]
async fn an_approval_does_not_call_a_tool_blocked_or_disconnected_while_it_waited() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let context = service_kit::CommandContext::service("test");
    let server = domain::ServerId::parse(&it.server_id).expect("server id");
    let state = &it.setup.app.state;
    let approve = |id: &'static str| {
        let it = &it;
        async move {
            let (status, outcome) = it.decide(id, "approve").await;
            assert_eq!(status, 200, "{outcome}");
            assert_eq!(outcome["outcome"], "failed", "{outcome}");
            outcome
        }
    };

    it.awaiting("call_then_blocked", "create_issue", json!({"title": "b"}))
        .await;
    it.block_without_the_routes("create_issue").await;
    let failed = approve("call_then_blocked").await;
    assert_eq!(failed["reason"], "tool_blocked", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .is_some_and(|m| m.contains("not called")),
        "{failed}"
    );

    it.set_state("create_issue", "needs_approval").await;
    it.awaiting("call_then_gone", "create_issue", json!({"title": "g"}))
        .await;
    let done = state
        .connections
        .disconnect(&context, &alice(), server, "the test disconnected")
        .await
        .expect("disconnected");
    state.settle(&done.written).await;
    let failed = approve("call_then_gone").await;
    assert_eq!(failed["reason"], "not_connected", "{failed}");

    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// Blocking a tool, or disconnecting from its server, denies the requests for it that wait
/// for approval — the user's own doing, said in the message — instead of leaving them listed,
/// and their orchestrators waiting, until they expire; a request for another tool stays.
#[tokio::test]
async fn blocking_a_tool_or_disconnecting_denies_its_requests_waiting_for_approval() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.set_state("search_issues", "needs_approval").await;
    it.awaiting("call_to_block", "create_issue", json!({"title": "b"}))
        .await;
    it.awaiting("call_to_keep", "search_issues", json!({"query": "k"}))
        .await;

    it.set_state("create_issue", "blocked").await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approval_ids(&approvals), ["call_to_keep"], "{approvals}");
    let (_, denied) = it.get(&it.alice, "/api/v1/invocations/call_to_block").await;
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(denied["reason"], "denied_by_user", "{denied}");
    assert_eq!(
        denied["message"],
        "the user blocked the tool while the request waited"
    );

    it.disconnect().await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        Vec::<String>::new(),
        "{approvals}"
    );
    let (_, denied) = it.get(&it.alice, "/api/v1/invocations/call_to_keep").await;
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(
        denied["message"],
        "the user removed the connection while the request waited"
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
}

/// An administrator who disables or deletes a server fails the requests on it that wait for
/// approval, at once: they leave their users' approvals, and their orchestrators learn why,
/// instead of both waiting until they expire for an approval that could only fail.
#[tokio::test]
async fn disabling_or_deleting_a_server_fails_the_requests_waiting_for_approval_on_it() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let admin = it.setup.app.token("admin@example.com", &["admin"]);
    let server = format!("/api/v1/servers/{}", it.server_id);
    let failed_as_disabled = |id: &'static str| {
        let it = &it;
        async move {
            let (_, failed) = it
                .get(&it.alice, &format!("/api/v1/invocations/{id}"))
                .await;
            assert_eq!(failed["outcome"], "failed", "{failed}");
            assert_eq!(failed["reason"], "server_disabled", "{failed}");
            assert_eq!(
                failed["message"],
                "the server was disabled or deleted while the request waited for approval; it \
                 was not called"
            );
        }
    };

    it.awaiting("call_before_disable", "create_issue", json!({"title": "d"}))
        .await;
    assert_eq!(it.kept_arguments().await.len(), 1, "kept for the approval");
    let (status, body) = it
        .post(&admin, &format!("{server}/disable"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        Vec::<String>::new(),
        "{approvals}"
    );
    failed_as_disabled("call_before_disable").await;
    assert_eq!(
        it.kept_arguments().await,
        Vec::<String>::new(),
        "its arguments leave the vault"
    );

    let (status, body) = it
        .post(&admin, &format!("{server}/enable"), &json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    it.awaiting("call_before_delete", "create_issue", json!({"title": "x"}))
        .await;
    let response = it
        .setup
        .app
        .client
        .delete(format!("{}{server}", it.setup.app.url))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), 204);
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        Vec::<String>::new(),
        "{approvals}"
    );
    failed_as_disabled("call_before_delete").await;
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// Whatever made a request waiting for approval one no approval could let through — here
/// changes the HTTP routes do not see: a block made through the policy service, the server
/// no longer offering the tool — the sweeper fails it, saying why; but only once it has
/// waited long enough for the read models of the other logs to have caught up (until then
/// a request made just after an unblock elsewhere could look like one on a blocked tool).
#[tokio::test]
async fn the_sweeper_fails_requests_no_approval_could_let_through() {
    let (clock, it) = connected_on_a_manual_clock().await;
    for tool in ["create_issue", "search_issues", "delete_issue"] {
        it.set_state(tool, "needs_approval").await;
    }
    it.awaiting("call_on_blocked", "create_issue", json!({"title": "b"}))
        .await;
    it.awaiting("call_on_withdrawn", "search_issues", json!({"query": "w"}))
        .await;
    it.awaiting("call_still_wanted", "delete_issue", json!({"key": "K-1"}))
        .await;
    let server = domain::ServerId::parse(&it.server_id).expect("server id");
    let state = &it.setup.app.state;
    it.block_without_the_routes("create_issue").await;
    let mut withdrawn = tools();
    withdrawn.retain(|tool| tool.name != "search_issues");
    it.setup.handle.set_tools(withdrawn);
    state
        .connections
        .probe(server, &alice())
        .await
        .expect("probe");
    it.settle().await;

    assert_eq!(
        state.invoker.sweep_once().await.expect("sweep"),
        0,
        "not before they waited long enough"
    );
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approval_ids(&approvals).len(), 3, "{approvals}");

    clock.advance(Duration::from_secs(10));
    let _ = state.invoker.sweep_once().await.expect("sweep");
    it.settle().await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        ["call_still_wanted"],
        "{approvals}"
    );
    let (_, blocked) = it
        .get(&it.alice, "/api/v1/invocations/call_on_blocked")
        .await;
    assert_eq!(blocked["outcome"], "failed", "{blocked}");
    assert_eq!(blocked["reason"], "tool_blocked", "{blocked}");
    let (_, withdrawn) = it
        .get(&it.alice, "/api/v1/invocations/call_on_withdrawn")
        .await;
    assert_eq!(withdrawn["outcome"], "failed", "{withdrawn}");
    assert_eq!(withdrawn["reason"], "unknown_tool", "{withdrawn}");
    assert!(
        withdrawn["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped offering the tool")),
        "{withdrawn}"
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
}

/// A user's approvals hold at most `max_pending_approvals` requests: one more that would wait
/// is rejected, saying why (recorded, so a retry of the id gets the same answer), while an
/// allowed call still goes through; once the user decides one, a new request waits again.
#[tokio::test]
async fn a_user_with_too_many_requests_waiting_gets_no_more_until_they_decide() {
    let it = connected(
        Store::Jsonl,
        invoker::InvokerSettings {
            max_pending_approvals: 2,
            ..settings()
        },
    )
    .await;
    it.set_state("create_issue", "needs_approval").await;
    it.set_state("search_issues", "always_allow").await;
    it.awaiting("call_waits_1", "create_issue", json!({"title": "1"}))
        .await;
    it.awaiting("call_waits_2", "create_issue", json!({"title": "2"}))
        .await;

    let full = it
        .invoke("call_one_too_many", "create_issue", json!({"title": "3"}))
        .await;
    assert_eq!(full["outcome"], "rejected", "{full}");
    assert_eq!(full["reason"], "too_many_pending_approvals", "{full}");
    let again = it
        .invoke("call_one_too_many", "create_issue", json!({"title": "3"}))
        .await;
    assert_eq!(
        again["outcome"], "rejected",
        "the recorded outcome: {again}"
    );
    it.completed("call_allowed", "search_issues", json!({"query": "x"}))
        .await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        ["call_waits_1", "call_waits_2"],
        "{approvals}"
    );

    let (status, denied) = it.decide("call_waits_1", "deny").await;
    assert_eq!(status, 200, "{denied}");
    // The orchestrator's conversation, for the user to place the request.
    let (status, waiting) = it
        .post(
            &it.alice,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_waits_3", "tool": format!("{PREFIX}create_issue"), "arguments": {"title": "4"}, "conversation_id": "conv_7"}),
        )
        .await;
    assert_eq!(status, 200, "{waiting}");
    assert_eq!(waiting["outcome"], "awaiting_approval", "{waiting}");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"][1]["invocation_id"], "call_waits_3");
    assert_eq!(
        approvals["approvals"][1]["conversation_id"], "conv_7",
        "{approvals}"
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// A decision made `always` stands for the tool's later requests: an approval sets the tool to
/// Always allow — for the definition the user saw, refused and nothing decided when the
/// server changed it since — and a denial blocks it, which denies the user's other requests of
/// it that wait. A decision that cannot be made changes no setting.
#[tokio::test]
async fn a_decision_made_always_stands_for_the_tools_later_requests() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.set_state("search_issues", "needs_approval").await;
    it.awaiting("call_first", "create_issue", json!({"title": "a"}))
        .await;
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    let seen = approvals["approvals"][0]["definition_hash"].clone();
    assert!(seen.is_string(), "{approvals}");

    let (status, refused) = it
        .post(
            &it.alice,
            "/api/v1/approvals/call_first",
            &json!({"decision": "approve", "definition_hash": seen}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "definition_hash_without_always");

    // The server changes the tool after the user saw it.
    it.redefine(
        "create_issue",
        "Creates an issue, and closes every other one.",
    )
    .await;
    let (status, stale) = it
        .post(
            &it.alice,
            "/api/v1/approvals/call_first",
            &json!({"decision": "approve", "always": true, "definition_hash": seen}),
        )
        .await;
    assert_eq!(status, 409, "{stale}");
    assert_eq!(it.tool_state("create_issue").await, "needs_approval");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approval_ids(&approvals), ["call_first"], "still waiting");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);

    let now_seen = approvals["approvals"][0]["definition_hash"].clone();
    assert_ne!(now_seen, seen, "{approvals}");
    let (status, approved) = it
        .post(
            &it.alice,
            "/api/v1/approvals/call_first",
            &json!({"decision": "approve", "always": true, "definition_hash": now_seen}),
        )
        .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["outcome"], "completed", "{approved}");
    assert_eq!(it.tool_state("create_issue").await, "always_allow");
    let later = it
        .invoke("call_later", "create_issue", json!({"title": "b"}))
        .await;
    assert_eq!(later["outcome"], "completed", "no approval asked: {later}");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 2);

    it.awaiting("call_denied", "search_issues", json!({"query": "x"}))
        .await;
    it.awaiting("call_pointless", "search_issues", json!({"query": "y"}))
        .await;
    let (status, denied) = it
        .post(
            &it.alice,
            "/api/v1/approvals/call_denied",
            &json!({"decision": "deny", "always": true, "reason": "never search"}),
        )
        .await;
    assert_eq!(status, 200, "{denied}");
    assert_eq!(denied["outcome"], "denied", "{denied}");
    assert_eq!(denied["message"], "never search", "{denied}");
    assert_eq!(it.tool_state("search_issues").await, "blocked");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(
        approval_ids(&approvals),
        Vec::<String>::new(),
        "{approvals}"
    );
    let (_, pointless) = it
        .get(&it.alice, "/api/v1/invocations/call_pointless")
        .await;
    assert_eq!(pointless["outcome"], "denied", "{pointless}");
    let rejected = it
        .invoke("call_after", "search_issues", json!({"query": "z"}))
        .await;
    assert_eq!(rejected["outcome"], "rejected", "{rejected}");
    assert_eq!(rejected["reason"], "tool_blocked", "{rejected}");

    // Decided already: the decision is refused, and the setting stays.
    let (status, late) = it
        .post(
            &it.alice,
            "/api/v1/approvals/call_denied",
            &json!({"decision": "approve", "always": true}),
        )
        .await;
    assert_eq!(status, 409, "{late}");
    assert_eq!(it.tool_state("search_issues").await, "blocked");
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 0);
}

/// The ids of the invocations an approvals list shows.
fn approval_ids(approvals: &Value) -> Vec<String> {
    approvals["approvals"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|a| a["invocation_id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}
