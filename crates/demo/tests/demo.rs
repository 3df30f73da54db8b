//! The demo servers over real HTTP on loopback: the authorization server's flows (PKCE
//! verified, Allow and Deny, refresh rotation with reuse detection, revocation recorded), the
//! MCP server behind its bearer check through `rmcp`'s client, and a restart on the same
//! ports with the registered clients kept.
use std::collections::HashMap;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rmcp::{
    model::{CallToolRequestParams, ProtocolVersion},
    service::{ClientLifecycleMode, ClientServiceExt},
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const VERIFIER: &str = "a-pkce-verifier-of-enough-length-0123456789abcdef";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn challenge() -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        VERIFIER.as_bytes(),
    ))
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut serializer = url::form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        serializer.append_pair(name, value);
    }
    serializer.finish()
}

async fn post_form(url: &str, pairs: &[(&str, &str)]) -> (u16, Value) {
    let response = client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(pairs))
        .send()
        .await
        .expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn register(demo: &demo::Demo) -> String {
    let registered: Value = client()
        .post(format!("{}/register", demo.issuer()))
        .json(&json!({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}))
        .send()
        .await
        .expect("register")
        .json()
        .await
        .expect("JSON");
    assert!(registered.get("client_secret").is_none(), "{registered}");
    registered["client_id"]
        .as_str()
        .expect("client_id")
        .to_owned()
}

/// The authorization request's query.
fn authorization_query(demo: &demo::Demo, client_id: &str) -> String {
    form(&[
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", REDIRECT),
        ("state", "st4te"),
        ("scope", "issues:read issues:write"),
        ("resource", demo.mcp_url()),
        ("code_challenge", &challenge()),
        ("code_challenge_method", "S256"),
    ])
}

/// Opens the sign-in page and presses `decision`; returns the redirect's query parameters.
async fn decide(demo: &demo::Demo, client_id: &str, decision: &str) -> HashMap<String, String> {
    let query = authorization_query(demo, client_id);
    let page = client()
        .get(format!("{}/authorize?{query}", demo.issuer()))
        .send()
        .await
        .expect("authorize");
    assert_eq!(page.status(), 200);
    let page = page.text().await.expect("page");
    assert!(page.contains(">Allow</button>") && page.contains(">Deny</button>"));
    let response = client()
        .post(format!("{}/authorize/decision", demo.issuer()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("request", &query), ("decision", decision)]))
        .send()
        .await
        .expect("decide");
    assert_eq!(response.status(), 302);
    let location =
        url::Url::parse(response.headers()["location"].to_str().expect("location")).expect("URL");
    assert!(location.as_str().starts_with(REDIRECT), "{location}");
    location.query_pairs().into_owned().collect()
}

async fn exchange(demo: &demo::Demo, client_id: &str, code: &str, verifier: &str) -> (u16, Value) {
    post_form(
        &format!("{}/token", demo.issuer()),
        &[
            ("grant_type", "authorization_code"),
            ("client_id", client_id),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("resource", demo.mcp_url()),
        ],
    )
    .await
}

async fn refresh(demo: &demo::Demo, client_id: &str, token: &str) -> (u16, Value) {
    post_form(
        &format!("{}/token", demo.issuer()),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", client_id),
            ("refresh_token", token),
        ],
    )
    .await
}

async fn mcp_status(demo: &demo::Demo, token: &str) -> u16 {
    client()
        .post(demo.mcp_url())
        .bearer_auth(token)
        .header("accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .expect("mcp")
        .status()
        .as_u16()
}

fn text(value: &Value, name: &str) -> String {
    value[name].as_str().expect(name).to_owned()
}

#[tokio::test]
async fn a_client_signs_in_with_pkce_calls_the_tracker_and_its_tokens_rotate_and_revoke() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = demo::Demo::start(dir.path()).await.expect("start");
    let metadata: Value = client()
        .get(format!(
            "{}/.well-known/oauth-authorization-server",
            demo.issuer()
        ))
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("JSON");
    assert_eq!(metadata["issuer"], demo.issuer());
    assert_eq!(
        metadata["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(
        metadata["authorization_response_iss_parameter_supported"],
        true
    );

    // Unauthenticated: 401 pointing at the protected-resource metadata, which names the issuer.
    let refused = client().post(demo.mcp_url()).send().await.expect("mcp");
    assert_eq!(refused.status(), 401);
    let challenge_header = refused.headers()["www-authenticate"]
        .to_str()
        .expect("header");
    let metadata_url = format!(
        "{}/.well-known/oauth-protected-resource/mcp",
        demo.mcp_url().trim_end_matches("/mcp")
    );
    assert!(
        challenge_header.contains(&metadata_url),
        "{challenge_header}"
    );
    let resource: Value = client()
        .get(&metadata_url)
        .send()
        .await
        .expect("PRM")
        .json()
        .await
        .expect("JSON");
    assert_eq!(resource["resource"], demo.mcp_url());
    assert_eq!(resource["authorization_servers"], json!([demo.issuer()]));

    let client_id = register(&demo).await;
    let answer = decide(&demo, &client_id, "allow").await;
    assert_eq!(answer["state"], "st4te");
    assert_eq!(answer["iss"], demo.issuer());
    let code = answer["code"].clone();
    assert!(code.starts_with(demo::SECRET_PREFIX));
    // PKCE: another verifier is refused, the right one gets tokens.
    let (status, error) = exchange(&demo, &client_id, &code, &format!("{VERIFIER}x")).await;
    assert_eq!(
        (status, error["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    let (status, tokens) = exchange(&demo, &client_id, &code, VERIFIER).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["scope"], "issues:read issues:write");
    let access = text(&tokens, "access_token");

    // The tracker through rmcp's client: four tools, calls counted, export beyond 1 MiB.
    let transport = StreamableHttpClientTransport::with_client(
        client(),
        StreamableHttpClientTransportConfig::with_uri(demo.mcp_url()).auth_header(access.clone()),
    );
    let mcp = ()
        .serve_with_lifecycle(
            transport,
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("connected");
    let tools = mcp.list_all_tools().await.expect("tools");
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "search_issues",
            "create_issue",
            "delete_issue",
            "export_all"
        ]
    );
    let hints = |name: &str| {
        let tool = tools.iter().find(|t| t.name == name).expect("tool");
        let annotations = tool.annotations.clone().expect("annotations");
        (annotations.read_only_hint, annotations.destructive_hint)
    };
    assert_eq!(hints("search_issues"), (Some(true), Some(false)));
    assert_eq!(hints("delete_issue"), (Some(false), Some(true)));
    let call = |name: &'static str, arguments: Value| {
        let mut params = CallToolRequestParams::new(name);
        if let Value::Object(arguments) = arguments {
            params = params.with_arguments(arguments);
        }
        params
    };
    let found = mcp
        .call_tool(call("search_issues", json!({"query": "EXPORT"})))
        .await
        .expect("search");
    let found = found.structured_content.expect("structured");
    assert_eq!(found["issues"][0]["key"], "DEMO-2", "{found}");
    let created = mcp
        .call_tool(call("create_issue", json!({"title": "From the test"})))
        .await
        .expect("create");
    assert_eq!(
        created.content[0].as_text().expect("text").text,
        "Created DEMO-4"
    );
    let deleted = mcp
        .call_tool(call("delete_issue", json!({"key": "DEMO-4"})))
        .await
        .expect("delete");
    assert_ne!(deleted.is_error, Some(true));
    let export = mcp
        .call_tool(call("export_all", json!({})))
        .await
        .expect("export");
    assert!(export.content[0].as_text().expect("text").text.len() > 1024 * 1024);
    let _ = mcp.cancel().await;
    let stats = demo.stats();
    assert_eq!(
        stats.tool_calls.values().copied().collect::<Vec<_>>(),
        [1, 1, 1, 1],
        "{stats:?}"
    );

    // Rotation: a refresh gives new tokens; the used refresh token again revokes the grant.
    let (status, rotated) = refresh(&demo, &client_id, &text(&tokens, "refresh_token")).await;
    assert_eq!(status, 200, "{rotated}");
    assert_ne!(rotated["refresh_token"], tokens["refresh_token"]);
    assert_eq!(
        mcp_status(&demo, &text(&rotated, "access_token")).await,
        200
    );
    let (status, reused) = refresh(&demo, &client_id, &text(&tokens, "refresh_token")).await;
    assert_eq!(
        (status, reused["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(
        mcp_status(&demo, &text(&rotated, "access_token")).await,
        401
    );
    let (status, _) = refresh(&demo, &client_id, &text(&rotated, "refresh_token")).await;
    assert_eq!(status, 400, "the whole grant is gone");

    // Revocation of a refresh token ends its access tokens, and is reported without the token.
    let answer = decide(&demo, &client_id, "allow").await;
    let (_, tokens) = exchange(&demo, &client_id, &answer["code"], VERIFIER).await;
    let (status, _) = post_form(
        &format!("{}/revoke", demo.issuer()),
        &[
            ("client_id", &client_id),
            ("token", &text(&tokens, "refresh_token")),
            ("token_type_hint", "refresh_token"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(mcp_status(&demo, &text(&tokens, "access_token")).await, 401);
    let stats: Value = client()
        .get(demo.mcp_url().replace("/mcp", "/demo/stats"))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        stats["revocations"],
        json!([{"client_id": client_id, "token_kind": "refresh_token"}])
    );
    assert!(!stats.to_string().contains(demo::SECRET_PREFIX));
}

#[tokio::test]
async fn deny_redirects_with_access_denied_and_a_restart_keeps_ports_and_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let demo = demo::Demo::start(dir.path()).await.expect("start");
    let client_id = register(&demo).await;
    let answer = decide(&demo, &client_id, "deny").await;
    assert_eq!(answer["error"], "access_denied");
    assert_eq!(answer["iss"], demo.issuer());
    assert!(!answer.contains_key("code"));
    assert_eq!(demo.stats().authorizations_denied, 1);
    let (issuer, mcp_url) = (demo.issuer().to_owned(), demo.mcp_url().to_owned());
    demo.stop().await;

    let demo = demo::Demo::start(dir.path()).await.expect("restart");
    assert_eq!(
        (demo.issuer(), demo.mcp_url()),
        (issuer.as_str(), mcp_url.as_str())
    );
    // The client registered before the restart can still sign in.
    let answer = decide(&demo, &client_id, "allow").await;
    assert!(answer.contains_key("code"));
    // A loopback redirect URI on another port is the same client's (RFC 8252 §7.3); another
    // path is not.
    for (redirect, status) in [
        ("http://127.0.0.1:10/callback", 200),
        ("http://127.0.0.1:9/elsewhere", 400),
    ] {
        let query = authorization_query(&demo, &client_id).replace(
            &form(&[("redirect_uri", REDIRECT)]),
            &form(&[("redirect_uri", redirect)]),
        );
        let page = client()
            .get(format!("{}/authorize?{query}", demo.issuer()))
            .send()
            .await
            .expect("authorize");
        assert_eq!(page.status(), status, "{redirect}");
    }
    // The state file keeps no issued secret.
    let kept = std::fs::read_to_string(dir.path().join(demo::STATE_FILE)).expect("state");
    assert!(!kept.contains(demo::SECRET_PREFIX), "{kept}");
}
