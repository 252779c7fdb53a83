//! The deployment recipes in `deploy/` (systemd units, Dockerfile, Kubernetes
//! manifests) must agree with what pounce-host really does, so they cannot
//! drift from its defaults: timeouts that cover the graceful shutdown, the
//! health path and port the probes use, exec-form commands so signals reach
//! pounce-host, and so on.
//!
//! The host's defaults are read from the real binary (`serve --help`), and
//! the settings each recipe gives are fed back to the real binary, so the
//! line-based parsing here is checked against pounce-host's own.
//! No YAML or INI crate: the files are parsed by the small readers below,
//! which understand the subset the recipes use and fail loudly on the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use pounce_devkit::workspace;
use pounce_tests::{
    clean_env, free_port, get, get_when_listening, host_binary, run_host, run_to_end, sample_app,
    systemd_socket_activate, Server,
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// What pounce-host itself says

/// `Default: X` of every `serve` option, from `pounce-host serve --help`,
/// keyed by the long flag (`--shutdown-timeout`).
fn help_defaults() -> &'static BTreeMap<String, String> {
    static DEFAULTS: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        let mut command = Command::new(host_binary());
        command.args(["serve", "--help"]).stdin(Stdio::null());
        // A POUNCE_* variable would show up in the help as `[env: ...=value]`;
        // keep the text to the built-in defaults.
        for (key, _) in std::env::vars() {
            if key.starts_with("POUNCE_") {
                command.env_remove(key);
            }
        }
        let output = command.output().expect("run pounce-host serve --help");
        assert!(output.status.success(), "serve --help failed: {output:?}");
        let defaults = parse_help_defaults(&String::from_utf8_lossy(&output.stdout));
        for flag in ["--shutdown-timeout", "--health-path", "--port", "--host"] {
            assert!(defaults.contains_key(flag), "serve --help gives no default for {flag}: {defaults:?}");
        }
        defaults
    })
}

/// Splits clap's long help into one block per option (the line that starts
/// with `-` and the indented description under it) and takes the token after
/// `Default:` in each.
fn parse_help_defaults(help: &str) -> BTreeMap<String, String> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        if trimmed.starts_with('-') && (1..10).contains(&indent) {
            let long = trimmed.split([' ', ',', '=']).find(|word| word.starts_with("--")).unwrap_or(trimmed);
            blocks.push((long.to_owned(), String::new()));
        } else if indent == 0 {
            blocks.push((String::new(), String::new())); // a section heading ends the block
        } else if let Some((_, text)) = blocks.last_mut() {
            text.push(' ');
            text.push_str(trimmed);
        }
    }
    blocks
        .into_iter()
        .filter(|(flag, _)| !flag.is_empty())
        .filter_map(|(flag, text)| {
            let after = text.split("Default: ").nth(1)?;
            let value = after.split_whitespace().next()?.trim_end_matches('.');
            Some((flag, value.to_owned()))
        })
        .collect()
}

fn default_of(flag: &str) -> &'static str {
    help_defaults().get(flag).map(String::as_str).unwrap_or_else(|| panic!("no default for {flag}"))
}

fn default_shutdown_timeout() -> Duration {
    host_duration(default_of("--shutdown-timeout"))
}

fn default_health_path() -> &'static str {
    default_of("--health-path")
}

fn default_port() -> u16 {
    default_of("--port").parse().expect("the default port is a number")
}

/// A duration as pounce-host writes and reads it: `500ms`, `1.5s`, `30s`,
/// `2m`, `1h`, or a bare number of seconds.
fn host_duration(text: &str) -> Duration {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("not a duration: {text:?}"));
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => panic!("not a pounce-host duration unit: {text:?}"),
    };
    Duration::from_secs_f64(seconds)
}

/// A systemd time span: `30s`, `1min 30s`, `90` (seconds), `500ms`, `2h`.
fn systemd_timespan(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    assert!(!rest.is_empty() && rest != "infinity", "not a finite time span: {text:?}");
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().unwrap_or_else(|_| panic!("not a time span: {text:?}"));
        rest = rest[digits..].trim_start();
        let unit_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "ms" | "msec" => 0.001,
            "us" | "usec" => 0.000_001,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            unit => panic!("unexpected time span unit {unit:?} in {text:?}"),
        };
        total += Duration::from_secs_f64(number * seconds_per_unit);
        rest = rest[unit_len..].trim_start();
    }
    total
}

/// pounce-host's own time to shut down gracefully, at worst: connections
/// drain for `shutdown_timeout`, the async runtime gets 2s for its remaining
/// tasks (`RUNTIME_GRACE` in host/src/main.rs), then each app's `shutdown`
/// may wait up to `shutdown_timeout` again for its threads.
fn worst_case_shutdown(shutdown_timeout: Duration) -> Duration {
    2 * shutdown_timeout + Duration::from_secs(2)
}

/// The shutdown timeout a running server announces when it gets SIGTERM
/// ("open connections get up to 10s to finish").
fn announced_shutdown_timeout(logs: &str) -> Duration {
    let after = logs.split("get up to ").nth(1).unwrap_or_else(|| panic!("no shutdown announcement in:\n{logs}"));
    host_duration(after.split_whitespace().next().unwrap_or_default())
}

fn read(relative: &str) -> String {
    let path = workspace().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs `argv` the way a container runtime runs an exec-form command, with
/// the given environment on top of ours minus every POUNCE_* variable.
fn run_bounded(argv: &[String], env: &[(&str, String)], timeout: Duration) -> (ExitStatus, String) {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    for (key, _) in std::env::vars() {
        if key.starts_with("POUNCE_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    run_to_end(command, timeout)
}

/// Waits for `server` to exit after a signal and returns its log.
fn expect_clean_exit(server: &mut Server, within: Duration) -> String {
    let status = server.wait_exit(within).unwrap_or_else(|| panic!("no exit within {within:?}:\n{}", server.logs()));
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0:\n{}", server.logs());
    server.logs()
}

// ---------------------------------------------------------------------------
// systemd units

/// A unit file: `(section, key, value)` in file order. Comments (`#`, `;`)
/// and blank lines are dropped, `\` continues a line.
struct Unit {
    name: String,
    entries: Vec<(String, String, String)>,
}

impl Unit {
    fn load(relative: &str) -> Unit {
        let text = read(relative);
        let mut entries = Vec::new();
        let mut section = String::new();
        let mut pending = String::new();
        for raw in text.lines() {
            let line = raw.trim();
            if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
                continue;
            }
            if let Some(continued) = line.strip_suffix('\\') {
                pending.push_str(continued);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let logical = std::mem::take(&mut pending);
            if logical.starts_with('[') && logical.ends_with(']') {
                section = logical[1..logical.len() - 1].to_owned();
                continue;
            }
            let (key, value) =
                logical.split_once('=').unwrap_or_else(|| panic!("{relative}: not key=value: {logical}"));
            entries.push((section.clone(), key.trim().to_owned(), value.trim().to_owned()));
        }
        Unit { name: relative.to_owned(), entries }
    }

    fn all(&self, key: &str) -> Vec<&str> {
        self.entries.iter().filter(|(s, k, _)| s == "Service" && k == key).map(|(_, _, v)| v.as_str()).collect()
    }

    /// The last assignment of `key` in `[Service]` (the one systemd uses).
    fn get(&self, key: &str) -> Option<&str> {
        self.all(key).last().copied()
    }

    fn require(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("{}: [Service] lacks {key}=", self.name))
    }

    /// An Exec*= command line as words, without systemd's `-@+!:` prefixes.
    fn command(&self, value: &str) -> Vec<String> {
        let value = value.trim_start_matches(['-', '@', '+', '!', ':']);
        assert!(!value.contains('"') && !value.contains('\''), "{}: keep Exec lines unquoted: {value}", self.name);
        value.split_whitespace().map(str::to_owned).collect()
    }

    /// `Environment=` assignments (`KEY=value`, optionally double-quoted).
    fn environment(&self) -> BTreeMap<String, String> {
        assert!(self.get("EnvironmentFile").is_none(), "{}: EnvironmentFile= hides settings from this test", self.name);
        let mut env = BTreeMap::new();
        for line in self.all("Environment") {
            let mut words = Vec::new();
            let (mut word, mut quoted) = (String::new(), false);
            for c in line.chars() {
                match c {
                    '"' => quoted = !quoted,
                    c if c.is_whitespace() && !quoted => words.push(std::mem::take(&mut word)),
                    c => word.push(c),
                }
            }
            words.push(word);
            for assignment in words.into_iter().filter(|w| !w.is_empty()) {
                let (key, value) = assignment.split_once('=').expect("KEY=value");
                env.insert(key.to_owned(), value.to_owned());
            }
        }
        env
    }
}

/// The value of `--flag VALUE` or `--flag=VALUE` in `argv`.
fn flag_value(argv: &[String], flag: &str) -> Option<String> {
    argv.iter().enumerate().find_map(|(i, word)| {
        if word == flag {
            argv.get(i + 1).cloned()
        } else {
            word.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')).map(str::to_owned)
        }
    })
}

/// Top-level `key = value` pairs of a TOML file (up to its first table).
fn toml_top_level(text: &str) -> BTreeMap<String, String> {
    let mut pairs = BTreeMap::new();
    for raw in text.lines() {
        let line = raw.trim();
        if line.starts_with('[') {
            break;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not key = value: {line}"));
        let value = value.trim();
        let value = if let Some(quoted) = value.strip_prefix('"') {
            quoted.split('"').next().unwrap_or_default().to_owned()
        } else {
            value.split('#').next().unwrap_or_default().trim().to_owned()
        };
        pairs.insert(key.trim().to_owned(), value);
    }
    pairs
}

/// What the unit's `serve` command line means.
struct ServeCommand {
    argv: Vec<String>,
    /// The `--config` file's copy in deploy/systemd/, if there is one.
    config: Option<PathBuf>,
    library: String,
    /// Effective shutdown timeout: flag > Environment= > config file > default.
    shutdown_timeout: Duration,
}

fn serve_command(unit: &Unit) -> ServeCommand {
    let argv = unit.command(unit.require("ExecStart"));
    assert!(
        argv[0].ends_with("/pounce-host") && argv[0].starts_with('/'),
        "{}: ExecStart= runs pounce-host by absolute path: {argv:?}",
        unit.name
    );
    assert_eq!(argv[1], "serve", "{}: ExecStart= runs `pounce-host serve`", unit.name);
    let library = argv.last().cloned().expect("a library");
    assert!(
        library.starts_with('/') && library.ends_with(".so"),
        "{}: serves an absolute .so path: {library}",
        unit.name
    );
    let config = flag_value(&argv, "--config").map(|installed| {
        let name = Path::new(&installed).file_name().expect("a config file name").to_owned();
        let copy = workspace().join("deploy/systemd").join(name);
        assert!(copy.exists(), "{}: --config {installed} has no example at {}", unit.name, copy.display());
        copy
    });
    let from_file = config.as_ref().and_then(|path| {
        toml_top_level(&std::fs::read_to_string(path).expect("read config")).get("shutdown_timeout").cloned()
    });
    let shutdown = flag_value(&argv, "--shutdown-timeout")
        .or_else(|| unit.environment().get("POUNCE_SHUTDOWN_TIMEOUT").cloned())
        .or(from_file)
        .map_or_else(default_shutdown_timeout, |text| host_duration(&text));
    ServeCommand { argv, config, library, shutdown_timeout: shutdown }
}

/// Invariants both units share.
fn check_common_unit(unit: &Unit) -> ServeCommand {
    let serve = serve_command(unit);
    assert_eq!(unit.require("KillSignal"), "SIGTERM", "{}: SIGTERM starts the graceful shutdown", unit.name);
    assert_eq!(
        unit.require("KillMode"),
        "mixed",
        "{}: signal pounce-host only, SIGKILL the rest at the end",
        unit.name
    );
    assert_eq!(unit.get("NotifyAccess").unwrap_or("main"), "main", "{}: pounce-host itself notifies", unit.name);
    assert_eq!(unit.require("Restart"), "on-failure", "{}", unit.name);

    let stop = systemd_timespan(unit.require("TimeoutStopSec"));
    let needed = worst_case_shutdown(serve.shutdown_timeout);
    assert!(
        stop > serve.shutdown_timeout && stop > needed,
        "{}: TimeoutStopSec={stop:?} must exceed 2 x shutdown_timeout ({:?}) + 2s = {needed:?}",
        unit.name,
        serve.shutdown_timeout
    );

    // The library is checked before it is served, with the same settings.
    let pre = unit.all("ExecStartPre").into_iter().map(|line| unit.command(line)).collect::<Vec<_>>();
    let check = pre.iter().find(|argv| argv.get(1).map(String::as_str) == Some("check"));
    let check = check.unwrap_or_else(|| panic!("{}: an ExecStartPre= runs `pounce-host check`", unit.name));
    assert_same_check(unit, check, &serve);

    // Sandbox: what pounce-host needs from it.
    assert_eq!(
        unit.require("PrivateTmp"),
        "yes",
        "{}: a private, writable /tmp for staged library copies (where memfd_create is not available)",
        unit.name
    );
    if let Some(tmpdir) = unit.environment().get("TMPDIR") {
        let writable = unit.all("ReadWritePaths").join(" ");
        assert!(
            writable.split_whitespace().any(|p| tmpdir.starts_with(p)),
            "{}: TMPDIR={tmpdir} must be writable",
            unit.name
        );
    }
    assert!(
        matches!(unit.get("MemoryDenyWriteExecute"), None | Some("no" | "false")),
        "{}: MemoryDenyWriteExecute= must stay unset: app code is native code loaded with dlopen",
        unit.name
    );
    for (key, value) in
        [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("LockPersonality", "yes")]
    {
        assert_eq!(unit.require(key), value, "{}: {key}=", unit.name);
    }
    let families = unit.require("RestrictAddressFamilies");
    for family in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(
            families.split_whitespace().any(|f| f == family),
            "{}: {family} (AF_UNIX: the notify socket)",
            unit.name
        );
    }
    assert!(unit.get("User").is_some() || unit.get("DynamicUser") == Some("yes"), "{}: not root", unit.name);
    serve
}

/// `argv` is `pounce-host check` on the same library with the same config as
/// `serve`.
fn assert_same_check(unit: &Unit, argv: &[String], serve: &ServeCommand) {
    assert_eq!(argv[0], serve.argv[0], "{}: the same binary checks and serves", unit.name);
    assert_eq!(argv.last(), Some(&serve.library), "{}: check the library that is served: {argv:?}", unit.name);
    assert_eq!(
        flag_value(argv, "--config"),
        flag_value(&serve.argv, "--config"),
        "{}: check with serve's config",
        unit.name
    );
}

#[test]
fn the_notify_unit_matches_the_host() {
    let unit = Unit::load("deploy/systemd/pounce.service");
    assert_eq!(unit.require("Type"), "notify");
    let serve = check_common_unit(&unit);
    let reload: Vec<Vec<String>> = unit.all("ExecReload").into_iter().map(|line| unit.command(line)).collect();
    let last = reload.last().expect("ExecReload= is set");
    assert!(
        last.len() == 3 && last[0].ends_with("/kill") && last[1] == "-HUP" && last[2] == "$MAINPID",
        "the last ExecReload= sends SIGHUP to the main process: {last:?}"
    );
    for before in &reload[..reload.len() - 1] {
        assert_eq!(before.get(1).map(String::as_str), Some("check"), "only checks run before the signal: {before:?}");
        assert_same_check(&unit, before, &serve);
    }
}

#[test]
fn the_notify_reload_unit_matches_the_host() {
    let unit = Unit::load("deploy/systemd/pounce-notify-reload.service");
    assert_eq!(unit.require("Type"), "notify-reload");
    check_common_unit(&unit);
    assert!(unit.get("ExecReload").is_none(), "systemd sends the reload signal itself");
    assert_eq!(unit.get("ReloadSignal").unwrap_or("SIGHUP"), "SIGHUP", "pounce-host reloads on SIGHUP");
}

/// The two units are one recipe: apart from the reload mechanism they must
/// say the same thing.
#[test]
fn the_two_units_differ_only_in_how_they_reload() {
    let strip = |unit: Unit| -> Vec<(String, String, String)> {
        unit.entries
            .into_iter()
            .filter(|(_, key, _)| !matches!(key.as_str(), "Type" | "ExecReload" | "ReloadSignal"))
            .collect()
    };
    let notify = strip(Unit::load("deploy/systemd/pounce.service"));
    let notify_reload = strip(Unit::load("deploy/systemd/pounce-notify-reload.service"));
    let only_notify: Vec<_> = notify.iter().filter(|e| !notify_reload.contains(e)).collect();
    let only_notify_reload: Vec<_> = notify_reload.iter().filter(|e| !notify.contains(e)).collect();
    assert!(
        only_notify.is_empty() && only_notify_reload.is_empty(),
        "only in pounce.service: {only_notify:?}; only in pounce-notify-reload.service: {only_notify_reload:?}"
    );
    assert_eq!(notify, notify_reload, "the same settings in the same order");
}

/// The example config is valid for the real binary and serves the health
/// endpoint, and the shutdown timeout the unit was checked against is the one
/// pounce-host uses with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_config_works_with_the_real_host() {
    let unit = Unit::load("deploy/systemd/pounce.service");
    let serve = serve_command(&unit);
    let config = serve.config.expect("the unit uses --config");
    let config_arg = config.to_string_lossy().into_owned();
    let settings = toml_top_level(&read("deploy/systemd/pounce.toml"));

    let library = sample_app();
    let library_arg = library.to_string_lossy().into_owned();
    let (status, output) = run_host(&["check", "--config", &config_arg, &library_arg], Duration::from_secs(30));
    assert!(status.success(), "pounce-host check accepts the example config:\n{output}");

    // The unit's own flags (minus the library and the port), then the config.
    let mut args: Vec<String> = serve.argv[2..serve.argv.len() - 1].to_vec();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        args[i + 1] = config_arg.clone();
    }
    args.extend(["--host".to_owned(), "127.0.0.1".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&library, &args);
    let health_path = settings.get("health_path").map_or(default_health_path(), String::as_str);
    assert_eq!(health_path, default_health_path(), "the docs curl the default health path");
    let health = get(server.addr, health_path).await.expect("health");
    assert_eq!(health.status, 200, "{}", health.text());

    server.signal(libc::SIGTERM);
    let logs = expect_clean_exit(&mut server, worst_case_shutdown(serve.shutdown_timeout) + Duration::from_secs(5));
    assert_eq!(announced_shutdown_timeout(&logs), serve.shutdown_timeout, "the unit was checked against this timeout");
}

/// The values of `key` in `section` of a unit.
fn section_values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.entries.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
}

/// `pounce.socket` listens where `pounce.service` would listen without it
/// (the config's host and port), under a name that serves the app, with
/// pounce-host's backlog, and activates `pounce.service`.
#[test]
fn the_socket_unit_listens_where_the_service_would() {
    let socket = Unit::load("deploy/systemd/pounce.socket");
    let listen = section_values(&socket, "Socket", "ListenStream");
    assert_eq!(listen.len(), 1, "one TCP socket (the unix one is an example): {listen:?}");
    let settings = toml_top_level(&read("deploy/systemd/pounce.toml"));
    let host = settings.get("host").cloned().unwrap_or_else(|| default_of("--host").to_owned());
    let port = settings.get("port").map_or_else(default_port, |p| p.parse().expect("port"));
    assert_eq!(listen[0], format!("{host}:{port}"), "ListenStream= is pounce.toml's host and port");
    let name = section_values(&socket, "Socket", "FileDescriptorName");
    assert_eq!(name, ["app"], "named for the app (a socket named admin serves only health and metrics)");
    let backlog = section_values(&socket, "Socket", "Backlog");
    assert_eq!(backlog, [default_of("--backlog")], "the backlog pounce-host would use");
    let service = section_values(&socket, "Socket", "Service");
    assert!(service.is_empty() || service == ["pounce.service"], "activates pounce.service: {service:?}");
    assert_eq!(section_values(&socket, "Install", "WantedBy"), ["sockets.target"]);
}

/// `pounce.service`'s command with its config, started the way systemd
/// starts it from `pounce.socket` (by `systemd-socket-activate`, on a free
/// port, under the unit's socket name): it serves the inherited socket and
/// binds nothing of its own, and the first connection, made before it
/// started, is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_unit_works_with_the_real_host() {
    let unit = Unit::load("deploy/systemd/pounce.service");
    let socket = Unit::load("deploy/systemd/pounce.socket");
    let serve = serve_command(&unit);
    let config = serve.config.expect("the unit uses --config");
    let name = section_values(&socket, "Socket", "FileDescriptorName").join(":");
    let port = free_port();
    let mut argv: Vec<String> = serve.argv[1..serve.argv.len() - 1].to_vec();
    if let Some(i) = argv.iter().position(|a| a == "--config") {
        argv[i + 1] = config.to_string_lossy().into_owned();
    }
    let mut command = Command::new(systemd_socket_activate());
    command
        .args(["-l", &format!("127.0.0.1:{port}"), &format!("--fdname={name}")])
        .arg(host_binary())
        .args(&argv)
        .arg(sample_app());
    clean_env(&mut command);
    let launch = std::thread::spawn(move || Server::launch(command, "/health", true));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let first = get_when_listening(addr, "/health", Duration::from_secs(30)).await.expect("the first connection");
    assert_eq!(first.status, 200, "{}", first.text());
    let mut server = launch.join().unwrap().unwrap_or_else(|(status, logs)| panic!("({status:?}):\n{logs}"));
    let logs = server.logs();
    assert!(logs.contains("systemd passed 1 listening socket(s)"), "{logs}");
    let ready = logs.lines().find(|l| l.contains("server_ready")).expect("server_ready");
    assert!(ready.contains(&format!("listeners=\"http://{addr}\"")), "only the inherited socket: {ready}");
    server.signal(libc::SIGTERM);
    expect_clean_exit(&mut server, worst_case_shutdown(serve.shutdown_timeout) + Duration::from_secs(5));
}

// ---------------------------------------------------------------------------
// Dockerfile

/// One Dockerfile instruction: keyword (upper case) and its arguments, with
/// continuation lines joined and comment lines dropped.
fn dockerfile(relative: &str) -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for raw in read(relative).lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            pending.push_str(continued);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let logical = std::mem::take(&mut pending);
        let (keyword, args) = logical.split_once(char::is_whitespace).unwrap_or((&logical, ""));
        instructions.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
    }
    assert!(pending.is_empty(), "{relative} ends in a continuation line");
    instructions
}

/// An exec-form argument list (a JSON array of strings), or a failure that
/// says why shell form is wrong here.
fn exec_form(instruction: &str, args: &str) -> Vec<String> {
    let value: Value = serde_json::from_str(args).unwrap_or_else(|_| {
        panic!("{instruction} must be in exec form (a JSON array) so signals reach pounce-host: {args}")
    });
    let words: Option<Vec<String>> =
        value.as_array().map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect());
    let words = words.filter(|w| !w.is_empty() && Some(w.len()) == value.as_array().map(Vec::len));
    words.unwrap_or_else(|| panic!("{instruction}: not a JSON array of strings: {args}"))
}

/// `ENV` assignments of the given instructions (`KEY=value ...` or `KEY value`).
fn docker_env(stage: &[(String, String)]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for (_, args) in stage.iter().filter(|(k, _)| k == "ENV") {
        if args.split_whitespace().next().is_some_and(|w| w.contains('=')) {
            for pair in args.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("KEY=value");
                env.insert(k.to_owned(), v.trim_matches('"').to_owned());
            }
        } else if let Some((k, v)) = args.split_once(char::is_whitespace) {
            env.insert(k.to_owned(), v.trim().trim_matches('"').to_owned());
        }
    }
    env
}

/// The instructions of the last stage (the image that runs).
fn runtime_stage(instructions: &[(String, String)]) -> &[(String, String)] {
    let last_from = instructions.iter().rposition(|(k, _)| k == "FROM").expect("a FROM");
    &instructions[last_from..]
}

fn healthcheck_argv(stage: &[(String, String)]) -> Vec<String> {
    let (_, args) = stage.iter().find(|(k, _)| k == "HEALTHCHECK").expect("a HEALTHCHECK");
    let command = args.split_once("CMD").map(|(_, rest)| rest.trim()).expect("HEALTHCHECK ... CMD [...]");
    exec_form("HEALTHCHECK CMD", command)
}

#[test]
fn the_dockerfile_runs_pounce_host_in_exec_form_on_all_interfaces() {
    let instructions = dockerfile("deploy/docker/Dockerfile");
    let stages = instructions.iter().filter(|(k, _)| k == "FROM").count();
    assert!(stages >= 2, "multi-stage: the runtime image carries no toolchain");
    let stage = runtime_stage(&instructions);
    let env = docker_env(stage);

    // Exec form, so that pounce-host is PID 1 and gets SIGTERM/SIGHUP.
    let mut argv = Vec::new();
    for keyword in ["ENTRYPOINT", "CMD"] {
        if let Some((_, args)) = stage.iter().rev().find(|(k, _)| k == keyword) {
            argv.extend(exec_form(keyword, args));
        }
    }
    assert!(!argv.is_empty(), "the runtime stage has a CMD");
    assert!(argv[0] == "pounce-host" || argv[0].ends_with("/pounce-host"), "runs pounce-host itself: {argv:?}");
    assert_eq!(argv.get(1).map(String::as_str), Some("serve"), "{argv:?}");

    let host = flag_value(&argv, "--host").or_else(|| env.get("POUNCE_HOST").cloned());
    let host = host.unwrap_or_else(|| default_of("--host").to_owned());
    assert!(host == "0.0.0.0" || host == "::", "listens on all interfaces, not {host} (the default is loopback only)");

    let port = flag_value(&argv, "--port").or_else(|| env.get("POUNCE_PORT").cloned());
    let port: u16 = port.map_or_else(default_port, |p| p.parse().expect("a port"));
    let exposed: Vec<&str> =
        stage.iter().filter(|(k, _)| k == "EXPOSE").flat_map(|(_, a)| a.split_whitespace()).collect();
    assert!(exposed.iter().any(|p| p.trim_end_matches("/tcp") == port.to_string()), "EXPOSE {port}: {exposed:?}");
    assert!(flag_value(&argv, "--port").is_none(), "set the port by POUNCE_PORT, which the HEALTHCHECK follows");

    // The library it serves is the one copied out of the builder.
    let library = argv.last().expect("a library");
    let copied = stage.iter().filter(|(k, _)| k == "COPY").any(|(_, args)| {
        let words: Vec<&str> = args.split_whitespace().filter(|w| !w.starts_with("--")).collect();
        let (sources, dest) = words.split_at(words.len() - 1);
        let dest = dest[0];
        dest == library
            || (dest.ends_with('/')
                && sources.iter().any(|s| format!("{dest}{}", s.rsplit('/').next().unwrap_or(s)) == *library))
    });
    assert!(copied, "{library} is COPY'd into the runtime stage");

    let stop = stage.iter().find(|(k, _)| k == "STOPSIGNAL").map(|(_, a)| a.as_str());
    assert_eq!(stop, Some("SIGTERM"), "STOPSIGNAL SIGTERM starts the graceful shutdown");
    let user = stage.iter().rev().find(|(k, _)| k == "USER").map(|(_, a)| a.as_str()).expect("a USER");
    let user_name = user.split(':').next().unwrap_or(user);
    assert!(user_name != "root" && user_name != "0", "runs as a non-root user, not {user}");
    assert!(user_name.parse::<u32>().is_ok(), "a numeric USER, so Kubernetes' runAsNonRoot can verify it: {user}");

    // The builder builds both in release mode.
    let build =
        instructions.iter().filter(|(k, _)| k == "RUN").map(|(_, a)| a.as_str()).find(|a| a.contains("cargo build"));
    let build = build.expect("a RUN cargo build");
    for needle in ["--release", "--locked", "-p pounce-host", "-p sample-app"] {
        assert!(build.contains(needle), "cargo build {needle}: {build}");
    }

    let ignore = read("deploy/docker/Dockerfile.dockerignore");
    assert!(ignore.lines().any(|l| l.trim() == "**/target"), "target/ stays out of the build context");
}

/// The HEALTHCHECK, run exactly as Docker would run it (exec form, in the
/// container's environment), against the real server: healthy while
/// serving, unhealthy while draining and when nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_healthcheck_follows_the_server_state() {
    let instructions = dockerfile("deploy/docker/Dockerfile");
    let argv = healthcheck_argv(runtime_stage(&instructions));
    let mut server = Server::start(&sample_app(), &[]);
    let port = server.addr.port().to_string();
    let env = [("POUNCE_PORT", port.clone())];

    let (status, output) = run_bounded(&argv, &env, Duration::from_secs(10));
    assert!(status.success(), "healthy while serving: {status:?} {output}");

    let addr = server.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=2000").await });
    server.wait_for_in_flight(1).await;
    server.signal(libc::SIGTERM);
    server.wait_until_draining().await;
    let (status, output) = run_bounded(&argv, &env, Duration::from_secs(10));
    assert!(!status.success(), "unhealthy while draining: {output}");

    assert_eq!(slow.await.unwrap().expect("in-flight request").status, 200);
    expect_clean_exit(&mut server, Duration::from_secs(15));
    let (status, _) = run_bounded(&argv, &env, Duration::from_secs(10));
    assert!(!status.success(), "unhealthy when nothing listens");
}

// ---------------------------------------------------------------------------
// Kubernetes manifests

/// Parses the block-style YAML subset the manifests use into JSON: mappings,
/// sequences (`- ` items, possibly at their key's indentation), plain and
/// quoted scalars, and JSON-style flow sequences (`["a", "b"]`).
fn yaml(relative: &str) -> Value {
    yaml_text(&read(relative), relative)
}

fn yaml_text(text: &str, file: &str) -> Value {
    let mut lines: Vec<(usize, String)> = text
        .lines()
        .filter_map(|raw| {
            let content = strip_yaml_comment(raw).trim_end();
            let trimmed = content.trim_start();
            if trimmed.is_empty() || trimmed == "---" {
                return None;
            }
            Some((content.len() - trimmed.len(), trimmed.to_owned()))
        })
        .collect();
    let mut i = 0;
    let indent = lines.first().map_or(0, |l| l.0);
    let value = yaml_block(&mut lines, &mut i, indent, file);
    assert_eq!(i, lines.len(), "{file}: could not parse from line {:?}", lines.get(i));
    value
}

fn strip_yaml_comment(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (c, quote) {
            ('"' | '\'', None) => quote = Some(c),
            (c, Some(q)) if c == q => quote = None,
            ('#', None) if i == 0 || line[..i].ends_with(char::is_whitespace) => return &line[..i],
            _ => {}
        }
    }
    line
}

fn yaml_block(lines: &mut [(usize, String)], i: &mut usize, indent: usize, file: &str) -> Value {
    if lines[*i].1.starts_with("- ") || lines[*i].1 == "-" {
        let mut items = Vec::new();
        while *i < lines.len() && lines[*i].0 == indent && (lines[*i].1.starts_with("- ") || lines[*i].1 == "-") {
            let rest = lines[*i].1[1..].trim_start().to_owned();
            if rest.is_empty() {
                *i += 1;
                let inner = lines[*i].0;
                assert!(inner > indent, "{file}: empty list item");
                items.push(yaml_block(lines, i, inner, file));
            } else if rest.contains(": ") || rest.ends_with(':') {
                // A mapping whose further keys line up with this first one.
                lines[*i] = (indent + 2, rest);
                items.push(yaml_block(lines, i, indent + 2, file));
            } else {
                *i += 1;
                items.push(yaml_scalar(&rest));
            }
        }
        return Value::Array(items);
    }
    let mut map = serde_json::Map::new();
    while *i < lines.len() && lines[*i].0 == indent && !lines[*i].1.starts_with("- ") {
        let line = lines[*i].1.clone();
        let (key, rest) = match line.split_once(": ") {
            Some((key, rest)) => (key, rest.trim()),
            None => (line.strip_suffix(':').unwrap_or_else(|| panic!("{file}: not `key: value`: {line}")), ""),
        };
        *i += 1;
        let value = if !rest.is_empty() {
            yaml_scalar(rest)
        } else if *i < lines.len() && lines[*i].0 > indent {
            let inner = lines[*i].0;
            yaml_block(lines, i, inner, file)
        } else if *i < lines.len() && lines[*i].0 == indent && lines[*i].1.starts_with("- ") {
            yaml_block(lines, i, indent, file)
        } else {
            Value::Null
        };
        map.insert(key.trim_matches('"').to_owned(), value);
    }
    assert!(*i == lines.len() || lines[*i].0 < indent, "{file}: unexpected indentation at {:?}", lines[*i]);
    Value::Object(map)
}

fn yaml_scalar(text: &str) -> Value {
    if text.starts_with('[') || text.starts_with('{') || text.starts_with('"') {
        return serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("flow value {text:?} is not JSON-compatible: {e}"));
    }
    if let Some(inner) = text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        return Value::String(inner.replace("''", "'"));
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" | "~" => Value::Null,
        _ => text.parse::<i64>().map_or_else(|_| Value::String(text.to_owned()), Value::from),
    }
}

struct Pod {
    spec: Value,
    container: Value,
    env: BTreeMap<String, String>,
}

fn pod() -> Pod {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    assert_eq!(deployment["kind"], "Deployment");
    let spec = deployment["spec"]["template"]["spec"].clone();
    let containers = spec["containers"].as_array().expect("containers");
    let container = containers.iter().find(|c| c["name"] == "pounce").expect("a container named pounce").clone();
    let env = container["env"]
        .as_array()
        .map(|vars| {
            vars.iter()
                .map(|var| {
                    let value = var["value"].as_str().unwrap_or_else(|| panic!("env values are quoted strings: {var}"));
                    (var["name"].as_str().expect("env name").to_owned(), value.to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    Pod { spec, container, env }
}

impl Pod {
    fn shutdown_timeout(&self) -> Duration {
        self.env.get("POUNCE_SHUTDOWN_TIMEOUT").map_or_else(default_shutdown_timeout, |t| host_duration(t))
    }

    fn health_path(&self) -> &str {
        self.env.get("POUNCE_HEALTH_PATH").map_or(default_health_path(), String::as_str)
    }

    fn port(&self) -> u16 {
        self.env.get("POUNCE_PORT").map_or_else(default_port, |p| p.parse().expect("POUNCE_PORT is a number"))
    }

    /// A port given by number or by the container port's name.
    fn resolve_port(&self, port: &Value) -> u16 {
        if let Some(number) = port.as_u64() {
            return u16::try_from(number).expect("a port number");
        }
        let name = port.as_str().expect("a port number or name");
        let ports = self.container["ports"].as_array().expect("container ports");
        let named = ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no container port {name}"));
        u16::try_from(named["containerPort"].as_u64().expect("containerPort")).expect("a port number")
    }

    /// The preStop delay: `exec: {command: ["sleep", "N"]}` (or `sh -c
    /// "sleep N"`), or the built-in `sleep: {seconds: N}`.
    fn pre_stop(&self) -> Duration {
        let hook = &self.container["lifecycle"]["preStop"];
        if let Some(seconds) = hook["sleep"]["seconds"].as_u64() {
            return Duration::from_secs(seconds);
        }
        let command: Vec<&str> = hook["exec"]["command"]
            .as_array()
            .expect("a preStop exec command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let words: Vec<&str> = command.iter().flat_map(|w| w.split_whitespace()).collect();
        let at = words.iter().position(|w| *w == "sleep").unwrap_or_else(|| panic!("preStop sleeps: {command:?}"));
        Duration::from_secs_f64(words[at + 1].parse().expect("sleep seconds"))
    }
}

#[test]
fn the_kubernetes_grace_period_covers_pre_stop_and_the_drain() {
    let pod = pod();
    let grace =
        Duration::from_secs(pod.spec["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds"));
    let pre_stop = pod.pre_stop();
    assert!(pre_stop > Duration::ZERO, "a preStop delay for load balancer de-registration");
    let shutdown = pod.shutdown_timeout();
    assert!(
        grace > shutdown + pre_stop,
        "terminationGracePeriodSeconds ({grace:?}) > shutdown_timeout ({shutdown:?}) + preStop ({pre_stop:?})"
    );
    let worst = pre_stop + worst_case_shutdown(shutdown);
    assert!(
        grace > worst,
        "terminationGracePeriodSeconds ({grace:?}) > preStop + 2 x shutdown_timeout + 2s = {worst:?}"
    );

    // The liveness probe must not kill a pod that is draining (health is 503 then).
    let liveness = &pod.container["livenessProbe"];
    let period = liveness["periodSeconds"].as_u64().unwrap_or(10);
    let failures = liveness["failureThreshold"].as_u64().unwrap_or(3);
    assert!(
        Duration::from_secs(period * failures) > worst_case_shutdown(shutdown),
        "liveness gives up after {period}s x {failures}, before a drain of up to {:?} ends",
        worst_case_shutdown(shutdown)
    );
}

#[test]
fn the_kubernetes_probes_and_ports_match_the_host() {
    let pod = pod();
    let port = pod.port();
    assert_eq!(pod.env.get("POUNCE_HOST").map(String::as_str), Some("0.0.0.0"), "listen beyond loopback");

    let ports = pod.container["ports"].as_array().expect("container ports");
    assert!(
        ports.iter().any(|p| p["containerPort"].as_u64() == Some(u64::from(port))),
        "containerPort {port}: {ports:?}"
    );
    // The probes ask the admin listener, which the kubelet reaches on the
    // pod's IP; the Service does not expose it.
    let admin: std::net::SocketAddr =
        pod.env.get("POUNCE_ADMIN_LISTEN").expect("POUNCE_ADMIN_LISTEN").parse().expect("IP:PORT");
    assert!(admin.ip().is_unspecified(), "the admin listener is reachable by the kubelet: {admin}");
    assert_ne!(admin.port(), port);
    assert!(
        ports.iter().any(|p| p["containerPort"].as_u64() == Some(u64::from(admin.port()))),
        "containerPort {}: {ports:?}",
        admin.port()
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let http = &pod.container[probe]["httpGet"];
        assert_eq!(http["path"].as_str(), Some(pod.health_path()), "{probe} uses the host's health endpoint");
        assert_eq!(pod.resolve_port(&http["port"]), admin.port(), "{probe} asks the admin port");
    }
    assert_eq!(pod.health_path(), default_health_path());
    assert_eq!(port, 8000, "the documented port");

    // Exec form: pounce-host is PID 1 and gets SIGTERM itself.
    let command: Vec<&str> =
        pod.container["command"].as_array().expect("command is a list").iter().filter_map(Value::as_str).collect();
    assert_eq!(command.first().copied(), Some("pounce-host"), "no shell in front: {command:?}");
    assert_eq!(command.get(1).copied(), Some("serve"));

    // Staged library copies (where memfd_create is not available) need a
    // writable $TMPDIR.
    if pod.container["securityContext"]["readOnlyRootFilesystem"] == true {
        let mounts = pod.container["volumeMounts"].as_array().expect("volume mounts");
        assert!(mounts.iter().any(|m| m["mountPath"] == "/tmp"), "/tmp is writable under a read-only root");
    }

    // The Service sends traffic to that port on these pods.
    let service = yaml("deploy/kubernetes/service.yaml");
    assert_eq!(service["kind"], "Service");
    let labels = yaml("deploy/kubernetes/deployment.yaml")["spec"]["template"]["metadata"]["labels"].clone();
    for (key, value) in service["spec"]["selector"].as_object().expect("a selector") {
        assert_eq!(&labels[key], value, "the Service selects the pods by {key}");
    }
    let targets = service["spec"]["ports"].as_array().expect("service ports");
    assert!(targets.iter().all(|p| pod.resolve_port(&p["targetPort"]) == port), "targetPort is {port}");
}

/// The manifest's settings, given to the real binary: it accepts them, the
/// readiness path answers 200 while serving and 503 once SIGTERM arrives,
/// and it drains with the shutdown timeout the grace period was checked
/// against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_settings_work_with_the_real_host() {
    let pod = pod();
    let mut args = Vec::new();
    for (key, value) in &pod.env {
        let name = key.strip_prefix("POUNCE_").unwrap_or_else(|| panic!("unexpected env {key}"));
        // The harness listens on a free loopback port and reads a text log.
        if matches!(name, "HOST" | "PORT" | "LOG_FORMAT") {
            continue;
        }
        // The admin listener on a free loopback port, found in the log.
        if name == "ADMIN_LISTEN" {
            args.push("--admin-listen=0".to_owned());
            continue;
        }
        args.push(format!("--{}={value}", name.to_ascii_lowercase().replace('_', "-")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start(&sample_app(), &args);
    let path = pod.health_path().to_owned();
    let probed = server.admin_addr().expect("an admin listener");
    let ready = get(probed, &path).await.expect("readiness");
    assert_eq!(ready.status, 200);
    let full: Value = serde_json::from_slice(&ready.body).expect("JSON");
    assert_eq!(full["status"], "ok");
    assert!(full.get("last_reload").is_some(), "the probed port has the full answer: {full}");
    let public = get(server.addr, &path).await.expect("the app port's health").json();
    assert_eq!(public.as_object().map(|o| o.len()), Some(2), "the app port says only status and generation: {public}");

    let addr = server.addr;
    let slow = tokio::spawn(async move { get(addr, "/sleep?ms=1500").await });
    server.wait_for_in_flight(1).await;
    server.signal(libc::SIGTERM);
    server.wait_until_draining().await;
    let draining = get(probed, &path).await.expect("readiness while draining");
    assert_eq!(draining.status, 503, "not ready once terminating: {}", draining.text());

    assert_eq!(slow.await.unwrap().expect("in flight").status, 200);
    let logs = expect_clean_exit(&mut server, worst_case_shutdown(pod.shutdown_timeout()) + Duration::from_secs(5));
    assert_eq!(announced_shutdown_timeout(&logs), pod.shutdown_timeout());
}

// ---------------------------------------------------------------------------
// The readers themselves

#[test]
fn the_readers_understand_what_they_claim() {
    assert_eq!(host_duration("10s"), Duration::from_secs(10));
    assert_eq!(host_duration("500ms"), Duration::from_millis(500));
    assert_eq!(host_duration("1.5s"), Duration::from_millis(1500));
    assert_eq!(host_duration("2m"), Duration::from_secs(120));
    assert_eq!(host_duration("7"), Duration::from_secs(7));
    assert_eq!(systemd_timespan("30s"), Duration::from_secs(30));
    assert_eq!(systemd_timespan("1min 30s"), Duration::from_secs(90));
    assert_eq!(systemd_timespan("45"), Duration::from_secs(45));

    let help = "Options:\n      --shutdown-timeout <DURATION>\n          On SIGTERM, wait. Default:\n          10s\n          \n          [env: POUNCE_SHUTDOWN_TIMEOUT=]\n\n  -h, --help\n          Print help\n";
    let defaults = parse_help_defaults(help);
    assert_eq!(defaults.get("--shutdown-timeout").map(String::as_str), Some("10s"));
    assert!(!defaults.contains_key("--help"));

    let toml = "host = \"127.0.0.1\" # loopback\nport = 8000\n\n[app]\nport = 1\n";
    let pairs = toml_top_level(toml);
    assert_eq!(pairs.get("host").map(String::as_str), Some("127.0.0.1"));
    assert_eq!(pairs.get("port").map(String::as_str), Some("8000"));

    let parsed = yaml_text(
        "a:\n  b: 1 # note\n  list:\n  - name: x\n    value: \"y # z\"\n  - [\"p\", \"q\"]\n  - plain\n  c: 'it''s'\n",
        "test.yaml",
    );
    assert_eq!(parsed["a"]["b"], 1);
    assert_eq!(parsed["a"]["list"][0]["value"], "y # z");
    assert_eq!(parsed["a"]["list"][1][1], "q");
    assert_eq!(parsed["a"]["list"][2], "plain");
    assert_eq!(parsed["a"]["c"], "it's");
}
