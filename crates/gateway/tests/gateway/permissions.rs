//! The permission table test: every route × every kind of caller → the expected status. The
//! routes come from the same table the authorization middleware reads; a route without an
//! example request below fails the test, so every route added later joins it.
use axum::http::Method;
use gateway::{Access, Permission, routes};
use serde_json::Value;

use crate::support::{SECRET, Store, TestApp, expired_token, token_for};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Admin,
    Analyst,
    AnalystReadOnly,
    /// A custom role from the configuration (`auditor` = read_audit_log).
    CustomRole,
    Orchestrator,
    /// Roles this server does not know grant nothing.
    UnknownRole,
    NoToken,
    ExpiredToken,
    SignedWithAnotherKey,
}

const EVERYONE: [Who; 9] = [
    Who::Admin,
    Who::Analyst,
    Who::AnalystReadOnly,
    Who::CustomRole,
    Who::Orchestrator,
    Who::UnknownRole,
    Who::NoToken,
    Who::ExpiredToken,
    Who::SignedWithAnotherKey,
];

impl Who {
    /// What each role grants, written out here rather than read from the code under test.
    fn permissions(self) -> &'static [Permission] {
        use Permission::*;
        match self {
            Who::Admin => &[ManageServers, ViewAndConnect, ReadAuditLog],
            Who::Analyst | Who::AnalystReadOnly => &[ViewAndConnect],
            Who::CustomRole => &[ReadAuditLog],
            Who::Orchestrator => &[InvokeForUsers],
            _ => &[],
        }
    }

    fn token(self) -> Option<String> {
        let user = "caller@example.com";
        match self {
            Who::Admin => Some(token_for(user, &["admin"], SECRET)),
            Who::Analyst => Some(token_for(user, &["analyst"], SECRET)),
            Who::AnalystReadOnly => Some(token_for(user, &["analyst_read_only"], SECRET)),
            Who::CustomRole => Some(token_for(user, &["auditor"], SECRET)),
            Who::Orchestrator => Some(token_for(user, &["orchestrator"], SECRET)),
            Who::UnknownRole => Some(token_for(user, &["superuser"], SECRET)),
            Who::NoToken => None,
            Who::ExpiredToken => Some(expired_token(user, &["admin"])),
            Who::SignedWithAnotherKey => Some(token_for(user, &["admin"], b"another-key-entirely")),
        }
    }

    fn signed_in(self) -> bool {
        !matches!(
            self,
            Who::NoToken | Who::ExpiredToken | Who::SignedWithAnotherKey
        )
    }
}

/// A request that succeeds for a caller the route admits.
struct Example {
    path: String,
    body: Option<Value>,
    /// The status of success.
    ok: u16,
}

/// Routes on one server get a server of their own, so that a delete does not take it from
/// the next caller.
fn next_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix} {n}")
}

async fn example(app: &TestApp, method: &Method, path: &str) -> Example {
    let get = |path: &str| Example {
        path: path.to_owned(),
        body: None,
        ok: 200,
    };
    let server = || async {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = app.seed_server(&format!("Server {n}")).await;
        path.replace("{id}", &id)
    };
    match (method.as_str(), path) {
        ("GET", "/healthz" | "/readyz" | "/metrics" | "/openapi.json" | "/api/v1/me") => get(path),
        ("GET", "/api/v1/audit/events") => get("/api/v1/audit/events?limit=5"),
        ("GET", "/api/v1/me/events") => get("/api/v1/me/events?limit=5"),
        (
            "GET",
            "/api/v1/stream" | "/api/v1/tools/changes" | "/api/v1/catalog" | "/api/v1/servers",
        ) => get(path),
        ("GET", "/api/v1/servers/{id}") => get(&server().await),
        ("PATCH", "/api/v1/servers/{id}") => Example {
            path: server().await,
            body: Some(serde_json::json!({"description": "Edited"})),
            ok: 200,
        },
        ("DELETE", "/api/v1/servers/{id}") => Example {
            path: server().await,
            body: None,
            ok: 204,
        },
        ("POST", "/api/v1/servers/{id}/enable" | "/api/v1/servers/{id}/disable") => {
            get(&server().await)
        }
        ("GET", "/api/v1/servers/{id}/tools") => get(&server().await),
        (
            "PUT",
            "/api/v1/servers/{id}/tools/{tool}" | "/api/v1/servers/{id}/categories/{category}",
        ) => {
            // The caller is connected to a server of their own that offers them one tool.
            let path = server().await;
            let id = path.split('/').nth(4).expect("server id").to_owned();
            app.connect(
                "caller@example.com",
                &id,
                &[crate::support::tool("search", "Searches", Some(true))],
            )
            .await;
            Example {
                path: path
                    .replace("{tool}", "search")
                    .replace("{category}", "read_only"),
                body: Some(serde_json::json!({"state": "needs_approval"})),
                ok: 200,
            }
        }
        ("GET", "/api/v1/tools" | "/api/v1/approvals") => get(path),
        ("POST", "/api/v1/invocations") => Example {
            path: path.to_owned(),
            body: Some(serde_json::json!({
                "invocation_id": next_name("call"),
                "tool": "nothing__here",
                "arguments": {},
            })),
            ok: 200,
        },
        ("GET", "/api/v1/invocations/{id}") => {
            // A rejected invocation of the callers' user (they all share one user id).
            let id = next_name("call").replace(' ', "_");
            let response = app
                .client
                .post(format!("{}/api/v1/invocations", app.url))
                .bearer_auth(token_for("caller@example.com", &["analyst"], SECRET))
                .json(&serde_json::json!({"invocation_id": id, "tool": "nothing__here"}))
                .send()
                .await
                .expect("invoke");
            assert_eq!(response.status(), 200, "invoking for the example");
            get(&path.replace("{id}", &id))
        }
        ("POST", "/api/v1/approvals/{invocation_id}" | "/api/v1/invocations/{id}/withdraw") => {
            // An invocation of the callers' user waiting for approval, on a server of its own;
            // denied, or withdrawn.
            let server_id = app.seed_server(&next_name("Approvals")).await;
            app.connect(
                "caller@example.com",
                &server_id,
                &[crate::support::tool("search", "Searches", Some(true))],
            )
            .await;
            let analyst = token_for("caller@example.com", &["analyst"], SECRET);
            let set = app
                .client
                .put(format!(
                    "{}/api/v1/servers/{server_id}/tools/search",
                    app.url
                ))
                .bearer_auth(&analyst)
                .json(&serde_json::json!({"state": "needs_approval"}))
                .send()
                .await
                .expect("set state");
            let tool: Value = set.json().await.expect("tool");
            let exposed = tool["exposed_name"]
                .as_str()
                .expect("exposed name")
                .to_owned();
            let id = next_name("pending").replace(' ', "_");
            let invoked: Value = app
                .client
                .post(format!("{}/api/v1/invocations", app.url))
                .bearer_auth(&analyst)
                .json(&serde_json::json!({"invocation_id": id, "tool": exposed, "arguments": {}}))
                .send()
                .await
                .expect("invoke")
                .json()
                .await
                .expect("outcome");
            assert_eq!(invoked["outcome"], "awaiting_approval", "{invoked}");
            Example {
                path: path.replace("{invocation_id}", &id).replace("{id}", &id),
                body: path
                    .starts_with("/api/v1/approvals")
                    .then(|| serde_json::json!({"decision": "deny"})),
                ok: 200,
            }
        }
        ("GET", "/oauth/client-metadata.json" | "/.well-known/oauth-protected-resource/mcp") => {
            get(path)
        }
        // The MCP endpoint: an `initialize` (the loop sends the transport's `Accept`).
        ("POST", "/mcp") => Example {
            path: path.to_owned(),
            body: Some(serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "permissions", "version": "1"}},
            })),
            ok: 200,
        },
        ("POST" | "GET", "/api/v1/servers/{id}/connection") => {
            let id = app.seed_registered_server(&next_name("Connectable")).await;
            get(&path.replace("{id}", &id))
        }
        ("DELETE", "/api/v1/servers/{id}/connection") => {
            // A pending connection of the callers' user (they all share one user id).
            let id = app.seed_registered_server(&next_name("Connected")).await;
            let path = path.replace("{id}", &id);
            let started = app
                .client
                .post(format!("{}{path}", app.url))
                .bearer_auth(token_for("caller@example.com", &["analyst"], SECRET))
                .send()
                .await
                .expect("connect");
            assert_eq!(
                started.status(),
                200,
                "starting a connection for the example"
            );
            get(&path)
        }
        // The callback is a browser page: an unknown `state` gets a page saying so.
        ("GET", "/oauth/callback") => Example {
            path: "/oauth/callback?state=unknown-state&code=x".to_owned(),
            body: None,
            ok: 400,
        },
        ("GET", "/oauth/callback/{key}") => Example {
            path: "/oauth/callback/fixture.test-0123456789ab?state=unknown-state&code=x".to_owned(),
            body: None,
            ok: 400,
        },
        // A confirmation without a pending state: the page saying so.
        ("POST", "/oauth/callback") => Example {
            path: path.to_owned(),
            body: None,
            ok: 400,
        },
        ("POST", "/oauth/callback/{key}") => Example {
            path: "/oauth/callback/fixture.test-0123456789ab".to_owned(),
            body: None,
            ok: 400,
        },
        ("POST", "/api/v1/servers/discover") => Example {
            path: path.to_owned(),
            body: Some(serde_json::json!({"template": "notion"})),
            ok: 200,
        },
        ("POST", "/api/v1/servers") => {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Example {
                path: path.to_owned(),
                body: Some(serde_json::json!({"name": format!("Added {n}"), "template": "notion"})),
                ok: 201,
            }
        }
        _ => panic!("add an example request for {method} {path} to the permission test"),
    }
}

fn expected(access: Access, who: Who) -> Option<u16> {
    match access {
        Access::Public => None,
        _ if !who.signed_in() => Some(401),
        Access::SignedIn => None,
        Access::AnyOf(needed) => {
            if needed.iter().any(|p| who.permissions().contains(p)) {
                None
            } else {
                Some(403)
            }
        }
    }
}

#[tokio::test]
async fn every_route_admits_exactly_the_callers_its_permission_names() {
    // The catalog's Notion template points at a fixture, so adds and discovery succeed.
    let fixture =
        crate::support::app_with_fixture(Store::Jsonl, testkit::OAuthFixture::default()).await;
    let app = &fixture.app;
    let mut checked = 0;
    let mut heads = 0;
    let mut failures = Vec::new();
    for route in routes::table() {
        for who in EVERYONE {
            let example = example(app, &route.method, route.path).await;
            let mut request = app
                .client
                .request(route.method.clone(), format!("{}{}", app.url, example.path));
            if let Some(token) = who.token() {
                request = request.bearer_auth(token);
            }
            if let Some(body) = &example.body {
                request = request.json(body);
            }
            if route.path == "/mcp" {
                request = request.header("accept", "application/json, text/event-stream");
            }
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let want = expected(route.access, who).unwrap_or(example.ok);
            if status != want {
                failures.push(format!(
                    "{} {} as {who:?}: got {status}, expected {want}",
                    route.method, route.path
                ));
            }
            // The OAuth callback answers a browser with a page, not a JSON error.
            if status >= 400 && !route.path.starts_with("/oauth/callback") {
                let body: Value = response.json().await.expect("error body is JSON");
                let code = body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let expected_code = match status {
                    401 => "unauthenticated",
                    403 => "forbidden",
                    _ => code.as_str(),
                };
                if code != expected_code || body["error"]["request_id"].as_str().is_none() {
                    failures.push(format!(
                        "{} {} as {who:?}: error body {body}",
                        route.method, route.path
                    ));
                }
            }
            checked += 1;
            // A HEAD is answered by the GET's handler: it needs what the GET needs.
            if route.method == Method::GET {
                let mut head = app.client.head(format!("{}{}", app.url, example.path));
                if let Some(token) = who.token() {
                    head = head.bearer_auth(token);
                }
                let status = head.send().await.expect("request").status().as_u16();
                if status != want {
                    failures.push(format!(
                        "HEAD {} as {who:?}: got {status}, expected {want}",
                        route.path
                    ));
                }
                heads += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, routes::table().len() * EVERYONE.len());
    assert!(
        heads >= 12 * EVERYONE.len(),
        "every GET route's HEAD: {heads}"
    );
    assert!(checked >= 24 * 9, "the table lost routes: {checked} checks");
}

#[tokio::test]
async fn an_unauthenticated_answer_says_why_and_asks_for_a_bearer_token() {
    let app = TestApp::start(Store::Jsonl).await;
    let response = app
        .get(
            "/api/v1/me",
            Some(&expired_token("a@example.com", &["admin"])),
        )
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response
            .headers()
            .get("www-authenticate")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    let body: Value = response.json().await.expect("JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );
    let response = app
        .client
        .get(format!("{}/api/v1/me", app.url))
        .header("authorization", "Basic YWxpY2U6cHc=")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_token_names_the_user_and_roles_the_caller_has() {
    let app = TestApp::start(Store::Jsonl).await;
    let token = app.token("alice@example.com", &["analyst", "auditor", "nonsense"]);
    let me: Value = app
        .get("/api/v1/me", Some(&token))
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(me["user"], "alice@example.com");
    assert_eq!(
        me["permissions"],
        serde_json::json!(["view_and_connect", "read_audit_log"])
    );
}
