//! Library trust (like sshd's StrictModes): a library that users other than
//! root and the server's own could change is refused at start (exit 3), by
//! `check` (exit 3) and on reload (the old generation keeps serving), with
//! the command that fixes it; `--allow-insecure-library` loads it anyway.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pounce_tests::{get, host_binary, replace_file, run_host, run_to_end, sample_app, set_mode, Server, TempDir};

/// Documented in README.md.
const EXIT_LOAD: i32 = 3;

/// `dir/name` as a copy of the sample app with `mode`, and its canonical
/// path (the one pounce-host names in its advice).
fn library_in(dir: &Path, mode: u32) -> PathBuf {
    let path = dir.join("libapp.so");
    replace_file(&sample_app(), &path);
    set_mode(&path, mode);
    path.canonicalize().unwrap()
}

/// Starts `serve` and expects exit code 3 and a log containing `needles`.
fn refused(library: &Path, args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let logs = match Server::try_start_with_env(library, args, env) {
        Ok(server) => panic!("server started on {} but should have refused the library", server.addr),
        Err((status, logs)) => {
            assert_eq!(status.and_then(|s| s.code()), Some(EXIT_LOAD), "exit code; log:\n{logs}");
            logs
        }
    };
    for needle in needles {
        assert!(logs.contains(needle), "log lacks {needle:?}:\n{logs}");
    }
    assert!(!logs.contains("listening on"), "no half-started server:\n{logs}");
    logs
}

#[test]
fn a_world_writable_library_file_is_refused_with_the_fix() {
    let dir = TempDir::new("world-writable");
    let library = library_in(dir.path(), 0o666);
    let fix = format!("chmod go-w {}", library.display());
    refused(
        &library,
        &[],
        &[],
        &[
            &format!("{}: refusing to load a library that other users could change", library.display()),
            "writable by its group and others (mode 0666)",
            &fix,
        ],
    );

    let (status, output) = run_host(&["check", library.to_str().unwrap()], Duration::from_secs(30));
    assert_eq!(status.code(), Some(EXIT_LOAD), "check refuses it too: {output}");
    assert!(output.contains(&fix), "{output}");

    set_mode(&library, 0o644);
    let (status, output) = run_host(&["check", library.to_str().unwrap()], Duration::from_secs(30));
    assert!(status.success(), "the advice fixes it: {output}");
}

#[test]
fn a_library_in_a_group_writable_directory_is_refused() {
    let dir = TempDir::new("group-writable");
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    set_mode(&shared, 0o775);
    let library = library_in(&shared, 0o644);
    let shared = shared.canonicalize().unwrap();
    refused(
        &library,
        &[],
        &[],
        &[
            &format!("the directory {} is writable by its group (mode 0775) without the sticky bit", shared.display()),
            &format!("chmod go-w {}", shared.display()),
        ],
    );
    // A sticky directory writable by all, like /tmp, is fine: only a file's
    // owner may replace the file in it.
    set_mode(&shared, 0o1777);
    let server = Server::start(&library, &[]);
    drop(server);
}

#[test]
fn a_library_of_another_user_is_refused() {
    let dir = TempDir::new("other-user");
    let library = library_in(dir.path(), 0o644);
    if std::fs::metadata(&library).unwrap().uid() != 0 {
        // Only root can hand a file to another user; the unit tests cover
        // the rule for everyone else.
        return;
    }
    std::os::unix::fs::chown(&library, Some(4242), None).unwrap();
    refused(
        &library,
        &[],
        &[],
        &[
            "is owned by uid 4242, neither root nor the user running pounce-host",
            &format!("chown root {}", library.display()),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_insecure_library_serves_it_with_one_warning() {
    let dir = TempDir::new("allowed");
    let library = library_in(dir.path(), 0o666);
    let server = Server::start(&library, &["--allow-insecure-library"]);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", Duration::from_secs(30)), "{}", server.logs());
    assert_eq!(server.count_logs("--allow-insecure-library"), 1, "warned once:\n{}", server.logs());
    assert!(!server.logs().contains("refusing"), "{}", server.logs());
    drop(server);

    let server = Server::start_with_env(&library, &[], &[("POUNCE_ALLOW_INSECURE_LIBRARY", "on")]);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    drop(server);
    // And from the config file, for serve and check alike.
    let config = dir.join("pounce.toml");
    std::fs::write(&config, "allow_insecure_library = true\n").unwrap();
    let server = Server::start(&library, &["--config", config.to_str().unwrap()]);
    assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    drop(server);
    refused(&library, &["--allow-insecure-library=off", "--config", config.to_str().unwrap()], &[], &["chmod go-w"]);

    let lib = library.to_str().unwrap();
    let (status, output) = run_host(&["check", "--allow-insecure-library", lib], Duration::from_secs(30));
    assert!(status.success(), "{output}");
    assert!(output.contains("--allow-insecure-library: the library is loaded even if"), "warned: {output}");
    let (status, output) = run_host(&["check", "--config", config.to_str().unwrap(), lib], Duration::from_secs(30));
    assert!(status.success(), "{output}");
    let mut command = Command::new(host_binary());
    command.args(["check", lib]).env("POUNCE_ALLOW_INSECURE_LIBRARY", "on");
    let (status, output) = run_to_end(command, Duration::from_secs(30));
    assert!(status.success(), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_an_insecure_library_fails_and_the_old_generation_keeps_serving() {
    let dir = TempDir::new("reload");
    let library = library_in(dir.path(), 0o644);
    let server = Server::start(&library, &[]);
    assert_eq!(get(server.addr, "/version").await.unwrap().text(), "Hello from sample-app (generation 1)\n");

    replace_file(&sample_app(), &library);
    set_mode(&library, 0o646);
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.count_logs("reload failed") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = server.logs();
    let failed = logs.lines().find(|l| l.contains("reload failed")).unwrap_or_else(|| panic!("no failure:\n{logs}"));
    assert!(failed.contains(&format!("chmod go-w {}", library.display())), "{failed}");
    assert!(failed.contains("writable by others (mode 0646)"), "{failed}");
    assert!(logs.contains("generation 1 keeps serving"), "{logs}");
    assert_eq!(get(server.addr, "/version").await.unwrap().text(), "Hello from sample-app (generation 1)\n");
    let health: serde_json::Value = serde_json::from_slice(&get(server.addr, "/health").await.unwrap().body).unwrap();
    assert_eq!(health["last_reload"]["outcome"], "failed");
    assert!(health["last_reload"]["error"].as_str().unwrap_or("").contains("chmod go-w"), "{health}");

    set_mode(&library, 0o644);
    server.signal(libc::SIGHUP);
    assert!(server.wait_for_log("generation 2 published", Duration::from_secs(30)), "{}", server.logs());
    assert_eq!(get(server.addr, "/version").await.unwrap().text(), "Hello from sample-app (generation 2)\n");
}
