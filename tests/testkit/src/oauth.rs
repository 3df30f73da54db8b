//! A fixture MCP server with its OAuth authorization server, configurable to behave like the
//! specification says or like the providers that depart from it. URLs in its documents are
//! built from the request's `Host`, so it works under any host name the test's resolver maps
//! to loopback.
use axum::{
    Json, Router,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

/// How the fixture behaves. `Default` is a server that follows the MCP specification with
/// dynamic registration.
#[derive(Debug, Clone)]
pub struct OAuthFixture {
    /// Answer the unauthenticated request with 401 (else 200: a server without OAuth).
    pub requires_oauth: bool,
    /// Serve protected-resource metadata (RFC 9728) and point to it from the challenge.
    pub protected_resource_metadata: bool,
    /// The issuer's path, e.g. `/login/oauth` (empty: the origin).
    pub issuer_path: &'static str,
    /// Publish only OpenID Connect discovery, not RFC 8414 metadata.
    pub openid_connect_only: bool,
    /// Claim another issuer than the one the metadata is found under.
    pub wrong_issuer: bool,
    pub pkce_s256: bool,
    /// Give a plain `http://` token endpoint.
    pub http_token_endpoint: bool,
    pub dynamic_registration: bool,
    pub client_id_metadata_document: bool,
    /// Redirect the MCP endpoint here (a full URL).
    pub redirect_mcp_to: Option<&'static str>,
    /// Name an issuer on this other host in the metadata (Atlassian).
    pub issuer_host: Option<&'static str>,
    /// Answer the authorization-server metadata URL with a 302 to this other host (Slack),
    /// which serves the document.
    pub well_known_redirect_host: Option<&'static str>,
}

impl Default for OAuthFixture {
    fn default() -> Self {
        OAuthFixture {
            requires_oauth: true,
            protected_resource_metadata: true,
            issuer_path: "",
            openid_connect_only: false,
            wrong_issuer: false,
            pkce_s256: true,
            http_token_endpoint: false,
            dynamic_registration: true,
            client_id_metadata_document: false,
            redirect_mcp_to: None,
            issuer_host: None,
            well_known_redirect_host: None,
        }
    }
}

/// Fixtures that reproduce each catalog provider's OAuth profile (public reports as of 2026).
impl OAuthFixture {
    /// No protected-resource metadata; root metadata naming an issuer on another host.
    #[must_use]
    pub fn atlassian() -> Self {
        OAuthFixture {
            protected_resource_metadata: false,
            issuer_host: Some("auth.fixture.test"),
            ..OAuthFixture::default()
        }
    }

    /// No dynamic registration; a path issuer.
    #[must_use]
    pub fn github() -> Self {
        OAuthFixture {
            dynamic_registration: false,
            issuer_path: "/login/oauth",
            ..OAuthFixture::default()
        }
    }

    /// Dynamic registration of a public client.
    #[must_use]
    pub fn notion() -> Self {
        OAuthFixture::default()
    }

    /// OpenID Connect discovery only, with a path issuer; a pre-registered client.
    #[must_use]
    pub fn pagerduty() -> Self {
        OAuthFixture {
            openid_connect_only: true,
            issuer_path: "/oauth",
            dynamic_registration: false,
            ..OAuthFixture::default()
        }
    }

    /// The metadata URL answers with a 302 to another host; a pre-registered client.
    #[must_use]
    pub fn slack() -> Self {
        OAuthFixture {
            well_known_redirect_host: Some("alt.fixture.test"),
            dynamic_registration: false,
            ..OAuthFixture::default()
        }
    }
}

fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("fixture.test");
    format!("https://{host}")
}

impl OAuthFixture {
    /// The fixture as a router: `/mcp`, the metadata documents and `/register`.
    pub fn router(self) -> Router {
        let mut router = Router::new();
        let fixture = self.clone();
        router = router.route(
            "/mcp",
            post(move |headers: HeaderMap| {
                let fixture = fixture.clone();
                async move { fixture.mcp(&headers) }
            }),
        );
        if self.protected_resource_metadata {
            let fixture = self.clone();
            router = router.route(
                "/.well-known/oauth-protected-resource/mcp",
                get(move |headers: HeaderMap| {
                    let fixture = fixture.clone();
                    async move { Json(fixture.resource_metadata(&headers)) }
                }),
            );
        }
        let path = self.issuer_path;
        let mut metadata_paths = Vec::new();
        if self.openid_connect_only {
            metadata_paths.push(format!("/.well-known/openid-configuration{path}"));
            if !path.is_empty() {
                metadata_paths.push(format!("{path}/.well-known/openid-configuration"));
            }
        } else {
            metadata_paths.push(format!("/.well-known/oauth-authorization-server{path}"));
        }
        for metadata_path in metadata_paths {
            let fixture = self.clone();
            router = router.route(
                &metadata_path,
                get(move |headers: HeaderMap| {
                    let fixture = fixture.clone();
                    async move {
                        match fixture.well_known_redirect_host {
                            Some(host) => {
                                let origin = origin(&headers);
                                let port = origin.rsplit(':').next().unwrap_or("443");
                                let target =
                                    format!("https://{host}:{port}/moved/metadata?origin={origin}");
                                (StatusCode::FOUND, [(header::LOCATION, target)]).into_response()
                            }
                            None => Json(fixture.authorization_server_metadata(&origin(&headers)))
                                .into_response(),
                        }
                    }
                }),
            );
        }
        if self.well_known_redirect_host.is_some() {
            let fixture = self.clone();
            router = router.route(
                "/moved/metadata",
                get(move |query: axum::extract::RawQuery| {
                    let fixture = fixture.clone();
                    async move {
                        let origin = query
                            .0
                            .as_deref()
                            .and_then(|q| q.strip_prefix("origin="))
                            .unwrap_or("https://fixture.test")
                            .to_owned();
                        Json(fixture.authorization_server_metadata(&origin))
                    }
                }),
            );
        }
        if self.dynamic_registration {
            router = router.route("/register", post(register));
        }
        router
    }

    fn mcp(&self, headers: &HeaderMap) -> Response {
        if let Some(target) = self.redirect_mcp_to {
            return Redirect::temporary(target).into_response();
        }
        if !self.requires_oauth {
            return Json(json!({"jsonrpc": "2.0", "id": 0, "result": {"protocolVersion": "2026-07-28", "capabilities": {}, "serverInfo": {"name": "open", "version": "1"}}})).into_response();
        }
        let challenge = if self.protected_resource_metadata {
            format!(
                "Bearer resource_metadata=\"{}/.well-known/oauth-protected-resource/mcp\", scope=\"issues:read\"",
                origin(headers)
            )
        } else {
            "Bearer realm=\"mcp\"".to_owned()
        };
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
        )
            .into_response()
    }

    fn resource_metadata(&self, headers: &HeaderMap) -> Value {
        let origin = origin(headers);
        json!({
            "resource": format!("{origin}/mcp"),
            "authorization_servers": [format!("{origin}{}", self.issuer_path)],
            "scopes_supported": ["issues:read", "issues:write"],
            "bearer_methods_supported": ["header"],
        })
    }

    fn authorization_server_metadata(&self, origin: &str) -> Value {
        let issuer = if self.wrong_issuer {
            "https://someone-else.test".to_owned()
        } else if let Some(host) = self.issuer_host {
            format!("https://{host}{}", self.issuer_path)
        } else {
            format!("{origin}{}", self.issuer_path)
        };
        let token_endpoint = if self.http_token_endpoint {
            format!("{}/token", origin.replacen("https://", "http://", 1))
        } else {
            format!("{origin}/token")
        };
        let mut metadata = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{origin}/authorize"),
            "token_endpoint": token_endpoint,
            "revocation_endpoint": format!("{origin}/revoke"),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": if self.pkce_s256 { json!(["S256"]) } else { json!(["plain"]) },
            "scopes_supported": ["issues:read", "issues:write"],
            "authorization_response_iss_parameter_supported": true,
        });
        if self.dynamic_registration {
            metadata["registration_endpoint"] = json!(format!("{origin}/register"));
        }
        if self.client_id_metadata_document {
            metadata["client_id_metadata_document_supported"] = json!(true);
        }
        metadata
    }
}

async fn register(request: Request) -> Response {
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024)
        .await
        .unwrap_or_default();
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (
        StatusCode::CREATED,
        Json(json!({
            "client_id": "fixture-client-1",
            "client_secret": "fixture-secret-do-not-leak",
            "redirect_uris": asked["redirect_uris"],
            "token_endpoint_auth_method": "client_secret_basic",
        })),
    )
        .into_response()
}
