//! Socket helpers shared by the gRPC servers.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::server::Connected;

/// The connections a listener accepts, with TCP_NODELAY set: tonic configures no socket it did
/// not accept itself, and without it every small gRPC message waits for Nagle and the peer's
/// delayed ACK (tens of milliseconds).
pub fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

/// Bounds on a gRPC listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// How long a new connection may take to send its first [`PREFACE_LEN`] bytes (the HTTP/2
    /// preface, or a TLS ClientHello); a connection that does not is closed.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`).
pub const PREFACE_LEN: usize = 24;

/// The connections a listener accepts, with TCP_NODELAY set (see [`nodelay_incoming`]), at most
/// `limits.max_connections` at once, each closed unless it starts its handshake in time: idle
/// sockets that never speak would otherwise hold file descriptors forever. `refused` counts the
/// connections closed because the limit was reached.
pub fn bounded_incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    refused: prometheus_client::metrics::counter::Counter,
) -> impl Stream<Item = std::io::Result<Bounded<TcpStream>>> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    nodelay_incoming(listener).filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(stream) => match permits.clone().try_acquire_owned() {
            Ok(permit) => Some(Ok(Bounded {
                inner: stream,
                handshake: Some(Box::pin(tokio::time::sleep(limits.handshake_timeout))),
                received: 0,
                _permit: permit,
            })),
            Err(_) => {
                refused.inc();
                tracing::warn!(
                    peer = ?stream.peer_addr().ok(),
                    limit = limits.max_connections,
                    "connection limit reached: closing a new connection"
                );
                None
            }
        },
    })
}

/// A connection holding its place under the limit, closed with `TimedOut` if its first
/// [`PREFACE_LEN`] bytes do not arrive within the handshake timeout.
#[derive(Debug)]
pub struct Bounded<S> {
    inner: S,
    handshake: Option<Pin<Box<Sleep>>>,
    received: usize,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Bounded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = &mut this.handshake {
            this.received += buf.filled().len() - before;
            if this.received >= PREFACE_LEN {
                this.handshake = None;
            } else if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client did not start its handshake in time",
                )));
            }
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Bounded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The peer address stays visible to the services (`Request::remote_addr`).
impl<S: Connected> Connected for Bounded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
