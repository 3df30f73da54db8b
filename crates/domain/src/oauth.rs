//! OAuth facts the domain records: a server's OAuth settings, its registered client, and the
//! non-secret traces of secrets (vault references, token fingerprints). No type here can hold
//! a token or a client secret.

use proto::v1 as pb;

use crate::{DomainError, ServerUrl};

/// How Switchboard obtains an OAuth client at a server's authorization server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationMode {
    /// RFC 7591 dynamic client registration.
    DynamicRegistration,
    /// A client the admin registered by hand (its secret, if any, is in the vault).
    Preconfigured,
    /// An OAuth Client ID Metadata Document URL used as the client id.
    ClientMetadataDocument,
}

impl RegistrationMode {
    /// The API's name for the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistrationMode::DynamicRegistration => "dynamic_registration",
            RegistrationMode::Preconfigured => "preconfigured",
            RegistrationMode::ClientMetadataDocument => "client_metadata_document",
        }
    }

    pub fn from_proto(value: i32) -> Result<RegistrationMode, DomainError> {
        match pb::RegistrationMode::try_from(value) {
            Ok(pb::RegistrationMode::Dynamic) => Ok(RegistrationMode::DynamicRegistration),
            Ok(pb::RegistrationMode::Preconfigured) => Ok(RegistrationMode::Preconfigured),
            Ok(pb::RegistrationMode::ClientMetadataDocument) => {
                Ok(RegistrationMode::ClientMetadataDocument)
            }
            Ok(pb::RegistrationMode::Unspecified) | Err(_) => {
                Err(DomainError::RegistrationModeUnspecified)
            }
        }
    }

    pub fn to_proto(self) -> pb::RegistrationMode {
        match self {
            RegistrationMode::DynamicRegistration => pb::RegistrationMode::Dynamic,
            RegistrationMode::Preconfigured => pb::RegistrationMode::Preconfigured,
            RegistrationMode::ClientMetadataDocument => {
                pb::RegistrationMode::ClientMetadataDocument
            }
        }
    }
}

/// An OAuth client id (not a secret): 1–1024 printable ASCII characters (RFC 6749 VSCHAR).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientId(String);
string_newtype_impls!(ClientId);

impl ClientId {
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(text: &str) -> Result<ClientId, DomainError> {
        if text.is_empty() {
            return Err(DomainError::ClientIdMissing);
        }
        if text.len() > Self::MAX_CHARS || !text.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(DomainError::ClientIdInvalid {
                max: Self::MAX_CHARS,
            });
        }
        Ok(ClientId(text.to_owned()))
    }
}

/// Valid RFC 6749 scope token: `1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
}

/// The admin's OAuth choices for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    scopes: Vec<String>,
    registration_mode: RegistrationMode,
    client_id: Option<ClientId>,
}

impl OAuthSettings {
    /// Scopes are RFC 6749 scope tokens (duplicates dropped, order kept). A preconfigured
    /// client needs its client id; other modes ignore one.
    pub fn new<S: AsRef<str>>(
        scopes: impl IntoIterator<Item = S>,
        registration_mode: RegistrationMode,
        client_id: Option<&str>,
    ) -> Result<OAuthSettings, DomainError> {
        let mut kept: Vec<String> = Vec::new();
        for scope in scopes {
            let scope = scope.as_ref();
            if !is_scope_token(scope) {
                return Err(DomainError::OAuthScopeInvalid);
            }
            if !kept.iter().any(|k| k == scope) {
                kept.push(scope.to_owned());
            }
        }
        let client_id = match registration_mode {
            RegistrationMode::Preconfigured => Some(ClientId::parse(client_id.unwrap_or(""))?),
            _ => None,
        };
        Ok(OAuthSettings {
            scopes: kept,
            registration_mode,
            client_id,
        })
    }

    /// Reads settings sent as the proto message.
    pub fn from_proto(settings: &pb::OAuthSettings) -> Result<OAuthSettings, DomainError> {
        let mode = RegistrationMode::from_proto(settings.registration_mode)?;
        let client_id = Some(settings.client_id.as_str()).filter(|id| !id.is_empty());
        OAuthSettings::new(&settings.scopes, mode, client_id)
    }

    pub fn to_proto(&self) -> pb::OAuthSettings {
        pb::OAuthSettings {
            scopes: self.scopes.clone(),
            registration_mode: self.registration_mode.to_proto() as i32,
            client_id: self
                .client_id
                .as_ref()
                .map(|id| id.0.clone())
                .unwrap_or_default(),
        }
    }

    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    pub fn registration_mode(&self) -> RegistrationMode {
        self.registration_mode
    }

    pub fn client_id(&self) -> Option<&ClientId> {
        self.client_id.as_ref()
    }
}

/// The name of a vault entry that holds a secret, e.g. `client_secret/<server_id>`: the only
/// trace of a secret an event may carry. Same rules as a vault entry name (1–255 characters of
/// `[A-Za-z0-9_\-=./]`, not starting or ending with `.` or `/`, no `..`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretRef(String);
string_newtype_impls!(SecretRef);

impl SecretRef {
    pub const MAX_CHARS: usize = 255;

    pub fn parse(text: &str) -> Result<SecretRef, DomainError> {
        let valid = !text.is_empty()
            && text.len() <= Self::MAX_CHARS
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'.' | b'/')
            })
            && !text.starts_with(['.', '/'])
            && !text.ends_with(['.', '/'])
            && !text.contains("..");
        if valid {
            Ok(SecretRef(text.to_owned()))
        } else {
            Err(DomainError::SecretRefInvalid)
        }
    }
}

/// The last segment of a server's own OAuth redirect URL, `<public_url>/oauth/callback/<key>`:
/// the token endpoint's host and 12 hex digits of SHA-256 over the issuer and the token
/// endpoint (`github.com-1a2b3c4d5e6f`). One redirect URL per authorization server is the
/// mix-up defence of RFC 9700 §4.4.2: an authorization server redirects only to a URL
/// registered for its own client, so an answer meant for one server cannot be delivered with
/// a `state` another server's flow started. The token endpoint is part of the key because it
/// is where the code goes: a hostile server that copies another's issuer still gets a key of
/// its own. Derived before the server exists (the admin registers a pre-registered client's
/// redirect URL first), and recorded with the registration, so it never changes after.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CallbackKey(String);
string_newtype_impls!(CallbackKey);

impl CallbackKey {
    pub const MAX_CHARS: usize = 80;
    const HOST_CHARS: usize = 48;

    /// The key of the authorization server with this issuer and token endpoint.
    pub fn for_authorization_server(issuer: &str, token_endpoint: &str) -> CallbackKey {
        let host = url::Url::parse(token_endpoint)
            .ok()
            .and_then(|url| url.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        let mut key: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
            .take(Self::HOST_CHARS)
            .collect();
        if key.is_empty() {
            key.push_str("as");
        }
        key.push('-');
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(issuer.as_bytes());
        context.update(b"\n");
        context.update(token_endpoint.as_bytes());
        let digest = context.finish();
        crate::tools::push_hex(&mut key, digest.as_ref().get(..6).unwrap_or_default());
        CallbackKey(key)
    }

    /// Reads a key from a recorded registration or a callback's path: 1–80 of
    /// `[a-z0-9.-]`.
    pub fn parse(text: &str) -> Result<CallbackKey, DomainError> {
        let valid = !text.is_empty()
            && text.len() <= Self::MAX_CHARS
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if valid {
            Ok(CallbackKey(text.to_owned()))
        } else {
            Err(DomainError::CallbackKeyInvalid)
        }
    }
}

/// The first 8 bytes of SHA-256 of an access token, in hex: lets an auditor tell tokens apart
/// without learning anything usable about them.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TokenFingerprint(String);
string_newtype_impls!(TokenFingerprint);

impl TokenFingerprint {
    /// Fingerprints a token. The token itself is not kept.
    pub fn of(access_token: &str) -> TokenFingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, access_token.as_bytes());
        let mut hex = String::with_capacity(16);
        crate::tools::push_hex(&mut hex, digest.as_ref().get(..8).unwrap_or_default());
        TokenFingerprint(hex)
    }

    /// Reads a recorded fingerprint: 16–64 lowercase hex digits.
    pub fn parse(text: &str) -> Result<TokenFingerprint, DomainError> {
        let valid = (16..=64).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid {
            Ok(TokenFingerprint(text.to_owned()))
        } else {
            Err(DomainError::TokenFingerprintInvalid)
        }
    }
}

/// The parts of an authorization server's RFC 8414 metadata Switchboard uses, with its
/// endpoints already checked to be HTTPS (see [`ServerUrl`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationServer {
    pub issuer: String,
    pub authorization_endpoint: ServerUrl,
    pub token_endpoint: ServerUrl,
    pub revocation_endpoint: Option<ServerUrl>,
    pub registration_endpoint: Option<ServerUrl>,
    pub scopes_supported: Vec<String>,
    pub code_challenge_methods_supported: Vec<String>,
    pub authorization_response_iss_parameter_supported: bool,
    pub token_endpoint_auth_methods_supported: Vec<String>,
}

/// How a client with (or without) a secret authenticates at an authorization server that
/// publishes `supported` (RFC 8414 `token_endpoint_auth_methods_supported`): `none` without
/// a secret; with one, `client_secret_basic` (the RFC 7591 default, and what RFC 6749 §2.3.1
/// says every server must support) unless the server publishes only `client_secret_post`.
pub fn client_authentication_method(supported: &[String], has_secret: bool) -> &'static str {
    let supports = |method: &str| supported.iter().any(|s| s == method);
    if !has_secret {
        "none"
    } else if supports("client_secret_post") && !supports("client_secret_basic") {
        "client_secret_post"
    } else {
        "client_secret_basic"
    }
}

impl AuthorizationServer {
    pub fn to_proto(&self) -> pb::AuthorizationServerMetadata {
        let optional = |url: &Option<ServerUrl>| {
            url.as_ref()
                .map(|u| u.as_str().to_owned())
                .unwrap_or_default()
        };
        pb::AuthorizationServerMetadata {
            issuer: self.issuer.clone(),
            authorization_endpoint: self.authorization_endpoint.as_str().to_owned(),
            token_endpoint: self.token_endpoint.as_str().to_owned(),
            revocation_endpoint: optional(&self.revocation_endpoint),
            registration_endpoint: optional(&self.registration_endpoint),
            scopes_supported: self.scopes_supported.clone(),
            code_challenge_methods_supported: self.code_challenge_methods_supported.clone(),
            authorization_response_iss_parameter_supported: self
                .authorization_response_iss_parameter_supported,
            token_endpoint_auth_methods_supported: self
                .token_endpoint_auth_methods_supported
                .clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_callback_key_is_one_per_issuer_and_token_endpoint() {
        let github = CallbackKey::for_authorization_server(
            "https://github.com/login/oauth",
            "https://github.com/login/oauth/access_token",
        );
        assert!(github.as_str().starts_with("github.com-"), "{github:?}");
        assert_eq!(github.as_str().len(), "github.com-".len() + 12);
        assert_eq!(CallbackKey::parse(github.as_str()), Ok(github.clone()));
        assert_eq!(
            github,
            CallbackKey::for_authorization_server(
                "https://github.com/login/oauth",
                "https://github.com/login/oauth/access_token",
            ),
            "derived again, the same (a pre-registered client's URL is given before the add)"
        );
        // A server that copies another's issuer, with its own token endpoint, gets its own.
        let copycat = CallbackKey::for_authorization_server(
            "https://github.com/login/oauth",
            "https://evil.example/token",
        );
        assert_ne!(copycat, github);
        assert!(copycat.as_str().starts_with("evil.example-"));
        let other_tenant = CallbackKey::for_authorization_server(
            "https://auth.atlassian.com/tenant-2",
            "https://auth.atlassian.com/oauth/token",
        );
        assert_ne!(
            other_tenant,
            CallbackKey::for_authorization_server(
                "https://auth.atlassian.com/tenant-1",
                "https://auth.atlassian.com/oauth/token",
            )
        );
        // Hosts are lowercased; an endpoint that is not a URL still gets a key.
        assert!(
            CallbackKey::for_authorization_server("x", "https://Auth.EXAMPLE:8443/t")
                .as_str()
                .starts_with("auth.example-")
        );
        assert!(
            CallbackKey::for_authorization_server("x", "not a url")
                .as_str()
                .starts_with("as-")
        );
        for bad in ["", "Upper-1", "a/b", "a?b", "a b", &"a".repeat(81)] {
            assert_eq!(
                CallbackKey::parse(bad),
                Err(DomainError::CallbackKeyInvalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn oauth_settings_rules() {
        let settings = OAuthSettings::new(
            ["repo", "read:org", "repo"],
            RegistrationMode::DynamicRegistration,
            Some("ignored"),
        )
        .unwrap();
        assert_eq!(settings.scopes(), ["repo", "read:org"]);
        assert_eq!(settings.client_id(), None);
        assert_eq!(
            OAuthSettings::from_proto(&settings.to_proto()).as_ref(),
            Ok(&settings)
        );

        let code = |scopes: &[&str], mode, client_id| {
            OAuthSettings::new(scopes, mode, client_id)
                .map_err(|e| e.code())
                .err()
        };
        assert_eq!(
            code(&["a b"], RegistrationMode::DynamicRegistration, None),
            Some("oauth_scope_invalid")
        );
        assert_eq!(
            code(&[""], RegistrationMode::DynamicRegistration, None),
            Some("oauth_scope_invalid")
        );
        assert_eq!(
            code(&["a\"b"], RegistrationMode::DynamicRegistration, None),
            Some("oauth_scope_invalid")
        );
        assert_eq!(
            code(&[], RegistrationMode::Preconfigured, None),
            Some("client_id_missing")
        );
        assert_eq!(
            code(&[], RegistrationMode::Preconfigured, Some("bad\nid")),
            Some("client_id_invalid")
        );
        assert_eq!(
            OAuthSettings::from_proto(&pb::OAuthSettings::default()).map_err(|e| e.code()),
            Err("registration_mode_unspecified")
        );
        let preconfigured =
            OAuthSettings::new(["x"], RegistrationMode::Preconfigured, Some("client-1")).unwrap();
        assert_eq!(preconfigured.to_proto().client_id, "client-1");
    }

    #[test]
    fn secret_refs_follow_vault_name_rules() {
        assert!(SecretRef::parse("client_secret/0190f3c4").is_ok());
        for bad in ["", "/a", "a/", "a..b", "has space", "tok~en", ".x"] {
            assert_eq!(
                SecretRef::parse(bad).map_err(|e| e.code()),
                Err("secret_ref_invalid"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn token_fingerprint_is_16_hex_digits_and_hides_the_token() {
        let fingerprint = TokenFingerprint::of("gho_secret_token");
        assert_eq!(fingerprint.as_str().len(), 16);
        assert!(!fingerprint.as_str().contains("secret"));
        assert_eq!(
            TokenFingerprint::parse(fingerprint.as_str()).as_ref(),
            Ok(&fingerprint)
        );
        assert_ne!(fingerprint, TokenFingerprint::of("gho_other_token"));
        assert_eq!(
            TokenFingerprint::parse("gho_secret_token").map_err(|e| e.code()),
            Err("token_fingerprint_invalid")
        );
    }
}
