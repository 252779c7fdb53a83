//! `cargo xtask dev`: build an app, serve it with pounce-host, and rebuild
//! and reload it on every save, without restarting the server.
//!
//! ```text
//! cargo xtask dev [--package NAME | --manifest-path PATH] [--host-binary PATH] [-- SERVE OPTIONS]
//! ```
//!
//! - Watches the app's `src/`, its `Cargo.toml` and the `--reload-dir`s among
//!   the serve options; never `target/`, hidden directories or editor
//!   temporary files. Watching starts before the first build, so a change
//!   saved during it is built once serving starts.
//! - One `cargo build` at a time; changes during a build queue one more.
//! - A good build is loaded with SIGHUP (a signal, not a file-watch race); a
//!   failed build prints the compiler's errors and the last good build keeps
//!   serving.
//! - Ctrl-C stops the host gracefully (it runs in its own process group, so
//!   it gets signals only from here: one SIGINT per Ctrl-C, and a second one
//!   stops it at once) and exits with its status.
//! - However else `dev` ends (an error, a panic), the host is not left behind:
//!   it gets a SIGINT and is killed if it has not exited within 15 s.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use notify::{RecursiveMode, Watcher as _};
use pounce_host::lifecycle::watch::is_editor_temp;

const USAGE: &str =
    "usage: cargo xtask dev [--package NAME | --manifest-path PATH] [--host-binary PATH] [-- SERVE OPTIONS]

Builds the app crate (default: sample-app), serves it with pounce-host, and
rebuilds and reloads it whenever its sources change.

  --package NAME         a cdylib package of this workspace
  --manifest-path PATH   the Cargo.toml of an app crate elsewhere
  --host-binary PATH     use this pounce-host instead of building one
  -- SERVE OPTIONS       passed to `pounce-host serve`, e.g. -- --port 8080
";

/// How long changes must be quiet before a build starts (one save is often
/// several writes).
const QUIET: Duration = Duration::from_millis(100);
/// How long to wait for the host to report a reload.
const RELOAD_WAIT: Duration = Duration::from_secs(60);
/// How long a host left behind by an early exit gets to shut down.
const CLEANUP_WAIT: Duration = Duration::from_secs(15);

struct Options {
    package: Option<String>,
    manifest_path: Option<PathBuf>,
    host_binary: Option<PathBuf>,
    serve: Vec<String>,
}

impl Options {
    fn parse(args: Vec<String>) -> anyhow::Result<Option<Options>> {
        let mut options = Options { package: None, manifest_path: None, host_binary: None, serve: Vec::new() };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value\n\n{USAGE}"));
            match arg.as_str() {
                "--package" | "-p" => options.package = Some(value("--package")?),
                "--manifest-path" => options.manifest_path = Some(value("--manifest-path")?.into()),
                "--host-binary" => options.host_binary = Some(value("--host-binary")?.into()),
                "-h" | "--help" => return Ok(None),
                "--" => {
                    options.serve = args.collect();
                    break;
                }
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if options.package.is_some() && options.manifest_path.is_some() {
            bail!("give --package or --manifest-path, not both");
        }
        Ok(Some(options))
    }

    /// The `--reload-dir`s among the serve options.
    fn reload_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let mut serve = self.serve.iter();
        while let Some(arg) = serve.next() {
            if let Some(dir) = arg.strip_prefix("--reload-dir=") {
                dirs.push(PathBuf::from(dir));
            } else if arg == "--reload-dir" {
                dirs.extend(serve.next().map(PathBuf::from));
            }
        }
        dirs
    }
}

/// The app crate being developed.
struct App {
    name: String,
    manifest: PathBuf,
    library: PathBuf,
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

impl App {
    /// Finds the package and where its library will be built, with
    /// `cargo metadata`.
    fn locate(options: &Options) -> anyhow::Result<App> {
        let manifest = options.manifest_path.clone().unwrap_or_else(|| workspace_root().join("Cargo.toml"));
        let output = cargo()
            .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path"])
            .arg(&manifest)
            .output()
            .context("running cargo metadata")?;
        if !output.status.success() {
            bail!("cargo metadata failed for {}:\n{}", manifest.display(), String::from_utf8_lossy(&output.stderr));
        }
        let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
        let packages = metadata["packages"].as_array().cloned().unwrap_or_default();
        let wanted =
            options.package.clone().or_else(|| options.manifest_path.is_none().then(|| "sample-app".to_owned()));
        let package = match &wanted {
            Some(name) => packages.iter().find(|p| p["name"] == name.as_str()),
            None => packages.first(),
        }
        .ok_or_else(|| anyhow!("no package {} in {}", wanted.as_deref().unwrap_or("at all"), manifest.display()))?;
        let name = package["name"].as_str().unwrap_or_default().to_owned();
        let lib_name = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["crate_types"].as_array().is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib")))
            .and_then(|t| t["name"].as_str())
            .ok_or_else(|| anyhow!("package {name} has no cdylib target: add crate-type = [\"cdylib\"] to its [lib]"))?
            .replace('-', "_");
        let target = PathBuf::from(metadata["target_directory"].as_str().unwrap_or("target"));
        Ok(App {
            manifest: PathBuf::from(package["manifest_path"].as_str().unwrap_or_default()),
            library: target.join("debug").join(format!("lib{lib_name}.so")),
            name,
        })
    }

    fn dir(&self) -> &Path {
        self.manifest.parent().unwrap_or(Path::new("."))
    }
}

/// Everything the main loop reacts to.
enum Message {
    Changed(PathBuf),
    Built { ok: bool, output: String, took: Duration },
    Host(HostEvent),
    Interrupted,
}

enum HostEvent {
    Listening(String),
    Published(u64),
    ReloadFailed(String),
}

pub fn main(args: Vec<String>) -> anyhow::Result<()> {
    let Some(options) = Options::parse(args)? else {
        print!("{USAGE}");
        return Ok(());
    };
    // Signals and changes are caught from the start; both wait in `rx`
    // until serving starts.
    let (tx, rx) = channel();
    spawn_interrupt_listener(tx.clone())?;
    let app = App::locate(&options)?;
    let _watcher = watch(&app, &options.reload_dirs(), tx.clone())?;
    let host_binary = match &options.host_binary {
        Some(path) => path.clone(),
        None => build_host()?,
    };
    say(&format!("building {}", app.name));
    let (ok, output) = build(&app.manifest, &app.name);
    if interrupted_early(&rx, &tx) {
        bail!("interrupted before pounce-host started");
    }
    if !ok {
        eprint!("{output}");
        bail!("the first build of {} failed; fix it and run cargo xtask dev again", app.name);
    }
    let mut host = Host(start_host(&host_binary, &app, &options.serve, tx.clone())?);
    let status = Session::new(&app, tx).run(&rx, &mut host.0);
    // `exit` skips destructors: stop the host first, whatever happened.
    drop(host);
    std::process::exit(status?.code().unwrap_or(1));
}

/// Whether Ctrl-C or SIGTERM arrived before serving started; any other
/// messages stay queued, in order.
fn interrupted_early(rx: &Receiver<Message>, tx: &Sender<Message>) -> bool {
    let early: Vec<Message> = rx.try_iter().collect();
    let interrupted = early.iter().any(|message| matches!(message, Message::Interrupted));
    for message in early {
        let _ = tx.send(message);
    }
    interrupted
}

/// The running host. Dropped while the host still runs (an error or panic
/// in the dev loop), it stops the host: one SIGINT, then a kill after
/// [`CLEANUP_WAIT`].
struct Host(Child);

impl Drop for Host {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        say("stopping pounce-host");
        signal_host(&self.0, "-INT");
        let deadline = Instant::now() + CLEANUP_WAIT;
        while matches!(self.0.try_wait(), Ok(None)) {
            if Instant::now() >= deadline {
                say("pounce-host did not stop; killing it");
                let _ = self.0.kill();
                let _ = self.0.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn say(line: &str) {
    println!("[dev] {line}");
}

fn build_host() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    let status = cargo().args(["build", "--quiet", "-p", "pounce-host"]).current_dir(&root).status()?;
    if !status.success() {
        bail!("building pounce-host failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/pounce-host"))
}

/// Runs `cargo build` for package `name`; returns success and the compiler
/// output.
fn build(manifest: &Path, name: &str) -> (bool, String) {
    let output =
        cargo().args(["build", "--color", "always", "--manifest-path"]).arg(manifest).args(["-p", name]).output();
    match output {
        Ok(output) => (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned()),
        Err(e) => (false, format!("cannot run cargo: {e}\n")),
    }
}

fn start_host(binary: &Path, app: &App, serve: &[String], tx: Sender<Message>) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(binary)
        .arg("serve")
        .args(serve)
        .arg(&app.library)
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only us, and we
        // pass one SIGINT on per Ctrl-C (the second cuts the drain short).
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr from pounce-host"))?;
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if let Some(event) = host_event(&line) {
                let _ = tx.send(Message::Host(event));
            }
        }
    });
    Ok(child)
}

/// Reads the host's log lines the developer cares about.
fn host_event(line: &str) -> Option<HostEvent> {
    if let Some(rest) = line.split("listening on ").nth(1) {
        return Some(HostEvent::Listening(
            rest.split_whitespace().next().unwrap_or(rest).trim_end_matches('"').to_owned(),
        ));
    }
    if let Some(rest) = line.split("generation ").nth(1).filter(|_| line.contains(" published")) {
        return rest.split_whitespace().next()?.parse().ok().map(HostEvent::Published);
    }
    line.split("reload failed: ").nth(1).map(|reason| HostEvent::ReloadFailed(reason.to_owned()))
}

fn watch(app: &App, reload_dirs: &[PathBuf], tx: Sender<Message>) -> anyhow::Result<notify::RecommendedWatcher> {
    let dir = app.dir().to_path_buf();
    let manifest = app.manifest.clone();
    let src = dir.join("src");
    let extra: Vec<PathBuf> = reload_dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
    let relevant = {
        let (src, extra) = (src.clone(), extra.clone());
        move |path: &Path| {
            let under = |root: &Path| path.strip_prefix(root).ok().map(Path::to_path_buf);
            let relative = match under(&src).or_else(|| extra.iter().find_map(|root| under(root))) {
                Some(relative) => relative,
                None => return path == manifest,
            };
            let hidden = relative.components().any(|c| c.as_os_str().to_string_lossy().starts_with('.'));
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            !hidden && !is_editor_temp(&name) && !relative.starts_with("target")
        }
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return;
        }
        if let Some(path) = event.paths.into_iter().find(|p| relevant(p)) {
            let _ = tx.send(Message::Changed(path));
        }
    })?;
    watcher.watch(&src, RecursiveMode::Recursive).with_context(|| format!("watching {}", src.display()))?;
    watcher.watch(&dir, RecursiveMode::NonRecursive).with_context(|| format!("watching {}", dir.display()))?;
    for extra in &extra {
        watcher.watch(extra, RecursiveMode::Recursive).with_context(|| format!("watching {}", extra.display()))?;
    }
    Ok(watcher)
}

/// Every Ctrl-C (SIGINT) or SIGTERM to the dev loop becomes a message.
fn spawn_interrupt_listener(tx: Sender<Message>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        for _ in signals.forever() {
            if tx.send(Message::Interrupted).is_err() {
                return;
            }
        }
    });
    Ok(())
}

fn signal_host(host: &Child, signal: &str) {
    let _ = Command::new("kill").args([signal, &host.id().to_string()]).status();
}

/// The dev loop's state.
struct Session<'a> {
    app: &'a App,
    tx: Sender<Message>,
    generation: u64,
    /// When the first change not yet built was seen, and the last one.
    pending: Option<(Instant, Instant, PathBuf)>,
    building: Option<Instant>,
    /// The change that started the build in progress or the reload awaited.
    change_seen: Option<Instant>,
    /// A build finished and SIGHUP was sent: (signal time, change time, build time).
    reloading: Option<(Instant, Instant, Duration)>,
}

impl<'a> Session<'a> {
    fn new(app: &'a App, tx: Sender<Message>) -> Session<'a> {
        Session { app, tx, generation: 1, pending: None, building: None, change_seen: None, reloading: None }
    }

    fn run(mut self, rx: &Receiver<Message>, host: &mut Child) -> anyhow::Result<ExitStatus> {
        loop {
            if let Some(status) = host.try_wait()? {
                say(&format!("pounce-host exited ({status})"));
                return Ok(status);
            }
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(Message::Interrupted) => return stop(rx, host),
                Ok(message) => self.handle(message, host),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => bail!("the dev loop lost its event sources"),
            }
            self.maybe_build();
            if let Some((signaled, _, _)) = self.reloading {
                if signaled.elapsed() > RELOAD_WAIT {
                    say("pounce-host did not report the reload; see its log above");
                    self.reloading = None;
                }
            }
        }
    }

    fn handle(&mut self, message: Message, host: &Child) {
        match message {
            Message::Changed(path) => {
                let now = Instant::now();
                let first = self.pending.as_ref().map_or(now, |(first, _, _)| *first);
                self.pending = Some((first, now, path));
            }
            Message::Built { ok, output, took } => self.built(ok, &output, took, host),
            Message::Host(HostEvent::Listening(address)) => {
                say(&format!("serving {} on {address} (pid {})", self.app.library.display(), host.id()));
            }
            Message::Host(HostEvent::Published(generation)) => {
                self.generation = generation;
                if let Some((signaled, changed, build)) = self.reloading.take() {
                    say(&format!(
                        "reloaded into generation {generation} in {} ms (build {} ms, host {} ms)",
                        changed.elapsed().as_millis(),
                        build.as_millis(),
                        signaled.elapsed().as_millis()
                    ));
                }
            }
            Message::Host(HostEvent::ReloadFailed(reason)) => {
                self.reloading = None;
                say(&format!("reload failed, still serving generation {}: {reason}", self.generation));
            }
            Message::Interrupted => {}
        }
    }

    /// Starts a build once changes have been quiet, if none is running.
    fn maybe_build(&mut self) {
        let Some((first, last, _)) = &self.pending else { return };
        if self.building.is_some() || last.elapsed() < QUIET {
            return;
        }
        let (first, path) = (*first, self.pending.take().map(|(_, _, path)| path).unwrap_or_default());
        say(&format!("{} changed: rebuilding {}", path.display(), self.app.name));
        self.building = Some(Instant::now());
        self.change_seen = Some(first);
        let (manifest, name, tx) = (self.app.manifest.clone(), self.app.name.clone(), self.tx.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let (ok, output) = build(&manifest, &name);
            let _ = tx.send(Message::Built { ok, output, took: started.elapsed() });
        });
    }

    fn built(&mut self, ok: bool, output: &str, took: Duration, host: &Child) {
        self.building = None;
        let changed = self.change_seen.take().unwrap_or_else(Instant::now);
        if ok {
            say(&format!("built in {} ms; reloading", took.as_millis()));
            self.reloading = Some((Instant::now(), changed, took));
            signal_host(host, "-HUP");
        } else {
            eprint!("{output}");
            say(&format!("build failed; still serving generation {} (the last good build)", self.generation));
        }
        if self.pending.is_some() {
            say("more changes arrived during the build; building again");
        }
    }
}

/// Stops the host gracefully; another Ctrl-C meanwhile is passed on, which
/// makes the host exit at once.
fn stop(rx: &Receiver<Message>, host: &mut Child) -> anyhow::Result<ExitStatus> {
    say("stopping pounce-host (graceful shutdown; Ctrl-C again to stop at once)");
    signal_host(host, "-INT");
    loop {
        if let Some(status) = host.try_wait()? {
            return Ok(status);
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Message::Interrupted) => {
                say("stopping pounce-host at once");
                signal_host(host, "-INT");
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(host.wait()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_dev_and_serve_arguments() {
        let args = ["--package", "myapp", "--", "--port", "9000", "--reload-dir", "templates", "--reload-dir=static"];
        let options = Options::parse(args.iter().map(|s| s.to_string()).collect()).unwrap().unwrap();
        assert_eq!(options.package.as_deref(), Some("myapp"));
        assert_eq!(options.serve.len(), 5);
        assert_eq!(options.reload_dirs(), [PathBuf::from("templates"), PathBuf::from("static")]);
        assert!(Options::parse(vec!["--bogus".into()]).is_err());
        assert!(Options::parse(vec!["--package".into(), "a".into(), "--manifest-path".into(), "b".into()]).is_err());
    }

    #[test]
    fn host_log_lines_become_events() {
        let listening =
            "2026-01-01T00:00:00Z  INFO pounce_host::events: listening on http://127.0.0.1:8000 event=\"server_ready\"";
        assert!(matches!(host_event(listening), Some(HostEvent::Listening(a)) if a == "http://127.0.0.1:8000"));
        let published =
            "INFO pounce_host::events: generation 7 published; generation 6 drains event=\"generation_loaded\"";
        assert!(matches!(host_event(published), Some(HostEvent::Published(7))));
        let failed = "ERROR pounce_host::events: reload failed: libapp.so: truncated; generation 6 keeps serving";
        assert!(matches!(host_event(failed), Some(HostEvent::ReloadFailed(r)) if r.starts_with("libapp.so")));
        assert!(host_event("INFO something else").is_none());
    }
}
