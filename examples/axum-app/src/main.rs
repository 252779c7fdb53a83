//! The same router under plain `axum::serve`, for comparison with
//! pounce-host serving it. Listens on `AXUM_APP_ADDR` (default
//! `127.0.0.1:3000`; port 0 picks a free one) with `AXUM_APP_THREADS` tokio
//! worker threads (default 1, as the benchmark runs pounce-host), and prints
//! `listening on ADDRESS` once it does.

use std::net::SocketAddr;

use axum_app::{router, AppState};

fn main() -> std::io::Result<()> {
    let addr = std::env::var("AXUM_APP_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let threads = std::env::var("AXUM_APP_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        println!("listening on {}", listener.local_addr()?);
        let app = router(AppState::standalone("Hello"));
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
    })
}
