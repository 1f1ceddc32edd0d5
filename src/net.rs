//! Socket helpers shared by the gRPC servers.

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

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
