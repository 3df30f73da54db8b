//! Small file-system helpers shared by the key file and the file store: owner-only
//! permissions and crash-safe replacement of a file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// Mode of every file the vault writes (owner read/write).
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of every directory the vault creates (owner only).
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` and missing parents with mode 0700. Existing directories are left alone.
pub(crate) fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(DIR_MODE);
    }
    builder.create(dir)
}

/// Forces `dir` to mode 0700.
pub(crate) fn restrict_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `path` for writing with mode 0600; fails if it exists (also as a symlink), so the
/// file is always a new one, owned by us, with that mode.
pub(crate) fn open_private_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options.open(path)
}

/// Makes a rename or unlink in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Replaces `path` with `parts` (concatenated) so that after a crash the file holds either
/// the old or the new content, never a mix: write a temporary file beside it, fsync it,
/// rename it over `path`, fsync the directory. The temporary file is `tmp_path`; the
/// caller makes sure no two writers use the same one at once.
pub(crate) fn write_atomically(path: &Path, tmp_path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let result = (|| {
        // Never reuse an existing temporary file: opening it would keep its owner and mode
        // (which the rename then gives `path`) and follow it if it is a symlink, writing the
        // content wherever it points. Remove it and create a fresh one exclusively.
        match fs::remove_file(tmp_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = open_private_file(tmp_path)?;
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_data()?;
        drop(file);
        fs::rename(tmp_path, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(tmp_path);
    }
    result?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// The permission bits of `path` that let group or others in, if any.
pub(crate) fn group_or_other_bits(path: &Path) -> io::Result<u32> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        Ok(fs::metadata(path)?.permissions().mode() & 0o077)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(0)
    }
}
