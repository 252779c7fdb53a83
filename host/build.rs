//! Exports the thread-local destructor guard from the `pounce-host`
//! executable, so app libraries bind to it (see src/ffi/tls_guard.rs).

fn main() {
    for symbol in ["__cxa_thread_atexit_impl", "pthread_key_create", "pthread_key_delete"] {
        println!("cargo:rustc-link-arg-bins=-Wl,--export-dynamic-symbol={symbol}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
