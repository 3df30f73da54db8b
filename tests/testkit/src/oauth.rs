//! A fixture MCP server with its OAuth 2.1 authorization server, configurable to behave like the
//! specification says or like the providers that depart from it. URLs in its documents are
//! built from the request's `Host`, so it works under any host name the test's resolver maps
//! to loopback.
//!
//! The authorization server follows RFC 6749 (code and refresh grants, §5.2 errors), RFC 7636
//! (PKCE, S256), RFC 7009 (revocation), RFC 7591 (dynamic registration), RFC 8707 (`resource`)
//! and RFC 9207 (`iss` on the authorization response); the provider constructors add each
//! provider's departures (see `docs/` and `PROVIDERS.md`). The MCP endpoint is `rmcp`'s
//! streamable HTTP server behind a bearer-token check (see [`crate::mcp_fixture`]).
//!
//! [`OAuthFixture::start`] gives the router and a [`FixtureHandle`] to steer the fixture and to
//! see what reached it.
use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{RawQuery, Request},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use serde_json::{Value, json};

use crate::mcp_fixture::{self, McpEra};

mod authorization;
mod handle;
mod revocation;
mod state;
mod token;

pub use handle::{
    AuthorizationRequestSeen, FixtureHandle, McpRequestSeen, Revocation, TokenGate, TokenKind,
    TokenRequestSeen,
};
pub(crate) use revocation::bearer;
pub(crate) use state::{Caller, Shared, TokenCheck};

/// The client id of the client every fixture knows without registration (what a test gives
/// Switchboard as the pre-registered client of GitHub, PagerDuty or Slack).
pub const PRE_REGISTERED_CLIENT_ID: &str = "fixture-preregistered";
/// The secret of [`PRE_REGISTERED_CLIENT_ID`].
pub const PRE_REGISTERED_CLIENT_SECRET: &str = "fixture-preregistered-secret-do-not-leak";
/// The client id the first dynamic registration gets (later ones: `fixture-client-<n>`).
pub const FIRST_REGISTERED_CLIENT_ID: &str = "fixture-client-1";
/// The secret the first dynamic registration gets, when its method has one (later ones are
/// random, `fxcs_…`).
pub const FIRST_REGISTERED_CLIENT_SECRET: &str = "fixture-secret-do-not-leak";
/// The scope granted when a client asks for none (and the one the 401 challenge names).
pub const READ_SCOPE: &str = "issues:read";
/// The scope destructive tools need.
pub const WRITE_SCOPE: &str = "issues:write";
/// The user `/authorize` signs in when the request names none (`fixture_user=<name>`).
pub const DEFAULT_USER: &str = "user";

/// How a client authenticates at the token and revocation endpoints (RFC 6749 §2.3, RFC 7591
/// `token_endpoint_auth_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientAuthMethod {
    /// A public client: `client_id` in the body, no secret.
    None,
    /// `Authorization: Basic` with the client id and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

impl ClientAuthMethod {
    /// The RFC 7591 name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuthMethod::None => "none",
            ClientAuthMethod::ClientSecretBasic => "client_secret_basic",
            ClientAuthMethod::ClientSecretPost => "client_secret_post",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<ClientAuthMethod> {
        match name {
            "none" => Some(ClientAuthMethod::None),
            "client_secret_basic" => Some(ClientAuthMethod::ClientSecretBasic),
            "client_secret_post" => Some(ClientAuthMethod::ClientSecretPost),
            _ => None,
        }
    }
}

/// Where and how tokens are revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationStyle {
    /// RFC 7009: `POST /revoke` (form `token`, `token_type_hint`, client authentication as
    /// registered), advertised as `revocation_endpoint`. Revoking a refresh token revokes its
    /// whole grant; revoking an access token, that token. Answers 200 for unknown tokens.
    Rfc7009,
    /// GitHub's REST API, not advertised: `DELETE /applications/{client_id}/token` (that access
    /// token) or `/applications/{client_id}/grant` (its whole grant), HTTP Basic
    /// `client_id:client_secret`, JSON body `{"access_token": "..."}`; 204, 404 for an unknown
    /// token, 401 for bad credentials, 422 without `access_token`.
    GitHubApi,
    /// Slack's `POST /api/auth.revoke`, not advertised: the token as `Authorization: Bearer` (or
    /// form `token=`); answers 200 `{"ok": true, "revoked": true}` and revokes the token's
    /// grant, or 200 `{"ok": false, "error": "invalid_auth"}`.
    SlackAuthRevoke,
    /// No way to revoke.
    None,
}

/// How the MCP endpoint tells a client its token lacks a scope a tool needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeChallenge {
    /// The MCP specification: 403 with `WWW-Authenticate: Bearer error="insufficient_scope",
    /// scope="..."`.
    Forbidden,
    /// GitHub: the same challenge with a 401.
    Unauthorized,
}

/// How the fixture behaves. `Default` is a server that follows the MCP specification with
/// dynamic registration.
#[derive(Debug, Clone)]
pub struct OAuthFixture {
    /// Answer the unauthenticated request with 401 (else the MCP server answers without any
    /// token: a server without OAuth).
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

    /// Which MCP protocol era the MCP endpoint speaks.
    pub mcp_era: McpEra,
    /// `/authorize` answers every request with `error=access_denied` (the user said no).
    pub deny_authorization: bool,
    /// Show a consent page with Allow and Deny (posting to `/authorize/decision`) instead of
    /// consenting at once.
    pub consent_page: bool,
    /// Put `iss` on authorization responses (RFC 9207) and advertise
    /// `authorization_response_iss_parameter_supported`.
    pub send_iss: bool,
    /// Send this `iss` on authorization responses instead of the issuer (to test refusal).
    pub callback_iss_override: Option<String>,
    /// `expires_in` of access tokens; the MCP endpoint refuses them after it.
    pub access_token_lifetime: Duration,
    /// A refresh returns a new refresh token and the used one answers `invalid_grant` (else
    /// the response carries no refresh token and the old one stays valid).
    pub rotate_refresh_tokens: bool,
    /// Notion (Cloudflare's workers-oauth-provider): a grant has two valid refresh tokens, the
    /// current and the previous one. Using either issues a new current one, keeps the used one
    /// as the previous and invalidates the other. Refreshes of one grant that are in flight at
    /// the same time (e.g. held together by a [`TokenGate`]): the first to finish wins, the
    /// later ones get `invalid_grant`.
    pub two_live_refresh_tokens: bool,
    /// A confidential client must authenticate with its secret on a refresh (RFC 6749 §6;
    /// PagerDuty insists): else 401 `invalid_client`. When false, a refresh presenting only
    /// the `client_id` is accepted (lenient providers).
    pub refresh_needs_client_secret: bool,
    /// Where tokens are revoked.
    pub revocation: RevocationStyle,
    /// What `/register` answers as `token_endpoint_auth_method` (a secret is issued unless
    /// `None`); `/token` and `/revoke` then insist on exactly that method.
    pub registered_auth_method: ClientAuthMethod,
    /// `/register` grants the `token_endpoint_auth_method` the client asks for (Notion,
    /// Atlassian), falling back to [`Self::registered_auth_method`] when it asks for none.
    pub honour_requested_auth_method: bool,
    /// A `client_id` in the token request body next to `Authorization: Basic` is refused with
    /// 400 "Client must not use multiple authentication methods" (Notion).
    pub reject_client_id_beside_basic: bool,
    /// How the pre-registered client ([`PRE_REGISTERED_CLIENT_ID`]) authenticates.
    pub pre_registered_auth_method: ClientAuthMethod,
    /// `/authorize` and `/token` insist on `resource` (RFC 8707, as the MCP specification
    /// makes clients send it); when false it may be left out.
    pub require_resource: bool,
    /// How a token without `issues:write` is refused by a destructive tool.
    pub scope_challenge: ScopeChallenge,
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
            mcp_era: McpEra::Stateless,
            deny_authorization: false,
            consent_page: false,
            send_iss: true,
            callback_iss_override: None,
            access_token_lifetime: Duration::from_secs(3600),
            rotate_refresh_tokens: true,
            two_live_refresh_tokens: false,
            refresh_needs_client_secret: true,
            revocation: RevocationStyle::Rfc7009,
            registered_auth_method: ClientAuthMethod::ClientSecretBasic,
            honour_requested_auth_method: false,
            reject_client_id_beside_basic: false,
            pre_registered_auth_method: ClientAuthMethod::ClientSecretBasic,
            require_resource: true,
            scope_challenge: ScopeChallenge::Forbidden,
        }
    }
}

/// Fixtures that reproduce each catalog provider's OAuth profile (public reports as of 2026,
/// `PROVIDERS.md`); what is unknown follows the specification.
impl OAuthFixture {
    /// No protected-resource metadata; root metadata naming an issuer on another host; the
    /// sessions era of MCP; dynamic registration grants the method asked for (`none` works);
    /// access tokens live 3300 s; rotating refresh tokens.
    #[must_use]
    pub fn atlassian() -> Self {
        OAuthFixture {
            protected_resource_metadata: false,
            issuer_host: Some("auth.fixture.test"),
            mcp_era: McpEra::Sessions,
            honour_requested_auth_method: true,
            access_token_lifetime: Duration::from_secs(3300),
            ..OAuthFixture::default()
        }
    }

    /// No dynamic registration (the pre-registered client, `client_secret_post`); a path
    /// issuer; revocation through the REST API; scope challenges with 401; 8 h access tokens.
    #[must_use]
    pub fn github() -> Self {
        OAuthFixture {
            dynamic_registration: false,
            issuer_path: "/login/oauth",
            revocation: RevocationStyle::GitHubApi,
            pre_registered_auth_method: ClientAuthMethod::ClientSecretPost,
            scope_challenge: ScopeChallenge::Unauthorized,
            access_token_lifetime: Duration::from_secs(8 * 3600),
            ..OAuthFixture::default()
        }
    }

    /// Dynamic registration granting the method asked for (a public client registers as
    /// `none`); `client_id` beside Basic refused; 1 h access tokens; two live refresh tokens.
    #[must_use]
    pub fn notion() -> Self {
        OAuthFixture {
            honour_requested_auth_method: true,
            reject_client_id_beside_basic: true,
            two_live_refresh_tokens: true,
            ..OAuthFixture::default()
        }
    }

    /// OpenID Connect discovery only, with a path issuer; the pre-registered client
    /// (`client_secret_post`), whose refreshes need the secret; 10-day access tokens.
    #[must_use]
    pub fn pagerduty() -> Self {
        OAuthFixture {
            openid_connect_only: true,
            issuer_path: "/oauth",
            dynamic_registration: false,
            pre_registered_auth_method: ClientAuthMethod::ClientSecretPost,
            refresh_needs_client_secret: true,
            access_token_lifetime: Duration::from_secs(864_000),
            ..OAuthFixture::default()
        }
    }

    /// The metadata URL answers with a 302 to another host; the pre-registered client
    /// (`client_secret_basic`); revocation through `auth.revoke`; 12 h access tokens.
    #[must_use]
    pub fn slack() -> Self {
        OAuthFixture {
            well_known_redirect_host: Some("alt.fixture.test"),
            dynamic_registration: false,
            revocation: RevocationStyle::SlackAuthRevoke,
            pre_registered_auth_method: ClientAuthMethod::ClientSecretBasic,
            access_token_lifetime: Duration::from_secs(12 * 3600),
            ..OAuthFixture::default()
        }
    }
}

/// `https://<Host>` of a request.
pub(crate) fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("fixture.test");
    format!("https://{host}")
}

impl OAuthFixture {
    /// The fixture as a router: `/mcp`, the metadata documents, `/register`, `/authorize`,
    /// `/token` and the revocation endpoint. The same as `self.start().0`.
    pub fn router(self) -> Router {
        self.start().0
    }

    /// The router and a handle on the fixture's state, shared by every clone of the router.
    pub fn start(self) -> (Router, FixtureHandle) {
        let shared = Arc::new(Shared::new(self.clone()));
        let handle = FixtureHandle::new(shared.clone());
        let mut router = Router::new();
        router = router.route("/mcp", mcp_fixture::entry(shared.clone()));
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
                get(move |query: RawQuery| {
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
            let shared = shared.clone();
            router = router.route(
                "/register",
                post(move |request: Request| token::register(shared.clone(), request)),
            );
        }
        {
            let shared = shared.clone();
            router = router.route(
                "/authorize",
                get(move |headers: HeaderMap, query: RawQuery| {
                    authorization::authorize(shared.clone(), headers, query)
                }),
            );
        }
        {
            let shared = shared.clone();
            router = router.route(
                "/authorize/decision",
                post(move |headers: HeaderMap, request: Request| {
                    authorization::decision(shared.clone(), headers, request)
                }),
            );
        }
        {
            let shared = shared.clone();
            router = router.route(
                "/token",
                post(move |request: Request| token::token(shared.clone(), request)),
            );
        }
        match self.revocation {
            RevocationStyle::Rfc7009 => {
                let shared = shared.clone();
                router = router.route(
                    "/revoke",
                    post(move |request: Request| revocation::rfc7009(shared.clone(), request)),
                );
            }
            RevocationStyle::GitHubApi => {
                let (for_token, for_grant) = (shared.clone(), shared.clone());
                router = router
                    .route(
                        "/applications/{client_id}/token",
                        delete(move |request: Request| {
                            revocation::github(for_token.clone(), request, false)
                        }),
                    )
                    .route(
                        "/applications/{client_id}/grant",
                        delete(move |request: Request| {
                            revocation::github(for_grant.clone(), request, true)
                        }),
                    );
            }
            RevocationStyle::SlackAuthRevoke => {
                let shared = shared.clone();
                router = router.route(
                    "/api/auth.revoke",
                    post(move |request: Request| revocation::slack(shared.clone(), request)),
                );
            }
            RevocationStyle::None => {}
        }
        (router, handle)
    }

    fn resource_metadata(&self, headers: &HeaderMap) -> Value {
        let origin = origin(headers);
        json!({
            "resource": format!("{origin}/mcp"),
            "authorization_servers": [format!("{origin}{}", self.issuer_path)],
            "scopes_supported": [READ_SCOPE, WRITE_SCOPE],
            "bearer_methods_supported": ["header"],
        })
    }

    /// The issuer the metadata names for `origin` (and `iss` on authorization responses).
    pub(crate) fn issuer(&self, origin: &str) -> String {
        if self.wrong_issuer {
            "https://someone-else.test".to_owned()
        } else if let Some(host) = self.issuer_host {
            format!("https://{host}{}", self.issuer_path)
        } else {
            format!("{origin}{}", self.issuer_path)
        }
    }

    fn authorization_server_metadata(&self, origin: &str) -> Value {
        let token_endpoint = if self.http_token_endpoint {
            format!("{}/token", origin.replacen("https://", "http://", 1))
        } else {
            format!("{origin}/token")
        };
        let methods = ["client_secret_basic", "client_secret_post", "none"];
        let mut metadata = json!({
            "issuer": self.issuer(origin),
            "authorization_endpoint": format!("{origin}/authorize"),
            "token_endpoint": token_endpoint,
            "token_endpoint_auth_methods_supported": methods,
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": if self.pkce_s256 { json!(["S256"]) } else { json!(["plain"]) },
            "scopes_supported": [READ_SCOPE, WRITE_SCOPE],
            "authorization_response_iss_parameter_supported": self.send_iss,
        });
        if self.revocation == RevocationStyle::Rfc7009 {
            metadata["revocation_endpoint"] = json!(format!("{origin}/revoke"));
            metadata["revocation_endpoint_auth_methods_supported"] = json!(methods);
        }
        if self.dynamic_registration {
            metadata["registration_endpoint"] = json!(format!("{origin}/register"));
        }
        if self.client_id_metadata_document {
            metadata["client_id_metadata_document_supported"] = json!(true);
        }
        metadata
    }
}

/// An answer that is never cached (RFC 6749 §5.1).
pub(crate) fn no_store(status: StatusCode, body: Value) -> Response {
    (
        status,
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::PRAGMA, "no-cache"),
        ],
        Json(body),
    )
        .into_response()
}
