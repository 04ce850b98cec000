//! Rendezvous: how the ranks of a job, one process each, find each other.
//!
//! 1. Every rank binds a listener for its links (loopback only without a job token; every
//!    interface with one).
//! 2. Rank 0 serves a small store at the master address ([`Master`]); every other rank dials
//!    it (staggered by rank, so that rank 0 is not flooded by a thousand at once), proves it
//!    belongs to the job (the handshake), and registers its port. When all have, each gets the
//!    table of every rank's address: that is the barrier. A rank that never registers is named
//!    to all the others when the rendezvous deadline passes.
//! 3. The ranks connect the mesh ([`TcpLink::connect_mesh`]).
//!
//! [`Launch`] reads the launcher's variables (torchrun, Open MPI, MPICH, Slurm, wccl's own);
//! [`crate::Communicator::from_env`] does all of it and opens the local rank's GPU.

pub mod env;
mod store;

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

pub use env::{Launch, Master, derived_port, token_from_vars};
#[doc(hidden)] // the store's decoders, public for tests/tcp_fuzz.rs only
pub use store::{MAX_JOB_RANKS, decode_table, read_msg};

use crate::deadline::deadline_from;
use crate::error::{At, Error, Result};
use crate::link::tcp::{allowed, needs_token};
use crate::link::{TcpLink, TcpOptions};

/// Listen backlog: a rendezvous of a thousand ranks must not see refused connections.
const BACKLOG: i32 = 1024;
/// The spacing of ranks' first dials to the store: rank r waits r of these (a thousand ranks
/// arrive over 0.2 s, about the rate rank 0 handshakes them one at a time, not all at once).
const STAGGER: Duration = Duration::from_micros(200);

fn err(rank: usize, message: String) -> Error {
    Error::Connect {
        at: At::rank(rank),
        message,
    }
}

/// Binds a listener with a large backlog. `SO_REUSEADDR` lets a restarted job reuse its port
/// while old connections linger in TIME_WAIT; a port another process listens on is still
/// refused (Linux allows one listener per address without `SO_REUSEPORT`).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Resolves a master host and port to one address, IPv4 first: the ranks' own listeners are
/// IPv4, and `localhost` resolves to `::1` first on some systems. An address needs no lookup;
/// a name is looked up on a thread of its own and waited for until `deadline`: the system's
/// resolver has timeouts, attempts and search domains of its own (minutes with the name
/// server down), not the job's. A lookup still running at the deadline is left to end on its
/// own thread.
fn resolve(rank: usize, host: &str, port: u16, deadline: Instant) -> Result<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let (tx, rx) = crossbeam::channel::bounded(1);
    let name = host.to_string();
    std::thread::Builder::new()
        .name("wccl resolve".into())
        .spawn(move || {
            let found = (name.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect::<Vec<SocketAddr>>());
            let _ = tx.send(found);
        })
        .map_err(|e| err(rank, format!("cannot start a name lookup: {e}")))?;
    let all = match rx.recv_deadline(deadline) {
        Ok(found) => found.map_err(|e| {
            err(
                rank,
                format!("cannot resolve the master address {host}:{port}: {e}"),
            )
        })?,
        Err(_) => {
            return Err(err(
                rank,
                format!(
                    "the master address {host}:{port} did not resolve by the deadline (the system's name lookup is slow or its name server unreachable)"
                ),
            ));
        }
    };
    all.iter()
        .find(|a| a.is_ipv4())
        .or_else(|| all.first())
        .copied()
        .ok_or_else(|| {
            err(
                rank,
                format!("the master address {host}:{port} resolves to nothing"),
            )
        })
}

/// Joins the job as `rank` of `size`: binds, meets the others at `master`, and connects the
/// mesh. Every step ends by [`TcpOptions::timeout`] with an error that names what is missing.
pub fn connect_link(rank: usize, size: usize, master: &Master, o: &TcpOptions) -> Result<TcpLink> {
    if size == 0 || rank >= size {
        return Err(err(
            rank,
            format!("rank {rank} is out of range for {size} ranks"),
        ));
    }
    if size > store::MAX_JOB_RANKS {
        return Err(err(
            rank,
            format!(
                "{size} ranks: a job over TCP has at most {}",
                store::MAX_JOB_RANKS
            ),
        ));
    }
    let deadline = deadline_from(Instant::now(), o.timeout);
    let any: IpAddr = if o.token.is_some() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::LOCALHOST.into()
    };
    let data = listen(SocketAddr::new(any, 0))
        .map_err(|e| err(rank, format!("cannot listen for links: {e}")))?;
    let port = data
        .local_addr()
        .map_err(|e| err(rank, format!("listener address: {e}")))?
        .port();
    let table = if rank == 0 {
        let (store, announce) = match master {
            Master::Tcp {
                host,
                port: p,
                from,
            } => {
                let addr = resolve(rank, host, *p, deadline)?;
                if !allowed(&addr, o) {
                    return Err(err(rank, needs_token(&addr)));
                }
                // With a token rank 0 listens on every interface, as torch's store does.
                let bind = if o.token.is_some() {
                    SocketAddr::new(any, *p)
                } else {
                    addr
                };
                let l = listen(bind).map_err(|e| {
                    let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                        format!(
                            " (another process, maybe another job, listens there; pick a free port with WCCL_MASTER_PORT; it came from {from})"
                        )
                    } else {
                        String::new()
                    };
                    err(rank, format!("the rendezvous store cannot listen on {bind}: {e}{hint}"))
                })?;
                (l, None)
            }
            Master::File(path) => {
                let l = listen(SocketAddr::new(any, 0))
                    .map_err(|e| err(rank, format!("the rendezvous store cannot listen: {e}")))?;
                (l, Some(path.clone()))
            }
        };
        if let Some(path) = &announce {
            let addr = store
                .local_addr()
                .map_err(|e| err(rank, format!("store address: {e}")))?;
            let shown = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port());
            write_file(path, &o.job, shown)
                .map_err(|e| err(rank, format!("cannot write {}: {e}", path.display())))?;
        }
        let r = store::serve(&store, size, port, o, deadline).map_err(|m| err(rank, m));
        if let Some(path) = &announce {
            // The address is of no use after the rendezvous; a stale one would mislead the
            // next job's ranks until its rank 0 replaced it. Only ours: a newer job may have
            // written the same path since.
            let ours = store.local_addr().map(|a| {
                format!(
                    "{}\n{}\n",
                    o.job,
                    SocketAddr::new(Ipv4Addr::LOCALHOST.into(), a.port())
                )
            });
            if fs::read_to_string(path).ok() == ours.ok() {
                let _ = fs::remove_file(path);
            }
        }
        r?
    } else {
        // Stagger the first dials: rank 0 accepts them one at a time.
        let stagger = STAGGER.saturating_mul(u32::try_from(rank).unwrap_or(u32::MAX));
        std::thread::sleep(stagger.min(deadline.saturating_duration_since(Instant::now())));
        match master {
            Master::Tcp { host, port: p, .. } => {
                let addr = resolve(rank, host, *p, deadline)?;
                store::register(addr, rank, size, port, o, deadline, deadline)
                    .map_err(|e| err(rank, e.message()))?
            }
            Master::File(path) => register_by_file(path, rank, size, port, o, deadline)?,
        }
    };
    let mesh_left = deadline.saturating_duration_since(Instant::now());
    let mesh = TcpOptions {
        timeout: mesh_left.max(Duration::from_secs(1)),
        ..o.clone()
    };
    TcpLink::connect_mesh(rank, data, &table, &mesh)
}

/// Writes `job addr` to `path` atomically (a temporary file renamed over it). The temporary
/// file is created new (`O_EXCL`, a leftover of this pid removed first): opened by name with
/// truncation, a symlink planted at that predictable name in a shared folder would have this
/// process overwrite whatever it points to.
fn write_file(path: &Path, job: &str, addr: SocketAddr) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = f.write_all(format!("{job}\n{addr}\n").as_bytes());
    drop(f);
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// Reads rank 0's address from the file (waiting for it to appear, and for a stale one from an
/// earlier job to be replaced), then registers there.
fn register_by_file(
    path: &Path,
    rank: usize,
    size: usize,
    port: u16,
    o: &TcpOptions,
    deadline: Instant,
) -> Result<Vec<SocketAddr>> {
    let mut last = String::from("the file does not exist yet");
    let mut backoff = Duration::from_millis(2);
    loop {
        if Instant::now() >= deadline {
            return Err(err(
                rank,
                format!(
                    "rank 0 did not publish its address in {} within {:?}: {last}",
                    path.display(),
                    o.timeout
                ),
            ));
        }
        match fs::read_to_string(path) {
            Ok(text) => {
                let mut lines = text.lines();
                match (lines.next(), lines.next().map(str::parse::<SocketAddr>)) {
                    (Some(j), Some(Ok(addr))) if j == o.job => {
                        // A short deadline per try: a stale address from a dead job is refused
                        // at once, and the file is read again.
                        let once = deadline_from(Instant::now(), Duration::from_secs(5));
                        match store::register(addr, rank, size, port, o, once, deadline) {
                            Ok(t) => return Ok(t),
                            // A store that did not take the registration (a stale address:
                            // nobody there, a hung old rank 0, another job) is tried again from
                            // the file until the deadline; one that took it and failed the job
                            // ends it.
                            Err(store::RegisterError::Unreached(e)) => last = e,
                            Err(store::RegisterError::Failed(e)) => return Err(err(rank, e)),
                        }
                    }
                    (Some(j), _) if j != o.job => {
                        last = format!("it names job '{j}', not '{}'", o.job);
                    }
                    _ => last = "it is incomplete".into(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        // Polling a file is the file rendezvous's design (Gloo's FileStore polls too).
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = backoff.saturating_mul(2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_too_large_is_refused_before_anything_is_made() {
        let master = Master::File("/nonexistent/wccl-rendezvous".into());
        let o = TcpOptions::default();
        for size in [MAX_JOB_RANKS + 1, usize::MAX] {
            match connect_link(0, size, &master, &o) {
                Err(Error::Connect { message, .. }) => {
                    assert!(message.contains("at most"), "{message}")
                }
                other => panic!("{size} ranks: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn master_addresses_resolve_by_the_deadline() {
        let soon = crate::deadline::deadline_after(std::time::Duration::from_secs(10));
        // An address: no lookup, even with the deadline passed.
        let past = Instant::now();
        let a = resolve(1, "10.1.2.3", 29500, past).expect("an address");
        assert_eq!(
            a,
            "10.1.2.3:29500".parse::<SocketAddr>().expect("an address")
        );
        let a = resolve(1, "::1", 29500, past).expect("an IPv6 address");
        assert!(a.is_ipv6());
        // A name: looked up (IPv4 first), in time.
        let a = resolve(1, "localhost", 29500, soon).expect("localhost");
        assert!(a.ip().is_loopback() && a.port() == 29500, "{a}");
    }

    #[cfg(unix)]
    #[test]
    fn the_rendezvous_file_is_written_through_no_planted_link() {
        let tmp_dir = tempfile::tempdir().expect("a temporary folder");
        let dir = tmp_dir.path();
        let path = dir.join("rdv");
        let victim = dir.join("victim");
        fs::write(&victim, "keep").expect("a file");
        // Where the temporary file will be: a link to the victim, planted before.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&victim, &tmp).expect("a symlink");
        let addr: SocketAddr = "127.0.0.1:4242".parse().expect("an address");
        write_file(&path, "job", addr).expect("written");
        assert_eq!(fs::read_to_string(&victim).expect("read"), "keep");
        assert_eq!(
            fs::read_to_string(&path).expect("read"),
            "job\n127.0.0.1:4242\n"
        );
        assert!(!tmp.exists());
    }
}
