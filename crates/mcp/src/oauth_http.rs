//! `rmcp`'s OAuth state machine makes its HTTP requests through this adapter, so discovery,
//! registration and token requests obey the outbound rules like every other request. It is
//! also where a catalog template's provider allowances bend the two discovery rules `rmcp`
//! enforces itself, for that provider only: a well-known URL that redirects to another host,
//! and metadata whose issuer is on another host.
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rmcp::transport::auth::{
    OAuthHttpClient, OAuthHttpClientFuture, OAuthHttpRedirectPolicy, OAuthHttpRequest,
};
use url::Url;

use crate::{Allowance, OutboundClient, OutboundRequest};

/// The outbound client as `rmcp`'s [`OAuthHttpClient`].
#[derive(Debug, Clone)]
pub struct GuardedOAuthHttp {
    outbound: OutboundClient,
    allowances: Arc<[Allowance]>,
    /// The issuer an authorization server really named, when the `IssuerOnAnotherHost`
    /// allowance accepted it.
    accepted_issuer: Arc<Mutex<Option<String>>>,
}

impl GuardedOAuthHttp {
    pub fn new(outbound: OutboundClient) -> Self {
        Self::with_allowances(outbound, &[])
    }

    pub fn with_allowances(outbound: OutboundClient, allowances: &[Allowance]) -> Self {
        GuardedOAuthHttp {
            outbound,
            allowances: allowances.into(),
            accepted_issuer: Arc::default(),
        }
    }

    /// The issuer accepted under the `IssuerOnAnotherHost` allowance, if one was.
    pub fn accepted_issuer(&self) -> Option<String> {
        self.accepted_issuer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn allows(&self, allowance: Allowance) -> bool {
        self.allowances.contains(&allowance)
    }
}

/// The issuer an authorization-server metadata URL stands for (RFC 8414 path insertion, and
/// the OpenID Connect forms), as `rmcp` derives it.
fn issuer_for_metadata_url(url: &Url) -> Option<String> {
    let path = url.path();
    let oauth = "/.well-known/oauth-authorization-server";
    let oidc = "/.well-known/openid-configuration";
    let suffix = if path == oauth || path == oidc {
        ""
    } else if let Some(rest) = path.strip_prefix(&format!("{oauth}/")) {
        rest
    } else if let Some(rest) = path.strip_prefix(&format!("{oidc}/")) {
        rest
    } else if let Some(rest) = path.strip_suffix(oidc) {
        rest.trim_start_matches('/')
    } else {
        return None;
    };
    let origin = url.origin().ascii_serialization();
    Some(if suffix.is_empty() {
        origin
    } else {
        format!("{origin}/{suffix}")
    })
}

impl OAuthHttpClient for GuardedOAuthHttp {
    fn execute(&self, request: OAuthHttpRequest) -> OAuthHttpClientFuture<'_> {
        Box::pin(async move {
            let OAuthHttpRequest {
                request,
                redirect_policy,
                ..
            } = request;
            let (parts, body) = request.into_parts();
            let url = Url::parse(&parts.uri.to_string())?;
            let well_known = url.path().contains("/.well-known/");
            let follow_redirects = match redirect_policy {
                OAuthHttpRedirectPolicy::Follow => true,
                // `rmcp` follows same-origin discovery redirects itself and refuses others;
                // Slack's well-known URL redirects to another host.
                _ => well_known && self.allows(Allowance::RedirectedWellKnown),
            };
            let response = self
                .outbound
                .send(OutboundRequest {
                    method: parts.method,
                    url: url.clone(),
                    headers: parts.headers,
                    body: (!body.is_empty()).then(|| Bytes::from(body)),
                    follow_redirects,
                })
                .await?;
            if response.url != url {
                tracing::info!(
                    allowance = "redirected_well_known",
                    from = %url.host_str().unwrap_or(""),
                    to = %response.url.host_str().unwrap_or(""),
                    "provider allowance applied: followed a redirected well-known URL"
                );
            }
            let mut body = response.body.to_vec();
            if response.status.is_success() && self.allows(Allowance::IssuerOnAnotherHost) {
                body = self.accept_issuer_on_another_host(&url, body);
            }
            let mut builder = http::Response::builder().status(response.status);
            for (name, value) in &response.headers {
                if name != http::header::CONTENT_LENGTH {
                    builder = builder.header(name, value);
                }
            }
            Ok(builder.body(body)?)
        })
    }
}

impl GuardedOAuthHttp {
    /// Atlassian's metadata names an issuer on another host than the one it is published on,
    /// which `rmcp` refuses. Under the allowance, the issuer is recorded as the one the
    /// authorization server will use (and its `iss` answers are checked against), and `rmcp`
    /// is shown the issuer it expects, so that it goes on with the rest of its checks.
    fn accept_issuer_on_another_host(&self, url: &Url, body: Vec<u8>) -> Vec<u8> {
        let Some(expected) = issuer_for_metadata_url(url) else {
            return body;
        };
        let Ok(mut metadata) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return body;
        };
        let Some(issuer) = metadata
            .get("issuer")
            .and_then(|i| i.as_str())
            .map(str::to_owned)
        else {
            return body;
        };
        let other_host = Url::parse(&issuer)
            .ok()
            .is_some_and(|parsed| parsed.host_str() != url.host_str());
        if !other_host {
            return body;
        }
        tracing::info!(
            allowance = "issuer_on_another_host",
            issuer = %issuer,
            published_at = %url.host_str().unwrap_or(""),
            "provider allowance applied: metadata issuer on another host"
        );
        *self
            .accepted_issuer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(issuer);
        metadata["issuer"] = serde_json::Value::String(expected);
        serde_json::to_vec(&metadata).unwrap_or(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls_stand_for_their_issuers() {
        let cases = [
            (
                "https://a.test/.well-known/oauth-authorization-server",
                "https://a.test",
            ),
            (
                "https://a.test/.well-known/oauth-authorization-server/login/oauth",
                "https://a.test/login/oauth",
            ),
            (
                "https://a.test:8443/.well-known/openid-configuration/tenant",
                "https://a.test:8443/tenant",
            ),
            (
                "https://a.test/tenant/.well-known/openid-configuration",
                "https://a.test/tenant",
            ),
        ];
        for (url, issuer) in cases {
            let url = Url::parse(url).expect("url");
            assert_eq!(
                issuer_for_metadata_url(&url).as_deref(),
                Some(issuer),
                "{url}"
            );
        }
        let other = Url::parse("https://a.test/.well-known/oauth-protected-resource").expect("url");
        assert_eq!(issuer_for_metadata_url(&other), None);
    }
}
