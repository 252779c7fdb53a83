//! Where each generation's copy of the library lives: in memory, so that
//! serving and reloading need no writable (or exec-mountable) $TMPDIR and a
//! crash leaves nothing behind; in a staging directory only where in-memory
//! files are not available, and then stale directories are cleaned up.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pounce_tests::{get, host_binary, run_to_end, sample_app, Server, TempDir};

fn reload(server: &Server, generation: u64) {
    server.signal(libc::SIGHUP);
    let published = format!("generation {generation} published");
    assert!(server.wait_for_log(&published, Duration::from_secs(30)), "no {published:?}:\n{}", server.logs());
}

async fn version(server: &Server) -> String {
    get(server.addr, "/version").await.expect("GET /version").text()
}

/// Entries of `dir`, by name.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Waits until the mapped copies settle to one (retired generations unload
/// in the background).
async fn one_copy_mapped(server: &Server) -> Vec<String> {
    for _ in 0..200 {
        if server.mapped_app_copies() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.mapped_app_copies(), 1, "{:?}", server.mapped_app_files());
    server.mapped_app_files()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_and_reloads_without_a_usable_tmpdir() {
    // With copies in a staging directory under $TMPDIR, start-up failed here.
    serves_and_reloads_with_tmpdir("/nonexistent/pounce-tmp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_and_reloads_with_tmpdir_on_a_noexec_tmpfs() {
    // Docker's `--tmpfs /tmp` is `noexec`: a library copied there cannot be
    // mapped executable, so `dlopen` of a staged copy failed here.
    let tmpfs = NoexecTmpfs::mount();
    serves_and_reloads_with_tmpdir(tmpfs.path()).await;
    assert_eq!(entries(Path::new(tmpfs.path())), Vec::<String>::new(), "nothing written under $TMPDIR");
}

async fn serves_and_reloads_with_tmpdir(tmpdir: &str) {
    let server = Server::start_with_env(&sample_app(), &[], &[("TMPDIR", tmpdir)]);
    assert_eq!(version(&server).await, "Hello from sample-app (generation 1)\n");
    for generation in 2..=3 {
        reload(&server, generation);
        assert_eq!(version(&server).await, format!("Hello from sample-app (generation {generation})\n"));
    }
    let files = one_copy_mapped(&server).await;
    // The copy may be one made for an earlier generation of the same bytes
    // and reused once that generation was unmapped: named for that one.
    assert!(
        files.iter().all(|f| f.starts_with("/memfd:pounce-host-g") && f.ends_with("libsample_app.so")),
        "generation 3 is mapped from an in-memory copy: {files:?}"
    );
    assert!(!server.logs().contains("staging"), "no fallback:\n{}", server.logs());
}

/// A `noexec` tmpfs mounted on a temporary directory for the test's life
/// (the tests run as root, as CI does: mounting needs it).
struct NoexecTmpfs {
    dir: TempDir,
}

impl NoexecTmpfs {
    fn mount() -> NoexecTmpfs {
        let dir = TempDir::new("noexec-tmpfs");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "noexec,nosuid,size=16m", "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a noexec tmpfs on {} needs root: {status}", dir.path().display());
        let tmpfs = NoexecTmpfs { dir };
        let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
        let line = mounts.lines().find(|line| line.split(' ').nth(1) == Some(tmpfs.path()));
        assert!(line.is_some_and(|line| line.contains("noexec")), "{:?} is not noexec: {line:?}", tmpfs.path());
        tmpfs
    }

    fn path(&self) -> &str {
        self.dir.path().to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for NoexecTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn check_needs_no_usable_tmpdir() {
    let mut command = Command::new(host_binary());
    command.arg("check").arg(sample_app()).env("TMPDIR", "/nonexistent/pounce-tmp");
    let (status, output) = run_to_end(command, Duration::from_secs(30));
    assert!(status.success(), "{output}");
    assert!(output.contains("library unmapped"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_nothing_in_tmpdir() {
    let tmp = TempDir::new("tmpdir");
    let tmpdir = tmp.path().to_str().unwrap();
    let mut server = Server::start_with_env(&sample_app(), &[], &[("TMPDIR", tmpdir)]);
    reload(&server, 2);
    assert_eq!(version(&server).await, "Hello from sample-app (generation 2)\n");
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "nothing written under $TMPDIR while serving");
    server.signal(libc::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "nothing left under $TMPDIR after a crash");
}

/// The staging directories of process `pid` in `dir`.
fn staging_dirs_of(dir: &Path, pid: i32) -> Vec<PathBuf> {
    let prefix = format!("pounce-host-{pid}-");
    entries(dir).into_iter().filter(|name| name.starts_with(&prefix)).map(|name| dir.join(name)).collect()
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_memfd_copies_are_staged_in_staging_dir_and_cleaned_up() {
    let staging = TempDir::new("staging");
    // What a crashed server left (its pid is above any pid_max, so dead),
    // and a directory of a live process (this one), which must stay.
    let stale = staging.join("pounce-host-99999999-0badcafe");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("g1-0-libsample_app.so"), b"left behind").unwrap();
    let alive = staging.join(&format!("pounce-host-{}-0badcafe", std::process::id()));
    std::fs::create_dir(&alive).unwrap();

    let staging_arg = staging.path().to_str().unwrap();
    // $TMPDIR is unusable: --staging-dir is where the copies go.
    let mut server = Server::start_without_memfd(
        &sample_app(),
        &["--staging-dir", staging_arg],
        &[("TMPDIR", "/nonexistent/pounce-tmp")],
    );
    assert!(
        server.logs().contains("in-memory library copies are not available (memfd_create:"),
        "the fallback is logged:\n{}",
        server.logs()
    );
    assert!(!stale.exists(), "the dead process's staging directory is removed");
    assert!(alive.exists(), "a live process's directory is left alone");

    let own = staging_dirs_of(staging.path(), server.pid());
    assert_eq!(own.len(), 1, "one staging directory: {:?}", entries(staging.path()));
    let metadata = std::fs::metadata(&own[0]).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o700, "private");
    assert_eq!(metadata.uid(), std::fs::metadata(staging.path()).unwrap().uid());

    assert_eq!(version(&server).await, "Hello from sample-app (generation 1)\n");
    reload(&server, 2);
    assert_eq!(version(&server).await, "Hello from sample-app (generation 2)\n");
    let files = one_copy_mapped(&server).await;
    assert!(files.iter().all(|f| f.starts_with(own[0].to_str().unwrap())), "mapped from the staging dir: {files:?}");
    assert_eq!(entries(&own[0]), Vec::<String>::new(), "copies are unlinked once mapped");

    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(20)).expect("exits");
    assert!(status.success(), "{status:?}:\n{}", server.logs());
    assert_eq!(staging_dirs_of(staging.path(), server.pid()), Vec::<PathBuf>::new(), "removed at exit");
}
