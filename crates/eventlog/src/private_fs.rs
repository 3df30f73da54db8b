//! Owner-only files and directories: invocation events hold tool arguments, and checkpoints
//! hold the projections' state, so nobody but the process's user may read them (like the
//! vault).
use std::{
    fs::{self, File, OpenOptions},
    io,
    path::Path,
};

/// Mode of the event log's and the checkpoints' files (owner read/write).
pub(crate) const FILE_MODE: u32 = 0o600;
/// Mode of their directories (owner only).
pub(crate) const DIR_MODE: u32 = 0o700;

/// Creates `dir` and missing parents with mode 0700, and forces `dir` itself to 0700 if it
/// existed (a directory made by an earlier version, with the default umask).
pub(crate) fn create_dir_all(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(DIR_MODE);
        builder.create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))
    }
    #[cfg(not(unix))]
    builder.create(dir)
}

/// Options that create a file with mode 0600.
pub(crate) fn open_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    options
}

/// Forces an open file to mode 0600 (one created by an earlier version keeps its mode
/// otherwise).
pub(crate) fn restrict(file: &File) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        Ok(())
    }
}
