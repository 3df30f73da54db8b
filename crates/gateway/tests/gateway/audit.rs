//! The audit log over HTTP: paging while events are appended hands out every event exactly
//! once; filters narrow it.
use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::{Store, TestApp, server_enabled};

const SERVER: &str = "0190f3c4-0000-7000-8000-0000000000bb";

async fn page(app: &TestApp, token: &str, query: &str) -> Value {
    let response = app
        .get(&format!("/api/v1/audit/events?{query}"), Some(token))
        .await;
    assert_eq!(response.status(), 200, "{query}");
    response.json().await.expect("JSON")
}

async fn paging_returns_every_event_exactly_once_while_appends_continue(store: Store) {
    let app = TestApp::start(store).await;
    let auditor = app.token("auditor@example.com", &["auditor"]);
    let invocations = format!(
        "invocation.{}",
        domain::UserId::parse("alice@example.com")
            .expect("user")
            .key()
    );
    const EVENTS: usize = 240;
    let (progress_sender, mut progress) = tokio::sync::watch::channel(0usize);
    let appender = {
        let log = app.log.clone();
        let invocations = invocations.clone();
        let progress = progress_sender;
        tokio::spawn(async move {
            let mut appended = BTreeSet::new();
            for i in 0..EVENTS {
                let (subject, event, log_name) = if i % 3 == 0 {
                    (
                        invocations.clone(),
                        proto::v1::envelope::Event::InvocationRequested(Default::default()),
                        "invocations",
                    )
                } else {
                    (format!("server.{SERVER}"), server_enabled(SERVER), "config")
                };
                let subject = eventlog::Subject::parse(&subject).expect("subject");
                let outcome = log
                    .append(
                        &subject,
                        eventlog::ExpectedVersion::Any,
                        &[crate::support::envelope(event)],
                    )
                    .await
                    .expect("append");
                appended.insert((log_name.to_owned(), outcome.last_sequence));
                progress.send_replace(appended.len());
                tokio::task::yield_now().await;
            }
            appended
        })
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let finished = appender.is_finished();
        let query = match &cursor {
            Some(cursor) => format!("limit=7&cursor={cursor}"),
            None => "limit=7".to_owned(),
        };
        let body = page(&app, &auditor, &query).await;
        pages += 1;
        let events = body["events"].as_array().expect("events");
        for event in events {
            seen.push((
                event["log"].as_str().expect("log").to_owned(),
                event["position"].as_u64().expect("position"),
            ));
        }
        cursor = Some(body["next"].as_str().expect("next").to_owned());
        // Done once a page comes back empty after the appends had finished.
        if events.is_empty() && finished {
            break;
        }
        // Caught up with the appender: wait for its next event instead of spinning.
        if events.is_empty() {
            let _ = progress.changed().await;
        }
        assert!(pages < 10_000, "paging does not end");
    }
    let appended = appender.await.expect("appender");
    let unique: BTreeSet<(String, u64)> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "an event came twice");
    assert_eq!(unique, appended, "every appended event exactly once");
    assert_eq!(seen.len(), EVENTS);
    assert!(pages > EVENTS / 7, "{pages} pages");
}

#[tokio::test]
async fn paging_returns_every_event_exactly_once_while_appends_continue_on_jsonl() {
    paging_returns_every_event_exactly_once_while_appends_continue(Store::Jsonl).await;
}

#[tokio::test]
async fn paging_returns_every_event_exactly_once_while_appends_continue_on_jetstream() {
    paging_returns_every_event_exactly_once_while_appends_continue(Store::JetStream).await;
}

#[tokio::test]
async fn filters_narrow_the_history_by_type_subject_server_and_user() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("admin@example.com", &["admin"]);
    let other = "0190f3c4-0000-7000-8000-0000000000cc";
    let alice = domain::UserId::parse("alice@example.com")
        .expect("user")
        .key();
    app.append(&format!("server.{SERVER}"), server_enabled(SERVER))
        .await;
    app.append(&format!("server.{other}"), server_enabled(other))
        .await;
    app.append(
        &format!("server.{SERVER}"),
        proto::v1::envelope::Event::ServerDeleted(proto::v1::ServerDeleted {
            server_id: SERVER.to_owned(),
            ..Default::default()
        }),
    )
    .await;
    app.append(
        &format!("invocation.{alice}"),
        proto::v1::envelope::Event::InvocationRequested(proto::v1::InvocationRequested {
            invocation_id: "toolu_01A".to_owned(),
            server_id: SERVER.to_owned(),
            ..Default::default()
        }),
    )
    .await;
    // A name claim is on the name's subject, and names its server in the event.
    app.append(
        "server.name.jira",
        proto::v1::envelope::Event::ServerNameClaimed(proto::v1::ServerNameClaimed {
            slug: "jira".to_owned(),
            server_id: SERVER.to_owned(),
            name: "Jira".to_owned(),
            ..Default::default()
        }),
    )
    .await;
    // The invocation's outcome names the invocation, not the server.
    app.append(
        &format!("invocation.{alice}"),
        proto::v1::envelope::Event::InvocationFailed(proto::v1::InvocationFailed {
            invocation_id: "toolu_01A".to_owned(),
            error_code: "server_unreachable".to_owned(),
            ..Default::default()
        }),
    )
    .await;
    let count = |body: &Value| body["events"].as_array().map_or(0, Vec::len);
    assert_eq!(count(&page(&app, &admin, "").await), 6);
    let invocation = page(&app, &admin, "invocation=toolu_01A").await;
    assert_eq!(count(&invocation), 2, "{invocation}");
    assert_eq!(invocation["events"][1]["type"], "InvocationFailed");
    assert_eq!(count(&page(&app, &admin, "invocation=toolu_01B").await), 0);
    let deleted = page(&app, &admin, "type=ServerDeleted").await;
    assert_eq!(count(&deleted), 1);
    assert!(deleted.get("unknown_types").is_none(), "{deleted}");
    let typo = page(&app, &admin, "type=ServerDelete,ServerEnabled").await;
    assert_eq!(count(&typo), 2);
    assert_eq!(typo["unknown_types"], serde_json::json!(["ServerDelete"]));
    assert_eq!(
        count(&page(&app, &admin, "type=ServerDeleted,ServerEnabled").await),
        3
    );
    assert_eq!(
        count(&page(&app, &admin, &format!("subject=server.{other}")).await),
        1
    );
    assert_eq!(
        count(&page(&app, &admin, &format!("server={SERVER}")).await),
        4
    );
    assert_eq!(
        count(&page(&app, &admin, &format!("server={other}")).await),
        1
    );
    assert_eq!(
        count(&page(&app, &admin, "user=alice%40example.com").await),
        2
    );
    assert_eq!(count(&page(&app, &admin, "log=invocations").await), 2);
    assert_eq!(count(&page(&app, &admin, "log=config&from=2").await), 3);
    assert_eq!(
        count(&page(&app, &admin, "until=2000-01-01T00:00:00Z").await),
        0
    );
    assert_eq!(
        count(&page(&app, &admin, "since=2000-01-01T00:00:00Z").await),
        6
    );
    let first = page(&app, &admin, "limit=1").await;
    assert_eq!(first["events"][0]["type"], "ServerEnabled");
    assert_eq!(
        first["events"][0]["envelope"]["serverEnabled"]["serverId"],
        SERVER
    );
}

/// Filters that can only ever select nothing, or a `from` no cursor can carry, are
/// mistakes: they get a 400 saying so, not an empty page.
#[tokio::test]
async fn filters_that_contradict_themselves_are_refused() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("admin@example.com", &["admin"]);
    for (query, says) in [
        (
            "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z",
            "`since` must be before `until`",
        ),
        (
            "since=2026-01-01T00:00:00Z&until=2026-01-01T00:00:00Z",
            "`since` must be before `until`",
        ),
        ("log=config&subject=invocation.>", "selects nothing"),
        (&format!("invocation={}", "x".repeat(129)), "`invocation`"),
        ("log=invocations&subject=server.>", "selects nothing"),
        (
            "log=config&from=18446744073709551615",
            "`from` must be at most",
        ),
    ] {
        let response = app
            .get(&format!("/api/v1/audit/events?{query}"), Some(&admin))
            .await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(says), "{query}: {message}");
    }
    // The largest `from` allowed gives a `next` that works as a cursor.
    let last = page(&app, &admin, &format!("log=config&from={}", i64::MAX)).await;
    let next = last["next"].as_str().expect("next");
    page(&app, &admin, &format!("cursor={next}")).await;
}

/// Invocations with captured payloads can hold a megabyte each: a page stops at its byte
/// budget (8 MiB) rather than building gigabytes for one request, and says it may go on.
#[tokio::test]
async fn a_page_of_large_events_stops_at_its_byte_budget() {
    let app = TestApp::start(Store::Jsonl).await;
    let admin = app.token("admin@example.com", &["admin"]);
    let alice = domain::UserId::parse("alice@example.com")
        .expect("user")
        .key();
    let arguments = format!("{{\"text\":\"{}\"}}", "a".repeat(1024 * 1024));
    for _ in 0..12 {
        app.append(
            &format!("invocation.{alice}"),
            proto::v1::envelope::Event::InvocationRequested(proto::v1::InvocationRequested {
                server_id: SERVER.to_owned(),
                arguments_json: arguments.clone(),
                ..Default::default()
            }),
        )
        .await;
    }
    let first = page(&app, &admin, "log=invocations&limit=100").await;
    let count = |body: &Value| body["events"].as_array().map_or(0, Vec::len);
    assert_eq!(count(&first), 8, "8 MiB of 1 MiB events");
    assert_eq!(first["partial"], true, "the history goes on");
    let next = first["next"].as_str().expect("next");
    let second = page(
        &app,
        &admin,
        &format!("log=invocations&limit=100&cursor={next}"),
    )
    .await;
    assert_eq!(count(&second), 4, "the rest, none repeated");
    assert_eq!(second["partial"], false);
    assert_eq!(second["events"][0]["position"], 9);
}

/// A filter that admits one event in 25,001 does not read the whole log for one page: the
/// page stops after its share, says so, and its cursor goes on past what it passed over.
#[tokio::test]
async fn a_narrow_filter_reads_a_bounded_share_of_the_log_a_page() {
    let app = TestApp::start(Store::Jsonl).await;
    let auditor = app.token("auditor@example.com", &["auditor"]);
    let other = "0190f3c4-0000-7000-8000-0000000000dd";
    let subject = eventlog::Subject::parse(&format!("server.{SERVER}")).expect("subject");
    for _ in 0..25 {
        let batch: Vec<_> = (0..1_000)
            .map(|_| crate::support::envelope(server_enabled(SERVER)))
            .collect();
        app.log
            .append(&subject, eventlog::ExpectedVersion::Any, &batch)
            .await
            .expect("append");
    }
    app.append(&format!("server.{other}"), server_enabled(other))
        .await;

    // The server filter is applied here; the subject filter could be handed to the store,
    // which on JSONL would read every record past the budget's count.
    for query in [
        format!("log=config&limit=10&server={other}"),
        format!("log=config&limit=10&subject=server.{other}"),
    ] {
        let first = page(&app, &auditor, &query).await;
        assert_eq!(first["events"], serde_json::json!([]), "{query}: {first}");
        assert_eq!(first["partial"], true);
        let next = first["next"].as_str().expect("next");
        let passed: u64 = next.split('-').next().unwrap().parse().expect("position");
        assert!(
            (20_000..25_001).contains(&passed),
            "the cursor passes what was read: {next}"
        );
        let second = page(&app, &auditor, &format!("{query}&cursor={next}")).await;
        let events = second["events"].as_array().expect("events");
        assert_eq!(events.len(), 1, "{second}");
        assert_eq!(events[0]["position"], 25_001);
        assert_eq!(second["partial"], false);
        let third = page(
            &app,
            &auditor,
            &format!("{query}&cursor={}", second["next"].as_str().expect("next")),
        )
        .await;
        assert_eq!(third["events"], serde_json::json!([]));
        assert_eq!(third["partial"], false, "the end of the history");
    }
}
