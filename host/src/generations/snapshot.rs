//! A generation's library bytes, kept in an anonymous in-memory file (by
//! process mode's supervisor). Workers of that generation (the first ones, and every
//! replacement after a crash) load these bytes, never the file on disk: a
//! deploy may have replaced it since. The previous generation's snapshot is
//! what an automatic rollback goes back to.
//!
//! Taking a snapshot checks the file the way a load would (missing,
//! directory, not ELF, truncated) without loading it: the supervisor never
//! runs app code. A reload whose file holds the same bytes as the serving
//! generation's snapshot (by their hash) reuses that snapshot, and a worker
//! opens its snapshot as it is, without a copy of its own: it loads one
//! library in its life, and nothing writes to a snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::copies::{self, Buffer, ContentHash};
use super::loader::{check_elf, check_source, open_library, LoadError};
use crate::ffi::identity::effective_uid;
use crate::ffi::process::memfd;

pub struct Snapshot {
    /// The file it was taken from, for messages.
    pub source: PathBuf,
    bytes: File,
    hash: ContentHash,
}

impl Snapshot {
    /// Copies `source` (checked for trust as a load would, unless
    /// `allow_insecure_library`) into memory, hashing it as it goes.
    pub fn take(source: &Path, generation: u64, allow_insecure_library: bool) -> Result<Snapshot, LoadError> {
        let file = Snapshot::open(source, allow_insecure_library)?;
        Snapshot::copy(source, generation, &file, &mut Buffer::new())
    }

    /// The snapshot to start generation `generation` from: `current` again
    /// if the file holds the very bytes it does (by their hash, see
    /// [`copies`]: a reload storm reloads the same file again and again),
    /// else a new one. Nothing writes to a snapshot once it is taken and
    /// each worker loads it in a process of its own, so generations may
    /// share one. Returns whether it is `current`.
    pub fn take_or_reuse(
        source: &Path,
        generation: u64,
        allow_insecure_library: bool,
        current: &Arc<Snapshot>,
    ) -> Result<(Arc<Snapshot>, bool), LoadError> {
        let file = Snapshot::open(source, allow_insecure_library)?;
        let mut buffer = Buffer::new();
        let hash = copies::hash(&file, &mut buffer)
            .map_err(|error| LoadError::Unreadable { path: source.to_owned(), error })?;
        if hash == current.hash {
            return Ok((current.clone(), true));
        }
        Ok((Arc::new(Snapshot::copy(source, generation, &file, &mut buffer)?), false))
    }

    fn open(source: &Path, allow_insecure_library: bool) -> Result<File, LoadError> {
        check_source(source)?;
        open_library(source, (!allow_insecure_library).then(effective_uid))
    }

    /// Copies the open `file` (of `source`) into a new in-memory file named
    /// for `generation` and checks the copy's ELF headers.
    fn copy(source: &Path, generation: u64, file: &File, buffer: &mut Buffer) -> Result<Snapshot, LoadError> {
        let unreadable = |error| LoadError::Unreadable { path: source.to_owned(), error };
        let bytes = memfd(&format!("pounce-host-g{generation}-snapshot")).map_err(unreadable)?;
        let (hash, _) = copies::copy_hashing(file, Some(&bytes), buffer).map_err(unreadable)?;
        check_elf(source, &bytes)?;
        Ok(Snapshot { source: source.to_owned(), bytes, hash })
    }

    /// A new reader of the bytes, from their start.
    pub fn reader(&self) -> io::Result<File> {
        File::open(format!("/proc/self/fd/{}", self.bytes.as_raw_fd()))
    }

    /// The descriptor to hand a worker.
    pub fn raw_fd(&self) -> i32 {
        self.bytes.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_or_a_non_library_is_refused_with_the_source_named() {
        let missing = Snapshot::take(Path::new("/nonexistent/libapp.so"), 1, false).err().expect("refused");
        assert!(matches!(missing, LoadError::Missing { .. }), "{missing}");
        let text = std::env::temp_dir().join(format!("pounce-snapshot-test-{}.so", std::process::id()));
        std::fs::write(&text, b"not a library").unwrap();
        let refused = Snapshot::take(&text, 1, true).err().expect("refused");
        let _ = std::fs::remove_file(&text);
        assert!(refused.to_string().contains(&*text.to_string_lossy()), "{refused}");
    }
}
