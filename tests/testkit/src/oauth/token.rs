//! Dynamic registration (RFC 7591), client authentication (RFC 6749 §2.3) and the token
//! endpoint (RFC 6749 §4.1.3, §6, §5.2; RFC 7636 §4.6; RFC 8707).
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    extract::Request,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};

use super::{
    ClientAuthMethod, FIRST_REGISTERED_CLIENT_ID, FIRST_REGISTERED_CLIENT_SECRET, Shared,
    TokenRequestSeen,
    authorization::parse_params,
    no_store, origin,
    state::{AccessToken, Client, Grant, State},
};

/// How long an authorization code can be exchanged.
pub const CODE_LIFETIME: Duration = Duration::from_secs(60);

const MAX_BODY: usize = 64 * 1024;

/// An RFC 6749 §5.2 error answer.
pub(crate) struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
}

impl OAuthError {
    pub(crate) fn new(code: &'static str, description: impl Into<String>) -> OAuthError {
        let status = if code == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        OAuthError {
            status,
            code,
            description: description.into(),
        }
    }

    pub(crate) fn into_response(self) -> Response {
        let mut response = no_store(
            self.status,
            json!({"error": self.code, "error_description": self.description}),
        );
        if self.status == StatusCode::UNAUTHORIZED
            && let Ok(value) = "Basic realm=\"fixture\"".parse()
        {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// `POST /register`.
pub(crate) async fn register(shared: Arc<Shared>, request: Request) -> Response {
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY)
        .await
        .unwrap_or_default();
    let asked: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let registration_error = |code: &str, description: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": code, "error_description": description})),
        )
            .into_response()
    };
    let Some(redirect_uris) = asked["redirect_uris"].as_array().and_then(|uris| {
        uris.iter()
            .map(|uri| uri.as_str().map(str::to_owned))
            .collect::<Option<Vec<String>>>()
    }) else {
        return registration_error("invalid_redirect_uri", "redirect_uris is required");
    };
    if redirect_uris.is_empty() || redirect_uris.iter().any(|u| url::Url::parse(u).is_err()) {
        return registration_error("invalid_redirect_uri", "redirect_uris must be URLs");
    }
    let config = &shared.config;
    let method = match asked["token_endpoint_auth_method"].as_str() {
        Some(name) if config.honour_requested_auth_method => match ClientAuthMethod::parse(name) {
            Some(method) => method,
            None => {
                return registration_error(
                    "invalid_client_metadata",
                    "token_endpoint_auth_method is not supported",
                );
            }
        },
        _ => config.registered_auth_method,
    };
    let mut state = shared.state();
    state.registrations += 1;
    let first = state.registrations == 1;
    let client_id = if first {
        FIRST_REGISTERED_CLIENT_ID.to_owned()
    } else {
        format!("fixture-client-{}", state.registrations)
    };
    let secret = match method {
        ClientAuthMethod::None => None,
        _ if first => {
            state.issued.push(FIRST_REGISTERED_CLIENT_SECRET.to_owned());
            Some(FIRST_REGISTERED_CLIENT_SECRET.to_owned())
        }
        _ => Some(state.mint("fxcs_")),
    };
    state.clients.insert(
        client_id.clone(),
        Client {
            secret: secret.clone(),
            method,
            redirect_uris: Some(redirect_uris.clone()),
        },
    );
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

/// What a request presented to authenticate its client.
pub(crate) struct Presented {
    pub(crate) method: ClientAuthMethod,
    pub(crate) client_id: Option<String>,
    secret: Option<String>,
    /// The request mixes methods (refused).
    mixed: Option<&'static str>,
}

impl Presented {
    /// Reads the Basic header and the body's `client_id` / `client_secret`.
    pub(crate) fn read(
        headers: &HeaderMap,
        form: &HashMap<String, String>,
        reject_client_id_beside_basic: bool,
    ) -> Result<Presented, OAuthError> {
        let basic = match headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        {
            Some(value) if value.len() > 6 && value[..6].eq_ignore_ascii_case("basic ") => {
                Some(basic_credentials(&value[6..]).ok_or_else(|| {
                    OAuthError::new("invalid_client", "The Basic credentials are malformed")
                })?)
            }
            _ => None,
        };
        let body_id = form.get("client_id").cloned();
        let body_secret = form.get("client_secret").cloned();
        match basic {
            Some((id, secret)) => {
                let mut mixed = None;
                if body_secret.is_some() || (reject_client_id_beside_basic && body_id.is_some()) {
                    mixed = Some("Client must not use multiple authentication methods");
                } else if body_id.as_ref().is_some_and(|body_id| *body_id != id) {
                    mixed = Some("client_id in the body differs from the Basic credentials");
                }
                Ok(Presented {
                    method: ClientAuthMethod::ClientSecretBasic,
                    client_id: Some(id),
                    secret: Some(secret),
                    mixed,
                })
            }
            None => Ok(Presented {
                method: if body_secret.is_some() {
                    ClientAuthMethod::ClientSecretPost
                } else {
                    ClientAuthMethod::None
                },
                client_id: body_id,
                secret: body_secret,
                mixed: None,
            }),
        }
    }

    /// Checks the presented credentials against the client's registered method: the client
    /// id. `lenient_public`: a confidential client may present only its id.
    pub(crate) fn authenticate(
        &self,
        state: &State,
        lenient_public: bool,
    ) -> Result<String, OAuthError> {
        if let Some(mixed) = self.mixed {
            return Err(OAuthError::new("invalid_request", mixed));
        }
        let Some(client_id) = &self.client_id else {
            return Err(OAuthError::new(
                "invalid_client",
                "No client authentication",
            ));
        };
        let Some(client) = state.clients.get(client_id) else {
            return Err(OAuthError::new("invalid_client", "The client is not known"));
        };
        let lenient = lenient_public && self.method == ClientAuthMethod::None;
        if self.method != client.method && !lenient {
            return Err(OAuthError::new(
                "invalid_client",
                format!(
                    "The client must authenticate with {} (it used {})",
                    client.method.as_str(),
                    self.method.as_str()
                ),
            ));
        }
        if self.method != ClientAuthMethod::None && self.secret != client.secret {
            return Err(OAuthError::new(
                "invalid_client",
                "The client secret is wrong",
            ));
        }
        Ok(client_id.clone())
    }
}

impl Presented {
    /// Checks the id and secret whatever the client's registered method (GitHub's REST API
    /// takes Basic from every client).
    pub(crate) fn authenticate_any_method(&self, state: &State) -> Result<String, OAuthError> {
        let Some(client_id) = &self.client_id else {
            return Err(OAuthError::new(
                "invalid_client",
                "No client authentication",
            ));
        };
        match state.clients.get(client_id) {
            Some(client) if client.secret.is_some() && client.secret == self.secret => {
                Ok(client_id.clone())
            }
            _ => Err(OAuthError::new("invalid_client", "Bad credentials")),
        }
    }
}

/// `base64(urlencode(id):urlencode(secret))` (RFC 6749 §2.3.1).
fn basic_credentials(encoded: &str) -> Option<(String, String)> {
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((form_unescape(id)?, form_unescape(secret)?))
}

/// Undoes `application/x-www-form-urlencoded` escaping (`+` and `%XX`).
fn form_unescape(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Removes a refresh request from the in-flight table however its handler ends.
struct InFlight<'a> {
    shared: &'a Shared,
    request: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        state.refreshes_in_flight.remove(&self.request);
        state.refresh_losers.remove(&self.request);
    }
}

/// `POST /token`.
pub(crate) async fn token(shared: Arc<Shared>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let form = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(body) => parse_params(&body),
        Err(_) => Err("the body is unreadable".to_owned()),
    };
    let presented = match &form {
        Ok(form) => Presented::read(
            &parts.headers,
            form,
            shared.config.reject_client_id_beside_basic,
        ),
        Err(_) => Err(OAuthError::new("invalid_request", "")),
    };
    let get = |name: &str| form.as_ref().ok().and_then(|f| f.get(name).cloned());
    let grant_type = get("grant_type");
    let request_number = {
        let mut state = shared.state();
        state
            .token_requests
            .push(grant_type.clone().unwrap_or_default());
        state.last_token = Some(TokenRequestSeen {
            grant_type: grant_type.clone(),
            resource: get("resource"),
            scope: get("scope"),
            client_auth: presented
                .as_ref()
                .map_or(ClientAuthMethod::None, |p| p.method),
            client_id: presented.as_ref().ok().and_then(|p| p.client_id.clone()),
        });
        state.next_request += 1;
        let number = state.next_request;
        if grant_type.as_deref() == Some("refresh_token")
            && let Some(grant) =
                get("refresh_token").and_then(|token| state.refresh_tokens.get(&token).copied())
        {
            state.refreshes_in_flight.insert(number, grant);
        }
        number
    };
    let _in_flight = InFlight {
        shared: &shared,
        request: request_number,
    };
    let gate = shared.gate().clone();
    if let Some(gate) = gate {
        gate.pass().await;
    }
    let form = match form {
        Ok(form) => form,
        Err(e) => return OAuthError::new("invalid_request", e).into_response(),
    };
    let presented = match presented {
        Ok(presented) => presented,
        Err(e) => return e.into_response(),
    };
    let expected_resource = format!("{}/mcp", origin(&parts.headers));
    let answer = match grant_type.as_deref() {
        Some("authorization_code") => exchange_code(&shared, &form, &presented, &expected_resource),
        Some("refresh_token") => refresh(&shared, &form, &presented, request_number),
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
    form: &HashMap<String, String>,
    presented: &Presented,
    expected_resource: &str,
) -> Result<Value, OAuthError> {
    let config = &shared.config;
    let mut state = shared.state();
    let client_id = presented.authenticate(&state, false)?;
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
    if code.redirect_uri.is_some() && form.get("redirect_uri") != code.redirect_uri.as_ref() {
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
    let derived = if code.challenge_method == "S256" {
        URL_SAFE_NO_PAD.encode(ring::digest::digest(
            &ring::digest::SHA256,
            verifier.as_bytes(),
        ))
    } else {
        verifier.clone()
    };
    if derived != code.challenge {
        return Err(OAuthError::new(
            "invalid_grant",
            "The code_verifier does not match the code_challenge",
        ));
    }
    let resource = form.get("resource").cloned();
    match &resource {
        Some(resource) if *resource != expected_resource => {
            return Err(OAuthError::new(
                "invalid_target",
                format!("The resource must be {expected_resource}"),
            ));
        }
        Some(resource) if code.resource.as_ref().is_some_and(|r| r != resource) => {
            return Err(OAuthError::new(
                "invalid_target",
                "The resource differs from the authorization request's",
            ));
        }
        None if config.require_resource => {
            return Err(OAuthError::new(
                "invalid_target",
                format!("The resource parameter is required: {expected_resource}"),
            ));
        }
        _ => {}
    }
    let grant = Grant {
        client_id,
        user: code.user.clone(),
        scopes: code.scopes.clone(),
        resource: resource.or_else(|| code.resource.clone()),
        revoked: false,
        current_refresh: None,
        previous_refresh: None,
    };
    let grant_id = state.grants.len();
    state.grants.push(grant);
    if let Some(code) = state.codes.get_mut(code_value) {
        code.used_for = Some(grant_id);
    }
    let scopes = state.grants[grant_id].scopes.clone();
    let refresh = state.mint("fxrt_");
    state.refresh_tokens.insert(refresh.clone(), grant_id);
    state.grants[grant_id].current_refresh = Some(refresh.clone());
    Ok(issue_access(
        config,
        &mut state,
        grant_id,
        scopes,
        Some(refresh),
    ))
}

fn refresh(
    shared: &Shared,
    form: &HashMap<String, String>,
    presented: &Presented,
    request_number: u64,
) -> Result<Value, OAuthError> {
    let config = &shared.config;
    let mut state = shared.state();
    let client_id = presented.authenticate(&state, !config.refresh_needs_client_secret)?;
    let Some(token) = form.get("refresh_token") else {
        return Err(OAuthError::new(
            "invalid_request",
            "refresh_token is missing",
        ));
    };
    let Some(&grant_id) = state.refresh_tokens.get(token) else {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token is not known",
        ));
    };
    let grant = &state.grants[grant_id];
    if grant.client_id != client_id {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token was issued to another client",
        ));
    }
    let two_live = config.two_live_refresh_tokens;
    let live = grant.current_refresh.as_ref() == Some(token)
        || (two_live && grant.previous_refresh.as_ref() == Some(token));
    if grant.revoked || !live {
        return Err(OAuthError::new(
            "invalid_grant",
            "The refresh token was already used or revoked",
        ));
    }
    if two_live && state.refresh_losers.contains(&request_number) {
        return Err(OAuthError::new(
            "invalid_grant",
            "A concurrent refresh of this grant won",
        ));
    }
    if let Some(resource) = form.get("resource")
        && grant.resource.as_ref().is_some_and(|r| r != resource)
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
    let new_refresh = if two_live || config.rotate_refresh_tokens {
        let new_refresh = state.mint("fxrt_");
        state.refresh_tokens.insert(new_refresh.clone(), grant_id);
        let grant = &mut state.grants[grant_id];
        grant.previous_refresh = two_live.then(|| token.clone());
        grant.current_refresh = Some(new_refresh.clone());
        Some(new_refresh)
    } else {
        None
    };
    if two_live {
        let losers: Vec<u64> = state
            .refreshes_in_flight
            .iter()
            .filter(|(number, grant)| **grant == grant_id && **number != request_number)
            .map(|(number, _)| *number)
            .collect();
        state.refresh_losers.extend(losers);
    }
    Ok(issue_access(
        config,
        &mut state,
        grant_id,
        scopes,
        new_refresh,
    ))
}

fn issue_access(
    config: &super::OAuthFixture,
    state: &mut State,
    grant: usize,
    scopes: Vec<String>,
    refresh: Option<String>,
) -> Value {
    let access = state.mint("fxat_");
    let scope = scopes.join(" ");
    state.access_tokens.insert(
        access.clone(),
        AccessToken {
            grant,
            scopes,
            expires_at: Instant::now() + config.access_token_lifetime,
            dead: false,
        },
    );
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": config.access_token_lifetime.as_secs(),
        "scope": scope,
    });
    if let Some(refresh) = refresh {
        body["refresh_token"] = json!(refresh);
    }
    body
}
