//! `cargo xtask dev` on a temporary copy of the sample app: edits are served,
//! a compile error keeps the last good build serving, Ctrl-C stops cleanly.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use pounce_devkit::workspace;
use pounce_tests::{get, host_binary, variants_target_dir, wait_for_exit, wait_for_ready, xtask_binary, Log, TempDir};

/// How long xtask dev may take to stop after Ctrl-C: the host's graceful
/// shutdown (nothing in flight) and its own exit.
const STOP_WAIT: Duration = Duration::from_secs(20);

/// Writes a standalone copy of the sample app (its own workspace) into `dir`,
/// with the same profile as this workspace so compiled dependencies are
/// shared with the other end-to-end builds.
fn copy_sample_app(dir: &Path, greeting: &str) {
    let abi = workspace().join("app-abi");
    let manifest = format!(
        r#"[package]
name = "dev-copy"
version = "0.1.0"
edition = "2021"

[lib]
crate-type = ["cdylib"]

[dependencies]
app-abi = {{ path = "{}" }}

[workspace]

[profile.dev]
debug = "line-tables-only"

[profile.dev.package."*"]
opt-level = 1
"#,
        abi.display()
    );
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    set_greeting(dir, greeting, "");
}

/// Rewrites the copy's source with `greeting` as its default greeting, plus
/// `extra` code at the end.
fn set_greeting(dir: &Path, greeting: &str, extra: &str) {
    // The sample app's other modules, as they are (written once: rewriting
    // them would make the watcher start builds of its own).
    for entry in std::fs::read_dir(workspace().join("sample-app/src")).unwrap() {
        let path = entry.unwrap().path();
        let copy = dir.join("src").join(path.file_name().unwrap());
        if path.file_name() != Some("lib.rs".as_ref()) && !copy.exists() {
            std::fs::copy(&path, copy).unwrap();
        }
    }
    let source = std::fs::read_to_string(workspace().join("sample-app/src/lib.rs")).unwrap();
    let source = source.replace("\"Hello from sample-app\"", &format!("{greeting:?}"));
    std::fs::write(dir.join("src/lib.rs"), format!("{source}\n{extra}")).unwrap();
}

/// A running `cargo xtask dev`.
struct Dev {
    child: Child,
    /// What it prints, the host's log included (it passes that on).
    log: Log,
}

impl Dev {
    fn start(dir: &Path) -> Dev {
        let mut child = Command::new(xtask_binary())
            .args(["dev", "--manifest-path"])
            .arg(dir.join("Cargo.toml"))
            .arg("--host-binary")
            .arg(host_binary())
            .args(["--", "--port", "0", "--log-format", "text"])
            .env("CARGO_TARGET_DIR", variants_target_dir())
            .env("CARGO", std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start xtask dev");
        let log = Log::default();
        log.collect(child.stdout.take().expect("stdout piped"));
        log.collect(child.stderr.take().expect("stderr piped"));
        Dev { child, log }
    }

    fn output(&self) -> String {
        self.log.text()
    }

    fn wait_for(&self, needle: &str, timeout: Duration) {
        assert!(self.log.wait_for_count(needle, 1, timeout), "no {needle:?} within {timeout:?}:\n{}", self.output());
    }

    /// Presses Ctrl-C, as a developer stops it, and waits at most
    /// [`STOP_WAIT`] for it to exit.
    fn interrupt(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        wait_for_exit(&mut self.child, STOP_WAIT)
    }
}

impl Drop for Dev {
    /// After a failed test: Ctrl-C, so that xtask dev stops its host too
    /// (the host is in its own process group); a kill only if it hangs.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if self.interrupt().is_none() {
                let _ = self.child.kill();
            }
        }
    }
}

async fn version_becomes(addr: std::net::SocketAddr, expected: &str, dev: &Dev) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(reply) = get(addr, "/version").await {
            if reply.text() == expected {
                return started.elapsed();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(180), "never served {expected:?}:\n{}", dev.output());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_are_served_and_compile_errors_keep_the_last_good_build() {
    let dir = TempDir::new("dev");
    copy_sample_app(dir.path(), "Hello from the dev copy");
    let mut dev = Dev::start(dir.path());
    let addr = wait_for_ready(&dev.log, Duration::from_secs(600))
        .unwrap_or_else(|| panic!("the host did not report server_ready:\n{}", dev.output()));
    version_becomes(addr, "Hello from the dev copy (generation 1)\n", &dev).await;

    set_greeting(dir.path(), "Edited greeting", "");
    version_becomes(addr, "Edited greeting (generation 2)\n", &dev).await;
    dev.wait_for("[dev] reloaded into generation 2", Duration::from_secs(30));

    set_greeting(dir.path(), "Broken greeting", "fn broken() -> u32 { \"not a number\" }\n");
    dev.wait_for("[dev] build failed; still serving generation 2", Duration::from_secs(180));
    // The compiler's error goes to stderr, the status line to stdout: read
    // separately, either may arrive first.
    dev.wait_for("mismatched types", Duration::from_secs(10));
    assert_eq!(get(addr, "/version").await.unwrap().text(), "Edited greeting (generation 2)\n");

    set_greeting(dir.path(), "Fixed greeting", "");
    version_becomes(addr, "Fixed greeting (generation 3)\n", &dev).await;

    let status = dev.interrupt().unwrap_or_else(|| panic!("xtask dev did not stop:\n{}", dev.output()));
    assert!(dev.log.wait_for_end(Duration::from_secs(5)), "its output is still open:\n{}", dev.output());
    assert_eq!(status.code(), Some(0), "{}", dev.output());
    assert!(dev.output().contains("shutdown complete"), "the host shut down gracefully:\n{}", dev.output());
    assert!(get(addr, "/").await.is_err(), "nothing listens any more");
    // The save-to-served figures, for `--nocapture` readers.
    for line in dev.output().lines().filter(|l| l.starts_with("[dev]")) {
        eprintln!("{line}");
    }
}
