//! The validated name of a vault entry.

use std::fmt;

use crate::error::VaultError;

/// Longest accepted entry name, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The name of a vault entry, e.g. `token/github_prod/user-42` or `oauth_state/3q2-7w`.
///
/// Valid names are 1–255 characters from `[A-Za-z0-9_\-=./]`, do not start or end with `.`
/// or `/`, and contain no `..`. That is a subset of what a JetStream KV key accepts (a
/// subject without empty tokens or wildcards), so a name is stored as-is in the KV bucket;
/// the file store never uses it as a path (it hashes it), so no name can escape the vault
/// directory.
///
/// Names are not secret (they appear in logs, errors and reports); never put a token or a
/// code into a name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SecretName(String);

impl SecretName {
    /// Validates `name`.
    pub fn parse(name: impl Into<String>) -> Result<SecretName, VaultError> {
        let name = name.into();
        validate(&name).map_err(|reason| VaultError::InvalidName { reason })?;
        Ok(SecretName(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a vault entry name cannot be empty".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "a vault entry name has at most {MAX_NAME_LEN} characters, this one has {}",
            name.len()
        ));
    }
    if let Some((position, character)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '.' | '/')))
    {
        // Only the offending character is echoed, never the whole input: a caller that
        // passed a token where a name belongs must not see it land in a log line.
        return Err(format!(
            "a vault entry name may contain only letters, digits and `_ - = . /`; found {character:?} at position {position}"
        ));
    }
    if name.starts_with(['.', '/']) || name.ends_with(['.', '/']) {
        return Err("a vault entry name cannot start or end with `.` or `/`".to_owned());
    }
    if name.contains("..") {
        return Err("a vault entry name cannot contain `..`".to_owned());
    }
    Ok(())
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretName({:?})", self.0)
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretName {
    type Err = VaultError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecretName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_names() {
        for name in [
            "a",
            "token/github_prod/user-42",
            "oauth_state/AbC-_=",
            "client.secret/x",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert!(SecretName::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn refuses_names_that_could_escape_or_break_subjects() {
        for name in [
            "",
            ".hidden",
            "trailing.",
            "/abs",
            "dir/",
            "a/../b",
            "a..b",
            "with space",
            "star*",
            "gt>",
            "üml",
            "back\\slash",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(
                matches!(SecretName::parse(name), Err(VaultError::InvalidName { .. })),
                "{name:?}"
            );
        }
    }
}
