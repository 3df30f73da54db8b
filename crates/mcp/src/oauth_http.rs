//! `rmcp`'s OAuth state machine makes its HTTP requests through this adapter, so discovery,
//! registration and token requests obey the outbound rules like every other request.
use bytes::Bytes;
use rmcp::transport::auth::{
    OAuthHttpClient, OAuthHttpClientFuture, OAuthHttpRedirectPolicy, OAuthHttpRequest,
};
use url::Url;

use crate::{OutboundClient, OutboundRequest};

/// The outbound client as `rmcp`'s [`OAuthHttpClient`].
#[derive(Debug, Clone)]
pub struct GuardedOAuthHttp(pub OutboundClient);

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
            let response = self
                .0
                .send(OutboundRequest {
                    method: parts.method,
                    url,
                    headers: parts.headers,
                    body: (!body.is_empty()).then(|| Bytes::from(body)),
                    follow_redirects: matches!(redirect_policy, OAuthHttpRedirectPolicy::Follow),
                })
                .await?;
            let mut builder = http::Response::builder().status(response.status);
            for (name, value) in &response.headers {
                builder = builder.header(name, value);
            }
            Ok(builder.body(response.body.to_vec())?)
        })
    }
}
