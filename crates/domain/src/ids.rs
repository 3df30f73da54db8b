//! Identifiers: server ids (UUIDs), invocation ids (the orchestrator's opaque ids), user ids,
//! and the subject-safe user key.
use std::fmt;

use uuid::Uuid;

use crate::DomainError;

/// Parses the hyphenated form only (36 characters), so one id has one spelling everywhere:
/// in subjects, in events, in URLs.
fn parse_hyphenated_uuid(text: &str) -> Option<Uuid> {
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text).ok().filter(|id| !id.is_nil())
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $error:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7).
            #[allow(clippy::new_without_default)] // a default id would be a random one: say so
            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }

            /// Accepts any non-nil UUID in the hyphenated form (either case); ids Switchboard
            /// makes are UUIDv7, ids from elsewhere (an orchestrator's invocation id) need not be.
            pub fn parse(text: &str) -> Result<Self, DomainError> {
                parse_hyphenated_uuid(text).map($name).ok_or($error)
            }

            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl std::str::FromStr for $name {
            type Err = DomainError;
            fn from_str(text: &str) -> Result<Self, DomainError> {
                $name::parse(text)
            }
        }

        /// As its hyphenated text, the one spelling used everywhere (projection snapshots).
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                $name::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// A configured MCP server's id: `server.<server_id>` is its aggregate's subject.
    ServerId,
    DomainError::ServerIdInvalid
);
/// One tool call request, named by the orchestrator's own id for the tool call (`toolu_01A…`,
/// `call_abc…`, a UUID, a hex string): opaque, 1–128 characters, no control characters,
/// compared byte for byte. At most one call to the MCP server per invocation id (of a user).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InvocationId(String);
string_newtype_impls!(InvocationId);

impl InvocationId {
    pub const MAX_CHARS: usize = 128;

    /// A new id (a UUIDv7), for callers that have none of their own.
    #[allow(clippy::new_without_default)] // a default id would be a random one: say so
    pub fn new() -> Self {
        InvocationId(Uuid::now_v7().hyphenated().to_string())
    }

    pub fn parse(text: &str) -> Result<Self, DomainError> {
        let length = text.chars().count();
        if length == 0 || length > Self::MAX_CHARS || text.chars().any(char::is_control) {
            return Err(DomainError::InvocationIdInvalid);
        }
        Ok(InvocationId(text.to_owned()))
    }

    /// A subject token for this id: 32 hex digits of its SHA-256. Fixed length (an id of 128
    /// four-byte characters escaped would not fit beside the longest user key in a subject),
    /// subject-safe whatever characters the orchestrator used, and one token per id.
    pub fn subject_token(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        let mut token = String::with_capacity(32);
        for byte in &digest.as_ref()[..16] {
            token.push(char::from(HEX_LOWER[usize::from(byte >> 4)]));
            token.push(char::from(HEX_LOWER[usize::from(byte & 0x0f)]));
        }
        token
    }
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";

impl std::str::FromStr for InvocationId {
    type Err = DomainError;
    fn from_str(text: &str) -> Result<Self, DomainError> {
        InvocationId::parse(text)
    }
}

impl serde::Serialize for InvocationId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for InvocationId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        InvocationId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// The id of a user of the host product, as its identity provider issued it (often an e-mail
/// address). Opaque: compared byte for byte, never trimmed or case-folded.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);
string_newtype_impls!(UserId);

impl UserId {
    pub const MAX_CHARS: usize = 256;

    pub fn parse(text: &str) -> Result<UserId, DomainError> {
        if text.is_empty() {
            return Err(DomainError::UserIdEmpty);
        }
        let length = text.chars().count();
        if length > Self::MAX_CHARS {
            return Err(DomainError::UserIdTooLong {
                length,
                max: Self::MAX_CHARS,
            });
        }
        if text.chars().any(char::is_control) {
            return Err(DomainError::UserIdInvalidCharacter);
        }
        Ok(UserId(text.to_owned()))
    }

    /// The subject-safe form of this id.
    pub fn key(&self) -> UserKey {
        UserKey::encode(self)
    }
}

/// A user id encoded for use as one NATS subject token (and a file name part): the bytes
/// `A-Z a-z 0-9 -` stay as they are, every other UTF-8 byte (`_` included, so the encoding is
/// reversible) becomes `_XX` in uppercase hex: `alice@example.com` → `alice_40example_2Ecom`.
///
/// The encoding is a bijection: [`UserKey::decode`] accepts only the canonical form (no
/// lowercase hex, no needlessly escaped byte), so one user has exactly one key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(String);
string_newtype_impls!(UserKey);

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn kept_literally(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-'
}

fn upper_hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

impl UserKey {
    pub fn encode(user: &UserId) -> UserKey {
        let bytes = user.0.as_bytes();
        let escaped = bytes.iter().filter(|b| !kept_literally(**b)).count();
        let mut key = String::with_capacity(bytes.len() + 2 * escaped);
        for &byte in bytes {
            if kept_literally(byte) {
                key.push(char::from(byte));
            } else {
                key.push('_');
                key.push(char::from(HEX_UPPER[usize::from(byte >> 4)]));
                key.push(char::from(HEX_UPPER[usize::from(byte & 0x0f)]));
            }
        }
        UserKey(key)
    }

    /// The user id a key stands for; refuses anything [`UserKey::encode`] would not produce.
    pub fn decode(key: &str) -> Result<UserId, DomainError> {
        let bytes = key.as_bytes();
        let mut decoded = Vec::with_capacity(bytes.len());
        let mut index = 0;
        while let Some(&byte) = bytes.get(index) {
            if byte == b'_' {
                let high = bytes.get(index + 1).copied().and_then(upper_hex_value);
                let low = bytes.get(index + 2).copied().and_then(upper_hex_value);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(DomainError::UserKeyInvalid);
                };
                let value = (high << 4) | low;
                if kept_literally(value) {
                    return Err(DomainError::UserKeyInvalid);
                }
                decoded.push(value);
                index += 3;
            } else if kept_literally(byte) {
                decoded.push(byte);
                index += 1;
            } else {
                return Err(DomainError::UserKeyInvalid);
            }
        }
        let text = String::from_utf8(decoded).map_err(|_| DomainError::UserKeyInvalid)?;
        UserId::parse(&text).map_err(|_| DomainError::UserKeyInvalid)
    }

    /// Validates a key received from elsewhere (a subject token).
    pub fn parse(key: &str) -> Result<UserKey, DomainError> {
        UserKey::decode(key)?;
        Ok(UserKey(key.to_owned()))
    }
}

impl From<&UserId> for UserKey {
    fn from(user: &UserId) -> Self {
        UserKey::encode(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids_are_uuid_v7_and_parse_back() {
        let id = ServerId::new();
        assert_eq!(id.as_uuid().get_version_num(), 7);
        assert_eq!(ServerId::parse(&id.to_string()), Ok(id));
        assert_eq!(
            ServerId::parse(&id.to_string().to_uppercase()),
            Ok(id),
            "either case parses"
        );
    }

    #[test]
    fn ids_accept_only_the_hyphenated_non_nil_form() {
        for bad in [
            "",
            "not-a-uuid",
            "00000000-0000-0000-0000-000000000000",
            "0190f3c4a8b27c3d9e1f000000000000",
            "{0190f3c4-a8b2-7c3d-9e1f-000000000000}",
            "urn:uuid:0190f3c4-a8b2-7c3d-9e1f-000000000000",
        ] {
            assert_eq!(
                ServerId::parse(bad).map_err(|e| e.code()),
                Err("server_id_invalid"),
                "{bad}"
            );
        }
    }

    #[test]
    fn invocation_ids_are_the_orchestrators_opaque_ids() {
        for good in [
            "toolu_01A09q90qw90lq917835lq9",
            "call_abc123",
            "3f2b1c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d",
            "deadbeef",
            "x",
            "with space and ünïcödé",
        ] {
            assert_eq!(
                InvocationId::parse(good).map(|id| id.to_string()),
                Ok(good.to_owned())
            );
        }
        assert!(
            InvocationId::parse(&"é".repeat(128)).is_ok(),
            "characters, not bytes"
        );
        for bad in ["".to_owned(), "a".repeat(129), "a\nb".to_owned()] {
            assert_eq!(
                InvocationId::parse(&bad).map_err(|e| e.code()),
                Err("invocation_id_invalid"),
                "{bad:?}"
            );
        }
        let id = InvocationId::parse(&"🦀".repeat(128)).unwrap();
        let token = id.subject_token();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token, InvocationId::parse("a").unwrap().subject_token());
    }

    #[test]
    fn user_id_rules() {
        assert!(UserId::parse("alice@example.com").is_ok());
        assert!(UserId::parse(" spaced id ").is_ok(), "opaque, not trimmed");
        assert_eq!(
            UserId::parse("").map_err(|e| e.code()),
            Err("user_id_empty")
        );
        assert_eq!(
            UserId::parse("a\nb").map_err(|e| e.code()),
            Err("user_id_invalid_character")
        );
        assert!(
            UserId::parse(&"é".repeat(256)).is_ok(),
            "256 characters, not bytes"
        );
        assert_eq!(
            UserId::parse(&"a".repeat(257)).map_err(|e| e.code()),
            Err("user_id_too_long")
        );
    }

    #[test]
    fn user_key_encodes_the_documented_example() {
        let user = UserId::parse("alice@example.com").unwrap();
        assert_eq!(user.key().as_str(), "alice_40example_2Ecom");
        assert_eq!(UserKey::decode("alice_40example_2Ecom"), Ok(user));
    }

    #[test]
    fn user_key_roundtrips_tricky_ids_and_is_subject_safe() {
        let tricky = [
            "a",
            "_",
            "__",
            "_40",
            "-",
            "a.b",
            "a b",
            "a*b>c",
            "user@example.com",
            "UPPER.lower-123_x",
            "ünïcödé",
            "日本語のユーザー",
            "emoji 🦀 user",
            "%2E%40",
            "trailing.",
            ".leading",
            "a/b\\c",
            "$JS.API",
            "tab\u{00a0}nbsp",
        ];
        // plus every printable character of a few ranges, inside text
        let texts = tricky.iter().map(|t| (*t).to_owned()).chain(
            (0x20u32..0x2000)
                .filter_map(char::from_u32)
                .filter(|c| !c.is_control())
                .map(|c| format!("x{c}y")),
        );
        let mut keys = std::collections::HashSet::new();
        for text in texts {
            let text = text.as_str();
            let user = UserId::parse(text).unwrap();
            let key = user.key();
            assert!(
                key.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{key:?}"
            );
            assert_eq!(UserKey::decode(key.as_str()).as_ref(), Ok(&user), "{text}");
            assert_eq!(UserKey::parse(key.as_str()).as_ref(), Ok(&key));
            assert!(keys.insert(key), "two users share a key: {text}");
        }
    }

    #[test]
    fn user_key_decode_accepts_only_the_canonical_form() {
        for bad in [
            "", "a.b", "a_4", "a_4g", "a_2e", // lowercase hex
            "_41",  // 'A' escaped needlessly: two spellings for one user
            "_FF",  // not UTF-8
            "_0A",  // a control character: not a user id
            "a b",
        ] {
            assert_eq!(
                UserKey::decode(bad).map_err(|e| e.code()),
                Err("user_key_invalid"),
                "{bad:?}"
            );
        }
    }
}
