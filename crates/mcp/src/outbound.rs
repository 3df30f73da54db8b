//! The outbound guard.
use std::{
    fmt,
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode, header::HeaderMap};
use url::{Host, Url};

/// What kind of address an IP address is, for the outbound rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// A routable public address: allowed.
    Public,
    /// 127.0.0.0/8, ::1: allowed only with `allow_loopback`.
    Loopback,
    /// 10/8, 172.16/12, 192.168/16, 100.64/10 (carrier-grade NAT), fec0::/10.
    Private,
    /// 169.254/16 (cloud metadata lives here), fe80::/10.
    LinkLocal,
    /// fc00::/7.
    UniqueLocal,
    /// 224/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// Documentation, benchmarking, protocol-assignment, reserved and broadcast ranges, and
    /// IPv6 transition ranges that cannot be checked (Teredo).
    Reserved,
}

impl AddressClass {
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link-local",
            AddressClass::UniqueLocal => "unique-local",
            AddressClass::Multicast => "multicast",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Reserved => "reserved",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = ip.octets();
    match (a, b, c) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        (100, 64..=127, _) => AddressClass::Private,
        (169, 254, _) => AddressClass::LinkLocal,
        (224..=239, _, _) => AddressClass::Multicast,
        (240..=255, _, _) => AddressClass::Reserved,
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => AddressClass::Reserved,
        (198, 18..=19, _) => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    if ip.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    // Forms that carry an IPv4 address are judged by that address: IPv4-mapped
    // (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d),
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16). The local-use NAT64 prefix (64:ff9b:1::/48,
    // RFC 8215) places the address by the network's prefix length: reserved, not guessed.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let segments = ip.segments();
    let embedded_low = || Ipv4Addr::from(((segments[6] as u32) << 16) | segments[7] as u32);
    if segments[..6] == [0; 6] {
        return classify_v4(embedded_low());
    }
    if segments[..6] == [0, 0, 0, 0, 0xffff, 0] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return classify_v4(embedded_low());
    }
    if segments[..3] == [0x64, 0xff9b, 1] {
        return AddressClass::Reserved;
    }
    if segments[0] == 0x2002 {
        return classify_v4(Ipv4Addr::from(
            ((segments[1] as u32) << 16) | segments[2] as u32,
        ));
    }
    match segments[0] {
        s if s & 0xfe00 == 0xfc00 => AddressClass::UniqueLocal,
        s if s & 0xffc0 == 0xfe80 => AddressClass::LinkLocal,
        s if s & 0xffc0 == 0xfec0 => AddressClass::Private,
        s if s & 0xff00 == 0xff00 => AddressClass::Multicast,
        // Teredo (2001::/32) hides an IPv4 address that cannot be checked reliably;
        // documentation (2001:db8::/32).
        0x2001 if segments[1] == 0 || segments[1] == 0x0db8 => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

/// The class of an address.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The outbound rules.
#[derive(Debug, Clone)]
pub struct OutboundPolicy {
    /// Allow loopback addresses, and plain `http://` to loopback hosts. For development and
    /// tests only (`outbound.allow_loopback`).
    pub allow_loopback: bool,
    /// Extra trust anchors (PEM), besides the public web roots (`outbound.extra_ca_file`).
    pub extra_ca_file: Option<PathBuf>,
    /// Extra trust anchors given as PEM text (tests, the demo).
    pub extra_ca_pem: Vec<String>,
    pub connect_timeout: Duration,
    /// Bound on one request, redirects included; on opening an MCP session, and on each
    /// page of a tool list (a tool call is bounded by its invocation's deadline instead).
    pub request_timeout: Duration,
    /// Largest response body read.
    pub max_response_bytes: usize,
    pub max_redirects: usize,
    /// A second, independent line of defence for tests: never connect to anything but
    /// loopback, whatever the rules above decide, so that a regression in them can never send
    /// a packet off the machine.
    pub loopback_only_safety_net: bool,
    /// Socket addresses admitted whatever their class, over `https://` or plain `http://`:
    /// the in-process demo servers of `switchboard up --demo`, so that the guard admits
    /// exactly these and not loopback in general. They apply only to URLs that name the
    /// address itself (`http://127.0.0.1:<port>`): a host name is checked at resolution,
    /// where the port is not known.
    pub allowed_exceptions: Vec<SocketAddr>,
}

impl Default for OutboundPolicy {
    fn default() -> Self {
        OutboundPolicy {
            allow_loopback: false,
            extra_ca_file: None,
            extra_ca_pem: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            max_response_bytes: 1024 * 1024,
            max_redirects: 5,
            loopback_only_safety_net: false,
            allowed_exceptions: Vec::new(),
        }
    }
}

impl OutboundPolicy {
    fn admits(&self, class: AddressClass) -> bool {
        match class {
            AddressClass::Public => true,
            AddressClass::Loopback => self.allow_loopback,
            _ => false,
        }
    }
}

/// Why an outbound request was refused or failed. Messages name hosts, never whole URLs
/// (a URL may carry a secret in its query).
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "{host}: only https:// is allowed (plain http:// only to loopback, with outbound.allow_loopback)"
    )]
    NotHttps { host: String },
    #[error("the URL has no host")]
    NoHost,
    #[error(
        "{host} resolves to {address}, a {class} address; Switchboard only connects to public addresses{}",
        if *class == AddressClass::Loopback { " (loopback with outbound.allow_loopback)" } else { "" }
    )]
    AddressRefused {
        host: String,
        address: IpAddr,
        class: AddressClass,
    },
    #[error("{host} could not be resolved: {reason}")]
    Resolve { host: String, reason: String },
    #[error("more than {max} redirects")]
    TooManyRedirects { max: usize },
    #[error("{host} answered a redirect without a usable Location")]
    BadRedirect { host: String },
    #[error("{host} answered with more than {max} bytes")]
    ResponseTooLarge { host: String, max: usize },
    #[error("{host} did not answer in time")]
    Timeout { host: String },
    #[error("cannot reach {host}: {reason}")]
    Connect { host: String, reason: String },
    #[error("cannot read the extra CA file {path}: {reason}")]
    ExtraCa { path: String, reason: String },
    #[error("outbound HTTP client: {0}")]
    Client(String),
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Turns a host name into addresses: the system resolver, or a test's.
pub trait Resolver: Send + Sync + fmt::Debug + 'static {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>>;
}

/// The operating system's resolver.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host, 0))
                .await?
                .map(|address| address.ip())
                .collect())
        })
    }
}

/// Fixed host names → addresses, and another resolver (or none) for every other name: the
/// demo's in-process servers, and tests' stand-ins for hosts on private addresses.
#[derive(Debug, Default)]
pub struct StaticResolver {
    names: std::collections::HashMap<String, Vec<IpAddr>>,
    fallback: Option<Arc<dyn Resolver>>,
}

impl StaticResolver {
    pub fn new() -> Self {
        StaticResolver::default()
    }

    /// `name` resolves to `addresses`.
    pub fn with(mut self, name: &str, addresses: &[IpAddr]) -> Self {
        self.names
            .insert(name.to_ascii_lowercase(), addresses.to_vec());
        self
    }

    /// Names not given here are asked of `resolver`.
    pub fn falling_back_to(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.fallback = Some(resolver);
        self
    }
}

impl Resolver for StaticResolver {
    fn resolve<'a>(&'a self, host: &'a str) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            if let Some(addresses) = self.names.get(&host.to_ascii_lowercase()) {
                return Ok(addresses.clone());
            }
            match &self.fallback {
                Some(resolver) => resolver.resolve(host).await,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such host",
                )),
            }
        })
    }
}

/// Checks addresses against the policy: every one must be admitted, or the host is refused
/// (a name with one private address among public ones is as dangerous as one private).
fn check_addresses(
    policy: &OutboundPolicy,
    host: &str,
    addresses: &[IpAddr],
) -> Result<(), OutboundError> {
    if addresses.is_empty() {
        return Err(OutboundError::Resolve {
            host: host.to_owned(),
            reason: "no address".to_owned(),
        });
    }
    for address in addresses {
        let class = classify(*address);
        if !policy.admits(class) {
            return Err(OutboundError::AddressRefused {
                host: host.to_owned(),
                address: *address,
                class,
            });
        }
        if policy.loopback_only_safety_net && !address.is_loopback() {
            return Err(OutboundError::AddressRefused {
                host: host.to_owned(),
                address: *address,
                class,
            });
        }
    }
    Ok(())
}

/// reqwest's resolver: the seam's answer, checked; the connection then goes to exactly these
/// addresses, so a second lookup (DNS rebinding) never happens.
#[derive(Debug)]
struct GuardedResolve {
    resolver: Arc<dyn Resolver>,
    policy: Arc<OutboundPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolve {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (resolver, policy) = (self.resolver.clone(), self.policy.clone());
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addresses = resolver.resolve(&host).await.map_err(|e| {
                Box::new(OutboundError::Resolve {
                    host: host.clone(),
                    reason: e.to_string(),
                }) as Box<dyn std::error::Error + Send + Sync>
            })?;
            check_addresses(&policy, &host, &addresses)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            let addresses: reqwest::dns::Addrs =
                Box::new(addresses.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addresses)
        })
    }
}

/// One outbound request.
#[derive(Debug, Clone)]
pub struct OutboundRequest {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    pub body: Option<Bytes>,
    /// Follow redirects (hop by hop, each checked); `false` returns the redirect itself.
    pub follow_redirects: bool,
}

impl OutboundRequest {
    pub fn get(url: Url) -> Self {
        OutboundRequest {
            method: Method::GET,
            url,
            headers: HeaderMap::new(),
            body: None,
            follow_redirects: true,
        }
    }
}

/// A response read whole (within the size cap).
#[derive(Debug, Clone)]
pub struct OutboundResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The URL that answered, after redirects.
    pub url: Url,
}

/// The one HTTP client for outbound requests. Cheap to clone; connections are reused.
#[derive(Debug, Clone)]
pub struct OutboundClient {
    http: reqwest::Client,
    policy: Arc<OutboundPolicy>,
    /// The protocol era each MCP server spoke when a session was last opened to it, shared
    /// by every session opened through this client.
    eras: crate::session::ProtocolEras,
}

fn host_of(url: &Url) -> String {
    url.host_str().unwrap_or("").to_owned()
}

impl OutboundClient {
    pub fn new(policy: OutboundPolicy, resolver: Arc<dyn Resolver>) -> Result<Self, OutboundError> {
        // reqwest is built without a bundled crypto provider; Switchboard uses ring. Installing
        // fails harmlessly when it is already installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        if policy.allow_loopback {
            tracing::warn!(
                "outbound.allow_loopback is on: Switchboard will connect to loopback addresses \
                 and plain http:// on loopback. Development and tests only."
            );
        }
        // No proxy, whatever the environment says (`HTTPS_PROXY`, `ALL_PROXY`): through a
        // proxy, the guarded resolver would only ever see the proxy's name, and the target's
        // address would go unchecked. No overall time limit on the client either: `send`
        // bounds each request with `request_timeout`, a session's opening and tool list are
        // bounded in `session`, a tool call by its invocation's deadline — and a
        // notification stream must outlive any such limit.
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(policy.connect_timeout)
            .tcp_nodelay(true)
            .https_only(false)
            .dns_resolver(Arc::new(GuardedResolve {
                resolver,
                policy: Arc::new(policy.clone()),
            }));
        let mut pems: Vec<Vec<u8>> = policy
            .extra_ca_pem
            .iter()
            .map(|p| p.clone().into_bytes())
            .collect();
        if let Some(path) = &policy.extra_ca_file {
            pems.push(std::fs::read(path).map_err(|e| OutboundError::ExtraCa {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?);
        }
        for pem in pems {
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                OutboundError::ExtraCa {
                    path: policy
                        .extra_ca_file
                        .as_ref()
                        .map_or_else(|| "(given)".to_owned(), |p| p.display().to_string()),
                    reason: e.to_string(),
                }
            })?;
            builder = builder.tls_certs_merge(certificates);
        }
        let http = builder
            .build()
            .map_err(|e| OutboundError::Client(e.to_string()))?;
        Ok(OutboundClient {
            http,
            policy: Arc::new(policy),
            eras: crate::session::ProtocolEras::default(),
        })
    }

    /// The guarded HTTP client itself, for `rmcp`'s MCP transport: every connection it makes
    /// goes through the checked resolver; it follows no redirects. Callers check the URL
    /// first ([`OutboundClient::check_url`]).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn policy(&self) -> &OutboundPolicy {
        &self.policy
    }

    /// What this client remembers of each MCP server's protocol era.
    pub fn protocol_eras(&self) -> &crate::session::ProtocolEras {
        &self.eras
    }

    /// Whether `url` names one of the policy's [`OutboundPolicy::allowed_exceptions`] by its
    /// address and port (a URL without a port names the scheme's default port).
    pub fn is_exception(&self, url: &Url) -> bool {
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return false,
        };
        url.port_or_known_default().is_some_and(|port| {
            self.policy
                .allowed_exceptions
                .contains(&SocketAddr::new(ip, port))
        })
    }

    /// The scheme rule alone: https, or plain http to a loopback host when loopback is allowed
    /// (or to an allowed exception).
    pub fn check_scheme(&self, url: &Url) -> Result<(), OutboundError> {
        let host = url.host().ok_or(OutboundError::NoHost)?;
        match url.scheme() {
            "https" => Ok(()),
            "http" if self.is_exception(url) => Ok(()),
            "http" if self.policy.allow_loopback => {
                let loopback = match &host {
                    Host::Ipv4(v4) => v4.is_loopback(),
                    Host::Ipv6(v6) => v6.is_loopback(),
                    Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
                };
                if loopback {
                    Ok(())
                } else {
                    Err(OutboundError::NotHttps { host: host_of(url) })
                }
            }
            _ => Err(OutboundError::NotHttps { host: host_of(url) }),
        }
    }

    /// Checks a URL before any connection: the scheme, and a host given as an address (the
    /// resolver is not asked about those).
    pub fn check_url(&self, url: &Url) -> Result<(), OutboundError> {
        self.check_scheme(url)?;
        if self.is_exception(url) {
            return Ok(());
        }
        let literal = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        check_addresses(&self.policy, &host_of(url), &[literal])
    }

    /// Sends `request`, following redirects hop by hop (each hop checked like the first),
    /// and reads the answer whole within the size cap.
    pub async fn send(&self, request: OutboundRequest) -> Result<OutboundResponse, OutboundError> {
        let host = host_of(&request.url);
        match tokio::time::timeout(self.policy.request_timeout, self.send_following(request)).await
        {
            Ok(result) => result,
            Err(_) => Err(OutboundError::Timeout { host }),
        }
    }

    async fn send_following(
        &self,
        mut request: OutboundRequest,
    ) -> Result<OutboundResponse, OutboundError> {
        let mut hops = 0;
        loop {
            self.check_url(&request.url)?;
            let mut builder = self
                .http
                .request(request.method.clone(), request.url.clone())
                .headers(request.headers.clone());
            if let Some(body) = &request.body {
                builder = builder.body(body.clone());
            }
            let response = builder
                .send()
                .await
                .map_err(|e| self.explain(&request.url, e))?;
            let status = response.status();
            if request.follow_redirects
                && status.is_redirection()
                && status != StatusCode::NOT_MODIFIED
            {
                hops += 1;
                if hops > self.policy.max_redirects {
                    return Err(OutboundError::TooManyRedirects {
                        max: self.policy.max_redirects,
                    });
                }
                let next = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|location| request.url.join(location).ok())
                    .ok_or_else(|| OutboundError::BadRedirect {
                        host: host_of(&request.url),
                    })?;
                tracing::debug!(from = %host_of(&request.url), to = %host_of(&next), status = status.as_u16(), "following a redirect");
                // 301/302/303 turn into a GET without a body (what browsers and RFC 9110
                // clients do); 307/308 repeat the request as it was.
                if !matches!(
                    status,
                    StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
                ) {
                    request.method = Method::GET;
                    request.body = None;
                }
                if host_of(&next) != host_of(&request.url) {
                    // Credentials meant for one host never follow a redirect to another.
                    request.headers.remove(reqwest::header::AUTHORIZATION);
                    request.headers.remove(reqwest::header::COOKIE);
                }
                request.url = next;
                continue;
            }
            let headers = response.headers().clone();
            let url = response.url().clone();
            let body = self.read_capped(&url, response).await?;
            return Ok(OutboundResponse {
                status,
                headers,
                body,
                url,
            });
        }
    }

    async fn read_capped(
        &self,
        url: &Url,
        response: reqwest::Response,
    ) -> Result<Bytes, OutboundError> {
        let max = self.policy.max_response_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > max as u64)
        {
            return Err(OutboundError::ResponseTooLarge {
                host: host_of(url),
                max,
            });
        }
        let mut body = BytesMut::new();
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.explain(url, e))?;
            if body.len() + chunk.len() > max {
                return Err(OutboundError::ResponseTooLarge {
                    host: host_of(url),
                    max,
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// The guard's own refusal when it caused the failure; otherwise what went wrong, without
    /// the URL.
    fn explain(&self, url: &Url, error: reqwest::Error) -> OutboundError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
        while let Some(cause) = source {
            // The guarded resolver refuses with an address refusal or a failed lookup.
            if let Some(refusal) = cause.downcast_ref::<OutboundError>() {
                return refusal.clone();
            }
            source = cause.source();
        }
        if error.is_timeout() {
            return OutboundError::Timeout { host: host_of(url) };
        }
        let mut reason = String::new();
        let mut source: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(&error);
        while let Some(cause) = source {
            if !reason.is_empty() {
                reason.push_str(": ");
            }
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        if reason.is_empty() {
            reason = "the request failed".to_owned();
        }
        OutboundError::Connect {
            host: host_of(url),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified_including_every_form_that_hides_an_ipv4_address() {
        let cases: &[(&str, AddressClass)] = &[
            ("93.184.216.34", AddressClass::Public),
            ("1.1.1.1", AddressClass::Public),
            ("127.0.0.1", AddressClass::Loopback),
            ("127.255.0.9", AddressClass::Loopback),
            ("10.0.0.1", AddressClass::Private),
            ("172.16.5.4", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("172.32.0.1", AddressClass::Public),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("169.254.169.254", AddressClass::LinkLocal),
            ("0.0.0.0", AddressClass::Unspecified),
            ("224.0.0.1", AddressClass::Multicast),
            ("255.255.255.255", AddressClass::Reserved),
            ("192.0.2.10", AddressClass::Reserved),
            ("198.18.0.1", AddressClass::Reserved),
            ("::1", AddressClass::Loopback),
            ("::", AddressClass::Unspecified),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("::ffff:169.254.169.254", AddressClass::LinkLocal),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("::ffff:93.184.216.34", AddressClass::Public),
            ("::10.0.0.1", AddressClass::Private),
            ("64:ff9b::a00:1", AddressClass::Private),
            ("::ffff:0:a9fe:a9fe", AddressClass::LinkLocal),
            ("::ffff:0:5db8:d822", AddressClass::Public),
            ("64:ff9b:1::a9fe:a9fe", AddressClass::Reserved),
            ("64:ff9b:1:ff::1", AddressClass::Reserved),
            ("2002:a00:1::1", AddressClass::Private),
            ("fd00::1", AddressClass::UniqueLocal),
            ("fc12::1", AddressClass::UniqueLocal),
            ("fe80::1", AddressClass::LinkLocal),
            ("fec0::1", AddressClass::Private),
            ("ff02::1", AddressClass::Multicast),
            ("2001:db8::1", AddressClass::Reserved),
            ("2001:0:4136:e378::1", AddressClass::Reserved),
            ("2606:4700:4700::1111", AddressClass::Public),
        ];
        for (text, class) in cases {
            let ip: IpAddr = text.parse().expect("address");
            assert_eq!(classify(ip), *class, "{text}");
        }
    }

    #[test]
    fn one_refused_address_refuses_the_host() {
        let policy = OutboundPolicy::default();
        let public: IpAddr = "93.184.216.34".parse().expect("address");
        let private: IpAddr = "10.0.0.1".parse().expect("address");
        assert!(check_addresses(&policy, "h", &[public]).is_ok());
        assert!(matches!(
            check_addresses(&policy, "h", &[public, private]),
            Err(OutboundError::AddressRefused {
                class: AddressClass::Private,
                ..
            })
        ));
        let loopback: IpAddr = "127.0.0.1".parse().expect("address");
        assert!(check_addresses(&policy, "h", &[loopback]).is_err());
        let allowing = OutboundPolicy {
            allow_loopback: true,
            ..OutboundPolicy::default()
        };
        assert!(check_addresses(&allowing, "h", &[loopback]).is_ok());
        let netted = OutboundPolicy {
            loopback_only_safety_net: true,
            ..OutboundPolicy::default()
        };
        assert!(
            check_addresses(&netted, "h", &[public]).is_err(),
            "the safety net holds"
        );
    }
}
