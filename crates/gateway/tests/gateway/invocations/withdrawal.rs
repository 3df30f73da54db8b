//! Requests the orchestrator withdraws: waiting, approved or running.
use super::*;

/// The orchestrator withdraws a request that waits for approval (the user stopped the
/// conversation): it leaves the user's approvals, ends `denied` with reason `withdrawn`, is
/// announced, never called, and withdrawn once — over HTTP by the user's own client or, with
/// `invoke_for_users`, for them, and over NATS.
#[tokio::test]
async fn an_orchestrator_withdraws_a_request_waiting_for_approval() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let withdraw = |token: &str, id: &str, user: Option<&str>| {
        let path = match user {
            Some(user) => format!("/api/v1/invocations/{id}/withdraw?user={user}"),
            None => format!("/api/v1/invocations/{id}/withdraw"),
        };
        let (it, token) = (&it, token.to_owned());
        async move { it.post(&token, &path, &json!({})).await }
    };

    it.awaiting("call_withdrawn", "create_issue", json!({"title": "w"}))
        .await;
    let (status, withdrawn) = withdraw(&it.alice, "call_withdrawn", None).await;
    assert_eq!(status, 200, "{withdrawn}");
    assert_eq!(withdrawn["outcome"], "denied", "{withdrawn}");
    assert_eq!(withdrawn["reason"], "withdrawn", "{withdrawn}");
    let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
    assert_eq!(approvals["approvals"], json!([]), "{approvals}");
    let (status, again) = withdraw(&it.alice, "call_withdrawn", None).await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["error"]["code"], "invocation_finished");
    let (status, late) = it.decide("call_withdrawn", "approve").await;
    assert_eq!(status, 409, "{late}");

    // For another user: with `invoke_for_users` only.
    it.awaiting("call_withdrawn_for", "create_issue", json!({"title": "f"}))
        .await;
    let mallory = it.setup.app.token(MALLORY, &["analyst"]);
    let (status, refused) = withdraw(&mallory, "call_withdrawn_for", Some(ALICE)).await;
    assert_eq!(status, 403, "{refused}");
    let orchestrator = it
        .setup
        .app
        .token("orchestrator@example.com", &["orchestrator"]);
    let (status, withdrawn) = withdraw(&orchestrator, "call_withdrawn_for", Some(ALICE)).await;
    assert_eq!(status, 200, "{withdrawn}");
    assert_eq!(withdrawn["reason"], "withdrawn", "{withdrawn}");

    // Over NATS, in JSON, announced on the result subject.
    it.awaiting("call_withdrawn_nats", "create_issue", json!({"title": "n"}))
        .await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("withdraw");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let invoker = &it.setup.app.state.invoker;
    serve_on_nats(invoker, &client, &prefix, Stop::at(shutdown.clone())).await;
    let mut announced = announcements(&client, &prefix, "call_withdrawn_nats").await;
    let reply = nats_json(
        &client,
        format!("{prefix}.invoke.withdraw"),
        &json!({"invocationId": "call_withdrawn_nats", "userId": ALICE}),
    )
    .await;
    assert_eq!(reply["outcome"], "denied", "{reply}");
    assert_eq!(reply["reason"], "withdrawn", "{reply}");
    let announced = next_announcement(&mut announced, "announced").await;
    assert_eq!(announced.reason, "withdrawn", "{announced:?}");
    shutdown.cancel();

    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
    let withdrawals = events_of_type(&it.setup, "InvocationDenied").await;
    assert_eq!(withdrawals.len(), 3, "{withdrawals:?}");
}

/// The race of a withdrawal with an approval's call: withdrawn after the approval was
/// recorded but before the call went out (the seam holds the approved call there until the
/// withdrawal has been made), the call is never made nor started, and fails `withdrawn` —
/// the approval registered it for withdrawals before it recorded itself, so a withdrawal that
/// sees the invocation approved finds it.
#[tokio::test]
async fn a_call_withdrawn_between_its_approval_and_its_start_is_never_made() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    it.awaiting(
        "call_withdrawn_early",
        "create_issue",
        json!({"title": "e"}),
    )
    .await;
    let invoker = it.setup.app.state.invoker.clone();
    let held = invoker.hold_approved_calls().await;
    let approve = json!({"decision": "approve"});
    let approving = it.post(
        &it.alice,
        "/api/v1/approvals/call_withdrawn_early",
        &approve,
    );
    let withdrawing = async {
        invoker.approved_call_arrived().await;
        // The withdrawal's wait for the outcome answers at once: the call is held here.
        invoker.stop_waiting();
        let withdrawn = invoker
            .withdraw(
                &service_kit::CommandContext::service("test"),
                &alice(),
                &invocation("call_withdrawn_early"),
            )
            .await
            .expect("withdrawn");
        drop(held);
        withdrawn
    };
    let ((status, approved), withdrawn) = tokio::join!(approving, withdrawing);
    assert_eq!(
        withdrawn.outcome,
        invoker::Outcome::Running,
        "approved, held: {withdrawn:?}"
    );
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["outcome"], "failed", "{approved}");
    assert_eq!(approved["reason"], "withdrawn", "{approved}");
    assert!(
        approved["message"]
            .as_str()
            .is_some_and(|m| m.contains("the server was not called")),
        "{approved}"
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
    assert_eq!(
        events_of_type(&it.setup, "InvocationStarted").await,
        Vec::<Value>::new(),
        "never started"
    );
}

/// A call under way is withdrawn where it runs — by this process, and by another one over
/// NATS, which does not know where it runs — cancelled at the server too, and ends `failed`
/// with reason `withdrawn`, for the withdrawal and for the caller waiting on it.
#[tokio::test]
async fn a_running_call_is_withdrawn_where_it_runs_and_cancelled_at_the_server() {
    let it = connected(Store::JetStream, settings()).await;
    it.set_state("slow_report", "always_allow").await;
    let client = nats_client().await;
    let prefix = testkit::unique_name("withdraw-running");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let here = it.setup.app.state.invoker.clone();
    let elsewhere = here.another_instance();
    for invoker in [&here, &elsewhere] {
        serve_on_nats(invoker, &client, &prefix, Stop::at(shutdown.clone())).await;
    }
    let context = service_kit::CommandContext::service("test");
    for (n, (id, withdrawer)) in [
        ("call_withdrawn_here", &here),
        ("call_withdrawn_elsewhere", &elsewhere),
    ]
    .into_iter()
    .enumerate()
    {
        let call = {
            let (here, context) = (here.clone(), context.clone());
            let request = it.request(id, "slow_report", json!({}));
            tokio::spawn(async move { here.invoke(&context, request).await })
        };
        // At the server: the call is under way.
        tokio::time::timeout(
            Duration::from_secs(10),
            it.setup
                .handle
                .mcp_requests_where(n + 1, |seen| seen.method.as_deref() == Some("tools/call")),
        )
        .await
        .expect("the call reached the server");
        let withdrawn = withdrawer
            .withdraw(&context, &alice(), &invocation(id))
            .await
            .expect("withdrawn");
        assert_eq!(
            withdrawn.outcome,
            invoker::Outcome::Failed,
            "{id}: {withdrawn:?}"
        );
        assert_eq!(withdrawn.reason.as_deref(), Some("withdrawn"), "{id}");
        let answered = call.await.expect("task").expect("the caller's answer");
        assert_eq!(
            answered.reason.as_deref(),
            Some("withdrawn"),
            "{id}: {answered:?}"
        );
        let ended = tokio::time::timeout(SLOW_TOOL * 3, it.setup.handle.slow_calls_ended(n + 1))
            .await
            .expect("the call ended at the server");
        assert_eq!(
            ended[n],
            SlowCallEnd::Abandoned {
                tool: "slow_report".to_owned()
            },
            "{id}"
        );
    }
    // A finished one is not withdrawn again.
    let again = here
        .withdraw(&context, &alice(), &invocation("call_withdrawn_here"))
        .await
        .expect_err("finished");
    assert_eq!(again.code(), "invocation_finished");
    shutdown.cancel();
}
