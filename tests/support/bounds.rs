//! The connection bounds every gRPC port of lazyload shares (`net::bounded_incoming`), probed
//! from outside: over the limit a connection is closed at once, a silent one after the handshake
//! timeout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;

/// Opens `limit + 1` silent connections to `addr` (whose limit is `limit` and handshake timeout
/// at least 300 ms): checks that the last is closed at once and the others only after the
/// timeout, then closes them all so the places are free again.
pub async fn check_limit_and_handshake_timeout(addr: SocketAddr, limit: usize) {
    let mut idle = Vec::new();
    for _ in 0..=limit {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut buf = [0u8; 64];
    let over = tokio::time::timeout(Duration::from_secs(2), idle[limit].read(&mut buf)).await;
    assert!(matches!(over, Ok(Ok(0) | Err(_))), "over the limit: {over:?}");
    let started = Instant::now();
    // The server's SETTINGS frame may come before the close.
    for conn in &mut idle[..limit] {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
                .await
                .expect("an idle connection closed in time")
            {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before the handshake timeout: {:?}",
        started.elapsed()
    );
}
