//! The in-memory copies a generation's library is opened from, the content
//! hash of their bytes, and the copies kept for reuse.
//!
//! A load reads the library file through a small buffer and hashes it
//! (xxh3, 128 bits: about 0.3 ms for a 4 MB library, 0.6 ms with the read)
//! as it copies it, or before it reuses a copy of the same bytes; a file
//! that has settled and is seen again in the same state is not read at all
//! (see [`Origin`]). The hash serves two things:
//! - **Reuse of a copy.** Copying a library into a new anonymous file costs
//!   more than anything else a reload does in the serving process (for a
//!   4 MB library about 4 ms of CPU to allocate, charge and fill its pages,
//!   and about 1.5 ms to free them at the unload), and a reload storm or
//!   `cargo xtask dev` loads the same bytes again and again. A copy whose
//!   generation was really unmapped (`dlclose` and the loader's own check,
//!   see `ffi::library`) goes back to a small [`Pool`]; the next load of the
//!   same bytes opens it again instead of making a new one. glibc knows an
//!   open object by its path and by the file's device and inode: the copy
//!   is opened under a new descriptor number, and its inode belongs to no
//!   loaded object any more (a generation left mapped never gives its copy
//!   back), so `dlopen` maps it afresh. Nothing writes to a copy once it is
//!   made (libraries are mapped private), so its bytes stay those hashed.
//! - **The preflight's skip** (`lifecycle::preflight`): bytes that already
//!   passed it in this process are not checked again.
//!
//! xxh3 is not a cryptographic hash, and it need not be: whoever can choose
//! the library's bytes (root or the server's user: see `trust`) can make
//! the server run anything anyway, and two different libraries of the same
//! 128-bit hash by accident are out of reach.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::Xxh3;

/// How much is read at a time: small enough to stay in the CPU's cache
/// between the read and the hash.
const CHUNK: usize = 128 * 1024;

/// How many unused copies the pool keeps (each as large as the library,
/// in memory): one is enough for reloads of the same bytes, which alternate
/// between the copy of the generation serving and the one of the
/// generation before it.
const KEPT_FREE: usize = 1;

/// The hash of a library's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(u128);

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A reusable read buffer.
#[derive(Default)]
pub struct Buffer(Vec<u8>);

impl Buffer {
    pub fn new() -> Buffer {
        Buffer::default()
    }

    fn get(&mut self) -> &mut [u8] {
        if self.0.len() < CHUNK {
            self.0.resize(CHUNK, 0);
        }
        &mut self.0[..CHUNK]
    }
}

/// Hashes `source` from its start to its end.
pub fn hash(source: &File, buffer: &mut Buffer) -> io::Result<ContentHash> {
    copy_hashing(source, None, buffer).map(|(hash, _)| hash)
}

/// Hashes `source` from its start to its end and, with `into`, writes the
/// same bytes there from its start: what is hashed is what is copied, even
/// if the file changes meanwhile. Returns the hash and the length.
pub fn copy_hashing(source: &File, into: Option<&File>, buffer: &mut Buffer) -> io::Result<(ContentHash, u64)> {
    let buffer = buffer.get();
    let mut hasher = Xxh3::new();
    let mut at = 0u64;
    loop {
        let read = match source.read_at(buffer, at) {
            Ok(0) => break,
            Ok(read) => read,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buffer[..read]);
        if let Some(into) = into {
            into.write_all_at(&buffer[..read], at)?;
        }
        at += read as u64;
    }
    Ok((ContentHash(hasher.digest128()), at))
}

/// An in-memory copy of a library and the hash of its bytes.
pub struct Copy {
    pub file: File,
    pub hash: ContentHash,
    /// The library file it holds the bytes of, as last seen, if that file
    /// had settled then (see [`Origin`]).
    pub origin: Option<Origin>,
}

/// Which file, in which state: device, inode, size, modification and
/// change times. A copy's origin lets a load of a file that is still in
/// that state reuse the copy without reading the file again.
///
/// The kernel sets a file's change time (`ctime`) to the current time
/// whenever its bytes or metadata change, and nothing can set it back. An
/// origin is recorded only for a file whose change time was at least
/// [`SETTLED`] old when its bytes were read and that was the same before
/// and after the read: any later change gets a later change time, however
/// coarse the file system's clock, so a file seen in the same state again
/// holds the same bytes. (A file changed in place while a load reads it
/// gets no origin: it is read and hashed again the next time.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    device: u64,
    inode: u64,
    len: u64,
    modified_ns: i128,
    changed_ns: i128,
}

/// How old a file's last change must be for its state to identify its bytes.
pub const SETTLED: std::time::Duration = std::time::Duration::from_secs(1);

impl Origin {
    pub fn of(metadata: &std::fs::Metadata) -> Origin {
        use std::os::unix::fs::MetadataExt;
        let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
        Origin {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified_ns: ns(metadata.mtime(), metadata.mtime_nsec()),
            changed_ns: ns(metadata.ctime(), metadata.ctime_nsec()),
        }
    }

    /// The state of the open `file` now.
    pub fn of_file(file: &File) -> io::Result<Origin> {
        Ok(Origin::of(&file.metadata()?))
    }

    /// `before` if the open `file`, whose bytes were just read from
    /// `read_at` on, had settled (see [`Origin::settled`]): its state now is
    /// the state after the read.
    pub fn settled_after(before: Origin, file: &File, read_at: std::time::SystemTime) -> io::Result<Option<Origin>> {
        Ok(Origin::settled(before, Origin::of_file(file)?, read_at))
    }

    /// `before`, the state of a file before its bytes were read, if it had
    /// settled: unchanged after the read (`after`), and last changed at
    /// least [`SETTLED`] before the read began (`read_at`, wall clock).
    pub fn settled(before: Origin, after: Origin, read_at: std::time::SystemTime) -> Option<Origin> {
        let read_ns = read_at.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as i128;
        (before == after && before.changed_ns <= read_ns - SETTLED.as_nanos() as i128).then_some(before)
    }
}

/// Copies whose generation was unmapped, for the next load of the same
/// bytes. The most recently returned come first; at most [`KEPT_FREE`].
#[derive(Default)]
pub struct Pool {
    free: Mutex<VecDeque<Copy>>,
}

impl Pool {
    /// Whether any copy is free (then a load hashes the file before it
    /// decides to copy it).
    pub fn has_free(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Takes a free copy made from the file in state `origin`, if there is
    /// one: the file has not changed since (see [`Origin`]).
    pub fn take_by_origin(&self, origin: Origin) -> Option<Copy> {
        let mut free = self.lock();
        let index = free.iter().position(|copy| copy.origin == Some(origin))?;
        free.remove(index)
    }

    /// Takes a free copy of the bytes of `hash`, if there is one.
    pub fn take(&self, hash: ContentHash) -> Option<Copy> {
        let mut free = self.lock();
        let index = free.iter().position(|copy| copy.hash == hash)?;
        free.remove(index)
    }

    /// Keeps `copy`, never mapped, for a load to come (unless the pool is
    /// full).
    pub fn stock(&self, copy: Copy) {
        let mut free = self.lock();
        if free.len() < KEPT_FREE {
            free.push_back(copy);
        }
    }

    /// Keeps `copy`, whose generation was unmapped, for reuse.
    fn give_back(&self, copy: Copy) {
        let mut free = self.lock();
        free.push_front(copy);
        free.truncate(KEPT_FREE);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Copy>> {
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The copy a generation was opened from, kept (as a descriptor of its
/// own) until the generation is unloaded: it goes back to its pool if the
/// library was really unmapped, and is closed otherwise.
pub struct Lent {
    copy: Copy,
    pool: Arc<Pool>,
}

impl Lent {
    pub fn new(copy: Copy, pool: Arc<Pool>) -> Lent {
        Lent { copy, pool }
    }

    /// The generation's library was unmapped: the copy may serve again.
    pub fn unmapped(self) {
        self.pool.give_back(self.copy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::process::memfd;

    fn memfd_with(bytes: &[u8]) -> File {
        let file = memfd("pounce-copies-test").unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    #[test]
    fn the_copy_is_what_was_hashed() {
        let bytes: Vec<u8> = (0..CHUNK * 3 + 17).map(|n| (n % 251) as u8).collect();
        let source = memfd_with(&bytes);
        let into = memfd("pounce-copies-test-copy").unwrap();
        let mut buffer = Buffer::new();
        let (copied, len) = copy_hashing(&source, Some(&into), &mut buffer).unwrap();
        assert_eq!(len, bytes.len() as u64);
        let mut back = vec![0; bytes.len()];
        into.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, bytes);
        assert_eq!(hash(&into, &mut buffer).unwrap(), copied);
        assert_eq!(copied, ContentHash(xxhash_rust::xxh3::xxh3_128(&bytes)));
        let mut changed = bytes.clone();
        changed[CHUNK + 5] ^= 1;
        assert_ne!(hash(&memfd_with(&changed), &mut buffer).unwrap(), copied);
        assert_eq!(copied.to_string().len(), 32);
    }

    #[test]
    fn the_pool_gives_copies_back_by_hash_and_keeps_few() {
        let pool = Arc::new(Pool::default());
        let copy = |n: u128| Copy { file: memfd("pounce-copies-test").unwrap(), hash: ContentHash(n), origin: None };
        assert!(!pool.has_free());
        for n in 1..=2 {
            Lent::new(copy(n), pool.clone()).unmapped();
        }
        assert!(pool.has_free());
        assert!(pool.take(ContentHash(1)).is_none(), "the older was let go");
        assert_eq!(pool.take(ContentHash(2)).map(|c| c.hash), Some(ContentHash(2)));
        assert!(pool.take(ContentHash(2)).is_none(), "a copy is handed out once");
        assert!(!pool.has_free());
    }

    #[test]
    fn a_stocked_spare_never_pushes_out_a_copy_already_there() {
        let pool = Pool::default();
        let copy = |n: u128| Copy { file: memfd("pounce-copies-test").unwrap(), hash: ContentHash(n), origin: None };
        pool.stock(copy(1));
        pool.stock(copy(2));
        assert!(pool.take(ContentHash(2)).is_none(), "the pool was full");
        assert_eq!(pool.take(ContentHash(1)).map(|c| c.hash), Some(ContentHash(1)));
        assert!(!pool.has_free());
    }

    #[test]
    fn a_file_is_known_by_its_state_only_once_it_has_settled() {
        let file = memfd("pounce-copies-test").unwrap();
        file.write_all_at(b"bytes", 0).unwrap();
        let state = Origin::of(&file.metadata().unwrap());
        let now = std::time::SystemTime::now();
        assert_eq!(Origin::settled(state, state, now), None, "changed a moment ago");
        let later = now + SETTLED + std::time::Duration::from_millis(10);
        assert_eq!(Origin::settled(state, state, later), Some(state));
        file.write_all_at(b"other", 0).unwrap();
        let changed = Origin::of(&file.metadata().unwrap());
        assert_eq!(Origin::settled(state, changed, later), None, "changed while it was read");
        let pool = Arc::new(Pool::default());
        Lent::new(Copy { file, hash: ContentHash(1), origin: Some(state) }, pool.clone()).unmapped();
        assert!(pool.take_by_origin(changed).is_none());
        assert!(pool.take_by_origin(state).is_some());
    }
}
