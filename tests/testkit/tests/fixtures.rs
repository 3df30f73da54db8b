//! The fixture OAuth authorization server and MCP server over real TLS on loopback, driven by a
//! plain HTTP client and by `rmcp`'s client: the code flow with PKCE, refresh rotation and the
//! providers' departures, each revocation style, expiry, both MCP eras, and the test levers.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rmcp::{
    ClientHandler, RoleClient, ServiceExt,
    model::{CallToolRequestParams, ProtocolVersion, SubscriptionFilter},
    service::{ClientLifecycleMode, ClientServiceExt, NotificationContext, RunningService},
    transport::{
        StreamableHttpClientTransport, streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};
use testkit::{
    ClientAuthMethod, FixtureHandle, FixtureServer, FixtureTool, McpEra, OAuthFixture,
    PRE_REGISTERED_CLIENT_ID, PRE_REGISTERED_CLIENT_SECRET, RevocationStyle, TestCa, TokenKind,
    ToolOutput,
};
use tokio::sync::Notify;
use url::Url;

const REDIRECT: &str = "https://switchboard.test/oauth/callback";
const VERIFIER: &str = "fixture-test-verifier-0123456789-abcdefghijklmnopqrstuvwxyz";
/// Only for a test that could otherwise hang; never to wait for something to happen.
const PATIENCE: Duration = Duration::from_secs(10);

fn challenge_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ))
}

struct Setup {
    server: FixtureServer,
    handle: FixtureHandle,
    http: reqwest::Client,
    ca: TestCa,
    /// `https://fixture.test:<port>`
    origin: String,
}

fn client_for(ca: &TestCa, address: SocketAddr) -> reqwest::Client {
    let roots = reqwest::Certificate::from_pem_bundle(ca.cert_pem().as_bytes()).expect("CA");
    testkit::http_client()
        .tls_certs_only(roots)
        .resolve("fixture.test", address)
        .resolve("alt.fixture.test", address)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

async fn setup(fixture: OAuthFixture) -> Setup {
    let ca = TestCa::new();
    let cert = ca.issue(&["fixture.test", "alt.fixture.test"]);
    let (router, handle) = fixture.start();
    let server = testkit::serve_https(router, &cert).await;
    let http = client_for(&ca, server.address);
    let origin = server.https_url("fixture.test");
    Setup {
        server,
        handle,
        http,
        ca,
        origin,
    }
}

/// A client's credentials and how it authenticates.
#[derive(Clone)]
struct ClientCreds {
    id: String,
    secret: Option<String>,
    method: ClientAuthMethod,
}

impl ClientCreds {
    fn pre_registered(method: ClientAuthMethod) -> ClientCreds {
        ClientCreds {
            id: PRE_REGISTERED_CLIENT_ID.to_owned(),
            secret: Some(PRE_REGISTERED_CLIENT_SECRET.to_owned()),
            method,
        }
    }

    /// `form` with this client's authentication added.
    fn apply(
        &self,
        request: reqwest::RequestBuilder,
        form: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let mut form: Vec<(String, String)> = form
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match self.method {
            ClientAuthMethod::None => form.push(("client_id".to_owned(), self.id.clone())),
            ClientAuthMethod::ClientSecretPost => {
                form.push(("client_id".to_owned(), self.id.clone()));
                form.push((
                    "client_secret".to_owned(),
                    self.secret.clone().unwrap_or_default(),
                ));
            }
            ClientAuthMethod::ClientSecretBasic => {}
        }
        let request = with_form(request, &form);
        if self.method == ClientAuthMethod::ClientSecretBasic {
            request.basic_auth(&self.id, self.secret.as_deref())
        } else {
            request
        }
    }
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }

    fn resource(&self) -> String {
        self.url("/mcp")
    }

    async fn register(&self, method: Option<&str>) -> ClientCreds {
        let mut body = json!({"client_name": "Switchboard", "redirect_uris": [REDIRECT]});
        if let Some(method) = method {
            body["token_endpoint_auth_method"] = json!(method);
        }
        let response = self
            .http
            .post(self.url("/register"))
            .json(&body)
            .send()
            .await
            .expect("register");
        assert_eq!(response.status(), 201);
        let answer: Value = response.json().await.expect("JSON");
        let method = answer["token_endpoint_auth_method"]
            .as_str()
            .expect("method");
        ClientCreds {
            id: answer["client_id"].as_str().expect("id").to_owned(),
            secret: answer["client_secret"].as_str().map(str::to_owned),
            method: match method {
                "none" => ClientAuthMethod::None,
                "client_secret_post" => ClientAuthMethod::ClientSecretPost,
                _ => ClientAuthMethod::ClientSecretBasic,
            },
        }
    }

    /// `GET /authorize`; the `Location` of its 302, parsed, with its query as pairs.
    async fn authorize(&self, params: &[(&str, &str)]) -> (Url, Vec<(String, String)>) {
        let response = self
            .http
            .get(with_query(&self.url("/authorize"), params))
            .send()
            .await
            .expect("authorize");
        assert_eq!(response.status(), 302, "{:?}", response.text().await);
        let location = Url::parse(
            response.headers()[reqwest::header::LOCATION]
                .to_str()
                .expect("text"),
        )
        .expect("URL");
        let pairs = location.query_pairs().into_owned().collect();
        (location, pairs)
    }

    /// An authorization request for `client` with PKCE, the right resource and `extra`.
    async fn authorize_client(
        &self,
        client: &ClientCreds,
        extra: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let challenge = challenge_of(VERIFIER);
        let resource = self.resource();
        let mut params = vec![
            ("response_type", "code"),
            ("client_id", client.id.as_str()),
            ("redirect_uri", REDIRECT),
            ("state", "the-state"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("resource", resource.as_str()),
        ];
        for (name, value) in extra {
            params.retain(|(n, _)| n != name);
            params.push((name, value));
        }
        self.authorize(&params).await.1
    }

    async fn token(&self, client: &ClientCreds, form: &[(&str, &str)]) -> (u16, Value) {
        let response = client
            .apply(self.http.post(self.url("/token")), form)
            .send()
            .await
            .expect("token");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON"))
    }

    async fn exchange(&self, client: &ClientCreds, code: &str) -> (u16, Value) {
        let resource = self.resource();
        self.token(
            client,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
                ("resource", &resource),
            ],
        )
        .await
    }

    async fn refresh(&self, client: &ClientCreds, refresh_token: &str) -> (u16, Value) {
        let resource = self.resource();
        self.token(
            client,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("resource", &resource),
            ],
        )
        .await
    }

    /// The whole code flow for `client`: the token response.
    async fn tokens(&self, client: &ClientCreds, extra: &[(&str, &str)]) -> Value {
        let answer = self.authorize_client(client, extra).await;
        let code = param(&answer, "code").expect("a code");
        let (status, tokens) = self.exchange(client, &code).await;
        assert_eq!(status, 200, "{tokens}");
        tokens
    }

    /// A raw JSON-RPC POST to `/mcp`.
    async fn mcp_post(&self, token: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.resource())
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/event-stream",
            )
            .json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("MCP request")
    }
}

/// `request` with `pairs` as its `application/x-www-form-urlencoded` body.
fn with_form<K: AsRef<str>, V: AsRef<str>>(
    request: reqwest::RequestBuilder,
    pairs: &[(K, V)],
) -> reqwest::RequestBuilder {
    request
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(encode(pairs))
}

fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().map(|(k, v)| (k.as_ref(), v.as_ref())))
        .finish()
}

/// `base` with `pairs` as its query.
fn with_query<K: AsRef<str>, V: AsRef<str>>(base: &str, pairs: &[(K, V)]) -> String {
    format!("{base}?{}", encode(pairs))
}

fn param(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn text(value: &Value, field: &str) -> String {
    value[field].as_str().unwrap_or_default().to_owned()
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"test","version":"1"}}}"#;

fn initialize() -> Value {
    serde_json::from_str(INITIALIZE).expect("JSON")
}

fn www_authenticate(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_code_flow_with_pkce_refuses_a_wrong_verifier_a_replayed_code_and_another_resource() {
    let setup = setup(OAuthFixture::default()).await;
    let client = setup.register(None).await;
    assert_eq!(client.method, ClientAuthMethod::ClientSecretBasic);
    assert_eq!(client.id, testkit::FIRST_REGISTERED_CLIENT_ID);

    let elsewhere = setup.url("/other");
    let refused = setup
        .authorize_client(&client, &[("resource", &elsewhere)])
        .await;
    assert_eq!(param(&refused, "error").as_deref(), Some("invalid_target"));
    assert_eq!(param(&refused, "state").as_deref(), Some("the-state"));
    assert_eq!(param(&refused, "iss"), Some(setup.origin.clone()));
    let no_pkce = setup
        .authorize_client(&client, &[("code_challenge_method", "plain")])
        .await;
    assert_eq!(param(&no_pkce, "error").as_deref(), Some("invalid_request"));

    let answer = setup
        .authorize_client(&client, &[("scope", "issues:read issues:write admin")])
        .await;
    assert_eq!(
        param(&answer, "iss"),
        Some(setup.origin.clone()),
        "RFC 9207"
    );
    assert_eq!(param(&answer, "state").as_deref(), Some("the-state"));
    let code = param(&answer, "code").expect("code");
    assert!(code.starts_with("fxcode_"));
    let seen = setup
        .handle
        .last_authorization_request()
        .expect("authorization request");
    assert_eq!(seen.client_id.as_deref(), Some(client.id.as_str()));
    assert_eq!(seen.code_challenge_method.as_deref(), Some("S256"));
    assert_eq!(seen.resource, Some(setup.resource()));
    assert_eq!(seen.user, "user");

    let resource = setup.resource();
    let (status, wrong) = setup
        .token(
            &client,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                (
                    "code_verifier",
                    "another-verifier-0123456789-abcdefghijklmnopqrstuvwxyz",
                ),
                ("resource", &resource),
            ],
        )
        .await;
    assert_eq!(
        (status, text(&wrong, "error")),
        (400, "invalid_grant".into())
    );
    let (status, wrong) = setup
        .token(
            &client,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
                ("resource", &elsewhere),
            ],
        )
        .await;
    assert_eq!(
        (status, text(&wrong, "error")),
        (400, "invalid_target".into())
    );
    let stranger = ClientCreds {
        secret: Some("not-the-secret".to_owned()),
        ..client.clone()
    };
    let (status, wrong) = setup.exchange(&stranger, &code).await;
    assert_eq!(
        (status, text(&wrong, "error")),
        (401, "invalid_client".into())
    );

    let (status, tokens) = setup.exchange(&client, &code).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3600);
    assert_eq!(tokens["scope"], "issues:read issues:write");
    let access = text(&tokens, "access_token");
    let refresh = text(&tokens, "refresh_token");
    assert!(access.starts_with("fxat_") && refresh.starts_with("fxrt_"));
    let seen = setup.handle.last_token_request().expect("token request");
    assert_eq!(seen.client_auth, ClientAuthMethod::ClientSecretBasic);
    assert_eq!(seen.client_id.as_deref(), Some(client.id.as_str()));
    assert_eq!(seen.resource, Some(setup.resource()));
    let response = setup.mcp_post(Some(&access), &initialize()).await;
    assert_eq!(response.status(), 200);

    let (status, replayed) = setup.exchange(&client, &code).await;
    assert_eq!(
        (status, text(&replayed, "error")),
        (400, "invalid_grant".into())
    );
    let response = setup.mcp_post(Some(&access), &initialize()).await;
    assert_eq!(
        response.status(),
        401,
        "a replayed code revokes its tokens (RFC 6749 §4.1.2)"
    );

    let secrets = setup.handle.issued_secrets();
    for secret in [
        &access,
        &refresh,
        &code,
        client.secret.as_ref().expect("secret"),
    ] {
        assert!(secrets.contains(secret), "{secret} is not recorded");
    }
    assert_eq!(setup.handle.token_requests(), 5);
    assert_eq!(setup.handle.token_requests_for("authorization_code"), 5);
}

#[tokio::test]
async fn requests_that_do_not_name_a_known_client_and_its_redirect_uri_are_not_redirected() {
    let setup = setup(OAuthFixture::default()).await;
    let client = setup.register(None).await;
    for (client_id, redirect_uri) in [
        ("unknown", REDIRECT),
        (client.id.as_str(), "https://attacker.test/callback"),
    ] {
        let response = setup
            .http
            .get(with_query(
                &setup.url("/authorize"),
                &[
                    ("response_type", "code"),
                    ("client_id", client_id),
                    ("redirect_uri", redirect_uri),
                ],
            ))
            .send()
            .await
            .expect("authorize");
        assert_eq!(response.status(), 400);
    }
}

#[tokio::test]
async fn refresh_tokens_rotate_and_the_used_one_answers_invalid_grant() {
    let setup = setup(OAuthFixture::default()).await;
    let client = setup.register(None).await;
    let tokens = setup.tokens(&client, &[]).await;
    let first = text(&tokens, "refresh_token");
    let (status, refreshed) = setup.refresh(&client, &first).await;
    assert_eq!(status, 200, "{refreshed}");
    let second = text(&refreshed, "refresh_token");
    assert_ne!(first, second);
    assert_eq!(refreshed["scope"], "issues:read");
    let (status, reused) = setup.refresh(&client, &first).await;
    assert_eq!(
        (status, text(&reused, "error")),
        (400, "invalid_grant".into())
    );
    let (status, wider) = setup
        .token(
            &client,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", &second),
                ("scope", "issues:write"),
            ],
        )
        .await;
    assert_eq!(
        (status, text(&wider, "error")),
        (400, "invalid_scope".into())
    );
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 3);

    setup.handle.revoke_refresh_tokens();
    let (status, revoked) = setup.refresh(&client, &second).await;
    assert_eq!(
        (status, text(&revoked, "error")),
        (400, "invalid_grant".into())
    );
    let response = setup
        .mcp_post(Some(&text(&refreshed, "access_token")), &initialize())
        .await;
    assert_eq!(response.status(), 200, "access tokens live on");
}

#[tokio::test]
async fn notion_keeps_two_live_refresh_tokens_and_concurrent_refreshes_lose() {
    let setup = setup(OAuthFixture::notion()).await;
    let client = setup.register(Some("none")).await;
    assert_eq!(client.method, ClientAuthMethod::None);
    assert_eq!(client.secret, None);
    let tokens = setup.tokens(&client, &[]).await;
    let r1 = text(&tokens, "refresh_token");
    let (status, answer) = setup.refresh(&client, &r1).await;
    assert_eq!(status, 200, "{answer}");
    let r2 = text(&answer, "refresh_token");
    // R1 (the previous) and R2 (the current) are both live; using R1 invalidates R2.
    let (status, answer) = setup.refresh(&client, &r1).await;
    assert_eq!(status, 200, "{answer}");
    let r3 = text(&answer, "refresh_token");
    let (status, answer) = setup.refresh(&client, &r2).await;
    assert_eq!(
        (status, text(&answer, "error")),
        (400, "invalid_grant".into())
    );

    let gate = setup.handle.pause_token_endpoint();
    let (a, b) = (setup.refresh(&client, &r3), setup.refresh(&client, &r3));
    let both = async { tokio::join!(a, b) };
    let released = async {
        gate.arrived(2).await;
        gate.release();
    };
    let ((status_a, answer_a), (status_b, answer_b)) = tokio::time::timeout(PATIENCE, async {
        let (both, ()) = tokio::join!(both, released);
        both
    })
    .await
    .expect("the refreshes finish");
    let mut statuses = [status_a, status_b];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400], "{answer_a} {answer_b}");
    let loser = if status_a == 400 {
        &answer_a
    } else {
        &answer_b
    };
    assert_eq!(loser["error"], "invalid_grant");

    // A Basic registration with client_id in the body too is refused.
    let basic = setup.register(Some("client_secret_basic")).await;
    let tokens_request = with_form(
        setup
            .http
            .post(setup.url("/token"))
            .basic_auth(&basic.id, basic.secret.as_deref()),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", r3.as_str()),
            ("client_id", basic.id.as_str()),
        ],
    )
    .send()
    .await
    .expect("token");
    assert_eq!(tokens_request.status(), 400);
    let answer: Value = tokens_request.json().await.expect("JSON");
    assert_eq!(
        answer["error_description"],
        "Client must not use multiple authentication methods"
    );
}

#[tokio::test]
async fn pagerduty_refreshes_need_the_client_secret() {
    let setup = setup(OAuthFixture::pagerduty()).await;
    let client = ClientCreds::pre_registered(ClientAuthMethod::ClientSecretPost);
    let tokens = setup.tokens(&client, &[]).await;
    let refresh = text(&tokens, "refresh_token");
    let public = ClientCreds {
        method: ClientAuthMethod::None,
        ..client.clone()
    };
    let (status, answer) = setup.refresh(&public, &refresh).await;
    assert_eq!(
        (status, text(&answer, "error")),
        (401, "invalid_client".into())
    );
    let basic = ClientCreds {
        method: ClientAuthMethod::ClientSecretBasic,
        ..client.clone()
    };
    let (status, answer) = setup.refresh(&basic, &refresh).await;
    assert_eq!(
        (status, text(&answer, "error")),
        (401, "invalid_client".into()),
        "only the registered method"
    );
    let (status, answer) = setup.refresh(&client, &refresh).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        setup.handle.last_token_request().map(|t| t.client_auth),
        Some(ClientAuthMethod::ClientSecretPost)
    );

    let lenient = self::setup(OAuthFixture {
        refresh_needs_client_secret: false,
        ..OAuthFixture::pagerduty()
    })
    .await;
    let tokens = lenient.tokens(&client, &[]).await;
    let (status, answer) = lenient
        .refresh(&public, &text(&tokens, "refresh_token"))
        .await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn each_revocation_style_is_recorded() {
    // RFC 7009: a refresh token revokes its grant.
    let rfc = setup(OAuthFixture::default()).await;
    let client = rfc.register(None).await;
    let tokens = rfc.tokens(&client, &[]).await;
    let (access, refresh) = (
        text(&tokens, "access_token"),
        text(&tokens, "refresh_token"),
    );
    let response = client
        .apply(
            rfc.http.post(rfc.url("/revoke")),
            &[("token", &refresh), ("token_type_hint", "refresh_token")],
        )
        .send()
        .await
        .expect("revoke");
    assert_eq!(response.status(), 200);
    let revocations = rfc.handle.revocations();
    assert_eq!(revocations.len(), 1);
    let revocation = &revocations[0];
    assert_eq!(revocation.token, refresh);
    assert_eq!(revocation.token_type_hint.as_deref(), Some("refresh_token"));
    assert_eq!(revocation.style, RevocationStyle::Rfc7009);
    assert_eq!(revocation.client_auth, ClientAuthMethod::ClientSecretBasic);
    assert_eq!(revocation.kind, Some(TokenKind::Refresh));
    assert!(revocation.accepted);
    let (status, _) = rfc.refresh(&client, &refresh).await;
    assert_eq!(status, 400);
    assert_eq!(
        rfc.mcp_post(Some(&access), &initialize()).await.status(),
        401
    );

    // GitHub: the REST API with Basic credentials.
    let github = setup(OAuthFixture::github()).await;
    let metadata: Value = github
        .http
        .get(github.url("/.well-known/oauth-authorization-server/login/oauth"))
        .send()
        .await
        .expect("metadata")
        .json()
        .await
        .expect("JSON");
    assert_eq!(metadata["revocation_endpoint"], Value::Null);
    let client = ClientCreds::pre_registered(ClientAuthMethod::ClientSecretPost);
    let tokens = github.tokens(&client, &[]).await;
    let access = text(&tokens, "access_token");
    let path = github.url(&format!("/applications/{PRE_REGISTERED_CLIENT_ID}/token"));
    let response = github
        .http
        .delete(&path)
        .basic_auth(PRE_REGISTERED_CLIENT_ID, Some("wrong"))
        .json(&json!({"access_token": access}))
        .send()
        .await
        .expect("revoke");
    assert_eq!(response.status(), 401);
    let response = github
        .http
        .delete(&path)
        .basic_auth(PRE_REGISTERED_CLIENT_ID, Some(PRE_REGISTERED_CLIENT_SECRET))
        .json(&json!({"access_token": access}))
        .send()
        .await
        .expect("revoke");
    assert_eq!(response.status(), 204);
    let revocations = github.handle.revocations();
    assert_eq!(revocations.len(), 2);
    assert!(!revocations[0].accepted);
    assert_eq!(revocations[1].style, RevocationStyle::GitHubApi);
    assert_eq!(revocations[1].token, access);
    assert_eq!(revocations[1].kind, Some(TokenKind::Access));
    assert_eq!(
        revocations[1].client_auth,
        ClientAuthMethod::ClientSecretBasic
    );
    assert_eq!(
        github.mcp_post(Some(&access), &initialize()).await.status(),
        401
    );

    // Slack: auth.revoke with the token as the bearer.
    let slack = setup(OAuthFixture::slack()).await;
    let client = ClientCreds::pre_registered(ClientAuthMethod::ClientSecretBasic);
    let tokens = slack.tokens(&client, &[]).await;
    let access = text(&tokens, "access_token");
    let answer: Value = slack
        .http
        .post(slack.url("/api/auth.revoke"))
        .bearer_auth(&access)
        .send()
        .await
        .expect("revoke")
        .json()
        .await
        .expect("JSON");
    assert_eq!(answer, json!({"ok": true, "revoked": true}));
    let revocations = slack.handle.revocations();
    assert_eq!(revocations.len(), 1);
    assert_eq!(revocations[0].style, RevocationStyle::SlackAuthRevoke);
    assert_eq!(revocations[0].token, access);
    let (status, _) = slack
        .refresh(&client, &text(&tokens, "refresh_token"))
        .await;
    assert_eq!(status, 400, "the grant is gone");
}

#[tokio::test]
async fn expired_access_tokens_are_refused_with_invalid_token() {
    let setup = setup(OAuthFixture::default()).await;
    let response = setup.mcp_post(None, &initialize()).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        www_authenticate(&response),
        format!(
            "Bearer resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp\", scope=\"issues:read\"",
            setup.origin
        )
    );
    let client = setup.register(None).await;
    let tokens = setup.tokens(&client, &[]).await;
    let access = text(&tokens, "access_token");
    assert_eq!(
        setup.mcp_post(Some(&access), &initialize()).await.status(),
        200
    );
    setup.handle.expire_access_tokens();
    let response = setup.mcp_post(Some(&access), &initialize()).await;
    assert_eq!(response.status(), 401);
    let challenge = www_authenticate(&response);
    assert!(
        challenge.starts_with("Bearer error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(challenge.contains("resource_metadata="), "{challenge}");
    let response = setup.mcp_post(Some("fxat_made-up"), &initialize()).await;
    assert!(www_authenticate(&response).contains("error=\"invalid_token\""));

    let (status, refreshed) = setup
        .refresh(&client, &text(&tokens, "refresh_token"))
        .await;
    assert_eq!(status, 200);
    let fresh = text(&refreshed, "access_token");
    assert_eq!(
        setup.mcp_post(Some(&fresh), &initialize()).await.status(),
        200
    );
}

#[tokio::test]
async fn a_destructive_tool_needs_the_write_scope() {
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_issue", "arguments": {"key": "FX-1"}}});
    for (fixture, status) in [
        (OAuthFixture::default(), 403),
        (OAuthFixture::github(), 401),
    ] {
        let setup = setup(fixture).await;
        let client = ClientCreds::pre_registered(setup_method(&setup));
        let read = setup.tokens(&client, &[]).await;
        let response = setup
            .mcp_post(Some(&text(&read, "access_token")), &call)
            .await;
        assert_eq!(response.status(), status);
        let challenge = www_authenticate(&response);
        assert!(
            challenge.contains("error=\"insufficient_scope\"")
                && challenge.contains("scope=\"issues:read issues:write\""),
            "{challenge}"
        );
        assert_eq!(setup.handle.tool_calls("delete_issue"), 0);

        let write = setup
            .tokens(&client, &[("scope", "issues:read issues:write")])
            .await;
        let mcp = connect(&setup, &text(&write, "access_token"), McpEra::Stateless).await;
        let result = mcp
            .call_tool(CallToolRequestParams::new("delete_issue"))
            .await
            .expect("call");
        assert_eq!(result.is_error, None);
        assert_eq!(setup.handle.tool_calls("delete_issue"), 1);
        mcp.cancel().await.expect("close");
    }
}

/// The pre-registered client's method in the fixture.
fn setup_method(setup: &Setup) -> ClientAuthMethod {
    setup.handle.fixture().pre_registered_auth_method
}

/// Notices `notifications/tools/list_changed`.
#[derive(Clone, Default)]
struct Listener {
    tools_changed: Arc<Notify>,
}

impl ClientHandler for Listener {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.tools_changed.notify_one();
    }
}

/// An `rmcp` client with the bearer `token`: `server/discover` with 2026-07-28 for the
/// stateless era, `Auto` (discover, then `initialize`) for the sessions era.
async fn connect(setup: &Setup, token: &str, era: McpEra) -> RunningService<RoleClient, Listener> {
    connect_with(setup, token, era, Listener::default()).await
}

async fn connect_with(
    setup: &Setup,
    token: &str,
    era: McpEra,
    listener: Listener,
) -> RunningService<RoleClient, Listener> {
    let transport = StreamableHttpClientTransport::with_client(
        client_for(&setup.ca, setup.server.address),
        StreamableHttpClientTransportConfig::with_uri(setup.resource()).auth_header(token),
    );
    let preferred_versions = vec![ProtocolVersion::V_2026_07_28];
    let lifecycle = match era {
        McpEra::Stateless => ClientLifecycleMode::Discover { preferred_versions },
        McpEra::Sessions => ClientLifecycleMode::Auto {
            preferred_versions,
            legacy_version: None,
        },
    };
    tokio::time::timeout(
        PATIENCE,
        listener.serve_with_lifecycle(transport, lifecycle),
    )
    .await
    .expect("connected in time")
    .expect("connected")
}

#[tokio::test]
async fn tools_are_listed_page_by_page_and_called_through_rmcp_in_both_eras() {
    for (fixture, era) in [
        (OAuthFixture::default(), McpEra::Stateless),
        (OAuthFixture::atlassian(), McpEra::Sessions),
    ] {
        assert_eq!(fixture.mcp_era, era);
        let setup = setup(fixture).await;
        let client = setup.register(None).await;
        let tokens = setup.tokens(&client, &[]).await;
        let listener = Listener::default();
        let mcp = connect_with(
            &setup,
            &text(&tokens, "access_token"),
            era,
            listener.clone(),
        )
        .await;
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
        assert_eq!(setup.handle.tools_list_requests(), 2, "pages of two");
        let search = &tools[0];
        let annotations = search.annotations.as_ref().expect("annotations");
        assert_eq!(annotations.read_only_hint, Some(true));
        assert!(search.output_schema.is_some());
        assert_eq!(
            tools[2]
                .annotations
                .as_ref()
                .and_then(|a| a.destructive_hint),
            Some(true)
        );

        let result = mcp
            .call_tool(
                CallToolRequestParams::new("search_issues").with_arguments(
                    json!({"query": "first"})
                        .as_object()
                        .cloned()
                        .expect("object"),
                ),
            )
            .await
            .expect("call");
        assert_eq!(
            result.structured_content,
            Some(json!({"issues": [{"key": "FX-1", "title": "The first issue"}]}))
        );
        assert_eq!(setup.handle.tool_calls("search_issues"), 1);
        let result = mcp
            .call_tool(CallToolRequestParams::new("export_all"))
            .await
            .expect("call");
        let exported = serde_json::to_value(&result.content).expect("JSON");
        assert_eq!(
            exported[0]["text"].as_str().map(str::len),
            Some(testkit::EXPORT_ALL_BYTES)
        );

        let requests = setup.handle.mcp_requests();
        let listed: Vec<_> = requests
            .iter()
            .filter(|r| r.method.as_deref() == Some("tools/list"))
            .collect();
        match era {
            McpEra::Stateless => {
                assert_eq!(setup.handle.sessions_opened(), 0);
                assert!(listed.iter().all(|r| r.session_id.is_none()
                    && r.protocol_version.as_deref() == Some("2026-07-28")));
            }
            McpEra::Sessions => {
                assert_eq!(setup.handle.sessions_opened(), 1);
                assert!(listed.iter().all(|r| r.session_id.is_some()
                    && r.protocol_version.as_deref() == Some("2025-11-25")));
            }
        }

        // A changed tool list is announced: to the session, or on a subscription.
        let mut subscription = match era {
            McpEra::Stateless => Some(
                mcp.peer()
                    .listen(SubscriptionFilter::builder().tools_list_changed().build())
                    .await
                    .expect("subscription"),
            ),
            McpEra::Sessions => None,
        };
        let mut changed = FixtureTool::standard_set();
        changed.truncate(1);
        changed[0].description = "Finds issues, and more.".to_owned();
        setup.handle.set_tools(changed);
        tokio::time::timeout(PATIENCE, async {
            match &mut subscription {
                Some(subscription) => {
                    let notification = subscription.next().await.expect("notification");
                    assert!(notification.is_some());
                }
                None => listener.tools_changed.notified().await,
            }
        })
        .await
        .expect("tools/list_changed arrives");
        let tools = mcp.list_all_tools().await.expect("tools");
        assert_eq!(tools.len(), 1);
        assert_eq!(
            tools[0].description.as_deref(),
            Some("Finds issues, and more.")
        );
        drop(subscription);
        mcp.cancel().await.expect("close");
    }
}

#[tokio::test]
async fn users_can_see_their_own_tools_and_tools_can_fail() {
    let setup = setup(OAuthFixture::default()).await;
    let client = setup.register(None).await;
    setup.handle.set_tools_for(
        "alice",
        vec![FixtureTool {
            name: "broken".to_owned(),
            title: None,
            description: "Always fails.".to_owned(),
            input_schema: json!({"type": "object"}),
            output_schema: None,
            read_only: None,
            destructive: None,
            output: ToolOutput::Error("the tracker is on fire".to_owned()),
        }],
    );
    let alice = setup.tokens(&client, &[("fixture_user", "alice")]).await;
    let bob = setup.tokens(&client, &[("fixture_user", "bob")]).await;
    let mcp = connect(&setup, &text(&alice, "access_token"), McpEra::Stateless).await;
    let tools = mcp.list_all_tools().await.expect("tools");
    assert_eq!(tools.len(), 1);
    let result = mcp
        .call_tool(CallToolRequestParams::new("broken"))
        .await
        .expect("call");
    assert_eq!(result.is_error, Some(true));
    assert_eq!(setup.handle.tool_calls("broken"), 1);
    mcp.cancel().await.expect("close");
    let mcp = connect(&setup, &text(&bob, "access_token"), McpEra::Stateless).await;
    assert_eq!(mcp.list_all_tools().await.expect("tools").len(), 4);
    mcp.cancel().await.expect("close");
}

#[tokio::test]
async fn a_server_that_is_down_answers_503_and_a_stopped_one_refuses_connections() {
    let setup = setup(OAuthFixture::default()).await;
    setup.handle.set_mcp_down(true);
    assert_eq!(setup.mcp_post(None, &initialize()).await.status(), 503);
    setup.handle.set_mcp_down(false);
    assert_eq!(setup.mcp_post(None, &initialize()).await.status(), 401);

    let Setup {
        server,
        http,
        origin,
        ..
    } = setup;
    server.shutdown().await;
    let error = http
        .post(format!("{origin}/mcp"))
        .send()
        .await
        .expect_err("nothing listens");
    assert!(error.is_connect(), "{error}");
}

#[tokio::test]
async fn the_token_gate_holds_requests_until_released() {
    let setup = Arc::new(setup(OAuthFixture::default()).await);
    let client = setup.register(None).await;
    let tokens = setup.tokens(&client, &[]).await;
    let gate = setup.handle.pause_token_endpoint();
    let refresh = {
        let (setup, client) = (setup.clone(), client.clone());
        let token = text(&tokens, "refresh_token");
        tokio::spawn(async move { setup.refresh(&client, &token).await })
    };
    tokio::time::timeout(PATIENCE, gate.arrived(1))
        .await
        .expect("the request reaches the gate");
    assert!(!refresh.is_finished());
    assert_eq!(setup.handle.token_requests_for("refresh_token"), 1);
    gate.release();
    let (status, answer) = tokio::time::timeout(PATIENCE, refresh)
        .await
        .expect("released")
        .expect("task");
    assert_eq!(status, 200, "{answer}");
    // Without a gate, requests pass.
    let (status, _) = setup
        .refresh(&client, &text(&answer, "refresh_token"))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn authorization_can_be_denied_and_iss_changed_or_left_out() {
    let denied = setup(OAuthFixture {
        deny_authorization: true,
        ..OAuthFixture::default()
    })
    .await;
    let client = denied.register(None).await;
    let answer = denied.authorize_client(&client, &[]).await;
    assert_eq!(param(&answer, "error").as_deref(), Some("access_denied"));
    assert!(param(&answer, "error_description").is_some());
    assert_eq!(param(&answer, "state").as_deref(), Some("the-state"));
    assert_eq!(param(&answer, "iss"), Some(denied.origin.clone()));

    let wrong = setup(OAuthFixture {
        callback_iss_override: Some("https://evil.test".to_owned()),
        ..OAuthFixture::default()
    })
    .await;
    let client = wrong.register(None).await;
    let answer = wrong.authorize_client(&client, &[]).await;
    assert_eq!(param(&answer, "iss").as_deref(), Some("https://evil.test"));

    let silent = setup(OAuthFixture {
        send_iss: false,
        ..OAuthFixture::default()
    })
    .await;
    let client = silent.register(None).await;
    let answer = silent.authorize_client(&client, &[]).await;
    assert!(param(&answer, "code").is_some());
    assert_eq!(param(&answer, "iss"), None);
}

#[tokio::test]
async fn a_consent_page_asks_before_redirecting() {
    let setup = setup(OAuthFixture {
        consent_page: true,
        ..OAuthFixture::default()
    })
    .await;
    let client = setup.register(None).await;
    let challenge = challenge_of(VERIFIER);
    let resource = setup.resource();
    let query = [
        ("response_type", "code"),
        ("client_id", client.id.as_str()),
        ("redirect_uri", REDIRECT),
        ("state", "s"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
        ("resource", resource.as_str()),
    ];
    let page = setup
        .http
        .get(with_query(&setup.url("/authorize"), &query))
        .send()
        .await
        .expect("authorize");
    assert_eq!(page.status(), 200);
    assert!(
        page.text()
            .await
            .expect("page")
            .contains("/authorize/decision")
    );
    let raw = encode(&query);
    for (decision, expected) in [("deny", "error"), ("allow", "code")] {
        let response = with_form(
            setup.http.post(setup.url("/authorize/decision")),
            &[("request", raw.as_str()), ("decision", decision)],
        )
        .send()
        .await
        .expect("decision");
        assert_eq!(response.status(), 302);
        let location = Url::parse(
            response.headers()[reqwest::header::LOCATION]
                .to_str()
                .expect("text"),
        )
        .expect("URL");
        assert!(location.query_pairs().any(|(name, _)| name == expected));
    }
}

#[tokio::test]
async fn a_server_without_oauth_answers_without_a_token() {
    let setup = setup(OAuthFixture {
        requires_oauth: false,
        ..OAuthFixture::default()
    })
    .await;
    let response = setup.mcp_post(None, &initialize()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["result"]["protocolVersion"], "2025-11-25");
    let mcp = connect(&setup, "anything", McpEra::Stateless).await;
    assert_eq!(mcp.list_all_tools().await.expect("tools").len(), 4);
    mcp.cancel().await.expect("close");
}

#[tokio::test]
async fn a_legacy_client_is_served_statelessly_by_the_stateless_era() {
    let setup = setup(OAuthFixture::default()).await;
    let client = setup.register(None).await;
    let tokens = setup.tokens(&client, &[]).await;
    let transport = StreamableHttpClientTransport::with_client(
        client_for(&setup.ca, setup.server.address),
        StreamableHttpClientTransportConfig::with_uri(setup.resource())
            .auth_header(text(&tokens, "access_token")),
    );
    let mcp = Listener::default()
        .serve(transport)
        .await
        .expect("initialize");
    assert_eq!(mcp.list_all_tools().await.expect("tools").len(), 4);
    assert_eq!(setup.handle.sessions_opened(), 0);
    mcp.cancel().await.expect("close");
}
