//! The orchestrator's side: acting for users, results across processes, the NATS protocol,
//! stops, tool-list changes and a user's history.
use super::*;

#[tokio::test]
async fn an_orchestrator_acts_for_a_named_user_and_others_may_not() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let (status, tools) = it
        .get(&orchestrator, &format!("/api/v1/tools?user={ALICE}"))
        .await;
    assert_eq!(status, 200, "{tools}");
    assert_eq!(tools["tools"].as_array().map(Vec::len), Some(1));
    let (status, outcome) = it
        .post(
            &orchestrator,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_o", "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "x"}, "user": ALICE, "deadline_ms": 10000}),
        )
        .await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "completed");
    let (status, looked_up) = it
        .get(
            &orchestrator,
            &format!("/api/v1/invocations/call_o?user={ALICE}"),
        )
        .await;
    assert_eq!(status, 200, "{looked_up}");
    assert_eq!(looked_up["outcome"], "completed");
    // A user cannot act for another.
    let mallory = it.setup.app.token(MALLORY, &["analyst"]);
    let (status, refused) = it
        .get(&mallory, &format!("/api/v1/tools?user={ALICE}"))
        .await;
    assert_eq!(status, 403, "{refused}");
    let (status, refused) = it
        .post(
            &mallory,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_m", "tool": format!("{PREFIX}search_issues"), "arguments": {}, "user": ALICE}),
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    let (status, bad) = it
        .post(
            &it.alice,
            "/api/v1/invocations",
            &json!({"invocation_id": "", "tool": "x", "arguments": {}}),
        )
        .await;
    assert_eq!(status, 400, "{bad}");
    assert_eq!(bad["error"]["code"], "invocation_id_invalid");
}

#[tokio::test]
async fn a_result_only_the_calling_process_holds_reaches_a_look_up_on_another() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("peers");
    let caller = it.setup.app.state.invoker.clone();
    let other = caller.another_instance();
    assert_ne!(caller.instance(), other.instance());
    let shutdown = tokio_util::sync::CancellationToken::new();
    for invoker in [&caller, &other] {
        serve_on_nats(invoker, &client, &prefix, Stop::at(shutdown.clone())).await;
    }
    let context = service_kit::CommandContext::service("test");
    let request = || it.request("call_held", "search_issues", json!({"query": "x"}));
    let made = caller.invoke(&context, request()).await.expect("invoke");
    assert_eq!(made.outcome, invoker::Outcome::Completed);
    let made = result_of(made, "the caller's");

    // The log names the process that holds the result, and holds no payload.
    let completed = events_of_type(&it.setup, "InvocationCompleted").await;
    assert_eq!(completed.len(), 1);
    let completed = &completed[0]["envelope"]["invocationCompleted"];
    assert_eq!(completed["resultHeldBy"], caller.instance(), "{completed}");
    assert!(completed.get("resultJson").is_none(), "{completed}");

    // A look-up on another process fetches it from the caller.
    let looked_up = report_now(&other, "call_held").await;
    assert_eq!(looked_up.outcome, invoker::Outcome::Completed);
    assert_eq!(result_of(looked_up, "fetched from its holder"), made);
    // So does the orchestrator's retry of the request there, which calls nothing.
    let retried = other.invoke(&context, request()).await.expect("retry");
    assert_eq!(retried.outcome, invoker::Outcome::Completed);
    assert_eq!(result_of(retried, "fetched from its holder"), made);
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 1);

    // A process with no way to ask answers the outcome without the result.
    let unconnected = caller.another_instance();
    let bare = report_now(&unconnected, "call_held").await;
    assert_eq!(bare.outcome, invoker::Outcome::Completed);
    assert!(bare.result.is_none());
    shutdown.cancel();
}

#[tokio::test]
async fn a_result_over_a_nats_message_is_cut_to_fit_there_and_fetched_whole_elsewhere() {
    use proto::Message as _;
    // Results up to 3 MiB: three times what a message on the server may hold (1 MiB by
    // default; with the default cap a reply holds the result twice, over it too).
    let settings = invoker::InvokerSettings {
        result_limit_bytes: 3 * 1024 * 1024,
        ..settings()
    };
    let it = connected(Store::JetStream, settings).await;
    it.set_state("export_all", "always_allow").await;
    let client = nats_client().await;
    let max_payload = client.server_info().max_payload;
    assert!(max_payload < 3 * 1024 * 1024, "{max_payload}");
    let prefix = testkit::unique_name("large");
    let caller = it.setup.app.state.invoker.clone();
    let other = caller.another_instance();
    let shutdown = tokio_util::sync::CancellationToken::new();
    serve_on_nats(&caller, &client, &prefix, Stop::at(shutdown.clone())).await;
    let other_client = nats_client().await;
    // The other process answers for its results but not in the queue group: the
    // orchestrator's requests reach the caller.
    let other_service = invoker::nats::NatsService::start(other.clone(), &other_client, &prefix)
        .await
        .expect("service");
    drop(other_service);
    other_client.flush().await.expect("its endpoints gone");

    // The reply arrives, the result in it cut to fit and flagged.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let body = json!({"invocationId": "toolu_big", "userId": ALICE, "tool": format!("{PREFIX}export_all"), "arguments": {}});
    let reply = client
        .request_with_headers(
            format!("{prefix}.invoke"),
            headers,
            serde_json::to_vec(&body).expect("json").into(),
        )
        .await
        .expect("a reply, not a time-out");
    assert!(
        reply.payload.len() <= max_payload,
        "{}",
        reply.payload.len()
    );
    let outcome: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(outcome["outcome"], "completed", "{}", outcome["message"]);
    assert_eq!(outcome["result"]["truncated"], true);
    assert_eq!(outcome["result"]["untrusted"], true);
    let text = outcome["result"]["content"][0]["text"]
        .as_str()
        .expect("text");
    // Cut to fit twice in one message, not emptied.
    assert!(text.len() > max_payload / 4, "{}", text.len());
    let exact: Value =
        serde_json::from_str(outcome["resultJson"].as_str().expect("resultJson")).expect("JSON");
    assert_eq!(exact["content"][0]["text"], text);

    // In protobuf too, for a look-up.
    let reply = status_over_nats(&client, &prefix, "toolu_big").await;
    assert!(
        reply.payload.len() <= max_payload,
        "{}",
        reply.payload.len()
    );
    let status = proto::v1::InvocationReply::decode(reply.payload).expect("protobuf reply");
    assert_eq!(status.outcome, "completed");
    let cut: Value = serde_json::from_str(&status.result_json).expect("JSON");
    assert_eq!(cut["truncated"], true);
    assert!(status.result.is_some());

    // Over HTTP the whole (capped) result; another process fetches all of it from the
    // caller, in parts.
    let held = result_of(report_now(&caller, "toolu_big").await, "held by the caller");
    let held_text = held["content"][0]["text"].as_str().expect("text");
    assert!(held_text.len() > 3000 * 1000, "{}", held_text.len());
    let fetched = result_of(
        report_now(&other, "toolu_big").await,
        "fetched from the caller",
    );
    assert_eq!(fetched, held);
    assert_eq!(it.setup.handle.tool_calls("export_all"), 1);
    shutdown.cancel();
}

/// A process that stops gracefully hands the results it holds over in the vault: a look-up
/// or a repeated request after the restart (or on another process) gets the result, not
/// just the outcome, and nothing is called again.
#[tokio::test]
async fn results_handed_over_at_a_stop_answer_look_ups_after_it() {
    for store in STORES {
        // Results up to 2 MiB: a large one is over what a JetStream message holds.
        let settings = invoker::InvokerSettings {
            result_limit_bytes: 2 * 1024 * 1024,
            ..settings()
        };
        let it = connected(store, settings).await;
        it.set_state("search_issues", "always_allow").await;
        it.set_state("export_all", "always_allow").await;
        let stopping = it.setup.app.state.invoker.clone();
        let context = service_kit::CommandContext::service("test");
        let request = || it.request("call_kept", "search_issues", json!({"query": "x"}));
        let made = stopping.invoke(&context, request()).await.expect("invoke");
        assert_eq!(made.outcome, invoker::Outcome::Completed);
        let made = result_of(made, "the caller's");
        let large = stopping
            .invoke(&context, it.request("call_large", "export_all", json!({})))
            .await
            .expect("invoke");
        let large = result_of(large, "the caller's");
        let large_text = large["content"][0]["text"].as_str().expect("text").len();
        assert!(large_text > 1024 * 1024, "{large_text}");

        // Before the hand-over the next process knows the outcome only.
        let before = stopping.another_instance();
        let bare = report_now(&before, "call_kept").await;
        assert_eq!(bare.outcome, invoker::Outcome::Completed);
        assert!(bare.result.is_none(), "{store:?}");

        assert_eq!(
            stopping.hand_over_results(Duration::from_secs(10)).await,
            2,
            "{store:?}"
        );
        let next = stopping.another_instance();
        let looked_up = report_now(&next, "call_kept").await;
        assert_eq!(result_of(looked_up, "handed over"), made, "{store:?}");
        let repeated = next.invoke(&context, request()).await.expect("repeat");
        assert_eq!(repeated.outcome, invoker::Outcome::Completed);
        assert_eq!(result_of(repeated, "handed over"), made);
        assert_eq!(it.setup.handle.tool_calls("search_issues"), 1, "{store:?}");
        // The large one whole on JSONL; on JetStream cut to fit a message, and flagged.
        let handed_large = result_of(report_now(&next, "call_large").await, "handed over");
        match store {
            Store::Jsonl => assert_eq!(handed_large, large),
            Store::JetStream => {
                assert_eq!(handed_large["truncated"], true);
                let text = handed_large["content"][0]["text"].as_str().expect("text");
                assert!(
                    text.len() < 1024 * 1024 && text.len() > 512 * 1024,
                    "{}",
                    text.len()
                );
                assert!(
                    large["content"][0]["text"]
                        .as_str()
                        .is_some_and(|whole| whole.starts_with(text))
                );
            }
        }
        // Sealed: the vault's store holds no word of it in the clear.
        let vault = &it.setup.app.vault;
        let names = vault.names().await.expect("vault names");
        let handed: Vec<_> = names
            .iter()
            .filter(|name| name.as_str().starts_with("handed_over_results/"))
            .collect();
        assert_eq!(handed.len(), 2, "{names:?}");
        let clear = made["structured_content"]["issues"][0]["title"]
            .as_str()
            .expect("a title");
        for name in handed {
            let stored = vault
                .store()
                .get(name)
                .await
                .expect("read")
                .expect("stored");
            assert!(
                !stored
                    .value
                    .windows(clear.len())
                    .any(|window| window == clear.as_bytes()),
                "{store:?}"
            );
        }
    }
}

#[tokio::test]
async fn the_nats_protocol_answers_in_protobuf_and_in_json() {
    use proto::Message as _;
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("orch");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let invoker = &it.setup.app.state.invoker;
    serve_on_nats(invoker, &client, &prefix, Stop::at(shutdown.clone())).await;
    let json_request = |subject: &str, body: Value| {
        let (client, subject) = (client.clone(), subject.to_owned());
        async move { nats_json(&client, subject, &body).await }
    };

    let tools = json_request(&format!("{prefix}.tools.list"), json!({"userId": ALICE})).await;
    assert_eq!(
        tools["tools"][0]["name"],
        format!("{PREFIX}search_issues"),
        "{tools}"
    );
    assert_eq!(tools["tools"][0]["server"]["name"], "notion team");
    assert_eq!(tools["tools"][0]["inputSchema"]["type"], "object");

    let outcome = json_request(
        &format!("{prefix}.invoke"),
        json!({"invocationId": "toolu_nats_1", "userId": ALICE, "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "x"}}),
    )
    .await;
    assert_eq!(outcome["outcome"], "completed", "{outcome}");
    assert_eq!(outcome["result"]["untrusted"], true);
    assert_eq!(
        outcome["result"]["structured_content"]["issues"][0]["key"],
        "FX-1"
    );
    assert_eq!(outcome["userId"], ALICE, "{outcome}");
    // The result exactly, as JSON text too.
    let exact: Value =
        serde_json::from_str(outcome["resultJson"].as_str().expect("resultJson")).expect("JSON");
    assert_eq!(
        exact["structured_content"],
        outcome["result"]["structured_content"]
    );

    // A Struct holds numbers as doubles: whole ones reach the server as integers, and
    // `argumentsJson` carries any number exactly.
    let outcome = json_request(
        &format!("{prefix}.invoke"),
        json!({"invocationId": "toolu_nats_3", "userId": ALICE, "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "x", "limit": 5, "ratio": 0.5}, "conversationId": "conv_9"}),
    )
    .await;
    assert_eq!(outcome["outcome"], "completed", "{outcome}");
    let outcome = json_request(
        &format!("{prefix}.invoke"),
        json!({"invocationId": "toolu_nats_4", "userId": ALICE, "tool": format!("{PREFIX}search_issues"), "argumentsJson": "{\"query\": \"y\", \"id\": 9007199254740993}"}),
    )
    .await;
    assert_eq!(outcome["outcome"], "completed", "{outcome}");
    let sent = it.setup.handle.tool_call_arguments("search_issues");
    assert_eq!(
        sent[sent.len() - 2],
        json!({"query": "x", "limit": 5, "ratio": 0.5})
    );
    assert_eq!(
        sent[sent.len() - 1],
        json!({"query": "y", "id": 9_007_199_254_740_993_u64})
    );
    let requested = events_of_type(&it.setup, "InvocationRequested").await;
    let third = requested
        .iter()
        .map(|e| &e["envelope"]["invocationRequested"])
        .find(|r| r["invocationId"] == "toolu_nats_3")
        .expect("recorded");
    assert_eq!(third["conversationId"], "conv_9", "{third}");
    // Arguments sent twice, differently, are refused rather than one silently chosen.
    let twice = json_request(
        &format!("{prefix}.invoke"),
        json!({"invocationId": "toolu_nats_5", "userId": ALICE, "tool": format!("{PREFIX}search_issues"), "arguments": {"query": "a"}, "argumentsJson": "{\"query\": \"b\"}"}),
    )
    .await;
    assert_eq!(twice["error"]["code"], "arguments_invalid", "{twice}");
    assert!(twice.get("outcome").is_none_or(|o| o == ""), "{twice}");

    // Protobuf: the status of the same invocation, then a refused request.
    let reply = status_over_nats(&client, &prefix, "toolu_nats_1").await;
    let status = proto::v1::InvocationReply::decode(reply.payload).expect("protobuf reply");
    assert_eq!(status.outcome, "completed");
    assert!(status.result.is_some());
    let request = proto::v1::InvokeRequest {
        invocation_id: "toolu_nats_2".to_owned(),
        user_id: ALICE.to_owned(),
        tool: format!("{PREFIX}create_issue"),
        ..Default::default()
    };
    let reply = client
        .request(format!("{prefix}.invoke"), request.encode_to_vec().into())
        .await
        .expect("reply");
    let rejected = proto::v1::InvocationReply::decode(reply.payload).expect("protobuf reply");
    assert_eq!(rejected.outcome, "rejected");
    assert_eq!(rejected.reason, "tool_blocked");
    let request = proto::v1::InvokeRequest {
        invocation_id: String::new(),
        user_id: ALICE.to_owned(),
        ..Default::default()
    };
    let reply = client
        .request(format!("{prefix}.invoke"), request.encode_to_vec().into())
        .await
        .expect("reply");
    let refused = proto::v1::InvocationReply::decode(reply.payload).expect("protobuf reply");
    assert_eq!(
        refused.error.map(|e| e.code),
        Some("invocation_id_invalid".to_owned())
    );
    assert_eq!(it.setup.handle.tool_calls("search_issues"), 3);
    shutdown.cancel();
}

/// A NATS service that has stopped taking requests still announces the outcomes of
/// approvals given elsewhere (here over HTTP, whose server lets its requests finish) until
/// the rest of the process is done, and only then stops.
#[tokio::test]
async fn a_stopping_nats_service_announces_approval_outcomes_until_the_rest_is_done() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("stopping");
    let stop = Stop {
        taking_requests: tokio_util::sync::CancellationToken::new(),
        others_done: tokio_util::sync::CancellationToken::new(),
        grace: Duration::from_secs(60),
    };
    let invoker = &it.setup.app.state.invoker;
    let service = invoker::nats::NatsService::start(invoker.clone(), &client, &prefix)
        .await
        .expect("service");
    let ping_subject = format!(
        "$SRV.PING.{}.{}",
        invoker::nats::SERVICE_NAME,
        service.service_id().await.expect("an id")
    );
    let running = tokio::spawn(service.run(stop.clone()));
    client
        .request(ping_subject.clone(), Default::default())
        .await
        .expect("discovery finds the service");
    let mut announced = announcements(&client, &prefix, "call_late").await;
    it.awaiting("call_late", "create_issue", json!({"title": "late"}))
        .await;

    stop.taking_requests.cancel();
    // Discovery stops listing it as it stops taking requests (its verb handler's
    // subscriptions end a moment later; a ping caught as the handler stops goes unanswered).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ping = async_nats::Request::new()
                .payload(Default::default())
                .timeout(Some(Duration::from_secs(1)));
            match client.send_request(ping_subject.clone(), ping).await {
                Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => break,
                _ => {}
            }
        }
    })
    .await
    .expect("no longer discovered");
    let (status, outcome) = it.decide("call_late", "approve").await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["outcome"], "completed", "{outcome}");
    let reply = next_announcement(&mut announced, "announced while stopping").await;
    assert_eq!(reply.outcome, "completed", "{reply:?}");
    assert!(!running.is_finished(), "stopped before the rest was done");

    stop.others_done.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("stopped once the rest was done")
        .expect("the service's task");
}

/// At a stop, a wait for an outcome answers what is known at once — one under way and one
/// asked for after it — instead of holding the stop up for as long as it asked to wait.
#[tokio::test]
async fn a_stop_answers_waits_for_an_outcome_at_once() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.awaiting("call_waited", "create_issue", json!({"title": "w"}))
        .await;
    let path = "/api/v1/invocations/call_waited?wait=60";
    let invoker = it.setup.app.state.invoker.clone();
    let (answer, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), it.get(&it.alice, path)),
        async { invoker.stop_waiting() }
    );
    let (status, report) = answer.expect("answered at once, not after its 60 s");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "awaiting_approval", "{report}");
    let (status, report) = tokio::time::timeout(Duration::from_secs(20), it.get(&it.alice, path))
        .await
        .expect("answered at once");
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcome"], "awaiting_approval", "{report}");
}

/// An orchestrator that keeps a user's tools between turns learns when to list them again:
/// each change of what `tools.list` answers for a user is announced on
/// `<prefix>.tools.changed` with its position, and a list asked after that position shows it.
/// A change the list does not show (a blocked tool redefined) is not announced.
#[tokio::test]
async fn an_orchestrator_is_told_when_a_users_tools_change() {
    for store in STORES {
        // The refusal of a position not reached waits 5 s: once is enough.
        announces_tool_changes(store, store == Store::JetStream).await;
    }
}

/// A user reads their own history — their connection, settings, and every invocation made as
/// them, by whom — without the audit log's permission, and nobody else's.
#[tokio::test]
async fn a_user_reads_what_was_done_as_them_and_nobody_elses_history() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("search_issues", "always_allow").await;
    it.completed("call_mine", "search_issues", json!({"query": "x"}))
        .await;
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let (status, body) = it
        .post(
            &orchestrator,
            "/api/v1/invocations",
            &json!({"invocation_id": "call_for_alice", "user": ALICE, "tool": format!("{PREFIX}search_issues"), "arguments": {}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let types = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|event| event["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    };

    let (status, mine) = it.get(&it.alice, "/api/v1/me/events?limit=1000").await;
    assert_eq!(status, 200, "{mine}");
    let seen = types(&mine);
    for expected in [
        "ConnectionEstablished",
        "ToolPermissionSet",
        "InvocationRequested",
        "InvocationCompleted",
    ] {
        assert!(seen.iter().any(|t| t == expected), "{expected}: {seen:?}");
    }
    assert!(
        !seen.iter().any(|t| t == "ServerClientRegistered"),
        "the server's registration is the administrator's: {seen:?}"
    );
    let (_, requested) = it
        .get(
            &it.alice,
            "/api/v1/me/events?log=invocations&type=InvocationRequested",
        )
        .await;
    let by: Vec<&str> = requested["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|event| {
            event["envelope"]["actor"]["userId"]
                .as_str()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(by, [ALICE, "orchestrator@example.com"], "{requested}");

    let mallory = it.setup.app.token(MALLORY, &["analyst"]);
    let (status, theirs) = it.get(&mallory, "/api/v1/me/events?limit=1000").await;
    assert_eq!(status, 200, "{theirs}");
    assert!(
        !serde_json::to_string(&theirs)
            .expect("JSON")
            .contains(ALICE),
        "{theirs}"
    );
    let (status, refused) = it
        .get(&mallory, &format!("/api/v1/me/events?user={ALICE}"))
        .await;
    assert_eq!(status, 400, "{refused}");
    let (status, _) = it.get(&it.alice, "/api/v1/audit/events").await;
    assert_eq!(status, 403, "the audit log still needs read_audit_log");
}

/// The same over HTTP, for orchestrators without NATS (the embedded default): a stream of the
/// changes of users' tool lists (every user's for an orchestrator, a user's own for them), and
/// a list asked after a change's position that shows it.
#[tokio::test]
async fn an_orchestrator_over_http_follows_changed_tool_lists() {
    let it = connected(Store::Jsonl, settings()).await;
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let open = |token: String, query: &'static str| {
        let app = &it.setup.app;
        async move {
            crate::support::SseReader::new(
                app.client
                    .get(format!("{}/api/v1/tools/changes{query}", app.url))
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("stream"),
            )
        }
    };
    let mut everyones = open(orchestrator.clone(), "").await;
    let mut hers = open(it.alice.clone(), "").await;

    it.set_state("search_issues", "always_allow").await;
    for (stream, whose) in [
        (&mut everyones, "the orchestrator's"),
        (&mut hers, "Alice's"),
    ] {
        let change = stream.next().await.expect("a change");
        assert_eq!(change.event, "tools_changed", "{whose}: {change:?}");
        assert_eq!(change.data["user"], ALICE, "{whose}");
        assert_eq!(change.id, change.data["config_position"].to_string());
    }
    // A blocked tool redefined changes no list; the next change is the next setting's.
    it.redefine("delete_issue", "Deletes an issue, and its links.")
        .await;
    it.set_state("create_issue", "needs_approval").await;
    let change = everyones.next().await.expect("a change");
    let position = change.data["config_position"].as_u64().expect("position");
    let end = it
        .setup
        .app
        .state
        .log
        .last_sequence(eventlog::LogKind::Config)
        .await
        .expect("end");
    assert_eq!(position, end, "the setting's, not the redefinition's");
    let (status, listed) = it
        .get(
            &orchestrator,
            &format!("/api/v1/tools?user={ALICE}&after_config_position={position}"),
        )
        .await;
    assert_eq!(status, 200, "{listed}");
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|tool| tool["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            format!("{PREFIX}create_issue"),
            format!("{PREFIX}search_issues")
        ],
        "{listed}"
    );

    let (status, ahead) = it
        .get(
            &orchestrator,
            &format!(
                "/api/v1/tools?user={ALICE}&after_config_position={}",
                end + 1_000
            ),
        )
        .await;
    assert_eq!(status, 503, "{ahead}");
    assert_eq!(ahead["error"]["code"], "not_caught_up", "{ahead}");
    let mallory = it.setup.app.token(MALLORY, &["analyst"]);
    let refused = it
        .setup
        .app
        .client
        .get(format!(
            "{}/api/v1/tools/changes?user={ALICE}",
            it.setup.app.url
        ))
        .bearer_auth(&mallory)
        .send()
        .await
        .expect("refused");
    assert_eq!(refused.status(), 403, "another user's changes");
}

/// `<prefix>.invoke.status` for Alice's invocation `id`, in protobuf: the reply.
async fn status_over_nats(
    client: &async_nats::Client,
    prefix: &str,
    id: &str,
) -> async_nats::Message {
    use proto::Message as _;
    let request = proto::v1::InvokeStatusRequest {
        invocation_id: id.to_owned(),
        user_id: ALICE.to_owned(),
        wait_ms: 0,
    };
    client
        .request(
            format!("{prefix}.invoke.status"),
            request.encode_to_vec().into(),
        )
        .await
        .expect("a reply, not a time-out")
}

async fn announces_tool_changes(store: Store, check_not_caught_up: bool) {
    use futures_util::StreamExt;
    use proto::Message as _;
    let it = connected(store, settings()).await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("changes");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let invoker = &it.setup.app.state.invoker;
    let mut changes = client
        .subscribe(invoker::tools_changed_subject(&prefix))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    serve_on_nats(invoker, &client, &prefix, Stop::at(shutdown.clone())).await;
    let config_end = || async {
        it.setup
            .app
            .state
            .log
            .last_sequence(eventlog::LogKind::Config)
            .await
            .expect("end")
    };
    let mut next_change = async |what: &str| {
        let message = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .unwrap_or_else(|_| panic!("no announcement: {what}"))
            .expect("a message");
        proto::v1::ToolsChanged::decode(message.payload).expect("protobuf")
    };
    let listed_after = |position: u64| {
        let client = client.clone();
        let subject = format!("{prefix}.tools.list");
        async move {
            nats_json(
                &client,
                subject,
                &json!({"userId": ALICE, "afterConfigPosition": position}),
            )
            .await
        }
    };

    it.set_state("search_issues", "always_allow").await;
    let allowed = next_change("a tool allowed").await;
    assert_eq!(allowed.user_id, ALICE);
    assert_eq!(allowed.config_position, config_end().await);
    let listed = listed_after(allowed.config_position).await;
    assert_eq!(
        listed["tools"][0]["name"],
        format!("{PREFIX}search_issues"),
        "{listed}"
    );

    // The server redefines a tool Alice has blocked: her list is as it was.
    let before = config_end().await;
    it.redefine(
        "delete_issue",
        "Deletes an issue and every issue linked to it.",
    )
    .await;
    assert!(config_end().await > before, "the redefinition is recorded");
    it.set_state("create_issue", "needs_approval").await;
    let asks = next_change("a tool set to ask").await;
    assert_eq!(
        asks.config_position,
        config_end().await,
        "the first announcement after the redefinition is the setting's"
    );

    let admin = it.setup.app.token("admin@example.com", &["admin"]);
    let (status, body) = it
        .post(
            &admin,
            &format!("/api/v1/servers/{}/disable", it.server_id),
            &json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let disabled = next_change("the server disabled").await;
    assert_eq!(disabled.user_id, ALICE);
    let listed = listed_after(disabled.config_position).await;
    // (proto3 JSON leaves an empty list out.)
    assert_eq!(listed, json!({}), "no tools, and no error: {listed}");

    // A position this process has not reached is refused, saying so.
    if check_not_caught_up {
        let ahead = listed_after(config_end().await + 1_000).await;
        assert_eq!(ahead["error"]["code"], "not_caught_up", "{ahead}");
    }
    shutdown.cancel();
}
