//! The waker bridge: how each side polls the other's futures.
//!
//! A `std::task::Waker` cannot cross the boundary (its layout is not stable,
//! and its code belongs to the side that made it), so wakers travel as
//! [`FfiWaker`]s, in both directions:
//! - [`FfiWaker::borrowed`] lends a `Waker` to the other side for one call;
//!   the other side clones it (a boxed `Waker`) if it must keep it.
//! - [`with_foreign_waker`] is the receiving end: it wraps a lent
//!   `FfiWaker` as a `Waker` for the callee's own `poll`. A clone of that
//!   waker owns a clone of the foreign one plus a `keep_alive` value, which
//!   keeps the foreign code loaded for as long as the clone exists.
//!
//! The host polls app futures and streams through it; the app polls the
//! host's request body through it.

use std::ffi::c_void;
use std::mem::ManuallyDrop;
use std::task::{Context, RawWaker, RawWakerVTable, Waker};

use super::abi::{FfiWaker, FfiWakerVTable};

impl FfiWaker {
    /// Lends `waker` to the other side for the duration of one call.
    pub fn borrowed(waker: &Waker) -> FfiWaker {
        FfiWaker { data: waker as *const Waker as *const c_void, vtable: &BORROWED_STD_WAKER }
    }
}

/// # Safety
/// `data` is the `data` of a live waker from this module: a `&Waker` lent by
/// [`FfiWaker::borrowed`] for the current call, or a `Box<Waker>` made here
/// and not yet consumed.
unsafe extern "C" fn std_waker_clone(data: *const c_void) -> FfiWaker {
    // SAFETY: `data` is a `&Waker` (borrowed) or a `Box<Waker>` (owned) made
    // by this module; both are live while the other side may call this.
    let waker = unsafe { &*(data as *const Waker) };
    FfiWaker { data: Box::into_raw(Box::new(waker.clone())) as *const c_void, vtable: &OWNED_STD_WAKER }
}

/// # Safety
/// As for `std_waker_clone`.
unsafe extern "C" fn std_waker_wake_by_ref(data: *const c_void) {
    // SAFETY: as in `std_waker_clone`.
    unsafe { &*(data as *const Waker) }.wake_by_ref();
}

/// # Safety
/// `data` is a `Box<Waker>` made by `std_waker_clone` and not yet consumed;
/// this consumes it.
unsafe extern "C" fn std_waker_wake_owned(data: *const c_void) {
    // SAFETY: an owned waker's `data` is a `Box<Waker>` from `std_waker_clone`,
    // consumed exactly once by `wake` or `drop`.
    unsafe { Box::from_raw(data as *mut Waker) }.wake();
}

/// # Safety
/// As for `std_waker_wake_owned`.
unsafe extern "C" fn std_waker_drop_owned(data: *const c_void) {
    // SAFETY: as in `std_waker_wake_owned`.
    drop(unsafe { Box::from_raw(data as *mut Waker) });
}

/// `wake` and `drop` of a borrowed waker: a borrowed waker must never be
/// consumed, and ignoring the call is the only safe answer (the lender still
/// owns it).
extern "C" fn borrowed_waker_misuse(_data: *const c_void) {}

static BORROWED_STD_WAKER: FfiWakerVTable = FfiWakerVTable {
    clone: std_waker_clone,
    wake: borrowed_waker_misuse,
    wake_by_ref: std_waker_wake_by_ref,
    drop: borrowed_waker_misuse,
};

static OWNED_STD_WAKER: FfiWakerVTable = FfiWakerVTable {
    clone: std_waker_clone,
    wake: std_waker_wake_owned,
    wake_by_ref: std_waker_wake_by_ref,
    drop: std_waker_drop_owned,
};

/// A waker lent for one call: the foreign waker and what keeps its code
/// loaded. `foreign` comes first in both bridge layouts so `wake_by_ref` can
/// read it from either.
#[repr(C)]
struct LentBridge<'a, K> {
    foreign: FfiWaker,
    keep_alive: Option<&'a K>,
}

/// An owned clone of a foreign waker, holding its own `keep_alive`.
#[repr(C)]
struct OwnedBridge<K> {
    foreign: FfiWaker,
    keep_alive: Option<K>,
}

/// Runs `f` with a `Context` whose waker forwards to the borrowed foreign
/// `waker`. Cloning that waker clones the foreign one and `keep_alive`: the
/// host passes its lease on the app's generation, so the app's code stays
/// loaded while any clone exists; the app passes `None` (the host's code
/// never goes away). Nothing is allocated or counted unless the waker is
/// cloned.
///
/// # Safety
/// `waker` must be a borrowed [`FfiWaker`] that stays valid during the call.
pub unsafe fn with_foreign_waker<K, R>(
    waker: *const FfiWaker,
    keep_alive: Option<&K>,
    f: impl FnOnce(&mut Context<'_>) -> R,
) -> R
where
    K: Clone + Send + Sync + 'static,
{
    // SAFETY: the caller guarantees `waker` is valid for this call.
    let foreign = unsafe { *waker };
    let lent = LentBridge { foreign, keep_alive };
    let raw = RawWaker::new(&lent as *const LentBridge<'_, K> as *const (), lent_vtable::<K>());
    // SAFETY: the lent vtable upholds RawWaker's contract for a `&LentBridge`
    // that outlives the `Waker`: the waker is never dropped or consumed (it is
    // `ManuallyDrop` and only lent out as `&Waker`), and `lent` lives until
    // this function returns.
    let waker = ManuallyDrop::new(unsafe { Waker::from_raw(raw) });
    f(&mut Context::from_waker(&waker))
}

fn lent_vtable<K: Clone + Send + Sync + 'static>() -> &'static RawWakerVTable {
    &RawWakerVTable::new(clone_lent::<K>, wake_by_ref_bridge, wake_by_ref_bridge, noop_bridge)
}

fn owned_vtable<K: Clone + Send + Sync + 'static>() -> &'static RawWakerVTable {
    &RawWakerVTable::new(clone_owned::<K>, wake_owned::<K>, wake_by_ref_bridge, drop_owned::<K>)
}

/// Clones the foreign waker into an owned bridge.
///
/// # Safety
/// `foreign` is live: lent for the current call or owned by a live bridge,
/// and its code is kept loaded by `keep_alive` (or is the host's).
unsafe fn own<K: Clone + Send + Sync + 'static>(foreign: FfiWaker, keep_alive: Option<K>) -> RawWaker {
    // SAFETY: see the function's contract.
    let foreign = unsafe { ((*foreign.vtable).clone)(foreign.data) };
    let owned = Box::new(OwnedBridge { foreign, keep_alive });
    RawWaker::new(Box::into_raw(owned) as *const (), owned_vtable::<K>())
}

/// # Safety
/// `data` is the `LentBridge<K>` of a running `with_foreign_waker`.
unsafe fn clone_lent<K: Clone + Send + Sync + 'static>(data: *const ()) -> RawWaker {
    // SAFETY: `data` is the live `LentBridge` of `with_foreign_waker`.
    let lent = unsafe { &*(data as *const LentBridge<'_, K>) };
    // SAFETY: the lent foreign waker is valid during the call.
    unsafe { own(lent.foreign, lent.keep_alive.cloned()) }
}

/// # Safety
/// `data` is an `OwnedBridge<K>` made by `own` and not yet consumed.
unsafe fn clone_owned<K: Clone + Send + Sync + 'static>(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a live `OwnedBridge` (RawWaker contract).
    let owned = unsafe { &*(data as *const OwnedBridge<K>) };
    // SAFETY: the bridge owns its foreign waker and keeps its code loaded.
    unsafe { own(owned.foreign, owned.keep_alive.clone()) }
}

/// # Safety
/// `data` is a live bridge: a `LentBridge` of a running `with_foreign_waker`
/// or an `OwnedBridge` made by `own` and not yet consumed.
unsafe fn wake_by_ref_bridge(data: *const ()) {
    // SAFETY: both bridge layouts are `repr(C)` with `foreign` first, and
    // `data` is a live bridge (RawWaker contract).
    let foreign = unsafe { *(data as *const FfiWaker) };
    // SAFETY: the foreign waker is live and its code loaded (see `own`).
    unsafe { ((*foreign.vtable).wake_by_ref)(foreign.data) };
}

/// # Safety
/// `data` is an `OwnedBridge<K>` made by `own` and not yet consumed; this
/// consumes it.
unsafe fn wake_owned<K>(data: *const ()) {
    // SAFETY: an owned bridge is a `Box<OwnedBridge>` from `own`, consumed
    // once. The foreign waker is consumed before `keep_alive` is released, so
    // its code is still loaded while it runs.
    let owned = unsafe { Box::from_raw(data as *mut OwnedBridge<K>) };
    // SAFETY: the bridge owns the foreign waker.
    unsafe { ((*owned.foreign.vtable).wake)(owned.foreign.data) };
    drop(owned.keep_alive);
}

/// # Safety
/// As for `wake_owned`.
unsafe fn drop_owned<K>(data: *const ()) {
    // SAFETY: as in `wake_owned`.
    let owned = unsafe { Box::from_raw(data as *mut OwnedBridge<K>) };
    // SAFETY: the bridge owns the foreign waker.
    unsafe { ((*owned.foreign.vtable).drop)(owned.foreign.data) };
    drop(owned.keep_alive);
}

/// `drop` of a lent bridge: it owns nothing (it lives on the stack of
/// `with_foreign_waker`, and its foreign waker is only borrowed).
fn noop_bridge(_data: *const ()) {}
