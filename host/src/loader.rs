//! Loading an app library as a new generation.
//!
//! glibc's `dlopen` returns the already-open object when it is given a path
//! it has opened before, even if the file was replaced, so every generation
//! is loaded from its own copy in a private staging directory. The copy is
//! unlinked once it is mapped, so a crash leaves nothing behind but the
//! (empty) directory, which is removed at exit.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::ffi::{LoadedApp, OpenError};
use crate::generation::Generation;

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
        "{}: not a shared library (no ELF header); give the .so that `cargo build` makes for a crate with crate-type = [\"cdylib\"]",
        .path.display()
    )]
    NotElf { path: PathBuf },
    #[error("{}: cannot copy it into the staging directory {}: {error}", .path.display(), .staging.display())]
    Stage { path: PathBuf, staging: PathBuf, error: io::Error },
    #[error("{}: {reason}", .path.display())]
    Open { path: PathBuf, reason: OpenError },
    #[error("cannot start a loader thread: {0}")]
    Thread(io::Error),
    #[error("the loader thread for {} crashed", .path.display())]
    Crashed { path: PathBuf },
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

    /// Loads the library as generation `number`: check the file, copy it,
    /// open it, check the ABI, run the app's init. Blocking; it runs the app
    /// code on a short-lived thread of its own (see [`LoadedApp::open`]).
    pub fn load(&self, number: u64) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        check_file(&self.source)?;
        let copy = self.staging.copy_in(&self.source, number)?;
        let opened = std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("pounce-load-g{number}"))
                .spawn_scoped(scope, || LoadedApp::open(&copy, number, &self.settings, self.max_log_level))
                .map_err(LoadError::Thread)?;
            thread.join().map_err(|_| LoadError::Crashed { path: self.source.clone() })
        });
        // Mapped (or failed): the copy's name is no longer needed.
        let _ = fs::remove_file(&copy);
        let app = opened?.map_err(|reason| LoadError::Open { path: self.source.clone(), reason })?;
        Ok(Loaded { generation: Generation::new(number, app, self.unload_timeout), duration: started.elapsed() })
    }
}

/// Rejects what is certainly not a library before the dynamic loader sees it,
/// with a message that says why.
fn check_file(path: &Path) -> Result<(), LoadError> {
    let metadata = fs::metadata(path).map_err(|error| match error.kind() {
        io::ErrorKind::NotFound => LoadError::Missing { path: path.to_owned() },
        _ => LoadError::Unreadable { path: path.to_owned(), error },
    })?;
    if metadata.is_dir() {
        return Err(LoadError::Directory { path: path.to_owned() });
    }
    let mut magic = [0u8; 4];
    let read = fs::File::open(path).and_then(|mut file| file.read_exact(&mut magic));
    match read {
        Ok(()) if magic == *b"\x7fELF" => Ok(()),
        Ok(()) => Err(LoadError::NotElf { path: path.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(LoadError::NotElf { path: path.to_owned() }),
        Err(error) => Err(LoadError::Unreadable { path: path.to_owned(), error }),
    }
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

    /// Copies `source` to a name no earlier generation used. The copy is
    /// written under a temporary name and renamed, so the loader never sees
    /// a partial file.
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
