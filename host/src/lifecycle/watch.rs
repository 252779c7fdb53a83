//! `--reload`: watch the library (and `--reload-dir`s) and trigger the same
//! rolling reload as SIGHUP on every change. For development.
//!
//! - The library's *directory* is watched, not the file: linkers and deploy
//!   tools replace a file by writing a new one and renaming it, which a
//!   watch on the old inode would miss.
//! - Events are debounced: a save or a link run is a burst of events, and
//!   becomes one reload once the burst has been quiet for [`QUIET`].
//! - A library that changed alone is reloaded only once it has settled (size
//!   and modification time stable), is a complete ELF object, and differs in
//!   content from the last one triggered: a half-written file is never
//!   loaded, and touching a file without changing it does nothing. If the
//!   load still fails, the old generation keeps serving and the next change
//!   tries again.
//! - Editor temporary files (`*~`, `.*.swp`, `.#*`, `#*#`, vim's `4913`) and
//!   hidden directories are ignored.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use pounce_devkit::is_editor_temp;
use tokio::sync::Notify;

use crate::generations::elf;

/// How long a burst of events must be quiet before it becomes a reload.
const QUIET: Duration = Duration::from_millis(200);
/// The longest a burst may keep a reload waiting.
const MAX_BURST: Duration = Duration::from_secs(5);
/// How long a library file must keep its size and mtime to count as settled.
const SETTLE: Duration = Duration::from_millis(100);

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("--reload: cannot watch {}: {error}", .path.display())]
    Path { path: PathBuf, error: String },
    #[error("--reload: cannot start the watch thread: {0}")]
    Thread(io::Error),
}

/// What to watch.
pub struct WatchSpec {
    pub library: PathBuf,
    pub dirs: Vec<PathBuf>,
    /// Extensions (lowercase, no dot) that count in `dirs`; empty: all.
    pub include: Vec<String>,
}

/// A running watch; dropping it stops the watch thread.
pub struct Watch {
    _watcher: RecommendedWatcher,
}

/// Starts watching; every relevant change calls `reload.notify_one()`.
pub fn start(spec: WatchSpec, reload: Arc<Notify>) -> Result<Watch, WatchError> {
    let filter = Filter::new(spec)?;
    let (tx, rx) = channel();
    let mut watcher = notify::recommended_watcher(move |event| {
        let _ = tx.send(event);
    })
    .map_err(|e| WatchError::Path { path: filter.library_dir.clone(), error: e.to_string() })?;
    let mut watch = |path: &Path, mode| {
        watcher.watch(path, mode).map_err(|e| WatchError::Path { path: path.to_owned(), error: e.to_string() })
    };
    watch(&filter.library_dir, RecursiveMode::NonRecursive)?;
    for dir in &filter.dirs {
        watch(dir, RecursiveMode::Recursive)?;
    }
    tracing::info!(
        library = %filter.library.display(),
        dirs = ?filter.dirs,
        include = ?filter.include,
        "--reload: watching for changes"
    );
    std::thread::Builder::new()
        .name("pounce-watch".to_owned())
        .spawn(move || run(filter, rx, reload))
        .map_err(WatchError::Thread)?;
    Ok(Watch { _watcher: watcher })
}

/// Decides which paths matter.
struct Filter {
    library: PathBuf,
    library_dir: PathBuf,
    dirs: Vec<PathBuf>,
    include: Vec<String>,
}

impl Filter {
    fn new(spec: WatchSpec) -> Result<Filter, WatchError> {
        let absolute = |path: &Path| {
            std::path::absolute(path).map_err(|e| WatchError::Path { path: path.to_owned(), error: e.to_string() })
        };
        let library = absolute(&spec.library)?;
        let library_dir = library.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
        let dirs = spec
            .dirs
            .iter()
            .map(|dir| {
                let canonical =
                    dir.canonicalize().map_err(|e| WatchError::Path { path: dir.clone(), error: e.to_string() })?;
                if canonical.is_dir() {
                    Ok(canonical)
                } else {
                    Err(WatchError::Path { path: dir.clone(), error: "not a directory".to_owned() })
                }
            })
            .collect::<Result<_, _>>()?;
        // Events name paths under the directory as watched, so compare
        // against the library's canonical directory too.
        let library_dir = library_dir.canonicalize().unwrap_or(library_dir);
        let library = library_dir.join(library.file_name().unwrap_or_default());
        Ok(Filter { library, library_dir, dirs, include: spec.include })
    }

    fn is_library(&self, path: &Path) -> bool {
        path == self.library
    }

    fn is_watched_file(&self, path: &Path) -> bool {
        let Some(dir) = self.dirs.iter().find(|dir| path.starts_with(dir)) else { return false };
        let relative = path.strip_prefix(dir).unwrap_or(path);
        let hidden = relative
            .components()
            .any(|c| matches!(c, Component::Normal(name) if name.to_string_lossy().starts_with('.')));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if hidden || is_editor_temp(&name) {
            return false;
        }
        self.include.is_empty()
            || path.extension().is_some_and(|ext| self.include.contains(&ext.to_string_lossy().to_ascii_lowercase()))
    }
}

/// What one burst of events touched.
#[derive(Default)]
struct Burst {
    library: bool,
    other: Option<PathBuf>,
}

impl Burst {
    fn add(&mut self, filter: &Filter, event: Event) {
        if event.need_rescan() {
            // Events were dropped (queue overflow): the library may have
            // changed; its content hash tells.
            self.library = true;
            return;
        }
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        for path in event.paths {
            if filter.is_library(&path) {
                self.library = true;
            } else if self.other.is_none() && filter.is_watched_file(&path) {
                self.other = Some(path);
            }
        }
    }

    fn is_empty(&self) -> bool {
        !self.library && self.other.is_none()
    }
}

fn run(filter: Filter, events: Receiver<notify::Result<Event>>, reload: Arc<Notify>) {
    let mut last_loaded = content_hash(&filter.library);
    while let Ok(first) = events.recv() {
        let mut burst = Burst::default();
        add(&filter, &mut burst, first);
        let started = Instant::now();
        loop {
            match events.recv_timeout(QUIET) {
                Ok(event) => add(&filter, &mut burst, event),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if started.elapsed() > MAX_BURST {
                break;
            }
        }
        if burst.is_empty() {
            continue;
        }
        if burst.library {
            match settled_library(&filter.library) {
                Ok(hash) if burst.other.is_none() && Some(hash) == last_loaded => {
                    tracing::debug!(
                        "--reload: {} rewritten with the same content; not reloading",
                        filter.library.display()
                    );
                    continue;
                }
                Ok(hash) => last_loaded = Some(hash),
                Err(reason) => {
                    tracing::warn!(
                        "--reload: {} changed but {reason}; still serving the current generation, waiting for the next change",
                        filter.library.display()
                    );
                    continue;
                }
            }
        }
        let changed = burst.other.as_deref().unwrap_or(&filter.library);
        tracing::info!("--reload: {} changed; reloading", changed.display());
        reload.notify_one();
    }
}

fn add(filter: &Filter, burst: &mut Burst, event: notify::Result<Event>) {
    match event {
        Ok(event) => burst.add(filter, event),
        Err(e) => {
            tracing::warn!("--reload: watch error: {e}; checking the library again");
            burst.library = true;
        }
    }
}

/// Waits until the library stops changing, checks it is a complete ELF
/// object, and returns its content hash.
fn settled_library(path: &Path) -> Result<u64, String> {
    let started = Instant::now();
    let mut seen = stamp(path).map_err(|e| format!("cannot be read ({e})"))?;
    loop {
        std::thread::sleep(SETTLE);
        let now = stamp(path).map_err(|e| format!("cannot be read ({e})"))?;
        if now == seen || started.elapsed() > MAX_BURST {
            break;
        }
        seen = now;
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot be read ({e})"))?;
    elf::check(&bytes).map_err(|problem| format!("is not a loadable library yet ({problem})"))?;
    Ok(hash(&bytes))
}

fn stamp(path: &Path) -> io::Result<(u64, Option<SystemTime>)> {
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.len(), metadata.modified().ok()))
}

fn content_hash(path: &Path) -> Option<u64> {
    std::fs::read(path).ok().map(|bytes| hash(&bytes))
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_files_honour_include_and_hidden_dirs() {
        let dir = std::env::temp_dir().canonicalize().unwrap();
        let filter = Filter {
            library: dir.join("libapp.so"),
            library_dir: dir.clone(),
            dirs: vec![dir.join("templates")],
            include: vec!["html".to_owned()],
        };
        assert!(filter.is_watched_file(&dir.join("templates/index.html")));
        assert!(filter.is_watched_file(&dir.join("templates/sub/page.HTML")));
        assert!(!filter.is_watched_file(&dir.join("templates/notes.txt")));
        assert!(!filter.is_watched_file(&dir.join("templates/.git/index.html")));
        assert!(!filter.is_watched_file(&dir.join("templates/index.html~")));
        assert!(!filter.is_watched_file(&dir.join("elsewhere/index.html")));
        assert!(filter.is_library(&dir.join("libapp.so")));
    }
}
