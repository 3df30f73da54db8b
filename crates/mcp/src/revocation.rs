//! Revoking a user's tokens at the provider when they disconnect: RFC 7009 through the
//! `oauth2` crate (by hand for a plain-HTTP endpoint the guard admits, which `oauth2` refuses) where the authorization server publishes a revocation endpoint, and the
//! provider's own way where its profile says so (GitHub's REST API, Slack's `auth.revoke`).
//! Every request goes through the outbound guard.
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use oauth2::{
    AccessToken, AuthType, ClientId, ClientSecret, RefreshToken, RevocationUrl,
    StandardRevocableToken, basic::BasicClient,
};
use url::Url;

use crate::{OutboundClient, OutboundError, OutboundRequest};

/// How a provider revokes tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationMethod {
    /// RFC 7009 at the authorization server's `revocation_endpoint`.
    Rfc7009 { endpoint: Url },
    /// GitHub: `DELETE <api>/applications/{client_id}/token` with the client's Basic
    /// credentials and the access token in a JSON body (revokes the grant's token).
    GitHubApi { api_base: Url },
    /// Slack: `auth.revoke` called with the token itself.
    SlackAuthRevoke { url: Url },
    /// The provider offers no way; the user revokes in the provider's settings.
    Unsupported,
}

/// The OAuth client the tokens were issued to, and how it authenticates at the token and
/// revocation endpoints.
#[derive(Debug, Clone)]
pub struct ClientAuthentication {
    pub client_id: String,
    pub client_secret: Option<String>,
    /// `none`, `client_secret_basic` or `client_secret_post` (RFC 7591).
    pub method: String,
}

/// The tokens to revoke.
#[derive(Debug)]
pub struct TokensToRevoke<'a> {
    pub access_token: Option<&'a str>,
    pub refresh_token: Option<&'a str>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RevocationError {
    #[error("the provider has no way to revoke tokens")]
    Unsupported,
    #[error(transparent)]
    Outbound(#[from] OutboundError),
    #[error("the provider refused the revocation: {reason}")]
    Refused { reason: String },
}

/// Revokes `tokens` (the refresh token first: at most servers that ends the whole grant).
pub async fn revoke_tokens(
    outbound: &OutboundClient,
    method: &RevocationMethod,
    client: &ClientAuthentication,
    tokens: TokensToRevoke<'_>,
) -> Result<(), RevocationError> {
    match method {
        RevocationMethod::Rfc7009 { endpoint } if endpoint.scheme() == "http" => {
            revoke_rfc7009_by_hand(outbound, endpoint, client, tokens).await
        }
        RevocationMethod::Rfc7009 { endpoint } => {
            let mut oauth = BasicClient::new(ClientId::new(client.client_id.clone()))
                .set_revocation_url(RevocationUrl::from_url(endpoint.clone()));
            if let Some(secret) = &client.client_secret {
                oauth = oauth.set_client_secret(ClientSecret::new(secret.clone()));
            }
            if client.method == "client_secret_post" || client.method == "none" {
                oauth = oauth.set_auth_type(AuthType::RequestBody);
            }
            let http = Oauth2Http(outbound);
            let mut tally = Tally::default();
            let refresh = tokens
                .refresh_token
                .map(|t| StandardRevocableToken::RefreshToken(RefreshToken::new(t.to_owned())));
            let access = tokens
                .access_token
                .map(|t| StandardRevocableToken::AccessToken(AccessToken::new(t.to_owned())));
            for token in refresh.into_iter().chain(access) {
                let outcome =
                    match oauth.revoke_token(token) {
                        Ok(request) => request.request_async(&http).await.map_err(|e| {
                            RevocationError::Refused {
                                reason: describe_oauth2_error(&e),
                            }
                        }),
                        Err(e) => Err(RevocationError::Refused {
                            reason: e.to_string(),
                        }),
                    };
                tally.record(outcome);
            }
            tally.answer()
        }
        RevocationMethod::GitHubApi { api_base } => {
            let Some(access_token) = tokens.access_token else {
                return Err(RevocationError::Refused {
                    reason: "GitHub revokes by access token, and there is none".to_owned(),
                });
            };
            let secret = client.client_secret.as_deref().unwrap_or("");
            // `<base>applications/{client_id}/token`, the client id percent-encoded by `url`.
            let mut url = api_base.clone();
            url.path_segments_mut()
                .map_err(|()| RevocationError::Refused {
                    reason: "the GitHub API base cannot have a path".to_owned(),
                })?
                .pop_if_empty()
                .extend(["applications", client.client_id.as_str(), "token"]);
            let mut headers = HeaderMap::new();
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{secret}", client.client_id));
            headers.insert(
                header::AUTHORIZATION,
                header_value(&format!("Basic {basic}"))?,
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static("application/vnd.github+json"),
            );
            let body = serde_json::json!({ "access_token": access_token }).to_string();
            let response = outbound
                .send(OutboundRequest {
                    method: Method::DELETE,
                    url,
                    headers,
                    body: Some(Bytes::from(body)),
                    follow_redirects: false,
                })
                .await?;
            // 204: revoked. GitHub answers 404 both for a token already gone and for app
            // credentials it does not accept: not a confirmation that the token is dead.
            match response.status.as_u16() {
                204 | 200 => Ok(()),
                404 => Err(RevocationError::Refused {
                    reason: "GitHub answered HTTP 404: the token was revoked already, or the \
                             app's client id and secret are not accepted"
                        .to_owned(),
                }),
                status => Err(RevocationError::Refused {
                    reason: format!("GitHub answered HTTP {status}"),
                }),
            }
        }
        RevocationMethod::SlackAuthRevoke { url } => {
            let Some(token) = tokens.access_token else {
                return Err(RevocationError::Refused {
                    reason: "Slack revokes by access token, and there is none".to_owned(),
                });
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                header_value(&format!("Bearer {token}"))?,
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
            let response = outbound
                .send(OutboundRequest {
                    method: Method::POST,
                    url: url.clone(),
                    headers,
                    body: Some(Bytes::new()),
                    follow_redirects: false,
                })
                .await?;
            let answer: serde_json::Value =
                serde_json::from_slice(&response.body).unwrap_or_default();
            // Slack answers 200 with `ok`; `invalid_auth`/`token_revoked` mean it is gone.
            let ok = answer["ok"].as_bool() == Some(true)
                || matches!(
                    answer["error"].as_str(),
                    Some("token_revoked" | "invalid_auth" | "account_inactive")
                );
            if response.status.is_success() && ok {
                Ok(())
            } else {
                Err(RevocationError::Refused {
                    reason: format!(
                        "Slack answered HTTP {} ({})",
                        response.status.as_u16(),
                        answer["error"].as_str().unwrap_or("no error code")
                    ),
                })
            }
        }
        RevocationMethod::Unsupported => Err(RevocationError::Unsupported),
    }
}

/// RFC 7009 sent by hand to a plain-HTTP endpoint: `oauth2` refuses every revocation URL that
/// is not https, but the outbound guard already decided that this one may be used (loopback in
/// development with `outbound.allow_loopback`, or the exact address of a demo server). The
/// refresh token first, then the access token; the client authenticates as it registered.
async fn revoke_rfc7009_by_hand(
    outbound: &OutboundClient,
    endpoint: &Url,
    client: &ClientAuthentication,
    tokens: TokensToRevoke<'_>,
) -> Result<(), RevocationError> {
    let to_revoke = [
        (tokens.refresh_token, "refresh_token"),
        (tokens.access_token, "access_token"),
    ];
    let mut tally = Tally::default();
    for (token, hint) in to_revoke {
        let Some(token) = token else { continue };
        tally.record(revoke_one_by_hand(outbound, endpoint, client, token, hint).await);
    }
    tally.answer()
}

async fn revoke_one_by_hand(
    outbound: &OutboundClient,
    endpoint: &Url,
    client: &ClientAuthentication,
    token: &str,
    hint: &str,
) -> Result<(), RevocationError> {
    let (headers, body) = rfc7009_request(client, token, hint)?;
    let response = outbound
        .send(OutboundRequest {
            method: Method::POST,
            url: endpoint.clone(),
            headers,
            body: Some(Bytes::from(body)),
            follow_redirects: false,
        })
        .await?;
    if response.status.is_success() {
        return Ok(());
    }
    let answer: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
    Err(RevocationError::Refused {
        reason: format!(
            "HTTP {} ({})",
            response.status.as_u16(),
            answer["error"].as_str().unwrap_or("no error code")
        ),
    })
}

/// The headers and form body of one RFC 7009 request (built apart from the async code: the
/// form serializer is not `Send`).
fn rfc7009_request(
    client: &ClientAuthentication,
    token: &str,
    hint: &str,
) -> Result<(HeaderMap, String), RevocationError> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token)
        .append_pair("token_type_hint", hint);
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    match (client.method.as_str(), &client.client_secret) {
        ("client_secret_basic", Some(secret)) => {
            // RFC 6749 §2.3.1: each part form-encoded before the Basic encoding.
            let encode = |text: &str| {
                url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
            };
            let basic = base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                encode(&client.client_id),
                encode(secret)
            ));
            headers.insert(
                header::AUTHORIZATION,
                header_value(&format!("Basic {basic}"))?,
            );
        }
        (method, secret) => {
            form.append_pair("client_id", &client.client_id);
            if let (Some(secret), true) = (secret, method == "client_secret_post") {
                form.append_pair("client_secret", secret);
            }
        }
    }
    Ok((headers, form.finish()))
}

fn header_value(text: &str) -> Result<HeaderValue, RevocationError> {
    HeaderValue::from_str(text).map_err(|_| RevocationError::Refused {
        reason: "a credential cannot be sent in an HTTP header".to_owned(),
    })
}

/// The outbound client as `oauth2`'s HTTP client. A type rather than a closure: its future
/// is `Send` for every lifetime, which a closure's is not proven to be.
struct Oauth2Http<'a>(&'a OutboundClient);

impl<'c> oauth2::AsyncHttpClient<'c> for Oauth2Http<'_> {
    type Error = OutboundError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, OutboundError>>
                + Send
                + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send_oauth2(self.0, request))
    }
}

/// Sends an `oauth2` request through the outbound guard.
async fn send_oauth2(
    outbound: &OutboundClient,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, OutboundError> {
    let (parts, body) = request.into_parts();
    let url = Url::parse(&parts.uri.to_string()).map_err(|_| OutboundError::NoHost)?;
    let response = outbound
        .send(OutboundRequest {
            method: parts.method,
            url,
            headers: parts.headers,
            body: Some(Bytes::from(body)),
            follow_redirects: false,
        })
        .await?;
    let mut answer = http::Response::new(response.body.to_vec());
    *answer.status_mut() = response.status;
    *answer.headers_mut() = response.headers;
    Ok(answer)
}

fn describe_oauth2_error<E: std::error::Error>(
    error: &oauth2::RequestTokenError<E, oauth2::basic::BasicRevocationErrorResponse>,
) -> String {
    match error {
        oauth2::RequestTokenError::ServerResponse(response) => {
            format!("the authorization server answered {}", response.error())
        }
        oauth2::RequestTokenError::Request(e) => e.to_string(),
        oauth2::RequestTokenError::Parse(_, _) => {
            "the authorization server's answer could not be read".to_owned()
        }
        oauth2::RequestTokenError::Other(reason) => reason.chars().take(200).collect(),
    }
}

/// The revocations of one disconnect: every token is tried even when one is refused (a
/// refused refresh token must not leave the access token unrevoked); the first refusal is the
/// answer, and a revocation that had no token to send revoked nothing (refused, so the
/// caller says so).
#[derive(Default)]
struct Tally {
    revoked_any: bool,
    refused: Option<RevocationError>,
}

impl Tally {
    fn record(&mut self, outcome: Result<(), RevocationError>) {
        match outcome {
            Ok(()) => self.revoked_any = true,
            Err(error) => {
                self.refused.get_or_insert(error);
            }
        }
    }

    fn answer(self) -> Result<(), RevocationError> {
        match (self.refused, self.revoked_any) {
            (Some(error), _) => Err(error),
            (None, true) => Ok(()),
            (None, false) => Err(RevocationError::Refused {
                reason: "there was no token to revoke".to_owned(),
            }),
        }
    }
}
