//! Loading an app library as a new generation.
//!
//! glibc's `dlopen` returns the already-open object when it is given a path
//! it has opened before, even if the file was replaced, so every generation
//! is loaded from its own copy in a private staging directory. The copy is
//! unlinked once it is mapped, so a crash leaves nothing behind but the
//! (empty) directory, which is removed at exit.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::elf::{self, ElfProblem};
use super::generation::Generation;
use crate::ffi::{priority, OpenError, OpenedLibrary};

/// Why a library could not become a generation. Every message names the file
/// the operator gave and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: no such file; build the app first (cargo build --release -p <your-app>) or fix the path", .path.display())]
    Missing { path: PathBuf },
    #[error("{}: is a directory; give the path of the app's .so file, e.g. target/release/libmyapp.so", .path.display())]
    Directory { path: PathBuf },
    #[error("{}: cannot read it: {error}", .path.display())]
    Unreadable { path: PathBuf, error: io::Error },
    #[error(
        "{}: not a shared library ({problem}); give the .so that `cargo build` makes for a crate with crate-type = [\"cdylib\"]",
        .path.display()
    )]
    NotLibrary { path: PathBuf, problem: ElfProblem },
    #[error("{}: the library file is damaged ({problem}); rebuild it or copy it again", .path.display())]
    Damaged { path: PathBuf, problem: ElfProblem },
    #[error("{}: cannot copy it into the staging directory {}: {error}", .path.display(), .staging.display())]
    Stage { path: PathBuf, staging: PathBuf, error: io::Error },
    #[error("{}: {reason}", .path.display())]
    Open { path: PathBuf, reason: OpenError },
    #[error("cannot start a loader thread: {0}")]
    Thread(io::Error),
    #[error("the loader thread for {} crashed", .path.display())]
    Crashed { path: PathBuf },
    #[error(
        "{}: loading took longer than {} (--reload-timeout; for check, --timeout); abandoned: does the app's init block?",
        .path.display(),
        crate::config::format_duration(*.limit)
    )]
    TimedOut { path: PathBuf, limit: Duration },
}

/// Loads generations of one app library.
pub struct Loader {
    source: PathBuf,
    staging: StagingDir,
    settings: Vec<(String, String)>,
    max_log_level: u32,
    unload_timeout: Duration,
}

/// What a successful load took.
pub struct Loaded {
    pub generation: Generation,
    pub duration: Duration,
}

impl Loader {
    pub fn new(
        source: PathBuf,
        settings: Vec<(String, String)>,
        max_log_level: u32,
        unload_timeout: Duration,
    ) -> io::Result<Loader> {
        Ok(Loader { source, staging: StagingDir::create()?, settings, max_log_level, unload_timeout })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Loads the library as generation `number`: copy it, check it, open
    /// it, check the ABI, run the app's init. Blocking. The copy, check and
    /// open run on a background-priority thread (a reload under load should
    /// take CPU from requests as little as possible); the init runs on a
    /// short-lived thread of normal priority, since the app's own runtime
    /// threads inherit it.
    pub fn load(&self, number: u64) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        check_source(&self.source)?;
        let app = std::thread::scope(|scope| {
            let opened = run_on_thread(scope, &self.source, format!("pounce-open-g{number}"), || {
                priority::lower_this_thread();
                self.stage_and_open(number)
            })??;
            run_on_thread(scope, &self.source, format!("pounce-init-g{number}"), || {
                opened.init(&self.settings, self.max_log_level)
            })?
            .map_err(|reason| LoadError::Open { path: self.source.clone(), reason })
        })?;
        Ok(Loaded { generation: Generation::new(number, app, self.unload_timeout), duration: started.elapsed() })
    }

    /// Copies the library into the staging directory, checks the copy (so a
    /// file replaced meanwhile cannot mix two versions) and opens it.
    fn stage_and_open(&self, number: u64) -> Result<OpenedLibrary, LoadError> {
        let copy = self.staging.copy_in(&self.source, number)?;
        let opened = check_elf(&self.source, &copy).and_then(|()| {
            OpenedLibrary::open(&copy, number).map_err(|reason| LoadError::Open { path: self.source.clone(), reason })
        });
        // Mapped (or failed): the copy's name is no longer needed.
        let _ = fs::remove_file(&copy);
        opened
    }
}

/// Runs `work` on a named scoped thread and waits for it.
fn run_on_thread<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    source: &Path,
    name: String,
    work: impl FnOnce() -> T + Send + 'scope,
) -> Result<T, LoadError> {
    let thread = std::thread::Builder::new().name(name).spawn_scoped(scope, work).map_err(LoadError::Thread)?;
    thread.join().map_err(|_| LoadError::Crashed { path: source.to_owned() })
}

/// Checks the ELF headers of `file` (a copy of `source`, named in errors):
/// a truncated file would SIGBUS after `dlopen`, anything else not ELF is
/// not a library.
pub fn check_elf(source: &Path, file: &Path) -> Result<(), LoadError> {
    match elf::check_file(file) {
        Err(error) => Err(LoadError::Unreadable { path: source.to_owned(), error }),
        Ok(Err(problem @ ElfProblem::Truncated { .. })) => Err(LoadError::Damaged { path: source.to_owned(), problem }),
        Ok(Err(problem)) => Err(LoadError::NotLibrary { path: source.to_owned(), problem }),
        Ok(Ok(())) => Ok(()),
    }
}

/// Rejects a path that is missing or a directory, with a message that says so.
pub fn check_source(path: &Path) -> Result<(), LoadError> {
    let metadata = fs::metadata(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => LoadError::Missing { path: path.to_owned() },
        _ => LoadError::Unreadable { path: path.to_owned(), error },
    })?;
    if metadata.is_dir() {
        return Err(LoadError::Directory { path: path.to_owned() });
    }
    Ok(())
}

/// A private directory (mode 0700) for the per-generation copies, removed
/// when the host exits.
struct StagingDir {
    path: PathBuf,
    /// Numbers every copy: a failed load of generation N and its retry must
    /// not share a path, since glibc matches open objects by path.
    copies: AtomicU64,
}

impl StagingDir {
    fn create() -> io::Result<StagingDir> {
        let base = std::env::temp_dir();
        let pid = std::process::id();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = base.join(format!("pounce-host-{pid}-{nanos:08x}"));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(StagingDir { path, copies: AtomicU64::new(0) })
    }

    /// Copies `source` to a name no earlier load used (in the kernel, with
    /// `copy_file_range`, through `fs::copy`). The copy is written under a
    /// temporary name and renamed, so the loader never sees a partial file.
    fn copy_in(&self, source: &Path, number: u64) -> Result<PathBuf, LoadError> {
        let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "app.so".to_owned());
        let copy = self.copies.fetch_add(1, Ordering::Relaxed);
        let target = self.path.join(format!("g{number}-{copy}-{name}"));
        let partial = self.path.join(format!(".g{number}-{copy}-{name}.partial"));
        fs::copy(source, &partial).and_then(|_| fs::rename(&partial, &target)).map_err(|e| {
            let _ = fs::remove_file(&partial);
            LoadError::Stage { path: source.to_owned(), staging: self.path.clone(), error: e }
        })?;
        Ok(target)
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
