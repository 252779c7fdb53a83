//! Exports the unload guard's interposers from the `pounce-host`
//! executable, so app libraries bind to them (see src/ffi/unload_guard.rs
//! and src/ffi/threads.rs).

fn main() {
    for symbol in ["__cxa_thread_atexit_impl", "pthread_key_create", "pthread_key_delete", "pthread_create"] {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
