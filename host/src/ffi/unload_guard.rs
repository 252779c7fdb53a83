//! The unload guard: lets a retired generation really unmap, and keeps what
//! an unload must know about each loaded library.
//!
//! # Loads
//! Every library opened is registered as a *load* with an id that is never
//! reused ([`LoadId`]), with the generation number it was loaded as (for
//! logs only: a failed or timed-out load and its retry share that number)
//! and its mapped segments, right after `dlopen` and before any of its code
//! but its ELF constructors has run. Everything below is keyed by load id.
//!
//! # Thread-local destructors
//! When app code first touches a Rust `thread_local!` with a destructor on
//! some thread (tokio's runtime context does, on every host worker thread
//! that polls an app future), the app's copy of std registers the destructor
//! with glibc's `__cxa_thread_atexit_impl`, passing the app's own
//! `__dso_handle`. glibc then counts one pending destructor against the app
//! library, and `dlclose` leaves the library mapped until that thread exits.
//! The host's workers never exit, so without this guard every generation
//! would stay mapped forever (measured: 51 of 51 copies after 50 reloads).
//!
//! The `pounce-host` executable defines `__cxa_thread_atexit_impl` itself and
//! exports it (see `host/build.rs`); the dynamic loader binds every library's
//! reference to the executable's definition first. For a destructor whose
//! DSO is a live load, the guard registers a host-owned trampoline with the
//! real glibc function instead, charged to the host executable. At thread
//! exit the trampoline runs the app's destructor only if that load is still
//! registered; if it was unloaded, the destructor is skipped and the
//! thread-local's contents leak (a few bytes per thread, counted in
//! [`skipped_destructors`]). Everything else goes straight to glibc.
//!
//! # Thread-specific keys
//! POSIX keys are a finite resource (`PTHREAD_KEYS_MAX`, 1024) and their
//! destructors run at thread exit, so every key a library created must be
//! deleted when it is unmapped: else a host that reloads often runs out of
//! keys (a C library that creates one with `free` as destructor leaks a
//! slot per generation), and glibc may call a destructor in unmapped code.
//! The executable also exports `pthread_key_create` and `pthread_key_delete`:
//! every key created in the process is recorded with its destructor and the
//! return address of the `pthread_key_create` call (the caller), and
//! forgotten when its owner deletes it (so an unload never deletes a slot
//! glibc has since handed to someone else). Unloading a library deletes the
//! keys whose destructor *or caller* lies in it.
//!
//! Attribution is by address, evaluated when the library is unloaded, not
//! when the key is created. So keys made by its ELF constructors, during
//! `dlopen` and before the load is registered, count, and so do keys made
//! on the app's own threads. The caller's address comes from a few
//! instructions of assembly that read the return address and jump to the
//! Rust function (Rust has no `__builtin_return_address`).
//!
//! The alternative, a thread-local "app code of load X is running" marker
//! that the host sets around every call into the app, was rejected: it
//! misses keys created on threads the app started, and it blames the app
//! for keys that *host* code or a shared system library creates while app
//! code is on the stack (the host's std creating its own key lazily inside
//! the app's log callback, or a system library the host also uses creating
//! its key on first use), and deleting those at unload would break the
//! host. The return address never names the app for a key it did not create
//! itself. (A key created by a shared library the app depends on is not
//! attributed; on architectures without the assembly, only the destructor
//! attributes a key.)
//!
//! # Order at unload
//! An unload (after the checks in `pins`) removes the load from the guard,
//! waits for any of its destructors already running, and deletes its keys;
//! after that no trampoline calls into it. A load that stays mapped stays
//! registered. `--unload-guard off` makes the thread-local and key parts
//! pass-throughs (destructors go to glibc, keys are never deleted; keys are
//! still recorded, so a library whose key destructor remains is kept mapped).

use std::ffi::{c_int, c_void};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::library::Segments;

type Destructor = unsafe extern "C" fn(*mut c_void);
type AtexitImpl = unsafe extern "C" fn(Destructor, *mut c_void, *mut c_void) -> c_int;
type KeyCreate = unsafe extern "C" fn(*mut libc::pthread_key_t, Option<Destructor>) -> c_int;
type KeyDelete = unsafe extern "C" fn(libc::pthread_key_t) -> c_int;

/// Whether app destructors are redirected and app keys deleted (`--unload-guard`).
static ENABLED: AtomicBool = AtomicBool::new(false);
/// glibc's own functions, looked up once.
static REAL_ATEXIT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static REAL_KEY_CREATE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
static REAL_KEY_DELETE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
/// The registered loads.
static LOADS: Registry = Registry::new();
/// Every thread-specific key created in the process and not deleted.
static KEYS: KeyTable = KeyTable::new();
static SKIPPED: AtomicU64 = AtomicU64::new(0);
static NEXT_LOAD: AtomicU64 = AtomicU64::new(1);

/// One opening of a library: never reused, unlike generation numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoadId(u64);

impl fmt::Display for LoadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "load {}", self.0)
    }
}

/// What the guard keeps about one load.
pub(super) struct Guarded {
    load: LoadId,
    generation: u64,
    segments: Segments,
    /// The process's threads just before the library was opened (`None`:
    /// the task list could not be read).
    threads_before: Option<Vec<i32>>,
    /// Destructors of this load running right now.
    running: AtomicUsize,
    /// Bit `n - 1`: the library was seen holding the handler of signal `n`.
    signals_held: AtomicU64,
}

impl Guarded {
    pub(super) fn load(&self) -> LoadId {
        self.load
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    pub(super) fn segments(&self) -> &Segments {
        &self.segments
    }

    pub(super) fn threads_before(&self) -> Option<&[i32]> {
        self.threads_before.as_deref()
    }

    /// Remembers that the library held the handler of `signal` (1..=64).
    pub(super) fn note_signal(&self, signal: i32) {
        if let Some(bit) = signal_bit(signal) {
            self.signals_held.fetch_or(bit, Ordering::Relaxed);
        }
    }

    pub(super) fn held_signal(&self, signal: i32) -> bool {
        signal_bit(signal).is_some_and(|bit| self.signals_held.load(Ordering::Relaxed) & bit != 0)
    }
}

fn signal_bit(signal: i32) -> Option<u64> {
    (1..=64).contains(&signal).then(|| 1u64 << (signal - 1))
}

/// The registered loads.
pub(super) struct Registry {
    loads: Mutex<Vec<Arc<Guarded>>>,
}

impl Registry {
    const fn new() -> Registry {
        Registry { loads: Mutex::new(Vec::new()) }
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<Guarded>>> {
        // The list stays consistent even if a holder panicked: every change
        // is a single push or remove.
        self.loads.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a new load under a fresh id.
    fn add(&self, generation: u64, segments: Segments, threads_before: Option<Vec<i32>>) -> Arc<Guarded> {
        let load = LoadId(NEXT_LOAD.fetch_add(1, Ordering::Relaxed));
        let guarded = Arc::new(Guarded {
            load,
            generation,
            segments,
            threads_before,
            running: AtomicUsize::new(0),
            signals_held: AtomicU64::new(0),
        });
        self.list().push(guarded.clone());
        guarded
    }

    fn remove(&self, load: LoadId) -> Option<Arc<Guarded>> {
        let mut list = self.list();
        let index = list.iter().position(|g| g.load == load)?;
        Some(list.swap_remove(index))
    }

    fn get(&self, load: LoadId) -> Option<Arc<Guarded>> {
        self.list().iter().find(|g| g.load == load).cloned()
    }

    /// The load whose library contains `address`.
    fn containing(&self, address: usize) -> Option<Arc<Guarded>> {
        self.list().iter().find(|g| g.segments.contains(address)).cloned()
    }

    fn all(&self) -> Vec<Arc<Guarded>> {
        self.list().clone()
    }

    fn is_empty(&self) -> bool {
        self.list().is_empty()
    }
}

/// A key as created: by whom, with what destructor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyRecord {
    key: libc::pthread_key_t,
    destructor: usize,
    /// The return address of the `pthread_key_create` call (0 if unknown).
    caller: usize,
}

impl KeyRecord {
    fn belongs_to(&self, segments: &Segments) -> bool {
        segments.contains(self.destructor) || segments.contains(self.caller)
    }
}

/// Every live key of the process. Creation, deletion by its owner and
/// deletion at unload are serialized by its lock, so a key is never deleted
/// twice (the second time, it could be someone else's).
pub(super) struct KeyTable {
    keys: Mutex<Vec<KeyRecord>>,
}

impl KeyTable {
    const fn new() -> KeyTable {
        KeyTable { keys: Mutex::new(Vec::new()) }
    }

    fn list(&self) -> MutexGuard<'_, Vec<KeyRecord>> {
        self.keys.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a key glibc just created (replacing a stale record of the
    /// same number, deleted behind the table's back).
    fn created(&self, key: libc::pthread_key_t, destructor: usize, caller: usize) {
        let mut list = self.list();
        list.retain(|r| r.key != key);
        list.push(KeyRecord { key, destructor, caller });
    }

    /// Runs `delete` for `key` (its owner deletes it), with the table locked.
    fn deleted<T>(&self, key: libc::pthread_key_t, delete: impl FnOnce() -> T) -> T {
        let mut list = self.list();
        list.retain(|r| r.key != key);
        delete()
    }

    /// Deletes (with `delete`) and forgets every key that belongs to the
    /// library at `segments`; returns how many.
    fn delete_belonging(&self, segments: &Segments, mut delete: impl FnMut(libc::pthread_key_t)) -> usize {
        let mut list = self.list();
        let before = list.len();
        list.retain(|record| {
            let belongs = record.belongs_to(segments);
            if belongs {
                delete(record.key);
            }
            !belongs
        });
        before - list.len()
    }

    /// The keys whose destructor lies in the library at `segments`.
    fn with_destructor_in(&self, segments: &Segments) -> Vec<libc::pthread_key_t> {
        self.list().iter().filter(|r| segments.contains(r.destructor)).map(|r| r.key).collect()
    }

    #[cfg(test)]
    fn record(&self, key: libc::pthread_key_t) -> Option<KeyRecord> {
        self.list().iter().find(|r| r.key == key).copied()
    }
}

/// A destructor deferred to the trampoline.
struct Deferred {
    destructor: Destructor,
    object: *mut c_void,
    load: LoadId,
}

/// Turns the guard on or off; called once at start, before any library is
/// loaded.
pub fn set_enabled(enabled: bool) {
    // Referencing the interposers keeps the linker from dropping them from
    // the executable (apps only reach them through the dynamic symbol table).
    std::hint::black_box(__cxa_thread_atexit_impl as AtexitImpl);
    std::hint::black_box(interposed_key_create as KeyCreate);
    std::hint::black_box(pthread_key_delete as KeyDelete);
    super::threads::keep_interposer();
    ENABLED.store(enabled, Ordering::SeqCst);
}

pub fn is_enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// App destructors skipped because their load was already unloaded.
pub fn skipped_destructors() -> u64 {
    SKIPPED.load(Ordering::Relaxed)
}

/// Registers a library just opened as `generation`, mapped at `segments`;
/// `threads_before` are the process's threads from just before `dlopen`.
pub(super) fn register(generation: u64, segments: Segments, threads_before: Option<Vec<i32>>) -> LoadId {
    LOADS.add(generation, segments, threads_before).load
}

/// The load `load`, if it is registered.
pub(super) fn get(load: LoadId) -> Option<Arc<Guarded>> {
    LOADS.get(load)
}

/// Every registered load. A load left mapped on purpose is never
/// unregistered: its destructors keep running, its keys are kept, and its
/// segments keep counting (for the signal check).
pub(super) fn loads() -> Vec<Arc<Guarded>> {
    LOADS.all()
}

/// The keys whose destructor lies in `load`'s library that an unload would
/// leave behind: none while the guard is on (it deletes them), all of them
/// while it is off.
pub(super) fn keys_left_behind(load: &Guarded) -> Vec<libc::pthread_key_t> {
    if is_enabled() {
        Vec::new()
    } else {
        KEYS.with_destructor_in(&load.segments)
    }
}

/// Stops guarding `load`: from now on its deferred destructors are skipped
/// and its keys are deleted (guard on) or forgotten (off). Returns once none
/// of its destructors is running, so the caller may unmap it.
pub(super) fn unregister(load: LoadId) {
    let Some(guarded) = LOADS.remove(load) else { return };
    while guarded.running.load(Ordering::SeqCst) > 0 {
        std::thread::yield_now();
    }
    let delete = if is_enabled() { real_key_delete() } else { None };
    KEYS.delete_belonging(&guarded.segments, |key| {
        if let Some(delete) = delete {
            // SAFETY: the key was created by this library's code (its
            // destructor or its caller lies in it) and not deleted since
            // (deletes are tracked under the same lock); the library's code
            // will not run again, so deleting the key only stops glibc from
            // calling its destructor and frees the slot.
            unsafe { delete(key) };
        }
    });
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

/// The live load whose library contains `address`, while the guard is on.
/// Takes only the registry's lock, never the dynamic loader's.
fn guarded_at(address: *const c_void) -> Option<Arc<Guarded>> {
    if !ENABLED.load(Ordering::Relaxed) || LOADS.is_empty() {
        return None;
    }
    LOADS.containing(address as usize)
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
    let deferred = Box::into_raw(Box::new(Deferred { destructor, object, load: guarded.load }));
    // SAFETY: the trampoline is host code, so the registration is charged to
    // the executable (any address inside it identifies it); the trampoline
    // frees `deferred` exactly once.
    unsafe { real(run_deferred, deferred as *mut c_void, &ENABLED as *const AtomicBool as *mut c_void) }
}

// The exported `pthread_key_create`: passes its return address (the caller)
// as a third argument to `key_create_from`, by jumping to it with the stack
// untouched, so `key_create_from` returns straight to the caller.
#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.pounce_pthread_key_create,\"ax\",@progbits",
    ".globl pthread_key_create",
    ".type pthread_key_create,@function",
    ".p2align 4",
    "pthread_key_create:",
    "mov rdx, qword ptr [rsp]",
    "jmp {create}",
    ".size pthread_key_create, . - pthread_key_create",
    ".popsection",
    create = sym key_create_from,
);

#[cfg(target_arch = "aarch64")]
std::arch::global_asm!(
    ".pushsection .text.pounce_pthread_key_create,\"ax\",%progbits",
    ".globl pthread_key_create",
    ".type pthread_key_create,%function",
    ".p2align 2",
    "pthread_key_create:",
    "mov x2, x30",
    "b {create}",
    ".size pthread_key_create, . - pthread_key_create",
    ".popsection",
    create = sym key_create_from,
);

/// Without the assembly, the caller is unknown: only the destructor
/// attributes a key.
///
/// # Safety
/// The contract of POSIX `pthread_key_create`.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
#[no_mangle]
pub unsafe extern "C" fn pthread_key_create(key: *mut libc::pthread_key_t, destructor: Option<Destructor>) -> c_int {
    // SAFETY: the caller's contract, forwarded.
    unsafe { key_create_from(key, destructor, 0) }
}

extern "C" {
    /// The exported `pthread_key_create` above (the assembly's or the
    /// fallback's), named so the executable keeps it.
    #[link_name = "pthread_key_create"]
    fn interposed_key_create(key: *mut libc::pthread_key_t, destructor: Option<Destructor>) -> c_int;
}

/// The second interposer: creates the key and records it with its
/// destructor and `caller` (see the module docs).
///
/// # Safety
/// The contract of POSIX `pthread_key_create`; `caller` is any address.
unsafe extern "C" fn key_create_from(
    key: *mut libc::pthread_key_t,
    destructor: Option<Destructor>,
    caller: usize,
) -> c_int {
    let Some(real) = real_key_create() else { return libc::EAGAIN };
    // SAFETY: forwarding the caller's arguments unchanged to glibc.
    let code = unsafe { real(key, destructor) };
    if code == 0 {
        // SAFETY: glibc wrote the new key to `key` on success.
        let created = unsafe { *key };
        KEYS.created(created, destructor.map_or(0, |d| d as usize), caller);
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
    // SAFETY: forwarding the caller's argument unchanged to glibc.
    KEYS.deleted(key, || unsafe { real(key) })
}

/// Runs at thread exit in place of an app's destructor.
///
/// # Safety
/// Called only by glibc's thread-exit key destructors, with `deferred` a
/// pointer made by `Box::into_raw` of a `Deferred` in this module, once.
unsafe extern "C" fn run_deferred(deferred: *mut c_void) {
    // SAFETY: `deferred` is the box made by the interposer, passed once.
    let deferred = unsafe { Box::from_raw(deferred as *mut Deferred) };
    let guarded = {
        let list = LOADS.list();
        let found = list.iter().find(|g| g.load == deferred.load).cloned();
        if let Some(g) = &found {
            // Counted under the lock, so `unregister` either sees it running
            // or removed the load before it could start.
            g.running.fetch_add(1, Ordering::SeqCst);
        }
        found
    };
    let Some(guarded) = guarded else {
        SKIPPED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // SAFETY: the load is registered, so its library is mapped, and
    // `unregister` waits for `running` to drop before it may be unmapped.
    unsafe { (deferred.destructor)(deferred.object) };
    guarded.running.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments(ranges: &[(usize, usize)]) -> Segments {
        Segments::from_ranges(ranges)
    }

    #[test]
    fn load_ids_are_never_reused_even_for_the_same_generation() {
        let registry = Registry::new();
        let failed = registry.add(7, segments(&[(0x1000, 0x2000)]), None).load;
        let retry = registry.add(7, segments(&[(0x5000, 0x6000)]), None).load;
        assert_ne!(failed, retry);
        // Releasing the failed load leaves its retry alone.
        assert!(registry.remove(failed).is_some());
        assert!(registry.remove(failed).is_none());
        assert_eq!(registry.get(retry).map(|g| g.generation()), Some(7));
        let again = registry.add(7, segments(&[(0x1000, 0x2000)]), None).load;
        assert!(again != failed && again != retry, "a new opening gets a new id");
    }

    #[test]
    fn loads_are_found_by_any_address_in_their_segments() {
        let registry = Registry::new();
        let a = registry.add(1, segments(&[(0x1000, 0x2000), (0x3000, 0x3800)]), Some(vec![1, 2])).load;
        let b = registry.add(2, segments(&[(0x9000, 0xa000)]), None).load;
        assert_eq!(registry.containing(0x1000).map(|g| g.load()), Some(a));
        assert_eq!(registry.containing(0x37ff).map(|g| g.load()), Some(a));
        assert_eq!(registry.containing(0x9abc).map(|g| g.load()), Some(b));
        assert!(registry.containing(0x2000).is_none(), "the end is exclusive");
        assert!(registry.containing(0x2800).is_none(), "a gap between segments is not the library");
        assert!(registry.containing(0).is_none());
        assert_eq!(registry.get(a).and_then(|g| g.threads_before().map(<[i32]>::to_vec)), Some(vec![1, 2]));
        assert_eq!(registry.all().len(), 2);
    }

    #[test]
    fn signals_held_are_remembered_per_load() {
        let registry = Registry::new();
        let guarded = registry.add(1, segments(&[(0x1000, 0x2000)]), None);
        assert!(!guarded.held_signal(libc::SIGHUP));
        guarded.note_signal(libc::SIGHUP);
        guarded.note_signal(64);
        guarded.note_signal(0);
        guarded.note_signal(65);
        assert!(guarded.held_signal(libc::SIGHUP) && guarded.held_signal(64));
        assert!(!guarded.held_signal(libc::SIGUSR1) && !guarded.held_signal(0) && !guarded.held_signal(65));
    }

    #[test]
    fn keys_belong_to_the_library_of_their_destructor_or_their_caller() {
        let table = KeyTable::new();
        let app = segments(&[(0x10_000, 0x20_000)]);
        let libc_free = 0x7000_0000;
        table.created(1, 0x10_100, 0x50_000); // std's key: destructor in the app
        table.created(2, libc_free, 0x10_200); // a C library's key: `free`, created by the app
        table.created(3, libc_free, 0x60_000); // the host's own key
        table.created(4, 0, 0x10_300); // no destructor, created by the app
        assert_eq!(table.with_destructor_in(&app), vec![1]);
        let mut deleted = Vec::new();
        assert_eq!(table.delete_belonging(&app, |key| deleted.push(key)), 3);
        assert_eq!(deleted, vec![1, 2, 4]);
        assert!(table.record(3).is_some(), "the host's key is left alone");
        assert_eq!(table.delete_belonging(&app, |key| deleted.push(key)), 0, "never deleted twice");
    }

    #[test]
    fn a_key_its_owner_deleted_is_forgotten_and_its_slot_can_be_reused() {
        let table = KeyTable::new();
        let app = segments(&[(0x10_000, 0x20_000)]);
        table.created(5, 0x10_100, 0);
        assert_eq!(table.deleted(5, || 0), 0);
        assert!(table.record(5).is_none());
        // glibc hands slot 5 to the host: the app's unload must not delete it.
        table.created(5, 0x7000_0000, 0x60_000);
        assert_eq!(table.delete_belonging(&app, |_| panic!("not the app's key")), 0);
        // A stale record of a slot reused behind the table's back is replaced.
        table.created(5, 0x10_100, 0);
        assert_eq!(table.record(5).map(|r| r.destructor), Some(0x10_100));
    }

    /// Creates a key through the process's `pthread_key_create` (the
    /// interposer, in this test binary too); returns it and the address of
    /// this function.
    #[inline(never)]
    fn create_key_here() -> (libc::pthread_key_t, usize) {
        let mut key = 0;
        // SAFETY: `key` is writable; `free` is a valid destructor.
        let code = unsafe { libc::pthread_key_create(&mut key, Some(libc::free)) };
        assert_eq!(code, 0);
        (key, create_key_here as fn() -> (libc::pthread_key_t, usize) as usize)
    }

    #[test]
    fn the_interposer_records_the_caller_of_pthread_key_create() {
        let (key, function) = create_key_here();
        let record = KEYS.record(key).expect("the key was recorded");
        assert_eq!(record.destructor, libc::free as unsafe extern "C" fn(*mut c_void) as usize);
        if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
            assert!(
                record.caller > function && record.caller < function + 0x4000,
                "the caller {:#x} lies in create_key_here ({function:#x})",
                record.caller
            );
        }
        // SAFETY: the key is ours and deleted once.
        assert_eq!(unsafe { libc::pthread_key_delete(key) }, 0);
        assert!(KEYS.record(key).is_none(), "the owner's delete is seen");
    }
}
