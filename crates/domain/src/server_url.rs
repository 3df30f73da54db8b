//! Server URLs (MCP endpoints and OAuth endpoints): `https://` only.
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use url::{Host, Url};

use crate::DomainError;

/// Which URLs a deployment accepts besides `https://`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UrlPolicy {
    /// The development and test escape hatch: also accept `http://` to a loopback host
    /// (127.0.0.0/8, ::1, `localhost`). Off by default.
    pub allow_loopback_http: bool,
}

impl UrlPolicy {
    /// `https://` only.
    pub const STRICT: UrlPolicy = UrlPolicy {
        allow_loopback_http: false,
    };
    /// `https://`, and `http://` to loopback hosts.
    pub const DEVELOPMENT: UrlPolicy = UrlPolicy {
        allow_loopback_http: true,
    };
}

/// An absolute `https://` URL with a host, without user name, password or fragment (or, under
/// [`UrlPolicy::allow_loopback_http`], `http://` to a loopback host).
///
/// Kept as written (trimmed), not in the parser's normalised form: that form adds a `/` to an
/// empty path, and MCP's canonical resource URI (RFC 8707 `resource`) has none, so rewriting
/// `https://mcp.example.com` would change the resource Switchboard asks tokens for.
/// [`ServerUrl::as_url`] gives the parsed form.
///
/// This checks the URL's shape only. Whether a host name resolves to a private address is for
/// whoever connects (only resolution can tell, and it may change): see the SSRF rule.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServerUrl {
    text: String,
    url: Url,
}

impl ServerUrl {
    pub const MAX_CHARS: usize = 2048;

    pub fn parse(text: &str, policy: UrlPolicy) -> Result<ServerUrl, DomainError> {
        let text = text.trim();
        let length = text.chars().count();
        if length > Self::MAX_CHARS {
            return Err(DomainError::UrlTooLong {
                length,
                max: Self::MAX_CHARS,
            });
        }
        // The WHATWG parser forgives a lot (`https:host`, backslashes, tabs inside); an
        // address an admin types should not need forgiving, and should read as it is stored.
        if text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        {
            return Err(DomainError::UrlInvalid {
                reason: "it contains whitespace, control characters or backslashes".into(),
            });
        }
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(DomainError::UrlInvalid {
                reason: "it does not start with a scheme such as https://".into(),
            });
        };
        let https = scheme.eq_ignore_ascii_case("https");
        let http = scheme.eq_ignore_ascii_case("http");
        let allowed_scheme = https || (http && policy.allow_loopback_http);
        if !allowed_scheme {
            return Err(DomainError::UrlNotHttps);
        }
        // `https:///host` would otherwise parse as `https://host/`.
        if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
            return Err(DomainError::UrlMissingHost);
        }
        let url = Url::parse(text).map_err(|error| match error {
            url::ParseError::EmptyHost => DomainError::UrlMissingHost,
            // The parser's messages name the problem, never the input.
            other => DomainError::UrlInvalid {
                reason: other.to_string(),
            },
        })?;
        let Some(host) = url.host() else {
            return Err(DomainError::UrlMissingHost);
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DomainError::UrlHasCredentials);
        }
        if url.fragment().is_some() {
            return Err(DomainError::UrlHasFragment);
        }
        if http && !is_loopback(&host) {
            return Err(DomainError::UrlNotHttps);
        }
        Ok(ServerUrl {
            text: text.to_owned(),
            url,
        })
    }

    /// The URL as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The parsed (normalised) URL.
    pub fn as_url(&self) -> &Url {
        &self.url
    }

    /// The host as written in the URL (a domain name in lowercase, or an IP address).
    pub fn host(&self) -> &str {
        self.url.host_str().unwrap_or_default()
    }

    pub fn is_https(&self) -> bool {
        self.url.scheme() == "https"
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(domain) => domain.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => is_loopback_ipv6(ip),
    }
}

fn is_loopback_ipv6(ip: &Ipv6Addr) -> bool {
    ip.is_loopback()
        || ip
            .to_ipv4_mapped()
            .is_some_and(|v4| IpAddr::V4(v4).is_loopback())
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerUrl({:?})", self.text)
    }
}

impl AsRef<str> for ServerUrl {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict(text: &str) -> Result<String, &'static str> {
        ServerUrl::parse(text, UrlPolicy::STRICT)
            .map(|u| u.to_string())
            .map_err(|e| e.code())
    }

    fn development(text: &str) -> Result<String, &'static str> {
        ServerUrl::parse(text, UrlPolicy::DEVELOPMENT)
            .map(|u| u.to_string())
            .map_err(|e| e.code())
    }

    #[test]
    fn https_urls_are_accepted_and_kept_as_written() {
        assert_eq!(
            strict("https://mcp.example.com/mcp"),
            Ok("https://mcp.example.com/mcp".into())
        );
        assert_eq!(
            strict(" https://mcp.example.com "),
            Ok("https://mcp.example.com".into()),
            "trimmed, and no `/` added"
        );
        let url = ServerUrl::parse("HTTPS://MCP.Example.com:443", UrlPolicy::STRICT).unwrap();
        assert_eq!(url.as_url().as_str(), "https://mcp.example.com/");
        assert_eq!(url.host(), "mcp.example.com");
        assert!(url.is_https());
        assert_eq!(
            strict("https://mcp.example.com:8443/v1/mcp?tenant=a"),
            Ok("https://mcp.example.com:8443/v1/mcp?tenant=a".into())
        );
        assert_eq!(
            strict("https://[2001:db8::1]/mcp"),
            Ok("https://[2001:db8::1]/mcp".into())
        );
    }

    #[test]
    fn only_https_urls_are_accepted_by_default() {
        assert_eq!(strict("http://mcp.example.com/mcp"), Err("url_not_https"));
        assert_eq!(strict("http://127.0.0.1:8080/mcp"), Err("url_not_https"));
        assert_eq!(strict("ftp://example.com/"), Err("url_not_https"));
        assert_eq!(strict("file:///etc/passwd"), Err("url_not_https"));
        assert_eq!(strict("ws://example.com/"), Err("url_not_https"));
    }

    #[test]
    fn loopback_http_is_accepted_only_with_the_escape_hatch() {
        for ok in [
            "http://127.0.0.1:8080/mcp",
            "http://127.1.2.3/",
            "http://localhost:3000/mcp",
            "http://LOCALHOST/",
            "http://[::1]:9000/mcp",
            "http://[::ffff:127.0.0.1]/",
        ] {
            assert!(development(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://example.com/",
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost.example.com/",
            "http://[::2]/",
            "http://0.0.0.0/",
        ] {
            assert_eq!(development(refused), Err("url_not_https"), "{refused}");
        }
        assert!(development("https://example.com/").is_ok());
    }

    #[test]
    fn malformed_urls_are_refused_with_their_reason() {
        assert_eq!(strict("https://"), Err("url_missing_host"));
        assert_eq!(strict("https:///mcp"), Err("url_missing_host"));
        assert_eq!(strict("mcp.example.com"), Err("url_invalid"));
        assert_eq!(strict("https:mcp.example.com"), Err("url_invalid"));
        assert_eq!(strict("https:\\\\mcp.example.com"), Err("url_invalid"));
        assert_eq!(strict("https://mcp.exa mple.com"), Err("url_invalid"));
        assert_eq!(strict("https://mcp.example.com/\tx"), Err("url_invalid"));
        assert_eq!(strict("https://[::1/"), Err("url_invalid"));
        assert_eq!(strict("https://host:99999/"), Err("url_invalid"));
        assert_eq!(strict(""), Err("url_invalid"));
        assert_eq!(
            strict(&format!("https://example.com/{}", "a".repeat(2048))),
            Err("url_too_long")
        );
    }

    #[test]
    fn urls_with_credentials_or_fragments_are_refused() {
        assert_eq!(
            strict("https://user:pass@example.com/"),
            Err("url_has_credentials")
        );
        assert_eq!(
            strict("https://user@example.com/"),
            Err("url_has_credentials")
        );
        assert_eq!(strict("https://example.com/mcp#x"), Err("url_has_fragment"));
        assert_eq!(strict("https://example.com/mcp#"), Err("url_has_fragment"));
    }

    #[test]
    fn url_errors_never_echo_the_url() {
        let error = ServerUrl::parse("https://user:s3cret@example.com/", UrlPolicy::STRICT)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.contains("s3cret"));
        let error = ServerUrl::parse("https://s3cret host/", UrlPolicy::STRICT)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(!error.contains("s3cret"));
    }
}
