//! A generation's library bytes, kept in an anonymous in-memory file (by
//! process mode's supervisor). Workers of that generation (the first ones, and every
//! replacement after a crash) load these bytes, never the file on disk: a
//! deploy may have replaced it since. The previous generation's snapshot is
//! what an automatic rollback goes back to.
//!
//! Taking a snapshot checks the file the way a load would (missing,
//! directory, not ELF, truncated) without loading it: the supervisor never
//! runs app code. A reload whose file holds the same bytes as the serving
//! generation's snapshot reuses that snapshot (known by the file's settled
//! state, see [`Origin`], without reading it; else by the bytes' hash), and a worker
//! opens its snapshot as it is, without a copy of its own: it loads one
//! library in its life, and nothing writes to a snapshot.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use super::copies::{self, Buffer, ContentHash, Origin};
use super::loader::{check_elf, check_source, open_library, LoadError};
use crate::ffi::identity::effective_uid;
use crate::ffi::process::memfd;

pub struct Snapshot {
    /// The file it was taken from, for messages.
    pub source: PathBuf,
    bytes: File,
    hash: ContentHash,
    /// The state of a file that held these bytes, once one was read after it
    /// had settled (see [`Origin`]): a reload that finds the file in that
    /// state reuses the snapshot without reading the file (1.2 ms of the
    /// supervisor's CPU for a 4 MB library, on the serving core, in every
    /// reload of a storm). Set by the first read that sees it settled: a file
    /// reloaded within a second of its last change is known by its hash
    /// until then.
    origin: OnceLock<Origin>,
}

impl Snapshot {
    /// Copies `source` (checked for trust as a load would, unless
    /// `allow_insecure_library`) into memory, hashing it as it goes.
    pub fn take(source: &Path, generation: u64, allow_insecure_library: bool) -> Result<Snapshot, LoadError> {
        let file = Snapshot::open(source, allow_insecure_library)?;
        let before =
            Origin::of_file(&file).map_err(|error| LoadError::Unreadable { path: source.to_owned(), error })?;
        Snapshot::copy(source, generation, &file, before, &mut Buffer::new())
    }

    /// The snapshot to start generation `generation` from: `current` again
    /// if the file holds the very bytes it does (by their hash, see
    /// [`copies`]: a reload storm reloads the same file again and again),
    /// else a new one. A file in the settled state `current` was read in is
    /// not read again. Nothing writes to a snapshot once it is taken and
    /// each worker loads it in a process of its own, so generations may
    /// share one. Returns whether it is `current`.
    pub fn take_or_reuse(
        source: &Path,
        generation: u64,
        allow_insecure_library: bool,
        current: &Arc<Snapshot>,
    ) -> Result<(Arc<Snapshot>, bool), LoadError> {
        let unreadable = |error| LoadError::Unreadable { path: source.to_owned(), error };
        let file = Snapshot::open(source, allow_insecure_library)?;
        let before = Origin::of_file(&file).map_err(unreadable)?;
        if current.origin.get() == Some(&before) {
            return Ok((current.clone(), true));
        }
        let mut buffer = Buffer::new();
        let read_at = SystemTime::now();
        let hash = copies::hash(&file, &mut buffer).map_err(unreadable)?;
        if hash == current.hash {
            if let Some(settled) = Origin::settled_after(before, &file, read_at).map_err(unreadable)? {
                let _ = current.origin.set(settled);
            }
            return Ok((current.clone(), true));
        }
        Ok((Arc::new(Snapshot::copy(source, generation, &file, before, &mut buffer)?), false))
    }

    fn open(source: &Path, allow_insecure_library: bool) -> Result<File, LoadError> {
        check_source(source)?;
        open_library(source, (!allow_insecure_library).then(effective_uid))
    }

    /// Copies the open `file` (of `source`, in state `before` when it was
    /// opened) into a new in-memory file named for `generation` and checks
    /// the copy's ELF headers.
    fn copy(
        source: &Path,
        generation: u64,
        file: &File,
        before: Origin,
        buffer: &mut Buffer,
    ) -> Result<Snapshot, LoadError> {
        let unreadable = |error| LoadError::Unreadable { path: source.to_owned(), error };
        let bytes = memfd(&format!("pounce-host-g{generation}-snapshot")).map_err(unreadable)?;
        let read_at = SystemTime::now();
        let (hash, _) = copies::copy_hashing(file, Some(&bytes), buffer).map_err(unreadable)?;
        check_elf(source, &bytes)?;
        let origin = OnceLock::new();
        if let Some(settled) = Origin::settled_after(before, file, read_at).map_err(unreadable)? {
            let _ = origin.set(settled);
        }
        Ok(Snapshot { source: source.to_owned(), bytes, hash, origin })
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
    use std::os::unix::fs::FileExt;

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

    /// An ELF file of its own in the temporary directory (a copy of this
    /// test binary), removed on drop.
    struct ElfFile(PathBuf);

    impl ElfFile {
        fn new(name: &str) -> ElfFile {
            let path = std::env::temp_dir().join(format!("pounce-snapshot-{name}-{}.so", std::process::id()));
            std::fs::copy(std::env::current_exe().unwrap(), &path).unwrap();
            ElfFile(path)
        }

        /// Changes one byte in place: same file, same length.
        fn change_in_place(&self) {
            let file = std::fs::OpenOptions::new().write(true).open(&self.0).unwrap();
            file.write_all_at(b"\x7fELF-changed", 64).unwrap();
        }
    }

    impl Drop for ElfFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn the_same_bytes_reuse_the_snapshot_by_hash_then_by_the_settled_state_until_a_change() {
        let elf = ElfFile::new("settled");
        let first = Arc::new(Snapshot::take(&elf.0, 1, true).unwrap());
        assert_eq!(first.origin.get(), None, "a file changed just now identifies nothing");
        // Waits for the file to settle: its change time must be older
        // than `SETTLED` when it is read.
        std::thread::sleep(copies::SETTLED + std::time::Duration::from_millis(100));
        let (again, reused) = Snapshot::take_or_reuse(&elf.0, 2, true, &first).unwrap();
        assert!(reused && Arc::ptr_eq(&again, &first), "the same bytes, by their hash");
        assert!(first.origin.get().is_some(), "the read that saw the file settled records its state");
        let (again, reused) = Snapshot::take_or_reuse(&elf.0, 3, true, &first).unwrap();
        assert!(reused && Arc::ptr_eq(&again, &first), "the same state");
        elf.change_in_place();
        let (changed, reused) = Snapshot::take_or_reuse(&elf.0, 4, true, &first).unwrap();
        assert!(!reused && changed.hash != first.hash, "a change in place, even within the same second, is seen");
    }
}
