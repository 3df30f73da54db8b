//! The authorization endpoint (RFC 6749 §4.1.1, RFC 7636, RFC 8707, RFC 9207): no user
//! interaction (or a consent page with Allow and Deny), a 302 back to the client.
use std::{collections::HashMap, sync::Arc, time::Instant};

use axum::{
    extract::{RawQuery, Request},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
};
use url::Url;

use super::{
    AuthorizationRequestSeen, DEFAULT_USER, READ_SCOPE, Shared, WRITE_SCOPE, origin, state::Code,
};

/// The scopes the fixture knows.
pub(crate) const SUPPORTED_SCOPES: [&str; 2] = [READ_SCOPE, WRITE_SCOPE];

/// Form or query parameters; a repeated parameter is an error (RFC 6749 §3.1).
pub(crate) fn parse_params(raw: &[u8]) -> Result<HashMap<String, String>, String> {
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

/// The granted scopes: those asked for that the fixture knows; `issues:read` when none is left.
pub(crate) fn granted_scopes(asked: Option<&str>) -> Vec<String> {
    let granted: Vec<String> = SUPPORTED_SCOPES
        .iter()
        .filter(|scope| asked.is_some_and(|asked| asked.split(' ').any(|a| a == **scope)))
        .map(|scope| (*scope).to_owned())
        .collect();
    if granted.is_empty() {
        vec![READ_SCOPE.to_owned()]
    } else {
        granted
    }
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("The authorization request is refused: {message}\n"),
    )
        .into_response()
}

/// `GET /authorize`.
pub(crate) async fn authorize(
    shared: Arc<Shared>,
    headers: HeaderMap,
    query: RawQuery,
) -> Response {
    let raw = query.0.unwrap_or_default();
    handle(&shared, &headers, &raw, Consent::Ask)
}

/// `POST /authorize/decision` from the consent page: `request` (the authorization request's
/// query) and `decision` (`allow` or `deny`).
pub(crate) async fn decision(
    shared: Arc<Shared>,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let Ok(body) = axum::body::to_bytes(request.into_body(), 64 * 1024).await else {
        return bad_request("the form is unreadable");
    };
    let form = match parse_params(&body) {
        Ok(form) => form,
        Err(e) => return bad_request(&e),
    };
    let Some(raw) = form.get("request") else {
        return bad_request("the form names no request");
    };
    let consent = if form.get("decision").map(String::as_str) == Some("allow") {
        Consent::Given
    } else {
        Consent::Refused
    };
    handle(&shared, &headers, raw, consent)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Consent {
    /// Consent now (or show the consent page when the fixture has one).
    Ask,
    Given,
    Refused,
}

fn handle(shared: &Shared, headers: &HeaderMap, raw: &str, consent: Consent) -> Response {
    let config = &shared.config;
    let params = parse_params(raw.as_bytes());
    let get = |name: &str| -> Option<String> {
        params
            .as_ref()
            .ok()
            .and_then(|params| params.get(name).cloned())
    };
    let user = get("fixture_user").unwrap_or_else(|| DEFAULT_USER.to_owned());
    let seen = AuthorizationRequestSeen {
        response_type: get("response_type"),
        client_id: get("client_id"),
        redirect_uri: get("redirect_uri"),
        state: get("state"),
        scope: get("scope"),
        resource: get("resource"),
        code_challenge: get("code_challenge"),
        code_challenge_method: get("code_challenge_method"),
        user: user.clone(),
    };
    {
        let mut state = shared.state();
        state.authorization_requests += 1;
        state.last_authorization = Some(seen.clone());
    }
    if let Err(e) = params {
        return bad_request(&e);
    }

    // Errors about the client or its redirect URI are shown, never redirected (§4.1.2.1).
    let Some(client_id) = seen.client_id.clone() else {
        return bad_request("client_id is missing");
    };
    let redirect_uri = {
        let state = shared.state();
        let Some(client) = state.clients.get(&client_id) else {
            return bad_request("the client is not known");
        };
        match (&client.redirect_uris, &seen.redirect_uri) {
            (Some(registered), Some(given)) if registered.contains(given) => given.clone(),
            (Some(registered), None) if registered.len() == 1 => registered[0].clone(),
            (None, Some(given)) => given.clone(),
            (_, Some(_)) => return bad_request("redirect_uri is not registered for the client"),
            (_, None) => return bad_request("redirect_uri is missing"),
        }
    };
    let Ok(redirect) = Url::parse(&redirect_uri) else {
        return bad_request("redirect_uri is not a URL");
    };
    let origin = origin(headers);
    let iss = config.send_iss.then(|| {
        config
            .callback_iss_override
            .clone()
            .unwrap_or_else(|| config.issuer(&origin))
    });
    let answer = |pairs: &[(&str, &str)]| -> Response {
        let mut target = redirect.clone();
        {
            let mut query = target.query_pairs_mut();
            for (name, value) in pairs {
                query.append_pair(name, value);
            }
            if let Some(state) = &seen.state {
                query.append_pair("state", state);
            }
            if let Some(iss) = &iss {
                query.append_pair("iss", iss);
            }
        }
        (StatusCode::FOUND, [(header::LOCATION, target.to_string())]).into_response()
    };
    let error = |code: &str, description: &str| {
        answer(&[("error", code), ("error_description", description)])
    };

    if seen.response_type.as_deref() != Some("code") {
        return error(
            "unsupported_response_type",
            "Only response_type=code is supported",
        );
    }
    let Some(challenge) = seen.code_challenge.clone() else {
        return error("invalid_request", "code_challenge is required (PKCE)");
    };
    let method = seen
        .code_challenge_method
        .clone()
        .unwrap_or_else(|| "plain".to_owned());
    let method_ok = if config.pkce_s256 {
        method == "S256"
    } else {
        method == "plain" || method == "S256"
    };
    if !method_ok {
        return error(
            "invalid_request",
            "code_challenge_method must be S256 (transform algorithm not supported)",
        );
    }
    let expected_resource = format!("{origin}/mcp");
    match &seen.resource {
        Some(resource) if *resource != expected_resource => {
            return error(
                "invalid_target",
                &format!("The resource must be {expected_resource}"),
            );
        }
        None if config.require_resource => {
            return error(
                "invalid_target",
                &format!("The resource parameter is required: {expected_resource}"),
            );
        }
        _ => {}
    }
    if config.deny_authorization || consent == Consent::Refused {
        return error("access_denied", "The user denied the request");
    }
    if config.consent_page && consent == Consent::Ask {
        return consent_page(&client_id, &user, raw);
    }
    let scopes = granted_scopes(seen.scope.as_deref());
    let code = {
        let mut state = shared.state();
        let code = state.mint("fxcode_");
        state.codes.insert(
            code.clone(),
            Code {
                client_id,
                redirect_uri: seen.redirect_uri.clone(),
                challenge,
                challenge_method: method,
                resource: seen.resource.clone(),
                scopes,
                user,
                issued_at: Instant::now(),
                used_for: None,
            },
        );
        code
    };
    answer(&[("code", &code)])
}

fn consent_page(client_id: &str, user: &str, raw: &str) -> Response {
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    Html(format!(
        "<!doctype html>\n<html><head><title>Authorize</title></head><body>\n\
         <p>Allow {client} to use the issue tracker as {user}?</p>\n\
         <form method=\"post\" action=\"/authorize/decision\">\n\
         <input type=\"hidden\" name=\"request\" value=\"{request}\">\n\
         <button type=\"submit\" name=\"decision\" value=\"allow\">Allow</button>\n\
         <button type=\"submit\" name=\"decision\" value=\"deny\">Deny</button>\n\
         </form></body></html>\n",
        client = escape(client_id),
        user = escape(user),
        request = escape(raw),
    ))
    .into_response()
}
