//! Sign-in and permissions: a bearer JWT becomes a [`Caller`] (the user and what they may do),
//! and [`ROUTES`](crate::routes::ROUTES) — the one permission table — says what each route
//! needs.
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use domain::UserId;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ApiError;

/// What a caller may do. The names are a public contract: configuration and tokens use them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// Manage MCP Servers: add, edit, enable, disable, delete servers.
    ManageServers,
    /// View & Connect to MCP Servers: see servers, connect, disconnect, own tool settings and
    /// approvals.
    ViewAndConnect,
    /// Read the audit log (every event).
    ReadAuditLog,
    /// An orchestrator lists tools and invokes them for any user it names.
    InvokeForUsers,
}

impl Permission {
    pub const ALL: [Permission; 4] = [
        Permission::ManageServers,
        Permission::ViewAndConnect,
        Permission::ReadAuditLog,
        Permission::InvokeForUsers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::ManageServers => "manage_servers",
            Permission::ViewAndConnect => "view_and_connect",
            Permission::ReadAuditLog => "read_audit_log",
            Permission::InvokeForUsers => "invoke_for_users",
        }
    }

    pub fn parse(text: &str) -> Option<Permission> {
        Permission::ALL.into_iter().find(|p| p.as_str() == text)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const NONE: Permissions = Permissions(0);

    pub fn of(permissions: &[Permission]) -> Self {
        Permissions(permissions.iter().fold(0, |bits, p| bits | p.bit()))
    }

    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    pub fn union(self, other: Permissions) -> Self {
        Permissions(self.0 | other.0)
    }

    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |p| self.contains(*p))
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

/// Role name → permissions: the default roles, plus custom roles from the configuration (which
/// may also redefine a default role). A role the table does not know grants nothing.
#[derive(Debug, Clone)]
pub struct RoleTable(BTreeMap<String, Permissions>);

impl RoleTable {
    pub fn defaults() -> Self {
        use Permission::*;
        let mut roles = BTreeMap::new();
        roles.insert(
            "admin".to_owned(),
            Permissions::of(&[ManageServers, ViewAndConnect, ReadAuditLog]),
        );
        roles.insert("analyst".to_owned(), Permissions::of(&[ViewAndConnect]));
        roles.insert(
            "analyst_read_only".to_owned(),
            Permissions::of(&[ViewAndConnect]),
        );
        roles.insert(
            "orchestrator".to_owned(),
            Permissions::of(&[InvokeForUsers]),
        );
        RoleTable(roles)
    }

    /// The defaults with `custom` added over them. Unknown permission names are refused with
    /// the role and the name, so a typo never silently grants less (or more) than meant.
    pub fn with_custom<'a>(
        custom: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<Self, String> {
        let mut table = RoleTable::defaults();
        for (role, names) in custom {
            let mut permissions = Vec::new();
            for name in names {
                let permission = Permission::parse(name).ok_or_else(|| {
                    format!(
                        "role {role:?} names the unknown permission {name:?}; the permissions are {}",
                        Permission::ALL.map(Permission::as_str).join(", ")
                    )
                })?;
                permissions.push(permission);
            }
            table
                .0
                .insert(role.to_owned(), Permissions::of(&permissions));
        }
        Ok(table)
    }

    pub fn permissions_of<'a>(&self, roles: impl IntoIterator<Item = &'a str>) -> Permissions {
        roles
            .into_iter()
            .filter_map(|role| self.0.get(role))
            .fold(Permissions::NONE, |all, p| all.union(*p))
    }
}

/// Who is calling: the signed-in user, their roles and what those grant. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Caller(Arc<CallerInner>);

#[derive(Debug)]
pub struct CallerInner {
    pub user: UserId,
    pub roles: Vec<String>,
    pub permissions: Permissions,
    /// When the caller's token stops being accepted (Unix seconds, leeway included), if it
    /// says: what outlives the request (a live-update stream) ends then.
    pub valid_until: Option<u64>,
}

impl std::ops::Deref for Caller {
    type Target = CallerInner;
    fn deref(&self) -> &CallerInner {
        &self.0
    }
}

impl Caller {
    pub fn new(user: UserId, roles: Vec<String>, permissions: Permissions) -> Self {
        Self::valid_until(user, roles, permissions, None)
    }

    /// A caller whose token is accepted until `valid_until` (Unix seconds).
    pub fn valid_until(
        user: UserId,
        roles: Vec<String>,
        permissions: Permissions,
        valid_until: Option<u64>,
    ) -> Self {
        Caller(Arc::new(CallerInner {
            user,
            roles,
            permissions,
            valid_until,
        }))
    }

    pub fn may(&self, permission: Permission) -> bool {
        self.permissions.contains(permission)
    }
}

/// Tokens already verified, so that an orchestrator or console sending the same token on
/// every request pays for the signature check once. The key is the whole token (signature
/// included), so a hit is the very token that verified; its time window is checked again on
/// every hit. Bounded: when full it is emptied, which costs a re-verification, never a wrong
/// answer.
#[derive(Debug, Default)]
struct VerifiedTokens(RwLock<HashMap<Box<str>, Verified>>);

#[derive(Debug, Clone)]
struct Verified {
    caller: Caller,
    /// Whether the token is for the MCP endpoint alone (its audience names the endpoint's
    /// URL and not `auth.audience`).
    mcp_endpoint_only: bool,
    /// Unix seconds: valid while `not_before - leeway <= now < expires + leeway`.
    not_before: u64,
    expires: u64,
}

const VERIFIED_TOKENS_MAX: usize = 10_000;

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VerifiedTokens {
    fn get(&self, token: &str, leeway: u64) -> Option<(Caller, bool)> {
        let tokens = self.0.read().unwrap_or_else(|p| p.into_inner());
        let verified = tokens.get(token)?;
        let now = unix_now();
        (now + leeway >= verified.not_before && now < verified.expires.saturating_add(leeway))
            .then(|| (verified.caller.clone(), verified.mcp_endpoint_only))
    }

    fn insert(&self, token: &str, verified: Verified) {
        let mut tokens = self.0.write().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= VERIFIED_TOKENS_MAX {
            tokens.clear();
        }
        tokens.insert(token.into(), verified);
    }
}

/// How tokens are checked.
#[derive(Clone)]
pub struct AuthSettings {
    pub keys: VerificationKeys,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim that holds the caller's roles (a list of strings).
    pub roles_claim: String,
    pub leeway: Duration,
    pub roles: RoleTable,
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("roles_claim", &self.roles_claim)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

/// The keys tokens are verified with.
#[derive(Clone)]
pub enum VerificationKeys {
    /// HS256 with a shared secret (the embedded default generates one).
    SharedSecret(Vec<u8>),
    /// Public keys (RS256, ES256, EdDSA) from a JWKS document.
    Jwks(Vec<JwksKey>),
}

impl fmt::Debug for VerificationKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerificationKeys::SharedSecret(_) => f.write_str("SharedSecret(<redacted>)"),
            VerificationKeys::Jwks(keys) => write!(f, "Jwks({} keys)", keys.len()),
        }
    }
}

/// One public key from a JWKS document.
#[derive(Clone)]
pub struct JwksKey {
    pub kid: Option<String>,
    pub algorithm: Algorithm,
    pub key: DecodingKey,
}

impl fmt::Debug for JwksKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl VerificationKeys {
    /// Reads a JWKS file (`{"keys": [...]}`); every key must say its algorithm or be of a type
    /// that has one (RSA → RS256, EC P-256 → ES256, OKP Ed25519 → EdDSA).
    pub fn from_jwks_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?;
        Self::from_jwks(&text).map_err(|e| format!("JWKS file {}: {e}", path.display()))
    }

    pub fn from_jwks(text: &str) -> Result<Self, String> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, KeyAlgorithm};
        let set: JwkSet =
            serde_json::from_str(text).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        for (index, jwk) in set.keys.iter().enumerate() {
            let algorithm = match (jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
                (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
                (Some(other), _) => {
                    return Err(format!(
                        "key {index} uses {other:?}; supported: RS256, ES256, EdDSA"
                    ));
                }
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(ec))
                    if ec.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                (None, _) => {
                    return Err(format!(
                        "key {index} is of a type without a supported algorithm (RSA, EC P-256, Ed25519)"
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {index}: {e}"))?;
            keys.push(JwksKey {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            });
        }
        if keys.is_empty() {
            return Err("the JWKS document has no keys".to_owned());
        }
        Ok(VerificationKeys::Jwks(keys))
    }
}

/// Which of Switchboard's protected resources a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// The HTTP API (and everything but `/mcp`): tokens for `auth.audience`.
    Api,
    /// The MCP endpoint, `/mcp`: tokens for `auth.audience`, or for the endpoint itself. An
    /// MCP client signing a user in names the endpoint's URL as its resource (RFC 8707, as
    /// the MCP authorization specification asks), so the authorization server gives it a
    /// token whose audience is that URL; such a token opens `/mcp` and nothing else.
    McpEndpoint,
}

/// Checks bearer tokens. Cheap to clone (clones share the verified-token cache).
#[derive(Debug, Clone)]
pub struct Authenticator {
    settings: Arc<AuthSettings>,
    /// The MCP endpoint's URL (`<public_url>/mcp`), once the gateway has said where it is.
    mcp_endpoint: Option<Arc<str>>,
    shared: Option<Arc<(DecodingKey, Validation)>>,
    verified: Arc<VerifiedTokens>,
}

impl Authenticator {
    pub fn new(settings: AuthSettings) -> Self {
        Self::build(Arc::new(settings), None)
    }

    fn build(settings: Arc<AuthSettings>, mcp_endpoint: Option<Arc<str>>) -> Self {
        let shared = match &settings.keys {
            VerificationKeys::SharedSecret(secret) => Some(Arc::new((
                DecodingKey::from_secret(secret),
                validation(&settings, mcp_endpoint.as_deref(), Algorithm::HS256),
            ))),
            VerificationKeys::Jwks(_) => None,
        };
        Authenticator {
            settings,
            mcp_endpoint,
            shared,
            verified: Arc::default(),
        }
    }

    /// The same checks, also accepting on [`Resource::McpEndpoint`] tokens whose audience is
    /// `url`, the MCP endpoint's (when `auth.audience` is configured; without one no
    /// audience is checked anywhere).
    pub fn with_mcp_endpoint(self, url: &str) -> Self {
        Self::build(self.settings, Some(url.into()))
    }

    /// The issuer tokens must name (`auth.issuer`), if one is configured: the authorization
    /// server that gives them out.
    pub fn issuer(&self) -> Option<&str> {
        self.settings.issuer.as_deref()
    }

    /// The caller a bearer token for the API stands for, or why it does not stand for anyone.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        self.authenticate_for(Resource::Api, authorization)
    }

    /// The caller a bearer token for `resource` stands for, or why it does not stand for
    /// anyone.
    pub fn authenticate_for(
        &self,
        resource: Resource,
        authorization: Option<&str>,
    ) -> Result<Caller, ApiError> {
        let (caller, mcp_endpoint_only) = self.verify_bearer(authorization)?;
        if mcp_endpoint_only && resource != Resource::McpEndpoint {
            return Err(ApiError::unauthenticated(format!(
                "the token is for the MCP endpoint ({}) alone; this route takes tokens for {}",
                self.mcp_endpoint.as_deref().unwrap_or("/mcp"),
                self.settings
                    .audience
                    .as_deref()
                    .unwrap_or("Switchboard's audience"),
            )));
        }
        Ok(caller)
    }

    fn verify_bearer(&self, authorization: Option<&str>) -> Result<(Caller, bool), ApiError> {
        let Some(header) = authorization else {
            return Err(ApiError::unauthenticated(
                "sign in: send `Authorization: Bearer <token>`",
            ));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthenticated("the Authorization header must be `Bearer <token>`")
            })?;
        let leeway = self.settings.leeway.as_secs();
        if let Some(verified) = self.verified.get(token, leeway) {
            return Ok(verified);
        }
        let claims = self.verify(token)?;
        // The validation accepted the configured audience or the MCP endpoint's; which one?
        let mcp_endpoint_only = match &self.settings.audience {
            Some(audience) => !names_audience(&claims, audience),
            None => false,
        };
        let user = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::unauthenticated("the token has no `sub` (user) claim"))
            .and_then(|sub| {
                UserId::parse(sub).map_err(|e| {
                    ApiError::unauthenticated(format!(
                        "the token's `sub` claim is not a user id: {e}"
                    ))
                })
            })?;
        let roles: Vec<String> = match claims.get(&self.settings.roles_claim) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            // One role as a string is common enough in identity providers to accept.
            Some(Value::String(role)) => vec![role.clone()],
            Some(_) => {
                return Err(ApiError::unauthenticated(format!(
                    "the token's `{}` claim must be a list of role names",
                    self.settings.roles_claim
                )));
            }
        };
        let permissions = self
            .settings
            .roles
            .permissions_of(roles.iter().map(String::as_str));
        let seconds = |name: &str| claims.get(name).and_then(Value::as_u64);
        let caller = Caller::valid_until(
            user,
            roles,
            permissions,
            seconds("exp").map(|expires| expires.saturating_add(leeway)),
        );
        if let Some(expires) = seconds("exp") {
            self.verified.insert(
                token,
                Verified {
                    caller: caller.clone(),
                    mcp_endpoint_only,
                    not_before: seconds("nbf").unwrap_or(0),
                    expires,
                },
            );
        }
        Ok((caller, mcp_endpoint_only))
    }

    fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, ApiError> {
        let invalid = |e: jsonwebtoken::errors::Error| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired; sign in again",
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
                ErrorKind::InvalidIssuer => {
                    "the token was issued by an issuer this server does not accept"
                }
                ErrorKind::InvalidAudience => "the token is for another audience",
                ErrorKind::InvalidSignature => "the token's signature does not verify",
                ErrorKind::InvalidAlgorithm => {
                    "the token is signed with an algorithm this server does not accept"
                }
                ErrorKind::MissingRequiredClaim(_) => "the token lacks a required claim (exp, sub)",
                _ => "the token is not a valid JWT",
            };
            ApiError::unauthenticated(why)
        };
        if let Some(shared) = &self.shared {
            let (key, validation) = shared.as_ref();
            return jsonwebtoken::decode(token, key, validation)
                .map(|data| data.claims)
                .map_err(invalid);
        }
        let VerificationKeys::Jwks(keys) = &self.settings.keys else {
            return Err(ApiError::unauthenticated(
                "no verification key is configured",
            ));
        };
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let candidates = keys.iter().filter(|k| {
            k.algorithm == header.alg
                && match (&header.kid, &k.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        let mut last = None;
        for candidate in candidates {
            let validation = validation(
                &self.settings,
                self.mcp_endpoint.as_deref(),
                candidate.algorithm,
            );
            match jsonwebtoken::decode(token, &candidate.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = Some(e),
            }
        }
        Err(last.map(invalid).unwrap_or_else(|| {
            ApiError::unauthenticated("no configured key matches the token's algorithm and key id")
        }))
    }
}

/// Whether a token's `aud` (one string or a list, RFC 7519 §4.1.3) names `audience`.
fn names_audience(claims: &serde_json::Map<String, Value>, audience: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|aud| aud.as_str() == Some(audience)),
        _ => false,
    }
}

fn validation(
    settings: &AuthSettings,
    mcp_endpoint: Option<&str>,
    algorithm: Algorithm,
) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = settings.leeway.as_secs();
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    match &settings.issuer {
        Some(issuer) => validation.set_issuer(&[issuer]),
        None => validation.iss = None,
    }
    match (&settings.audience, mcp_endpoint) {
        (Some(audience), Some(endpoint)) => validation.set_audience(&[audience, endpoint]),
        (Some(audience), None) => validation.set_audience(&[audience]),
        (None, _) => validation.validate_aud = false,
    }
    validation
}

/// What `switchboard token` signs.
#[derive(Debug, Clone, Serialize)]
pub struct TokenRequest<'a> {
    pub user: &'a str,
    pub roles: &'a [String],
    pub ttl: Duration,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
    pub roles_claim: &'a str,
}

/// Signs an HS256 token with the shared secret (development and the demo; production tokens
/// come from the identity provider).
pub fn mint_token(secret: &[u8], request: &TokenRequest<'_>) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_owned())?
        .as_secs();
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), Value::from(request.user));
    claims.insert(
        request.roles_claim.into(),
        Value::from(request.roles.to_vec()),
    );
    claims.insert("iat".into(), Value::from(now));
    claims.insert("nbf".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(now + request.ttl.as_secs()));
    if let Some(issuer) = request.issuer {
        claims.insert("iss".into(), Value::from(issuer));
    }
    if let Some(audience) = request.audience {
        claims.insert("aud".into(), Value::from(audience));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign the token: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller::new(
            UserId::parse("alice@example.com").expect("user"),
            vec!["admin".into()],
            Permissions::of(&[Permission::ManageServers]),
        )
    }

    #[test]
    fn a_remembered_token_is_honoured_only_inside_its_time_window() {
        let tokens = VerifiedTokens::default();
        let now = unix_now();
        tokens.insert(
            "valid",
            Verified {
                caller: caller(),
                mcp_endpoint_only: false,
                not_before: now - 10,
                expires: now + 600,
            },
        );
        tokens.insert(
            "expired",
            Verified {
                caller: caller(),
                mcp_endpoint_only: false,
                not_before: now - 900,
                expires: now - 60,
            },
        );
        tokens.insert(
            "early",
            Verified {
                caller: caller(),
                mcp_endpoint_only: false,
                not_before: now + 600,
                expires: now + 900,
            },
        );
        tokens.insert(
            "in_leeway",
            Verified {
                caller: caller(),
                mcp_endpoint_only: false,
                not_before: now - 900,
                expires: now - 2,
            },
        );
        assert!(tokens.get("valid", 5).is_some());
        assert!(
            tokens.get("expired", 5).is_none(),
            "expired beyond the leeway"
        );
        assert!(tokens.get("early", 5).is_none(), "not valid yet");
        assert!(
            tokens.get("in_leeway", 5).is_some(),
            "expired within the leeway"
        );
        assert!(tokens.get("unknown", 5).is_none());
    }

    #[test]
    fn the_cache_stays_bounded() {
        let tokens = VerifiedTokens::default();
        let now = unix_now();
        for i in 0..VERIFIED_TOKENS_MAX + 10 {
            tokens.insert(
                &format!("t{i}"),
                Verified {
                    caller: caller(),
                    mcp_endpoint_only: false,
                    not_before: 0,
                    expires: now + 60,
                },
            );
        }
        assert!(tokens.0.read().expect("lock").len() <= VERIFIED_TOKENS_MAX);
    }

    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn jwks_authenticator(jwks: &str) -> Authenticator {
        Authenticator::new(AuthSettings {
            keys: VerificationKeys::from_jwks(jwks).expect("JWKS"),
            issuer: Some("https://login.example.com/".into()),
            audience: Some("switchboard".into()),
            roles_claim: "groups".into(),
            leeway: Duration::from_secs(5),
            roles: RoleTable::defaults(),
        })
    }

    fn claims(issuer: &str, audience: &str) -> serde_json::Value {
        let now = unix_now();
        serde_json::json!({
            "sub": "alice@example.com", "groups": ["analyst"], "iss": issuer, "aud": audience,
            "iat": now, "nbf": now, "exp": now + 600,
        })
    }

    #[test]
    fn tokens_signed_with_es256_and_eddsa_keys_from_a_jwks_verify() {
        use ring::signature::{
            ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
        };
        let random = ring::rand::SystemRandom::new();
        let ec_pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random)
            .expect("EC key");
        let ec =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec_pkcs8.as_ref(), &random)
                .expect("EC key");
        let point = ec.public_key().as_ref(); // 0x04 || x || y
        let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&random).expect("Ed25519 key");
        let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).expect("Ed25519 key");
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "alg": "ES256", "use": "sig",
             "x": b64(&point[1..33]), "y": b64(&point[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed-1", "x": b64(ed.public_key().as_ref())},
        ]})
        .to_string();
        let auth = jwks_authenticator(&jwks);
        let sign = |alg: Algorithm, kid: &str, key: &EncodingKey, claims: &serde_json::Value| {
            let mut header = Header::new(alg);
            header.kid = Some(kid.to_owned());
            jsonwebtoken::encode(&header, claims, key).expect("sign")
        };
        let ec_key = EncodingKey::from_ec_der(ec_pkcs8.as_ref());
        let ed_key = EncodingKey::from_ed_der(ed_pkcs8.as_ref());
        let good = claims("https://login.example.com/", "switchboard");
        for token in [
            sign(Algorithm::ES256, "ec-1", &ec_key, &good),
            sign(Algorithm::EdDSA, "ed-1", &ed_key, &good),
        ] {
            let caller = auth
                .authenticate(Some(&format!("Bearer {token}")))
                .expect("verifies");
            assert_eq!(caller.user.as_str(), "alice@example.com");
            assert!(
                caller.may(Permission::ViewAndConnect),
                "roles from the configured claim"
            );
        }
        // Another issuer, another audience, a key the JWKS does not have, HS256 with the
        // public key's bytes: all refused.
        let other_issuer = sign(
            Algorithm::ES256,
            "ec-1",
            &ec_key,
            &claims("https://evil.example.com/", "switchboard"),
        );
        let other_audience = sign(
            Algorithm::ES256,
            "ec-1",
            &ec_key,
            &claims("https://login.example.com/", "other"),
        );
        let stranger_pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &random).expect("key");
        let stranger = sign(
            Algorithm::ES256,
            "ec-1",
            &EncodingKey::from_ec_der(stranger_pkcs8.as_ref()),
            &good,
        );
        let confused = sign(
            Algorithm::HS256,
            "ec-1",
            &EncodingKey::from_secret(point),
            &good,
        );
        for (token, why) in [
            (other_issuer, "issuer"),
            (other_audience, "audience"),
            (stranger, "signature"),
            (confused, "algorithm"),
        ] {
            let error = auth
                .authenticate(Some(&format!("Bearer {token}")))
                .expect_err(why);
            assert_eq!(error.status, axum::http::StatusCode::UNAUTHORIZED, "{why}");
        }
    }

    #[test]
    fn tokens_signed_with_an_rs256_key_from_a_jwks_verify() {
        let modulus = include_str!("../testdata/rsa-test-key.n").trim();
        let jwks = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "n": modulus, "e": "AQAB"},
        ]})
        .to_string();
        let auth = jwks_authenticator(&jwks);
        let key = EncodingKey::from_rsa_der(include_bytes!("../testdata/rsa-test-key.der"));
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims("https://login.example.com/", "switchboard"),
            &key,
        )
        .expect("sign");
        let caller = auth
            .authenticate(Some(&format!("Bearer {token}")))
            .expect("verifies");
        assert_eq!(caller.user.as_str(), "alice@example.com");
        // One character changed inside the signature (not its last, which carries padding bits).
        let mut tampered: Vec<char> = token.chars().collect();
        let at = tampered.len() - 10;
        tampered[at] = if tampered[at] == 'A' { 'B' } else { 'A' };
        let tampered: String = tampered.into_iter().collect();
        assert!(
            auth.authenticate(Some(&format!("Bearer {tampered}")))
                .is_err()
        );
    }

    #[test]
    fn a_token_for_the_mcp_endpoint_opens_that_endpoint_and_nothing_else() {
        const ENDPOINT: &str = "https://switchboard.example.com/mcp";
        let settings = |keys| AuthSettings {
            keys,
            issuer: Some("https://login.example.com/".into()),
            audience: Some("switchboard".into()),
            roles_claim: "groups".into(),
            leeway: Duration::from_secs(5),
            roles: RoleTable::defaults(),
        };
        let secret = b"a shared secret for this test only".to_vec();
        let shared = Authenticator::new(settings(VerificationKeys::SharedSecret(secret.clone())));
        let hs256 = EncodingKey::from_secret(&secret);
        let sign_hs256 = |audience: serde_json::Value| {
            let mut claims = claims("https://login.example.com/", "");
            claims["aud"] = audience;
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &hs256).expect("sign")
        };
        let bearer = |token: &str| format!("Bearer {token}");
        let for_endpoint = sign_hs256(serde_json::json!(ENDPOINT));
        // Without the endpoint's URL (before the gateway names it) such a token is for
        // another audience everywhere.
        assert!(
            shared
                .authenticate_for(Resource::McpEndpoint, Some(&bearer(&for_endpoint)))
                .is_err()
        );

        let auth = shared.with_mcp_endpoint(ENDPOINT);
        let for_switchboard = sign_hs256(serde_json::json!("switchboard"));
        let for_both = sign_hs256(serde_json::json!(["elsewhere", ENDPOINT, "switchboard"]));
        let for_endpoint_among_others = sign_hs256(serde_json::json!(["elsewhere", ENDPOINT]));
        let for_another = sign_hs256(serde_json::json!("elsewhere"));
        // Twice each: the second answer comes from the verified-token cache.
        for _ in 0..2 {
            for token in [&for_switchboard, &for_both] {
                for resource in [Resource::Api, Resource::McpEndpoint] {
                    auth.authenticate_for(resource, Some(&bearer(token)))
                        .expect("accepted");
                }
            }
            for token in [&for_endpoint, &for_endpoint_among_others] {
                let caller = auth
                    .authenticate_for(Resource::McpEndpoint, Some(&bearer(token)))
                    .expect("accepted on the endpoint");
                assert_eq!(caller.user.as_str(), "alice@example.com");
                let refused = auth
                    .authenticate(Some(&bearer(token)))
                    .expect_err("refused on the API");
                assert!(
                    refused.to_string().contains(&format!(
                        "the token is for the MCP endpoint ({ENDPOINT}) alone; this route \
                         takes tokens for switchboard"
                    )),
                    "{refused}"
                );
            }
            for resource in [Resource::Api, Resource::McpEndpoint] {
                let refused = auth
                    .authenticate_for(resource, Some(&bearer(&for_another)))
                    .expect_err("another audience");
                assert!(
                    refused.to_string().contains("another audience"),
                    "{refused}"
                );
            }
        }

        // The same with keys from a JWKS (checked per key, not with the shared validation).
        let modulus = include_str!("../testdata/rsa-test-key.n").trim();
        let jwks = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "n": modulus, "e": "AQAB"},
        ]})
        .to_string();
        let auth = Authenticator::new(settings(VerificationKeys::from_jwks(&jwks).expect("JWKS")))
            .with_mcp_endpoint(ENDPOINT);
        let key = EncodingKey::from_rsa_der(include_bytes!("../testdata/rsa-test-key.der"));
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims("https://login.example.com/", ENDPOINT),
            &key,
        )
        .expect("sign");
        auth.authenticate_for(Resource::McpEndpoint, Some(&bearer(&token)))
            .expect("accepted on the endpoint");
        assert!(auth.authenticate(Some(&bearer(&token))).is_err());
    }

    #[test]
    fn a_jwks_without_usable_keys_is_refused_at_start() {
        assert!(VerificationKeys::from_jwks("{\"keys\": []}").is_err());
        assert!(VerificationKeys::from_jwks("not json").is_err());
        assert!(
            VerificationKeys::from_jwks(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err()
        );
    }

    #[test]
    fn unknown_permission_names_in_custom_roles_are_refused() {
        let names = vec!["view_everything".to_owned()];
        let error = RoleTable::with_custom([("support", names.as_slice())]).expect_err("refused");
        assert!(
            error.contains("view_everything") && error.contains("support"),
            "{error}"
        );
        let table = RoleTable::defaults();
        assert_eq!(table.permissions_of(["nonsense"]), Permissions::NONE);
        assert!(
            table
                .permissions_of(["analyst", "orchestrator"])
                .contains(Permission::InvokeForUsers)
        );
    }
}
