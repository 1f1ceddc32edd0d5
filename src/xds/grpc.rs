//! gRPC's length-prefixed messages over HTTP/2 bodies, as the relay sends and receives them.
//!
//! The relay frames its own messages instead of going through tonic's codec, for memory and
//! for copies. tonic's `Streaming` keeps, per stream, a receive buffer as large as the largest
//! message it has read, and its encoder a send buffer as large as the largest response: at
//! 10,000 services that is megabytes per direction and per stream, for every replica of the
//! global-sidecar, and both sides of the relay have it. Here a received message is a [`Bytes`]
//! that is a slice of the HTTP/2 frame it came in when it fits in one, and one allocation of
//! exactly its size otherwise; a sent message is one allocation of exactly its size, or its
//! header and first fields in one and a shared encoding after them ([`Framed`]), freed once
//! written. Nothing is kept between messages but a partly received one.
//!
//! The wire format (gRPC over HTTP/2): each message is a 1-byte compression flag, a 4-byte
//! big-endian length and the message; a call ends with trailers carrying `grpc-status`, or
//! with headers carrying it when the call fails before any message (a "trailers-only" answer).

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::Stream;
use hyper::body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

/// The compression flag and the length before each message.
const HEADER: usize = 5;

/// A message framed for the wire: header and `message`, in one allocation of exactly their size.
pub fn frame(message: &impl prost::Message) -> Bytes {
    frame_with(message.encoded_len(), |buf| message.encode_raw(buf))
}

/// A message of `len` bytes that `write` writes, framed for the wire in one allocation.
pub fn frame_with(len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    header_then(len, len, write)
}

/// The header of a message of `len` bytes, then the `written` bytes `write` writes.
fn header_then(len: usize, written: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER + written);
    buf.put_u8(0);
    // Messages are bounded far below 4 GiB (`MAX_MESSAGE`).
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    write(&mut buf);
    debug_assert_eq!(buf.len(), HEADER + written, "write what was announced");
    buf.freeze()
}

/// A message framed for the wire: the header and the message's first bytes, then maybe a
/// shared remainder sent after them as it is (never copied into the frame).
#[derive(Clone, Debug)]
pub struct Framed {
    first: Bytes,
    rest: Option<Bytes>,
}

impl From<Bytes> for Framed {
    fn from(first: Bytes) -> Self {
        Self { first, rest: None }
    }
}

/// A message made of `first` (copied into the frame) and `rest` (shared), framed.
pub fn frame_parts(first: &[u8], rest: Bytes) -> Framed {
    let first = header_then(first.len() + rest.len(), first.len(), |buf| buf.put_slice(first));
    Framed {
        first,
        rest: (!rest.is_empty()).then_some(rest),
    }
}

/// The messages of an HTTP/2 body, one at a time.
pub struct Messages {
    body: Body,
    received: Chunks,
    /// The largest message accepted.
    limit: usize,
    /// Whether the peer sends trailers whose `grpc-status` ends the call (a response).
    response: bool,
    /// How the call ended, once its body did.
    ended: Option<Result<(), Status>>,
}

impl Messages {
    /// The messages of a request body (it ends without trailers).
    pub fn request(body: Body, limit: usize) -> Self {
        Self::new(body, limit, false)
    }

    /// The messages of a response body (its trailers say how the call ended).
    pub fn response(body: Body, limit: usize) -> Self {
        Self::new(body, limit, true)
    }

    fn new(body: Body, limit: usize, response: bool) -> Self {
        Self {
            body,
            received: Chunks::default(),
            limit,
            response,
            ended: None,
        }
    }

    /// The next message; `None` when the call ended well. A message over the limit is
    /// `OutOfRange` and a compressed one `Unimplemented` (as tonic reports them); a body that
    /// ends within a message is `Internal`; a failed call is its status.
    pub async fn message(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            // Every whole message received is taken before the body is read again, so when it
            // ends only part of one can be left.
            if let Some(message) = self.take()? {
                return Ok(Some(message));
            }
            if let Some(end) = &self.ended {
                return match self.received.len() {
                    0 => end.clone().map(|()| None),
                    n => Err(Status::internal(format!(
                        "the stream ended within a message ({n} bytes of it received)"
                    ))),
                };
            }
            self.ended = match std::future::poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.received.push(data);
                        None
                    }
                    Err(frame) => match frame.trailers_ref() {
                        Some(trailers) if self.response => Some(ended_with(trailers)),
                        _ => Some(Ok(())),
                    },
                },
                Some(Err(status)) => return Err(status),
                None if self.response => {
                    Some(Err(Status::unknown("the response ended without a grpc-status")))
                }
                None => Some(Ok(())),
            };
        }
    }

    /// A whole message, if one has been received.
    fn take(&mut self) -> Result<Option<Bytes>, Status> {
        let Some(header) = self.received.peek_header() else {
            return Ok(None);
        };
        let (compressed, len) = header;
        if compressed != 0 {
            return Err(Status::unimplemented(
                "a compressed message: the relay does not negotiate compression",
            ));
        }
        if len > self.limit {
            return Err(Status::out_of_range(format!(
                "a message of {len} bytes, over the limit of {} bytes",
                self.limit
            )));
        }
        if self.received.len() < HEADER + len {
            return Ok(None);
        }
        self.received.advance(HEADER);
        Ok(Some(self.received.copy_to_bytes(len)))
    }
}

/// The status of a call from its trailers (or its trailers-only headers): `Ok` when it ended
/// well, the status otherwise.
fn ended_with(trailers: &http::HeaderMap) -> Result<(), Status> {
    match Status::from_header_map(trailers) {
        Some(status) if status.code() != tonic::Code::Ok => Err(status),
        Some(_) => Ok(()),
        None => Err(Status::unknown("the response ended without a grpc-status")),
    }
}

/// Received bytes not yet taken, as the frames they came in.
#[derive(Default)]
struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.chunks.push_back(data);
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The compression flag and length of the next message, once its header is here.
    fn peek_header(&self) -> Option<(u8, usize)> {
        if self.len < HEADER {
            return None;
        }
        let mut header = [0u8; HEADER];
        let mut at = 0;
        for chunk in &self.chunks {
            let n = chunk.len().min(HEADER - at);
            header[at..at + n].copy_from_slice(&chunk[..n]);
            at += n;
            if at == HEADER {
                break;
            }
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        Some((header[0], len as usize))
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the received bytes");
        self.len -= cnt;
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    /// A slice of the frame when the message lies within one; else one exact copy.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(len <= self.len, "take past the received bytes");
        if let Some(front) = self.chunks.front_mut()
            && front.len() >= len
        {
            let out = front.split_to(len);
            if front.is_empty() {
                self.chunks.pop_front();
            }
            self.len -= len;
            return out;
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// Framed messages sent as an HTTP/2 body. A server's body ends with trailers carrying the
/// call's status: `Ok` when the messages end, or the status the stream yields.
pub struct Outgoing<S> {
    messages: S,
    /// The rest of the message being sent.
    rest: Option<Bytes>,
    trailers: bool,
    done: bool,
}

impl<S> Outgoing<S> {
    /// A response body: trailers at the end.
    pub fn response(messages: S) -> Self {
        Self {
            messages,
            rest: None,
            trailers: true,
            done: false,
        }
    }

    /// A request body: it just ends.
    pub fn request(messages: S) -> Self {
        Self {
            messages,
            rest: None,
            trailers: false,
            done: false,
        }
    }
}

impl<S, M> HttpBody for Outgoing<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: Into<Framed>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(rest) = self.rest.take() {
            return Poll::Ready(Some(Ok(Frame::data(rest))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let end = match std::task::ready!(Pin::new(&mut self.messages).poll_next(cx)) {
            Some(Ok(message)) => {
                let Framed { first, rest } = message.into();
                self.rest = rest;
                return Poll::Ready(Some(Ok(Frame::data(first))));
            }
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        if !self.trailers {
            return Poll::Ready(None);
        }
        let mut trailers = http::HeaderMap::new();
        // A status whose message cannot be a header value still carries its code.
        if end.add_header(&mut trailers).is_err() {
            let _ = Status::new(end.code(), "").add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.rest.is_none()
    }
}

/// The HTTP response of a gRPC call whose messages `body` sends.
pub fn response<B>(body: B) -> http::Response<Body>
where
    B: HttpBody<Data = Bytes, Error = Status> + Send + 'static,
{
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// Calls the streaming method `path` on `channel`: the request carries `metadata` and sends
/// what `body` yields; the answer's messages are read with the `limit`. Fails with the call's
/// status when the server refuses it at once (trailers-only) or answers with an HTTP error.
pub async fn call<B>(
    channel: &mut Channel,
    path: &'static str,
    metadata: MetadataMap,
    body: B,
    limit: usize,
) -> Result<Messages, Status>
where
    B: HttpBody<Data = Bytes, Error = Status> + Send + 'static,
{
    let mut request = http::Request::new(Body::new(body));
    *request.uri_mut() = http::Uri::from_static(path);
    *request.method_mut() = http::Method::POST;
    *request.headers_mut() = metadata.into_headers();
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    let response = channel
        .call(request)
        .await
        .map_err(|e| Status::from_error(e.into()))?;
    if response.status() != http::StatusCode::OK {
        return Err(http_status(response.status()));
    }
    if response.headers().contains_key("grpc-status") {
        ended_with(response.headers())?;
    }
    Ok(Messages::response(response.into_body(), limit))
}

/// The gRPC status of an HTTP error answer, as gRPC's HTTP mapping gives it.
fn http_status(status: http::StatusCode) -> Status {
    use tonic::Code;
    let code = match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502..=504 => Code::Unavailable,
        _ => Code::Unknown,
    };
    Status::new(code, format!("the server answered HTTP {status}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A body that yields `frames`, then `trailers` (if any).
    fn body(frames: Vec<Bytes>, trailers: Option<http::HeaderMap>) -> Body {
        let frames = frames
            .into_iter()
            .map(|f| Ok::<_, Status>(Frame::data(f)))
            .chain(trailers.map(|t| Ok(Frame::trailers(t))));
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    fn ok_trailers() -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        Status::ok("").add_header(&mut t).unwrap();
        t
    }

    fn wire(messages: &[Vec<u8>]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| frame_with(m.len(), |b| b.put_slice(m)).to_vec())
            .collect()
    }

    async fn read_all(mut messages: Messages) -> Result<Vec<Vec<u8>>, Status> {
        let mut out = Vec::new();
        while let Some(m) = messages.message().await? {
            out.push(m.to_vec());
        }
        Ok(out)
    }

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    proptest! {
        /// However the bytes are cut into frames, the same messages come out.
        #[test]
        fn messages_survive_any_framing(
            messages in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 0..40),
        ) {
            let bytes = wire(&messages);
            let mut frames = Vec::new();
            let mut at = 0;
            for cut in cuts.iter().cycle().take(bytes.len()) {
                if at >= bytes.len() {
                    break;
                }
                let end = (at + cut).min(bytes.len());
                frames.push(Bytes::copy_from_slice(&bytes[at..end]));
                at = end;
            }
            if at < bytes.len() {
                frames.push(Bytes::copy_from_slice(&bytes[at..]));
            }
            let got = block_on(read_all(Messages::response(body(frames, Some(ok_trailers())), 1 << 20)));
            prop_assert_eq!(got.unwrap(), messages);
        }

        /// Garbage never panics: it is messages, or an error.
        #[test]
        fn garbage_never_panics(frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..50), 0..6)) {
            let frames = frames.into_iter().map(Bytes::from).collect();
            let _ = block_on(read_all(Messages::request(body(frames, None), 100)));
        }
    }

    #[test]
    fn a_message_in_one_frame_is_a_slice_of_it() {
        let bytes = Bytes::from(wire(&[b"hello".to_vec(), b"world".to_vec()]));
        let frame_start = bytes.as_ptr() as usize;
        let mut messages = Messages::request(body(vec![bytes], None), 100);
        let first = block_on(messages.message()).unwrap().unwrap();
        assert_eq!(&first[..], b"hello");
        assert_eq!(first.as_ptr() as usize, frame_start + HEADER, "not copied");
    }

    #[test]
    fn how_calls_end() {
        let status = |code: tonic::Code| {
            let mut t = http::HeaderMap::new();
            Status::new(code, "why").add_header(&mut t).unwrap();
            t
        };
        let one = Bytes::from(wire(&[b"m".to_vec()]));
        let table: Vec<(&str, Messages, Result<usize, tonic::Code>)> = vec![
            (
                "a request ends with its body",
                Messages::request(body(vec![one.clone()], None), 100),
                Ok(1),
            ),
            (
                "a response ends with grpc-status 0",
                Messages::response(body(vec![one.clone()], Some(ok_trailers())), 100),
                Ok(1),
            ),
            (
                "a response's error status is the call's",
                Messages::response(
                    body(vec![one.clone()], Some(status(tonic::Code::Unavailable))),
                    100,
                ),
                Err(tonic::Code::Unavailable),
            ),
            (
                "a response without grpc-status failed",
                Messages::response(body(vec![one.clone()], None), 100),
                Err(tonic::Code::Unknown),
            ),
            (
                "a message over the limit",
                Messages::request(body(vec![one.clone()], None), 0),
                Err(tonic::Code::OutOfRange),
            ),
            (
                "a body cut within a message",
                Messages::request(body(vec![one.slice(..4)], None), 100),
                Err(tonic::Code::Internal),
            ),
            (
                "a compressed message",
                Messages::request(body(vec![Bytes::from_static(&[1, 0, 0, 0, 0])], None), 100),
                Err(tonic::Code::Unimplemented),
            ),
        ];
        let mut failures = Vec::new();
        for (case, messages, want) in table {
            let got = block_on(read_all(messages))
                .map(|m| m.len())
                .map_err(|s| s.code());
            if got != want {
                failures.push(format!("{case}: got {got:?}, want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn a_response_body_ends_with_the_status_in_trailers() {
        let run = |items: Vec<Result<Bytes, Status>>| {
            let body = Outgoing::response(futures::stream::iter(items));
            block_on(async {
                let collected = http_body_util::BodyExt::collect(body).await.unwrap();
                let trailers = collected.trailers().cloned();
                (collected.to_bytes(), trailers)
            })
        };
        let (data, trailers) = run(vec![Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"c"))]);
        assert_eq!(&data[..], b"abc");
        let parts = frame_parts(b"head", Bytes::from_static(b"-rest"));
        let whole = frame_with(9, |b| b.put_slice(b"head-rest"));
        let body = Outgoing::response(futures::stream::iter([Ok::<_, Status>(parts)]));
        let sent = block_on(http_body_util::BodyExt::collect(body))
            .unwrap()
            .to_bytes();
        assert_eq!(sent, whole, "a message in parts is the same message");
        assert_eq!(
            Status::from_header_map(&trailers.unwrap()).unwrap().code(),
            tonic::Code::Ok
        );
        let (_, trailers) = run(vec![Err(Status::unavailable("istiod went away"))]);
        let status = Status::from_header_map(&trailers.unwrap()).unwrap();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::Unavailable, "istiod went away")
        );
    }
}
