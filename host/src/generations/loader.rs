//! Loading an app library as a new generation.
//!
//! glibc's `dlopen` returns the already-open object when it is given a path
//! it has opened before, even if the file was replaced, so every generation
//! is loaded from a copy of its own, under a path no loaded object has.
//!
//! The copy is an anonymous in-memory file (`memfd_create`), opened through
//! `/proc/self/fd/N`: nothing is written to a file system (a read-only or
//! `noexec` /tmp does not matter) and a crash leaves nothing behind. The
//! library keeps that descriptor open while it is mapped, so the path names
//! it alone. A copy whose generation was unmapped is reused for the same
//! bytes (see [`super::copies`]). Where in-memory files are not available (`ENOSYS`/`EPERM`, or
//! no /proc), copies go to a private directory under `staging_dir` instead,
//! unlinked once mapped and removed at exit; such directories that a crashed
//! server left behind are removed at start.
//!
//! Before copying, the library file is checked like sshd's `StrictModes`
//! ([`super::trust`]), and the copy is read from the very file that was
//! checked.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::background::Background;
use super::copies::{self, Buffer, ContentHash, Copy, Lent, Origin, Pool};
use super::elf::{self, ElfProblem};
use super::generation::Generation;
use super::trust::{self, Insecure};
use crate::ffi::{identity, priority, process, OpenError, OpenedLibrary};

/// The prefix of in-memory copies and of staging directories: what
/// `/proc/PID/maps` shows for a mapped generation contains it.
const COPY_PREFIX: &str = "pounce-host-";

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
    #[error("{}: {problem}", .path.display())]
    Insecure { path: PathBuf, problem: Insecure },
    #[error("{}: the file was replaced while it was being checked, again and again; try again", .path.display())]
    Unsettled { path: PathBuf },
    #[error(
        "{}: not a shared library ({problem}); give the .so that `cargo build` makes for a crate with crate-type = [\"cdylib\"]",
        .path.display()
    )]
    NotLibrary { path: PathBuf, problem: ElfProblem },
    #[error("{}: the library file is damaged ({problem}); rebuild it or copy it again", .path.display())]
    Damaged { path: PathBuf, problem: ElfProblem },
    #[error("{}: cannot copy it into memory: {error}", .path.display())]
    Memory { path: PathBuf, error: io::Error },
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
    #[error(
        "{}: loading it in a preflight process failed: {reason}; it was not loaded into the serving process",
        .path.display()
    )]
    Preflight { path: PathBuf, reason: String },
}

/// What a [`Loader`] needs to know.
pub struct LoaderSettings {
    /// The library file the operator gave.
    pub source: PathBuf,
    /// The app's settings, for its init.
    pub app_args: Vec<(String, String)>,
    pub max_log_level: u32,
    /// How long an app's shutdown may wait for its threads.
    pub unload_timeout: Duration,
    /// Where copies go if in-memory files are not available.
    pub staging_dir: PathBuf,
    /// Skip the trust check ([`super::trust`]).
    pub allow_insecure_library: bool,
}

/// Loads generations of one app library.
///
/// A reload's load ([`Loader::load_checked`]) runs on two long-lived
/// threads of the loader's own (see [`Background`]), never on a serving
/// thread and never on a new thread per load: the file checks, the copy,
/// the preflight and the `dlopen` on a background-priority thread
/// (`pounce-loader`: see `ffi::priority`), the app's `init` on a thread of
/// normal priority (`pounce-init`), since the app's own runtime threads
/// inherit the priority of the thread that starts them.
pub struct Loader {
    source: PathBuf,
    copies: Copies,
    settings: Vec<(String, String)>,
    max_log_level: u32,
    unload_timeout: Duration,
    allow_insecure_library: bool,
    server_uid: u32,
    /// Numbers every copy: a failed load of generation N and its retry must
    /// not share a name.
    loads: AtomicU64,
    /// In-memory copies whose generation was unmapped, for reuse.
    pool: Arc<Pool>,
    /// The read buffer of the copy and the hash (loads are serialized).
    buffer: Mutex<Buffer>,
    background: Background,
    initializer: Background,
}

/// Where the per-generation copies live.
enum Copies {
    /// Anonymous in-memory files.
    Memory,
    /// The fallback: files in a private directory.
    Staging(StagingDir),
}

/// What a successful load took.
pub struct Loaded {
    pub generation: Generation,
    /// The load without the preflight: file checks, copy, open, init.
    pub duration: Duration,
    /// The hash of the bytes loaded (none for a load in place).
    pub hash: Option<ContentHash>,
}

/// The bytes a load is about to open, as a check before the open sees them.
pub enum Prepared {
    /// An in-memory copy (new, or reused from an earlier generation).
    Memory { copy: Copy, reused: bool },
    /// A copy in the staging directory (no in-memory files), and its hash.
    Staged { path: PathBuf, hash: ContentHash },
}

impl Prepared {
    /// The hash of the bytes.
    pub fn hash(&self) -> ContentHash {
        match self {
            Prepared::Memory { copy, .. } => copy.hash,
            Prepared::Staged { hash, .. } => *hash,
        }
    }
}

/// A check run on the loader's thread between the copy and the open (the
/// preflight).
pub type Check = Box<dyn FnOnce(&Loader, &Prepared) -> Result<(), LoadError> + Send>;

/// How long a job of the loader's threads may run before the next one gets
/// a new thread: none. Loads are serialized by their callers, so a job
/// still running when the next is queued is one abandoned at its time limit
/// (an `init` that hangs).
const STUCK_AFTER: Duration = Duration::ZERO;

/// A library opened, its app not initialised yet.
struct Opened {
    library: OpenedLibrary,
    copy: Option<Copy>,
    /// The copy and the open, without the check.
    took: Duration,
    hash: Option<ContentHash>,
}

impl Loader {
    /// Makes a loader; picks in-memory copies, or else creates the staging
    /// directory (the only thing that can fail here).
    pub fn new(settings: LoaderSettings) -> io::Result<Loader> {
        let server_uid = identity::effective_uid();
        let copies = match in_memory_copies() {
            Ok(()) => Copies::Memory,
            Err(reason) => {
                let removed = remove_stale_staging(&settings.staging_dir, server_uid);
                let staging = StagingDir::create(&settings.staging_dir)?;
                tracing::warn!(
                    staging_dir = %staging.path.display(),
                    stale_removed = removed,
                    "in-memory library copies are not available ({reason}); staging them in a directory instead"
                );
                Copies::Staging(staging)
            }
        };
        Ok(Loader {
            source: settings.source,
            copies,
            settings: settings.app_args,
            max_log_level: settings.max_log_level,
            unload_timeout: settings.unload_timeout,
            allow_insecure_library: settings.allow_insecure_library,
            server_uid,
            loads: AtomicU64::new(0),
            pool: Arc::new(Pool::default()),
            buffer: Mutex::new(Buffer::new()),
            background: Background::new("pounce-loader", priority::lower_this_thread, STUCK_AFTER),
            initializer: Background::new("pounce-init", || {}, STUCK_AFTER),
        })
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The staging directory, when copies do not go to memory.
    pub fn staging_dir(&self) -> Option<&Path> {
        match &self.copies {
            Copies::Memory => None,
            Copies::Staging(staging) => Some(&staging.path),
        }
    }

    /// Loads the library as generation `number`: check it, copy it (or
    /// reuse an unmapped copy of the same bytes), check the copy, open it,
    /// check the ABI, run the app's init. Blocking, on the calling thread
    /// but for the init, which runs on a short-lived thread of its own: for
    /// the first generation, `check` and process mode's workers, where
    /// nothing is being served yet.
    pub fn load(&self, number: u64) -> Result<Loaded, LoadError> {
        let opened = self.copy_and_open(number, None)?;
        self.init_on_own_thread(number, opened)
    }

    /// [`Loader::load`] without a copy: the file itself is opened (through
    /// a descriptor of its own, which the library keeps). Only for a
    /// process that loads one library in its life from a file nothing
    /// writes to: a process-mode worker, whose source is the supervisor's
    /// in-memory snapshot.
    pub fn load_in_place(&self, number: u64) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        check_source(&self.source)?;
        let file = self.open_source()?;
        check_elf(&self.source, &file)?;
        let library = OpenedLibrary::open_file(file, number)
            .map_err(|reason| LoadError::Open { path: self.source.clone(), reason })?;
        self.init_on_own_thread(number, Opened { library, copy: None, took: started.elapsed(), hash: None })
    }

    fn init_on_own_thread(&self, number: u64, opened: Opened) -> Result<Loaded, LoadError> {
        std::thread::scope(|scope| {
            let init = std::thread::Builder::new()
                .name(format!("pounce-init-g{number}"))
                .spawn_scoped(scope, || self.init(number, opened))
                .map_err(LoadError::Thread)?;
            init.join().unwrap_or_else(|_| Err(self.crashed()))
        })
    }

    /// [`Loader::load`] for a reload: awaits the loader's threads, and runs
    /// `check` (the preflight) on the loader's thread before the open.
    pub async fn load_checked(self: &Arc<Self>, number: u64, check: Option<Check>) -> Result<Loaded, LoadError> {
        let this = self.clone();
        let opened = self.background.run(move || this.copy_and_open(number, check)).map_err(LoadError::Thread)?;
        let opened = opened.await.unwrap_or_else(|_| Err(self.crashed()))?;
        let this = self.clone();
        let loaded = self.initializer.run(move || this.init(number, opened)).map_err(LoadError::Thread)?;
        loaded.await.unwrap_or_else(|_| Err(self.crashed()))
    }

    fn crashed(&self) -> LoadError {
        LoadError::Crashed { path: self.source.clone() }
    }

    /// The part of a load on the background thread: the bytes, the check,
    /// the open.
    fn copy_and_open(&self, number: u64, check: Option<Check>) -> Result<Opened, LoadError> {
        let started = Instant::now();
        let prepared = self.prepare(number)?;
        let copied = started.elapsed();
        let checked = Instant::now();
        if let Some(check) = check {
            check(self, &prepared)?;
        }
        let checking = checked.elapsed();
        let hash = prepared.hash();
        let opened = self.open(number, prepared)?;
        let took = started.elapsed().saturating_sub(checking);
        tracing::debug!(
            generation = number,
            copy = if opened.reused { "reused" } else { "new" },
            copy_ms = copied.as_secs_f64() * 1000.0,
            open_ms = took.saturating_sub(copied).as_secs_f64() * 1000.0,
            "library opened"
        );
        Ok(Opened { library: opened.library, copy: opened.copy, took, hash: Some(hash) })
    }

    /// Checks the file and makes the copy to open: an unmapped in-memory
    /// copy of the same bytes if the pool has one, else a new one (hashed
    /// as it is written, and its ELF headers checked).
    fn prepare(&self, number: u64) -> Result<Prepared, LoadError> {
        check_source(&self.source)?;
        let file = self.open_source()?;
        let load = self.loads.fetch_add(1, Ordering::Relaxed);
        let name = copy_name(&self.source, number, load);
        match &self.copies {
            Copies::Memory => {
                let unreadable = |error| LoadError::Unreadable { path: self.source.clone(), error };
                let before = Origin::of_file(&file).map_err(unreadable)?;
                if let Some(copy) = self.pool.take_by_origin(before) {
                    return Ok(Prepared::Memory { copy, reused: true });
                }
                let read_at = SystemTime::now();
                let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if self.pool.has_free() {
                    let hash = copies::hash(&file, &mut buffer).map_err(unreadable)?;
                    if let Some(mut copy) = self.pool.take(hash) {
                        copy.origin = Origin::settled_after(before, &file, read_at).map_err(unreadable)?;
                        return Ok(Prepared::Memory { copy, reused: true });
                    }
                }
                let copy = self.new_copy(&file, &name, before, read_at, &mut buffer)?;
                Ok(Prepared::Memory { copy, reused: false })
            }
            Copies::Staging(staging) => {
                let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let (path, hash) = staging.copy_in(&file, &name, &mut buffer).map_err(|error| LoadError::Stage {
                    path: self.source.clone(),
                    staging: staging.path.clone(),
                    error,
                })?;
                Ok(Prepared::Staged { path, hash })
            }
        }
    }

    /// Copies `file` (in state `before` when it was opened, read from
    /// `read_at` on) into a new in-memory file named `name`, hashing it.
    fn new_copy(
        &self,
        file: &File,
        name: &str,
        before: Origin,
        read_at: SystemTime,
        buffer: &mut Buffer,
    ) -> Result<Copy, LoadError> {
        let memory = |error| LoadError::Memory { path: self.source.clone(), error };
        let into = process::memfd(name).map_err(memory)?;
        let (hash, _) = copies::copy_hashing(file, Some(&into), buffer).map_err(memory)?;
        check_elf(&self.source, &into)?;
        let origin = Origin::settled_after(before, file, read_at)
            .map_err(|error| LoadError::Unreadable { path: self.source.clone(), error })?;
        Ok(Copy { file: into, hash, origin })
    }

    /// Puts a copy of the library in the pool, on the loader's background
    /// thread, if the pool has none: the first reload of unchanged bytes
    /// then opens it rather than copying the file (most of that reload's
    /// time, on the core the server is busy on). Awaited by the reload task
    /// before its first reload, so it never runs beside a load. Later
    /// reloads of the same bytes find the copies of the generations they
    /// retired. The spare is named for generation 0.
    pub async fn stock_spare_copy(self: &Arc<Self>) {
        if !matches!(self.copies, Copies::Memory) || self.pool.has_free() {
            return;
        }
        let this = self.clone();
        let made = match self.background.run(move || this.spare_copy()) {
            Ok(made) => made.await.unwrap_or_else(|_| Err(self.crashed())),
            Err(e) => Err(LoadError::Thread(e)),
        };
        match made {
            Ok(copy) => {
                tracing::debug!(hash = %copy.hash, "spare copy of the library made");
                self.pool.stock(copy);
            }
            Err(e) => tracing::debug!("no spare copy of the library: {e}"),
        }
    }

    fn spare_copy(&self) -> Result<Copy, LoadError> {
        let file = self.open_source()?;
        let metadata = file.metadata().map_err(|error| LoadError::Unreadable { path: self.source.clone(), error })?;
        let read_at = SystemTime::now();
        let load = self.loads.fetch_add(1, Ordering::Relaxed);
        let name = copy_name(&self.source, 0, load);
        let mut buffer = self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.new_copy(&file, &name, Origin::of(&metadata), read_at, &mut buffer)
    }

    /// Opens the prepared copy. An in-memory copy is opened through a
    /// descriptor of its own (which the library keeps while it is mapped);
    /// the loader keeps the copy's first descriptor, for its pool.
    fn open(&self, number: u64, prepared: Prepared) -> Result<OpenedCopy, LoadError> {
        let opened = |result: Result<OpenedLibrary, OpenError>| {
            result.map_err(|reason| LoadError::Open { path: self.source.clone(), reason })
        };
        match prepared {
            Prepared::Memory { copy, reused } => {
                let file =
                    copy.file.try_clone().map_err(|error| LoadError::Memory { path: self.source.clone(), error })?;
                let library = opened(OpenedLibrary::open_file(file, number))?;
                Ok(OpenedCopy { library, copy: Some(copy), reused })
            }
            Prepared::Staged { path, .. } => {
                let result = File::open(&path)
                    .map_err(|error| LoadError::Unreadable { path: self.source.clone(), error })
                    .and_then(|copy| check_elf(&self.source, &copy))
                    .and_then(|()| opened(OpenedLibrary::open(&path, number)));
                // Mapped (or failed): the copy's name is no longer needed.
                let _ = fs::remove_file(&path);
                Ok(OpenedCopy { library: result?, copy: None, reused: false })
            }
        }
    }

    /// The part of a load on the init thread: the app's `init`.
    fn init(&self, number: u64, opened: Opened) -> Result<Loaded, LoadError> {
        let started = Instant::now();
        let app = opened
            .library
            .init(&self.settings, self.max_log_level)
            .map_err(|reason| LoadError::Open { path: self.source.clone(), reason })?;
        let lent = opened.copy.map(|copy| Lent::new(copy, self.pool.clone()));
        Ok(Loaded {
            generation: Generation::new(number, app, self.unload_timeout, lent),
            duration: opened.took + started.elapsed(),
            hash: opened.hash,
        })
    }

    fn open_source(&self) -> Result<File, LoadError> {
        open_library(&self.source, (!self.allow_insecure_library).then_some(self.server_uid))
    }
}

/// What [`Loader::open`] gives.
struct OpenedCopy {
    library: OpenedLibrary,
    copy: Option<Copy>,
    reused: bool,
}

/// Opens the library file at `path` and, with `trusted_by` (the server's
/// uid; `None` under `--allow-insecure-library`), checks that only root or
/// that user can change it. What is checked is the open file itself, at its
/// canonical path, so a file renamed into place meanwhile is never loaded
/// unchecked.
pub fn open_library(path: &Path, trusted_by: Option<u32>) -> Result<File, LoadError> {
    let unreadable = |error: io::Error| match error.kind() {
        io::ErrorKind::NotFound => LoadError::Missing { path: path.to_owned() },
        _ => LoadError::Unreadable { path: path.to_owned(), error },
    };
    // A deploy that renames a new file into place between the open and
    // the look-up is retried; only a file replaced over and over fails.
    for _ in 0..5 {
        let file = File::open(path).map_err(unreadable)?;
        let Some(server_uid) = trusted_by else { return Ok(file) };
        let opened = file.metadata().map_err(unreadable)?;
        let canonical = fs::canonicalize(path).map_err(unreadable)?;
        let found = fs::metadata(&canonical).map_err(unreadable)?;
        if (found.dev(), found.ino()) != (opened.dev(), opened.ino()) {
            continue;
        }
        trust::check(&opened, &canonical, server_uid)
            .map_err(|problem| LoadError::Insecure { path: path.to_owned(), problem })?;
        return Ok(file);
    }
    Err(LoadError::Unsettled { path: path.to_owned() })
}

/// Checks the ELF headers of `copy` (a copy of `source`, named in errors):
/// a truncated file would SIGBUS after `dlopen`, anything else not ELF is
/// not a library.
pub fn check_elf(source: &Path, copy: &File) -> Result<(), LoadError> {
    match elf::check_open_file(copy) {
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

/// The name of load number `load` of generation `number`, such as
/// `pounce-host-g2-1-libapp.so`: unique in the process, and recognisable in
/// `/proc/PID/maps` (as `/memfd:pounce-host-g2-1-libapp.so (deleted)`).
fn copy_name(source: &Path, number: u64, load: u64) -> String {
    let file = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "app.so".to_owned());
    let mut name = format!("{COPY_PREFIX}g{number}-{load}-{file}");
    // memfd names are at most 249 bytes.
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// Whether in-memory copies can be loaded: `memfd_create` works and
/// `/proc/self/fd` shows its descriptor. `Err` says why not. Only a refusal
/// counts (`ENOSYS`: a kernel without it; `EPERM`: a seccomp filter;
/// `EACCES`, or `EINVAL` before Linux 6.6: `vm.memfd_noexec = 2`); other
/// errors (out of descriptors, say) pass and would hit a staging copy too.
fn in_memory_copies() -> Result<(), String> {
    let probe = match process::memfd(&format!("{COPY_PREFIX}probe")) {
        Ok(probe) => probe,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::Unsupported | io::ErrorKind::PermissionDenied | io::ErrorKind::InvalidInput
            ) =>
        {
            return Err(format!("memfd_create: {e}"));
        }
        Err(_) => return Ok(()),
    };
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&probe));
    fs::metadata(&path).map(drop).map_err(|e| format!("{path}: {e}; is /proc mounted?"))
}

/// Removes the staging directories (`pounce-host-<pid>-*`) under `base` that
/// belong to `uid` and whose process is gone: what a server that crashed or
/// was killed left behind. Returns how many it removed.
fn remove_stale_staging(base: &Path, uid: u32) -> usize {
    let Ok(entries) = fs::read_dir(base) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(staging_pid) else { continue };
        // Not followed if it is a symbolic link: only real directories.
        let Ok(metadata) = entry.metadata() else { continue };
        if !metadata.is_dir() || metadata.uid() != uid || identity::process_exists(pid) {
            continue;
        }
        if fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The pid in a staging directory's name, `pounce-host-<pid>-<suffix>`.
fn staging_pid(name: &str) -> Option<u32> {
    let (pid, suffix) = name.strip_prefix(COPY_PREFIX)?.split_once('-')?;
    if suffix.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// A private directory (mode 0700) for the per-generation copies, removed
/// when the host exits.
struct StagingDir {
    path: PathBuf,
}

impl StagingDir {
    fn create(base: &Path) -> io::Result<StagingDir> {
        let pid = std::process::id();
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = base.join(format!("{COPY_PREFIX}{pid}-{nanos:08x}"));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create the staging directory {}: {e}", path.display()))
        })?;
        Ok(StagingDir { path })
    }

    /// Copies the open library `source` to `name` in the directory,
    /// hashing it as it goes. The copy is written under a temporary name
    /// and renamed, so the loader never sees a partial file.
    fn copy_in(&self, source: &File, name: &str, buffer: &mut Buffer) -> io::Result<(PathBuf, ContentHash)> {
        let target = self.path.join(name);
        let partial = self.path.join(format!(".{name}.partial"));
        let copied = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|copy| copies::copy_hashing(source, Some(&copy), buffer))
            .and_then(|(hash, _)| fs::rename(&partial, &target).map(|()| hash));
        match copied {
            Ok(hash) => Ok((target, hash)),
            Err(e) => {
                let _ = fs::remove_file(&partial);
                Err(e)
            }
        }
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of the test's own, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let path = std::env::temp_dir().join(format!("pounce-loader-test-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir(&path).expect("temp dir is writable");
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A pid above the kernel's largest `pid_max` (2^22): never alive.
    const DEAD_PID: u32 = 99_999_999;

    #[test]
    fn staging_directory_names_carry_the_pid() {
        assert_eq!(staging_pid("pounce-host-42-0badcafe"), Some(42));
        assert_eq!(staging_pid("pounce-host-42-"), None);
        assert_eq!(staging_pid("pounce-host-42"), None);
        assert_eq!(staging_pid("pounce-host-g1-0-libapp.so"), None);
        assert_eq!(staging_pid("pounce-host--1-x"), None);
        assert_eq!(staging_pid("other-42-x"), None);
    }

    #[test]
    fn stale_staging_directories_of_dead_processes_are_removed() {
        let scratch = Scratch::new("stale");
        let uid = identity::effective_uid();
        let dead = scratch.0.join(format!("pounce-host-{DEAD_PID}-0badcafe"));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("g1-0-libapp.so"), b"copy").unwrap();
        let alive = scratch.0.join(format!("pounce-host-{}-0badcafe", std::process::id()));
        let unrelated = scratch.0.join(format!("pounce-hostile-{DEAD_PID}-x"));
        let a_file = scratch.0.join(format!("pounce-host-{DEAD_PID}-file"));
        fs::create_dir(&alive).unwrap();
        fs::create_dir(&unrelated).unwrap();
        fs::write(&a_file, b"").unwrap();

        assert_eq!(remove_stale_staging(&scratch.0, uid + 1), 0, "another user's directories are left alone");
        assert!(dead.exists());
        assert_eq!(remove_stale_staging(&scratch.0, uid), 1);
        assert!(!dead.exists(), "the dead process's directory is gone");
        assert!(alive.exists() && unrelated.exists() && a_file.exists(), "everything else stays");
        assert_eq!(remove_stale_staging(&scratch.0.join("missing"), uid), 0);
    }

    #[test]
    fn staging_copies_are_private_and_leave_nothing_when_dropped() {
        let scratch = Scratch::new("staging");
        let staging = StagingDir::create(&scratch.0).unwrap();
        let name = staging.path.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(staging_pid(&name), Some(std::process::id()));
        assert_eq!(fs::metadata(&staging.path).unwrap().mode() & 0o777, 0o700);
        let exe = File::open("/proc/self/exe").unwrap();
        let (copy, hash) = staging.copy_in(&exe, "g1-0-app", &mut Buffer::new()).unwrap();
        assert_eq!(hash, copies::hash(&exe, &mut Buffer::new()).unwrap());
        assert_eq!(elf::check_file(&copy).unwrap(), Ok(()));
        let path = staging.path.clone();
        drop(staging);
        assert!(!path.exists());
        let missing = scratch.0.join("missing");
        let error = StagingDir::create(&missing).err().expect("no such base directory");
        assert!(error.to_string().contains("cannot create the staging directory"), "{error}");
    }

    #[test]
    fn in_memory_copies_are_whole_and_named_for_the_maps() {
        in_memory_copies().expect("memfd and /proc are available where the tests run");
        let copy = process::memfd("pounce-host-g1-0-test").unwrap();
        copies::copy_hashing(&File::open("/proc/self/exe").unwrap(), Some(&copy), &mut Buffer::new()).unwrap();
        assert_eq!(elf::check_open_file(&copy).unwrap(), Ok(()));
        assert_eq!(copy.metadata().unwrap().len(), fs::metadata("/proc/self/exe").unwrap().len());
        let link = fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&copy))).unwrap();
        assert!(link.to_string_lossy().starts_with("/memfd:pounce-host-g1-0-test"), "{}", link.display());
    }

    #[test]
    fn copy_names_are_unique_and_bounded() {
        let source = Path::new("/srv/app/libapp.so");
        assert_eq!(copy_name(source, 2, 1), "pounce-host-g2-1-libapp.so");
        assert_ne!(copy_name(source, 2, 1), copy_name(source, 2, 3));
        let long = PathBuf::from(format!("/srv/{}.so", "é".repeat(300)));
        assert!(copy_name(&long, 1, 0).len() <= 200);
    }
}
