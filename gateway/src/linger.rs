//! `ServedStream`: an accepted TCP stream that reports writes the peer
//! does not read and closes *lingering*.
//!
//! Closing a socket with unread input makes the kernel send a reset, and a
//! reset makes the peer drop what it has not read yet: the 1009 close frame
//! after an oversize message, the 413 after a large body, the 401 before it.
//! So a closing stream is handed to a task that half-closes it (our data,
//! then FIN), discards what the peer still sends for a bounded time and
//! size, and only then closes. At most [`lingering_limit`] streams linger at
//! once; past that they close at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest a closing stream lingers.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Most bytes a lingering stream discards before closing anyway (a
/// refused 8 MiB trigger body fits).
pub const LINGER_BYTES: usize = 16 << 20;

/// Streams lingering at once: a quarter of the file-descriptor reserve of
/// [`crate::gateway::connection_limit`] (a lingering stream still holds its
/// descriptor while a new connection may take its slot).
pub fn lingering_limit(nofile: u64) -> usize {
    usize::try_from(crate::gateway::fd_reserve(nofile) / 4).unwrap_or(usize::MAX).max(1)
}

/// The permits of lingering closes, shared by every stream of a listener.
#[derive(Clone, Debug)]
pub struct Lingering {
    /// One permit per stream lingering now.
    permits: Arc<Semaphore>,
}

impl Lingering {
    /// At most `limit` streams linger at once.
    pub fn new(limit: usize) -> Lingering {
        Lingering { permits: Arc::new(Semaphore::new(limit)) }
    }
}

/// Since when writes to a stream have been blocked (the peer not reading).
#[derive(Debug)]
pub struct WriteBlocked {
    /// Reference point of `since_ms`.
    base: Instant,
    /// Milliseconds after `base` + 1 when a write last found the socket
    /// full and none has succeeded since; 0 when not blocked.
    since_ms: AtomicU64,
}

impl WriteBlocked {
    fn new() -> WriteBlocked {
        WriteBlocked { base: Instant::now(), since_ms: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn record(&self, blocked: bool) {
        let current = self.since_ms.load(Ordering::Relaxed);
        if blocked && current == 0 {
            self.since_ms.store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        } else if !blocked && current != 0 {
            self.since_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether a write has been blocked for more than `d`.
    pub fn longer_than(&self, d: Duration) -> bool {
        let since = self.since_ms.load(Ordering::Relaxed);
        since != 0 && self.now_ms().saturating_sub(since - 1) > u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
    }
}

/// An accepted connection's stream, for its whole life (HTTP, then the
/// websocket).
#[derive(Debug)]
pub struct ServedStream {
    /// The socket; taken by the lingering close on drop.
    tcp: Option<TcpStream>,
    /// Blocked writes, read by the connection's watchdog.
    blocked: Arc<WriteBlocked>,
    /// Where the lingering close gets its permit.
    lingering: Lingering,
}

impl ServedStream {
    /// Wraps an accepted socket.
    pub fn new(tcp: TcpStream, lingering: Lingering) -> ServedStream {
        ServedStream { tcp: Some(tcp), blocked: Arc::new(WriteBlocked::new()), lingering }
    }

    /// The blocked-write state, shared.
    pub fn write_blocked(&self) -> Arc<WriteBlocked> {
        self.blocked.clone()
    }

    /// One non-blocking `send`, outside tokio's cooperative budget and
    /// readiness tracking (the fan-out's write-through and the session's
    /// batch, after the upgrade); `WouldBlock` when the socket is full.
    ///
    /// `send` and `sendmsg` rather than tokio's `write`/`writev`: a
    /// socket's own calls skip the VFS layer (`vfs_writev`, `fdget_pos`).
    /// Not through tokio's `try_io`, whose readiness word is one more cold
    /// line per delivery: a `WouldBlock` seen here leaves tokio believing
    /// the socket writable, which costs only one refused write when the
    /// session next writes through tokio (it then clears the readiness and
    /// waits, as for any stale readiness). Not recorded in `blocked`: only
    /// the watchdog before the upgrade reads it.
    pub fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
        let tcp = self.tcp.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        socket2::SockRef::from(tcp).send(buf)
    }

    /// One non-blocking `sendmsg` of `bufs`, as [`ServedStream::try_send`].
    pub fn try_send_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let tcp = self.tcp.as_ref().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))?;
        socket2::SockRef::from(tcp).send_vectored(bufs)
    }

    fn tcp(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        // `tcp` is only taken in `drop`.
        self.tcp.as_mut().map(Pin::new).ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for ServedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.tcp()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = self.tcp()?.poll_write(cx, buf);
        self.blocked.record(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = self.tcp()?.poll_write_vectored(cx, bufs);
        self.blocked.record(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp()?.poll_shutdown(cx)
    }
}

impl Drop for ServedStream {
    fn drop(&mut self) {
        let Some(tcp) = self.tcp.take() else { return };
        // Without a permit or a runtime (process exit) the socket closes now.
        let Ok(permit) = self.lingering.permits.clone().try_acquire_owned() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(linger(tcp, permit));
    }
}

async fn linger(mut tcp: TcpStream, _permit: OwnedSemaphorePermit) {
    // FIN after our last bytes; already sent if the stream was shut down.
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 8192];
    let mut discarded = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while discarded < LINGER_BYTES {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}
