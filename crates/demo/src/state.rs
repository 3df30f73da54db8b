//! The demo's state: registered clients (kept in `demo.json`), and in memory the codes,
//! grants, tokens, revocations, tool calls and the issue tracker's issues.
use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::{DemoError, Persisted, SECRET_PREFIX};

/// How long an access token is accepted.
pub(crate) const ACCESS_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// How a client authenticates at the token and revocation endpoints (RFC 7591 names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AuthMethod {
    None,
    ClientSecretBasic,
    ClientSecretPost,
}

impl AuthMethod {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::ClientSecretBasic => "client_secret_basic",
            AuthMethod::ClientSecretPost => "client_secret_post",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<AuthMethod> {
        match name {
            "none" => Some(AuthMethod::None),
            "client_secret_basic" => Some(AuthMethod::ClientSecretBasic),
            "client_secret_post" => Some(AuthMethod::ClientSecretPost),
            _ => None,
        }
    }
}

/// A registered client. Its secret is kept only as a hash: `demo.json` lies in the data
/// directory, where no issued secret may be found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Client {
    pub(crate) method: AuthMethod,
    pub(crate) redirect_uris: Vec<String>,
    pub(crate) secret_sha256: Option<String>,
}

pub(crate) struct Code {
    pub(crate) client_id: String,
    pub(crate) redirect_uri: String,
    pub(crate) challenge: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) issued_at: Instant,
    /// The grant its first exchange created (a replay revokes it, RFC 6749 §4.1.2).
    pub(crate) used_for: Option<usize>,
}

pub(crate) struct Grant {
    pub(crate) client_id: String,
    pub(crate) scopes: Vec<String>,
    pub(crate) revoked: bool,
    pub(crate) current_refresh: Option<String>,
}

pub(crate) struct AccessToken {
    pub(crate) grant: usize,
    pub(crate) expires_at: Instant,
    pub(crate) revoked: bool,
}

/// A revocation request the authorization server accepted (RFC 7009), without the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revocation {
    pub client_id: String,
    /// `access_token`, `refresh_token`, or `unknown` (the token was not one of ours: RFC 7009
    /// answers 200 all the same).
    pub token_kind: &'static str,
}

/// What `GET /demo/stats` reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// `tools/call` requests per tool name.
    pub tool_calls: BTreeMap<String, u64>,
    pub revocations: Vec<Revocation>,
    /// Sign-ins the user allowed and denied.
    pub authorizations_allowed: u64,
    pub authorizations_denied: u64,
    /// Clients registered (kept across restarts).
    pub clients_registered: usize,
}

/// One issue of the tracker.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Issue {
    pub(crate) key: String,
    pub(crate) title: String,
    pub(crate) body: String,
}

pub(crate) struct State {
    pub(crate) persisted: Persisted,
    pub(crate) codes: HashMap<String, Code>,
    pub(crate) grants: Vec<Grant>,
    pub(crate) access_tokens: HashMap<String, AccessToken>,
    /// Refresh token → its grant; valid only while it is the grant's current one.
    pub(crate) refresh_tokens: HashMap<String, usize>,
    pub(crate) stats: Stats,
    pub(crate) issues: Vec<Issue>,
    pub(crate) next_issue: u32,
}

/// Shared by both servers' handlers.
pub(crate) struct Shared {
    /// `http://127.0.0.1:<auth port>`.
    pub(crate) issuer: String,
    /// `http://127.0.0.1:<mcp port>`.
    pub(crate) mcp_origin: String,
    /// `<mcp_origin>/mcp`: the resource tokens are for (RFC 8707).
    pub(crate) resource: String,
    path: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    // The state holds secrets: only where the servers are is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("issuer", &self.issuer)
            .field("resource", &self.resource)
            .finish_non_exhaustive()
    }
}

/// The system random source failed: no secret can be issued.
#[derive(Debug)]
pub(crate) struct NoRandomness;

impl Shared {
    pub(crate) fn new(
        issuer: String,
        mcp_origin: String,
        path: PathBuf,
        persisted: Persisted,
    ) -> Shared {
        let issues = [
            (
                "The sign-in page needs a dark mode",
                "Users at night asked for it.",
            ),
            (
                "Export is slow for large trackers",
                "export_all takes seconds.",
            ),
            (
                "Search ignores accents",
                "Searching for 'cafe' misses 'café'.",
            ),
        ];
        let issues: Vec<Issue> = issues
            .iter()
            .enumerate()
            .map(|(i, (title, body))| Issue {
                key: format!("DEMO-{}", i + 1),
                title: (*title).to_owned(),
                body: (*body).to_owned(),
            })
            .collect();
        let clients_registered = persisted.clients.len();
        Shared {
            issuer,
            resource: format!("{mcp_origin}/mcp"),
            mcp_origin,
            path,
            state: Mutex::new(State {
                persisted,
                codes: HashMap::new(),
                grants: Vec::new(),
                access_tokens: HashMap::new(),
                refresh_tokens: HashMap::new(),
                stats: Stats {
                    clients_registered,
                    ..Stats::default()
                },
                next_issue: issues.len() as u32 + 1,
                issues,
            }),
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        // A handler that panicked mid-update leaves nothing half-done that matters to a demo.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> Stats {
        self.state().stats.clone()
    }

    /// Saves the registered clients (and ports).
    pub(crate) fn save(&self, persisted: &Persisted) -> Result<(), DemoError> {
        save(&self.path, persisted)
    }
}

/// Writes `demo.json` whole (a temporary file renamed over it).
pub(crate) fn save(path: &Path, persisted: &Persisted) -> Result<(), DemoError> {
    let error = |e: &dyn std::fmt::Display| DemoError::WriteState {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| error(&e))?;
    }
    let text = serde_json::to_vec_pretty(persisted).map_err(|e| error(&e))?;
    let temporary = path.with_extension("json.tmp");
    std::fs::write(&temporary, text).map_err(|e| error(&e))?;
    std::fs::rename(&temporary, path).map_err(|e| error(&e))
}

/// 32 random bytes, base64url.
pub(crate) fn random_text() -> Result<String, NoRandomness> {
    let mut bytes = [0_u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| NoRandomness)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// A new secret: [`SECRET_PREFIX`], its kind, random text.
pub(crate) fn mint(kind: &str) -> Result<String, NoRandomness> {
    Ok(format!("{SECRET_PREFIX}{kind}_{}", random_text()?))
}

/// SHA-256, base64url: how client secrets are kept.
pub(crate) fn sha256(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()))
}

/// What the MCP endpoint makes of a bearer token.
pub(crate) enum TokenCheck {
    Valid,
    Invalid(&'static str),
}

impl State {
    pub(crate) fn check_access_token(&self, token: &str) -> TokenCheck {
        let Some(access) = self.access_tokens.get(token) else {
            return TokenCheck::Invalid("The access token is not known");
        };
        let revoked = self.grants.get(access.grant).is_none_or(|g| g.revoked);
        if access.revoked || revoked {
            return TokenCheck::Invalid("The access token was revoked");
        }
        if Instant::now() >= access.expires_at {
            return TokenCheck::Invalid("The access token expired");
        }
        TokenCheck::Valid
    }

    /// Revokes a grant: its refresh token and every access token stop working.
    pub(crate) fn revoke_grant(&mut self, grant: usize) {
        if let Some(grant) = self.grants.get_mut(grant) {
            grant.revoked = true;
            grant.current_refresh = None;
        }
        for access in self.access_tokens.values_mut() {
            if access.grant == grant {
                access.revoked = true;
            }
        }
    }
}
