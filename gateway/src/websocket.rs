//! The websocket under a session: the HTTP upgrade (RFC 6455 §4.2) and
//! [`ClientStream`], the accepted socket as tungstenite sees it, with a
//! side door for the fan-out's write-through.
//!
//! Our own upgrade rather than axum's `WebSocketUpgrade` so that the
//! session's websocket sits on the accepted socket itself. axum's sits on
//! hyper's type-erased `Upgraded` (a boxed rewind buffer under two adapter
//! layers), which every write crosses, and hides the socket. Owning it lets
//! the fan-out write a publish frame the way the floor probe does: one
//! `send` of the frame header and the delivery's two shared halves, with
//! no copy into tungstenite's write buffer ([`ClientStream::write_frame`]),
//! and the session write what queued for it with one `sendmsg`
//! ([`ClientStream::write_frames`]).
//!
//! Ordering: bytes a write-through could not send at once stay in the
//! stream's `tail`, and every write tungstenite makes goes through
//! [`ClientStream`]'s `AsyncWrite`, which sends the tail first. The caller
//! (the `OutboundQueue`) only writes through while tungstenite's own buffer
//! is empty (after a completed flush, before the next write or ping read).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tracing::warn;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::linger::ServedStream;

/// A session's websocket.
pub type Socket = WebSocketStream<ClientStream>;

/// An accepted connection after the upgrade.
#[derive(Debug)]
pub struct ClientStream {
    /// The accepted socket.
    inner: ServedStream,
    /// What a write-through could not send at once; sent before anything
    /// else. Empty (no allocation) but for a socket that filled up.
    tail: Vec<u8>,
}

/// Frames [`ClientStream::write_frames`] sends at most at once (three
/// slices each, well under Linux's `IOV_MAX` of 1 024).
pub const FRAMES_PER_SEND: usize = 64;

/// Frames up to this size (header included) are copied into one buffer
/// for their write-through; ordinary publish frames are a few hundred bytes.
const SMALL_FRAME: usize = 512;

/// What [`ClientStream::write_frames`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramesSent {
    /// Frames the socket took whole, the first ones given.
    pub whole: usize,
    /// The socket also took part of the next frame: the rest is kept, and
    /// the next flush must send it.
    pub partly: bool,
}

/// What [`ClientStream::write_frame`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The socket took the whole frame.
    Whole,
    /// Only part of it (or the socket failed): the rest is kept, and the
    /// next flush must send it (or report the failure).
    Partly,
    /// The socket is full, or bytes are still waiting: nothing was taken.
    NotTaken,
}

impl ClientStream {
    /// Wraps the accepted stream.
    pub fn new(inner: ServedStream) -> ClientStream {
        ClientStream { inner, tail: Vec::new() }
    }

    /// Writes one unmasked, unfragmented text frame whose payload is
    /// `head` then `rest`, without waiting: one `send`, made outside
    /// tokio's cooperative budget. Only while tungstenite has nothing
    /// buffered (see the module comment).
    pub fn write_frame(&mut self, head: &[u8], rest: &[u8]) -> Written {
        if !self.tail.is_empty() {
            return Written::NotTaken;
        }
        let mut header = [0u8; 10];
        let header = text_frame_header(head.len() + rest.len(), &mut header);
        let parts = [header, head, rest];
        let total = header.len() + head.len() + rest.len();
        // A small frame is copied into one buffer and sent as the floor
        // probe sends (`send` of one buffer costs the kernel less than
        // `sendmsg` of three); a large one is sent from where it lies.
        let mut joined = [0u8; SMALL_FRAME];
        let sent = if total <= SMALL_FRAME {
            let mut at = 0;
            for part in parts {
                joined[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            self.inner.try_send(&joined[..total])
        } else {
            self.inner.try_send_vectored(&parts.map(IoSlice::new))
        };
        match sent {
            Ok(n) if n >= total => Written::Whole,
            Ok(n) => {
                self.keep_from(&parts, n);
                Written::Partly
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Written::NotTaken,
            // Kept whole: the session's flush writes it again and meets the
            // error itself.
            Err(_) => {
                self.keep_from(&parts, 0);
                Written::Partly
            }
        }
    }

    /// Writes up to [`FRAMES_PER_SEND`] frames as [`ClientStream::write_frame`]
    /// does one, with one `sendmsg` for all: the session's way to write what
    /// queued for it, with no copy and one system call. Says how many frames
    /// the socket took whole, and whether it took part of the next one (whose
    /// rest is kept for the next flush, as a write-through's). Takes nothing
    /// when the socket is full or fails (the caller's polled write then waits
    /// or meets the error).
    pub fn write_frames<'a>(&mut self, frames: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> FramesSent {
        let nothing = FramesSent { whole: 0, partly: false };
        if !self.tail.is_empty() {
            return nothing;
        }
        let mut headers = [[0u8; 10]; FRAMES_PER_SEND];
        let mut lens = [0usize; FRAMES_PER_SEND];
        let mut bodies: [(&[u8], &[u8]); FRAMES_PER_SEND] = [(&[], &[]); FRAMES_PER_SEND];
        let mut count = 0;
        for (frame, (head, rest)) in frames.take(FRAMES_PER_SEND).enumerate() {
            lens[frame] = text_frame_header(head.len() + rest.len(), &mut headers[frame]).len();
            bodies[frame] = (head, rest);
            count = frame + 1;
        }
        let mut slices = [IoSlice::new(&[]); 3 * FRAMES_PER_SEND];
        for frame in 0..count {
            slices[3 * frame] = IoSlice::new(&headers[frame][..lens[frame]]);
            slices[3 * frame + 1] = IoSlice::new(bodies[frame].0);
            slices[3 * frame + 2] = IoSlice::new(bodies[frame].1);
        }
        let Ok(mut sent) = self.inner.try_send_vectored(&slices[..3 * count]) else { return nothing };
        for frame in 0..count {
            let parts = [&headers[frame][..lens[frame]], bodies[frame].0, bodies[frame].1];
            let len: usize = parts.iter().map(|p| p.len()).sum();
            if sent < len {
                if sent > 0 {
                    self.keep_from(&parts, sent);
                }
                return FramesSent { whole: frame, partly: sent > 0 };
            }
            sent -= len;
        }
        FramesSent { whole: count, partly: false }
    }

    /// Keeps what follows the first `sent` bytes of `parts`.
    fn keep_from(&mut self, parts: &[&[u8]], mut sent: usize) {
        for part in parts {
            let skip = sent.min(part.len());
            self.tail.extend_from_slice(&part[skip..]);
            sent -= skip;
        }
    }

    /// Sends the tail; ready once it is gone.
    fn poll_tail(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tail.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.tail))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tail.drain(..n);
        }
        if self.tail.capacity() > 0 {
            // Rare (a socket that filled up): give the memory back.
            self.tail = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

/// The header of a server's (unmasked) final text frame of `len` bytes
/// (RFC 6455 §5.2), written into `buf`.
fn text_frame_header(len: usize, buf: &mut [u8; 10]) -> &[u8] {
    const FIN_TEXT: u8 = 0x81;
    buf[0] = FIN_TEXT;
    if len < 126 {
        // Fits in 7 bits by the test above.
        buf[1] = len as u8;
        &buf[..2]
    } else if let Ok(short) = u16::try_from(len) {
        buf[1] = 126;
        buf[2..4].copy_from_slice(&short.to_be_bytes());
        &buf[..4]
    } else {
        buf[1] = 127;
        buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        &buf[..10]
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_tail(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A websocket upgrade request, checked as RFC 6455 §4.2.1 asks (the
/// checks and answers of axum's `WebSocketUpgrade`).
#[derive(Debug)]
pub struct Upgrade {
    /// `Sec-WebSocket-Key`, signed into the answer.
    key: HeaderValue,
    /// hyper's handle on the connection once the 101 is sent.
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request cannot be upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefused {
    /// Not a GET.
    #[error("Request method must be `GET`")]
    NotGet,
    /// `Connection` lacks `upgrade`.
    #[error("Connection header did not include 'upgrade'")]
    NoConnectionUpgrade,
    /// `Upgrade` is not `websocket`.
    #[error("`Upgrade` header did not include 'websocket'")]
    NotWebsocket,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("`Sec-WebSocket-Version` header did not include '13'")]
    BadVersion,
    /// No `Sec-WebSocket-Key`.
    #[error("`Sec-WebSocket-Key` header missing")]
    NoKey,
    /// hyper cannot hand this connection over.
    #[error("WebSocket request couldn't be upgraded since no upgrade state was present")]
    NotUpgradable,
}

impl IntoResponse for UpgradeRefused {
    fn into_response(self) -> Response {
        let status = match self {
            UpgradeRefused::NotGet => StatusCode::METHOD_NOT_ALLOWED,
            UpgradeRefused::NotUpgradable => StatusCode::UPGRADE_REQUIRED,
            _ => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string()).into_response()
    }
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers.get(name).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get(name).is_some_and(|v| {
        v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRefused;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(UpgradeRefused::NotGet);
        }
        if !header_has(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeRefused::NoConnectionUpgrade);
        }
        if !header_is(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeRefused::NotWebsocket);
        }
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(UpgradeRefused::BadVersion);
        }
        let key = parts.headers.get(header::SEC_WEBSOCKET_KEY).ok_or(UpgradeRefused::NoKey)?.clone();
        let on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>().ok_or(UpgradeRefused::NotUpgradable)?;
        Ok(Upgrade { key, on_upgrade })
    }
}

impl Upgrade {
    /// Answers 101 and, once hyper hands the connection over, gives
    /// `start` the websocket (in a task of its own, which ends there).
    pub fn accept(self, config: WebSocketConfig, start: impl FnOnce(Socket) + Send + 'static) -> Response {
        let Upgrade { key, on_upgrade } = self;
        tokio::spawn(async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    warn!(error = %e, "websocket upgrade failed");
                    return;
                }
            };
            // The listener serves every connection as `TokioIo<ServedStream>`.
            let Ok(parts) = upgraded.downcast::<TokioIo<ServedStream>>() else {
                warn!("websocket upgrade failed: the connection is not an accepted stream");
                return;
            };
            // Bytes the client sent after its request (its first frames).
            let read = parts.read_buf.to_vec();
            let stream = ClientStream::new(parts.io.into_inner());
            start(WebSocketStream::from_partially_read(stream, read, Role::Server, Some(config)).await);
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        (
            StatusCode::SWITCHING_PROTOCOLS,
            [
                (header::CONNECTION, HeaderValue::from_static("upgrade")),
                (header::UPGRADE, HeaderValue::from_static("websocket")),
            ],
            [(header::SEC_WEBSOCKET_ACCEPT, accept)],
        )
            .into_response()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real loopback pair: our side with a small send buffer, and the
    /// peer (with a small receive buffer), which does not read until told.
    pub(crate) async fn pair() -> (ClientStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = tokio::net::TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        socket2::SockRef::from(&ours).set_send_buffer_size(4096).expect("SO_SNDBUF");
        socket2::SockRef::from(&peer).set_recv_buffer_size(4096).expect("SO_RCVBUF");
        (ClientStream::new(ServedStream::new(ours, crate::linger::Lingering::new(1))), peer)
    }

    #[tokio::test]
    async fn frames_sent_together_come_whole_and_in_order_before_any_later_write() {
        let (mut ours, peer) = pair().await;
        let payloads: Vec<Vec<u8>> = (0..1000u32).map(|n| format!("{n:04}").repeat(200).into_bytes()).collect();
        let mut taken = 0;
        let mut calls = 0;
        // Batches until the socket takes part of one (the peer reads nothing).
        loop {
            let sent = ours.write_frames(payloads[taken..].iter().map(|p| (&p[..400], &p[400..])));
            calls += 1;
            assert!(sent.whole <= FRAMES_PER_SEND);
            taken += sent.whole + usize::from(sent.partly);
            if sent.partly || sent.whole < FRAMES_PER_SEND {
                break;
            }
        }
        assert!(calls < 1000 / FRAMES_PER_SEND, "a 4 KiB send buffer fills before 1 000 frames of 800 B");
        let last = ours.write_frames(payloads[taken..].iter().map(|p| (&p[..], &[][..])));
        assert_eq!(last, FramesSent { whole: 0, partly: false }, "nothing overtakes the tail or a full socket");
        frames_then_a_later_write(ours, peer, payloads[..taken].iter().map(|p| &p[..])).await;
    }

    #[tokio::test]
    async fn what_a_write_through_leaves_goes_before_any_later_write() {
        let (mut ours, peer) = pair().await;
        // Frames until one is not sent whole (the peer reads nothing).
        let payload = vec![b'a'; 50_000];
        let mut frames = 0;
        loop {
            let written = ours.write_frame(b"", &payload);
            assert_ne!(written, Written::NotTaken, "an empty tail and a socket with room take something");
            frames += 1;
            if written == Written::Partly {
                break;
            }
        }
        assert!(!ours.tail.is_empty());
        assert_eq!(ours.write_frame(b"", b"more"), Written::NotTaken, "nothing overtakes the tail");
        frames_then_a_later_write(ours, peer, std::iter::repeat_n(&payload[..], frames)).await;
    }

    /// Writes `PONG` after what `ours` holds (tungstenite's next bytes, a
    /// pong, say, go after any tail) and closes it; the peer must read
    /// `payloads` as whole text frames, in order, then `PONG`.
    async fn frames_then_a_later_write<'a>(
        mut ours: ClientStream,
        mut peer: tokio::net::TcpStream,
        payloads: impl Iterator<Item = &'a [u8]>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.expect("read");
            got
        });
        ours.write_all(b"PONG").await.expect("write after the tail");
        ours.shutdown().await.expect("shutdown");
        drop(ours);
        let got = reader.await.expect("reader");
        let mut expected = Vec::new();
        let mut header = [0u8; 10];
        for payload in payloads {
            expected.extend_from_slice(text_frame_header(payload.len(), &mut header));
            expected.extend_from_slice(payload);
        }
        expected.extend_from_slice(b"PONG");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "frames whole and in order, then the later write");
    }

    #[test]
    fn frame_headers_use_the_shortest_length_form() {
        let mut buf = [0u8; 10];
        assert_eq!(text_frame_header(0, &mut buf), [0x81, 0]);
        assert_eq!(text_frame_header(125, &mut buf), [0x81, 125]);
        assert_eq!(text_frame_header(126, &mut buf), [0x81, 126, 0, 126]);
        assert_eq!(text_frame_header(65_535, &mut buf), [0x81, 126, 0xff, 0xff]);
        assert_eq!(text_frame_header(65_536, &mut buf), [0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn frame_headers_match_tungstenite() {
        for len in [0, 1, 125, 126, 127, 1000, 65_535, 65_536, 70_000] {
            let frame = tungstenite::protocol::frame::Frame::message(
                vec![b'x'; len],
                tungstenite::protocol::frame::coding::OpCode::Data(tungstenite::protocol::frame::coding::Data::Text),
                true,
            );
            let mut theirs = Vec::new();
            frame.format(&mut theirs).expect("formatting into a Vec does not fail");
            let mut buf = [0u8; 10];
            let ours = text_frame_header(len, &mut buf);
            assert_eq!(&theirs[..ours.len()], ours, "header of {len} bytes");
            assert_eq!(theirs.len(), ours.len() + len, "length of {len} bytes");
        }
    }
}
