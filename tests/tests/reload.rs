//! Rolling reloads on SIGHUP/SIGUSR1: new code is served, in-flight work
//! finishes on the old generation, bad libraries change nothing, drained
//! generations are released.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pounce_tests::{get, replace_file, sample_app, sample_variant, Client, Server, TempDir};

/// A served library path that tests can replace, starting as `greeting`.
fn served(dir: &TempDir, greeting: &str) -> PathBuf {
    let path = dir.join("libapp.so");
    replace_file(&sample_variant(greeting), &path);
    path
}

async fn version(server: &Server) -> String {
    get(server.addr, "/version").await.expect("GET /version").text()
}

fn reload(server: &Server, signal: i32, generation: u64) {
    server.signal(signal);
    let published = format!("generation {generation} published");
    assert!(server.wait_for_log(&published, Duration::from_secs(30)), "no {published:?}:\n{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_sigusr1_serve_new_code() {
    let dir = TempDir::new("new-code");
    let library = served(&dir, "Greeting A");
    let server = Server::start(&library, &[]);
    assert_eq!(version(&server).await, "Greeting A (generation 1)\n");

    replace_file(&sample_variant("Greeting B"), &library);
    reload(&server, libc::SIGHUP, 2);
    assert_eq!(version(&server).await, "Greeting B (generation 2)\n");

    replace_file(&sample_variant("Greeting A"), &library);
    reload(&server, libc::SIGUSR1, 3);
    assert_eq!(version(&server).await, "Greeting A (generation 3)\n");
    let json = server.health().await;
    assert_eq!(json["generation"], 3);
    assert_eq!(json["last_reload"]["outcome"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_in_flight_finishes_on_the_old_generation() {
    let dir = TempDir::new("in-flight");
    let library = served(&dir, "Greeting A");
    // Built before the requests start: a build can take longer than they do.
    let greeting_b = sample_variant("Greeting B");
    let server = Server::start(&library, &[]);
    let addr = server.addr;
    let mut early = Client::connect(addr).await.unwrap();
    assert_eq!(early.get("/version").await.unwrap().text(), "Greeting A (generation 1)\n");

    let sleeper = tokio::spawn(async move { get(addr, "/sleep?ms=2000").await });
    let streamer = tokio::spawn(async move { get(addr, "/stream?chunks=5&interval_ms=300").await });
    server.wait_for_in_flight(2).await;

    replace_file(&greeting_b, &library);
    reload(&server, libc::SIGHUP, 2);
    assert_eq!(version(&server).await, "Greeting B (generation 2)\n");
    // A keep-alive connection opened before the swap gets the new code too.
    assert_eq!(early.get("/version").await.unwrap().text(), "Greeting B (generation 2)\n");
    assert_eq!(server.health().await["draining_generations"], 1);

    let slept = sleeper.await.unwrap().unwrap();
    assert_eq!((slept.status, slept.text()), (200, "slept 2000 ms (generation 1)\n".to_owned()));
    let streamed = streamer.await.unwrap().unwrap();
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.text().matches("data: chunk").count(), 5, "the stream ran to its end: {}", streamed.text());
    assert!(server.wait_for_log("generation 1 retired", Duration::from_secs(10)), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_library_keeps_the_old_generation_serving() {
    let dir = TempDir::new("bad");
    let library = served(&dir, "Greeting A");
    let server = Server::start(&library, &[]);
    let good = std::fs::read(sample_variant("Greeting B")).unwrap();
    let system = ["/lib/x86_64-linux-gnu/libm.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6", "/lib64/libm.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a system library");
    let bad: Vec<(&str, Option<Vec<u8>>)> = vec![
        ("garbage", Some(b"definitely not a shared library".to_vec())),
        ("truncated", Some(good[..good.len() / 2].to_vec())),
        ("system", Some(std::fs::read(system).unwrap())),
        ("missing", None),
    ];
    for (n, (what, bytes)) in bad.into_iter().enumerate() {
        match bytes {
            Some(bytes) => std::fs::write(&library, bytes).unwrap(),
            None => std::fs::remove_file(&library).unwrap(),
        }
        server.signal(libc::SIGHUP);
        let failed = r#"event="reload_failed""#;
        server.wait_for_log_count(failed, n + 1, Duration::from_secs(20));
        assert_eq!(server.count_logs(failed), n + 1, "{what}: failure logged:\n{}", server.logs());
        assert!(server.logs().contains("generation 1 keeps serving"), "{what}");
        assert_eq!(version(&server).await, "Greeting A (generation 1)\n", "{what}: still serving the old code");
        let json = server.health().await;
        assert_eq!(json["last_reload"]["outcome"], "failed", "{what}");
        assert!(json["last_reload"]["error"].as_str().unwrap_or("").contains("libapp.so"), "{what}: {json}");
    }
    replace_file(&sample_variant("Greeting B"), &library);
    reload(&server, libc::SIGHUP, 2);
    assert_eq!(version(&server).await, "Greeting B (generation 2)\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_timeout_cuts_what_is_still_running() {
    let server = Server::start(&sample_app(), &["--reload-timeout", "1s"]);
    let addr = server.addr;
    let started = Instant::now();
    let long = tokio::spawn(async move { get(addr, "/sleep?ms=10000").await });
    server.wait_for_in_flight(1).await;
    reload(&server, libc::SIGHUP, 2);
    let reply = long.await.unwrap().unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status, 503, "the cut request is answered, not hung");
    assert!(server.wait_for_log("sleep handler cancelled", Duration::from_secs(5)), "{}", server.logs());
    assert!(took >= Duration::from_millis(1000) && took < Duration::from_secs(5), "cut after about a second: {took:?}");
    assert!(server.wait_for_log("generation 1 retired", Duration::from_secs(5)), "{}", server.logs());
    assert!(server.logs().lines().any(|l| l.contains("generation 1 retired") && l.contains("timed_out=true")));
    assert!(server.wait_for_log("generation released, library unmapped", Duration::from_secs(5)), "{}", server.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_storm_under_load_loses_nothing() {
    let server = Server::start(&sample_app(), &[]);
    let addr = server.addr;
    let stop_at = Instant::now() + Duration::from_secs(7);
    // The storm starts once every client has had its first answer.
    let loaded = Arc::new(tokio::sync::Barrier::new(5));
    let mut clients = Vec::new();
    for n in 0..4 {
        let loaded = loaded.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut client = Client::connect(addr).await.map_err(|e| vec![e])?;
            // Bounded in count and time.
            for i in 0..200_000u64 {
                if i == 1 {
                    loaded.wait().await;
                }
                if Instant::now() > stop_at {
                    break;
                }
                // Half the clients also open a fresh connection now and then.
                let reply = if n % 2 == 1 && i % 10 == 0 { get(addr, "/").await } else { client.get("/").await };
                match reply {
                    Ok(r) if r.status == 200 && &r.body[..] == b"Hello, World!" => ok += 1,
                    Ok(r) => failed.push(format!("status {} body {:?}", r.status, r.text())),
                    Err(e) => failed.push(e),
                }
            }
            if failed.is_empty() {
                Ok(ok)
            } else {
                Err(failed)
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(10), loaded.wait()).await.expect("every client got an answer");
    // A storm of 10 SIGHUPs a second under load: the pace is what is tested.
    for _ in 0..50 {
        server.signal(libc::SIGHUP);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut total = 0;
    for client in clients {
        match client.await.unwrap() {
            Ok(ok) => total += ok,
            Err(failed) => panic!("{} failed requests, first: {:?}", failed.len(), failed.first()),
        }
    }
    assert!(total > 100, "the load really ran ({total} requests)");
    // Every reload has been published or collapsed into a later one; wait
    // for the drains to end, then exactly one generation is left.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json = server.health().await;
        let settled = json["draining_generations"] == 0 && server.mapped_app_copies() == 1;
        if settled {
            assert!(json["generation"].as_u64().unwrap() > 1, "{json}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not settle to one generation: {json}, {} copies mapped",
            server.mapped_app_copies()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_reloads_leave_one_copy_mapped() {
    let server = Server::start(&sample_app(), &[]);
    assert_eq!(server.mapped_app_copies(), 1);
    for generation in 2..=201 {
        reload(&server, libc::SIGHUP, generation);
        // Touch the new generation, so its code really runs on host threads.
        assert_eq!(get(server.addr, "/").await.unwrap().status, 200);
    }
    // Each old generation logs this once its library is unmapped.
    let unmapped = "generation released, library unmapped";
    server.wait_for_log_count(unmapped, 200, Duration::from_secs(20));
    assert_eq!(server.count_logs(unmapped), 200, "every old generation was unmapped:\n{}", server.logs());
    assert_eq!(server.mapped_app_copies(), 1, "copies still mapped after 200 reloads");
}
