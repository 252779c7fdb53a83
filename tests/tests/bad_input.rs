//! Bad input at start-up: each gets a precise message that names the file and
//! says what to do, a non-zero exit code, and no half-started server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pounce_tests::{run_host, sample_app, Server, TempDir};

/// Exit codes documented in README.md.
const EXIT_CONFIG: i32 = 2;
const EXIT_LOAD: i32 = 3;
const EXIT_BIND: i32 = 4;

/// The ABI version this pounce-host speaks (`app_abi::ffi::ABI_VERSION`).
const ABI_VERSION: u32 = 2;

/// Starts `serve` on `library` and expects it to exit with `code` and a log
/// that contains every one of `needles`.
fn serve_fails(library: &Path, args: &[&str], code: i32, needles: &[&str]) {
    let (status, logs) = match Server::try_start(library, args) {
        Ok(server) => panic!("server started on {} but should have failed", server.addr),
        Err(failure) => failure,
    };
    assert_eq!(status.and_then(|s| s.code()), Some(code), "exit code; log:\n{logs}");
    for needle in needles {
        assert!(logs.contains(needle), "log lacks {needle:?}:\n{logs}");
    }
    assert!(!logs.contains(r#"event="server_ready""#), "no half-started server:\n{logs}");
}

/// A system shared library that is certainly not a pounce-host app.
fn system_library() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib64/libm.so.6",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libm.so.6 exists on a glibc system")
}

/// A shared library exporting `pounce_app_entry` with a table of the given
/// version and size, compiled from C with the system compiler.
fn library_with_table(dir: &TempDir, version: u32, size: u32) -> PathBuf {
    let source = dir.join(&format!("table_{version}_{size}.c"));
    let library = dir.join(&format!("libtable_{version}_{size}.so"));
    let code = format!(
        "#include <stdint.h>\nstatic const uint32_t table[16] = {{ {version}u, {size}u }};\nconst void *pounce_app_entry(void) {{ return table; }}\n"
    );
    std::fs::write(&source, code).unwrap();
    let status =
        Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&library).arg(&source).status().expect("cc runs");
    assert!(status.success(), "compiling the fixture library failed");
    library
}

#[test]
fn a_missing_library() {
    serve_fails(
        Path::new("/nonexistent/libapp.so"),
        &[],
        EXIT_LOAD,
        &["/nonexistent/libapp.so: no such file", "build the app first"],
    );
}

#[test]
fn a_directory() {
    let dir = TempDir::new("dir");
    serve_fails(dir.path(), &[], EXIT_LOAD, &["is a directory", "give the path of the app's .so file"]);
}

#[test]
fn a_file_that_is_not_a_library() {
    let dir = TempDir::new("text");
    let path = dir.join("libapp.so");
    std::fs::write(&path, "this is not ELF\n").unwrap();
    serve_fails(&path, &[], EXIT_LOAD, &["not a shared library (not an ELF file)", "crate-type = [\"cdylib\"]"]);
    let empty = dir.join("empty.so");
    std::fs::write(&empty, "").unwrap();
    serve_fails(&empty, &[], EXIT_LOAD, &["empty.so: not a shared library"]);
}

#[test]
fn a_truncated_library() {
    let dir = TempDir::new("truncated");
    let bytes = std::fs::read(sample_app()).unwrap();
    let path = dir.join("libtruncated.so");
    std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
    serve_fails(&path, &[], EXIT_LOAD, &["libtruncated.so: the library file is damaged (truncated", "rebuild it"]);
}

#[test]
fn a_shared_library_without_the_entry_symbol() {
    serve_fails(&system_library(), &[], EXIT_LOAD, &["does not export the `pounce_app_entry` symbol", "export_app!"]);
}

#[test]
fn an_unsupported_abi_version() {
    let dir = TempDir::new("abi");
    let library = library_with_table(&dir, 99, 200);
    serve_fails(
        &library,
        &[],
        EXIT_LOAD,
        &["built for app ABI version 99", &format!("speaks version {ABI_VERSION}"), "rebuild the app"],
    );
}

#[test]
fn a_table_that_is_too_small() {
    let dir = TempDir::new("size");
    let library = library_with_table(&dir, ABI_VERSION, 8);
    serve_fails(&library, &[], EXIT_LOAD, &["its ABI table is 8 bytes, smaller than"]);
}

#[test]
fn an_init_that_fails_or_panics() {
    serve_fails(
        &sample_app(),
        &["--app-arg", "fail_init=yes"],
        EXIT_LOAD,
        &["the app's init returned an error", "fail_init is set"],
    );
    serve_fails(
        &sample_app(),
        &["--app-arg", "fail_init=panic"],
        EXIT_LOAD,
        &["the app's init panicked", "fail_init=panic"],
    );
}

#[test]
fn a_port_already_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    serve_fails(&sample_app(), &["--port", &port], EXIT_BIND, &["is already in use", "choose another --port"]);
}

#[test]
fn invalid_option_values() {
    let app = sample_app();
    let app = app.to_str().unwrap();
    for (args, needle) in [
        (vec!["serve", "--port", "http", app], "invalid value 'http' for '--port"),
        (vec!["serve", "--reload-timeout", "soon", app], "invalid duration"),
        (vec!["serve", "--workers", "0", app], "--workers"),
        (vec!["serve", "--max-body-size", "lots", app], "--max-body-size"),
        (vec!["serve", "--health-path", "health", app], "--health-path"),
        (vec!["serve", "--log-format", "xml", app], "--log-format"),
    ] {
        let (status, output) = run_host(&args, Duration::from_secs(10));
        assert_eq!(status.code(), Some(EXIT_CONFIG), "{args:?}: {output}");
        assert!(output.contains(needle), "{args:?}: missing {needle:?} in {output}");
    }
}

#[test]
fn a_bad_config_file_value() {
    let dir = TempDir::new("config");
    let file = dir.join("pounce.toml");
    std::fs::write(&file, "port = 8000\nreload_timeout = \"abc\"\n").unwrap();
    let app = sample_app();
    let (status, output) =
        run_host(&["serve", "--config", file.to_str().unwrap(), app.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{output}");
    assert!(output.contains("pounce.toml: reload_timeout"), "{output}");
    std::fs::write(&file, "prot = 8000\n").unwrap();
    let (status, output) =
        run_host(&["serve", "--config", file.to_str().unwrap(), app.to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{output}");
    assert!(output.contains("prot"), "{output}");
}

#[test]
fn check_fails_on_a_bad_library() {
    let (status, output) = run_host(&["check", system_library().to_str().unwrap()], Duration::from_secs(10));
    assert_eq!(status.code(), Some(EXIT_LOAD), "{output}");
    assert!(output.contains("does not export the `pounce_app_entry` symbol"), "{output}");
}
