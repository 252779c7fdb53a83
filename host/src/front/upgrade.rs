//! An upgraded connection (a `101` answer: a WebSocket, say): the client's
//! socket, once hyper hands it over, joined to the app's end of it.
//!
//! The session runs in the connection's own task (see `connection`), so it
//! counts as an open connection (a shutdown, or a retiring process-mode
//! worker, waits for it, bounded by its timeout, then closes it), and it
//! holds an [`UpgradedLease`] on the generation that accepted it: that
//! generation's code stays loaded while it runs, its drain waits for it,
//! and its retirement at `reload_timeout` cuts it.
//!
//! Bytes go both ways as they come, each way with backpressure (a side
//! that does not read stops the other from sending). The client ending its
//! side tells the app (it reads the end); the app ending its side (closing
//! or dropping its end) ends the connection, as a server closing an
//! upgraded socket would.

use std::future::pending;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::ffi::Upgrade;
use crate::generations::UpgradedLease;

/// Waits for hyper to hand the socket over, then joins it to the app's end
/// until one of them ends or the generation is retired.
pub async fn session(upgrade: Upgrade, lease: UpgradedLease) {
    let Upgrade { on_upgrade, io } = upgrade;
    let generation = lease.generation.number();
    let client = match on_upgrade.await {
        Ok(upgraded) => TokioIo::new(upgraded),
        Err(e) => {
            tracing::debug!(generation, "the upgrade did not happen: {e}");
            return;
        }
    };
    tokio::select! {
        () = join(client, io) => {}
        () = lease.generation.cancelled() => {
            tracing::debug!(generation, "upgraded connection cut: its generation was retired");
        }
    }
}

/// Copies both ways until the app's side ends (or either side fails).
async fn join(client: impl AsyncRead + AsyncWrite, app: impl AsyncRead + AsyncWrite) {
    let (mut from_client, mut to_client) = tokio::io::split(client);
    let (mut from_app, mut to_app) = tokio::io::split(app);
    let app_to_client = async {
        if tokio::io::copy(&mut from_app, &mut to_client).await.is_ok() {
            let _ = to_client.shutdown().await;
        }
    };
    let client_to_app = async {
        if tokio::io::copy(&mut from_client, &mut to_app).await.is_ok() {
            // The client sent all it will: the app reads the end, and the
            // connection lives on until the app ends its side.
            let _ = to_app.shutdown().await;
            pending::<()>().await;
        }
    };
    tokio::select! {
        () = app_to_client => {}
        () = client_to_app => {}
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::join;

    async fn read_some(from: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
        let mut buf = [0; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), from.read(&mut buf)).await.expect("bytes").unwrap();
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn bytes_go_both_ways_until_the_app_ends_its_side() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (app, mut app_peer) = tokio::io::duplex(64);
        let session = tokio::spawn(join(client, app));
        client_peer.write_all(b"ping").await.unwrap();
        assert_eq!(read_some(&mut app_peer).await, b"ping");
        app_peer.write_all(b"pong").await.unwrap();
        assert_eq!(read_some(&mut client_peer).await, b"pong");
        // The client is done sending: the app reads the end and may still answer.
        client_peer.shutdown().await.unwrap();
        assert_eq!(read_some(&mut app_peer).await, b"");
        app_peer.write_all(b"bye").await.unwrap();
        assert_eq!(read_some(&mut client_peer).await, b"bye");
        assert!(!session.is_finished());
        // The app ends its side: the connection ends.
        drop(app_peer);
        assert_eq!(read_some(&mut client_peer).await, b"");
        tokio::time::timeout(Duration::from_secs(5), session).await.expect("the session ends").unwrap();
    }

    #[tokio::test]
    async fn the_app_closing_ends_the_session_even_if_the_client_stays() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (app, app_peer) = tokio::io::duplex(64);
        let session = tokio::spawn(join(client, app));
        drop(app_peer);
        tokio::time::timeout(Duration::from_secs(5), session).await.expect("the session ends").unwrap();
        assert_eq!(read_some(&mut client_peer).await, b"");
    }
}
