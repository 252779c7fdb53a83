//! A thin wrapper over `dlopen`/`dlsym`/`dlclose`.
//!
//! `libloading` would do, but the host needs two things it does not offer:
//! the base address of the mapped object (for the thread-local destructor
//! guard) and an honest answer to "is it still mapped after `dlclose`?".

use std::ffi::{c_void, CStr, CString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// An open shared library. Closing is explicit ([`Library::close`]): the
/// host decides when a library's code can no longer run.
pub(super) struct Library {
    handle: *mut c_void,
    path: PathBuf,
    /// For a library opened from an open file ([`Library::open_file`]): that
    /// file, whose descriptor number is in `path` (`/proc/self/fd/N`).
    ///
    /// glibc finds an already-open object by the path string first, so the
    /// number must not name another file while this object is loaded: a
    /// descriptor closed after mapping would be reused by the next load,
    /// whose `dlopen` would silently return this object. It is closed only
    /// once `dlclose` really unmapped the object, and leaked otherwise.
    file: Option<File>,
}

// SAFETY: a dlopen handle is a process-wide token; glibc's dl* functions are
// thread-safe.
unsafe impl Send for Library {}
// SAFETY: as above; `&Library` only allows `dlsym`, which is thread-safe.
unsafe impl Sync for Library {}

/// The last `dl*` error of this thread, as text.
fn last_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc,
    // valid until the next dl* call on this thread; we copy it at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "unknown dynamic loader error".to_owned()
    } else {
        // SAFETY: non-null: a NUL-terminated C string (see above).
        unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
    }
}

/// `dlopen(path, RTLD_NOW | RTLD_LOCAL)`.
fn dlopen(path: &Path) -> Result<*mut c_void, String> {
    let c_path = c_path(path)?;
    // SAFETY: opening a library runs its constructors. That is the inherent
    // risk of loading native code; the caller has checked that the file is
    // an ELF object the operator asked us to serve.
    let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(last_error());
    }
    Ok(handle)
}

/// Whether the dynamic loader still has an object open under `path`.
fn is_loaded(path: &Path) -> bool {
    let Ok(c_path) = c_path(path) else { return true };
    // SAFETY: RTLD_NOLOAD only looks the path up; if it is still loaded we
    // got a new reference, which we give back at once.
    let still = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if still.is_null() {
        return false;
    }
    // SAFETY: `still` is the reference RTLD_NOLOAD just took.
    unsafe { libc::dlclose(still) };
    true
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "the path contains a NUL byte".to_owned())
}

impl Library {
    /// Opens `path` with every symbol bound now (`RTLD_NOW`: a missing symbol
    /// fails here rather than in the middle of a request) and kept private to
    /// the library (`RTLD_LOCAL`: generations never see each other's symbols).
    pub(super) fn open(path: &Path) -> Result<Library, String> {
        Ok(Library { handle: dlopen(path)?, path: path.to_owned(), file: None })
    }

    /// Opens the library in `file` (an anonymous in-memory file, say)
    /// through its `/proc/self/fd/N` path, as [`Library::open`] does. The
    /// library keeps `file` open (see the field).
    pub(super) fn open_file(file: File) -> Result<Library, String> {
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Ok(Library { handle: dlopen(&path)?, path, file: Some(file) })
    }

    /// The address of symbol `name`, if the library defines it.
    pub(super) fn symbol(&self, name: &str) -> Option<*mut c_void> {
        let c_name = CString::new(name).ok()?;
        // SAFETY: `handle` is open; dlsym only reads the symbol tables.
        let address = unsafe { libc::dlsym(self.handle, c_name.as_ptr()) };
        (!address.is_null()).then_some(address)
    }

    /// Where the library is mapped: the base address `dladdr` reports for any
    /// address inside it.
    pub(super) fn base_of(address: *const c_void) -> Option<usize> {
        let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
        // SAFETY: dladdr only reads loader state and writes `info`.
        let found = unsafe { libc::dladdr(address, info.as_mut_ptr()) };
        // SAFETY: dladdr filled `info` when it returned non-zero.
        (found != 0).then(|| unsafe { info.assume_init() }.dli_fbase as usize)
    }

    /// Closes the library and reports whether its code is really unmapped.
    ///
    /// `dlclose` returns success even when the object stays (another
    /// reference, or a thread-local destructor registered against it), so
    /// the answer comes from asking the loader, without loading, whether the
    /// path is still open.
    pub(super) fn close(mut self) -> bool {
        // SAFETY: the caller guarantees no code of the library will run again
        // (all its futures, streams, wakers and threads are gone).
        unsafe { libc::dlclose(self.handle) };
        let unmapped = !is_loaded(&self.path);
        if unmapped {
            drop(self.file.take());
        }
        unmapped
    }
}

impl Drop for Library {
    /// A library dropped without [`Library::close`], or that stayed mapped,
    /// is leaked on purpose; so is its file, whose descriptor number must
    /// keep naming it (see the `file` field).
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            std::mem::forget(file);
        }
    }
}
