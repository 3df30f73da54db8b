//! `switchboard token`: a signed development token, and the shared secret `up` verifies
//! tokens with when no key is configured (generated once into `<data-dir>/jwt.secret`).
use std::{io::Write, path::Path, time::Duration};

use anyhow::Context;
use base64::Engine;

use crate::{cli::TokenArgs, configuration::Settings};

/// The HS256 secret: configured, from a file, or (`generate`) the data directory's generated
/// one. `Ok(None)` when tokens are verified with a JWKS instead.
pub fn shared_secret(settings: &Settings, generate: bool) -> anyhow::Result<Option<SharedSecret>> {
    let auth = &settings.auth;
    if let Some(secret) = &auth.jwt_secret {
        return Ok(Some(SharedSecret::configured(secret.as_bytes().to_vec())));
    }
    if let Some(file) = &auth.jwt_secret_file {
        let secret = crate::configuration::read_secret_file(file, "JWT secret")?;
        return Ok(Some(SharedSecret::configured(secret.into_bytes())));
    }
    if auth.jwks_file.is_some() {
        return Ok(None);
    }
    let path = settings.data_dir.join("jwt.secret");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim().as_bytes().to_vec();
            anyhow::ensure!(
                !secret.is_empty(),
                "{} is empty; delete it to get a new one",
                path.display()
            );
            return Ok(Some(SharedSecret {
                bytes: secret,
                generated: None,
            }));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "no JWT secret: set auth.jwt_secret_file (SWITCHBOARD_JWT_SECRET_FILE), or start \
             `switchboard up` once with this data directory ({}) to generate one",
            settings.data_dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let bytes = generate_secret_file(&path)?;
    Ok(Some(SharedSecret {
        bytes,
        generated: Some(path),
    }))
}

/// An HS256 secret and, when `up` just made it, where.
#[derive(Clone)]
pub struct SharedSecret {
    pub bytes: Vec<u8>,
    pub generated: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSecret")
            .field("generated", &self.generated)
            .finish_non_exhaustive()
    }
}

impl SharedSecret {
    fn configured(bytes: Vec<u8>) -> Self {
        SharedSecret {
            bytes,
            generated: None,
        }
    }
}

/// 32 random bytes, base64url, in a new 0600 file (the data directory 0700).
fn generate_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut random = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut random)
        .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(text.into_bytes())
}

pub fn print(settings: &Settings, args: &TokenArgs) -> anyhow::Result<()> {
    domain::UserId::parse(&args.user).context("--user")?;
    // Never a new secret here: `up` would not know it (another data directory, or one `up`
    // has not started with), and its tokens would all be refused.
    let secret = shared_secret(settings, false)?.ok_or_else(|| {
        anyhow::anyhow!(
            "tokens are verified with a JWKS (auth.jwks_file); mint them with the identity \
             provider that holds its private keys"
        )
    })?;
    let token = gateway::auth::mint_token(
        &secret.bytes,
        &gateway::auth::TokenRequest {
            user: &args.user,
            roles: &args.roles,
            ttl: args.ttl,
            issuer: settings.auth.issuer.as_deref(),
            audience: settings.auth.audience.as_deref(),
            roles_claim: &settings.auth.roles_claim,
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    println!("{token}");
    Ok(())
}

/// `30s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30m, 1h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a usable duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
