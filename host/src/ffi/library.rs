//! A thin wrapper over `dlopen`/`dlsym`/`dlclose`.
//!
//! `libloading` would do, but the host needs two things it does not offer:
//! where the object is mapped (its segments, for the unload guard and the
//! checks before an unload) and an honest answer to "is it still mapped
//! after `dlclose`?".

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fs::File;
use std::ops::Range;
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

    /// Where the library is mapped: its loadable segments (`PT_LOAD`), code
    /// and data, as the dynamic loader mapped them. Empty if the loader
    /// cannot say (then nothing is attributed to the library).
    pub(super) fn segments(&self) -> Segments {
        let mut map: *mut LinkMap = std::ptr::null_mut();
        // SAFETY: `handle` is open; RTLD_DI_LINKMAP writes one pointer, to the
        // object's `struct link_map`, into `map`.
        let found = unsafe { libc::dlinfo(self.handle, libc::RTLD_DI_LINKMAP, (&raw mut map).cast()) };
        if found != 0 || map.is_null() {
            return Segments::default();
        }
        // SAFETY: `map` is the loader's record of this open object; its
        // public head (`LinkMap`) is stable glibc ABI and lives while the
        // object is open.
        let bias = unsafe { (*map).l_addr };
        if bias == 0 {
            // Only a non-PIC object loads at bias 0, like the executable:
            // it could not be told apart, so claim nothing.
            return Segments::default();
        }
        let mut search = SegmentSearch { bias, found: Vec::new() };
        // SAFETY: the callback only reads the entries dl_iterate_phdr passes
        // and writes `search`, which outlives the call.
        unsafe { libc::dl_iterate_phdr(Some(visit_object), (&raw mut search).cast()) };
        Segments(search.found)
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

/// The public head of glibc's `struct link_map` (`<link.h>`).
#[repr(C)]
struct LinkMap {
    /// The difference between the object's addresses in memory and in its file.
    l_addr: usize,
    l_name: *const c_char,
    l_ld: *mut c_void,
    l_next: *mut LinkMap,
    l_prev: *mut LinkMap,
}

struct SegmentSearch {
    bias: usize,
    found: Vec<Range<usize>>,
}

/// `dl_iterate_phdr`'s callback: collects the loadable segments of the
/// object whose load bias is `SegmentSearch::bias` (no two open objects
/// share one), then stops the walk.
///
/// # Safety
/// Called by `dl_iterate_phdr` with a valid `info`, and with the
/// `SegmentSearch` that `Library::segments` passed as `data`.
unsafe extern "C" fn visit_object(info: *mut libc::dl_phdr_info, _size: usize, data: *mut c_void) -> c_int {
    // SAFETY: see the function's contract.
    let (info, search) = unsafe { (&*info, &mut *data.cast::<SegmentSearch>()) };
    if info.dlpi_addr as usize != search.bias || info.dlpi_phdr.is_null() {
        return 0;
    }
    for index in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
        let header = unsafe { &*info.dlpi_phdr.add(index) };
        if header.p_type == libc::PT_LOAD && header.p_memsz > 0 {
            let start = search.bias.wrapping_add(header.p_vaddr as usize);
            search.found.push(start..start.saturating_add(header.p_memsz as usize));
        }
    }
    1
}

/// The address ranges an open library occupies (see [`Library::segments`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments(Vec<Range<usize>>);

impl Segments {
    /// Segments from `(start, end)` pairs, end exclusive.
    #[cfg(test)]
    pub(super) fn from_ranges(ranges: &[(usize, usize)]) -> Segments {
        Segments(ranges.iter().map(|&(start, end)| start..end).collect())
    }

    /// Whether `address` lies in the library. Null never does.
    pub fn contains(&self, address: usize) -> bool {
        address != 0 && self.0.iter().any(|range| range.contains(&address))
    }
}
