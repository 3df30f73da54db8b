//! OAuth discovery against fixture servers over real TLS on loopback: each scenario of the
//! MCP specification, and each way a server can be refused. Hosts on private addresses come
//! from the resolver seam and are refused before any connection (and the loopback-only safety
//! net is on).
use std::{net::IpAddr, sync::Arc, time::Duration};

use mcp::{
    DiscoveryError, OutboundClient, OutboundPolicy, RegistrationPlan, StaticResolver, discover,
};
use testkit::OAuthFixture;
use url::Url;

struct Setup {
    _server: testkit::FixtureServer,
    client: OutboundClient,
    url: Url,
}

async fn setup(fixture: OAuthFixture) -> Setup {
    let ca = testkit::TestCa::new();
    let cert = ca.issue(&["fixture.test", "alt.fixture.test"]);
    let server = testkit::serve_https(fixture.router(), &cert).await;
    let loopback: IpAddr = "127.0.0.1".parse().expect("address");
    let private: IpAddr = "10.11.12.13".parse().expect("address");
    let resolver = StaticResolver::new()
        .with("fixture.test", &[loopback])
        .with("alt.fixture.test", &[loopback])
        .with("private.test", &[private]);
    let client = OutboundClient::new(
        OutboundPolicy {
            allow_loopback: true,
            extra_ca_pem: vec![ca.cert_pem().to_owned()],
            request_timeout: Duration::from_secs(5),
            loopback_only_safety_net: true,
            ..OutboundPolicy::default()
        },
        Arc::new(resolver),
    )
    .expect("client");
    let url = Url::parse(&format!("{}/mcp", server.https_url("fixture.test"))).expect("url");
    Setup {
        _server: server,
        client,
        url,
    }
}

async fn discovered(
    fixture: OAuthFixture,
    preconfigured: bool,
) -> Result<mcp::Discovered, DiscoveryError> {
    let setup = setup(fixture).await;
    discover(&setup.client, &setup.url, preconfigured, &[])
        .await
        .map(|(found, _)| found)
}

fn origin_of(found: &mcp::Discovered) -> String {
    let url = Url::parse(&found.resource).expect("resource");
    format!(
        "https://{}:{}",
        url.host_str().expect("host"),
        url.port().expect("port")
    )
}

#[tokio::test]
async fn a_server_following_the_specification_with_dynamic_registration() {
    let found = discovered(OAuthFixture::default(), false)
        .await
        .expect("discovered");
    let origin = origin_of(&found);
    assert_eq!(found.registration, RegistrationPlan::DynamicRegistration);
    assert!(found.via_protected_resource_metadata);
    assert_eq!(found.issuer, origin);
    assert_eq!(found.token_endpoint, format!("{origin}/token"));
    assert_eq!(
        found.registration_endpoint,
        Some(format!("{origin}/register"))
    );
    assert_eq!(found.revocation_endpoint, Some(format!("{origin}/revoke")));
    assert_eq!(found.scopes, ["issues:read"], "the challenge's scope first");
    assert_eq!(found.resource, format!("{origin}/mcp"));
}

#[tokio::test]
async fn registration_modes_follow_the_specification_order() {
    let cimd = OAuthFixture {
        client_id_metadata_document: true,
        ..OAuthFixture::default()
    };
    assert_eq!(
        discovered(cimd.clone(), false)
            .await
            .expect("ok")
            .registration,
        RegistrationPlan::ClientMetadataDocument
    );
    assert_eq!(
        discovered(cimd, true).await.expect("ok").registration,
        RegistrationPlan::Preconfigured,
        "pre-registered wins"
    );
    let manual = OAuthFixture {
        dynamic_registration: false,
        ..OAuthFixture::default()
    };
    let found = discovered(manual, false).await.expect("ok");
    assert_eq!(
        found.registration,
        RegistrationPlan::ManualCredentialsRequired
    );
    assert_eq!(found.registration_endpoint, None);
}

#[tokio::test]
async fn issuers_with_a_path_and_openid_connect_only_metadata_are_found() {
    let path = OAuthFixture {
        issuer_path: "/login/oauth",
        ..OAuthFixture::default()
    };
    let found = discovered(path, false).await.expect("path issuer");
    assert_eq!(found.issuer, format!("{}/login/oauth", origin_of(&found)));
    let oidc = OAuthFixture {
        openid_connect_only: true,
        issuer_path: "/tenant",
        ..OAuthFixture::default()
    };
    let found = discovered(oidc, false).await.expect("OIDC-only issuer");
    assert_eq!(found.issuer, format!("{}/tenant", origin_of(&found)));
}

#[tokio::test]
async fn an_older_server_without_protected_resource_metadata_works_through_the_root() {
    let older = OAuthFixture {
        protected_resource_metadata: false,
        ..OAuthFixture::default()
    };
    let found = discovered(older, false).await.expect("root fallback");
    assert!(!found.via_protected_resource_metadata);
    assert_eq!(found.issuer, origin_of(&found));
}

#[tokio::test]
async fn servers_that_break_the_rules_are_refused_with_their_own_code() {
    let cases = [
        (
            OAuthFixture {
                wrong_issuer: true,
                ..OAuthFixture::default()
            },
            "issuer_mismatch",
        ),
        (
            OAuthFixture {
                pkce_s256: false,
                ..OAuthFixture::default()
            },
            "pkce_s256_unsupported",
        ),
        (
            OAuthFixture {
                http_token_endpoint: true,
                ..OAuthFixture::default()
            },
            "endpoint_not_https",
        ),
        (
            OAuthFixture {
                requires_oauth: false,
                ..OAuthFixture::default()
            },
            "server_not_oauth",
        ),
        (
            OAuthFixture {
                redirect_mcp_to: Some("https://private.test/mcp"),
                ..OAuthFixture::default()
            },
            "address_refused",
        ),
    ];
    for (fixture, code) in cases {
        let what = format!("{fixture:?}");
        let error = discovered(fixture, false).await.expect_err(&what);
        assert_eq!(error.code(), code, "{what}: {error}");
    }
}

#[tokio::test]
async fn a_host_on_a_private_address_is_refused_before_any_connection() {
    let setup = setup(OAuthFixture::default()).await;
    let url = Url::parse("https://private.test/mcp").expect("url");
    let error = discover(&setup.client, &url, false, &[])
        .await
        .map(|(found, _)| found)
        .expect_err("refused");
    assert_eq!(error.code(), "address_refused", "{error}");
}
