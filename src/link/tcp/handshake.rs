//! The handshake that opens every TCP connection of a job (to the rendezvous store and between
//! ranks): nobody joins who does not belong.
//!
//! Each side sends a hello: magic, protocol version, purpose, job id, rank, world size, the
//! largest payload it accepts, whether it wants checksums, and a fresh 32-byte nonce. Each
//! checks the other's hello (a wrong version, job, world size or rank is refused with a message
//! that says which, sent to the peer before the connection closes). Then each proves it holds
//! the job token without sending it: a keyed BLAKE3 MAC, under a key derived from the token, of
//! both hellos (so both nonces) and the side's role. The proofs are compared in constant time.
//! A replayed handshake fails: the other side's nonce is new each time.
//!
//! ```text
//! connector                          acceptor
//!   Hello(c)          ─────────────▶   check c; Refuse, or
//!                     ◀─────────────   Hello(a), Proof(acceptor, c, a)
//!   check a and its proof; Refuse, or
//!   Proof(connector, c, a) ─────────▶  check the proof
//!                     ◀─────────────   Accept, or Refuse
//! ```
//!
//! Every message is `type (1 byte) | length (u16 LE) | body`, at most [`MAX_MESSAGE`] bytes of
//! body, read into a fixed buffer: a peer cannot make the handshake allocate.

use std::fmt;
use std::io::{self, Read, Write};

use subtle::ConstantTimeEq;

use super::wire::Limits;

/// The protocol this build speaks; a peer with another is refused. 2: the job probe's record
/// carries 13 numbers a figure set (the host's cached reduce), and its device phase one barrier
/// more.
pub const PROTOCOL_VERSION: u16 = 2;
/// The largest handshake message body.
pub const MAX_MESSAGE: usize = 1024;
/// The longest job id, in bytes.
pub const MAX_JOB: usize = 255;

const MAGIC: [u8; 8] = *b"WCCLTCP\0";
const HELLO: u8 = 1;
const PROOF: u8 = 2;
const ACCEPT: u8 = 3;
const REFUSE: u8 = 4;
const FLAG_CHECKSUMS: u8 = 1;

/// The job's shared secret. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(Vec<u8>);

impl fmt::Debug for JobToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobToken(<{} bytes>)", self.0.len())
    }
}

impl JobToken {
    /// A token from bytes (a passphrase, or the contents of a token file). Use 32 random
    /// bytes or more (`head -c 32 /dev/urandom | base64`): anyone who can reach a rank's port
    /// gets a MAC under the token to guess against offline, so a short passphrase is weak.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        let bytes = bytes.into();
        if bytes.len() < 16 {
            tracing::warn!(
                "a job token of {} bytes can be guessed offline; use 32 random bytes",
                bytes.len()
            );
        }
        JobToken(bytes)
    }

    /// The MAC key: derived from the token, never the token itself.
    pub(crate) fn key(token: Option<&JobToken>) -> [u8; 32] {
        let material: &[u8] = token.map_or(&[], |t| &t.0);
        blake3::derive_key("wccl 2026-11 job token v1", material)
    }
}

/// What a connection is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    /// A rank talking to the rendezvous store.
    Store = 1,
    /// A link between two ranks.
    Mesh = 2,
}

/// One side's hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// What the connection is for.
    pub purpose: Purpose,
    /// The job id (at most [`MAX_JOB`] bytes).
    pub job: String,
    /// The sender's rank.
    pub rank: u32,
    /// The job's world size.
    pub size: u32,
    /// The largest data payload the sender accepts.
    pub max_payload: u64,
    /// Whether the sender wants CRC32C on every frame.
    pub checksums: bool,
    /// A fresh random nonce.
    pub nonce: [u8; 32],
}

impl Hello {
    /// A hello with a fresh nonce from the OS.
    pub fn new(
        purpose: Purpose,
        job: &str,
        rank: u32,
        size: u32,
        max_payload: u64,
        checksums: bool,
    ) -> io::Result<Hello> {
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).map_err(|e| io::Error::other(e.to_string()))?;
        // Ids longer than a hello carries are hashed, so that two long ids stay distinct and
        // both ends compare what they sent.
        let job = if job.len() > MAX_JOB {
            blake3::hash(job.as_bytes()).to_hex().to_string()
        } else {
            job.to_string()
        };
        Ok(Hello {
            purpose,
            job,
            rank,
            size,
            max_payload,
            checksums,
            nonce,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let job = self.job.as_bytes();
        let job = &job[..job.len().min(MAX_JOB)];
        let mut b = Vec::with_capacity(64 + job.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        b.push(self.purpose as u8);
        b.push(if self.checksums { FLAG_CHECKSUMS } else { 0 });
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.max_payload.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.push(job.len() as u8);
        b.extend_from_slice(job);
        b
    }

    fn decode(b: &[u8]) -> Result<Hello, String> {
        let fixed = 8 + 2 + 1 + 1 + 4 + 4 + 8 + 32 + 1;
        if b.len() < fixed {
            return Err(format!("a hello of {} bytes is too short", b.len()));
        }
        if b[0..8] != MAGIC {
            return Err("not a wccl peer (bad magic)".into());
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let version = u16_at(8);
        if version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {version}, but this build speaks {PROTOCOL_VERSION}: run one wccl build on every rank"
            ));
        }
        let purpose = match b[10] {
            1 => Purpose::Store,
            2 => Purpose::Mesh,
            p => return Err(format!("unknown purpose {p}")),
        };
        if b[11] & !FLAG_CHECKSUMS != 0 {
            return Err(format!("unknown flags {:#04x}", b[11]));
        }
        let mut max = [0u8; 8];
        max.copy_from_slice(&b[20..28]);
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&b[28..60]);
        let job_len = usize::from(b[60]);
        if b.len() != fixed + job_len {
            return Err(format!(
                "a hello of {} bytes for a job id of {job_len}",
                b.len()
            ));
        }
        let job = std::str::from_utf8(&b[fixed..])
            .map_err(|_| "the job id is not UTF-8".to_string())?
            .to_string();
        Ok(Hello {
            purpose,
            job,
            rank: u32_at(12),
            size: u32_at(16),
            max_payload: u64::from_le_bytes(max),
            checksums: b[11] & FLAG_CHECKSUMS != 0,
            nonce,
        })
    }
}

/// Why a handshake failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer refused this side, and said why.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// This side refused the peer (the reason was sent to it too).
    #[error("refused the peer: {0}")]
    Rejected(String),
    /// The connection failed or broke the protocol mid-handshake.
    #[error("handshake failed: {0}")]
    Broken(String),
}

/// What both sides agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The peer's hello (its rank among others).
    pub peer: Hello,
    /// The frame limits of the connection: the smaller maximum, checksums if both want them.
    pub limits: Limits,
}

fn broken(e: io::Error) -> HandshakeError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HandshakeError::Broken("the peer did not answer before the deadline".into())
        }
        io::ErrorKind::UnexpectedEof => {
            HandshakeError::Broken("the peer closed the connection".into())
        }
        _ => HandshakeError::Broken(e.to_string()),
    }
}

fn send(s: &mut impl Write, kind: u8, body: &[u8]) -> Result<(), HandshakeError> {
    let body = &body[..body.len().min(MAX_MESSAGE)];
    let mut m = Vec::with_capacity(3 + body.len());
    m.push(kind);
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).and_then(|()| s.flush()).map_err(broken)
}

/// Reads one message into `buf`; returns its type and length. Bounded: nothing is allocated.
fn recv(s: &mut impl Read, buf: &mut [u8; MAX_MESSAGE]) -> Result<(u8, usize), HandshakeError> {
    let mut head = [0u8; 3];
    s.read_exact(&mut head).map_err(broken)?;
    let len = usize::from(u16::from_le_bytes([head[1], head[2]]));
    if len > MAX_MESSAGE {
        return Err(HandshakeError::Broken(format!(
            "a handshake message of {len} bytes (at most {MAX_MESSAGE})"
        )));
    }
    s.read_exact(&mut buf[..len]).map_err(broken)?;
    if head[0] == REFUSE {
        return Err(HandshakeError::Refused(
            String::from_utf8_lossy(&buf[..len]).into_owned(),
        ));
    }
    Ok((head[0], len))
}

/// Tells the peer why it is refused (best effort), and returns the error for this side.
fn refuse(s: &mut impl Write, reason: String) -> HandshakeError {
    let _ = send(s, REFUSE, reason.as_bytes());
    HandshakeError::Rejected(reason)
}

/// Checks the peer's hello against this side's; `expect_rank` is the rank this side dialled.
fn check(me: &Hello, peer: &Hello, expect_rank: Option<u32>) -> Result<(), String> {
    if peer.purpose != me.purpose {
        return Err(format!(
            "a {:?} connection reached a {:?} endpoint",
            peer.purpose, me.purpose
        ));
    }
    if peer.job != me.job {
        return Err(format!(
            "job '{}' is not job '{}' (a second job on the same port?)",
            peer.job, me.job
        ));
    }
    if peer.size != me.size {
        return Err(format!(
            "world size {} is not this job's {} (ranks launched with different sizes?)",
            peer.size, me.size
        ));
    }
    if peer.rank >= peer.size {
        return Err(format!(
            "rank {} is out of range for {} ranks",
            peer.rank, peer.size
        ));
    }
    if peer.purpose == Purpose::Mesh && peer.rank == me.rank {
        return Err(format!("rank {} connected to itself", peer.rank));
    }
    if let Some(r) = expect_rank.filter(|&r| r != peer.rank) {
        return Err(format!(
            "rank {} answered where rank {r} listens",
            peer.rank
        ));
    }
    Ok(())
}

fn proof(key: &[u8; 32], role: &[u8], c: &[u8], a: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(role);
    h.update(&(c.len() as u64).to_le_bytes());
    h.update(c);
    h.update(a);
    *h.finalize().as_bytes()
}

fn verify(expected: &[u8; 32], got: &[u8]) -> bool {
    got.len() == 32 && bool::from(expected.ct_eq(got))
}

fn agreed(me: &Hello, peer: Hello) -> Agreed {
    let limits = Limits {
        max_payload: me.max_payload.min(peer.max_payload),
        checksums: me.checksums && peer.checksums,
    };
    Agreed { peer, limits }
}

const WRONG_TOKEN: &str = "the job token does not match (set the same WCCL_JOB_TOKEN, or WCCL_JOB_TOKEN_FILE, on every rank)";

/// The dialling side: sends its hello, checks the peer's and its proof, proves itself.
pub fn connect_side<S: Read + Write>(
    s: &mut S,
    me: &Hello,
    expect_rank: Option<u32>,
    key: &[u8; 32],
) -> Result<Agreed, HandshakeError> {
    let mine = me.encode();
    send(s, HELLO, &mine)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let (kind, len) = recv(s, &mut buf)?;
    if kind != HELLO {
        return Err(refuse(s, format!("expected a hello, got message {kind}")));
    }
    let theirs = buf[..len].to_vec();
    let peer = Hello::decode(&theirs).map_err(|m| refuse(s, m))?;
    check(me, &peer, expect_rank).map_err(|m| refuse(s, m))?;
    let (kind, len) = recv(s, &mut buf)?;
    if kind != PROOF {
        return Err(refuse(s, format!("expected a proof, got message {kind}")));
    }
    if !verify(&proof(key, b"acceptor", &mine, &theirs), &buf[..len]) {
        return Err(refuse(s, WRONG_TOKEN.into()));
    }
    send(s, PROOF, &proof(key, b"connector", &mine, &theirs))?;
    let (kind, _) = recv(s, &mut buf)?;
    if kind != ACCEPT {
        return Err(HandshakeError::Broken(format!(
            "expected an accept, got message {kind}"
        )));
    }
    Ok(agreed(me, peer))
}

/// The accepting side: checks the dialler's hello, proves itself, checks the dialler's proof.
pub fn accept_side<S: Read + Write>(
    s: &mut S,
    me: &Hello,
    key: &[u8; 32],
) -> Result<Agreed, HandshakeError> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (kind, len) = recv(s, &mut buf)?;
    if kind != HELLO {
        return Err(refuse(s, format!("expected a hello, got message {kind}")));
    }
    let theirs = buf[..len].to_vec();
    let peer = Hello::decode(&theirs).map_err(|m| refuse(s, m))?;
    check(me, &peer, None).map_err(|m| refuse(s, m))?;
    let mine = me.encode();
    send(s, HELLO, &mine)?;
    send(s, PROOF, &proof(key, b"acceptor", &theirs, &mine))?;
    let (kind, len) = recv(s, &mut buf)?;
    if kind != PROOF {
        return Err(refuse(s, format!("expected a proof, got message {kind}")));
    }
    if !verify(&proof(key, b"connector", &theirs, &mine), &buf[..len]) {
        return Err(refuse(s, WRONG_TOKEN.into()));
    }
    send(s, ACCEPT, &[])?;
    Ok(agreed(me, peer))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn hello(rank: u32, job: &str) -> Hello {
        Hello::new(Purpose::Mesh, job, rank, 4, 1 << 20, true).expect("nonce")
    }

    /// Runs both sides over a socket pair.
    fn pair(
        c: Hello,
        ck: Option<&JobToken>,
        a: Hello,
        ak: Option<&JobToken>,
    ) -> (
        Result<Agreed, HandshakeError>,
        Result<Agreed, HandshakeError>,
    ) {
        let (mut x, mut y) = UnixStream::pair().expect("socket pair");
        let ak = JobToken::key(ak);
        let acceptor = std::thread::spawn(move || accept_side(&mut y, &a, &ak));
        let cr = connect_side(&mut x, &c, None, &JobToken::key(ck));
        drop(x);
        let ar = acceptor
            .join()
            .unwrap_or_else(|_| Err(HandshakeError::Broken("panicked".into())));
        (cr, ar)
    }

    #[test]
    fn matching_tokens_agree() {
        let t = JobToken::new("s3cret");
        let (c, a) = pair(hello(1, "j"), Some(&t), hello(0, "j"), Some(&t));
        assert_eq!(c.expect("connector").peer.rank, 0);
        assert_eq!(a.expect("acceptor").peer.rank, 1);
    }

    #[test]
    fn a_wrong_token_is_refused_on_both_sides() {
        let (c, a) = pair(
            hello(1, "j"),
            Some(&JobToken::new("a")),
            hello(0, "j"),
            Some(&JobToken::new("b")),
        );
        // The connector checks the acceptor's proof first and refuses it.
        assert!(
            matches!(&c, Err(HandshakeError::Rejected(m)) if m.contains("job token")),
            "{c:?}"
        );
        assert!(
            matches!(&a, Err(HandshakeError::Refused(m)) if m.contains("job token")),
            "{a:?}"
        );
    }

    #[test]
    fn another_job_is_refused_with_both_names() {
        let (c, a) = pair(hello(1, "job-b"), None, hello(0, "job-a"), None);
        assert!(
            matches!(&c, Err(HandshakeError::Refused(m)) if m.contains("job-a") && m.contains("job-b")),
            "{c:?}"
        );
        assert!(matches!(&a, Err(HandshakeError::Rejected(_))), "{a:?}");
    }

    #[test]
    fn a_replayed_connector_transcript_fails() {
        // Record what a connector sends to one acceptor, then replay it to a fresh acceptor.
        let t = JobToken::new("k");
        let (mut x, mut y) = UnixStream::pair().expect("socket pair");
        let a = hello(0, "j");
        let key = JobToken::key(Some(&t));
        let acceptor = std::thread::spawn(move || accept_side(&mut y, &a, &key));
        let c = hello(1, "j");
        // A recording connector: the real one, whose bytes we capture by running it over a
        // stream that tees writes.
        struct Tee<'a>(&'a mut UnixStream, Vec<u8>);
        impl Read for Tee<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                self.0.read(b)
            }
        }
        impl Write for Tee<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.1.extend_from_slice(b);
                self.0.write(b)
            }
            fn flush(&mut self) -> io::Result<()> {
                self.0.flush()
            }
        }
        let mut tee = Tee(&mut x, Vec::new());
        connect_side(&mut tee, &c, None, &JobToken::key(Some(&t))).expect("first handshake");
        let recorded = tee.1;
        assert!(acceptor.join().expect("join").is_ok());
        let (mut x2, mut y2) = UnixStream::pair().expect("socket pair");
        let a2 = hello(0, "j");
        let key = JobToken::key(Some(&t));
        let acceptor = std::thread::spawn(move || accept_side(&mut y2, &a2, &key));
        x2.write_all(&recorded).expect("replay");
        let r = acceptor.join().expect("join");
        assert!(
            matches!(&r, Err(HandshakeError::Rejected(m)) if m.contains("job token")),
            "{r:?}"
        );
    }
}
