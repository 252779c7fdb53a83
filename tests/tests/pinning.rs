//! Code that can still run is never unmapped: an app library that left a
//! thread running, a signal handler installed or pthread keys behind is
//! either cleaned up (keys) or kept mapped (threads, handlers) when its
//! generation is released, or its failed load given up, and the server
//! survives either way. Without these checks each test's server dies of
//! SIGSEGV, or its reloads fail once glibc's 1024 keys are used up.
//!
//! The apps are small C libraries implementing the ABI (compiled here with
//! the system compiler, as in `bad_input.rs`), plus the sample app's
//! `detached_thread` knob for a thread started with `std::thread::spawn`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pounce_tests::{get, replace_file, sample_app, Server, TempDir};

/// The ABI types (`app-abi/src/ffi/abi.rs`, version 2) and a minimal app:
/// `GET` anything answers `200 fixture ok`. Each fixture adds `fixture_init`
/// (0 on success, or a static error message) and may add more code.
const PRELUDE: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct { const uint8_t *ptr; size_t len; } Slice;
typedef struct { uint8_t *ptr; size_t len; size_t cap; } OwnedString;
typedef struct { Slice name; Slice value; } Header;
typedef struct { const void *data; const void *vtable; } FfiWaker;
typedef struct {
    uint64_t generation; const Header *settings; size_t settings_count;
    uint32_t max_log_level; const void *host;
} InitContextC;
typedef struct {
    uint16_t status; const Header *headers; size_t header_count;
    uint32_t body_kind; Slice body; void *stream; void *io;
} ResponseHead;
typedef struct {
    uint32_t abi_version; uint32_t size;
    Slice name; Slice version; Slice abi_crate_version;
    uint32_t (*init)(const InitContextC *, void **, OwnedString *);
    uint32_t (*handle)(const void *, const void *, const FfiWaker *, ResponseHead *, void **);
    uint32_t (*poll_response)(void *, const FfiWaker *, ResponseHead *);
    void (*drop_response)(void *);
    uint32_t (*poll_chunk)(void *, const FfiWaker *, Slice *);
    void (*drop_stream)(void *);
    uint32_t (*io_read)(void *, const FfiWaker *, uint8_t *, size_t, size_t *);
    uint32_t (*io_write)(void *, const FfiWaker *, Slice, size_t *);
    uint32_t (*io_flush)(void *, const FfiWaker *);
    uint32_t (*io_shutdown)(void *, const FfiWaker *);
    void (*drop_io)(void *);
    void (*drain)(const void *);
    uint32_t (*shutdown)(void *, uint64_t);
    void (*free_string)(OwnedString);
} AppVTable;

#define S(text) ((Slice){ (const uint8_t *)(text), sizeof(text) - 1 })
enum { OK = 0, FAILED = 3 };

static const char *fixture_init(void);

/* A thread body that wakes every 100 ms, forever (for fixtures that leave
   a thread behind). */
__attribute__((unused)) static void *sleeper(void *arg) {
    (void)arg;
    for (;;) usleep(100000);
    return NULL;
}

static char instance, future;
static const char body[] = "fixture ok\n";

static uint32_t app_init(const InitContextC *ctx, void **out_app, OwnedString *out_error) {
    (void)ctx;
    const char *error = fixture_init();
    if (error) {
        *out_error = (OwnedString){ (uint8_t *)error, strlen(error), 0 };
        return FAILED;
    }
    *out_app = &instance;
    return OK;
}
static uint32_t app_handle(const void *app, const void *head, const FfiWaker *waker, ResponseHead *out, void **out_future) {
    (void)app; (void)head; (void)waker;
    *out = (ResponseHead){ 200, NULL, 0, 0, S(body), NULL, NULL };
    *out_future = &future;
    return OK;
}
static uint32_t app_poll_response(void *f, const FfiWaker *w, ResponseHead *out) { (void)f; (void)w; (void)out; return 2; }
static void app_drop_response(void *f) { (void)f; }
static uint32_t app_poll_chunk(void *s, const FfiWaker *w, Slice *out) { (void)s; (void)w; (void)out; return 5; }
static void app_drop_stream(void *s) { (void)s; }
/* No upgrades: the host never calls these for this app. */
static uint32_t app_io_read(void *io, const FfiWaker *w, uint8_t *b, size_t c, size_t *n) { (void)io; (void)w; (void)b; (void)c; (void)n; return 7; }
static uint32_t app_io_write(void *io, const FfiWaker *w, Slice d, size_t *n) { (void)io; (void)w; (void)d; (void)n; return 7; }
static uint32_t app_io_flush(void *io, const FfiWaker *w) { (void)io; (void)w; return 7; }
static uint32_t app_io_shutdown(void *io, const FfiWaker *w) { (void)io; (void)w; return 7; }
static void app_drop_io(void *io) { (void)io; }
static void app_drain(const void *app) { (void)app; }
static uint32_t app_shutdown(void *app, uint64_t timeout_ms) { (void)app; (void)timeout_ms; return OK; }
static void app_free_string(OwnedString s) { (void)s; }

static const AppVTable table = {
    2, sizeof(AppVTable), S("c-fixture"), S("0.1.0"), S("0.1.0"),
    app_init, app_handle, app_poll_response, app_drop_response, app_poll_chunk,
    app_drop_stream, app_io_read, app_io_write, app_io_flush, app_io_shutdown, app_drop_io,
    app_drain, app_shutdown, app_free_string,
};
const AppVTable *pounce_app_entry(void) { return &table; }
"#;

/// Compiles `PRELUDE` + `code` into `lib<name>.so` in `dir`.
fn fixture(dir: &TempDir, name: &str, code: &str) -> PathBuf {
    let source = dir.join(&format!("{name}.c"));
    let library = dir.join(&format!("lib{name}.so"));
    std::fs::write(&source, format!("{PRELUDE}\n{code}")).unwrap();
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-pthread", "-Wall", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .expect("cc runs");
    assert!(output.status.success(), "compiling {name}.c failed:\n{}", String::from_utf8_lossy(&output.stderr));
    library
}

/// init starts a detached thread that wakes every 100 ms, forever: once its
/// library is unmapped, it crashes the process within a tenth of a second.
const DETACHED_THREAD: &str = r#"
static const char *fixture_init(void) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, sleeper, NULL) != 0) return "pthread_create failed";
    pthread_setname_np(thread, "fixture-sleeper");
    pthread_detach(thread);
    return NULL;
}
"#;

/// An app with nothing to leave behind.
const PLAIN: &str = r#"
static const char *fixture_init(void) { return NULL; }
"#;

/// init starts the same thread, then fails: the failed load must not be
/// unmapped under it either.
const FAILING_AFTER_A_THREAD: &str = r#"
static const char *fixture_init(void) {
    pthread_t thread;
    if (pthread_create(&thread, NULL, sleeper, NULL) != 0) return "pthread_create failed";
    pthread_setname_np(thread, "fixture-orphan");
    pthread_detach(thread);
    return "init failed on purpose after starting a thread";
}
"#;

/// init installs a SIGHUP handler the way signal-hook or a C library does:
/// it keeps the previous action and chains to it, so the host still sees
/// every SIGHUP. Each generation chains to the one before it.
const SIGHUP_HANDLER: &str = r#"
static struct sigaction previous;
static void on_hup(int sig, siginfo_t *info, void *context) {
    static const char note[] = "fixture: SIGHUP handler ran\n";
    ssize_t ignored = write(2, note, sizeof(note) - 1);
    (void)ignored;
    if (previous.sa_flags & SA_SIGINFO) {
        if ((uintptr_t)previous.sa_sigaction > 1) previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    }
}
static const char *fixture_init(void) {
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = on_hup;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGHUP, &action, &previous) != 0) return "sigaction failed";
    return NULL;
}
"#;

/// A constructor (at dlopen) and init each create a pthread key with libc's
/// `free` as destructor and never delete it, as C libraries commonly do.
/// glibc has 1024 keys; if each generation leaks its two, reloads start
/// failing after about 500.
const FREE_KEYS: &str = r#"
static int constructor_failed;
__attribute__((constructor)) static void key_at_load(void) {
    pthread_key_t key;
    constructor_failed = pthread_key_create(&key, free) != 0;
}
static const char *fixture_init(void) {
    pthread_key_t key;
    if (constructor_failed) return "the constructor could not create a pthread key";
    if (pthread_key_create(&key, free) != 0) return "init could not create a pthread key";
    pthread_setspecific(key, malloc(16));
    return NULL;
}
"#;

/// Starts the server without the thread-mode preflight: what is under test
/// is the serving process's own guard, and the preflight (a child process
/// loading each new library first) would keep some of these libraries out
/// of it.
fn start(library: &std::path::Path, args: &[&str]) -> Server {
    let mut args = args.to_vec();
    args.extend(["--preflight", "off"]);
    Server::start(library, &args)
}

/// Waits until the log contains `needle`; fails at once if the server dies.
fn wait_for(server: &mut Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.count_logs(needle) == 0 {
        alive(server);
        assert!(Instant::now() < deadline, "no {needle:?}:\n{}", server.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends SIGHUP and waits for `generation` to be published.
fn reload(server: &mut Server, generation: u64) {
    server.signal(libc::SIGHUP);
    wait_for(server, &format!("generation {generation} published"));
}

fn alive(server: &mut Server) {
    assert_eq!(server.wait_exit(Duration::from_millis(1)), None, "the server died:\n{}", server.logs());
}

async fn serves(server: &Server, body: &str) {
    let reply = get(server.addr, "/").await.unwrap_or_else(|e| panic!("GET /: {e}\n{}", server.logs()));
    assert_eq!((reply.status, reply.text().as_str()), (200, body), "{}", server.logs());
}

/// Waits until generation `generation`'s unload has ended, whatever its
/// outcome (every outcome line carries these fields).
fn unload_ended(server: &mut Server, generation: u64) {
    wait_for(server, &format!("generation={generation} unload_ms="));
}

/// The pin of generation `generation` was logged; returns that log line.
fn pin_logged(server: &mut Server, generation: u64) -> String {
    let needle = format!("generation {generation} stays mapped");
    wait_for(server, &needle);
    server.logs().lines().find(|l| l.contains(&needle)).unwrap_or_default().to_owned()
}

async fn pinned_total(server: &Server) -> String {
    let scrape = get(server.addr, "/metrics").await.expect("GET /metrics").text();
    scrape.lines().find(|l| l.starts_with("pounce_pinned_generations_total")).unwrap_or("(missing)").to_owned()
}

/// Reloads twice while each generation leaves a thread running: both old
/// copies stay mapped, the server keeps serving and the pins are counted.
async fn threads_pin_their_generation(library: &std::path::Path, args: &[&str], body: &str, name: &str) {
    let mut args = args.to_vec();
    args.extend(["--metrics-path", "/metrics"]);
    let mut server = start(library, &args);
    serves(&server, body).await;

    reload(&mut server, 2);
    unload_ended(&mut server, 1);
    // The thread wakes every 100 ms in the old copy's code.
    tokio::time::sleep(Duration::from_millis(400)).await;
    alive(&mut server);
    serves(&server, body).await;
    let line = pin_logged(&mut server, 1);
    assert!(line.contains("1 thread still running") && line.contains(&format!("'{name}'")), "{line}");
    assert_eq!(server.mapped_app_copies(), 2, "the pinned copy stays mapped");

    reload(&mut server, 3);
    unload_ended(&mut server, 2);
    tokio::time::sleep(Duration::from_millis(400)).await;
    alive(&mut server);
    serves(&server, body).await;
    pin_logged(&mut server, 2);
    assert_eq!(server.mapped_app_copies(), 3);
    assert_eq!(pinned_total(&server).await, "pounce_pinned_generations_total 2");
    assert_eq!(server.count_logs("library unmapped"), 0, "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_pthread_keeps_its_generation_mapped() {
    let dir = TempDir::new("pin-pthread");
    let library = fixture(&dir, "detached", DETACHED_THREAD);
    threads_pin_their_generation(&library, &[], "fixture ok\n", "fixture-sleeper").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_std_thread_keeps_its_generation_mapped() {
    let args = ["--app-arg", "detached_thread=yes"];
    threads_pin_their_generation(&sample_app(), &args, "Hello, World!", "sample-detached").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_that_left_a_thread_stays_mapped() {
    let dir = TempDir::new("pin-failed");
    let plain = fixture(&dir, "plain", PLAIN);
    let failing = fixture(&dir, "failing", FAILING_AFTER_A_THREAD);
    let served = dir.join("libapp.so");
    replace_file(&plain, &served);
    let mut server = start(&served, &[]);
    replace_file(&failing, &served);
    server.signal(libc::SIGHUP);
    wait_for(&mut server, "init failed on purpose");
    tokio::time::sleep(Duration::from_millis(400)).await;
    alive(&mut server);
    serves(&server, "fixture ok\n").await;
    wait_for(&mut server, "generation 2 failed to load and stays mapped");
    assert!(server.logs().contains("'fixture-orphan'"), "{}", server.logs());
    assert_eq!(server.mapped_app_copies(), 2, "generation 1 and the failed copy");
    // The retry of generation 2 is a new load: it unloads on its own terms.
    replace_file(&plain, &served);
    reload(&mut server, 2);
    wait_for(&mut server, "library unmapped");
    alive(&mut server);
    serves(&server, "fixture ok\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_handler_in_the_app_keeps_reloads_working() {
    let dir = TempDir::new("pin-sighup");
    let library = fixture(&dir, "sighup", SIGHUP_HANDLER);
    let mut server = start(&library, &[]);
    serves(&server, "fixture ok\n").await;

    // Generation 1's handler gets this SIGHUP and chains to the host's.
    reload(&mut server, 2);
    assert!(server.count_logs("fixture: SIGHUP handler ran") >= 1, "{}", server.logs());
    unload_ended(&mut server, 1);

    // Generation 2's handler chains to generation 1's, which must still be
    // there, and on to the host's: the reloads keep working.
    for generation in 3..=5 {
        reload(&mut server, generation);
        serves(&server, "fixture ok\n").await;
    }
    let line = pin_logged(&mut server, 1);
    assert!(line.contains("SIGHUP"), "{line}");
    assert_eq!(server.count_logs("library unmapped"), 0, "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pthread_keys_with_free_as_destructor_never_run_out() {
    const RELOADS: usize = 1100;
    let dir = TempDir::new("pin-keys");
    let library = fixture(&dir, "keys", FREE_KEYS);
    let mut server = start(&library, &[]);
    serves(&server, "fixture ok\n").await;
    let loaded = "event=\"generation_loaded\"";
    let started = Instant::now();
    for n in 1..=RELOADS {
        server.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.count_logs(loaded) < n {
            alive(&mut server);
            if server.count_logs("reload failed") > 0 || Instant::now() > deadline {
                let failure = server.logs().lines().find(|l| l.contains("reload failed")).map(str::to_owned);
                panic!("reload {n} did not complete: {failure:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    alive(&mut server);
    serves(&server, "fixture ok\n").await;
    let pinned: Vec<String> = server.logs().lines().filter(|l| l.contains("stays mapped")).map(str::to_owned).collect();
    assert!(pinned.is_empty(), "keys are deleted, not pinning:\n{}", pinned.join("\n"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.mapped_app_copies() > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.mapped_app_copies(), 1, "old copies unmapped");
    eprintln!("{RELOADS} reloads in {:?}", started.elapsed());
}
