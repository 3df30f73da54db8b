//! The sealed value: the bytes a store holds for one entry.
//!
//! Layout: see the crate docs ("Sealed value format").
//!
//! The associated data is the entry name (length-prefixed) followed by the whole header
//! (magic through expiry). So a value copied under another name fails to open, and so does
//! one whose key id, nonce or expiry was changed: nobody can strip a time-to-live or point
//! a value at another key without the tag failing.

use ring::aead::{Aad, NONCE_LEN, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::VaultError;
use crate::keyring::{KeyRing, MAX_KEY_ID_LEN, MasterKey};
use crate::name::{MAX_NAME_LEN, SecretName};
use crate::secret::Secret;

const MAGIC: [u8; 2] = *b"SV";
/// Current sealed-value format version.
pub(crate) const FORMAT_VERSION: u8 = 1;
const FLAG_EXPIRES: u8 = 0b1;
const TAG_LEN: usize = 16;
const MAX_HEADER_LEN: usize = 2 + 1 + 1 + MAX_KEY_ID_LEN + NONCE_LEN + 1 + 8;
const MAX_AAD_LEN: usize = 2 + MAX_NAME_LEN + MAX_HEADER_LEN;

/// The readable part of a sealed value, parsed without any key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header<'a> {
    pub(crate) key_id: &'a str,
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) expires_at_ms: Option<u64>,
    /// Length of the header in bytes; the ciphertext starts here.
    pub(crate) len: usize,
}

impl Header<'_> {
    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// Parses the header of `sealed`; the error is a reason for [`VaultError::Malformed`].
pub(crate) fn parse_header(sealed: &[u8]) -> Result<Header<'_>, String> {
    let too_short = || "it is too short to be a sealed value".to_owned();
    if sealed.len() < 4 || sealed[..2] != MAGIC {
        return Err("it does not start like a sealed value".to_owned());
    }
    if sealed[2] != FORMAT_VERSION {
        return Err(format!(
            "sealed-value format version {} is not known to this build",
            sealed[2]
        ));
    }
    let id_len = usize::from(sealed[3]);
    if id_len == 0 || id_len > MAX_KEY_ID_LEN {
        return Err("its key id length is out of range".to_owned());
    }
    let mut at = 4;
    let key_id = sealed.get(at..at + id_len).ok_or_else(too_short)?;
    let key_id = std::str::from_utf8(key_id)
        .ok()
        .filter(|id| {
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .ok_or_else(|| "its key id is not a valid key id".to_owned())?;
    at += id_len;
    let nonce: [u8; NONCE_LEN] = sealed
        .get(at..at + NONCE_LEN)
        .ok_or_else(too_short)?
        .try_into()
        .map_err(|_| too_short())?;
    at += NONCE_LEN;
    let flags = *sealed.get(at).ok_or_else(too_short)?;
    at += 1;
    if flags & !FLAG_EXPIRES != 0 {
        return Err("it has flags this build does not know".to_owned());
    }
    let expires_at_ms = if flags & FLAG_EXPIRES != 0 {
        let bytes: [u8; 8] = sealed
            .get(at..at + 8)
            .ok_or_else(too_short)?
            .try_into()
            .map_err(|_| too_short())?;
        at += 8;
        Some(u64::from_be_bytes(bytes))
    } else {
        None
    };
    if sealed.len() < at + TAG_LEN {
        return Err(too_short());
    }
    Ok(Header {
        key_id,
        nonce,
        expires_at_ms,
        len: at,
    })
}

/// Fills `buf` with the associated data for `name` + `header_bytes`; returns its length.
fn associated_data(buf: &mut [u8; MAX_AAD_LEN], name: &SecretName, header_bytes: &[u8]) -> usize {
    let name = name.as_str().as_bytes();
    // Both lengths are bounded by construction (validated name, bounded header).
    let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
    buf[..2].copy_from_slice(&name_len.to_be_bytes());
    buf[2..2 + name.len()].copy_from_slice(name);
    let end = 2 + name.len() + header_bytes.len();
    buf[2 + name.len()..end].copy_from_slice(header_bytes);
    end
}

/// Seals `plaintext` for entry `name` under `key`. One allocation: the output buffer, in
/// which the plaintext is encrypted in place.
pub(crate) fn seal(
    key: &MasterKey,
    rng: &SystemRandom,
    name: &SecretName,
    plaintext: &[u8],
    expires_at_ms: Option<u64>,
) -> Result<Vec<u8>, VaultError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce).map_err(|_| VaultError::Crypto {
        reason: "the system random number generator failed",
    })?;
    let key_id = key.id.as_str().as_bytes();
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(u8::try_from(key_id.len()).map_err(|_| VaultError::Crypto {
        reason: "key id too long",
    })?);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&nonce);
    match expires_at_ms {
        Some(at) => {
            out.push(FLAG_EXPIRES);
            out.extend_from_slice(&at.to_be_bytes());
        }
        None => out.push(0),
    }
    let header_len = out.len();
    let mut aad = [0u8; MAX_AAD_LEN];
    let aad_len = associated_data(&mut aad, name, &out);
    out.extend_from_slice(plaintext);
    let tag = key
        .aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&aad[..aad_len]),
            &mut out[header_len..],
        )
        .map_err(|_| VaultError::Crypto {
            reason: "AES-256-GCM sealing failed",
        })?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Parses the header of `sealed` as entry `name`, mapping a bad header to
/// [`VaultError::Malformed`].
pub(crate) fn header_of<'a>(name: &SecretName, sealed: &'a [u8]) -> Result<Header<'a>, VaultError> {
    parse_header(sealed).map_err(|reason| VaultError::Malformed {
        name: name.clone(),
        reason,
    })
}

/// Opens `sealed` (whose parsed header is `header`) as entry `name`, with the key the
/// header names. The header's expiry is authenticated here too: it is part of the
/// associated data.
pub(crate) fn open(
    keyring: &KeyRing,
    name: &SecretName,
    sealed: &[u8],
    header: &Header<'_>,
) -> Result<Secret, VaultError> {
    let key = keyring
        .find(header.key_id)
        .ok_or_else(|| VaultError::UnknownKey {
            name: name.clone(),
            key_id: header.key_id.to_owned(),
        })?;
    let mut aad = [0u8; MAX_AAD_LEN];
    let aad_len = associated_data(&mut aad, name, &sealed[..header.len]);
    // The buffer receives the plaintext in place, so it is wiped on drop whatever happens.
    let mut buf = Zeroizing::new(sealed[header.len..].to_vec());
    let plaintext_len = key
        .aead
        .open_in_place(
            Nonce::assume_unique_for_key(header.nonce),
            Aad::from(&aad[..aad_len]),
            &mut buf,
        )
        .map_err(|_| VaultError::Tampered { name: name.clone() })?
        .len();
    buf.truncate(plaintext_len);
    Ok(Secret::from_zeroizing(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::KeyId;

    fn name(s: &str) -> SecretName {
        SecretName::parse(s).unwrap()
    }

    #[test]
    fn seals_and_opens_with_and_without_expiry() {
        let ring = KeyRing::generate().unwrap();
        let rng = SystemRandom::new();
        for expiry in [None, Some(1_700_000_000_000)] {
            let sealed = seal(ring.current(), &rng, &name("a/b"), b"token", expiry).unwrap();
            let header = parse_header(&sealed).unwrap();
            assert_eq!(header.key_id, ring.current_key_id().as_str());
            assert_eq!(header.expires_at_ms, expiry);
            let secret = open(&ring, &name("a/b"), &sealed, &header).unwrap();
            assert_eq!(secret.expose(), b"token");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let ring = KeyRing::generate().unwrap();
        let sealed = seal(
            ring.current(),
            &SystemRandom::new(),
            &name("n"),
            b"plaintext",
            Some(5),
        )
        .unwrap();
        for index in 0..sealed.len() {
            let mut copy = sealed.clone();
            copy[index] ^= 0x01;
            let opened = header_of(&name("n"), &copy)
                .and_then(|header| open(&ring, &name("n"), &copy, &header));
            assert!(opened.is_err(), "flip at {index} was accepted");
        }
    }

    #[test]
    fn wrong_name_and_wrong_key_are_tampered_and_unknown_key_is_named() {
        let ring = KeyRing::generate_with_id(KeyId::parse("k1").unwrap()).unwrap();
        let other = KeyRing::generate_with_id(KeyId::parse("k1").unwrap()).unwrap();
        let third = KeyRing::generate_with_id(KeyId::parse("k2").unwrap()).unwrap();
        let sealed = seal(ring.current(), &SystemRandom::new(), &name("a"), b"x", None).unwrap();
        let header = parse_header(&sealed).unwrap();
        assert!(matches!(
            open(&ring, &name("b"), &sealed, &header),
            Err(VaultError::Tampered { .. })
        ));
        assert!(matches!(
            open(&other, &name("a"), &sealed, &header),
            Err(VaultError::Tampered { .. })
        ));
        assert!(matches!(
            open(&third, &name("a"), &sealed, &header),
            Err(VaultError::UnknownKey { key_id, .. }) if key_id == "k1"
        ));
    }
}
