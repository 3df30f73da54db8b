//! Master keys: their ids, the key file format, and the [`KeyRing`] the vault seals with.
//!
//! # Key file format
//!
//! A UTF-8 text file (and the same text in the `SWITCHBOARD_VAULT_KEYS` environment
//! variable). Blank lines and lines starting with `#` are ignored; outside comments `;` also
//! separates entries, so the whole configuration fits one environment-variable line.
//!
//! ```text
//! # Switchboard vault master keys.
//! key k20260425-9f3a1c0e q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=
//! key k20261101-04d2e7aa 3q2+796tvu/erb7v3q2+796tvu/erb7v3q2+796tvu8=
//! current k20261101-04d2e7aa
//! ```
//!
//! - `key <key-id> <base64>`: a 32-byte AES-256 key in standard, padded base64. Key ids are
//!   1–64 characters from `[A-Za-z0-9_-]` and are written into every sealed value.
//! - `current <key-id>`: the key new writes are sealed with. It may be left out when there is
//!   exactly one key.
//!
//! Every other key is kept only to open entries sealed before a rotation.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::VaultError;
use crate::fsutil;

/// Name of the environment variable that holds the key configuration (key file format).
pub const KEYS_ENV_VAR: &str = "SWITCHBOARD_VAULT_KEYS";

/// Length of a master key in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// Longest accepted key id.
pub const MAX_KEY_ID_LEN: usize = 64;

/// Raw key material, wiped on drop.
type KeyBytes = Zeroizing<[u8; KEY_LEN]>;

/// The comment at the top of a rendered key file.
const RENDERED_PREAMBLE: &str = "# Switchboard vault master keys. Anyone with this file can read every stored token:\n\
     # keep it private (mode 0600) and back it up; without it the vault cannot be opened.\n\
     # Format: `key <key-id> <base64 32-byte key>` lines and one `current <key-id>` line.\n";
/// Longest `key <id> <base64>\n` line of a rendered key file.
const RENDERED_KEY_LINE_MAX: usize =
    "key ".len() + MAX_KEY_ID_LEN + 1 + KEY_LEN.div_ceil(3) * 4 + 1;
/// Longest `current <id>\n` line of a rendered key file.
const RENDERED_CURRENT_LINE_MAX: usize = "current ".len() + MAX_KEY_ID_LEN + 1;

/// The id of a master key, e.g. `k20260425-9f3a1c0e`. Recorded in every sealed value so the
/// vault knows which key opens it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Validates a key id: 1–64 characters from `[A-Za-z0-9_-]`.
    pub fn parse(id: impl Into<String>) -> Result<KeyId, VaultError> {
        let id = id.into();
        if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
            return Err(VaultError::key_config(format!(
                "a key id has 1 to {MAX_KEY_ID_LEN} characters"
            )));
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(VaultError::key_config(
                "a key id may contain only letters, digits, `_` and `-`",
            ));
        }
        Ok(KeyId(id))
    }

    /// A fresh id: `k<yyyymmdd>-<8 random hex digits>`, so ids sort by creation date and
    /// say when a key was made.
    pub fn generate() -> Result<KeyId, VaultError> {
        let mut random = [0u8; 4];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| VaultError::Crypto {
                reason: "the system random number generator failed",
            })?;
        let days = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() / 86_400)
            .unwrap_or(0);
        let (year, month, day) = civil_from_days(days as i64);
        Ok(KeyId(format!(
            "k{year:04}{month:02}{day:02}-{:02x}{:02x}{:02x}{:02x}",
            random[0], random[1], random[2], random[3]
        )))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({:?})", self.0)
    }
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A master key prepared for sealing and opening.
pub(crate) struct MasterKey {
    pub(crate) id: KeyId,
    pub(crate) aead: LessSafeKey,
}

/// The master keys the vault can use, with one marked current (used for every new write).
///
/// The AES key schedules are prepared once, when the ring is built, not per call. Build one
/// from configuration with [`KeyRing::load_from_env_or_file`] or
/// [`KeyRing::load_or_generate`]; swap it in a running vault with
/// [`Vault::set_keyring`](crate::Vault::set_keyring). `Debug` lists key ids only.
pub struct KeyRing {
    keys: Vec<MasterKey>,
    current: usize,
}

impl KeyRing {
    /// Parses the key file format (see the [module docs](self)).
    pub fn parse(text: &str) -> Result<KeyRing, VaultError> {
        KeySet::parse(text)?.keyring()
    }

    /// A ring with one fresh random key held only in memory, e.g. for tests. Entries sealed
    /// with it are lost when the process ends.
    pub fn generate() -> Result<KeyRing, VaultError> {
        KeyRing::generate_with_id(KeyId::generate()?)
    }

    /// Like [`KeyRing::generate`], with a chosen key id.
    pub fn generate_with_id(id: KeyId) -> Result<KeyRing, VaultError> {
        KeySet {
            keys: vec![(id.clone(), random_key()?)],
            current: id,
        }
        .keyring()
    }

    /// Reads `SWITCHBOARD_VAULT_KEYS` if it is set and not empty, else the key file at
    /// `path`. Fails with [`VaultError::KeyConfig`] if neither exists.
    pub fn load_from_env_or_file(path: &Path) -> Result<KeyRing, VaultError> {
        load(env_keys()?, path, false)
    }

    /// The embedded default: like [`KeyRing::load_from_env_or_file`], but when neither the
    /// variable nor the file exists, generates the key file (see
    /// [`KeyRing::generate_key_file`]).
    pub fn load_or_generate(path: &Path) -> Result<KeyRing, VaultError> {
        load(env_keys()?, path, true)
    }

    /// Creates a key file at `path` (mode 0600; missing parent directories are created with
    /// mode 0700) holding one new random key, current, and warns loudly that it did: that file
    /// is now the only way to open the vault. Fails if the file already exists.
    pub fn generate_key_file(path: &Path) -> Result<KeyRing, VaultError> {
        KeyFile::create(path)?.keyring()
    }

    /// The id of the key new writes are sealed with.
    pub fn current_key_id(&self) -> &KeyId {
        &self.keys[self.current].id
    }

    /// Ids of all loaded keys, in the order they were configured.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.iter().map(|k| &k.id)
    }

    /// Whether a key with this id is loaded.
    pub fn contains(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    pub(crate) fn current(&self) -> &MasterKey {
        &self.keys[self.current]
    }

    /// Finds a key by the id bytes recorded in a sealed value.
    pub(crate) fn find(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id.as_str() == id)
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", self.current_key_id())
            .field("keys", &self.key_ids().collect::<Vec<_>>())
            .finish()
    }
}

fn env_keys() -> Result<Option<Zeroizing<String>>, VaultError> {
    env_value(std::env::var(KEYS_ENV_VAR))
}

/// The variable's value if it is set and not blank. A value that is set but not UTF-8 is an
/// error: ignoring it would fall back to the key file, or even generate a new key.
fn env_value(
    value: Result<String, std::env::VarError>,
) -> Result<Option<Zeroizing<String>>, VaultError> {
    match value {
        Ok(value) => Ok(Some(Zeroizing::new(value)).filter(|value| !value.trim().is_empty())),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(VaultError::key_config(format!(
            "{KEYS_ENV_VAR} is set but is not valid UTF-8"
        ))),
    }
}

fn load(
    env_value: Option<Zeroizing<String>>,
    path: &Path,
    generate_if_missing: bool,
) -> Result<KeyRing, VaultError> {
    if let Some(value) = env_value {
        let ring = KeySet::parse(&value)
            .map_err(|e| VaultError::key_config(format!("in {KEYS_ENV_VAR}: {e}")))?
            .keyring()?;
        tracing::info!(
            source = KEYS_ENV_VAR,
            current_key = %ring.current_key_id(),
            keys = ring.keys.len(),
            "vault master keys loaded"
        );
        return Ok(ring);
    }
    match KeyFile::try_load(path) {
        Ok(file) => {
            let ring = file.keyring()?;
            tracing::info!(
                source = %path.display(),
                current_key = %ring.current_key_id(),
                keys = ring.keys.len(),
                "vault master keys loaded"
            );
            Ok(ring)
        }
        Err(KeyFileError::Missing) if generate_if_missing => KeyRing::generate_key_file(path),
        Err(KeyFileError::Missing) => Err(VaultError::key_config(format!(
            "no vault master keys: set {KEYS_ENV_VAR} or create the key file {}",
            path.display()
        ))),
        Err(KeyFileError::Other(e)) => Err(e),
    }
}

fn random_key() -> Result<KeyBytes, VaultError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|_| VaultError::Crypto {
            reason: "the system random number generator failed",
        })?;
    Ok(key)
}

/// Parsed key configuration: raw keys plus the current id.
struct KeySet {
    keys: Vec<(KeyId, KeyBytes)>,
    current: KeyId,
}

impl KeySet {
    fn parse(text: &str) -> Result<KeySet, VaultError> {
        let mut keys: Vec<(KeyId, KeyBytes)> = Vec::new();
        let mut current: Option<KeyId> = None;
        // Errors name the line, never echo it: a line may hold key material.
        let entries = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim_start().starts_with('#'))
            .flat_map(|(index, line)| line.split(';').map(move |entry| (index + 1, entry)));
        for (line_no, line) in entries {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("key"), Some(id), Some(encoded), None) => {
                    let id = KeyId::parse(id).map_err(|e| {
                        VaultError::key_config(format!("line {line_no}: {}", reason_of(e)))
                    })?;
                    if keys.iter().any(|(existing, _)| *existing == id) {
                        return Err(VaultError::key_config(format!(
                            "line {line_no}: key id `{id}` is listed twice"
                        )));
                    }
                    keys.push((id, decode_key(encoded, line_no)?));
                }
                (Some("current"), Some(id), None, None) => {
                    if current.is_some() {
                        return Err(VaultError::key_config(format!(
                            "line {line_no}: only one `current <key-id>` entry is allowed"
                        )));
                    }
                    current = Some(KeyId::parse(id).map_err(|e| {
                        VaultError::key_config(format!("line {line_no}: {}", reason_of(e)))
                    })?);
                }
                _ => {
                    return Err(VaultError::key_config(format!(
                        "line {line_no}: expected `key <key-id> <base64 32-byte key>` or `current <key-id>`"
                    )));
                }
            }
        }
        let current = match (current, keys.len()) {
            (Some(current), _) => {
                if !keys.iter().any(|(id, _)| *id == current) {
                    return Err(VaultError::key_config(format!(
                        "the current key `{current}` is not among the listed keys"
                    )));
                }
                current
            }
            (None, 0) => {
                return Err(VaultError::key_config(
                    "no keys: add a line `key <key-id> <base64 32-byte key>`",
                ));
            }
            (None, 1) => keys[0].0.clone(),
            (None, _) => {
                return Err(VaultError::key_config(
                    "several keys but no `current <key-id>` line saying which one seals new writes",
                ));
            }
        };
        Ok(KeySet { keys, current })
    }

    /// An upper bound of the rendered length, reserved up front: a growing String reallocates,
    /// and the buffer it leaves behind (holding the keys written so far) is freed unwiped.
    fn render_capacity(&self) -> usize {
        RENDERED_PREAMBLE.len()
            + self.keys.len() * RENDERED_KEY_LINE_MAX
            + RENDERED_CURRENT_LINE_MAX
    }

    fn render(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::with_capacity(self.render_capacity()));
        text.push_str(RENDERED_PREAMBLE);
        for (id, key) in &self.keys {
            let encoded = Zeroizing::new(BASE64.encode(key.as_ref()));
            text.push_str("key ");
            text.push_str(id.as_str());
            text.push(' ');
            text.push_str(&encoded);
            text.push('\n');
        }
        text.push_str("current ");
        text.push_str(self.current.as_str());
        text.push('\n');
        text
    }

    fn keyring(&self) -> Result<KeyRing, VaultError> {
        let mut keys = Vec::with_capacity(self.keys.len());
        let mut current = 0;
        for (index, (id, bytes)) in self.keys.iter().enumerate() {
            let unbound = UnboundKey::new(&AES_256_GCM, bytes.as_ref()).map_err(|_| {
                VaultError::key_config(format!("key `{id}` is not a valid AES-256 key"))
            })?;
            if *id == self.current {
                current = index;
            }
            keys.push(MasterKey {
                id: id.clone(),
                aead: LessSafeKey::new(unbound),
            });
        }
        Ok(KeyRing { keys, current })
    }
}

fn reason_of(error: VaultError) -> String {
    match error {
        VaultError::KeyConfig { reason } => reason,
        other => other.to_string(),
    }
}

fn decode_key(encoded: &str, line_no: usize) -> Result<KeyBytes, VaultError> {
    let decoded = Zeroizing::new(BASE64.decode(encoded).map_err(|_| {
        VaultError::key_config(format!(
            "line {line_no}: the key is not valid (padded, standard) base64"
        ))
    })?);
    if decoded.len() != KEY_LEN {
        return Err(VaultError::key_config(format!(
            "line {line_no}: the key decodes to {} bytes; it must be {KEY_LEN}",
            decoded.len()
        )));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&decoded);
    Ok(key)
}

enum KeyFileError {
    Missing,
    Other(VaultError),
}

/// An editable key file, used by `switchboard vault rotate` to add a new current key and to
/// retire an old one. Changes are written with [`KeyFile::save`] (atomic replace, mode
/// 0600). `Debug` lists key ids only.
///
/// A rotation, from the command line's point of view:
/// 1. [`KeyFile::add_new_key`] (`make_current: true`), [`KeyFile::save`], hand
///    [`KeyFile::keyring`] to [`Vault::set_keyring`](crate::Vault::set_keyring);
/// 2. [`Vault::rotate`](crate::Vault::rotate) re-seals every entry under the new key;
/// 3. [`Vault::retire_key`](crate::Vault::retire_key) drops the old key from the file once no
///    entry uses it.
pub struct KeyFile {
    path: PathBuf,
    keys: KeySet,
}

impl KeyFile {
    /// Reads and parses the key file at `path`. Warns if group or others can read it.
    pub fn load(path: impl Into<PathBuf>) -> Result<KeyFile, VaultError> {
        let path = path.into();
        match KeyFile::try_load(&path) {
            Ok(file) => Ok(file),
            Err(KeyFileError::Missing) => Err(VaultError::key_config(format!(
                "the vault key file {} does not exist",
                path.display()
            ))),
            Err(KeyFileError::Other(e)) => Err(e),
        }
    }

    fn try_load(path: &Path) -> Result<KeyFile, KeyFileError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(KeyFileError::Missing),
            Err(e) => {
                return Err(KeyFileError::Other(VaultError::key_config(format!(
                    "cannot read the vault key file {}: {e}",
                    path.display()
                ))));
            }
        };
        // Kubernetes and Docker secrets are often mounted 0644 inside a private container,
        // so a wide mode is worth a warning, not a refusal.
        if let Ok(bits) = fsutil::group_or_other_bits(path)
            && bits != 0
        {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{bits:o}"),
                "the vault key file can be read by other users; run `chmod 600` on it"
            );
        }
        let keys = KeySet::parse(&text).map_err(|e| {
            KeyFileError::Other(VaultError::key_config(format!(
                "in {}: {}",
                path.display(),
                reason_of(e)
            )))
        })?;
        Ok(KeyFile {
            path: path.to_owned(),
            keys,
        })
    }

    /// Creates a new key file with one fresh random key (current), mode 0600, and warns
    /// loudly. Fails if the file exists.
    pub fn create(path: impl Into<PathBuf>) -> Result<KeyFile, VaultError> {
        let path = path.into();
        let id = KeyId::generate()?;
        let file = KeyFile {
            path,
            keys: KeySet {
                keys: vec![(id.clone(), random_key()?)],
                current: id.clone(),
            },
        };
        let io_error = |e: io::Error| {
            VaultError::key_config(format!(
                "cannot create the vault key file {}: {e}",
                file.path.display()
            ))
        };
        if let Some(parent) = file.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsutil::create_private_dir_all(parent).map_err(io_error)?;
        }
        let written = (|| {
            use std::io::Write as _;
            let mut out = fsutil::open_private_file(&file.path)?;
            let filled = out
                .write_all(file.keys.render().as_bytes())
                .and_then(|()| out.sync_all());
            if filled.is_err() {
                // A half-written key file would stop every later start with a parse error
                // instead of generating a new one; the file is ours, created just now.
                drop(out);
                let _ = std::fs::remove_file(&file.path);
            }
            filled?;
            fsutil::sync_dir(file.path.parent().unwrap_or(Path::new(".")))
        })();
        written.map_err(io_error)?;
        tracing::warn!(
            path = %file.path.display(),
            key_id = %id,
            "GENERATED A NEW VAULT MASTER KEY at {}. Every stored OAuth token and client secret \
             is encrypted with it: back this file up and keep it private. If it is lost, every \
             user has to reconnect.",
            file.path.display()
        );
        Ok(file)
    }

    /// Where this file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id of the current key.
    pub fn current_key_id(&self) -> &KeyId {
        &self.keys.current
    }

    /// Ids of all keys in the file.
    pub fn key_ids(&self) -> Vec<KeyId> {
        self.keys.keys.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Generates a new random key with a fresh id and adds it; `make_current` makes new
    /// writes use it. Not saved until [`KeyFile::save`].
    ///
    /// With several service replicas, add the key with `make_current: false` first, roll
    /// it out to every replica, and only then make it current, so that no replica meets an
    /// entry sealed under a key it does not have.
    pub fn add_new_key(&mut self, make_current: bool) -> Result<KeyId, VaultError> {
        let mut id = KeyId::generate()?;
        while self.keys.keys.iter().any(|(existing, _)| *existing == id) {
            id = KeyId::generate()?;
        }
        self.keys.keys.push((id.clone(), random_key()?));
        if make_current {
            self.keys.current = id.clone();
        }
        Ok(id)
    }

    /// Makes an existing key current.
    pub fn set_current(&mut self, id: &KeyId) -> Result<(), VaultError> {
        if !self.keys.keys.iter().any(|(existing, _)| existing == id) {
            return Err(VaultError::key_config(format!(
                "key `{id}` is not in {}",
                self.path.display()
            )));
        }
        self.keys.current = id.clone();
        Ok(())
    }

    /// Removes a key. Refuses the current key. Does not check whether entries still use it:
    /// [`Vault::retire_key`](crate::Vault::retire_key) does.
    pub fn remove_key(&mut self, id: &KeyId) -> Result<(), VaultError> {
        if *id == self.keys.current {
            return Err(VaultError::key_config(format!(
                "key `{id}` is the current key; make another key current before removing it"
            )));
        }
        let before = self.keys.keys.len();
        self.keys.keys.retain(|(existing, _)| existing != id);
        if self.keys.keys.len() == before {
            return Err(VaultError::key_config(format!(
                "key `{id}` is not in {}",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// Writes the file: temporary file (0600) + fsync + rename + fsync of the directory, so a
    /// crash leaves either the old or the new file.
    pub fn save(&self) -> Result<(), VaultError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let text = self.keys.render();
        fsutil::write_atomically(&self.path, Path::new(&tmp), &[text.as_bytes()]).map_err(|e| {
            VaultError::key_config(format!(
                "cannot write the vault key file {}: {e}",
                self.path.display()
            ))
        })
    }

    /// The keys of this file, prepared for the vault.
    pub fn keyring(&self) -> Result<KeyRing, VaultError> {
        self.keys.keyring()
    }
}

impl fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .field("current", &self.keys.current)
            .field("keys", &self.key_ids())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=";
    const KEY_B: &str = "3q2+796tvu/erb7v3q2+796tvu/erb7v3q2+796tvu8=";

    #[test]
    fn parses_keys_and_current() {
        let ring = KeyRing::parse(&format!(
            "# comment\n\nkey old {KEY_A}\nkey new {KEY_B}\ncurrent new\n"
        ))
        .unwrap();
        assert_eq!(ring.current_key_id().as_str(), "new");
        assert!(ring.contains("old"));
    }

    #[test]
    fn a_single_key_is_current_and_semicolons_separate_entries() {
        let ring = KeyRing::parse(&format!("key only {KEY_A}")).unwrap();
        assert_eq!(ring.current_key_id().as_str(), "only");
        let ring = KeyRing::parse(&format!("key a {KEY_A}; key b {KEY_B}; current a")).unwrap();
        assert_eq!(ring.current_key_id().as_str(), "a");
    }

    #[test]
    fn errors_never_echo_key_material() {
        let cases = [
            format!("key a {KEY_A}\nkey b {KEY_B}"),
            format!("key a {KEY_A}\ncurrent b"),
            format!("key a {KEY_A}\nkey a {KEY_B}"),
            "key a c2hvcnQ=".to_owned(),
            format!("key a {KEY_A}x"),
            KEY_A.to_owned(),
            format!("key bad/id {KEY_A}"),
            String::new(),
        ];
        for text in cases {
            let error = KeyRing::parse(&text).unwrap_err();
            assert!(matches!(error, VaultError::KeyConfig { .. }), "{error}");
            let message = error.to_string();
            assert!(!message.contains(&KEY_A[..20]), "{message}");
            assert!(!message.contains(&KEY_B[..20]), "{message}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn an_env_value_that_is_not_utf8_is_refused_not_ignored() {
        use std::os::unix::ffi::OsStringExt as _;
        let not_utf8 = std::env::VarError::NotUnicode(std::ffi::OsString::from_vec(vec![0xff]));
        let error = env_value(Err(not_utf8)).unwrap_err();
        assert!(matches!(error, VaultError::KeyConfig { .. }), "{error}");
        assert!(error.to_string().contains(KEYS_ENV_VAR), "{error}");
        assert!(
            env_value(Err(std::env::VarError::NotPresent))
                .unwrap()
                .is_none()
        );
        assert!(env_value(Ok(" \n".to_owned())).unwrap().is_none());
    }

    #[test]
    fn rendering_never_outgrows_its_reserved_buffer() {
        // Longest ids everywhere: if the text outgrew the reservation, the String would
        // reallocate and free a copy of the keys without wiping it.
        let id = |i: usize| KeyId::parse(format!("{i:0>width$}", width = MAX_KEY_ID_LEN)).unwrap();
        let mut keys = KeySet {
            keys: Vec::new(),
            current: id(0),
        };
        for i in 0..20 {
            keys.keys.push((id(i), random_key().unwrap()));
            let text = keys.render();
            assert!(text.len() <= keys.render_capacity(), "{} keys", i + 1);
            assert!(KeySet::parse(&text).is_ok());
        }
    }

    #[test]
    fn generated_key_ids_are_valid_and_dated() {
        let id = KeyId::generate().unwrap();
        assert!(KeyId::parse(id.as_str()).is_ok());
        assert!(id.as_str().starts_with("k20"), "{id}");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_567), (2026, 4, 24));
    }

    #[test]
    fn key_file_is_private_and_roundtrips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/vault.keys");
        let mut file = KeyFile::create(&path).unwrap();
        assert!(
            KeyFile::create(&path).is_err(),
            "never overwrites a key file"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let first = file.current_key_id().clone();
        let second = file.add_new_key(true).unwrap();
        assert!(file.remove_key(&second).is_err(), "current key is kept");
        file.save().unwrap();
        let reloaded = KeyFile::load(&path).unwrap();
        assert_eq!(reloaded.current_key_id(), &second);
        assert_eq!(reloaded.key_ids(), vec![first.clone(), second.clone()]);
        let ring = load(None, &path, false).unwrap();
        assert_eq!(ring.current_key_id(), &second);
    }

    #[cfg(unix)]
    #[test]
    fn save_never_writes_through_a_planted_temporary_file() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.keys");
        let tmp = dir.path().join("vault.keys.tmp");
        let file = KeyFile::create(&path).unwrap();

        // A symlink where the temporary file goes: the keys must not land at its target.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"victim").unwrap();
        symlink(&victim, &tmp).unwrap();
        file.save().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the key file is not a symlink");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        // A readable leftover: its mode must not become the key file's.
        std::fs::write(&tmp, b"leftover").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        file.save().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            KeyFile::load(&path).unwrap().current_key_id(),
            file.current_key_id()
        );
    }

    #[test]
    fn env_value_wins_over_the_file_and_missing_config_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.keys");
        let error = load(None, &path, false).unwrap_err();
        assert!(error.to_string().contains(KEYS_ENV_VAR), "{error}");
        let ring = load(
            Some(Zeroizing::new(format!("key envkey {KEY_A}"))),
            &path,
            true,
        )
        .unwrap();
        assert_eq!(ring.current_key_id().as_str(), "envkey");
        assert!(!path.exists(), "nothing generated when the env var is set");
        let ring = load(None, &path, true).unwrap();
        assert!(path.exists());
        assert_eq!(
            load(None, &path, false).unwrap().current_key_id(),
            ring.current_key_id()
        );
    }
}
