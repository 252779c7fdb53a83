//! The thread-local destructor guard: lets a retired generation really unmap.
//!
//! # The problem
//! When app code first touches a Rust `thread_local!` with a destructor on
//! some thread (tokio's runtime context does, on every host worker thread
//! that polls an app future), the app's copy of std registers the destructor
//! with glibc's `__cxa_thread_atexit_impl`, passing the app's own
//! `__dso_handle`. glibc then counts one pending destructor against the app
//! library, and `dlclose` leaves the library mapped until that thread exits.
//! The host's workers never exit, so without this guard every generation
//! would stay mapped forever (measured: 51 of 51 copies after 50 reloads).
//!
//! # The fix
//! The `pounce-host` executable defines `__cxa_thread_atexit_impl` itself and
//! exports it (see `host/build.rs`); the dynamic loader binds every library's
//! reference to the executable's definition first. For a destructor whose
//! DSO is a live app generation, the guard registers a host-owned trampoline
//! with the real glibc function instead, charged to the host executable. At
//! thread exit the trampoline runs the app's destructor only if that
//! generation is still loaded; if it was unloaded, the destructor is skipped
//! and the thread-local's contents leak (a few bytes per thread, counted in
//! [`skipped_destructors`]). Everything else goes straight to glibc.
//!
//! std also keeps one POSIX thread-specific key per library (its
//! `thread::current()` cleanup runs from that key's destructor), created
//! with `pthread_key_create` the first time app code asks for the current
//! thread on some thread. Such a key has two problems: its destructor is app
//! code that glibc runs at thread exit, and keys are a finite resource
//! (`PTHREAD_KEYS_MAX`, 1024), so a host that reloads often would run out.
//! The guard also interposes `pthread_key_create`, remembers the keys whose
//! destructor lives in an app generation, and deletes them when that
//! generation is unloaded: glibc then neither runs their destructors nor
//! keeps their slots.
//!
//! An unload removes the generation from the guard first, waits for any of
//! its destructors already running, and deletes its keys; after that no
//! trampoline calls into it. The guard depends on glibc and on std registering destructors this
//! way; `--unload-guard off` turns it into a pure pass-through (libraries
//! then stay mapped, and the host reports them as pinned).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::library::Library;

type Destructor = unsafe extern "C" fn(*mut c_void);
type AtexitImpl = unsafe extern "C" fn(Destructor, *mut c_void, *mut c_void) -> c_int;
type KeyCreate = unsafe extern "C" fn(*mut libc::pthread_key_t, Option<Destructor>) -> c_int;
type KeyDelete = unsafe extern "C" fn(libc::pthread_key_t) -> c_int;

/// Whether app destructors are redirected (`--unload-guard`).
static ENABLED: AtomicBool = AtomicBool::new(false);
/// glibc's own `__cxa_thread_atexit_impl` and `pthread_key_create`, looked
/// up once.
static REAL_ATEXIT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static REAL_KEY_CREATE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static REAL_KEY_DELETE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// The live app generations, by the base address their library is mapped at.
static GENERATIONS: Mutex<Vec<Arc<Guarded>>> = Mutex::new(Vec::new());
static SKIPPED: AtomicU64 = AtomicU64::new(0);

struct Guarded {
    generation: u64,
    base: usize,
    /// Destructors of this generation running right now.
    running: AtomicUsize,
    /// Thread-specific keys whose destructor is code of this generation.
    keys: Mutex<Vec<libc::pthread_key_t>>,
}

/// A destructor deferred to the trampoline.
struct Deferred {
    destructor: Destructor,
    object: *mut c_void,
    generation: u64,
}

/// Turns the guard on or off; called once at start, before any library is
/// loaded.
pub fn set_enabled(enabled: bool) {
    // Referencing the interposers keeps the linker from dropping them from
    // the executable (apps only reach them through the dynamic symbol table).
    std::hint::black_box(__cxa_thread_atexit_impl as AtexitImpl);
    std::hint::black_box(pthread_key_create as KeyCreate);
    std::hint::black_box(pthread_key_delete as KeyDelete);
    ENABLED.store(enabled, Ordering::SeqCst);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// App destructors skipped because their generation was already unloaded.
pub fn skipped_destructors() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

fn generations() -> MutexGuard<'static, Vec<Arc<Guarded>>> {
    // The list stays consistent even if a holder panicked: every change is a
    // single push or remove.
    GENERATIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts guarding the library that contains `address`, as `generation`.
/// Called right after `dlopen`, before any app code that could touch a
/// thread-local runs.
pub(super) fn register(address: *const c_void, generation: u64) {
    if let Some(base) = Library::base_of(address) {
        let guarded = Guarded { generation, base, running: AtomicUsize::new(0), keys: Mutex::new(Vec::new()) };
        generations().push(Arc::new(guarded));
    }
}

/// Stops guarding `generation`: from now on its deferred destructors are
/// skipped and its thread-specific keys are deleted. Returns once none of its
/// destructors is running, so the caller may unmap it.
pub(super) fn unregister(generation: u64) {
    let removed = {
        let mut list = generations();
        let index = list.iter().position(|g| g.generation == generation);
        index.map(|i| list.swap_remove(i))
    };
    if let Some(guarded) = removed {
        while guarded.running.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        let Some(delete) = real_key_delete() else { return };
        for key in guarded.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).drain(..) {
            // SAFETY: the key was created for this generation's std and is
            // still its own (deletes are tracked by the interposer below);
            // its code will not run again, so deleting it only stops glibc
            // from calling its destructor and frees the slot.
            unsafe { delete(key) };
        }
    }
}

/// The next definition of `name` after the executable's, i.e. glibc's.
fn real_symbol(cache: &AtomicPtr<c_void>, name: &std::ffi::CStr) -> *mut c_void {
    let mut real = cache.load(Ordering::Acquire);
    if real.is_null() {
        // SAFETY: dlsym with RTLD_NEXT only reads the loader's tables.
        real = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        cache.store(real, Ordering::Release);
    }
    real
}

fn real_atexit() -> Option<AtexitImpl> {
    let real = real_symbol(&REAL_ATEXIT, c"__cxa_thread_atexit_impl");
    // SAFETY: a non-null result is glibc's function, whose signature is
    // `AtexitImpl` (glibc's stdlib/cxa_thread_atexit_impl.c).
    (!real.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, AtexitImpl>(real) })
}

fn real_key_delete() -> Option<KeyDelete> {
    let real = real_symbol(&REAL_KEY_DELETE, c"pthread_key_delete");
    // SAFETY: a non-null result is glibc's `pthread_key_delete` (POSIX signature).
    (!real.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, KeyDelete>(real) })
}

fn real_key_create() -> Option<KeyCreate> {
    let real = real_symbol(&REAL_KEY_CREATE, c"pthread_key_create");
    // SAFETY: a non-null result is glibc's `pthread_key_create` (POSIX signature).
    (!real.is_null()).then(|| unsafe { std::mem::transmute::<*mut c_void, KeyCreate>(real) })
}

/// The guarded generation whose library contains `address`, if any. The
/// loader lookup runs without the list's lock held (see `unregister`'s
/// caller, which may hold the loader's lock while it needs ours).
fn guarded_at(address: *const c_void) -> Option<Arc<Guarded>> {
    if !ENABLED.load(Ordering::Relaxed) || generations().is_empty() {
        return None;
    }
    let base = Library::base_of(address)?;
    generations().iter().find(|g| g.base == base).cloned()
}

/// The interposer. See the module docs. It must not panic (it is
/// `extern "C"`) and must not itself use a thread-local with a destructor.
///
/// # Safety
/// Called by std/libc with the contract of glibc's function: `destructor`
/// must be called with `object` at thread exit; `dso_symbol` is an address
/// inside the DSO that owns `destructor`.
#[no_mangle]
pub unsafe extern "C" fn __cxa_thread_atexit_impl(
    destructor: Destructor,
    object: *mut c_void,
    dso_symbol: *mut c_void,
) -> c_int {
    let Some(real) = real_atexit() else {
        // No glibc support (pre-2.18): the destructor cannot be registered.
        // Not running it leaks the thread-local's contents, never more.
        return 0;
    };
    let Some(guarded) = guarded_at(dso_symbol) else {
        // SAFETY: forwarding the caller's arguments unchanged to glibc.
        return unsafe { real(destructor, object, dso_symbol) };
    };
    let deferred = Box::into_raw(Box::new(Deferred { destructor, object, generation: guarded.generation }));
    // SAFETY: the trampoline is host code, so the registration is charged to
    // the executable (any address inside it identifies it); the trampoline
    // frees `deferred` exactly once.
    unsafe { real(run_deferred, deferred as *mut c_void, &ENABLED as *const AtomicBool as *mut c_void) }
}

/// The second interposer: creates the key, and remembers it if its
/// destructor is app code (see the module docs).
///
/// # Safety
/// The contract of POSIX `pthread_key_create`.
#[no_mangle]
pub unsafe extern "C" fn pthread_key_create(key: *mut libc::pthread_key_t, destructor: Option<Destructor>) -> c_int {
    let Some(real) = real_key_create() else { return libc::EAGAIN };
    // SAFETY: forwarding the caller's arguments unchanged to glibc.
    let code = unsafe { real(key, destructor) };
    if code == 0 {
        if let Some(guarded) = destructor.and_then(|d| guarded_at(d as *const c_void)) {
            // SAFETY: glibc wrote the new key to `key` on success.
            let created = unsafe { *key };
            guarded.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(created);
        }
    }
    code
}

/// The third interposer: a key deleted by its owner (std deletes a key it
/// created in a lost race) is forgotten, so an unload never deletes a slot
/// that glibc has since handed to someone else.
///
/// # Safety
/// The contract of POSIX `pthread_key_delete`.
#[no_mangle]
pub unsafe extern "C" fn pthread_key_delete(key: libc::pthread_key_t) -> c_int {
    let Some(real) = real_key_delete() else { return libc::EINVAL };
    for guarded in generations().iter() {
        guarded.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|&k| k != key);
    }
    // SAFETY: forwarding the caller's argument unchanged to glibc.
    unsafe { real(key) }
}

/// Runs at thread exit in place of an app's destructor.
unsafe extern "C" fn run_deferred(deferred: *mut c_void) {
    // SAFETY: `deferred` is the box made by the interposer, passed once.
    let deferred = unsafe { Box::from_raw(deferred as *mut Deferred) };
    let guarded = {
        let list = generations();
        let found = list.iter().find(|g| g.generation == deferred.generation).cloned();
        if let Some(g) = &found {
            // Counted under the lock, so `unregister` either sees it running
            // or removed the generation before it could start.
            g.running.fetch_add(1, Ordering::SeqCst);
        }
        found
    };
    let Some(guarded) = guarded else {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // SAFETY: the generation is registered, so its library is mapped, and
    // `unregister` waits for `running` to drop before it may be unmapped.
    unsafe { (deferred.destructor)(deferred.object) };
    guarded.running.fetch_sub(1, Ordering::SeqCst);
}
