//! The stable clients' reading half once they are subscribed: one thread
//! on epoll (mio) reads every connection, so the bench is not what a hot
//! room measures (issue #13 item 2: the per-connection tokio tasks of
//! tokio-tungstenite saturated the bench's core from 50 triggers/s on).
//!
//! What it does per wake-up, and why:
//! * one `read()` per readable connection into one large shared buffer
//!   (a read that returns less than the room it had drained the socket:
//!   edge-triggered readiness fires again for anything that arrives later);
//! * websocket frames parsed in place in that buffer; only a partial frame
//!   at the end of a read is copied, to the connection's own carry-over;
//! * one clock reading per read (every frame of one read arrived at once);
//! * deliveries of the whole wake-up recorded under one lock of the shared
//!   histograms, then counted with one atomic add (the controller's drain
//!   wait reads that count, so the histograms are complete when it
//!   matches);
//! * nothing allocated per frame (sequence numbers go to per-subscription
//!   vectors, which grow by doubling);
//! * paced: after a wake-up that did not fill the event list, the thread
//!   sleeps out the rest of [`PACE`] before it waits again. A reader
//!   blocked in `epoll_wait` makes every write of the server pay a
//!   cross-core wake-up (on loopback the receive path runs inside the
//!   sender's system call), which a remote client never costs it: at 10
//!   triggers/s over 5 000 connections that doubled the server's CPU per
//!   delivery and took 41 % of the bench's core. Latencies read late by at
//!   most [`PACE`]; the floor probe's reader is paced the same way.
//!
//! Connections join with [`Reader::add`] (the tokio-tungstenite socket's fd
//! is duplicated, so the handshake and subscribe exchange stay on the
//! well-tested client); [`Reader::stop`] sends every connection a close
//! frame and hands each client its [`StableOutcome`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;

use crate::client::{Ctx, Event, Session, StableOutcome, Ws, lock};

/// The waker's token; connection tokens are their slot numbers.
const WAKER: Token = Token(usize::MAX);
/// Size of the shared read buffer (grown for a larger frame).
const READ_BUFFER: usize = 1 << 20;
/// Largest server frame read (the tokio-tungstenite clients' `max_message_size`):
/// a header announcing more ends the connection instead of growing the buffer.
const MAX_FRAME: usize = 16 << 20;
/// How long [`Reader::stop`] waits for the server's close frames.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// The reader looks at its sockets at most this often (see the module
/// comment; the floor probe's `floor_reader --pace-us` default is the same).
pub const PACE: Duration = Duration::from_micros(500);
/// Readiness events taken per wake-up.
const EVENTS: usize = 1024;
/// A masked close frame with code 1000 (mask key 0: the payload is sent as is).
const CLOSE_FRAME: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8];
/// A masked text frame `{}`, the answer to Centrifugo's ping (mask key 0).
const CENTRIFUGO_PONG_FRAME: [u8; 8] = [0x81, 0x82, 0, 0, 0, 0, b'{', b'}'];

/// What the clients and the controller tell the reading thread.
enum Command {
    /// Read this connection from now on; answer `done` when it ends.
    Add { stream: TcpStream, session: Box<Session>, done: oneshot::Sender<StableOutcome> },
    /// Close every connection and answer every client.
    Stop,
}

/// One connection being read.
struct Conn {
    /// The socket (a duplicate of the client's).
    stream: TcpStream,
    /// Sequence numbers received, subscribe state, foreign frames.
    session: Box<Session>,
    /// Where the outcome goes when the connection ends.
    done: oneshot::Sender<StableOutcome>,
    /// The start of a frame that did not fit in the last read.
    carry: Vec<u8>,
    /// A close frame went out (stopping): deliveries no longer count.
    closing: bool,
}

/// Handle of the reading thread.
pub struct Reader {
    /// Commands to the thread.
    commands: Mutex<mpsc::Sender<Command>>,
    /// Wakes the thread after a command.
    waker: Waker,
    /// Linux thread id of the reading thread (0 until it runs), for its CPU time.
    tid: Arc<AtomicU32>,
}

impl Reader {
    /// Starts the reading thread for the clients of `ctx`.
    pub fn start(ctx: Arc<Ctx>) -> io::Result<Arc<Reader>> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let (tx, rx) = mpsc::channel();
        let tid = Arc::new(AtomicU32::new(0));
        let thread_tid = tid.clone();
        std::thread::Builder::new().name("bench-reader".into()).spawn(move || {
            thread_tid.store(current_tid(), Ordering::Relaxed);
            if let Err(e) = run(poll, rx, &ctx) {
                ctx.stats.error(format!("reader: {e}"));
            }
        })?;
        Ok(Arc::new(Reader { commands: Mutex::new(tx), waker, tid }))
    }

    /// Hands the subscribed websocket `ws` to the thread; the receiver gets
    /// the outcome when the connection ends or the reader stops.
    pub fn add(&self, ws: Ws, session: Session) -> Result<oneshot::Receiver<StableOutcome>, String> {
        let fd = ws.get_ref().as_fd().try_clone_to_owned().map_err(|e| format!("reader: dup: {e}"))?;
        // The duplicate shares the open file (and its O_NONBLOCK); dropping
        // `ws` closes only the original descriptor, without a close frame.
        drop(ws);
        let stream = TcpStream::from_std(std::net::TcpStream::from(fd));
        let (done, outcome) = oneshot::channel();
        self.send(Command::Add { stream, session: Box::new(session), done })?;
        Ok(outcome)
    }

    /// Closes every connection (close frame, then up to a second for the
    /// server's) and answers every client.
    pub fn stop(&self) {
        let _ = self.send(Command::Stop);
    }

    /// CPU seconds the reading thread used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let tid = self.tid.load(Ordering::Relaxed);
        (tid != 0).then(|| crate::procstat::thread_cpu_seconds(tid)).flatten()
    }

    fn send(&self, command: Command) -> Result<(), String> {
        lock(&self.commands).send(command).map_err(|_| "reader: the reading thread ended".to_string())?;
        self.waker.wake().map_err(|e| format!("reader: wake: {e}"))
    }
}

/// The calling thread's Linux thread id (`/proc/thread-self` names it).
fn current_tid() -> u32 {
    std::fs::read_link("/proc/thread-self").ok().and_then(|p| p.file_name()?.to_str()?.parse().ok()).unwrap_or(0)
}

/// Deliveries of one wake-up, recorded in one go.
#[derive(Default)]
struct Batch {
    /// (phase or `usize::MAX`, latency µs, arrival µs) of each delivery.
    deliveries: Vec<(usize, u64, u64)>,
}

impl Batch {
    fn flush(&mut self, ctx: &Ctx) {
        if self.deliveries.is_empty() {
            return;
        }
        let n = self.deliveries.len() as u64;
        {
            let mut phases = lock(&ctx.stats.phases);
            for &(phase, latency, at) in &self.deliveries {
                if let Some(p) = phases.get_mut(phase) {
                    p.latency.saturating_record(latency);
                    p.count += 1;
                    p.last_us = p.last_us.max(at);
                }
            }
        }
        ctx.stats.received.fetch_add(n, Ordering::Relaxed);
        self.deliveries.clear();
    }
}

/// The thread's loop: until [`Command::Stop`] and every connection closed
/// (or [`CLOSE_WAIT`]), or the handle is gone.
fn run(mut poll: Poll, commands: mpsc::Receiver<Command>, ctx: &Ctx) -> io::Result<()> {
    let mut events = Events::with_capacity(EVENTS);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: VecDeque<usize> = VecDeque::new();
    let mut open = 0usize;
    let mut buf = vec![0u8; READ_BUFFER];
    let mut batch = Batch::default();
    let mut stopping: Option<Instant> = None;
    loop {
        let timeout = stopping.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let woke = Instant::now();
        let mut taken = 0;
        for event in events.iter() {
            taken += 1;
            if event.token() == WAKER {
                loop {
                    match commands.try_recv() {
                        Ok(Command::Add { mut stream, session, done }) => {
                            let slot = free.pop_front().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(&mut stream, Token(slot), Interest::READABLE)?;
                            let mut conn = Conn { stream, session, done, carry: Vec::new(), closing: false };
                            if stopping.is_some() {
                                begin_close(&mut conn);
                            }
                            conns[slot] = Some(conn);
                            open += 1;
                            // Data may have arrived before registration:
                            // read once now (edge-triggered readiness
                            // reports only what comes later).
                            read_conn(&mut conns, slot, &mut buf, &mut batch, ctx, &poll, &mut free, &mut open);
                        }
                        Ok(Command::Stop) => {
                            stopping.get_or_insert_with(|| Instant::now() + CLOSE_WAIT);
                            for conn in conns.iter_mut().flatten() {
                                begin_close(conn);
                            }
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            stopping.get_or_insert_with(Instant::now);
                            break;
                        }
                    }
                }
                continue;
            }
            read_conn(&mut conns, event.token().0, &mut buf, &mut batch, ctx, &poll, &mut free, &mut open);
        }
        batch.flush(ctx);
        if let Some(deadline) = stopping {
            if open == 0 || Instant::now() >= deadline {
                for slot in 0..conns.len() {
                    finish(&mut conns, slot, &poll, &mut free, &mut open, None, ctx);
                }
                return Ok(());
            }
        } else if taken < EVENTS {
            if let Some(rest) = PACE.checked_sub(woke.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }
}

/// Sends the close frame; what arrives afterwards is read and dropped.
fn begin_close(conn: &mut Conn) {
    if !conn.closing {
        conn.closing = true;
        let _ = conn.stream.write(&CLOSE_FRAME);
    }
}

/// Ends the connection in `slot` (if any): deregisters it and answers its
/// client; `error` is counted when given.
fn finish(
    conns: &mut [Option<Conn>],
    slot: usize,
    poll: &Poll,
    free: &mut VecDeque<usize>,
    open: &mut usize,
    error: Option<String>,
    ctx: &Ctx,
) {
    let Some(mut conn) = conns.get_mut(slot).and_then(Option::take) else {
        return;
    };
    let _ = poll.registry().deregister(&mut conn.stream);
    if let Some(error) = error.filter(|_| !conn.closing) {
        ctx.stats.error(error);
    }
    let _ = conn.done.send(conn.session.outcome());
    free.push_back(slot);
    *open -= 1;
}

/// Reads connection `slot` until its socket is drained, handling every
/// complete frame.
#[allow(clippy::too_many_arguments)]
fn read_conn(
    conns: &mut [Option<Conn>],
    slot: usize,
    buf: &mut Vec<u8>,
    batch: &mut Batch,
    ctx: &Ctx,
    poll: &Poll,
    free: &mut VecDeque<usize>,
    open: &mut usize,
) {
    let ended = loop {
        let Some(conn) = conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let carried = conn.carry.len();
        buf[..carried].copy_from_slice(&conn.carry);
        let room = buf.len() - carried;
        let n = match conn.stream.read(&mut buf[carried..]) {
            Ok(0) => break Some("connection ended by server".to_string()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Some(format!("read error: io: {}", e.kind())),
        };
        conn.carry.clear();
        let now = ctx.now_us();
        let data = &buf[..carried + n];
        let mut at = 0;
        let mut outcome = None;
        while let Some(frame) = Frame::parse(&data[at..]) {
            let frame = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    outcome = Some(Some(e.to_string()));
                    break;
                }
            };
            let payload = &data[at + frame.header..at + frame.header + frame.len];
            at += frame.header + frame.len;
            match frame.opcode {
                1 | 2 if !conn.closing => match std::str::from_utf8(payload) {
                    Ok(text) => {
                        let mut closed = None;
                        let stream = &mut conn.stream;
                        // A 3.x frame is one event; a Centrifugo frame one per line.
                        conn.session.handle_frame(text, now, ctx, |event| match event {
                            Event::Delivered { phase, latency } => {
                                batch.deliveries.push((phase.unwrap_or(usize::MAX), latency, now))
                            }
                            Event::Closed(code) => closed = Some(code),
                            Event::Pong => {
                                let _ = stream.write(&CENTRIFUGO_PONG_FRAME);
                            }
                            Event::Nothing => {}
                        });
                        if let Some(code) = closed {
                            outcome = Some(Some(format!("closed by server ({code})")));
                            break;
                        }
                    }
                    Err(_) => ctx.stats.error("binary frame that is not UTF-8"),
                },
                8 => {
                    let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    outcome = Some(Some(format!("closed by server ({code})")));
                    break;
                }
                9 if payload.len() <= 125 => {
                    // A ping: answer with a masked pong of the same payload.
                    let mut pong = [0u8; 131];
                    pong[0] = 0x8a;
                    pong[1] = 0x80 | payload.len() as u8;
                    pong[6..6 + payload.len()].copy_from_slice(payload);
                    let _ = conn.stream.write(&pong[..6 + payload.len()]);
                }
                _ => {}
            }
        }
        if let Some(error) = outcome {
            break error;
        }
        let rest = &data[at..];
        if !rest.is_empty() {
            conn.carry.extend_from_slice(rest);
            // A frame larger than the buffer: make room for all of it.
            if let Some(Ok(frame)) = Frame::header(rest) {
                let whole = frame.header + frame.len;
                if whole > buf.len() {
                    buf.resize(whole, 0);
                }
            }
        }
        if n < room {
            return;
        }
    };
    finish(conns, slot, poll, free, open, ended, ctx);
}

/// A server frame's header, parsed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    /// The opcode (1 text, 2 binary, 8 close, 9 ping, 10 pong).
    opcode: u8,
    /// Header bytes.
    header: usize,
    /// Payload bytes.
    len: usize,
}

/// Why a server frame cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameError {
    /// Servers must not mask (RFC 6455 §5.1).
    Masked,
    /// The gateway never fragments; the bench does not reassemble.
    Fragmented,
    /// Over [`MAX_FRAME`].
    TooLarge,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FrameError::Masked => "protocol: masked server frame",
            FrameError::Fragmented => "protocol: fragmented server frame",
            FrameError::TooLarge => "protocol: server frame over 16 MiB",
        })
    }
}

impl Frame {
    /// The header at the start of `b`: `None` until the whole header is
    /// there.
    fn header(b: &[u8]) -> Option<Result<Frame, FrameError>> {
        let (&b0, &b1) = (b.first()?, b.get(1)?);
        if b1 & 0x80 != 0 {
            return Some(Err(FrameError::Masked));
        }
        let opcode = b0 & 0x0f;
        if b0 & 0x80 == 0 || opcode == 0 {
            return Some(Err(FrameError::Fragmented));
        }
        let (header, len) = match b1 & 0x7f {
            126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
            127 => {
                let bytes: [u8; 8] = b.get(2..10)?.try_into().ok()?;
                (10, usize::try_from(u64::from_be_bytes(bytes)).unwrap_or(usize::MAX))
            }
            n => (2, n as usize),
        };
        if len > MAX_FRAME - header {
            return Some(Err(FrameError::TooLarge));
        }
        Some(Ok(Frame { opcode, header, len }))
    }

    /// The frame at the start of `b`: `None` until all of it is there.
    fn parse(b: &[u8]) -> Option<Result<Frame, FrameError>> {
        match Frame::header(b)? {
            Ok(frame) if b.len() - frame.header < frame.len => None,
            other => Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_server_frames_in_place() {
        assert_eq!(Frame::parse(&[0x81]), None);
        assert_eq!(Frame::parse(&[0x81, 3, b'a', b'b']), None, "payload not all there");
        assert_eq!(Frame::parse(&[0x81, 3, b'a', b'b', b'c']), Some(Ok(Frame { opcode: 1, header: 2, len: 3 })));
        let mut long = vec![0x81, 126, 0x01, 0x00];
        assert_eq!(Frame::parse(&long), None);
        long.resize(4 + 256, b'x');
        assert_eq!(Frame::parse(&long), Some(Ok(Frame { opcode: 1, header: 4, len: 256 })));
        let huge = [0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(Frame::header(&huge), Some(Ok(Frame { opcode: 2, header: 10, len: 65536 })));
        assert_eq!(Frame::parse(&huge), None);
        let over = [0x82, 127, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(Frame::header(&over), Some(Err(FrameError::TooLarge)), "never a buffer of 2^64 bytes");
        let just_over = [0x82, 127, 0, 0, 0, 0, 0x01, 0, 0, 0];
        assert_eq!(Frame::header(&just_over), Some(Err(FrameError::TooLarge)));
        assert_eq!(Frame::parse(&[0x81, 0x83, 0, 0, 0, 0]), Some(Err(FrameError::Masked)));
        assert_eq!(Frame::parse(&[0x01, 1, b'a']), Some(Err(FrameError::Fragmented)));
        assert_eq!(Frame::parse(&[0x80, 1, b'a']), Some(Err(FrameError::Fragmented)));
        assert_eq!(Frame::parse(&[0x88, 2, 0x03, 0xe8]), Some(Ok(Frame { opcode: 8, header: 2, len: 2 })));
    }
}
