//! `serve --reload`: file changes trigger the rolling reload.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pounce_tests::{get, replace_file, sample_variant, Server, TempDir};

fn served(dir: &TempDir, greeting: &str) -> PathBuf {
    let path = dir.join("libapp.so");
    replace_file(&sample_variant(greeting), &path);
    path
}

/// Writes `source` over `dest` the way a linker does: remove the old file,
/// create a new one, write it in pieces, with a pause in the middle. The
/// pause is what is tested (the watcher must not load the half file), so it
/// is a real sleep.
fn write_like_a_linker(source: &Path, dest: &Path, pause: Duration) {
    let bytes = std::fs::read(source).unwrap();
    let _ = std::fs::remove_file(dest);
    let mut file = std::fs::File::create(dest).unwrap();
    let half = bytes.len() / 2;
    file.write_all(&bytes[..half]).unwrap();
    file.flush().unwrap();
    std::thread::sleep(pause);
    file.write_all(&bytes[half..]).unwrap();
    file.sync_all().unwrap();
}

async fn wait_for_version(server: &Server, expected: &str) -> Duration {
    let started = Instant::now();
    loop {
        let text = get(server.addr, "/version").await.expect("serving").text();
        if text == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still {text:?}, expected {expected:?}:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_library_is_served_with_one_reload_per_replacement() {
    let dir = TempDir::new("watch-replace");
    let library = served(&dir, "Greeting A");
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let server = Server::start(&library, &["--reload", "--reload-dir", marks.to_str().unwrap()]);
    assert!(server.wait_for_log("--reload: watching", Duration::from_secs(5)));
    for (generation, greeting) in [(2, "Greeting B"), (3, "Greeting A")] {
        write_like_a_linker(&sample_variant(greeting), &library, Duration::from_millis(30));
        wait_for_version(&server, &format!("{greeting} (generation {generation})\n")).await;
    }
    // The watcher decides on its events in order, logging each decision to
    // reload: once it has decided on a later change, it has decided on every
    // event the replacements caused.
    std::fs::write(marks.join("done"), "").unwrap();
    assert!(server.wait_for_log("done changed; reloading", Duration::from_secs(10)), "{}", server.logs());
    assert_eq!(server.count_logs("libapp.so changed; reloading"), 2, "one reload per replacement:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_half_written_libraries_do_not_break_serving() {
    let dir = TempDir::new("watch-garbage");
    let library = served(&dir, "Greeting A");
    let server = Server::start(&library, &["--reload"]);
    assert!(server.wait_for_log("--reload: watching", Duration::from_secs(5)));

    std::fs::write(&library, b"not a library at all").unwrap();
    assert!(server.wait_for_log("is not a loadable library yet", Duration::from_secs(10)), "{}", server.logs());
    assert_eq!(get(server.addr, "/version").await.unwrap().text(), "Greeting A (generation 1)\n");

    // A linker that stops half way for longer than the debounce: the half
    // file settles, is refused, and the finished file is then loaded.
    write_like_a_linker(&sample_variant("Greeting B"), &library, Duration::from_millis(900));
    wait_for_version(&server, "Greeting B (generation 2)\n").await;
    assert!(server.count_logs("is not a loadable library yet") >= 2, "{}", server.logs());
    assert_eq!(server.count_logs("reload failed"), 0, "a partial file was never loaded:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_files_hidden_dirs_and_other_extensions_trigger_nothing() {
    let dir = TempDir::new("watch-dirs");
    let library = served(&dir, "Greeting A");
    let templates = dir.join("templates");
    std::fs::create_dir_all(templates.join(".hidden")).unwrap();
    // The watcher's debug log says when it decides not to reload.
    let args = [
        "--reload",
        "--reload-dir",
        templates.to_str().unwrap(),
        "--reload-include",
        ".html,.css",
        "--log-level",
        "info,pounce_host::lifecycle::watch=debug",
    ];
    let server = Server::start(&library, &args);
    assert!(server.wait_for_log("--reload: watching", Duration::from_secs(5)));
    for name in [".index.html.swp", "index.html~", "#index.html#", ".#index.html", "notes.txt", ".hidden/page.html"] {
        std::fs::write(templates.join(name), "x").unwrap();
    }
    // Rewriting the library with the same content is not a change either.
    replace_file(&sample_variant("Greeting A"), &library);
    // Decided last, in the order of the events; the files above were decided
    // on before it, or together with it (and then it would reload).
    let unchanged = "rewritten with the same content; not reloading";
    assert!(server.wait_for_log(unchanged, Duration::from_secs(10)), "{}", server.logs());
    assert_eq!(server.count_logs("changed; reloading"), 0, "nothing should have triggered:\n{}", server.logs());
    assert_eq!(server.count_logs("reload started"), 0, "nothing should have triggered:\n{}", server.logs());

    std::fs::write(templates.join("index.html"), "<h1>hi</h1>").unwrap();
    wait_for_version(&server, "Greeting A (generation 2)\n").await;
    assert!(server.logs().contains("index.html changed; reloading"), "{}", server.logs());
}

#[test]
fn a_missing_reload_dir_is_a_configuration_error() {
    let (status, logs) =
        match Server::try_start(&pounce_tests::sample_app(), &["--reload", "--reload-dir", "/nonexistent/dir"]) {
            Ok(server) => panic!("started on {}", server.addr),
            Err(failure) => failure,
        };
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{logs}");
    assert!(logs.contains("cannot watch /nonexistent/dir"), "{logs}");
}
