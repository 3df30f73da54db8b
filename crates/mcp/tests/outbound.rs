//! The outbound guard over real TLS on loopback. Private, link-local and unique-local
//! addresses come from a test resolver (the seam), and the guard refuses them before any
//! connection; every client here also has the loopback-only safety net on, so nothing can
//! ever leave the machine even if a rule regressed.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    http::{StatusCode, header},
    response::{IntoResponse, Redirect},
    routing::get,
};
use mcp::{AddressClass, OutboundClient, OutboundError, OutboundPolicy, OutboundRequest, Resolver};
use url::Url;

/// Host names → addresses, and how often each was asked for.
#[derive(Debug, Default)]
struct TestResolver {
    names: HashMap<&'static str, Vec<IpAddr>>,
    lookups: Mutex<HashMap<String, usize>>,
    /// After the first lookup of this name, answer with these addresses instead (DNS
    /// rebinding).
    rebind: Option<(&'static str, Vec<IpAddr>)>,
}

impl TestResolver {
    fn standard() -> Self {
        let ip = |text: &str| text.parse::<IpAddr>().expect("address");
        let mut names = HashMap::new();
        names.insert("fixture.test", vec![ip("127.0.0.1")]);
        names.insert("private.test", vec![ip("10.20.30.40")]);
        names.insert("metadata.test", vec![ip("169.254.169.254")]);
        names.insert("mapped.test", vec![ip("::ffff:192.168.1.10")]);
        names.insert("ula.test", vec![ip("fd12:3456::1")]);
        names.insert("mixed.test", vec![ip("127.0.0.1"), ip("10.0.0.7")]);
        TestResolver {
            names,
            ..TestResolver::default()
        }
    }

    fn lookups(&self, name: &str) -> usize {
        self.lookups
            .lock()
            .expect("lock")
            .get(name)
            .copied()
            .unwrap_or(0)
    }
}

impl Resolver for TestResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<IpAddr>>> + Send + 'a>,
    > {
        Box::pin(async move {
            let count = {
                let mut lookups = self.lookups.lock().expect("lock");
                let count = lookups.entry(host.to_owned()).or_default();
                *count += 1;
                *count
            };
            if let Some((_, addresses)) = self
                .rebind
                .as_ref()
                .filter(|(name, _)| *name == host && count > 1)
            {
                return Ok(addresses.clone());
            }
            self.names.get(host).cloned().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such host in the test resolver",
                )
            })
        })
    }
}

struct Fixture {
    server: testkit::FixtureServer,
    ca: testkit::TestCa,
    hits: Arc<AtomicUsize>,
}

async fn fixture() -> Fixture {
    let ca = testkit::TestCa::new();
    let cert = ca.issue(&["fixture.test", "private.test", "localhost", "127.0.0.1"]);
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let router = Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route("/hop1", get(|| async { Redirect::temporary("/hop2") }))
        .route("/hop2", get(|| async { Redirect::to("/ok") }))
        .route("/loop", get(|| async { Redirect::temporary("/loop") }))
        .route(
            "/to-private",
            get(|| async { Redirect::temporary("https://private.test/steal") }),
        )
        .route(
            "/to-http",
            get(|| async { Redirect::temporary("http://fixture.test/ok") }),
        )
        .route("/big", get(|| async { vec![b'x'; 2 * 1024 * 1024] }))
        .route(
            "/hang",
            get(|| async {
                std::future::pending::<()>().await;
                "never"
            }),
        )
        .route(
            "/no-location",
            get(|| async {
                (StatusCode::FOUND, [(header::CACHE_CONTROL, "no-store")]).into_response()
            }),
        )
        .layer(axum::middleware::from_fn(
            move |request, next: axum::middleware::Next| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    next.run(request).await
                }
            },
        ));
    let server = testkit::serve_https(router, &cert).await;
    Fixture { server, ca, hits }
}

fn client(fixture: &Fixture, resolver: Arc<TestResolver>, allow_loopback: bool) -> OutboundClient {
    OutboundClient::new(
        OutboundPolicy {
            allow_loopback,
            extra_ca_pem: vec![fixture.ca.cert_pem().to_owned()],
            request_timeout: Duration::from_secs(2),
            max_response_bytes: 1024 * 1024,
            loopback_only_safety_net: true,
            ..OutboundPolicy::default()
        },
        resolver,
    )
    .expect("client")
}

fn url(fixture: &Fixture, host: &str, path: &str) -> Url {
    Url::parse(&format!("{}{path}", fixture.server.https_url(host))).expect("url")
}

async fn fetch(client: &OutboundClient, url: Url) -> Result<mcp::OutboundResponse, OutboundError> {
    client.send(OutboundRequest::get(url)).await
}

#[tokio::test]
async fn hosts_resolving_to_private_link_local_or_unique_local_addresses_are_refused() {
    let fixture = fixture().await;
    let resolver = Arc::new(TestResolver::standard());
    let client = client(&fixture, resolver.clone(), true);
    for (host, class) in [
        ("private.test", AddressClass::Private),
        ("metadata.test", AddressClass::LinkLocal),
        ("mapped.test", AddressClass::Private),
        ("ula.test", AddressClass::UniqueLocal),
        ("mixed.test", AddressClass::Private),
    ] {
        let error = fetch(&client, url(&fixture, host, "/ok"))
            .await
            .expect_err(host);
        match error {
            OutboundError::AddressRefused {
                class: refused,
                ref host,
                ..
            } => {
                assert_eq!(refused, class, "{host}: {error}");
            }
            other => panic!("{host}: expected an address refusal, got {other}"),
        }
        assert_eq!(
            resolver.lookups(host),
            1,
            "{host} was resolved once and refused"
        );
    }
    assert_eq!(
        fixture.hits.load(Ordering::SeqCst),
        0,
        "no request reached anything"
    );
}

#[tokio::test]
async fn address_literals_are_checked_without_the_resolver() {
    let fixture = fixture().await;
    let client = client(&fixture, Arc::new(TestResolver::standard()), true);
    for literal in [
        "https://10.1.2.3/",
        "https://169.254.169.254/latest/meta-data",
        "https://[fd00::1]/",
        "https://[::ffff:10.0.0.1]/",
    ] {
        let error = fetch(&client, Url::parse(literal).expect("url"))
            .await
            .expect_err(literal);
        assert!(
            matches!(error, OutboundError::AddressRefused { .. }),
            "{literal}: {error}"
        );
    }
}

#[tokio::test]
async fn loopback_is_refused_unless_allowed() {
    let fixture = fixture().await;
    let refusing = client(&fixture, Arc::new(TestResolver::standard()), false);
    let error = fetch(&refusing, url(&fixture, "fixture.test", "/ok"))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            error,
            OutboundError::AddressRefused {
                class: AddressClass::Loopback,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("allow_loopback"), "{error}");
    let allowing = client(&fixture, Arc::new(TestResolver::standard()), true);
    let response = fetch(&allowing, url(&fixture, "fixture.test", "/ok"))
        .await
        .expect("allowed");
    assert_eq!(response.status, 200);
    assert_eq!(&response.body[..], b"fine");
}

#[tokio::test]
async fn redirects_are_followed_hop_by_hop_under_the_same_rules() {
    let fixture = fixture().await;
    let resolver = Arc::new(TestResolver::standard());
    let client = client(&fixture, resolver.clone(), true);
    let response = fetch(&client, url(&fixture, "fixture.test", "/hop1"))
        .await
        .expect("followed");
    assert_eq!(&response.body[..], b"fine");
    assert_eq!(response.url.path(), "/ok");

    let hits_before = fixture.hits.load(Ordering::SeqCst);
    let error = fetch(&client, url(&fixture, "fixture.test", "/to-private"))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            error,
            OutboundError::AddressRefused {
                class: AddressClass::Private,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(resolver.lookups("private.test"), 1);
    assert_eq!(
        fixture.hits.load(Ordering::SeqCst),
        hits_before + 1,
        "only the first hop was made"
    );

    let error = fetch(&client, url(&fixture, "fixture.test", "/to-http"))
        .await
        .expect_err("refused");
    assert!(matches!(error, OutboundError::NotHttps { .. }), "{error}");
    let error = fetch(&client, url(&fixture, "fixture.test", "/loop"))
        .await
        .expect_err("refused");
    assert!(
        matches!(error, OutboundError::TooManyRedirects { max: 5 }),
        "{error}"
    );
    let error = fetch(&client, url(&fixture, "fixture.test", "/no-location"))
        .await
        .expect_err("refused");
    assert!(
        matches!(error, OutboundError::BadRedirect { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn the_connection_goes_to_the_address_that_was_checked() {
    // A resolver that answers loopback first and a private address afterwards (DNS
    // rebinding): the request must use the first, checked, answer and never ask again.
    let fixture = fixture().await;
    let ip = |text: &str| text.parse::<IpAddr>().expect("address");
    let resolver = Arc::new(TestResolver {
        rebind: Some(("fixture.test", vec![ip("10.9.9.9")])),
        ..TestResolver::standard()
    });
    let client = client(&fixture, resolver.clone(), true);
    let response = fetch(&client, url(&fixture, "fixture.test", "/ok"))
        .await
        .expect("answered");
    assert_eq!(response.status, 200);
    assert_eq!(
        resolver.lookups("fixture.test"),
        1,
        "one lookup, one checked connection"
    );
}

#[tokio::test]
async fn answers_over_the_size_cap_and_servers_that_hang_are_cut_off() {
    let fixture = fixture().await;
    let client = client(&fixture, Arc::new(TestResolver::standard()), true);
    let error = fetch(&client, url(&fixture, "fixture.test", "/big"))
        .await
        .expect_err("too big");
    assert!(
        matches!(error, OutboundError::ResponseTooLarge { max, .. } if max == 1024 * 1024),
        "{error}"
    );
    let error = fetch(&client, url(&fixture, "fixture.test", "/hang"))
        .await
        .expect_err("hangs");
    assert!(matches!(error, OutboundError::Timeout { .. }), "{error}");
}

#[tokio::test]
async fn plain_http_is_allowed_only_to_loopback_and_only_when_allowed() {
    let router = Router::new().route("/ok", get(|| async { "plain" }));
    let plain = testkit::serve_http(router).await;
    let ca = testkit::TestCa::new();
    let policy = |allow_loopback| OutboundPolicy {
        allow_loopback,
        extra_ca_pem: vec![ca.cert_pem().to_owned()],
        loopback_only_safety_net: true,
        ..OutboundPolicy::default()
    };
    let resolver = Arc::new(TestResolver::standard());
    let allowing = OutboundClient::new(policy(true), resolver.clone()).expect("client");
    let refusing = OutboundClient::new(policy(false), resolver).expect("client");
    let literal = Url::parse(&format!("http://127.0.0.1:{}/ok", plain.port())).expect("url");
    let response = fetch(&allowing, literal.clone())
        .await
        .expect("loopback http allowed");
    assert_eq!(&response.body[..], b"plain");
    assert!(matches!(
        fetch(&refusing, literal).await,
        Err(OutboundError::NotHttps { .. })
    ));
    // A name is not enough for plain HTTP, even one resolving to loopback.
    let named = Url::parse(&format!("http://fixture.test:{}/ok", plain.port())).expect("url");
    assert!(matches!(
        fetch(&allowing, named).await,
        Err(OutboundError::NotHttps { .. })
    ));
}

#[tokio::test]
async fn an_allowed_exception_admits_exactly_its_socket_address_and_nothing_else_on_loopback() {
    let router = Router::new().route("/ok", get(|| async { "demo" }));
    let demo = testkit::serve_http(router.clone()).await;
    let other = testkit::serve_http(router).await;
    let policy = OutboundPolicy {
        allowed_exceptions: vec![demo.address],
        loopback_only_safety_net: true,
        ..OutboundPolicy::default()
    };
    let client = OutboundClient::new(policy, Arc::new(TestResolver::standard())).expect("client");
    let url = |port: u16, host: &str| Url::parse(&format!("http://{host}:{port}/ok")).expect("url");
    let response = fetch(&client, url(demo.port(), "127.0.0.1"))
        .await
        .expect("the exception is admitted over plain http");
    assert_eq!(&response.body[..], b"demo");
    // Another port on the same address, a name resolving to it, https to another port: refused.
    assert!(matches!(
        fetch(&client, url(other.port(), "127.0.0.1")).await,
        Err(OutboundError::NotHttps { .. })
    ));
    assert!(matches!(
        fetch(&client, url(demo.port(), "fixture.test")).await,
        Err(OutboundError::NotHttps { .. })
    ));
    let https_other = Url::parse(&format!("https://127.0.0.1:{}/ok", other.port())).expect("url");
    assert!(matches!(
        fetch(&client, https_other).await,
        Err(OutboundError::AddressRefused {
            class: AddressClass::Loopback,
            ..
        })
    ));
    let https_named = Url::parse(&format!("https://fixture.test:{}/ok", demo.port())).expect("url");
    assert!(matches!(
        fetch(&client, https_named).await,
        Err(OutboundError::AddressRefused {
            class: AddressClass::Loopback,
            ..
        })
    ));
}

#[tokio::test]
async fn rfc7009_to_a_plain_http_endpoint_the_guard_admits_is_sent_by_hand_with_the_clients_method()
{
    use testkit::{ClientAuthMethod, PRE_REGISTERED_CLIENT_ID, PRE_REGISTERED_CLIENT_SECRET};
    let (router, handle) = testkit::OAuthFixture::default().start();
    let fixture = testkit::serve_http(router).await;
    let client = OutboundClient::new(
        OutboundPolicy {
            allowed_exceptions: vec![fixture.address],
            loopback_only_safety_net: true,
            ..OutboundPolicy::default()
        },
        Arc::new(TestResolver::standard()),
    )
    .expect("client");
    let method = mcp::RevocationMethod::Rfc7009 {
        endpoint: Url::parse(&format!("http://127.0.0.1:{}/revoke", fixture.port())).expect("url"),
    };
    let credentials = |secret: &str| mcp::ClientAuthentication {
        client_id: PRE_REGISTERED_CLIENT_ID.to_owned(),
        client_secret: Some(secret.to_owned()),
        method: "client_secret_basic".to_owned(),
    };
    let tokens = || mcp::TokensToRevoke {
        access_token: Some("an-access-token"),
        refresh_token: Some("a-refresh-token"),
    };
    mcp::revoke_tokens(
        &client,
        &method,
        &credentials(PRE_REGISTERED_CLIENT_SECRET),
        tokens(),
    )
    .await
    .expect("revoked");
    let seen = handle.revocations();
    let hints: Vec<Option<&str>> = seen.iter().map(|r| r.token_type_hint.as_deref()).collect();
    assert_eq!(hints, [Some("refresh_token"), Some("access_token")]);
    assert!(
        seen.iter()
            .all(|r| r.accepted && r.client_auth == ClientAuthMethod::ClientSecretBasic)
    );
    // A wrong secret is refused, and said so.
    let refused = mcp::revoke_tokens(&client, &method, &credentials("wrong"), tokens()).await;
    assert!(
        matches!(refused, Err(mcp::RevocationError::Refused { .. })),
        "{refused:?}"
    );
}
