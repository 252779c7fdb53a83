//! Thread mode's preflight: a new library that crashes when loaded (in an
//! ELF constructor, in `init`) is loaded in a child process first, so the
//! reload fails and the serving process lives on.

use std::time::Duration;

use pounce_tests::{
    crashing_constructor_library, get, replace_file, sample_app, sample_fault_variant, Server, TempDir,
};

/// Serves a copy of the sample app from `dir`, so the test can replace it.
fn serve(dir: &TempDir, args: &[&str]) -> (Server, std::path::PathBuf) {
    let library = dir.join("libapp.so");
    replace_file(&sample_app(), &library);
    (Server::start(&library, args), library)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_that_crashes_when_loaded_fails_the_reload_and_the_server_lives() {
    let dir = TempDir::new("preflight");
    let (server, library) = serve(&dir, &[]);
    let crashing =
        [crashing_constructor_library(&dir), sample_fault_variant("init-segfault"), sample_fault_variant("init-abort")];
    for (n, bad) in crashing.iter().enumerate() {
        replace_file(bad, &library);
        server.signal(libc::SIGHUP);
        assert!(
            server.wait_for_log_count("event=\"reload_failed\"", n + 1, Duration::from_secs(30)),
            "{}",
            server.logs()
        );
        let reply = get(server.addr, "/").await.expect("still serving");
        assert_eq!(reply.text(), "Hello, World!");
    }
    let logs = server.logs();
    assert!(
        logs.contains("preflight process failed: the library crashed it: it was killed by signal 11 (SIGSEGV)"),
        "{logs}"
    );
    assert!(logs.contains("signal 6 (SIGABRT"), "{logs}");
    assert!(logs.contains(&*library.to_string_lossy()), "the reason names the file: {logs}");
    let health = server.health().await;
    assert_eq!(health["generation"], 1);
    assert_eq!(health["last_reload"]["outcome"], "failed");
    // A good library after the bad ones is served.
    replace_file(&sample_app(), &library);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log_count("event=\"generation_loaded\"", 1, Duration::from_secs(30)), "{}", server.logs());
}

/// Without the preflight the same deploy kills the server: what the
/// preflight is for.
#[test]
fn without_preflight_a_crashing_library_takes_the_server_down() {
    let dir = TempDir::new("no-preflight");
    let (mut server, library) = serve(&dir, &["--preflight", "off"]);
    replace_file(&crashing_constructor_library(&dir), &library);
    server.signal(libc::SIGHUP);
    let status = server.wait_exit(Duration::from_secs(20)).expect("the server dies");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGSEGV), "{}", server.logs());
}
