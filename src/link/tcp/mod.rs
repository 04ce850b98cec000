//! The TCP link: one process per rank, one connection per pair of ranks.
//!
//! Design (what measured and what the contract needs):
//! - **A full mesh, made at init.** Rank i dials every rank below it and accepts every rank
//!   above it, as Gloo's `connectFullMesh` does; the dials go to the nearest rank first, so that
//!   rank 0 is dialled last by everyone and not flooded. Connecting at init gives every rank an
//!   error naming a missing peer before any collective runs; lazy connections would move that
//!   error into the first call that needs the pair. At 16 processes on one host the whole
//!   rendezvous plus mesh takes milliseconds (`BENCHMARKS.md`).
//! - **Every connection is authenticated** ([`handshake`]) and its frames bounded ([`wire`]).
//! - **Sends and receives overlap.** Each connection has a writer thread, fed by a queue, and a
//!   reader thread that decodes frames into a channel. `send` only queues, so it never blocks on
//!   a slow or stopped peer (the receiver's deadline catches that), and a reader always drains
//!   its socket, so two ranks sending large frames to each other never deadlock.
//! - **No per-frame allocation in steady state.** A writer returns each sent frame's buffers to
//!   a pool that the readers fill the next frames into: a ring rank sends as many bytes as it
//!   receives, so after the first slices the buffers go round.
//! - `TCP_NODELAY`, socket buffers of [`TcpOptions::socket_buffer`], TCP keep-alives (so a dead
//!   host is noticed without traffic: probes after [`TcpOptions::keepalive`] idle, then every
//!   `keepalive`) and a TCP user timeout of 10 keep-alive periods, which on Linux bounds both
//!   unacknowledged data and unanswered probes: a dead host closes the link in about 10 s.
//! - **Limits.** Two threads and three descriptors per peer, and a heartbeat every half
//!   keep-alive per idle connection: fine for tens of ranks per process, heavy at a thousand.
//!   Received frames queue without a bound, as in the in-process mesh: a peer that sends far
//!   ahead of this rank's receives costs memory (frames are bounded, their number is not).
//! - **Heartbeats.** A writer idle for half the keep-alive period sends a ping; the reader
//!   notes when each peer was last heard, so that a deadline can name the peers that fell
//!   silent (a stopped or hung process), not only the one this rank happened to wait on
//!   ([`Link::silent_peers`]).
//! - **Ends are told apart.** A link dropped cleanly sends a goodbye after its last frame: its
//!   peers report [`LinkError::Exited`]. A connection that ends without one (a killed process)
//!   is [`LinkError::Closed`]/[`LinkError::Gone`]; a frame that fails its checks is
//!   [`LinkError::Corrupt`]. Frames queued before the end are still delivered first.

pub mod handshake;
pub mod wire;

use std::io::{BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam::channel::{
    Receiver, RecvTimeoutError, Sender, TryRecvError, bounded, select_biased, unbounded,
};
use socket2::{SockRef, TcpKeepalive};

use super::{Abort, Frame, Link, LinkError, RemoteAbort};
use crate::deadline::deadline_from;
use crate::error::{At, Error, Result};
use handshake::{Agreed, Hello, JobToken, Purpose, accept_side, connect_side};
use wire::{Incoming, Kind, Limits};

/// How a TCP link connects and frames.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// The job's secret. Without one, only loopback peers are accepted or dialled.
    pub token: Option<JobToken>,
    /// The job id: ranks of another job are refused even with the same token.
    pub job: String,
    /// The largest payload this rank accepts in one frame (default 1 GiB); the handshake agrees
    /// on the smaller of the two ends'.
    pub max_payload: u64,
    /// CRC32C on every frame (default on; both ends must want it).
    pub checksums: bool,
    /// Deadline of connecting the mesh, handshakes included (default 60 s).
    pub timeout: Duration,
    /// TCP keep-alive idle time and probe interval (default 1 s, as NCCL's RAS keep-alive).
    pub keepalive: Duration,
    /// Send and receive socket buffer sizes (default 4 MiB; the kernel may cap them).
    pub socket_buffer: usize,
    /// How long a dropped link waits for its queued frames to go out before it cuts the
    /// connections (default 10 s). `send` only queues: a rank that returns from its last
    /// collective and drops its communicator may still have frames on their way, and a slow
    /// peer gets them whole as long as they leave within this time. Exiting the process
    /// without dropping the link (`std::process::exit`) loses them.
    pub linger: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            token: None,
            job: "wccl".into(),
            max_payload: 1 << 30,
            checksums: true,
            timeout: Duration::from_secs(60),
            keepalive: Duration::from_secs(1),
            socket_buffer: 4 << 20,
            linger: Duration::from_secs(10),
        }
    }
}

/// Frames returned by writers for readers to fill again.
const POOL_FRAMES: usize = 32;
/// Buffers larger than this are not kept in the pool.
const POOL_MAX_BYTES: usize = 256 << 20;
/// How long the mesh's acceptor waits before it looks whether a dial failed.
const ACCEPT_SLICE: Duration = Duration::from_millis(250);
/// The longest one handshake may take, within the mesh's deadline.
pub(crate) const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Clone, Default)]
struct Pool(Arc<Mutex<Vec<Frame>>>);

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Frame>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn take(&self) -> Frame {
        self.lock().pop().unwrap_or_default()
    }
    fn give(&self, f: Frame) {
        if f.payload.capacity() <= POOL_MAX_BYTES {
            let mut p = self.lock();
            if p.len() < POOL_FRAMES {
                p.push(f);
            }
        }
    }
}

/// When a peer was last heard from (any frame, heartbeats included), in milliseconds since the
/// link started.
struct Heard {
    epoch: Instant,
    at_ms: std::sync::atomic::AtomicU64,
}

impl Heard {
    fn new(epoch: Instant) -> Heard {
        let h = Heard {
            epoch,
            at_ms: std::sync::atomic::AtomicU64::new(0),
        };
        h.now();
        h
    }
    fn now(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.at_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }
    fn silent_for(&self) -> Duration {
        let at = Duration::from_millis(self.at_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(at)
    }
}

/// How a connection ended, as its reader saw it.
#[derive(Clone, Debug)]
enum End {
    /// The peer said goodbye.
    Exited,
    /// A frame failed its checks.
    Corrupt(String),
    /// The connection closed or failed without a goodbye.
    Closed,
}

enum Out {
    Data(Frame),
    Bye,
}

struct Conn {
    stream: TcpStream,
    heard: Arc<Heard>,
    /// Set when the link is dropped: the reader stops once the peer has had a linger.
    dropped: Arc<std::sync::atomic::AtomicBool>,
    out: Sender<Out>,
    urgent: Sender<String>,
    data: Receiver<Frame>,
    end: Arc<Mutex<Option<End>>>,
    writer_done: Receiver<()>,
}

/// One rank's TCP connections to every other rank of its job. See the module docs.
pub struct TcpLink {
    rank: usize,
    size: usize,
    linger: Duration,
    /// Set by `abort`: a dropped link then has nothing worth lingering for.
    aborted: Arc<std::sync::atomic::AtomicBool>,
    /// The peers' heartbeat period (as this rank's: one job, one setting).
    heartbeat: Duration,
    conns: Vec<Option<Conn>>,
    /// Frames a rank sends itself (as the in-process mesh allows) go round in memory.
    own: (Sender<Frame>, Receiver<Frame>),
    control_tx: Sender<Abort>,
    control: Receiver<Abort>,
    limits: Vec<Limits>,
}

impl std::fmt::Debug for TcpLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpLink")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn connect_error(rank: usize, message: String) -> Error {
    Error::Connect {
        at: At::rank(rank),
        message,
    }
}

/// An abort reason cut to what a peer accepts ([`wire::MAX_REASON`]), at a character boundary.
fn bounded_reason(reason: &str) -> String {
    let max = usize::try_from(wire::MAX_REASON).unwrap_or(usize::MAX);
    if reason.len() <= max {
        return reason.to_string();
    }
    let mut end = max;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// The idle time after which a writer sends a heartbeat: half the keep-alive period.
fn heartbeat(o: &TcpOptions) -> Duration {
    (o.keepalive / 2).max(Duration::from_millis(100))
}

/// Socket options every connection gets (before connect, so the buffers shape the window).
fn tune(s: &SockRef<'_>, o: &TcpOptions) -> std::io::Result<()> {
    s.set_tcp_nodelay(true)?;
    // The kernel caps these (net.core.[rw]mem_max); a refusal is not fatal.
    let _ = s.set_send_buffer_size(o.socket_buffer);
    let _ = s.set_recv_buffer_size(o.socket_buffer);
    let ka = o.keepalive.max(Duration::from_secs(1));
    let params = TcpKeepalive::new()
        .with_time(ka)
        .with_interval(ka)
        .with_retries(5);
    s.set_tcp_keepalive(&params)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    s.set_tcp_user_timeout(Some(ka.saturating_mul(10)))?;
    Ok(())
}

/// Whether a peer at `addr` may connect or be dialled under `o`.
pub(crate) fn allowed(addr: &SocketAddr, o: &TcpOptions) -> bool {
    o.token.is_some() || addr.ip().is_loopback()
}

/// The message for a non-loopback peer without a token.
pub(crate) fn needs_token(addr: &SocketAddr) -> String {
    format!(
        "{addr} is not a loopback address and no job token is set: set WCCL_JOB_TOKEN (or WCCL_JOB_TOKEN_FILE) to the same secret on every rank to connect across hosts"
    )
}

/// Dials `addr` and runs the connector's handshake, until `deadline`. A refused connection is
/// tried again only when `retry_refused` (the store, whose rank 0 may still be starting); in the
/// mesh every listener was bound before the table went out, so a refusal means the peer is gone.
pub(crate) fn dial(
    addr: SocketAddr,
    me: &Hello,
    expect_rank: Option<u32>,
    o: &TcpOptions,
    deadline: Instant,
    retry_refused: bool,
) -> std::result::Result<(TcpStream, Agreed), String> {
    if !allowed(&addr, o) {
        return Err(needs_token(&addr));
    }
    let key = JobToken::key(o.token.as_ref());
    let mut backoff = Duration::from_millis(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("could not reach {addr} before the deadline"));
        }
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .map_err(|e| format!("socket: {e}"))?;
        tune(&SockRef::from(&sock), o).map_err(|e| format!("socket options: {e}"))?;
        let retry = match sock.connect_timeout(&addr.into(), left.min(HANDSHAKE)) {
            Ok(()) => {
                let mut s = TcpStream::from(sock);
                let hs = deadline.min(deadline_from(Instant::now(), HANDSHAKE));
                let agreed = connect_side(
                    &mut Deadlined {
                        s: &mut s,
                        deadline: hs,
                    },
                    me,
                    expect_rank,
                    &key,
                );
                match agreed {
                    Ok(agreed) => return Ok((s, agreed)),
                    // The peer closed or timed out mid-handshake (busy with others): dial
                    // again while the deadline allows. A refusal is final.
                    Err(e @ handshake::HandshakeError::Broken(_)) => format!("{addr}: {e}"),
                    Err(e) => return Err(format!("{addr}: {e}")),
                }
            }
            // Not listening yet (a rank still starting), or a full backlog: try again.
            Err(e)
                if (retry_refused && e.kind() == std::io::ErrorKind::ConnectionRefused)
                    || matches!(
                        e.kind(),
                        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
                    ) =>
            {
                format!("could not connect to {addr}: {e}")
            }
            Err(e) => return Err(format!("could not connect to {addr}: {e}")),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(retry);
        }
        // A wait between tries with a deadline: what to wait on is the peer starting.
        std::thread::sleep(backoff.min(left));
        backoff = backoff.saturating_mul(2).min(Duration::from_millis(200));
    }
}

/// A stream whose every read and write ends by one deadline (not a timeout per call, which a
/// peer sending a byte at a time could stretch without end): each call gets what is left.
pub(crate) struct Deadlined<'a> {
    /// The stream.
    pub(crate) s: &'a mut TcpStream,
    /// When every call must be done.
    pub(crate) deadline: Instant,
}

impl Deadlined<'_> {
    fn arm(&mut self, read: bool) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the deadline passed",
            ));
        }
        // Below a microsecond a socket timeout rounds to zero, which means none at all.
        let left = Some(left.max(Duration::from_millis(1)));
        if read {
            self.s.set_read_timeout(left)
        } else {
            self.s.set_write_timeout(left)
        }
    }
}

impl std::io::Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm(true)?;
        self.s.read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm(false)?;
        self.s.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

/// The error [`accept_one`] returns when nobody connected before its accept deadline.
pub(crate) const NOBODY: &str = "deadline";

/// Waits for one connection until `deadline`.
#[cfg(unix)]
fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(None);
    }
    // SO_RCVTIMEO on a listening socket bounds `accept` (Linux, the BSDs): the wait has this
    // deadline without polling. Below a microsecond the timeout would round to none at all.
    SockRef::from(listener).set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    match listener.accept() {
        Ok(x) => Ok(Some(x)),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Waits for one connection until `deadline` (where a listener's receive timeout does not
/// bound `accept`: polling a non-blocking listener).
#[cfg(not(unix))]
fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
) -> std::io::Result<Option<(TcpStream, SocketAddr)>> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok(Some((s, a)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                std::thread::sleep(left.min(Duration::from_millis(10)));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one connection that passes the handshake: waits for connections until
/// `accept_deadline` (then [`NOBODY`]), and gives each handshake until `deadline` (at most
/// [`HANDSHAKE`] in all). Refusals are logged with the peer's address and kept in `refused`
/// (for the error that names who never came), and accepting goes on.
pub(crate) fn accept_one(
    listener: &TcpListener,
    me: &Hello,
    o: &TcpOptions,
    accept_deadline: Instant,
    deadline: Instant,
    refused: &mut Vec<String>,
) -> std::result::Result<(TcpStream, Agreed), String> {
    loop {
        let (mut s, from) = match accept_until(listener, accept_deadline.min(deadline)) {
            Ok(Some(x)) => x,
            Ok(None) => return Err(NOBODY.into()),
            // Transient: a connection reset before it was accepted, or a signal.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                continue;
            }
            Err(e) => return Err(format!("accept: {e}")),
        };
        let mut note = |what: String| {
            tracing::warn!(%from, "{what}");
            // The last few are enough to say why someone never came.
            if refused.len() >= 8 {
                refused.remove(0);
            }
            refused.push(format!("{from}: {what}"));
        };
        if !allowed(&from, o) {
            note("refused a non-loopback peer: no job token is set".into());
            let _ = handshake_refuse(&mut s, &needs_token(&from));
            continue;
        }
        if let Err(e) = tune(&SockRef::from(&s), o) {
            note(format!("dropped a connection: {e}"));
            continue;
        }
        let key = JobToken::key(o.token.as_ref());
        let hs = deadline.min(deadline_from(Instant::now(), HANDSHAKE));
        let agreed = accept_side(
            &mut Deadlined {
                s: &mut s,
                deadline: hs,
            },
            me,
            &key,
        );
        match agreed {
            Ok(a) => return Ok((s, a)),
            Err(e) => note(format!("refused a connection: {e}")),
        }
    }
}

/// Sends a refusal to a peer that never got to the handshake.
fn handshake_refuse(s: &mut TcpStream, reason: &str) -> std::io::Result<()> {
    let body = &reason.as_bytes()[..reason.len().min(handshake::MAX_MESSAGE)];
    let mut m = vec![4u8];
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m)
}

impl TcpLink {
    /// Connects `rank` to every other rank of a job, given every rank's listen address
    /// (`addrs[rank]` is this rank's `listener`). Rank i dials the ranks below it, nearest
    /// first, and accepts the ranks above it. Fails with [`Error::Connect`] naming the ranks
    /// not connected by [`TcpOptions::timeout`].
    pub fn connect_mesh(
        rank: usize,
        listener: TcpListener,
        addrs: &[SocketAddr],
        o: &TcpOptions,
    ) -> Result<TcpLink> {
        let size = addrs.len();
        if rank >= size {
            return Err(connect_error(
                rank,
                format!("rank {rank} is out of range for {size} ranks"),
            ));
        }
        let (size32, rank32) = match (u32::try_from(size), u32::try_from(rank)) {
            (Ok(s), Ok(r)) => (s, r),
            _ => return Err(connect_error(rank, format!("{size} ranks are too many"))),
        };
        let deadline = deadline_from(Instant::now(), o.timeout);
        let hello = Hello::new(
            Purpose::Mesh,
            &o.job,
            rank32,
            size32,
            o.max_payload,
            o.checksums,
        )
        .map_err(|e| connect_error(rank, format!("no random nonce: {e}")))?;
        let mut streams: Vec<Option<(TcpStream, Agreed)>> = (0..size).map(|_| None).collect();
        let higher = size - 1 - rank;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let accepted = std::thread::scope(|scope| {
            // Accept the ranks above this one while dialling the ranks below.
            let acceptor = scope.spawn(|| {
                let mut got: Vec<(TcpStream, Agreed)> = Vec::new();
                let mut seen = vec![false; size];
                let mut refused = Vec::new();
                while got.len() < higher {
                    // In slices, so that a failed dial below ends the wait early.
                    if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() >= deadline
                    {
                        break;
                    }
                    let slice = deadline.min(deadline_from(Instant::now(), ACCEPT_SLICE));
                    match accept_one(&listener, &hello, o, slice, deadline, &mut refused) {
                        Ok((s, a)) => {
                            let p = a.peer.rank as usize;
                            if p < rank {
                                tracing::warn!(peer = p, "dropped an unexpected mesh connection");
                                continue;
                            }
                            // A rank that dials again (its read of our accept timed out) has
                            // dropped the first stream: keep the newest.
                            if seen[p] {
                                got.retain(|(_, old)| old.peer.rank as usize != p);
                            } else {
                                seen[p] = true;
                            }
                            got.push((s, a));
                        }
                        Err(e) if e == NOBODY => {}
                        Err(_) => break,
                    }
                }
                (got, refused)
            });
            let mut dial_err = None;
            for j in (0..rank).rev() {
                match dial(addrs[j], &hello, Some(j as u32), o, deadline, false) {
                    Ok(x) => streams[j] = Some(x),
                    Err(e) => {
                        dial_err = Some(format!("rank {j}: {e}"));
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        break;
                    }
                }
            }
            let (got, refused) = acceptor.join().unwrap_or_default();
            (got, refused, dial_err)
        });
        let (got, refused, dial_err) = accepted;
        for (s, a) in got {
            let p = a.peer.rank as usize;
            streams[p] = Some((s, a));
        }
        let missing: Vec<usize> = (0..size)
            .filter(|&j| j != rank && streams[j].is_none())
            .collect();
        if !missing.is_empty() {
            return Err(connect_error(
                rank,
                format!(
                    "ranks {missing:?} of {size} did not connect within {:?}{}{}",
                    o.timeout,
                    dial_err.map(|e| format!(" ({e})")).unwrap_or_default(),
                    if refused.is_empty() {
                        String::new()
                    } else {
                        format!("; refused: {}", refused.join("; "))
                    }
                ),
            ));
        }
        Self::start(rank, size, streams, o)
    }

    /// A mesh of `n` ranks over loopback sockets in this process (tests and benches: the same
    /// code as across processes, each rank's link built on its own thread).
    pub fn loopback_mesh(n: usize, o: &TcpOptions) -> Result<Vec<TcpLink>> {
        let listeners = (0..n)
            .map(|r| {
                TcpListener::bind("127.0.0.1:0")
                    .map_err(|e| connect_error(r, format!("bind 127.0.0.1:0: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let addrs = listeners
            .iter()
            .enumerate()
            .map(|(r, l)| {
                l.local_addr()
                    .map_err(|e| connect_error(r, format!("local address: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(r, l)| {
                    let addrs = &addrs;
                    scope.spawn(move || Self::connect_mesh(r, l, addrs, o))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(r, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(connect_error(r, "the connecting thread panicked".into()))
                    })
                })
                .collect()
        })
    }

    /// Starts a reader and a writer thread per connection.
    fn start(
        rank: usize,
        size: usize,
        streams: Vec<Option<(TcpStream, Agreed)>>,
        o: &TcpOptions,
    ) -> Result<TcpLink> {
        let (control_tx, control) = unbounded();
        let pool = Pool::default();
        let mut limits = vec![
            Limits {
                max_payload: 0,
                checksums: false
            };
            size
        ];
        let mut conns = Vec::with_capacity(size);
        for (peer, s) in streams.into_iter().enumerate() {
            let Some((stream, agreed)) = s else {
                conns.push(None);
                continue;
            };
            limits[peer] = agreed.limits;
            // Out of threads or file descriptors (a job of hundreds of ranks under a low
            // `ulimit`): fail the join with the cause, not a link that is missing peers.
            let started = Conn::start(
                peer,
                stream,
                agreed.limits,
                &control_tx,
                &pool,
                heartbeat(o),
                o.linger,
            );
            match started {
                Ok(c) => conns.push(Some(c)),
                Err(e) => {
                    let why = format!("cannot start the link to rank {peer}: {e}");
                    // The peers already connected hear why, rather than a clean exit.
                    for c in conns.iter().flatten() {
                        let _ = c.urgent.send(format!("rank {rank} could not join: {why}"));
                    }
                    return Err(connect_error(rank, why));
                }
            }
        }
        Ok(TcpLink {
            rank,
            size,
            linger: o.linger,
            aborted: Arc::default(),
            heartbeat: heartbeat(o),
            conns,
            own: unbounded(),
            control_tx,
            control,
            limits,
        })
    }

    fn conn(&self, peer: usize) -> Option<&Conn> {
        self.conns.get(peer).and_then(Option::as_ref)
    }

    /// Why the connection to `peer` ended, as a link error (`gone` for `recv_any`).
    fn ended(&self, peer: usize, gone: bool) -> LinkError {
        let end = self
            .conn(peer)
            .and_then(|c| c.end.lock().unwrap_or_else(|p| p.into_inner()).clone());
        match end {
            Some(End::Exited) => LinkError::Exited(peer),
            Some(End::Corrupt(reason)) => LinkError::Corrupt { peer, reason },
            _ if gone => LinkError::Gone(peer),
            _ => LinkError::Closed,
        }
    }

    /// The frame limits agreed with `peer` (its largest payload; whether frames carry CRC32C).
    pub fn limits(&self, peer: usize) -> Option<Limits> {
        self.conn(peer).map(|_| self.limits[peer])
    }
}

impl Conn {
    fn start(
        peer: usize,
        stream: TcpStream,
        limits: Limits,
        control: &Sender<Abort>,
        pool: &Pool,
        heartbeat: Duration,
        linger: Duration,
    ) -> std::io::Result<Conn> {
        // The handshake's timeouts end here: the reader blocks until a frame or the end, the
        // writer until its frame is out (a dead peer ends both through keep-alives, the user
        // timeout, or the shutdown when the link is dropped).
        let _ = stream.set_read_timeout(None);
        let _ = stream.set_write_timeout(None);
        let (reader, writer) = (stream.try_clone()?, stream.try_clone()?);
        let (out_tx, out_rx) = unbounded::<Out>();
        let (urgent_tx, urgent_rx) = unbounded::<String>();
        let (data_tx, data_rx) = unbounded::<Frame>();
        let (done_tx, done_rx) = bounded::<()>(1);
        let end = Arc::new(Mutex::new(None));
        let heard = Arc::new(Heard::new(Instant::now()));
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let ends = Ends {
                end: end.clone(),
                dropped: dropped.clone(),
                linger,
            };
            let control = control.clone();
            let pool = pool.clone();
            let heard = heard.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wccl-tcp-read-{peer}"))
                .spawn(move || {
                    read_loop(peer, reader, limits, data_tx, control, ends, pool, heard)
                });
            spawned?;
        }
        {
            let pool = pool.clone();
            let checksums = limits.checksums;
            let spawned = std::thread::Builder::new()
                .name(format!("wccl-tcp-write-{peer}"))
                .spawn(move || {
                    write_loop(writer, out_rx, urgent_rx, checksums, pool, heartbeat);
                    let _ = done_tx.send(());
                });
            if let Err(e) = spawned {
                // The reader already runs: end it with the socket.
                let _ = stream.shutdown(Shutdown::Both);
                return Err(e);
            }
        }
        Ok(Conn {
            stream,
            heard,
            dropped,
            out: out_tx,
            urgent: urgent_tx,
            data: data_rx,
            end,
            writer_done: done_rx,
        })
    }
}

/// What a reader records and watches: how its connection ended, whether the link was
/// dropped, and for how long it reads on after that.
struct Ends {
    end: Arc<Mutex<Option<End>>>,
    dropped: Arc<std::sync::atomic::AtomicBool>,
    linger: Duration,
}

#[allow(clippy::too_many_arguments)]
fn read_loop(
    peer: usize,
    stream: TcpStream,
    limits: Limits,
    data: Sender<Frame>,
    control: Sender<Abort>,
    ends: Ends,
    pool: Pool,
    heard: Arc<Heard>,
) {
    let Ends {
        end,
        dropped,
        linger,
    } = ends;
    let mut since_drop: Option<Instant> = None;
    // Every byte read counts as hearing from the peer, so that one sending a long frame is
    // never taken for silent.
    // A reader buffer below a payload piece: pieces bypass it (one copy, socket to frame).
    let mut r = BufReader::with_capacity(
        64 << 10,
        Noting {
            inner: stream,
            heard,
        },
    );
    let mut spare = Frame::default();
    let set = |e: End| {
        let mut g = end.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
    };
    loop {
        if spare.payload.capacity() == 0 {
            spare = pool.take();
        }
        // A dropped link reads on for its linger (the peer's last frames, its goodbye), then
        // closes; the socket's read timeout, set at the drop, ends a read nobody answers.
        if dropped.load(std::sync::atomic::Ordering::Relaxed) {
            let t = *since_drop.get_or_insert_with(Instant::now);
            if t.elapsed() > linger {
                let _ = r.get_ref().inner.shutdown(Shutdown::Both);
                set(End::Closed);
                break;
            }
        }
        match wire::read_frame(&mut r, &limits, &mut spare) {
            // A link dropped on this side leaves nobody to deliver to: keep draining, so that
            // the peer's last frames are read and its close is clean.
            Ok(Incoming::Data(f)) => drop(data.send(f)),
            Ok(Incoming::Abort(reason)) => drop(control.send(Abort { from: peer, reason })),
            Ok(Incoming::Bye) => set(End::Exited),
            Ok(Incoming::Ping) => {}
            // A stream that ends, even inside a frame (a process killed mid-send closes with a
            // FIN), is a closed link, not a corrupt frame.
            Err(wire::WireError::Eof { .. }) | Err(wire::WireError::Io(_)) => {
                set(End::Closed);
                break;
            }
            Err(e) => {
                tracing::error!(peer, "closing the link to rank {peer}: {e}");
                set(End::Corrupt(e.to_string()));
                // Nothing after a bad frame can be trusted: stop reading and close.
                let _ = r.get_ref().inner.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    // Dropping `data` tells a waiting receive that the connection ended; `end` says how.
}

/// A socket whose every successful read marks the peer heard.
struct Noting {
    inner: TcpStream,
    heard: Arc<Heard>,
}

impl std::io::Read for Noting {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.heard.now();
        }
        Ok(n)
    }
}

fn write_loop(
    stream: TcpStream,
    out: Receiver<Out>,
    urgent: Receiver<String>,
    checksums: bool,
    pool: Pool,
    heartbeat: Duration,
) {
    let mut w = BufWriter::with_capacity(256 << 10, &stream);
    let result = (|| -> std::io::Result<()> {
        loop {
            // Aborts first: once a rank gave up, frames queued before are of no use.
            let next = select_biased! {
                recv(urgent) -> m => match m {
                    Ok(reason) => {
                        wire::write_frame(&mut w, Kind::Abort, &[], reason.as_bytes(), checksums)?;
                        w.flush()?;
                        continue;
                    }
                    Err(_) => None,
                },
                recv(out) -> m => m.ok(),
                // Idle: a heartbeat, so that the peer can tell this process is running (a
                // stopped or hung one falls silent; see `Link::silent_peers`).
                default(heartbeat) => {
                    wire::write_frame(&mut w, Kind::Ping, &[], &[], checksums)?;
                    w.flush()?;
                    continue;
                }
            };
            match next {
                Some(Out::Data(f)) => {
                    wire::write_frame(&mut w, Kind::Data, &f.header, &f.payload, checksums)?;
                    pool.give(f);
                    // Batch small frames; flush when nothing else is queued.
                    if out.is_empty() {
                        w.flush()?;
                    }
                }
                Some(Out::Bye) | None => {
                    wire::write_frame(&mut w, Kind::Bye, &[], &[], checksums)?;
                    w.flush()?;
                    return Ok(());
                }
            }
        }
    })();
    if let Err(e) = result {
        tracing::debug!("a TCP writer stopped: {e}");
    }
    // The peer reads to the end of the stream after our goodbye (or sees the error).
    let _ = stream.shutdown(Shutdown::Write);
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        // Say goodbye after every queued frame, give the writers up to the linger to flush,
        // then cut what is still stuck (a stopped peer's full socket). The readers go on
        // draining until the peers close, so that nothing they still send resets the
        // connection. A link dropped by a panic's unwinding is a crash, not a clean exit: the
        // peers are told so first.
        if std::thread::panicking() {
            self.abort(&format!("rank {}'s thread panicked", self.rank));
        }
        for c in self.conns.iter().flatten() {
            let _ = c.out.send(Out::Bye);
        }
        // After an abort the queued frames are of no use to anyone: a moment for the abort
        // itself to go out, not the whole linger.
        let linger = if self.aborted.load(std::sync::atomic::Ordering::Relaxed) {
            self.linger.min(Duration::from_millis(200))
        } else {
            self.linger
        };
        let deadline = deadline_from(Instant::now(), linger);
        for c in self.conns.iter().flatten() {
            match c.writer_done.recv_deadline(deadline) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
                Err(RecvTimeoutError::Timeout) => {
                    let _ = c.stream.shutdown(Shutdown::Write);
                }
            }
            // The reader drains until the peer closes, but not for ever: a peer that keeps its
            // link open (or is stopped) gets a linger of reading at most, then the socket
            // closes (`read_loop` watches `dropped`; the read timeout ends a read nobody
            // answers).
            c.dropped.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = c
                .stream
                .set_read_timeout(Some(self.linger.max(Duration::from_millis(1))));
        }
    }
}

impl Link for TcpLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn send(&self, to: usize, frame: Frame) -> std::result::Result<(), LinkError> {
        if to == self.rank {
            return self.own.0.send(frame).map_err(|_| LinkError::Closed);
        }
        let c = self.conn(to).ok_or(LinkError::Closed)?;
        let limit = self.limits[to].max_payload;
        // Checked here, where the peer would close the link on it: not sent, and said why.
        if frame.payload.len() as u64 > limit || frame.header.len() > wire::MAX_HEADER as usize {
            return Err(LinkError::Unsendable(format!(
                "a frame of {} header and {} payload bytes is over the {} and {limit} agreed with rank {to}",
                frame.header.len(),
                frame.payload.len(),
                wire::MAX_HEADER
            )));
        }
        c.out
            .send(Out::Data(frame))
            .map_err(|_| self.ended(to, false))
    }

    fn recv(&self, from: usize, deadline: Instant) -> std::result::Result<Frame, LinkError> {
        let data = if from == self.rank {
            &self.own.1
        } else {
            &self.conn(from).ok_or(LinkError::Closed)?.data
        };
        let timeout = deadline.saturating_duration_since(Instant::now());
        select_biased! {
            recv(self.control) -> abort => match abort {
                Ok(a) => Err(LinkError::Aborted { from: a.from, reason: a.reason }),
                Err(_) => Err(LinkError::Closed),
            },
            recv(data) -> frame => frame.map_err(|_| self.ended(from, false)),
            default(timeout) => match data.try_recv() {
                Ok(frame) => Ok(frame),
                Err(TryRecvError::Disconnected) => Err(self.ended(from, false)),
                Err(TryRecvError::Empty) => Err(LinkError::Timeout),
            },
        }
    }

    fn recv_any(
        &self,
        peers: &[usize],
        deadline: Instant,
    ) -> std::result::Result<(usize, Frame), LinkError> {
        let mut receivers: Vec<(usize, &Receiver<Frame>)> = Vec::with_capacity(peers.len());
        for &p in peers {
            if p == self.rank {
                receivers.push((p, &self.own.1));
            } else {
                // A peer with no connection (out of range) is gone, not a wait to the deadline.
                let c = self.conn(p).ok_or(LinkError::Gone(p))?;
                receivers.push((p, &c.data));
            }
        }
        super::select_any(&self.control, &receivers, deadline, |p| self.ended(p, true))
    }

    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        // Four heartbeats missed at least: a live peer on a loaded host is late, not silent.
        let longer_than = longer_than.max(self.heartbeat.saturating_mul(4));
        self.conns
            .iter()
            .enumerate()
            .filter_map(|(p, c)| c.as_ref().map(|c| (p, c)))
            .filter(|(_, c)| c.heard.silent_for() > longer_than)
            .map(|(p, _)| p)
            .collect()
    }

    fn abort(&self, reason: &str) {
        self.aborted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let reason = bounded_reason(reason);
        for c in self.conns.iter().flatten() {
            let _ = c.urgent.send(reason.clone());
        }
    }

    fn remote_abort(&self) -> Option<RemoteAbort> {
        let urgent: Vec<Sender<String>> = self
            .conns
            .iter()
            .flatten()
            .map(|c| c.urgent.clone())
            .collect();
        let (rank, me) = (self.rank, self.control_tx.clone());
        Some(Arc::new(move |reason: &str| {
            let reason = bounded_reason(reason);
            for u in &urgent {
                let _ = u.send(reason.clone());
            }
            let _ = me.send(Abort {
                from: rank,
                reason: reason.to_string(),
            });
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_have_nodelay_and_keepalive() {
        let links = TcpLink::loopback_mesh(3, &TcpOptions::default()).expect("mesh");
        for l in &links {
            for c in l.conns.iter().flatten() {
                let s = SockRef::from(&c.stream);
                assert!(s.tcp_nodelay().expect("nodelay"));
                assert!(s.keepalive().expect("keepalive"));
                assert_eq!(
                    s.tcp_keepalive_time().expect("idle"),
                    Duration::from_secs(1)
                );
            }
        }
    }

    /// A peer that trickles a byte at a time cannot stretch a handshake past its deadline (a
    /// timeout per read would restart at every byte).
    #[test]
    fn a_trickling_peer_cannot_stretch_a_handshake() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let trickler = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).expect("connect");
            // A valid-looking start, one byte every 50 ms, for up to 20 s.
            for _ in 0..400 {
                if c.write_all(&[1]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut s, _) = l.accept().expect("accept");
        let me = Hello::new(Purpose::Mesh, "j", 0, 2, 1 << 20, true).expect("hello");
        let t = Instant::now();
        let r = accept_side(
            &mut Deadlined {
                s: &mut s,
                deadline: deadline_from(Instant::now(), Duration::from_millis(300)),
            },
            &me,
            &JobToken::key(None),
        );
        assert!(
            matches!(&r, Err(handshake::HandshakeError::Broken(m)) if m.contains("deadline")),
            "{r:?}"
        );
        // By the deadline, far below the 20 s the trickle would last.
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        drop(s);
        let _ = trickler.join();
    }

    #[test]
    fn a_rank_can_send_itself_a_frame() {
        let links = TcpLink::loopback_mesh(2, &TcpOptions::default()).expect("mesh");
        let f = Frame {
            header: vec![1],
            payload: vec![2, 3],
        };
        links[1].send(1, f.clone()).expect("send");
        let soon = deadline_from(Instant::now(), Duration::from_secs(5));
        assert_eq!(links[1].recv(1, soon).expect("recv"), f);
    }

    #[test]
    fn a_failed_dial_ends_the_mesh_early_naming_the_rank() {
        // Rank 1 of 3 dials rank 0 at an address nobody listens on, with a long deadline: it
        // must not wait the deadline out for rank 2, which never comes either.
        let dead = TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let me = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addrs = [dead_addr, me.local_addr().expect("addr"), dead_addr];
        let o = TcpOptions {
            timeout: Duration::from_secs(120),
            ..TcpOptions::default()
        };
        let t = Instant::now();
        let e = TcpLink::connect_mesh(1, me, &addrs, &o).expect_err("nobody there");
        let text = e.to_string();
        assert!(
            text.contains("[0, 2]") && text.contains("rank 0") && text.contains("refused"),
            "{text}"
        );
        // By the refusal, not the deadline.
        assert!(t.elapsed() < o.timeout, "{:?}", t.elapsed());
    }
}
