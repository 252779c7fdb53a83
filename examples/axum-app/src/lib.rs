//! An ordinary axum app, served by pounce-host: build it with
//! `cargo build -p axum-app` and serve `target/debug/libaxum_app.so`. The
//! same router also runs under plain `axum::serve` (`src/main.rs`), for
//! comparison. What is pounce-specific is only [`app`] and the
//! `export_service!` line at the end; everything else is plain axum.
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | `Hello, World!` |
//! | `GET /info` | JSON: app, greeting (`--app-arg greeting=...`), generation |
//! | `POST /echo` | JSON: the JSON body back, under `echo` |
//! | `POST /count` | how many bytes the body had |
//! | `GET /peer` | the client's address (`ConnectInfo`) |
//! | `GET /headers` | JSON: the request's headers, name to values |
//! | `GET /sse?events=N&interval_ms=M` | N server-sent events, one every M ms |
//! | `GET /ws` | WebSocket echo; the text `generation` is answered with the generation; when the generation drains, the server closes with 1001 |
//!
//! Settings (`--app-arg KEY=VALUE`): `greeting`; `close_delay_ms`, how long
//! a WebSocket keeps echoing once its generation drains before it says
//! goodbye (default 0).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use app_abi::{DrainSignal, InitContext, InitError};
use axum::body::Bytes;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::response::sse::{Event, Sse};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::{Deserialize, Serialize};

/// What every handler shares: built once per generation from the settings.
#[derive(Clone)]
pub struct AppState {
    greeting: Arc<str>,
    generation: u64,
    /// Fires when pounce-host drains this generation (never under `axum::serve`).
    drain: Option<DrainSignal>,
    /// How long a WebSocket keeps echoing after the drain before its Close.
    close_delay: Duration,
}

impl AppState {
    /// State for the plain `axum::serve` binary: no generations, no drains.
    pub fn standalone(greeting: &str) -> AppState {
        AppState { greeting: greeting.into(), generation: 0, drain: None, close_delay: Duration::ZERO }
    }

    /// Completes `close_delay` after the generation started draining.
    async fn time_to_close(&self) {
        match &self.drain {
            Some(drain) => drain.drained().await,
            None => std::future::pending().await,
        }
        tokio::time::sleep(self.close_delay).await;
    }
}

/// The app's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { "Hello, World!" }))
        .route("/info", get(info))
        .route("/echo", post(echo))
        .route("/count", post(count))
        .route("/peer", get(peer))
        .route("/headers", get(headers))
        .route("/sse", get(sse))
        .route("/ws", get(ws))
        .with_state(state)
}

/// What pounce-host calls once per generation: the state from the settings,
/// and the router.
pub fn app(ctx: &InitContext) -> Result<Router, InitError> {
    let close_delay = match ctx.setting("close_delay_ms") {
        Some(ms) => ms.parse().map_err(|_| format!("close_delay_ms={ms:?} is not a number of milliseconds"))?,
        None => 0,
    };
    let state = AppState {
        greeting: ctx.setting("greeting").unwrap_or("Hello").into(),
        generation: ctx.generation(),
        drain: Some(ctx.drain_signal()),
        close_delay: Duration::from_millis(close_delay),
    };
    Ok(router(state))
}

app_abi::export_service!(app);

#[derive(Serialize)]
struct Info {
    app: &'static str,
    greeting: String,
    generation: u64,
}

async fn info(State(state): State<AppState>) -> Json<Info> {
    Json(Info { app: env!("CARGO_PKG_NAME"), greeting: state.greeting.to_string(), generation: state.generation })
}

async fn echo(Json(body): Json<serde_json::Value>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "echo": body }))
}

async fn count(body: Bytes) -> String {
    format!("{} bytes\n", body.len())
}

async fn peer(ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    peer.to_string()
}

async fn headers(headers: axum::http::HeaderMap) -> Json<serde_json::Value> {
    let mut all = serde_json::Map::new();
    for name in headers.keys() {
        let values = headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        all.insert(name.to_string(), values.collect::<Vec<_>>().into());
    }
    Json(all.into())
}

#[derive(Deserialize)]
struct SseParams {
    events: Option<u32>,
    interval_ms: Option<u64>,
}

async fn sse(Query(params): Query<SseParams>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = params.events.unwrap_or(3).min(1000);
    let interval = Duration::from_millis(params.interval_ms.unwrap_or(100).min(10_000));
    let stream = futures_util::stream::unfold(0, move |sent| async move {
        if sent == events {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(interval).await;
        }
        let event = Event::default().event("tick").data(format!("event {} of {events}", sent + 1));
        Some((Ok(event), sent + 1))
    });
    Sse::new(stream)
}

async fn ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(move |socket| echo_socket(socket, state))
}

/// Echoes every message; when the generation drains, says goodbye (Close
/// 1001) and ends when the client answers the Close.
async fn echo_socket(mut socket: WebSocket, state: AppState) {
    let time_to_close = state.time_to_close();
    tokio::pin!(time_to_close);
    let mut closing = false;
    loop {
        tokio::select! {
            received = socket.recv() => {
                let reply = match received {
                    Some(Ok(Message::Text(text))) if text.as_str() == "generation" => {
                        Message::Text(format!("generation {}", state.generation).into())
                    }
                    Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => message,
                    // Reading on after a Close sends the answer to it, then ends.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
                    Some(Err(_)) | None => return,
                };
                if socket.send(reply).await.is_err() {
                    return;
                }
            }
            () = &mut time_to_close, if !closing => {
                closing = true;
                let goodbye = CloseFrame { code: close_code::AWAY, reason: "going away".into() };
                if socket.send(Message::Close(Some(goodbye))).await.is_err() {
                    return;
                }
            }
        }
    }
}
