//! The plaintext of a vault entry.

use std::fmt;

use zeroize::Zeroizing;

/// A plaintext secret: a token, a client secret, a PKCE verifier.
///
/// The bytes are wiped from memory when the value is dropped (also after a clone). `Debug`
/// prints only the length; there is deliberately no `Display`, `Serialize` or `PartialEq`,
/// so a secret cannot end up in a log line, a JSON body or a timing side channel by accident.
/// Read it with [`Secret::expose`] at the one place that needs the plaintext.
#[derive(Clone, Default)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Takes ownership of `bytes` (no copy is made).
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    /// Copies `bytes`; the caller stays responsible for wiping its own copy.
    pub fn from_slice(bytes: &[u8]) -> Secret {
        Secret::new(bytes.to_vec())
    }

    /// The plaintext. Keep the borrow short.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The plaintext as UTF-8 (OAuth tokens are), or `None` if it is not valid UTF-8.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Secret {
        Secret(bytes)
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Secret::new(bytes)
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Self {
        Secret::new(text.into_bytes())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let secret = Secret::from("gho_supersecret".to_owned());
        let printed = format!("{secret:?} {secret:#?}");
        assert!(!printed.contains("supersecret"));
        assert!(printed.contains("Secret(<redacted, 15 bytes>)"));
    }
}
