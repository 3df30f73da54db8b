//! The embedded default store: one file per entry in a private directory.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::StoreError;
use crate::fsutil;
use crate::name::SecretName;
use crate::store::{Revision, SecretStore, StoredValue};

const MAGIC: [u8; 4] = *b"SBVE";
/// Version 2 adds the checksum; version 1 files (without it) are still read, and become
/// version 2 when they are next written (a rotation rewrites every entry).
const FILE_VERSION: u8 = 2;
const FILE_VERSION_WITHOUT_CHECKSUM: u8 = 1;
/// Bytes of SHA-256 kept as the file's checksum.
const CHECKSUM_LEN: usize = 16;
const FIXED_HEADER_LEN: usize = 4 + 1 + 8 + 2;
const ENTRY_SUFFIX: &str = ".entry";
const TMP_SUFFIX: &str = ".entry.tmp";
const LOCK_FILE: &str = ".lock";

/// The embedded default store: one file per entry in a private directory. Cheap to clone
/// (shared state).
///
/// Layout of the directory (mode 0700):
/// - `.lock`: held with an exclusive `flock` while a [`FileStore`] is open, so one process
///   owns the directory. Compare-and-swap is made safe inside that process by a mutex that
///   every write takes.
/// - `<sha256(name) hex>.entry` (mode 0600): one per entry. The entry name is hashed, never
///   used as a path, so no name can reach outside the directory and long names fit.
/// - `<…>.entry.tmp`: a write in progress. A write goes temp file → fsync → rename →
///   fsync(directory), so after a crash a file holds the old or the new value, and leftover
///   temporary files are deleted when the store is opened.
///
/// An entry file is `"SBVE"`, a version byte (2), the revision (u64, big endian), the name
/// length (u16, big endian), the name, the sealed value (ciphertext, see the crate docs), then
/// a checksum: the first 16 bytes of SHA-256 over everything before it. The name is stored so
/// that [`SecretStore::names`](crate::SecretStore::names) can list entries. The sealed value
/// authenticates itself, but the revision and the name around it do not: the checksum is what
/// shows a damaged revision or name (a damaged name would otherwise list an entry that does
/// not exist, and a damaged revision would go unnoticed).
///
/// Revisions come from one counter for the whole directory, starting above the highest
/// revision on disk, so a deleted and re-created entry never repeats a revision while the
/// store is open.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Holds the exclusive lock for as long as the store is open.
    _lock: File,
    /// The last revision handed out; every write holds this lock.
    last_revision: Mutex<u64>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens (creating if needed) the store in `dir`: creates the directory with mode 0700
    /// (tightening an existing one), takes the directory lock, deletes leftover temporary
    /// files. Fails with [`StoreError::Locked`] if another process has it open.
    ///
    /// This does blocking IO; call it at start-up (or inside `spawn_blocking`).
    pub fn open(dir: impl Into<PathBuf>) -> Result<FileStore, StoreError> {
        let dir = dir.into();
        let shown = dir.display().to_string();
        let io = |operation: &'static str| {
            let shown = shown.clone();
            move |e: io::Error| {
                StoreError::backend(operation, io::Error::new(e.kind(), format!("{shown}: {e}")))
            }
        };
        fsutil::create_private_dir_all(&dir).map_err(io("creating the vault directory"))?;
        fsutil::restrict_dir(&dir).map_err(io("restricting the vault directory to its owner"))?;

        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(fsutil::FILE_MODE);
        }
        let lock = options
            .open(dir.join(LOCK_FILE))
            .map_err(io("opening the vault lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked { path: dir }),
            Err(TryLockError::Error(e)) => {
                return Err(io("locking the vault directory")(e));
            }
        }

        let mut highest = 0;
        let mut removed_temporaries = false;
        for entry in fs::read_dir(&dir).map_err(io("listing the vault directory"))? {
            let entry = entry.map_err(io("listing the vault directory"))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.ends_with(TMP_SUFFIX) {
                fs::remove_file(entry.path())
                    .map_err(io("removing a leftover temporary vault file"))?;
                removed_temporaries = true;
            } else if file_name.ends_with(ENTRY_SUFFIX) {
                match read_entry_file(&entry.path()) {
                    // A damaged revision must not move the counter.
                    Ok(Some(file)) if file.intact => highest = highest.max(file.revision),
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "skipping an unreadable vault entry file");
                    }
                }
            }
        }
        if removed_temporaries {
            fsutil::sync_dir(&dir).map_err(io("syncing the vault directory"))?;
            tracing::info!(dir = %dir.display(), "removed temporary files of interrupted vault writes");
        }
        Ok(FileStore {
            inner: Arc::new(Inner {
                dir,
                _lock: lock,
                last_revision: Mutex::new(highest),
            }),
        })
    }

    /// The directory this store lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T, F>(&self, operation: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::backend(operation, e))?
    }
}

/// A parsed entry file.
struct EntryFile {
    revision: u64,
    name: String,
    value: Bytes,
    /// False if the checksum does not match: some byte of the file is damaged, and nothing
    /// in it can be trusted (the name is still shown, so that the damage can be reported).
    intact: bool,
}

/// Reads an entry file; `None` if it does not exist.
fn read_entry_file(path: &Path) -> Result<Option<EntryFile>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => Bytes::from(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::backend("reading a vault entry file", e)),
    };
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    if bytes.len() < FIXED_HEADER_LEN || bytes[..4] != MAGIC {
        return Err(corrupt("it is not a vault entry file"));
    }
    let (bytes, intact) = match bytes[4] {
        FILE_VERSION_WITHOUT_CHECKSUM => (bytes, true),
        FILE_VERSION => {
            let Some(body_len) = bytes.len().checked_sub(CHECKSUM_LEN) else {
                return Err(corrupt("it is too short for its checksum"));
            };
            let intact = checksum(&bytes[..body_len]) == bytes[body_len..];
            (bytes.slice(..body_len), intact)
        }
        _ => return Err(corrupt("its entry file version is unknown to this build")),
    };
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(corrupt("it is not a vault entry file"));
    }
    let revision = u64::from_be_bytes(bytes[5..13].try_into().map_err(|_| corrupt("short"))?);
    let name_len = usize::from(u16::from_be_bytes(
        bytes[13..15].try_into().map_err(|_| corrupt("short"))?,
    ));
    let name_end = FIXED_HEADER_LEN + name_len;
    let name = bytes
        .get(FIXED_HEADER_LEN..name_end)
        .and_then(|name| std::str::from_utf8(name).ok())
        .ok_or_else(|| corrupt("its entry name is cut off or not UTF-8"))?
        .to_owned();
    Ok(Some(EntryFile {
        revision,
        name,
        value: bytes.slice(name_end..),
        intact,
    }))
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut sum = [0; CHECKSUM_LEN];
    sum.copy_from_slice(&digest.as_ref()[..CHECKSUM_LEN]);
    sum
}

/// The file name (without directory) of the entry `name`: the hex SHA-256 of the name.
fn entry_file_name(name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut file_name = String::with_capacity(64 + TMP_SUFFIX.len());
    for byte in digest.as_ref() {
        file_name.push(char::from(HEX[usize::from(byte >> 4)]));
        file_name.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    file_name.push_str(ENTRY_SUFFIX);
    file_name
}

impl Inner {
    fn entry_path(&self, name: &SecretName) -> PathBuf {
        self.dir.join(entry_file_name(name.as_str()))
    }

    fn read(&self, name: &SecretName) -> Result<Option<StoredValue>, StoreError> {
        let path = self.entry_path(name);
        let Some(file) = read_entry_file(&path)? else {
            return Ok(None);
        };
        if !file.intact {
            return Err(StoreError::Corrupt {
                path,
                reason: "its checksum does not match: the file is damaged (its revision, name \
                         or sealed value)"
                    .to_owned(),
            });
        }
        if file.name != name.as_str() {
            return Err(StoreError::Corrupt {
                path,
                reason: "it holds a different entry than its file name says".to_owned(),
            });
        }
        Ok(Some(StoredValue {
            value: file.value,
            revision: Revision::new(file.revision),
        }))
    }

    /// Writes `value` under a fresh revision. Call with `last_revision` locked.
    fn write(
        &self,
        last_revision: &mut u64,
        name: &SecretName,
        value: &[u8],
    ) -> Result<Revision, StoreError> {
        let revision = *last_revision + 1;
        // Spent before writing: a write that fails after its rename (a failed directory
        // fsync) leaves this revision on disk, and handing it out again would let a stale
        // compare-and-swap or take match a different value.
        *last_revision = revision;
        let path = self.entry_path(name);
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let name_bytes = name.as_str().as_bytes();
        let name_len = u16::try_from(name_bytes.len()).unwrap_or(u16::MAX);
        let mut header = [0u8; FIXED_HEADER_LEN];
        header[..4].copy_from_slice(&MAGIC);
        header[4] = FILE_VERSION;
        header[5..13].copy_from_slice(&revision.to_be_bytes());
        header[13..15].copy_from_slice(&name_len.to_be_bytes());
        let mut summed = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [&header[..], name_bytes, value] {
            summed.update(part);
        }
        let digest = summed.finish();
        let sum = &digest.as_ref()[..CHECKSUM_LEN];
        fsutil::write_atomically(&path, Path::new(&tmp), &[&header, name_bytes, value, sum])
            .map_err(|e| StoreError::backend("writing a vault entry file", e))?;
        Ok(Revision::new(revision))
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, u64> {
        // A panic mid-write leaves nothing half-done on disk (rename is atomic), so a
        // poisoned lock is safe to keep using.
        self.last_revision
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

#[async_trait]
impl SecretStore for FileStore {
    async fn get(&self, name: &SecretName) -> Result<Option<StoredValue>, StoreError> {
        let name = name.clone();
        // Reads take no lock: a rename replaces a file atomically.
        self.blocking("reading a vault entry", move |inner| inner.read(&name))
            .await
    }

    async fn put(&self, name: &SecretName, value: Bytes) -> Result<Revision, StoreError> {
        let name = name.clone();
        self.blocking("writing a vault entry", move |inner| {
            let mut last = inner.lock_writes();
            inner.write(&mut last, &name, &value)
        })
        .await
    }

    async fn create(
        &self,
        name: &SecretName,
        value: Bytes,
        _ttl: Option<Duration>,
    ) -> Result<Revision, StoreError> {
        let name = name.clone();
        self.blocking("creating a vault entry", move |inner| {
            let mut last = inner.lock_writes();
            if inner.read(&name)?.is_some() {
                return Err(StoreError::Conflict);
            }
            inner.write(&mut last, &name, &value)
        })
        .await
    }

    async fn update(
        &self,
        name: &SecretName,
        value: Bytes,
        expected: Revision,
        _ttl: Option<Duration>,
    ) -> Result<Revision, StoreError> {
        let name = name.clone();
        self.blocking("updating a vault entry", move |inner| {
            let mut last = inner.lock_writes();
            match inner.read(&name)? {
                Some(current) if current.revision == expected => {
                    inner.write(&mut last, &name, &value)
                }
                _ => Err(StoreError::Conflict),
            }
        })
        .await
    }

    async fn delete(
        &self,
        name: &SecretName,
        expected: Option<Revision>,
    ) -> Result<(), StoreError> {
        let name = name.clone();
        self.blocking("deleting a vault entry", move |inner| {
            let _last = inner.lock_writes();
            if let Some(expected) = expected {
                match inner.read(&name)? {
                    Some(current) if current.revision == expected => {}
                    _ => return Err(StoreError::Conflict),
                }
            }
            match fs::remove_file(inner.entry_path(&name)) {
                Ok(()) => fsutil::sync_dir(&inner.dir)
                    .map_err(|e| StoreError::backend("syncing the vault directory", e)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::backend("deleting a vault entry file", e)),
            }
        })
        .await
    }

    async fn names(&self) -> Result<Vec<SecretName>, StoreError> {
        Ok(self.scan().await?.names)
    }

    async fn unreadable(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.scan().await?.unreadable)
    }
}

/// What a walk over the directory found.
struct Scan {
    names: Vec<SecretName>,
    /// Entry files whose header or name cannot be read, by file name.
    unreadable: Vec<String>,
}

impl FileStore {
    async fn scan(&self) -> Result<Scan, StoreError> {
        self.blocking("listing vault entries", |inner| {
            let mut scan = Scan {
                names: Vec::new(),
                unreadable: Vec::new(),
            };
            let listing = fs::read_dir(&inner.dir)
                .map_err(|e| StoreError::backend("listing the vault directory", e))?;
            // Every file is accounted for: an entry (listed by name, and then opened by
            // `Vault::check`), the lock, a write in progress, or something reported here.
            for entry in listing {
                let entry =
                    entry.map_err(|e| StoreError::backend("listing the vault directory", e))?;
                let file_name = entry.file_name().to_string_lossy().into_owned();
                if file_name == LOCK_FILE || file_name.ends_with(TMP_SUFFIX) {
                    continue;
                }
                if !file_name.ends_with(ENTRY_SUFFIX) {
                    scan.unreadable
                        .push(format!("{file_name} (not a vault entry file)"));
                    continue;
                }
                match read_entry_file(&entry.path()) {
                    Ok(Some(file)) => {
                        // A file holds the entry whose name hashes to its file name; any
                        // other name is a damaged one (and would list an entry that is not
                        // there, or one that lives in another file).
                        if entry_file_name(&file.name) != file_name {
                            tracing::warn!(file = %file_name, "vault entry file whose entry name is damaged");
                            scan.unreadable.push(format!(
                                "{file_name} (its entry name is damaged: it reads `{}`, \
                                 which belongs in another file)",
                                file.name.escape_debug()
                            ));
                            continue;
                        }
                        match SecretName::parse(file.name) {
                            // Listed even if its checksum fails: opening it then reports the
                            // damage by name.
                            Ok(name) => scan.names.push(name),
                            Err(_) => {
                                tracing::warn!(file = %file_name, "vault entry file with an invalid entry name");
                                scan.unreadable
                                    .push(format!("{file_name} (its entry name is invalid)"));
                            }
                        }
                    }
                    // Deleted between listing and reading.
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(file = %file_name, %error, "unreadable vault entry file");
                        let reason = match &error {
                            StoreError::Corrupt { reason, .. } => reason.clone(),
                            other => other.to_string(),
                        };
                        scan.unreadable.push(format!("{file_name} ({reason})"));
                    }
                }
            }
            // A file replaced by a rename while the directory is read can be listed twice.
            scan.names.sort_unstable();
            scan.names.dedup();
            scan.unreadable.sort_unstable();
            Ok(scan)
        })
        .await
    }
}
