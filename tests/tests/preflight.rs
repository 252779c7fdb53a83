//! Thread mode's preflight: a new library that crashes when loaded (in an
//! ELF constructor, in `init`) is loaded in a child process first, so the
//! reload fails and the serving process lives on.

use std::time::Duration;

use pounce_tests::{
    crashing_constructor_library, get, replace_file, sample_app, sample_fault_variant, sample_variant, Server, TempDir,
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

/// Reloads once and waits for its outcome: the `count`th `needle` line.
fn reload_until(server: &Server, needle: &str, count: usize) {
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log_count(needle, count, Duration::from_secs(30)), "{}", server.logs());
}

/// Bytes that passed the preflight are not checked in a child again (a
/// reload storm, `cargo xtask dev`), nor are the bytes the server started
/// with (loaded and initialised in the serving process itself); new bytes
/// are. (Also: the first reload of unchanged bytes opens the spare copy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_bytes_skip_the_preflight_and_changed_ones_do_not() {
    let dir = TempDir::new("preflight-skip");
    let (server, library) = serve(&dir, &["--log-level", "pounce_host=debug,info"]);
    let (passed, skipped, published) = ("preflight passed", "preflight skipped", "event=\"generation_loaded\"");
    // The spare copy made once generation 1 serves: the first reload of the
    // same bytes opens it instead of copying the file.
    assert!(server.wait_for_log("spare copy of the library made", Duration::from_secs(30)), "{}", server.logs());
    reload_until(&server, published, 1);
    assert!(server.logs().contains("generation=2 copy=\"reused\""), "{}", server.logs());
    for n in 2..=3 {
        reload_until(&server, published, n);
    }
    assert_eq!((server.count_logs(passed), server.count_logs(skipped)), (0, 3), "{}", server.logs());
    // A new build of the app: its bytes differ, so they are checked.
    replace_file(&sample_variant("preflight skip"), &library);
    reload_until(&server, published, 4);
    assert_eq!((server.count_logs(passed), server.count_logs(skipped)), (1, 3), "{}", server.logs());
    reload_until(&server, published, 5);
    assert_eq!((server.count_logs(passed), server.count_logs(skipped)), (1, 4), "{}", server.logs());
    let reply = get(server.addr, "/version").await.expect("serving");
    assert_eq!(reply.text(), "preflight skip (generation 6)\n");
    // Back to the first build: it is known, so it is not checked again.
    replace_file(&sample_app(), &library);
    reload_until(&server, published, 6);
    assert_eq!((server.count_logs(passed), server.count_logs(skipped)), (1, 5), "{}", server.logs());
    // A copy whose generation was unmapped serves the same bytes again:
    // generation 7 is unmapped once 8 replaced it, before 9 loads.
    reload_until(&server, published, 7);
    let unmapped = "library unmapped generation=7 ";
    assert!(server.wait_for_log_count(unmapped, 1, Duration::from_secs(30)), "{}", server.logs());
    reload_until(&server, published, 8);
    assert!(server.logs().contains("generation=9 copy=\"reused\""), "unmapped copies serve again:\n{}", server.logs());
}

/// A library that crashes in `init` is still caught after reloads of the
/// good bytes skipped the preflight (the skip is by content, not by file),
/// and the good bytes that come back afterwards are still known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_init_is_caught_after_the_good_library_skipped_the_preflight() {
    let dir = TempDir::new("preflight-after-pass");
    let (server, library) = serve(&dir, &["--log-level", "pounce_host=debug,info"]);
    reload_until(&server, "event=\"generation_loaded\"", 1);
    replace_file(&sample_fault_variant("init-abort"), &library);
    reload_until(&server, "event=\"reload_failed\"", 1);
    assert!(server.logs().contains("preflight process failed: the library crashed it"), "{}", server.logs());
    assert_eq!(get(server.addr, "/").await.expect("still serving").text(), "Hello, World!");
    // Twice: a failed preflight is not remembered as passed.
    reload_until(&server, "event=\"reload_failed\"", 2);
    assert_eq!(server.count_logs("preflight skipped"), 1, "{}", server.logs());
    replace_file(&sample_app(), &library);
    reload_until(&server, "event=\"generation_loaded\"", 2);
    assert_eq!(server.count_logs("preflight skipped"), 2, "{}", server.logs());
    assert_eq!(server.health().await["generation"], 3);
}
