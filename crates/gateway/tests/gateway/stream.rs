//! Live updates over server-sent events, on both stores.
use proto::v1::{ConnectionDisconnected, InvocationRequested, ToolPermissionSet, envelope::Event};

use crate::support::{STORES, SseReader, Store, TestApp, server_enabled};

const SERVER: &str = "0190f3c4-0000-7000-8000-0000000000aa";

fn user_key(user: &str) -> String {
    domain::UserId::parse(user)
        .expect("user")
        .key()
        .as_str()
        .to_owned()
}

async fn subscribe(app: &TestApp, token: &str, last_event_id: Option<&str>) -> SseReader {
    let mut request = app
        .client
        .get(format!("{}/api/v1/stream", app.url))
        .bearer_auth(token);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    SseReader::new(request.send().await.expect("subscribe"))
}

async fn an_event_appended_after_subscribing_arrives(store: Store) {
    let app = TestApp::start(store).await;
    let admin = app.token("admin@example.com", &["admin"]);
    // Events before the subscription are not replayed to a new client.
    app.append(&format!("server.{SERVER}"), server_enabled(SERVER))
        .await;
    let mut stream = subscribe(&app, &admin, None).await;
    let position = app
        .append(&format!("server.{SERVER}"), server_enabled(SERVER))
        .await;
    let event = stream.next().await.expect("an event");
    assert_eq!(event.event, "ServerEnabled");
    assert_eq!(event.data["subject"], format!("server.{SERVER}"));
    assert_eq!(event.data["position"], position);
    assert_eq!(event.data["log"], "config");
    assert_eq!(event.data["envelope"]["serverEnabled"]["serverId"], SERVER);
    assert_eq!(event.id, format!("{position}-0"));
}

#[tokio::test]
async fn an_event_appended_after_subscribing_arrives_on_jsonl() {
    an_event_appended_after_subscribing_arrives(Store::Jsonl).await;
}

#[tokio::test]
async fn an_event_appended_after_subscribing_arrives_on_jetstream() {
    an_event_appended_after_subscribing_arrives(Store::JetStream).await;
}

fn invocation(server: &str) -> Event {
    Event::InvocationRequested(InvocationRequested {
        server_id: server.to_owned(),
        ..Default::default()
    })
}

async fn a_reconnect_resumes_with_exactly_the_missed_events(store: Store) {
    let app = TestApp::start(store).await;
    let admin = app.token("admin@example.com", &["admin"]);
    let invocations = format!("invocation.{}", user_key("alice@example.com"));
    let config = format!("server.{SERVER}");
    let mut stream = subscribe(&app, &admin, None).await;
    let mut appended = Vec::new();
    for i in 0..3 {
        let (subject, event) = if i % 2 == 0 {
            (&config, server_enabled(SERVER))
        } else {
            (&invocations, invocation(SERVER))
        };
        appended.push((subject.clone(), app.append(subject, event).await));
    }
    // The two logs are merged as they come: the first event may be either log's.
    let first = stream.next().await.expect("first event");
    let first_key = (
        first.data["subject"].as_str().expect("subject").to_owned(),
        first.data["position"].as_u64().expect("position"),
    );
    assert!(appended.contains(&first_key), "{first_key:?}");
    drop(stream);
    // Missed while disconnected.
    for i in 3..6 {
        let (subject, event) = if i % 2 == 0 {
            (&config, server_enabled(SERVER))
        } else {
            (&invocations, invocation(SERVER))
        };
        appended.push((subject.clone(), app.append(subject, event).await));
    }
    let mut resumed = subscribe(&app, &admin, Some(&first.id)).await;
    let mut received = Vec::new();
    for _ in 1..appended.len() {
        let event = resumed.next().await.expect("a missed event");
        received.push((
            event.data["subject"].as_str().expect("subject").to_owned(),
            event.data["position"].as_u64().expect("position"),
        ));
    }
    let mut expected: Vec<(String, u64)> = appended
        .iter()
        .filter(|key| **key != first_key)
        .cloned()
        .collect();
    expected.sort();
    received.sort();
    assert_eq!(received, expected, "exactly the missed events");
    // And nothing repeats after them: the next event is a new one.
    let marker = app.append(&config, server_enabled(SERVER)).await;
    let next = resumed.next().await.expect("the marker");
    assert_eq!(next.data["position"], marker);
    assert_eq!(next.data["subject"], config);
}

#[tokio::test]
async fn a_reconnect_resumes_with_exactly_the_missed_events_on_jsonl() {
    a_reconnect_resumes_with_exactly_the_missed_events(Store::Jsonl).await;
}

#[tokio::test]
async fn a_reconnect_resumes_with_exactly_the_missed_events_on_jetstream() {
    a_reconnect_resumes_with_exactly_the_missed_events(Store::JetStream).await;
}

async fn a_user_never_receives_another_users_events(store: Store) {
    let app = TestApp::start(store).await;
    let alice = app.token("alice@example.com", &["analyst"]);
    let (alice_key, bob_key) = (user_key("alice@example.com"), user_key("bob@example.com"));
    let mut stream = subscribe(&app, &alice, None).await;
    let disconnected = || {
        Event::ConnectionDisconnected(ConnectionDisconnected {
            server_id: SERVER.to_owned(),
            ..Default::default()
        })
    };
    let permission = || Event::ToolPermissionSet(ToolPermissionSet::default());
    let mut visible = Vec::new();
    app.append(&format!("connection.{SERVER}.{bob_key}"), disconnected())
        .await;
    app.append(&format!("policy.{bob_key}.{SERVER}"), permission())
        .await;
    app.append(&format!("invocation.{bob_key}"), invocation(SERVER))
        .await;
    visible.push(
        app.append(&format!("server.{SERVER}"), server_enabled(SERVER))
            .await,
    );
    visible.push(
        app.append(&format!("connection.{SERVER}.{alice_key}"), disconnected())
            .await,
    );
    visible.push(
        app.append(&format!("policy.{alice_key}.{SERVER}"), permission())
            .await,
    );
    let alice_invocation = app
        .append(&format!("invocation.{alice_key}"), invocation(SERVER))
        .await;
    let mut received = Vec::new();
    let mut saw_invocation = false;
    for _ in 0..4 {
        let event = stream.next().await.expect("an event");
        let subject = event.data["subject"].as_str().expect("subject").to_owned();
        assert!(
            !subject.contains(&bob_key),
            "alice received bob's event {subject}"
        );
        if event.data["log"] == "invocations" {
            assert_eq!(event.data["position"], alice_invocation);
            saw_invocation = true;
        } else {
            received.push(event.data["position"].as_u64().expect("position"));
        }
    }
    assert!(saw_invocation);
    assert_eq!(received, visible);
}

#[tokio::test]
async fn a_user_never_receives_another_users_events_on_jsonl() {
    a_user_never_receives_another_users_events(Store::Jsonl).await;
}

#[tokio::test]
async fn a_user_never_receives_another_users_events_on_jetstream() {
    a_user_never_receives_another_users_events(Store::JetStream).await;
}

#[tokio::test]
async fn streams_end_when_the_server_shuts_down() {
    for store in STORES {
        let mut app = TestApp::start(store).await;
        let admin = app.token("admin@example.com", &["admin"]);
        let mut stream = subscribe(&app, &admin, None).await;
        app.shutdown.cancel();
        assert_eq!(stream.next().await, None, "the stream ends on {store:?}");
        let server = app.server.take().expect("server task");
        server.await.expect("server stopped");
    }
}

#[tokio::test]
async fn an_idle_stream_sends_keep_alive_comments() {
    use futures_util::StreamExt;
    let app = TestApp::start_with(
        Store::Jsonl,
        gateway::GatewaySettings {
            stream_keep_alive: std::time::Duration::from_millis(100),
            ..gateway::GatewaySettings::default()
        },
    )
    .await;
    let admin = app.token("admin@example.com", &["admin"]);
    let response = app
        .client
        .get(format!("{}/api/v1/stream", app.url))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("subscribe");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"].to_str().expect("ASCII"),
        "text/event-stream"
    );
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    // Nothing is appended: what arrives can only be keep-alive comments.
    while !seen.lines().any(|line| line.starts_with(':')) {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(10), body.next())
            .await
            .expect("a keep-alive within 10 s")
            .expect("the stream is open")
            .expect("bytes");
        seen.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    }
    assert!(!seen.contains("data:"), "{seen}");
}

#[tokio::test]
async fn a_resume_past_the_end_of_the_log_is_refused_not_silently_skipped() {
    for store in STORES {
        let app = TestApp::start(store).await;
        let admin = app.token("admin@example.com", &["admin"]);
        let position = app
            .append(&format!("server.{SERVER}"), server_enabled(SERVER))
            .await;
        // An id this store never sent: it was reset, restored from an older backup or swapped.
        let response = app
            .client
            .get(format!("{}/api/v1/stream", app.url))
            .bearer_auth(&admin)
            .header("last-event-id", format!("{}-0", position + 57))
            .send()
            .await
            .expect("subscribe");
        assert_eq!(response.status(), 400, "on {store:?}");
        let body: serde_json::Value = response.json().await.expect("an error body");
        assert_eq!(body["error"]["code"], "invalid_last_event_id", "{body}");
        let message = body["error"]["message"].as_str().expect("a message");
        assert!(message.contains("past the end"), "{message}");
        // The last id it did send still resumes.
        let mut resumed = subscribe(&app, &admin, Some(&format!("{position}-0"))).await;
        let next = app
            .append(&format!("server.{SERVER}"), server_enabled(SERVER))
            .await;
        let event = resumed.next().await.expect("the next event");
        assert_eq!(event.data["position"], next, "on {store:?}");
    }
}
