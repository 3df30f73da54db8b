//! Connections through the API, against the fixture authorization server and MCP server over
//! real TLS: connect → authorize → callback → healthy with tools; the `state` and `iss`
//! checks; refresh; auth errors; reachability; disconnect with revocation; a deleted
//! server's users disconnected; no issued secret anywhere on disk.
use std::time::Duration;

use serde_json::{Value, json};
use testkit::OAuthFixture;

use crate::support::{STORES, Store, WithFixture, app_with_fixture_for};

const ADMIN: &str = "admin@example.com";

struct Connected {
    setup: WithFixture,
    server_id: String,
    user_token: String,
}

impl Connected {
    /// The connected server's id.
    fn server(&self) -> domain::ServerId {
        domain::ServerId::parse(&self.server_id).expect("server id")
    }
}

fn user_id(name: &str) -> domain::UserId {
    domain::UserId::parse(name).expect("user id")
}

/// A Notion-like server added on JSONL, and Alice's token; she is not connected yet.
async fn notion_for_alice() -> (WithFixture, String, String) {
    let setup = app_with_fixture_for(Store::Jsonl, OAuthFixture::notion(), "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let alice = setup.app.token("alice@example.com", &["analyst"]);
    (setup, server_id, alice)
}

/// The connection of the user whose token is `user_token` is healthy.
async fn assert_healthy(setup: &WithFixture, server_id: &str, user_token: &str) {
    let now = status(setup, server_id, user_token).await;
    assert_eq!(now["status"], "healthy", "{now}");
}

/// The tokens the fixture's revocation endpoint accepted, in order.
fn accepted_revocations(setup: &WithFixture) -> Vec<String> {
    setup
        .handle
        .revocations()
        .into_iter()
        .filter(|r| r.accepted)
        .map(|r| r.token)
        .collect()
}

pub(crate) async fn add_server(setup: &WithFixture, template: &str) -> String {
    let admin = setup.app.token(ADMIN, &["admin"]);
    let mut body = json!({"name": format!("{template} team"), "template": template});
    if matches!(template, "github" | "pagerduty" | "slack") {
        body["client_id"] = json!(testkit::PRE_REGISTERED_CLIENT_ID);
        body["client_secret"] = json!(testkit::PRE_REGISTERED_CLIENT_SECRET);
    }
    let response = setup
        .app
        .client
        .post(format!("{}/api/v1/servers", setup.app.url))
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await
        .expect("add");
    let status = response.status();
    let server: Value = response.json().await.expect("server");
    assert_eq!(status, 201, "{server}");
    server["id"].as_str().expect("id").to_owned()
}

/// Starts connecting `user` and follows the authorization URL like a browser; returns where
/// the authorization server sent it back: the server's own redirect URL with the answer.
pub(crate) async fn authorize(setup: &WithFixture, server_id: &str, token: &str) -> String {
    let response = setup
        .app
        .client
        .post(format!(
            "{}/api/v1/servers/{server_id}/connection",
            setup.app.url
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("connect");
    let status = response.status();
    let body: Value = response.json().await.expect("body");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "pending");
    let url = body["authorization_url"].as_str().expect("url").to_owned();
    let redirect = setup.browser.get(&url).send().await.expect("authorize");
    assert_eq!(
        redirect.status(),
        302,
        "the authorization server redirects back"
    );
    let location = redirect.headers()["location"].to_str().expect("location");
    assert!(
        location.starts_with(&format!("{}/oauth/callback/", setup.app.url)),
        "the server's own redirect URL: {location}"
    );
    location.to_owned()
}

/// The browser at the callback (`redirect`: where the authorization server sent it):
/// confirms on the page that names the user, as a person does.
pub(crate) async fn callback(setup: &WithFixture, redirect: &str) -> (u16, String) {
    let (status, page, _) = testkit::follow_callback(&setup.app.client, redirect, "connect").await;
    (status, page)
}

pub(crate) async fn status(setup: &WithFixture, server_id: &str, token: &str) -> Value {
    // What the service wrote directly (a probe) shows once the read models caught up.
    let last = setup
        .app
        .log
        .last_sequence(eventlog::LogKind::Config)
        .await
        .expect("last sequence");
    assert!(
        setup
            .app
            .read_models
            .wait_for_position(
                eventlog::LogKind::Config,
                last,
                std::time::Duration::from_secs(10)
            )
            .await
    );
    setup
        .app
        .get(
            &format!("/api/v1/servers/{server_id}/connection"),
            Some(token),
        )
        .await
        .json()
        .await
        .expect("status")
}

/// Everything this test binary logs, at debug (with `rmcp` capped at info as `switchboard`
/// does): the leaked-secret scans read it.
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> =
            Box::leak(Box::new(std::sync::Mutex::new(Vec::new())));
        #[derive(Clone)]
        struct Capture(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug,rmcp=info"))
            .with_writer(move || Capture(logs))
            .with_ansi(false)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        logs
    })
}

async fn connect(store: Store, fixture: OAuthFixture, template: &str, user: &str) -> Connected {
    captured_logs();
    let setup = app_with_fixture_for(store, fixture, template).await;
    let server_id = add_server(&setup, template).await;
    let user_token = setup.app.token(user, &["analyst"]);
    let redirect = authorize(&setup, &server_id, &user_token).await;
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    Connected {
        setup,
        server_id,
        user_token,
    }
}

/// Every token, code and client secret the fixture issued, searched for in every file of the
/// data directory (event log, checkpoints, vault; on JetStream the server's store) and in the
/// captured logs: none may be there
/// in the clear.
fn assert_no_secret_on_disk(setup: &WithFixture) {
    let secrets = setup.handle.issued_secrets();
    assert!(!secrets.is_empty(), "the fixture issued secrets");
    let mut files = 0;
    let mut stack = vec![setup.app.dir.clone()];
    if setup.app.vault_bucket.is_some() {
        // On JetStream the events, checkpoints and vault are in the server's store.
        stack.push(testkit::shared_nats().store_dir().to_owned());
    }
    while let Some(dir) = stack.pop() {
        // A live nats-server may remove a file between listing and reading: skip those.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            for secret in &secrets {
                assert!(
                    !bytes
                        .windows(secret.len())
                        .any(|window| window == secret.as_bytes()),
                    "{} holds an issued secret in the clear",
                    path.display()
                );
            }
        }
    }
    assert!(files > 0, "the scan found files");
    let logs = captured_logs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    assert!(!logs.is_empty(), "the logs were captured");
    for secret in &secrets {
        assert!(
            !logs
                .windows(secret.len())
                .any(|window| window == secret.as_bytes()),
            "the logs hold an issued secret"
        );
    }
}

pub(crate) async fn events_of_type(setup: &WithFixture, event_type: &str) -> Vec<Value> {
    let admin = setup.app.token(ADMIN, &["admin"]);
    let page: Value = setup
        .app
        .get(
            &format!("/api/v1/audit/events?type={event_type}&limit=100"),
            Some(&admin),
        )
        .await
        .json()
        .await
        .expect("audit");
    page["events"].as_array().expect("events").clone()
}

async fn connect_then_healthy_with_tools(store: Store, fixture: OAuthFixture, template: &str) {
    let connected = connect(store, fixture, template, "alice@example.com").await;
    let setup = &connected.setup;
    let status = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(status["status"], "healthy", "{status}");
    assert_eq!(status["tool_count"], 4, "{status}");
    assert!(status["access_token_expires_at"].is_string(), "{status}");
    // PKCE S256 and the resource in the authorization request.
    let seen = setup.handle.last_authorization_request().expect("seen");
    assert_eq!(seen.code_challenge_method.as_deref(), Some("S256"));
    assert_eq!(seen.resource.as_deref(), Some(setup.fixture_url.as_str()));
    let token_request = setup.handle.last_token_request().expect("token request");
    assert_eq!(
        token_request.resource.as_deref(),
        Some(setup.fixture_url.as_str())
    );
    // Another user sees nothing of it.
    let bob = setup.app.token("bob@example.com", &["analyst"]);
    let theirs = crate::connections::status(setup, &connected.server_id, &bob).await;
    assert_eq!(theirs["status"], "not_connected");
    let discovered = events_of_type(setup, "ToolsDiscovered").await;
    assert_eq!(discovered.len(), 1);
    // The era the fixture speaks is the one the tools were listed in.
    let expected_version = match setup.handle.fixture().mcp_era {
        testkit::McpEra::Stateless => "2026-07-28",
        testkit::McpEra::Sessions => "2025-11-25",
    };
    let listed: Vec<_> = setup
        .handle
        .mcp_requests()
        .into_iter()
        .filter(|r| r.method.as_deref() == Some("tools/list"))
        .collect();
    assert!(!listed.is_empty());
    assert!(
        listed
            .iter()
            .all(|r| r.protocol_version.as_deref() == Some(expected_version)),
        "{template}: {listed:?}"
    );
    assert_no_secret_on_disk(setup);
}

#[tokio::test]
async fn connect_callback_healthy_with_tools_on_both_stores_and_both_eras() {
    for store in STORES {
        // Notion's fixture speaks the 2026-07-28 stateless protocol, Atlassian's the
        // 2025-11-25 protocol with sessions.
        connect_then_healthy_with_tools(store, OAuthFixture::notion(), "notion").await;
        connect_then_healthy_with_tools(store, OAuthFixture::atlassian(), "atlassian").await;
    }
}

#[tokio::test]
async fn forged_replayed_and_other_users_state_is_refused() {
    for store in STORES {
        forged_replayed_and_other_users_state_is_refused_on(store).await;
    }
}

async fn forged_replayed_and_other_users_state_is_refused_on(store: Store) {
    let setup = app_with_fixture_for(store, OAuthFixture::notion(), "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let alice = setup.app.token("alice@example.com", &["analyst"]);
    let redirect = authorize(&setup, &server_id, &alice).await;
    // Forged: a state Switchboard never issued.
    let (code, page) = callback(
        &setup,
        &format!(
            "{}/oauth/callback?code=x&state=forgedstate123",
            setup.app.url
        ),
    )
    .await;
    assert_eq!(code, 400);
    assert!(page.contains("oauth_state_invalid"), "{page}");
    // Another signed-in user presenting alice's state is refused, and the state survives.
    let bob = setup.app.token("bob@example.com", &["analyst"]);
    let refused_to_bob = || async {
        let response = setup
            .app
            .client
            .get(&redirect)
            .bearer_auth(&bob)
            .send()
            .await
            .expect("callback");
        assert_eq!(response.status(), 400);
        assert!(
            response
                .text()
                .await
                .unwrap()
                .contains("oauth_state_not_yours")
        );
    };
    refused_to_bob().await;
    // Alice's own callback works, once: a replay exchanges nothing and shows what the first
    // answer did (a reload, Connect pressed twice), without asking to confirm again.
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 200, "{page}");
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    assert!(!page.contains("<form"), "{page}");
    assert_eq!(
        setup.handle.token_requests_for("authorization_code"),
        1,
        "the replay never reached the token endpoint"
    );
    // Someone else signed in presenting it learns nothing of it.
    refused_to_bob().await;
}

/// The mix-up defence of RFC 9700 §4.4.2: each authorization server has its own redirect URL,
/// registered for its client, and an answer that comes back to another one (or to the shared
/// one) with this server's `state` is refused: nothing is exchanged or sent anywhere, and the
/// state stays usable for the real answer.
#[tokio::test]
async fn an_answer_at_another_servers_redirect_url_is_refused() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let (own, query) = redirect.split_once('?').expect("query");
    let asked = setup.handle.last_authorization_request().expect("request");
    assert_eq!(asked.redirect_uri.as_deref(), Some(own));
    let server = setup
        .app
        .get(&format!("/api/v1/servers/{server_id}"), Some(&alice))
        .await
        .json::<Value>()
        .await
        .expect("server");
    assert_eq!(server["redirect_url"], own, "{server}");
    let page = setup
        .app
        .client
        .get(&redirect)
        .send()
        .await
        .expect("callback")
        .text()
        .await
        .expect("page");
    let key = own.rsplit_once('/').expect("key").1;
    assert!(
        page.contains(&format!("action=\"{key}\"")),
        "the form posts back to the page's own path: {page}"
    );

    let elsewhere = [
        format!(
            "{}/oauth/callback/evil.example-0123456789ab?{query}",
            setup.app.url
        ),
        format!("{}/oauth/callback?{query}", setup.app.url),
    ];
    for wrong in &elsewhere {
        let (code, answer, confirmation) =
            testkit::follow_callback(&setup.app.client, wrong, "connect").await;
        assert_eq!(code, 400, "{wrong}: {answer}");
        assert!(answer.contains("oauth_callback_mismatch"), "{answer}");
        assert!(
            confirmation.is_empty(),
            "no page offers to connect: {wrong}"
        );
    }
    // A confirmation posted straight to the wrong URL is refused the same way.
    let (state, code) = {
        let pairs: std::collections::HashMap<String, String> =
            url::form_urlencoded::parse(query.as_bytes())
                .into_owned()
                .collect();
        (pairs["state"].clone(), pairs["code"].clone())
    };
    let posted = setup
        .app
        .client
        .post(format!(
            "{}/oauth/callback/evil.example-0123456789ab",
            setup.app.url
        ))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("code={code}&state={state}&decision=connect"))
        .send()
        .await
        .expect("post");
    assert_eq!(posted.status(), 400);
    assert!(
        posted
            .text()
            .await
            .unwrap()
            .contains("oauth_callback_mismatch")
    );
    assert_eq!(
        setup.handle.token_requests_for("authorization_code"),
        0,
        "the code went nowhere"
    );
    assert_eq!(
        status(&setup, &server_id, &alice).await["status"],
        "pending"
    );

    // The state was not spent: the real answer, at the server's own URL, connects.
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    assert_eq!(
        status(&setup, &server_id, &alice).await["status"],
        "healthy"
    );
}

/// A user's authorization URL opened by someone else: the page at the callback names the
/// Switchboard user the account would be connected to, and nothing happens unless the person
/// confirms. Declined, the code is never exchanged and the state is spent.
#[tokio::test]
async fn a_browser_at_the_callback_sees_whose_connection_it_makes_and_can_decline() {
    let setup = app_with_fixture_for(Store::Jsonl, OAuthFixture::notion(), "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let mallory = setup.app.token("mallory@example.com", &["analyst"]);
    let redirect = authorize(&setup, &server_id, &mallory).await;
    let url = redirect.clone();
    let landed = setup.app.client.get(&url).send().await.expect("callback");
    assert_eq!(landed.status(), 200);
    let headers = landed.headers().clone();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["cache-control"], "no-store");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    let page = landed.text().await.expect("page");
    assert!(page.contains("mallory@example.com"), "{page}");
    assert!(page.contains("Connect notion"), "{page}");
    assert_eq!(
        setup.handle.token_requests_for("authorization_code"),
        0,
        "nothing is exchanged before the person confirms"
    );
    assert_eq!(
        status(&setup, &server_id, &mallory).await["status"],
        "pending"
    );

    let (code, answer, _) = testkit::follow_callback(&setup.app.client, &url, "cancel").await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("authorization_denied"), "{answer}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 0);
    let after = status(&setup, &server_id, &mallory).await;
    assert_ne!(after["status"], "healthy", "{after}");
    // The state is spent: the same redirect, confirmed this time, connects nothing and says
    // how it was answered.
    let (code, answer) = callback(&setup, &redirect).await;
    assert_eq!(code, 400, "{answer}");
    assert!(answer.contains("authorization_answered"), "{answer}");
    assert!(answer.contains("declined"), "{answer}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 0);
}

/// The redirect `redirect` as the authorization server sends it when the person says no.
fn denied(redirect: &str) -> String {
    let redirect = url::Url::parse(redirect).expect("redirect");
    let mut denied = redirect.clone();
    denied
        .query_pairs_mut()
        .clear()
        .extend_pairs(redirect.query_pairs().filter(|(k, _)| k != "code"))
        .append_pair("error", "access_denied");
    denied.into()
}

/// Connect pressed twice (two tabs); the person says no in one tab, then yes in the other:
/// the refusal fails nothing while the other flow waits, and the other tab connects.
#[tokio::test]
async fn a_refusal_in_one_tab_leaves_the_other_tabs_authorization_usable() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let first = authorize(&setup, &server_id, &alice).await;
    let second = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &denied(&first)).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_denied"), "{page}");
    let now = status(&setup, &server_id, &alice).await;
    assert_eq!(now["status"], "pending", "{now}");
    let (code, page) = callback(&setup, &second).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    assert_healthy(&setup, &server_id, &alice).await;
    // The refusal is on record all the same.
    assert_eq!(
        events_of_type(&setup, "ConnectionAuthFailed").await.len(),
        1
    );
}

/// Connect pressed twice and both tabs approved at the same moment: the two answers take
/// turns on the connection, so the second finds it connected and exchanges nothing — no
/// second grant is left live at the provider, and the stored tokens are the ones the event
/// records.
#[tokio::test]
async fn two_flows_answered_at_once_exchange_one_code() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let first = authorize(&setup, &server_id, &alice).await;
    let second = authorize(&setup, &server_id, &alice).await;
    let answer = |redirect: String| {
        let client = setup.app.client.clone();
        async move {
            let (code, page, confirmation) =
                testkit::follow_callback(&client, &redirect, "connect").await;
            assert!(!confirmation.is_empty(), "a confirmation first: {page}");
            (code, page)
        }
    };
    let gate = setup.handle.pause_token_endpoint();
    let mut waits = setup.app.state.connections.lease_waits();
    let first = tokio::spawn(answer(first));
    gate.arrived(1).await;
    let second = tokio::spawn(answer(second));
    // Without turns the second reaches the token endpoint too: let both go after a while so
    // the test fails on what was exchanged, not by hanging.
    let waited = tokio::time::timeout(Duration::from_secs(5), waits.wait_for(|n| *n >= 1))
        .await
        .is_ok();
    gate.release();
    let (code, page) = first.await.expect("task");
    assert_eq!(code, 200, "{page}");
    let (code, page) = second.await.expect("task");
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_superseded"), "{page}");
    assert!(waited, "the second answer waited for the first");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    assert_healthy(&setup, &server_id, &alice).await;
}

/// A flow started before a disconnect (a tab left open) does not finish the connection the
/// user started again after it: its code is not exchanged; the new flow's is.
#[tokio::test]
async fn a_flow_started_before_a_disconnect_does_not_finish_a_later_connection() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let before = authorize(&setup, &server_id, &alice).await;
    let (code, body) = disconnect(&setup, &server_id, &alice).await;
    assert_eq!(code, 200, "{body}");
    let after = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &before).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_superseded"), "{page}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 0);
    let (code, page) = callback(&setup, &after).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    assert_healthy(&setup, &server_id, &alice).await;
}

/// Connect pressed twice on the confirmation page: the browser abandons the first request
/// and shows the second's page. The first answer still finishes (a request that goes away
/// does not stop it halfway: state spent, tokens stored, nothing recorded), the code is
/// exchanged once, and the second waits for the first and says what it did: connected.
#[tokio::test]
async fn connect_pressed_twice_connects_once_and_both_answers_say_connected() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let answer = connect_answer(&setup, &redirect).await;
    let gate = setup.handle.pause_token_endpoint();
    let first = {
        let (client, answer) = (setup.app.client.clone(), answer.clone());
        tokio::spawn(async move { testkit::post_confirmation(&client, answer).await })
    };
    gate.arrived(1).await;
    // The browser gives up the first request for the second.
    first.abort();
    assert!(first.await.is_err(), "the first request was abandoned");
    let mut waits = setup.app.state.connections.answer_waits();
    let second = {
        let client = setup.app.client.clone();
        tokio::spawn(async move {
            let response = testkit::post_confirmation(&client, answer).await;
            let code = response.status().as_u16();
            (code, response.text().await.expect("page"))
        })
    };
    // Without turns the second never waits: let the first go after a while so the test
    // fails on what the second says, not by hanging.
    let waited = tokio::time::timeout(Duration::from_secs(5), waits.wait_for(|n| *n >= 1))
        .await
        .is_ok();
    gate.release();
    assert!(waited, "the second answer waited for the first");
    let (code, page) = second.await.expect("task");
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("Connected"), "{page}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    assert_healthy(&setup, &server_id, &alice).await;
}

/// What pressing Connect on the confirmation page `redirect` lands on sends: the form's
/// action and body.
async fn connect_answer(setup: &WithFixture, redirect: &str) -> (url::Url, String) {
    let landed = setup.app.client.get(redirect).send().await.expect("land");
    let page = landed.text().await.expect("page");
    testkit::confirmation_answer(redirect, &page, "connect").expect("the confirmation")
}

/// The callback parameters of a confirmation form's answer (its action and body).
fn callback_params((action, body): &(url::Url, String)) -> connection::CallbackParams {
    let mut params = connection::CallbackParams {
        callback_key: action
            .path()
            .strip_prefix("/oauth/callback/")
            .map(str::to_owned),
        ..connection::CallbackParams::default()
    };
    for (name, value) in url::form_urlencoded::parse(body.as_bytes()) {
        let value = Some(value.into_owned());
        match name.as_ref() {
            "code" => params.code = value,
            "state" => params.state = value,
            "iss" => params.iss = value,
            "error" => params.error = value,
            "error_description" => params.error_description = value,
            _ => {}
        }
    }
    params
}

/// Connect pressed twice, each request reaching another process (no sticky sessions): the
/// first spends the `state` and exchanges the code; the second finds it spent with no
/// outcome noted yet, waits for the first's (marked at work), and says connected too.
#[tokio::test]
async fn the_same_answer_at_two_processes_says_connected_at_both() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let answer = connect_answer(&setup, &redirect).await;
    let params = callback_params(&answer);
    assert!(
        params.code.is_some() && params.state.is_some(),
        "{params:?}"
    );
    let here = setup.app.state.connections.clone();
    let there = here.another_instance();
    let gate = setup.handle.pause_token_endpoint();
    let first = {
        let (here, params) = (here.clone(), params.clone());
        tokio::spawn(async move { here.complete_authorization(params, None, "first").await })
    };
    gate.arrived(1).await;
    let mut waits = there.answer_waits();
    let second = {
        let there = there.clone();
        tokio::spawn(async move { there.complete_authorization(params, None, "second").await })
    };
    // Without the mark the second answers at once (an unknown authorization): let the first
    // go after a while so the test fails on what the second says, not by hanging.
    let waited = tokio::time::timeout(Duration::from_secs(5), waits.wait_for(|n| *n >= 1))
        .await
        .is_ok();
    gate.release();
    let first = first.await.expect("task");
    assert!(first.result.is_ok(), "{:?}", first.result);
    let second = second.await.expect("task");
    assert!(
        second.result.is_ok(),
        "the second says connected: {:?}",
        second.result
    );
    assert!(waited, "the second waited for the first's outcome");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    let names = setup.app.vault.names().await.expect("names");
    assert!(
        !names
            .iter()
            .any(|n| n.as_str().starts_with("oauth_state_answering/")),
        "no mark is left: {names:?}"
    );
}

/// Connect clicked three times (two tabs, the console and the CLI): the first answer to come
/// back connects; the other flows' answers are stale. A stale code is not exchanged (no
/// second set of tokens overwrites or deletes the working one) and a stale refusal fails
/// nothing.
#[tokio::test]
async fn a_stale_authorization_neither_replaces_the_working_tokens_nor_fails_the_connection() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let first = authorize(&setup, &server_id, &alice).await;
    let second = authorize(&setup, &server_id, &alice).await;
    let third = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &second).await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);

    let (code, page) = callback(&setup, &first).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_superseded"), "{page}");
    assert_eq!(
        setup.handle.token_requests_for("authorization_code"),
        1,
        "the stale code was not exchanged"
    );
    // The third tab's user pressed Deny at the provider afterwards.
    let (code, page) = callback(&setup, &denied(&third)).await;
    assert_eq!(code, 400, "{page}");
    assert!(page.contains("authorization_superseded"), "{page}");

    assert_healthy(&setup, &server_id, &alice).await;
    // The tokens the working flow stored are still there and still work.
    let server = domain::ServerId::parse(&server_id).expect("server id");
    let outcome = setup
        .app
        .state
        .connections
        .probe(server, &user_id("alice@example.com"))
        .await
        .expect("probe");
    assert_eq!(outcome, connection::ProbeOutcome::Healthy);
}

#[tokio::test]
async fn a_mismatched_issuer_is_refused_and_access_denied_is_reported() {
    let fixture = OAuthFixture {
        callback_iss_override: Some("https://evil.test".to_owned()),
        ..OAuthFixture::notion()
    };
    let setup = app_with_fixture_for(Store::Jsonl, fixture, "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let alice = setup.app.token("alice@example.com", &["analyst"]);
    let redirect = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 400);
    assert!(page.contains("oauth_issuer_mismatch"), "{page}");
    assert_eq!(setup.handle.token_requests(), 0);

    let denying = OAuthFixture {
        deny_authorization: true,
        ..OAuthFixture::notion()
    };
    let setup = app_with_fixture_for(Store::Jsonl, denying, "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 400);
    assert!(page.contains("authorization_denied"), "{page}");
    assert!(
        page.contains("declined"),
        "the page says what to do: {page}"
    );
    let status_now = status(&setup, &server_id, &alice).await;
    assert_eq!(status_now["status"], "auth_error", "{status_now}");

    // RFC 9207 §2.4: an error answer from another issuer is refused like a code would be,
    // before the state is spent, and fails nothing.
    let denying_elsewhere = OAuthFixture {
        deny_authorization: true,
        callback_iss_override: Some("https://evil.test".to_owned()),
        ..OAuthFixture::notion()
    };
    let setup = app_with_fixture_for(Store::Jsonl, denying_elsewhere, "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 400);
    assert!(page.contains("oauth_issuer_mismatch"), "{page}");
    let status_now = status(&setup, &server_id, &alice).await;
    assert_eq!(status_now["status"], "pending", "{status_now}");
}

/// Eight calls find the access token refused at once and the grant revoked: one refresh
/// request goes to the provider; the callers that waited on it, and those after, fail at once
/// rather than sending the same dead refresh token again, one after another.
#[tokio::test]
async fn a_rejected_refresh_token_is_sent_once_not_once_per_waiting_caller() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    let connections = &setup.app.state.connections;
    let stale = connections
        .access_token(server, &alice)
        .await
        .expect("the stored token");
    setup.handle.revoke_refresh_tokens();
    setup.handle.expire_access_tokens();
    let outcomes =
        futures_util::future::join_all((0..8).map(|_| connections.refresh(server, &alice, &stale)))
            .await;
    for outcome in &outcomes {
        assert!(
            matches!(
                outcome,
                Err(connection::ConnectionError::ReauthorizationRequired { .. })
            ),
            "{outcome:?}"
        );
    }
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
    // A caller that comes later is not sent to the provider either.
    let later = connections.refresh(server, &alice, &stale).await;
    assert!(
        matches!(
            later,
            Err(connection::ConnectionError::ReauthorizationRequired { .. })
        ),
        "{later:?}"
    );
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
}

#[tokio::test]
async fn an_expired_access_token_is_refreshed_transparently_and_a_revoked_grant_is_an_auth_error() {
    for store in STORES {
        an_expired_access_token_is_refreshed_transparently_and_a_revoked_grant_is_an_auth_error_on(
            store,
        )
        .await;
    }
}

async fn an_expired_access_token_is_refreshed_transparently_and_a_revoked_grant_is_an_auth_error_on(
    store: Store,
) {
    let connected = connect(store, OAuthFixture::notion(), "notion", "alice@example.com").await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    setup.handle.expire_access_tokens();
    let outcome = setup
        .app
        .state
        .connections
        .probe(server, &alice)
        .await
        .expect("probe");
    assert_eq!(outcome, connection::ProbeOutcome::Healthy);
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
    let refreshed = events_of_type(setup, "TokensRefreshed").await;
    assert_eq!(refreshed.len(), 1);
    assert_eq!(
        refreshed[0]["envelope"]["tokensRefreshed"]["refreshTokenRotated"], true,
        "{}",
        refreshed[0]
    );
    // The grant revoked at the provider: the next refresh fails for good.
    setup.handle.revoke_refresh_tokens();
    setup.handle.expire_access_tokens();
    let outcome = setup
        .app
        .state
        .connections
        .probe(server, &alice)
        .await
        .expect("probe");
    assert_eq!(outcome, connection::ProbeOutcome::AuthError);
    let status = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(status["status"], "auth_error", "{status}");
    assert_no_secret_on_disk(setup);
}

/// A provider that rotates refresh tokens kills the old one at the refresh: the new tokens
/// must reach the vault even when its store fails a write or two, or the connection would
/// need a new authorization.
#[tokio::test]
async fn rotated_tokens_reach_the_vault_through_failed_writes() {
    for store in STORES {
        rotated_tokens_reach_the_vault_through_failed_writes_on(store).await;
    }
}

async fn rotated_tokens_reach_the_vault_through_failed_writes_on(store: Store) {
    let connected = connect(
        store,
        OAuthFixture::atlassian(),
        "atlassian",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    let probe = || setup.app.state.connections.probe(server, &alice);
    setup.app.vault_faults.fail_next_writes("connection/", 2);
    setup.handle.expire_access_tokens();
    assert_eq!(
        probe().await.expect("probe"),
        connection::ProbeOutcome::Healthy
    );
    assert_eq!(setup.app.vault_faults.failed(), 2, "the two writes failed");
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
    // The rotated refresh token was stored: the next refresh presents it and works.
    setup.handle.expire_access_tokens();
    assert_eq!(
        probe().await.expect("probe"),
        connection::ProbeOutcome::Healthy
    );
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 2);
    // A write stored whose answer was lost: the try after it finds these very tokens there.
    setup.app.vault_faults.lose_next_answers("connection/", 1);
    setup.handle.expire_access_tokens();
    assert_eq!(
        probe().await.expect("probe"),
        connection::ProbeOutcome::Healthy
    );
    assert_eq!(setup.app.vault_faults.failed(), 3);
    setup.handle.expire_access_tokens();
    assert_eq!(
        probe().await.expect("probe"),
        connection::ProbeOutcome::Healthy
    );
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 4);
    let now = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(now["status"], "healthy", "{now}");
    // A store that stays broken: the refresh is unavailable, the connection not given up.
    setup.app.vault_faults.fail_next_writes("connection/", 10);
    setup.handle.expire_access_tokens();
    let outcome = probe().await;
    assert!(
        !matches!(outcome, Ok(connection::ProbeOutcome::Healthy)),
        "{outcome:?}"
    );
    assert_eq!(
        setup.app.vault_faults.failed(),
        3 + 4,
        "a write and three more tries"
    );
    assert_no_secret_on_disk(setup);
}

/// A provider that says its access tokens live for 263,000 years (`expires_in`
/// 8,300,000,000,000): the connection is healthy, its tokens expire within a century, and no
/// time on the way (the event, the status) panics or goes out of range.
#[tokio::test]
async fn an_absurd_token_lifetime_from_the_provider_connects_with_a_century() {
    let fixture = OAuthFixture {
        access_token_lifetime: Duration::from_secs(8_300_000_000_000),
        ..OAuthFixture::notion()
    };
    let connected = connect(Store::Jsonl, fixture, "notion", "alice@example.com").await;
    let setup = &connected.setup;
    let now = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(now["status"], "healthy", "{now}");
    let expires = now["access_token_expires_at"].as_str().expect("an expiry");
    let year: i32 = expires[..4].parse().expect("a four-digit year");
    let this_year: i32 = chrono::Utc::now().format("%Y").to_string().parse().unwrap();
    assert!(
        (this_year + 99..=this_year + 100).contains(&year),
        "{expires}"
    );
}

/// The vault fails while a new authorization's tokens are stored (every try): the browser
/// hears it went wrong on Switchboard's side (a request id, no entry names), and the tokens
/// the provider issued are revoked there rather than left live with nobody holding them.
#[tokio::test]
async fn a_new_authorizations_tokens_the_vault_refuses_are_revoked_not_left_live() {
    captured_logs();
    let (setup, server_id, alice) = notion_for_alice().await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    // The write and its three tries.
    setup.app.vault_faults.fail_next_writes("connection/", 4);
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 500, "{page}");
    assert!(page.contains("request id"), "{page}");
    assert!(!page.contains("connection/"), "{page}");
    assert_eq!(setup.app.vault_faults.failed(), 4);
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 1);
    let issued = setup.handle.issued_secrets();
    let revoked = accepted_revocations(&setup);
    assert_eq!(
        revoked.len(),
        2,
        "the access and the refresh token: {revoked:?}"
    );
    assert!(revoked.iter().all(|token| issued.contains(token)));
    let names = setup.app.vault.names().await.expect("names");
    assert!(
        !names.iter().any(|n| n.as_str().starts_with("connection/")),
        "{names:?}"
    );
    let now = status(&setup, &server_id, &alice).await;
    assert_ne!(now["status"], "healthy", "{now}");
    assert_no_secret_on_disk(&setup);
}

#[tokio::test]
async fn an_unreachable_server_recovers_to_healthy() {
    for store in STORES {
        an_unreachable_server_recovers_to_healthy_on(store).await;
    }
}

/// A broken server whose tool list pages in a circle: the probe stops at the repeated
/// cursor and says why, instead of following it forever.
#[tokio::test]
async fn a_tool_list_that_pages_in_a_circle_is_not_followed_forever() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    setup.handle.page_tools_in_a_circle(true);
    let before = setup.handle.tools_list_requests();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        setup.app.state.connections.probe(server, &alice),
    )
    .await
    .expect("the probe ends")
    .expect("probe");
    assert_ne!(outcome, connection::ProbeOutcome::Healthy);
    let pages = testkit::FixtureTool::standard_set()
        .len()
        .div_ceil(testkit::TOOLS_PAGE_SIZE);
    assert_eq!(
        setup.handle.tools_list_requests() - before,
        pages + 1,
        "every page once, and the first again under the cursor that points back"
    );
    let now = status(setup, &connected.server_id, &connected.user_token).await;
    assert!(
        now["reason"]
            .as_str()
            .is_some_and(|reason| reason.contains("circle")),
        "{now}"
    );
}

async fn an_unreachable_server_recovers_to_healthy_on(store: Store) {
    let connected = connect(store, OAuthFixture::notion(), "notion", "alice@example.com").await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    setup.handle.set_mcp_down(true);
    let outcome = setup
        .app
        .state
        .connections
        .probe(server, &alice)
        .await
        .expect("probe");
    assert_eq!(outcome, connection::ProbeOutcome::Unreachable);
    let down = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(down["status"], "unreachable", "{down}");
    assert!(down["reason"].as_str().unwrap().contains("503"), "{down}");
    // A second failing probe records nothing new.
    setup
        .app
        .state
        .connections
        .probe(server, &alice)
        .await
        .expect("probe");
    assert_eq!(
        events_of_type(setup, "ConnectionUnreachable").await.len(),
        1
    );
    setup.handle.set_mcp_down(false);
    let outcome = setup
        .app
        .state
        .connections
        .probe(server, &alice)
        .await
        .expect("probe");
    assert_eq!(outcome, connection::ProbeOutcome::Healthy);
    let up = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(up["status"], "healthy", "{up}");
}

#[tokio::test]
async fn two_refreshers_at_once_send_one_request_to_the_token_endpoint() {
    for store in STORES {
        two_refreshers_at_once_send_one_request_to_the_token_endpoint_on(store).await;
    }
}

async fn two_refreshers_at_once_send_one_request_to_the_token_endpoint_on(store: Store) {
    let connected = connect(store, OAuthFixture::notion(), "notion", "alice@example.com").await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    let stale = setup
        .app
        .state
        .connections
        .access_token(server, &alice)
        .await
        .expect("token");
    // A second service over the same stores stands for another process: on JetStream with a
    // vault client (NATS connection) of its own.
    let other = match &setup.app.vault_bucket {
        Some(bucket) => {
            let keys =
                vault::KeyRing::load_or_generate(&setup.app.dir.join("vault.keys")).expect("keys");
            let store = crate::support::open_vault_store(&setup.app.dir, Some(bucket)).await;
            setup
                .app
                .state
                .connections
                .another_instance_with_vault(vault::Vault::new(store, keys))
        }
        None => setup.app.state.connections.another_instance(),
    };
    let gate = setup.handle.pause_token_endpoint();
    let first = {
        let service = setup.app.state.connections.clone();
        let (alice, stale) = (alice.clone(), stale.clone());
        tokio::spawn(async move { service.refresh(server, &alice, &stale).await })
    };
    gate.arrived(1).await;
    let mut waits = other.lease_waits();
    let second = {
        let (alice, stale) = (alice.clone(), stale.clone());
        let other = other.clone();
        tokio::spawn(async move { other.refresh(server, &alice, &stale).await })
    };
    // The second refresher found the lease taken and waits.
    waits.wait_for(|n| *n >= 1).await.expect("waits");
    gate.release();
    let first = first.await.expect("task").expect("refresh");
    let second = second.await.expect("task").expect("refresh");
    assert_eq!(first, second, "both use the one new token");
    assert_ne!(first, stale);
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
}

/// A disconnect while a refresh is at the token endpoint: the disconnect waits for it, then
/// revokes the tokens the refresh stored, so the new refresh token does not stay live at the
/// provider.
#[tokio::test]
async fn a_disconnect_during_a_refresh_revokes_the_refreshed_tokens() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    let connections = setup.app.state.connections.clone();
    let stale = connections
        .access_token(server, &alice)
        .await
        .expect("token");
    let gate = setup.handle.pause_token_endpoint();
    let refresh = {
        let (connections, alice, stale) = (connections.clone(), alice.clone(), stale.clone());
        tokio::spawn(async move { connections.refresh(server, &alice, &stale).await })
    };
    gate.arrived(1).await;
    let mut waits = connections.lease_waits();
    let release = async {
        // The disconnect found the refresh's lease and waits (without the lease the
        // disconnect never waits: let the refresh go after a while so the test fails on
        // what it revoked, not by hanging).
        let waited = tokio::time::timeout(Duration::from_secs(5), waits.wait_for(|n| *n >= 1))
            .await
            .is_ok();
        gate.release();
        waited
    };
    let ((code, body), waited) = tokio::join!(
        disconnect(setup, &connected.server_id, &connected.user_token),
        release
    );
    assert!(waited, "the disconnect waited for the refresh in flight");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["tokens_revoked"], true, "{body}");
    let refreshed = refresh.await.expect("task").expect("the refresh finished");
    assert_ne!(refreshed, stale);
    let revoked = accepted_revocations(setup);
    assert!(
        revoked.contains(&refreshed),
        "the access token the refresh issued was revoked"
    );
    let names = setup.app.vault.names().await.expect("names");
    assert!(
        !names.iter().any(|n| n.as_str().starts_with("connection/")),
        "nothing stored after the disconnect: {names:?}"
    );
}

/// A refresh held up at the token endpoint longer than the refresh lease's time-to-live
/// keeps its lease (renewed while it works): a disconnect still waits for it and revokes
/// the tokens it stored, rather than taking the lapsed lease and revoking the old ones.
#[tokio::test]
async fn a_refresh_held_up_past_the_leases_time_to_live_keeps_its_lease() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = connected.server();
    let alice = user_id("alice@example.com");
    // Long enough that a busy machine never stalls the renewals (every 500 ms) past it.
    let lease = Duration::from_millis(1500);
    let refresher = setup
        .app
        .state
        .connections
        .another_instance_with_settings(|settings| settings.refresh_lease = lease);
    let disconnecter = refresher.another_instance();
    let stale = refresher.access_token(server, &alice).await.expect("token");
    let gate = setup.handle.pause_token_endpoint();
    let mut renewals = refresher.lease_renewals();
    let refresh = {
        let (refresher, alice, stale) = (refresher.clone(), alice.clone(), stale.clone());
        tokio::spawn(async move { refresher.refresh(server, &alice, &stale).await })
    };
    gate.arrived(1).await;
    // Four renewals, a third of the time-to-live apart: the lease taken is older than its
    // time-to-live. (Without renewals the test fails here, after 5 s.)
    let renewed = tokio::time::timeout(Duration::from_secs(5), renewals.wait_for(|n| *n >= 4))
        .await
        .is_ok();
    let mut waits = disconnecter.lease_waits();
    let release = async {
        let waited = tokio::time::timeout(Duration::from_secs(5), waits.wait_for(|n| *n >= 1))
            .await
            .is_ok();
        gate.release();
        waited
    };
    let context = service_kit::CommandContext::service("test");
    let (disconnected, waited) = tokio::join!(
        disconnecter.disconnect(&context, &alice, server, "test",),
        release
    );
    assert!(
        renewed,
        "the lease was renewed while the refresh was held up"
    );
    assert!(
        waited,
        "the disconnect waited for the refresh past the lease's time-to-live"
    );
    let disconnected = disconnected.expect("disconnect");
    assert!(disconnected.tokens_revoked, "{disconnected:?}");
    let refreshed = refresh.await.expect("task").expect("the refresh finished");
    assert_ne!(refreshed, stale);
    let revoked = accepted_revocations(setup);
    assert!(
        revoked.contains(&refreshed),
        "the access token the refresh issued was revoked"
    );
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_and_deletes_the_tokens_for_each_provider() {
    for (template, fixture) in [
        ("notion", OAuthFixture::notion()),
        ("atlassian", OAuthFixture::atlassian()),
        ("github", OAuthFixture::github()),
        ("pagerduty", OAuthFixture::pagerduty()),
        ("slack", OAuthFixture::slack()),
    ] {
        let connected = connect(Store::Jsonl, fixture, template, "alice@example.com").await;
        let setup = &connected.setup;
        let healthy = status(setup, &connected.server_id, &connected.user_token).await;
        assert_eq!(healthy["status"], "healthy", "{template}: {healthy}");
        // Refresh works with this provider's client authentication.
        let server = connected.server();
        let alice = user_id("alice@example.com");
        setup.handle.expire_access_tokens();
        let outcome = setup.app.state.connections.probe(server, &alice).await;
        assert_eq!(
            outcome.expect("probe"),
            connection::ProbeOutcome::Healthy,
            "{template}"
        );
        let (status_code, body) =
            disconnect(setup, &connected.server_id, &connected.user_token).await;
        assert_eq!(status_code, 200, "{template}: {body}");
        assert_eq!(body["tokens_revoked"], true, "{template}: {body}");
        let revocations = setup.handle.revocations();
        assert!(
            !revocations.is_empty() && revocations.iter().all(|r| r.accepted),
            "{template}: {revocations:?}"
        );
        let after = status(setup, &connected.server_id, &connected.user_token).await;
        assert_eq!(after["status"], "not_connected", "{template}");
        let names = setup.app.vault.names().await.expect("names");
        assert!(
            !names.iter().any(|n| n.as_str().starts_with("connection/")),
            "{template}: the tokens are gone from the vault: {names:?}"
        );
        assert_no_secret_on_disk(setup);
    }
}

/// `DELETE /api/v1/servers/{server_id}/connection` with `token`: the status and the body.
async fn disconnect(setup: &WithFixture, server_id: &str, token: &str) -> (u16, Value) {
    let response = setup
        .app
        .client
        .delete(format!(
            "{}/api/v1/servers/{server_id}/connection",
            setup.app.url
        ))
        .bearer_auth(token)
        .send()
        .await
        .expect("disconnect");
    let status = response.status().as_u16();
    (status, response.json().await.expect("body"))
}

/// A provider that refuses to revoke the refresh token still gets the access token to
/// revoke, and the answer does not claim the tokens were revoked.
#[tokio::test]
async fn a_refused_refresh_token_revocation_still_revokes_the_access_token_and_says_so() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    setup.handle.refuse_refresh_token_revocation();
    let (status_code, body) = disconnect(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(status_code, 200, "{body}");
    assert_eq!(body["tokens_revoked"], false, "{body}");
    let revocations = setup.handle.revocations();
    let kinds: Vec<_> = revocations.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Some(testkit::TokenKind::Refresh),
            Some(testkit::TokenKind::Access)
        ],
        "{revocations:?}"
    );
    let after = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(after["status"], "not_connected");
}

#[tokio::test]
async fn deleting_a_server_disconnects_every_user_also_after_a_restart_mid_cascade() {
    for store in STORES {
        deleting_a_server_disconnects_every_user_also_after_a_restart_mid_cascade_on(store).await;
    }
}

async fn deleting_a_server_disconnects_every_user_also_after_a_restart_mid_cascade_on(
    store: Store,
) {
    let setup = app_with_fixture_for(store, OAuthFixture::notion(), "notion").await;
    let server_id = add_server(&setup, "notion").await;
    let users = ["alice@example.com", "bob@example.com", "carol@example.com"];
    for user in users {
        let token = setup.app.token(user, &["analyst"]);
        let redirect = authorize(&setup, &server_id, &token).await;
        let (code, page) = callback(&setup, &redirect).await;
        assert_eq!(code, 200, "{page}");
    }
    let admin = setup.app.token(ADMIN, &["admin"]);
    let deleted = setup
        .app
        .client
        .delete(format!("{}/api/v1/servers/{server_id}", setup.app.url))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    // The reaction stops (is killed) right after its first disconnect.
    let checkpoints: std::sync::Arc<dyn eventlog::projection::CheckpointStore> =
        std::sync::Arc::new(
            eventlog::projection::FileCheckpointStore::open(&setup.app.dir.join("reaction"))
                .expect("checkpoints"),
        );
    let (stopped_tx, mut stopped_rx) = tokio::sync::mpsc::channel::<()>(1);
    let hook: connection::CascadeHook = std::sync::Arc::new(move |_, _| {
        let stopped = stopped_tx.clone();
        Box::pin(async move {
            let _ = stopped.send(()).await;
            std::future::pending::<()>().await;
        })
    });
    let service = setup.app.state.connections.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let first_run = {
        let (checkpoints, shutdown) = (checkpoints.clone(), shutdown.clone());
        tokio::spawn(async move {
            service
                .run_server_deleted_reaction(checkpoints, shutdown, Some(hook))
                .await
        })
    };
    stopped_rx
        .recv()
        .await
        .expect("the first disconnect happened");
    first_run.abort();
    let _ = first_run.await;
    assert_eq!(
        events_of_type(&setup, "ConnectionDisconnected").await.len(),
        1
    );
    let position =
        |checkpoint: Option<eventlog::projection::Checkpoint>| checkpoint.map_or(0, |c| c.position);
    let unfinished = position(
        checkpoints
            .load(connection::SERVER_DELETED_REACTION)
            .await
            .expect("load"),
    );
    let deleted_at = setup
        .app
        .log
        .last_sequence(eventlog::LogKind::Config)
        .await
        .expect("last");
    assert!(
        unfinished < deleted_at,
        "the unfinished cascade did not move the checkpoint past the deletion"
    );
    // Restarted: it finishes the cascade from its checkpoint, without disconnecting anyone twice.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(4);
    let hook: connection::CascadeHook = std::sync::Arc::new(move |_, _| {
        let done = done_tx.clone();
        Box::pin(async move {
            let _ = done.send(()).await;
        })
    });
    let service = setup.app.state.connections.clone();
    let second_run = {
        let (checkpoints, shutdown) = (checkpoints.clone(), shutdown.clone());
        tokio::spawn(async move {
            service
                .run_server_deleted_reaction(checkpoints, shutdown, Some(hook))
                .await
        })
    };
    for _ in 0..2 {
        done_rx
            .recv()
            .await
            .expect("the other two users are disconnected");
    }
    // The reaction saves its checkpoint before it looks at the shutdown again.
    shutdown.cancel();
    second_run.await.expect("task").expect("reaction");
    assert!(
        position(
            checkpoints
                .load(connection::SERVER_DELETED_REACTION)
                .await
                .expect("load")
        ) > unfinished,
        "the finished cascade moved the checkpoint"
    );
    let server: domain::ServerId = domain::ServerId::parse(&server_id).unwrap();
    let disconnected = events_of_type(&setup, "ConnectionDisconnected").await;
    assert_eq!(disconnected.len(), 3, "every user exactly once");
    assert_eq!(
        setup.handle.revocations().len(),
        3 * 2,
        "refresh and access token each"
    );
    assert_eq!(
        setup
            .app
            .read_models
            .connections
            .read(|d| d.of_server(server).count()),
        0
    );
    let names = setup.app.vault.names().await.expect("names");
    assert!(
        !names.iter().any(|n| n.as_str().starts_with("connection/")
            || n.as_str().starts_with(&format!("server/{server_id}"))),
        "{names:?}"
    );
}

async fn a_tool_list_notice_leads_to_a_new_discovery(fixture: OAuthFixture, template: &str) {
    let connected = connect(Store::Jsonl, fixture, template, "alice@example.com").await;
    let setup = &connected.setup;
    let service = setup.app.state.connections.clone();
    let mut ready = service.listeners_ready();
    let mut discoveries = service.notice_discoveries();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let listeners = {
        let (service, shutdown) = (service.clone(), shutdown.clone());
        tokio::spawn(async move { service.run_tool_list_listeners(shutdown).await })
    };
    ready
        .wait_for(|n| *n >= 1)
        .await
        .expect("a listener is in place");
    let mut changed = testkit::FixtureTool::standard_set();
    changed[0].description = "Finds issues, and more.".to_owned();
    setup.handle.set_tools(changed);
    discoveries
        .wait_for(|n| *n >= 1)
        .await
        .expect("the notice led to a discovery");
    shutdown.cancel();
    listeners.await.expect("listeners stop");
    let discovered = events_of_type(setup, "ToolsDiscovered").await;
    assert_eq!(
        discovered.len(),
        2,
        "{template}: the first discovery and the one after the notice"
    );
    let redefined = &discovered[1]["envelope"]["toolsDiscovered"]["redefined"];
    assert_eq!(
        redefined,
        &json!(["search_issues"]),
        "{template}: {}",
        discovered[1]
    );
}

#[tokio::test]
async fn a_tool_list_notice_leads_to_a_new_discovery_in_both_eras() {
    a_tool_list_notice_leads_to_a_new_discovery(OAuthFixture::notion(), "notion").await;
    a_tool_list_notice_leads_to_a_new_discovery(OAuthFixture::atlassian(), "atlassian").await;
}

async fn admin_post(setup: &WithFixture, path: &str, body: Value) -> u16 {
    let admin = setup.app.token(ADMIN, &["admin"]);
    setup
        .app
        .client
        .post(format!("{}{path}", setup.app.url))
        .bearer_auth(&admin)
        .json(&body)
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_disabled_server_shows_disabled_and_the_old_status_once_enabled() {
    for store in STORES {
        let connected = connect(store, OAuthFixture::notion(), "notion", "alice@example.com").await;
        let setup = &connected.setup;
        let id = &connected.server_id;
        let code = admin_post(
            setup,
            &format!("/api/v1/servers/{id}/disable"),
            json!({"reason": "maintenance"}),
        )
        .await;
        assert_eq!(code, 200);
        let disabled = status(setup, id, &connected.user_token).await;
        assert_eq!(disabled["status"], "disabled", "{disabled}");
        let code = admin_post(setup, &format!("/api/v1/servers/{id}/enable"), json!({})).await;
        assert_eq!(code, 200);
        let enabled = status(setup, id, &connected.user_token).await;
        assert_eq!(enabled["status"], "healthy", "{enabled}");
        // Connecting to a disabled server is refused.
        admin_post(setup, &format!("/api/v1/servers/{id}/disable"), json!({})).await;
        let bob = setup.app.token("bob@example.com", &["analyst"]);
        let refused = setup
            .app
            .client
            .post(format!("{}/api/v1/servers/{id}/connection", setup.app.url))
            .bearer_auth(&bob)
            .send()
            .await
            .expect("connect");
        assert_eq!(refused.status(), 409);
        let body: Value = refused.json().await.expect("body");
        assert_eq!(body["error"]["code"], "server_disabled");
    }
}

#[tokio::test]
async fn a_missing_scope_leads_to_a_reconnect_asking_for_old_and_new_scopes() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    let server = domain::ServerId::parse(&connected.server_id).unwrap();
    let alice = user_id("alice@example.com");
    let first = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(
        first["granted_scopes"],
        json!([testkit::READ_SCOPE]),
        "{first}"
    );
    setup
        .app
        .state
        .connections
        .record_scope_required(server, &alice, "issues:read issues:write")
        .await
        .expect("recorded");
    let needs = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(needs["status"], "auth_error", "{needs}");
    let redirect = authorize(setup, &connected.server_id, &connected.user_token).await;
    let asked = setup.handle.last_authorization_request().expect("request");
    let scopes: std::collections::BTreeSet<&str> =
        asked.scope.as_deref().unwrap_or("").split(' ').collect();
    assert_eq!(
        scopes,
        [testkit::READ_SCOPE, testkit::WRITE_SCOPE]
            .into_iter()
            .collect(),
        "the union of the old and the required scopes"
    );
    let (code, page) = callback(setup, &redirect).await;
    assert_eq!(code, 200, "{page}");
    let after = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(after["status"], "healthy", "{after}");
    let granted: std::collections::BTreeSet<String> =
        serde_json::from_value(after["granted_scopes"].clone()).expect("scopes");
    assert!(granted.contains(testkit::WRITE_SCOPE), "{after}");
}

/// The same vault store seen through a clock `ahead` of now.
fn vault_ahead(setup: &WithFixture, ahead: std::time::Duration) -> vault::Vault {
    let keys = vault::KeyRing::load_or_generate(&setup.app.dir.join("vault.keys")).expect("keys");
    let clock = vault::ManualClock::new(std::time::SystemTime::now());
    clock.advance(ahead);
    vault::Vault::with_clock(
        setup.app.vault.store().clone(),
        keys,
        std::sync::Arc::new(clock),
    )
}

#[tokio::test]
async fn an_abandoned_authorization_is_swept_from_the_vault() {
    let (setup, server_id, alice) = notion_for_alice().await;
    let redirect = authorize(&setup, &server_id, &alice).await;
    let states = |names: Vec<vault::SecretName>| {
        names
            .iter()
            .filter(|n| n.as_str().starts_with("oauth_state/"))
            .count()
    };
    assert_eq!(states(setup.app.vault.names().await.expect("names")), 1);
    // Eleven minutes later the state has expired; the sweep removes it.
    let later = setup
        .app
        .state
        .connections
        .another_instance_with_vault(vault_ahead(&setup, std::time::Duration::from_secs(11 * 60)));
    assert_eq!(later.sweep_expired_states().await.expect("sweep"), 1);
    assert_eq!(states(setup.app.vault.names().await.expect("names")), 0);
    let (code, page) = callback(&setup, &redirect).await;
    assert_eq!(code, 400);
    assert!(page.contains("oauth_state_invalid"), "{page}");
}

#[tokio::test]
async fn the_loser_of_a_notion_refresh_race_keeps_the_connection_healthy() {
    let connected = connect(
        Store::Jsonl,
        OAuthFixture::notion(),
        "notion",
        "alice@example.com",
    )
    .await;
    let setup = &connected.setup;
    assert!(setup.handle.fixture().two_live_refresh_tokens);
    let server = domain::ServerId::parse(&connected.server_id).unwrap();
    let alice = user_id("alice@example.com");
    let service = setup.app.state.connections.clone();
    let stale = service.access_token(server, &alice).await.expect("token");
    let gate = setup.handle.pause_token_endpoint();
    let first = {
        let (service, alice, stale) = (service.clone(), alice.clone(), stale.clone());
        tokio::spawn(async move { service.refresh(server, &alice, &stale).await })
    };
    gate.arrived(1).await;
    // A process whose clock sees the first one's lease as expired (a refresher stuck longer
    // than the lease) refreshes too: two refreshes of one grant at once.
    let late =
        service.another_instance_with_vault(vault_ahead(setup, std::time::Duration::from_secs(60)));
    let second = {
        let (alice, stale) = (alice.clone(), stale.clone());
        tokio::spawn(async move { late.refresh(server, &alice, &stale).await })
    };
    gate.arrived(2).await;
    gate.release();
    let first = first.await.expect("task").expect("first refresh");
    let second = second.await.expect("task").expect("second refresh");
    assert_eq!(
        setup.handle.token_requests_for("refresh_token"),
        2,
        "the race happened"
    );
    assert_eq!(first, second, "the loser uses the winner's token");
    assert!(
        events_of_type(setup, "ConnectionAuthFailed")
            .await
            .is_empty()
    );
    let healthy = status(setup, &connected.server_id, &connected.user_token).await;
    assert_eq!(healthy["status"], "healthy", "{healthy}");
}
