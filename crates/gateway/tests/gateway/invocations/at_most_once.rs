//! At most one upstream call per invocation id: concurrent duplicates, repeated ids,
//! decisions sent at once, appends the store did not confirm, callers that go away, and the
//! sweeper.
use super::*;

#[tokio::test]
async fn concurrent_duplicates_of_one_id_call_the_server_once() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "always_allow").await;
        let body = json!({"invocation_id": "call_dup", "tool": format!("{PREFIX}create_issue"), "arguments": {"title": "Once"}});
        let requests = (0..16).map(|_| it.post(&it.alice, "/api/v1/invocations", &body));
        let answers = join_all(requests).await;
        for (status, answer) in &answers {
            assert_eq!(*status, 200, "{answer}");
            assert_eq!(answer["outcome"], "completed", "{answer}");
        }
        // And from a second process (an invoker sharing nothing in memory).
        let other = it.setup.app.state.invoker.another_instance();
        let report = other
            .invoke(
                &service_kit::CommandContext::service("test"),
                it.request("call_dup", "create_issue", json!({"title": "Once"})),
            )
            .await
            .expect("invoke");
        assert_eq!(report.outcome, invoker::Outcome::Completed);
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1, "{store:?}");
        // One start: the one request recorded (it records its start).
        let requested = events_of_type(&it.setup, "InvocationRequested").await;
        assert_eq!(requested.len(), 1, "{store:?}");
        assert_eq!(
            requested[0]["envelope"]["invocationRequested"]["started"], true,
            "{store:?}"
        );
        assert_eq!(
            events_of_type(&it.setup, "InvocationStarted").await.len(),
            0
        );
        assert_eq!(
            events_of_type(&it.setup, "InvocationCompleted").await.len(),
            1
        );
    }
}

/// Past the log's dedupe window the log no longer knows an invocation's claim: a request
/// repeating its id is then upheld by the read model, which knows every invocation of the
/// claim window. Here the invocation is recorded the way the log holds it once it has
/// forgotten the claim's event id — the same events under ids it does not know — so the
/// claim's append alone would succeed and call the server again.
#[tokio::test]
async fn a_repeated_id_the_log_no_longer_dedupes_is_answered_from_the_read_model() {
    use eventlog::LogKind;
    use futures_util::StreamExt;
    use proto::v1::envelope::Event;
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "always_allow").await;
        let arguments = json!({"title": "Once"});
        it.completed("call_template", "create_issue", arguments.clone())
            .await;

        // call_template's events, recorded again as call_past's under fresh event ids.
        let app = &it.setup.app;
        let subject = domain::invocation::subject(&alice());
        let recorded: Vec<Event> = app
            .log
            .read_from(LogKind::Invocations, 0, None)
            .await
            .expect("read")
            .filter_map(|e| async move { e.expect("event").envelope.event })
            .collect()
            .await;
        let mut last = 0;
        for event in recorded {
            let event = match event {
                Event::InvocationRequested(mut e) => {
                    e.invocation_id = "call_past".to_owned();
                    Event::InvocationRequested(e)
                }
                Event::InvocationCompleted(mut e) => {
                    e.invocation_id = "call_past".to_owned();
                    Event::InvocationCompleted(e)
                }
                _ => continue,
            };
            last = app.append(&subject, event).await;
        }
        assert!(
            app.read_models
                .wait_for_position(LogKind::Invocations, last, Duration::from_secs(5))
                .await
        );

        let repeated = it
            .invoke("call_past", "create_issue", arguments.clone())
            .await;
        assert_eq!(repeated["outcome"], "completed", "{store:?}: {repeated}");
        let (status, looked_up) = it.get(&it.alice, "/api/v1/invocations/call_past").await;
        assert_eq!((status, &looked_up["outcome"]), (200, &json!("completed")));
        // Another request under that id is refused, not run.
        let (status, refused) = it
            .post(
                &it.alice,
                "/api/v1/invocations",
                &json!({"invocation_id": "call_past", "tool": format!("{PREFIX}create_issue"), "arguments": {"title": "Twice"}}),
            )
            .await;
        assert_eq!(status, 409, "{refused}");
        assert_eq!(refused["error"]["code"], "invocation_id_reused");
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1, "{store:?}");
        assert_eq!(
            events_of_type(&it.setup, "InvocationRequested").await.len(),
            2,
            "{store:?}: call_template's and call_past's, no third"
        );
    }
}

/// Approvals and denials sent at once, through two processes' invokers, for one waiting
/// invocation: one decision is recorded, the others are refused, and the call runs only if
/// that decision was an approval.
#[tokio::test]
async fn decisions_sent_at_once_record_one() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "needs_approval").await;
        it.awaiting("call_once", "create_issue", json!({"title": "Decide"}))
            .await;
        it.settle().await;
        let other = it.setup.app.state.invoker.another_instance();
        let alice = alice();
        let id = invocation("call_once");
        let context = service_kit::CommandContext::service("test");
        let over_http = (0..8).map(|n| {
            let decision = if n % 2 == 0 { "approve" } else { "deny" };
            let body = json!({"decision": decision});
            let it = &it;
            async move {
                it.post(&it.alice, "/api/v1/approvals/call_once", &body)
                    .await
                    .0
            }
        });
        let elsewhere = other.decide_approval(
            &context,
            &alice,
            &id,
            invoker::Decision::Deny {
                reason: String::new(),
            },
        );
        let (statuses, elsewhere) = tokio::join!(join_all(over_http), elsewhere);
        for status in &statuses {
            assert!(*status == 200 || *status == 409, "{statuses:?}");
        }
        let decisions = [
            events_of_type(&it.setup, "InvocationApproved").await.len(),
            events_of_type(&it.setup, "InvocationDenied").await.len(),
        ];
        assert_eq!(
            decisions.iter().sum::<usize>(),
            1,
            "{store:?}: {decisions:?}"
        );
        assert_eq!(
            it.setup.handle.tool_calls("create_issue"),
            decisions[0],
            "called once if approved, never if denied"
        );
        let answered =
            statuses.iter().filter(|s| **s == 200).count() + usize::from(elsewhere.is_ok());
        assert!(answered >= 1, "{statuses:?} {elsewhere:?}");
    }
}

/// A claim the store took but whose answer was lost (after its own retries): the caller is
/// told of the error, and once the store answers the claim is closed as failed without a
/// call — not left looking like a call under way until the sweeper's limit. A claim the
/// store did not take leaves nothing behind: the retry claims afresh and runs.
#[tokio::test]
async fn a_claim_whose_answer_was_lost_is_closed_not_left_running() {
    use futures_util::StreamExt;
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "always_allow").await;
        let context = service_kit::CommandContext::service("test");
        let alice = alice();
        let mut invocations = it
            .setup
            .app
            .log
            .subscribe(eventlog::LogKind::Invocations, 1, None)
            .await
            .expect("subscribe");

        let lost = FaultyAppends::new(it.setup.app.log.clone(), "InvocationRequested", true, 1);
        let invoker = it
            .setup
            .app
            .state
            .invoker
            .another_instance_over(lost.clone());
        let request = || it.request("call_lost_ack", "create_issue", json!({"title": "Lost"}));
        let error = invoker
            .invoke(&context, request())
            .await
            .expect_err("the store did not answer");
        assert_eq!(error.code(), "command_failed", "{error}");
        assert_eq!(lost.refused(), 1);
        let failed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let event = invocations.next().await.expect("stream").expect("event");
                if let Some(domain::Event::InvocationFailed(failed)) = event.envelope.event
                    && failed.invocation_id == "call_lost_ack"
                {
                    return failed;
                }
            }
        })
        .await
        .expect("the stored claim was closed");
        assert_eq!(failed.error_code, "claim_unconfirmed", "{store:?}");
        let id = invocation("call_lost_ack");
        let status = invoker
            .status(&alice, &id, Duration::ZERO)
            .await
            .expect("status");
        assert_eq!(status.outcome, invoker::Outcome::Failed);
        // The orchestrator's retry gets that outcome; nothing reached the server.
        let retried = invoker.invoke(&context, request()).await.expect("retry");
        assert_eq!(retried.outcome, invoker::Outcome::Failed, "{retried:?}");
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);

        let refused = FaultyAppends::new(it.setup.app.log.clone(), "InvocationRequested", false, 1);
        let invoker = it
            .setup
            .app
            .state
            .invoker
            .another_instance_over(refused.clone());
        let request = || it.request("call_refused", "create_issue", json!({"title": "Again"}));
        invoker
            .invoke(&context, request())
            .await
            .expect_err("the store did not answer");
        assert_eq!(refused.refused(), 1);
        let retried = invoker.invoke(&context, request()).await.expect("retry");
        assert_eq!(
            retried.outcome,
            invoker::Outcome::Completed,
            "{store:?}: {retried:?}"
        );
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
        assert_eq!(
            events_of_type(&it.setup, "InvocationFailed").await.len(),
            1,
            "only the lost claim's"
        );
    }
}

/// An approval the store did not confirm (taken with its answer lost, or not taken yet):
/// the user is told of the error, and once the store answers the approval is recorded once
/// and its call made once, its outcome announced — not left looking like a call under way.
#[tokio::test]
async fn an_approval_the_store_did_not_confirm_is_seen_through_once() {
    for store_first in [true, false] {
        let it = connected(Store::Jsonl, settings()).await;
        it.set_state("create_issue", "needs_approval").await;
        it.awaiting("call_unconfirmed", "create_issue", json!({"title": "Go"}))
            .await;
        it.settle().await;
        let faulty = FaultyAppends::new(
            it.setup.app.log.clone(),
            "InvocationApproved",
            store_first,
            1,
        );
        let invoker = it
            .setup
            .app
            .state
            .invoker
            .another_instance_over(faulty.clone());
        let mut announced = invoker.approval_outcomes();
        let alice = alice();
        let id = invocation("call_unconfirmed");
        let error = invoker
            .decide_approval(
                &service_kit::CommandContext::service("test"),
                &alice,
                &id,
                invoker::Decision::Approve,
            )
            .await
            .expect_err("the store did not answer");
        assert_eq!(error.code(), "command_failed", "{error}");
        assert_eq!(faulty.refused(), 1);
        let outcome = tokio::time::timeout(Duration::from_secs(10), announced.recv())
            .await
            .expect("the outcome was announced")
            .expect("outcome");
        assert_eq!(outcome.report.invocation_id, "call_unconfirmed");
        assert_eq!(
            outcome.report.outcome,
            invoker::Outcome::Completed,
            "stored first: {store_first}: {:?}",
            outcome.report
        );
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
        assert_eq!(
            events_of_type(&it.setup, "InvocationApproved").await.len(),
            1,
            "recorded once"
        );
    }
}

/// An approved invocation whose `InvocationStarted` the store refuses still makes its one
/// call and records its outcome: the approval settled the right to call, and the outcome is
/// what closes the invocation.
#[tokio::test]
async fn an_approved_call_whose_start_the_store_refuses_still_records_its_outcome() {
    for store in STORES {
        let it = connected(store, settings()).await;
        it.set_state("create_issue", "needs_approval").await;
        it.awaiting("call_unstarted", "create_issue", json!({"title": "Go"}))
            .await;
        it.settle().await;
        let failing = FaultyAppends::new(
            it.setup.app.log.clone(),
            "InvocationStarted",
            false,
            usize::MAX,
        );
        let other = it
            .setup
            .app
            .state
            .invoker
            .another_instance_over(failing.clone());
        let report = other
            .decide_approval(
                &service_kit::CommandContext::service("test"),
                &alice(),
                &invocation("call_unstarted"),
                invoker::Decision::Approve,
            )
            .await
            .expect("the approved call is answered");
        assert_eq!(report.outcome, invoker::Outcome::Completed, "{report:?}");
        assert_eq!(failing.refused(), 1, "{store:?}: the start was refused");
        assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
        assert_eq!(
            events_of_type(&it.setup, "InvocationStarted").await.len(),
            0
        );
        assert_eq!(
            events_of_type(&it.setup, "InvocationCompleted").await.len(),
            1,
            "{store:?}: the outcome is recorded"
        );
        it.settle().await;
        let (_, looked_up) = it
            .get(&it.alice, "/api/v1/invocations/call_unstarted")
            .await;
        assert_eq!(looked_up["outcome"], "completed", "{looked_up}");
        let (_, approvals) = it.get(&it.alice, "/api/v1/approvals").await;
        assert_eq!(approvals["approvals"], json!([]));
    }
}

#[tokio::test]
async fn a_caller_that_goes_away_mid_call_leaves_the_invocation_to_finish() {
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "always_allow").await;
    // The session's token is refused, and the refresh waits at the token endpoint: the call
    // is under way until the gate opens.
    it.setup.handle.expire_access_tokens();
    let gate = it.setup.handle.pause_token_endpoint();
    let invoker = it.setup.app.state.invoker.clone();
    let alice = alice();
    let id = invocation("call_left");
    let context = service_kit::CommandContext::service("test");
    let call = invoker.invoke(
        &context,
        it.request("call_left", "create_issue", json!({"title": "left"})),
    );
    tokio::select! {
        report = call => panic!("answered before the refresh went through: {report:?}"),
        () = gate.arrived(1) => {}
    }
    // The caller's future is gone (as when an HTTP client closes its request); the call
    // goes on without it.
    gate.release();
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        invoker.status(&alice, &id, Duration::from_secs(10)),
    )
    .await
    .expect("in time")
    .expect("status");
    assert_eq!(report.outcome, invoker::Outcome::Completed, "{report:?}");
    assert!(report.result.is_some(), "{report:?}");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
}

/// The caller goes away (its future dropped) once its claim is on its way to the store, and
/// before what follows the claim: the invocation is still seen through — its wait for
/// approval recorded and listed. And an approval whose caller goes away once the decision is
/// on its way still runs the call and announces the outcome (`sb.invoke.result.<id>`).
#[tokio::test]
async fn a_caller_that_goes_away_after_the_claim_or_the_approval_leaves_them_to_follow_through() {
    use futures_util::StreamExt;
    let it = connected(Store::Jsonl, settings()).await;
    it.set_state("create_issue", "needs_approval").await;
    let invoker = it.setup.app.state.invoker.clone();
    let alice = alice();
    let id = invocation("call_gone");
    let context = service_kit::CommandContext::service("test");
    let mut announced = invoker.approval_outcomes();
    let mut call = Box::pin(invoker.invoke(
        &context,
        it.request("call_gone", "create_issue", json!({"title": "gone"})),
    ));
    // One poll: the claim is queued for the log's writer, whose sync the call waits for.
    tokio::select! {
        biased;
        report = &mut call => panic!("answered before its claim was durable: {report:?}"),
        () = std::future::ready(()) => {}
    }
    drop(call);
    let mut invocations = it
        .setup
        .app
        .log
        .subscribe(eventlog::LogKind::Invocations, 1, None)
        .await
        .expect("subscribe");
    let awaiting = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = invocations.next().await {
            let event = event.expect("event");
            if matches!(
                event.envelope.event,
                Some(domain::Event::InvocationAwaitingApproval(ref e)) if e.invocation_id == "call_gone"
            ) {
                return event.sequence;
            }
        }
        panic!("the log's stream ended");
    })
    .await
    .expect("the wait for approval recorded without its caller");
    assert!(
        it.setup
            .app
            .read_models
            .wait_for_position(
                eventlog::LogKind::Invocations,
                awaiting,
                Duration::from_secs(10)
            )
            .await
    );
    let pending = invoker.pending_approvals(&alice).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].invocation_id, "call_gone");

    let mut approval =
        Box::pin(invoker.decide_approval(&context, &alice, &id, invoker::Decision::Approve));
    // Polled until its decision is in the log, then dropped: the call is still to be made
    // (it needs the fixture's answer and another durable append).
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            tokio::select! {
                biased;
                event = invocations.next() => {
                    let event = event.expect("the log's stream").expect("event");
                    if matches!(
                        event.envelope.event,
                        Some(domain::Event::InvocationApproved(ref e)) if e.invocation_id == "call_gone"
                    ) {
                        return;
                    }
                }
                report = &mut approval => panic!("answered before its decision was read: {report:?}"),
            }
        }
    })
    .await
    .expect("the approval recorded");
    drop(approval);
    let report = tokio::time::timeout(Duration::from_secs(10), announced.recv())
        .await
        .expect("the approved call's outcome announced without its caller")
        .expect("announcement");
    assert_eq!(report.user.as_str(), ALICE);
    let report = report.report;
    assert_eq!(report.invocation_id, "call_gone");
    assert_eq!(report.outcome, invoker::Outcome::Completed, "{report:?}");
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 1);
}

/// What a process that stopped left open, the sweeper closes: a claim with nothing after it
/// (never called) after half a minute, saying so; an approved invocation (whose call may have
/// gone out) after twice the longest deadline, and its outcome is announced, as the approving
/// process would have.
#[tokio::test]
async fn the_sweeper_closes_what_a_stopped_process_left_open_and_says_whether_it_was_called() {
    let (clock, it) = connected_on_a_manual_clock().await;
    let invoker = it.setup.app.state.invoker.clone();
    let alice = alice();
    let subject = domain::invocation::subject(&alice);
    let mut announced = invoker.approval_outcomes();
    let requested = |id: &str| {
        domain::Event::InvocationRequested(proto::v1::InvocationRequested {
            invocation_id: id.to_owned(),
            user_id: ALICE.to_owned(),
            server_id: it.server_id.clone(),
            tool_name: "create_issue".to_owned(),
            exposed_tool_name: format!("{PREFIX}create_issue"),
            arguments_json: "{}".to_owned(),
            arguments_sha256: "0".repeat(64),
            arguments_size_bytes: 2,
            started: false,
            deadline_ms: 0,
            conversation_id: String::new(),
        })
    };
    // Claimed; the process stopped before it recorded the rejection or the wait.
    it.setup
        .app
        .append(&subject, requested("left_claimed"))
        .await;
    // Approved; the process stopped around the call.
    it.setup
        .app
        .append(&subject, requested("left_approved"))
        .await;
    it.setup
        .app
        .append(
            &subject,
            domain::Event::InvocationAwaitingApproval(proto::v1::InvocationAwaitingApproval {
                invocation_id: "left_approved".to_owned(),
                approval_expires_at: Some(domain::time::to_timestamp(
                    std::time::SystemTime::now() + Duration::from_secs(3_600),
                )),
            }),
        )
        .await;
    it.setup
        .app
        .append(
            &subject,
            domain::Event::InvocationApproved(proto::v1::InvocationApproved {
                invocation_id: "left_approved".to_owned(),
                approved_by: ALICE.to_owned(),
            }),
        )
        .await;
    it.settle().await;

    clock.advance(Duration::from_secs(31));
    let id = invocation("left_claimed");
    let closed = invoker
        .status(&alice, &id, Duration::from_secs(10))
        .await
        .expect("status");
    assert_eq!(closed.outcome, invoker::Outcome::Failed, "{closed:?}");
    assert_eq!(closed.reason.as_deref(), Some("interrupted"));
    assert!(
        closed
            .message
            .as_deref()
            .is_some_and(|m| m.contains("the server was not called")),
        "{closed:?}"
    );
    let approved = invocation("left_approved");
    assert_eq!(
        invoker
            .status(&alice, &approved, Duration::ZERO)
            .await
            .expect("status")
            .outcome,
        invoker::Outcome::Running,
        "an approved call may still be under way"
    );

    clock.advance(it.setup.app.state.invoker.settings().stalled_after());
    let report = tokio::time::timeout(Duration::from_secs(10), announced.recv())
        .await
        .expect("the interrupted outcome announced")
        .expect("announcement")
        .report;
    assert_eq!(report.invocation_id, "left_approved");
    assert_eq!(report.outcome, invoker::Outcome::Failed, "{report:?}");
    assert!(
        report
            .message
            .as_deref()
            .is_some_and(|m| m.contains("may or may not have reached the server")),
        "{report:?}"
    );
    assert_eq!(it.setup.handle.tool_calls("create_issue"), 0);
}

/// The invocations log as a store that is failing for one kind of write: appends holding an
/// event of `event_type` fail as unavailable — after they were stored (an answer lost on its
/// way back) when `store_first` — while `remaining` lasts; everything else goes to the real
/// log.
#[derive(Debug)]
struct FaultyAppends {
    inner: std::sync::Arc<dyn eventlog::EventLog>,
    event_type: &'static str,
    store_first: bool,
    remaining: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
}

impl FaultyAppends {
    fn new(
        inner: std::sync::Arc<dyn eventlog::EventLog>,
        event_type: &'static str,
        store_first: bool,
        faults: usize,
    ) -> std::sync::Arc<Self> {
        std::sync::Arc::new(FaultyAppends {
            inner,
            event_type,
            store_first,
            remaining: std::sync::atomic::AtomicUsize::new(faults),
            refused: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl eventlog::EventLog for FaultyAppends {
    async fn append(
        &self,
        subject: &eventlog::Subject,
        expected: eventlog::ExpectedVersion,
        events: &[proto::v1::Envelope],
    ) -> Result<eventlog::AppendOutcome, eventlog::EventLogError> {
        use std::sync::atomic::Ordering::SeqCst;
        let faulty = events
            .iter()
            .any(|e| eventlog::event_type_of(e) == Some(self.event_type))
            && self
                .remaining
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok();
        if !faulty {
            return self.inner.append(subject, expected, events).await;
        }
        if self.store_first {
            self.inner.append(subject, expected, events).await?;
        }
        self.refused.fetch_add(1, SeqCst);
        Err(eventlog::EventLogError::Unavailable {
            reason: "the store is failing (test)".to_owned(),
        })
    }

    async fn read_aggregate(
        &self,
        subject: &eventlog::Subject,
    ) -> Result<eventlog::AggregateHistory, eventlog::EventLogError> {
        self.inner.read_aggregate(subject).await
    }

    async fn read_from(
        &self,
        log: eventlog::LogKind,
        from: u64,
        filter: Option<&eventlog::SubjectFilter>,
    ) -> Result<eventlog::EventStream, eventlog::EventLogError> {
        self.inner.read_from(log, from, filter).await
    }

    async fn subscribe(
        &self,
        log: eventlog::LogKind,
        from: u64,
        filter: Option<&eventlog::SubjectFilter>,
    ) -> Result<eventlog::EventStream, eventlog::EventLogError> {
        self.inner.subscribe(log, from, filter).await
    }

    async fn read_event(
        &self,
        log: eventlog::LogKind,
        sequence: u64,
    ) -> Result<Option<eventlog::RecordedEvent>, eventlog::EventLogError> {
        self.inner.read_event(log, sequence).await
    }

    async fn last_sequence(&self, log: eventlog::LogKind) -> Result<u64, eventlog::EventLogError> {
        self.inner.last_sequence(log).await
    }

    fn filters_where_stored(&self) -> bool {
        self.inner.filters_where_stored()
    }

    fn max_event_bytes(&self) -> Option<usize> {
        self.inner.max_event_bytes()
    }
}
