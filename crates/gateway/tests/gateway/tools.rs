//! Tool settings over HTTP, on both stores: every tool starts Blocked; a user sets one tool
//! or a category and reads the change back at once; a changed definition drops Always allow to
//! Needs approval until the user sets the tool again; a stale definition hash is refused;
//! users never see or change each other's settings; changes reach the user's live stream and
//! the audit log.
use serde_json::{Value, json};

use crate::support::{SseReader, Store, TestApp, tool};

fn tools() -> Vec<proto::v1::ToolDefinition> {
    vec![
        tool("search", "Searches issues", Some(true)),
        tool("get_issue", "Reads one issue", Some(true)),
        tool("create_issue", "Creates an issue", Some(false)),
        tool("delete_repo", "Deletes a repository", None),
    ]
}

async fn call(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = app
        .client
        .request(method, format!("{}{path}", app.url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

async fn list(app: &TestApp, server: &str, token: &str) -> Value {
    let (status, body) = call(
        app,
        reqwest::Method::GET,
        &format!("/api/v1/servers/{server}/tools"),
        token,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// `name → (state, changed)` of a tool list.
fn states(list: &Value) -> Vec<(String, String, bool)> {
    list["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name").to_owned(),
                t["state"].as_str().expect("state").to_owned(),
                t["changed"].as_bool().expect("changed"),
            )
        })
        .collect()
}

fn row(name: &str, state: &str, changed: bool) -> (String, String, bool) {
    (name.to_owned(), state.to_owned(), changed)
}

async fn put_tool(
    app: &TestApp,
    server: &str,
    tool: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    call(
        app,
        reqwest::Method::PUT,
        &format!("/api/v1/servers/{server}/tools/{tool}"),
        token,
        Some(body),
    )
    .await
}

async fn put_category(
    app: &TestApp,
    server: &str,
    category: &str,
    token: &str,
    body: Value,
) -> (u16, Value) {
    call(
        app,
        reqwest::Method::PUT,
        &format!("/api/v1/servers/{server}/categories/{category}"),
        token,
        Some(body),
    )
    .await
}

async fn a_user_sets_tools_one_by_one_and_per_category(store: Store) {
    let app = TestApp::start(store).await;
    let server = app.seed_server("Production GitHub").await;
    let alice = app.token("alice@example.com", &["analyst"]);
    assert_eq!(
        list(&app, &server, &alice).await,
        json!({"tools": []}),
        "nothing before connecting"
    );
    app.connect("alice@example.com", &server, &tools()).await;

    let listed = list(&app, &server, &alice).await;
    assert_eq!(
        states(&listed),
        [
            row("create_issue", "blocked", false),
            row("delete_repo", "blocked", false),
            row("get_issue", "blocked", false),
            row("search", "blocked", false),
        ]
    );
    let search = &listed["tools"][3];
    assert_eq!(search["exposed_name"], "production_github__search");
    assert_eq!(search["title"], "search title");
    assert_eq!(search["description"], "Searches issues");
    assert_eq!(search["category"], "read_only");
    assert_eq!(search["definition_hash"], tools()[0].definition_hash);
    assert_eq!(listed["tools"][1]["category"], "write_delete");

    let (status, set) = put_tool(
        &app,
        &server,
        "search",
        &alice,
        json!({"state": "always_allow", "definition_hash": tools()[0].definition_hash}),
    )
    .await;
    assert_eq!(
        (status, &set["state"]),
        (200, &json!("always_allow")),
        "{set}"
    );
    // Read-your-writes: the next read shows it.
    assert_eq!(
        states(&list(&app, &server, &alice).await)[3],
        row("search", "always_allow", false)
    );

    let (status, set) = put_category(
        &app,
        &server,
        "write_delete",
        &alice,
        json!({"state": "needs_approval"}),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    let expected = [
        row("create_issue", "needs_approval", false),
        row("delete_repo", "needs_approval", false),
        row("get_issue", "blocked", false),
        row("search", "always_allow", false),
    ];
    assert_eq!(states(&set), expected);
    assert_eq!(states(&list(&app, &server, &alice).await), expected);

    // A tool discovered later starts blocked.
    let mut more = tools();
    more.push(tool("close_issue", "Closes an issue", Some(false)));
    app.discover("alice@example.com", &server, &more).await;
    assert_eq!(
        states(&list(&app, &server, &alice).await)[0],
        row("close_issue", "blocked", false)
    );
}

#[tokio::test]
async fn a_user_sets_tools_one_by_one_and_per_category_on_jsonl() {
    a_user_sets_tools_one_by_one_and_per_category(Store::Jsonl).await;
}

#[tokio::test]
async fn a_user_sets_tools_one_by_one_and_per_category_on_jetstream() {
    a_user_sets_tools_one_by_one_and_per_category(Store::JetStream).await;
}

async fn a_changed_definition_needs_approval_until_the_user_sets_it_again(store: Store) {
    let app = TestApp::start(store).await;
    let server = app.seed_server("GitHub").await;
    let alice = app.token("alice@example.com", &["analyst"]);
    app.connect("alice@example.com", &server, &tools()).await;
    let old_hash = tools()[0].definition_hash.clone();
    let (status, _) = put_tool(
        &app,
        &server,
        "search",
        &alice,
        json!({"state": "always_allow", "definition_hash": old_hash}),
    )
    .await;
    assert_eq!(status, 200);

    let mut redefined = tools();
    redefined[0] = tool("search", "Searches issues, then deletes them", Some(true));
    let new_hash = redefined[0].definition_hash.clone();
    app.discover("alice@example.com", &server, &redefined).await;
    let listed = list(&app, &server, &alice).await;
    assert_eq!(states(&listed)[3], row("search", "needs_approval", true));
    assert_eq!(listed["tools"][3]["definition_hash"], new_hash);

    // A console still showing the old definition cannot allow it.
    let (status, refused) = put_tool(
        &app,
        &server,
        "search",
        &alice,
        json!({"state": "always_allow", "definition_hash": old_hash}),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (409, Some("tool_definition_changed")),
        "{refused}"
    );
    assert_eq!(
        states(&list(&app, &server, &alice).await)[3],
        row("search", "needs_approval", true)
    );
    let (status, set) = put_tool(
        &app,
        &server,
        "search",
        &alice,
        json!({"state": "always_allow", "definition_hash": new_hash}),
    )
    .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        (&set["state"], &set["changed"]),
        (&json!("always_allow"), &json!(false))
    );
}

#[tokio::test]
async fn a_changed_definition_needs_approval_until_the_user_sets_it_again_on_jsonl() {
    a_changed_definition_needs_approval_until_the_user_sets_it_again(Store::Jsonl).await;
}

#[tokio::test]
async fn a_changed_definition_needs_approval_until_the_user_sets_it_again_on_jetstream() {
    a_changed_definition_needs_approval_until_the_user_sets_it_again(Store::JetStream).await;
}

async fn users_never_see_or_change_each_others_settings(store: Store) {
    let app = TestApp::start(store).await;
    let server = app.seed_server("GitHub").await;
    let alice = app.token("alice@example.com", &["analyst"]);
    let bob = app.token("bob@example.com", &["analyst"]);
    let admin = app.token("carol@example.com", &["admin"]);
    app.connect("alice@example.com", &server, &tools()).await;
    app.connect("bob@example.com", &server, &tools()[..1]).await;

    let mut alice_stream = SseReader::new(
        app.client
            .get(format!("{}/api/v1/stream", app.url))
            .bearer_auth(&alice)
            .send()
            .await
            .expect("subscribe"),
    );
    let mut bob_stream = SseReader::new(
        app.client
            .get(format!("{}/api/v1/stream", app.url))
            .bearer_auth(&bob)
            .send()
            .await
            .expect("subscribe"),
    );

    let (status, _) = put_tool(
        &app,
        &server,
        "search",
        &alice,
        json!({"state": "always_allow"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        states(&list(&app, &server, &bob).await),
        [row("search", "blocked", false)],
        "Bob sees only his own tools and settings"
    );
    assert_eq!(
        list(&app, &server, &alice).await["tools"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    // An admin not connected to the server has no tools there, whoever else has.
    assert_eq!(list(&app, &server, &admin).await, json!({"tools": []}));
    let (status, refused) = put_tool(
        &app,
        &server,
        "search",
        &admin,
        json!({"state": "always_allow"}),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (404, Some("not_connected"))
    );
    // Bob's change is his alone.
    let (status, _) = put_tool(
        &app,
        &server,
        "search",
        &bob,
        json!({"state": "needs_approval"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        states(&list(&app, &server, &alice).await)[3],
        row("search", "always_allow", false)
    );
    // Bob has no `create_issue`, even though Alice does.
    let (status, refused) = put_tool(
        &app,
        &server,
        "create_issue",
        &bob,
        json!({"state": "blocked"}),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (404, Some("tool_not_found"))
    );

    // Each stream carries its own user's change: who, which tool, from what to what.
    let event = alice_stream.next().await.expect("Alice's change");
    assert_eq!(event.event, "ToolPermissionSet");
    let set = &event.data["envelope"]["toolPermissionSet"];
    assert_eq!(set["userId"], "alice@example.com");
    assert_eq!(set["toolName"], "search");
    assert_eq!(set["state"], "TOOL_STATE_ALWAYS_ALLOW");
    assert_eq!(set["previousState"], "TOOL_STATE_BLOCKED");
    assert_eq!(set["definitionHash"], tools()[0].definition_hash);
    assert_eq!(
        event.data["envelope"]["actor"]["userId"],
        "alice@example.com"
    );
    let event = bob_stream.next().await.expect("Bob's change");
    assert_eq!(
        event.data["envelope"]["toolPermissionSet"]["userId"], "bob@example.com",
        "Bob's stream skips Alice's change"
    );

    // The audit log has both, for an auditor.
    let (status, page) = call(
        &app,
        reqwest::Method::GET,
        "/api/v1/audit/events?type=ToolPermissionSet",
        &admin,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let users: Vec<&str> = page["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["envelope"]["actor"]["userId"].as_str().expect("actor"))
        .collect();
    assert_eq!(users, ["alice@example.com", "bob@example.com"]);
}

#[tokio::test]
async fn users_never_see_or_change_each_others_settings_on_jsonl() {
    users_never_see_or_change_each_others_settings(Store::Jsonl).await;
}

#[tokio::test]
async fn users_never_see_or_change_each_others_settings_on_jetstream() {
    users_never_see_or_change_each_others_settings(Store::JetStream).await;
}

#[tokio::test]
async fn bad_tool_setting_requests_are_4xx_that_name_the_rule() {
    let app = TestApp::start(Store::Jsonl).await;
    let server = app.seed_server("GitHub").await;
    let alice = app.token("alice@example.com", &["analyst"]);
    app.connect("alice@example.com", &server, &tools()).await;
    let cases = [
        (
            put_tool(&app, &server, "search", &alice, json!({"state": "allow"})).await,
            400,
            "invalid_tool_state",
            "always_allow, needs_approval, blocked",
        ),
        (
            put_tool(
                &app,
                &server,
                "search",
                &alice,
                json!({"state": "blocked", "user": "bob"}),
            )
            .await,
            400,
            "invalid_body",
            "unknown field",
        ),
        (
            put_tool(&app, &server, "nope", &alice, json!({"state": "blocked"})).await,
            404,
            "tool_not_found",
            "nope",
        ),
        (
            put_category(&app, &server, "write", &alice, json!({"state": "blocked"})).await,
            400,
            "invalid_tool_category",
            "read_only or write_delete",
        ),
        (
            put_category(&app, &server, "read_only", &alice, json!({"state": ""})).await,
            400,
            "invalid_tool_state",
            "always_allow, needs_approval, blocked",
        ),
        (
            put_tool(
                &app,
                "not-a-uuid",
                "search",
                &alice,
                json!({"state": "blocked"}),
            )
            .await,
            400,
            "server_id_invalid",
            "UUID",
        ),
        (
            call(
                &app,
                reqwest::Method::GET,
                &format!("/api/v1/servers/{}/tools", domain::ServerId::new()),
                &alice,
                None,
            )
            .await,
            404,
            "server_not_found",
            "no such server",
        ),
    ];
    for ((status, body), want_status, code, message) in cases {
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (want_status, Some(code)),
            "{body}"
        );
        let text = body["error"]["message"].as_str().expect("message");
        assert!(
            text.contains(message),
            "{text:?} should mention {message:?}"
        );
    }
    // None of it changed anything.
    assert!(
        states(&list(&app, &server, &alice).await)
            .iter()
            .all(|(_, state, _)| state == "blocked")
    );
}
