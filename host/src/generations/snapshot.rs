//! A generation's library bytes, kept in an anonymous in-memory file (by
//! process mode's supervisor). Workers of that generation (the first ones, and every
//! replacement after a crash) load these bytes, never the file on disk: a
//! deploy may have replaced it since. The previous generation's snapshot is
//! what an automatic rollback goes back to.
//!
//! Taking a snapshot checks the file the way a load would (missing,
//! directory, not ELF, truncated) without loading it: the supervisor never
//! runs app code.

use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::loader::{check_elf, check_source, open_library, LoadError};
use crate::ffi::identity::effective_uid;
use crate::ffi::process::memfd;

pub struct Snapshot {
    /// The file it was taken from, for messages.
    pub source: PathBuf,
    bytes: File,
}

impl Snapshot {
    /// Copies `source` (checked for trust as a load would, unless
    /// `allow_insecure_library`) into memory.
    pub fn take(source: &Path, generation: u64, allow_insecure_library: bool) -> Result<Snapshot, LoadError> {
        check_source(source)?;
        let unreadable = |error| LoadError::Unreadable { path: source.to_owned(), error };
        let trusted_by = (!allow_insecure_library).then(effective_uid);
        let mut file = open_library(source, trusted_by)?;
        let mut bytes = memfd(&format!("pounce-snapshot-g{generation}")).map_err(unreadable)?;
        io::copy(&mut file, &mut bytes).map_err(unreadable)?;
        bytes.rewind().map_err(unreadable)?;
        check_elf(source, &bytes)?;
        Ok(Snapshot { source: source.to_owned(), bytes })
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
