//! The demo authorization server: RFC 8414 metadata, RFC 7591 registration, the
//! authorization endpoint with its sign-in page (RFC 6749 §4.1, RFC 7636, RFC 8707, RFC
//! 9207), the token endpoint (code and refresh grants, §5.2 errors) and RFC 7009 revocation.
use std::{collections::HashMap, sync::Arc, time::Duration, time::Instant};

use axum::{
    Json, Router,
    extract::{RawQuery, Request},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};
use url::Url;

use crate::{
    SCOPES,
    state::{
        ACCESS_TOKEN_LIFETIME, AccessToken, AuthMethod, Client, Code, Grant, NoRandomness,
        Revocation, Shared, State, mint, random_text, sha256,
    },
};

/// How long an authorization code can be exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// Largest form or JSON body read.
const MAX_BODY: usize = 64 * 1024;
/// Most clients kept: registration is open to anyone on loopback, so it is bounded.
const MAX_CLIENTS: usize = 1000;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let with = |shared: &Arc<Shared>| shared.clone();
    let (metadata, register_, authorize_, decision_, token_, revoke_) = (
        with(&shared),
        with(&shared),
        with(&shared),
        with(&shared),
        with(&shared),
        with(&shared),
    );
    Router::new()
        .route(
            "/.well-known/oauth-authorization-server",
            get(move || async move { Json(authorization_server_metadata(&metadata)) }),
        )
        .route(
            "/register",
            post(move |request: Request| register(register_.clone(), request)),
        )
        .route(
            "/authorize",
            get(move |query: RawQuery| async move {
                handle(&authorize_, &query.0.unwrap_or_default(), Consent::Ask)
            }),
        )
        .route(
            "/authorize/decision",
            post(move |request: Request| decision(decision_.clone(), request)),
        )
        .route(
            "/token",
            post(move |request: Request| token(token_.clone(), request)),
        )
        .route(
            "/revoke",
            post(move |request: Request| revoke(revoke_.clone(), request)),
        )
}

fn authorization_server_metadata(shared: &Shared) -> Value {
    let issuer = &shared.issuer;
    let methods = ["client_secret_basic", "client_secret_post", "none"];
    json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/authorize"),
        "token_endpoint": format!("{issuer}/token"),
        "registration_endpoint": format!("{issuer}/register"),
        "revocation_endpoint": format!("{issuer}/revoke"),
        "token_endpoint_auth_methods_supported": methods,
        "revocation_endpoint_auth_methods_supported": methods,
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": SCOPES,
        "authorization_response_iss_parameter_supported": true,
    })
}

/// An answer that is never cached (RFC 6749 §5.1).
fn no_store(status: StatusCode, body: Value) -> Response {
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

/// An RFC 6749 §5.2 error answer.
struct OAuthError {
    code: &'static str,
    description: String,
}

impl OAuthError {
    fn new(code: &'static str, description: impl Into<String>) -> OAuthError {
        OAuthError {
            code,
            description: description.into(),
        }
    }

    fn into_response(self) -> Response {
        let status = match self.code {
            "invalid_client" => StatusCode::UNAUTHORIZED,
            "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        let mut response = no_store(
            status,
            json!({"error": self.code, "error_description": self.description}),
        );
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"demo\""),
            );
        }
        response
    }
}

impl From<NoRandomness> for OAuthError {
    fn from(_: NoRandomness) -> Self {
        OAuthError::new("server_error", "The system random source failed")
    }
}

/// Form or query parameters; a repeated parameter is an error (RFC 6749 §3.1).
fn parse_params(raw: &[u8]) -> Result<HashMap<String, String>, String> {
    let mut params = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(raw) {
        if params
            .insert(name.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return Err(format!("the parameter {name} is repeated"));
        }
    }
    Ok(params)
}

async fn read_form(request: Request) -> Result<(HeaderMap, HashMap<String, String>), OAuthError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| OAuthError::new("invalid_request", "The body is unreadable or too large"))?;
    let form = parse_params(&body).map_err(|e| OAuthError::new("invalid_request", e))?;
    Ok((parts.headers, form))
}

/// `POST /register` (RFC 7591): grants the method asked for (a public client gets no secret).
async fn register(shared: Arc<Shared>, request: Request) -> Response {
    let error = |code: &str, description: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": code, "error_description": description})),
        )
            .into_response()
    };
    let Ok(body) = axum::body::to_bytes(request.into_body(), MAX_BODY).await else {
        return error("invalid_client_metadata", "The body is unreadable");
    };
    let Ok(asked) = serde_json::from_slice::<Value>(&body) else {
        return error("invalid_client_metadata", "The body is not JSON");
    };
    let redirect_uris: Option<Vec<String>> = asked["redirect_uris"].as_array().and_then(|uris| {
        uris.iter()
            .map(|uri| uri.as_str().map(str::to_owned))
            .collect()
    });
    let Some(redirect_uris) = redirect_uris.filter(|uris| !uris.is_empty()) else {
        return error("invalid_redirect_uri", "redirect_uris is required");
    };
    if redirect_uris.iter().any(|uri| Url::parse(uri).is_err()) {
        return error("invalid_redirect_uri", "redirect_uris must be URLs");
    }
    let method = match asked["token_endpoint_auth_method"].as_str() {
        None => AuthMethod::ClientSecretBasic,
        Some(name) => match AuthMethod::parse(name) {
            Some(method) => method,
            None => {
                return error(
                    "invalid_client_metadata",
                    "token_endpoint_auth_method is not supported",
                );
            }
        },
    };
    let (client_id, secret) = match (random_text(), mint("cs")) {
        (Ok(id), Ok(secret)) => (
            format!("demo-client-{}", &id[..16]),
            (method != AuthMethod::None).then_some(secret),
        ),
        _ => return OAuthError::from(NoRandomness).into_response(),
    };
    {
        let mut state = shared.state();
        if state.persisted.clients.len() >= MAX_CLIENTS {
            return error("invalid_client_metadata", "Too many clients are registered");
        }
        state.persisted.clients.insert(
            client_id.clone(),
            Client {
                method,
                redirect_uris: redirect_uris.clone(),
                secret_sha256: secret.as_deref().map(sha256),
            },
        );
        state.stats.clients_registered = state.persisted.clients.len();
        if let Err(e) = shared.save(&state.persisted) {
            tracing::error!(error = %e, "the demo client registration is not saved");
        }
    }
    let mut answer = json!({
        "client_id": client_id,
        "client_id_issued_at": 0,
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": method.as_str(),
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    });
    if let Some(secret) = secret {
        answer["client_secret"] = json!(secret);
        answer["client_secret_expires_at"] = json!(0);
    }
    if let Some(name) = asked["client_name"].as_str() {
        answer["client_name"] = json!(name);
    }
    (StatusCode::CREATED, Json(answer)).into_response()
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("The authorization request is refused: {message}\n"),
    )
        .into_response()
}

/// `POST /authorize/decision` from the sign-in page: `request` (the authorization request's
/// query, checked again in full) and `decision` (`allow` or `deny`).
async fn decision(shared: Arc<Shared>, request: Request) -> Response {
    let form = match read_form(request).await {
        Ok((_, form)) => form,
        Err(_) => return bad_request("the form is unreadable"),
    };
    let Some(raw) = form.get("request") else {
        return bad_request("the form names no request");
    };
    let consent = match form.get("decision").map(String::as_str) {
        Some("allow") => Consent::Given,
        Some("deny") => Consent::Refused,
        _ => return bad_request("the form names no decision"),
    };
    handle(&shared, raw, consent)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Consent {
    /// Show the sign-in page.
    Ask,
    Given,
    Refused,
}

fn handle(shared: &Shared, raw: &str, consent: Consent) -> Response {
    let params = match parse_params(raw.as_bytes()) {
        Ok(params) => params,
        Err(e) => return bad_request(&e),
    };
    let get = |name: &str| params.get(name).cloned();
    // Errors about the client or its redirect URI are shown, never redirected (§4.1.2.1).
    let Some(client_id) = get("client_id") else {
        return bad_request("client_id is missing");
    };
    let redirect_uri = {
        let state = shared.state();
        let Some(client) = state.persisted.clients.get(&client_id) else {
            return bad_request("the client is not known (was it registered with this demo?)");
        };
        match get("redirect_uri") {
            Some(given)
                if client
                    .redirect_uris
                    .iter()
                    .any(|r| same_redirect(r, &given)) =>
            {
                given
            }
            Some(_) => return bad_request("redirect_uri is not registered for the client"),
            None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
            None => return bad_request("redirect_uri is missing"),
        }
    };
    let Ok(redirect) = Url::parse(&redirect_uri) else {
        return bad_request("redirect_uri is not a URL");
    };
    let state_param = get("state");
    let answer = |pairs: &[(&str, &str)]| -> Response {
        let mut target = redirect.clone();
        {
            let mut query = target.query_pairs_mut();
            for (name, value) in pairs {
                query.append_pair(name, value);
            }
            if let Some(state) = &state_param {
                query.append_pair("state", state);
            }
            query.append_pair("iss", &shared.issuer);
        }
        (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
    };
    let error = |code: &str, description: &str| {
        answer(&[("error", code), ("error_description", description)])
    };
    if get("response_type").as_deref() != Some("code") {
        return error(
            "unsupported_response_type",
            "Only response_type=code is supported",
        );
    }
    let Some(challenge) = get("code_challenge") else {
        return error("invalid_request", "code_challenge is required (PKCE)");
    };
    if get("code_challenge_method").as_deref() != Some("S256") {
        return error("invalid_request", "code_challenge_method must be S256");
    }
    if get("resource").as_deref() != Some(shared.resource.as_str()) {
        return error(
            "invalid_target",
            &format!("The resource must be {}", shared.resource),
        );
    }
    let scopes = granted_scopes(get("scope").as_deref());
    match consent {
        Consent::Ask => sign_in_page(&client_id, &scopes, raw),
        Consent::Refused => {
            shared.state().stats.authorizations_denied += 1;
            error("access_denied", "The user denied the request")
        }
        Consent::Given => {
            let code = match mint("code") {
                Ok(code) => code,
                Err(_) => return error("server_error", "The system random source failed"),
            };
            let mut state = shared.state();
            state.stats.authorizations_allowed += 1;
            // Expired codes are of no use, not even for replay detection: forget them, so a
            // long-running demo does not grow without bound.
            state
                .codes
                .retain(|_, code| code.issued_at.elapsed() <= CODE_LIFETIME);
            state.codes.insert(
                code.clone(),
                Code {
                    client_id,
                    redirect_uri,
                    challenge,
                    scopes,
                    issued_at: Instant::now(),
                    used_for: None,
                },
            );
            drop(state);
            answer(&[("code", &code)])
        }
    }
}

/// Whether `given` is the registered redirect URI. For a loopback address literal the port
/// may differ (RFC 8252 §7.3): Switchboard's own port may change between starts (`--listen`),
/// while the client it registered with the demo is kept.
fn same_redirect(registered: &str, given: &str) -> bool {
    if registered == given {
        return true;
    }
    let (Ok(mut registered), Ok(mut given)) = (Url::parse(registered), Url::parse(given)) else {
        return false;
    };
    let loopback_literal = |url: &Url| match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        _ => false,
    };
    if !(loopback_literal(&registered) && loopback_literal(&given)) {
        return false;
    }
    let _ = registered.set_port(None);
    let _ = given.set_port(None);
    registered == given
}

/// The scopes asked for that the demo knows; `issues:read` when none is left.
fn granted_scopes(asked: Option<&str>) -> Vec<String> {
    let granted: Vec<String> = SCOPES
        .iter()
        .filter(|scope| asked.is_some_and(|asked| asked.split(' ').any(|a| a == **scope)))
        .map(|scope| (*scope).to_owned())
        .collect();
    if granted.is_empty() {
        vec![SCOPES[0].to_owned()]
    } else {
        granted
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The sign-in page: who asks, for what, an Allow and a Deny button. The form carries the
/// authorization request back, and the decision handler checks it again in full.
fn sign_in_page(client_id: &str, scopes: &[String], raw: &str) -> Response {
    Html(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Demo issue tracker: sign in</title></head>\n\
         <body style=\"font-family: sans-serif; max-width: 32em; margin: 3em auto\">\n\
         <h1>Demo issue tracker</h1>\n\
         <p>You are signed in as <strong>demo user</strong>.</p>\n\
         <p><strong>Switchboard</strong> (client <code>{client}</code>) asks to use the issue tracker on your behalf, with: {scopes}.</p>\n\
         <form method=\"post\" action=\"/authorize/decision\">\n\
         <input type=\"hidden\" name=\"request\" value=\"{request}\">\n\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\n\
         </form></body></html>\n",
        client = escape(client_id),
        scopes = escape(&scopes.join(", ")),
        request = escape(raw),
    ))
    .into_response()
}

/// Authenticates the client of a token or revocation request as it registered (RFC 6749
/// §2.3): its id.
fn authenticate(
    state: &State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<String, OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, credentials)| {
            basic_credentials(credentials)
                .ok_or_else(|| OAuthError::new("invalid_client", "Malformed Basic credentials"))
        })
        .transpose()?;
    let (method, client_id, secret) = match basic {
        Some((id, secret)) => {
            if form.contains_key("client_secret")
                || form.get("client_id").is_some_and(|body_id| *body_id != id)
            {
                return Err(OAuthError::new(
                    "invalid_request",
                    "Use one client authentication method",
                ));
            }
            (AuthMethod::ClientSecretBasic, Some(id), Some(secret))
        }
        None => match form.get("client_secret") {
            Some(secret) => (
                AuthMethod::ClientSecretPost,
                form.get("client_id").cloned(),
                Some(secret.clone()),
            ),
            None => (AuthMethod::None, form.get("client_id").cloned(), None),
        },
    };
    let Some(client_id) = client_id else {
        return Err(OAuthError::new(
            "invalid_client",
            "No client authentication",
        ));
    };
    let Some(client) = state.persisted.clients.get(&client_id) else {
        return Err(OAuthError::new("invalid_client", "The client is not known"));
    };
    if method != client.method {
        return Err(OAuthError::new(
            "invalid_client",
            format!(
                "The client must authenticate with {}",
                client.method.as_str()
            ),
        ));
    }
    if secret.as_deref().map(sha256) != client.secret_sha256 {
        return Err(OAuthError::new(
            "invalid_client",
            "The client secret is wrong",
        ));
    }
    Ok(client_id)
}

/// `base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
fn basic_credentials(encoded: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    let unescape = |text: &str| -> Option<String> {
        let mut out = String::new();
        for (name, value) in url::form_urlencoded::parse(format!("x={text}").as_bytes()) {
            if name == "x" {
                out = value.into_owned();
            }
        }
        Some(out)
    };
    Some((unescape(id)?, unescape(secret)?))
}

/// `POST /token`.
async fn token(shared: Arc<Shared>, request: Request) -> Response {
    let (headers, form) = match read_form(request).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let mut state = shared.state();
    let answer = match form.get("grant_type").map(String::as_str) {
        Some("authorization_code") => exchange_code(&shared, &mut state, &headers, &form),
        Some("refresh_token") => refresh(&shared, &mut state, &headers, &form),
        Some(_) => Err(OAuthError::new(
            "unsupported_grant_type",
            "Only authorization_code and refresh_token are supported",
        )),
        None => Err(OAuthError::new("invalid_request", "grant_type is missing")),
    };
    match answer {
        Ok(body) => no_store(StatusCode::OK, body),
        Err(e) => e.into_response(),
    }
}

fn exchange_code(
    shared: &Shared,
    state: &mut State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Value, OAuthError> {
    let client_id = authenticate(state, headers, form)?;
    let Some(code_value) = form.get("code") else {
        return Err(OAuthError::new("invalid_request", "code is missing"));
    };
    let Some(code) = state.codes.get(code_value) else {
        return Err(OAuthError::new("invalid_grant", "The code is not known"));
    };
    if let Some(grant) = code.used_for {
        // A replayed code revokes what it was exchanged for (RFC 6749 §4.1.2).
        state.revoke_grant(grant);
        return Err(OAuthError::new(
            "invalid_grant",
            "The code was already used",
        ));
    }
    if code.issued_at.elapsed() > CODE_LIFETIME {
        return Err(OAuthError::new("invalid_grant", "The code expired"));
    }
    if code.client_id != client_id {
        return Err(OAuthError::new(
            "invalid_grant",
            "The code was issued to another client",
        ));
    }
    if form.get("redirect_uri") != Some(&code.redirect_uri) {
        return Err(OAuthError::new(
            "invalid_grant",
            "redirect_uri differs from the authorization request's",
        ));
    }
    let Some(verifier) = form.get("code_verifier") else {
        return Err(OAuthError::new(
            "invalid_request",
            "code_verifier is missing",
        ));
    };
    // PKCE S256 (RFC 7636 §4.6): BASE64URL(SHA256(verifier)) must be the challenge.
    let derived = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    if derived != code.challenge {
        return Err(OAuthError::new(
            "invalid_grant",
            "The code_verifier does not match the code_challenge",
        ));
    }
    if form
        .get("resource")
        .is_some_and(|resource| *resource != shared.resource)
    {
        return Err(OAuthError::new(
            "invalid_target",
            format!("The resource must be {}", shared.resource),
        ));
    }
    let scopes = code.scopes.clone();
    let grant = state.grants.len();
    state.grants.push(Grant {
        client_id,
        scopes: scopes.clone(),
        revoked: false,
        current_refresh: None,
    });
    if let Some(code) = state.codes.get_mut(code_value) {
        code.used_for = Some(grant);
    }
    issue(state, grant, &scopes)
}

/// A new access token and a new refresh token for `grant` (the old refresh token, if any,
/// stops working: rotation).
fn issue(state: &mut State, grant: usize, scopes: &[String]) -> Result<Value, OAuthError> {
    let access = mint("at")?;
    let refresh = mint("rt")?;
    // Expired access tokens are refused anyway: forget them (bounded memory).
    let now = Instant::now();
    state
        .access_tokens
        .retain(|_, token| token.expires_at > now);
    state.access_tokens.insert(
        access.clone(),
        AccessToken {
            grant,
            expires_at: Instant::now() + ACCESS_TOKEN_LIFETIME,
            revoked: false,
        },
    );
    state.refresh_tokens.insert(refresh.clone(), grant);
    if let Some(grant) = state.grants.get_mut(grant) {
        grant.current_refresh = Some(refresh.clone());
    }
    Ok(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": ACCESS_TOKEN_LIFETIME.as_secs(),
        "refresh_token": refresh,
        "scope": scopes.join(" "),
    }))
}

fn refresh(
    shared: &Shared,
    state: &mut State,
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Result<Value, OAuthError> {
    let client_id = authenticate(state, headers, form)?;
    let Some(token) = form.get("refresh_token") else {
        return Err(OAuthError::new(
            "invalid_request",
            "refresh_token is missing",
        ));
    };
    let Some(&grant_id) = state.refresh_tokens.get(token) else {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token is not known (the demo forgets tokens when it restarts: connect again)",
        ));
    };
    let Some(grant) = state.grants.get(grant_id) else {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token is not known",
        ));
    };
    if grant.client_id != client_id {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token was issued to another client",
        ));
    }
    if grant.revoked {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token was revoked",
        ));
    }
    if grant.current_refresh.as_ref() != Some(token) {
        // A rotated-out refresh token used again: someone holds a copy, so the whole grant
        // goes (OAuth 2.1 §4.3.1).
        state.revoke_grant(grant_id);
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token was already used; the grant is revoked",
        ));
    }
    if form
        .get("resource")
        .is_some_and(|resource| *resource != shared.resource)
    {
        return Err(OAuthError::new(
            "invalid_target",
            "The resource differs from the grant's",
        ));
    }
    let scopes = match form.get("scope") {
        Some(asked) => {
            let asked: Vec<String> = asked.split(' ').map(str::to_owned).collect();
            if asked.iter().any(|scope| !grant.scopes.contains(scope)) {
                return Err(OAuthError::new(
                    "invalid_scope",
                    "The scope exceeds the grant's",
                ));
            }
            asked
        }
        None => grant.scopes.clone(),
    };
    issue(state, grant_id, &scopes)
}

/// `POST /revoke` (RFC 7009): a refresh token revokes its whole grant, an access token itself.
/// Unknown tokens and other clients' tokens are answered alike (§2.2).
async fn revoke(shared: Arc<Shared>, request: Request) -> Response {
    let (headers, form) = match read_form(request).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let mut state = shared.state();
    let client_id = match authenticate(&state, &headers, &form) {
        Ok(client_id) => client_id,
        Err(e) => return e.into_response(),
    };
    let Some(token) = form.get("token") else {
        return OAuthError::new("invalid_request", "token is missing").into_response();
    };
    let owned_by_client = |grant: usize, state: &State| {
        state
            .grants
            .get(grant)
            .is_some_and(|g| g.client_id == client_id)
    };
    let token_kind = if let Some(&grant) = state.refresh_tokens.get(token)
        && owned_by_client(grant, &state)
    {
        state.revoke_grant(grant);
        "refresh_token"
    } else if let Some(grant) = state.access_tokens.get(token).map(|a| a.grant)
        && owned_by_client(grant, &state)
    {
        if let Some(access) = state.access_tokens.get_mut(token) {
            access.revoked = true;
        }
        "access_token"
    } else {
        "unknown"
    };
    tracing::info!(client_id = %client_id, token_kind, "demo authorization server: token revoked");
    state.stats.revocations.push(Revocation {
        client_id,
        token_kind,
    });
    StatusCode::OK.into_response()
}
