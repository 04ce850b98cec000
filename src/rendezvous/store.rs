//! The rendezvous store that rank 0 serves, as NCCL's bootstrap root or torch's TCPStore: every
//! rank registers the port it listens on, and once all have, each gets the whole table (which
//! is also the barrier: nobody gets it before everyone registered). A rank that never registers
//! is named to every rank that did when the deadline passes.
//!
//! Every connection passes the job's handshake first ([`crate::link::tcp::handshake`]). After
//! it, messages are `kind (1 byte) | length (u32 LE) | body`, bodies at most [`MAX_BODY`]:
//! `Register(port: u16)`, `Table(per rank: length byte, address text)`, `Fail(message)`.
//!
//! The table holds, for each rank, the address rank 0 saw it connect from with the port it
//! registered (so a rank needs no idea of its own address), and for rank 0 the address each
//! rank reached it at.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::deadline::deadline_from;
use crate::link::TcpOptions;
use crate::link::tcp::handshake::{Hello, Purpose};
use crate::link::tcp::{Deadlined, accept_one, dial};

/// The largest store message body.
pub const MAX_BODY: usize = 1 << 20;

/// The most ranks a job over TCP may have: their table (a length byte and an address, up to
/// 22 bytes for IPv4 with its port) within one store message of [`MAX_BODY`]. Checked before
/// anything is allocated for them, so that a mistyped world size is an error, not rank 0
/// allocating for billions of ranks.
pub const MAX_JOB_RANKS: usize = 32768;

const REGISTER: u8 = 1;
const TABLE: u8 = 2;
const FAIL: u8 = 3;

fn write_msg(s: &mut TcpStream, kind: u8, body: &[u8]) -> std::io::Result<()> {
    let mut m = Vec::with_capacity(5 + body.len());
    m.push(kind);
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    s.write_all(&m)?;
    s.flush()
}

/// Reads one message; the length is checked before the body is allocated.
#[doc(hidden)] // public for tests/tcp_fuzz.rs only
pub fn read_msg(s: &mut impl Read) -> Result<(u8, Vec<u8>), String> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "no answer before the deadline".to_string()
        }
        std::io::ErrorKind::UnexpectedEof => "the connection closed".to_string(),
        _ => e.to_string(),
    })?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_BODY {
        return Err(format!(
            "a store message of {len} bytes (at most {MAX_BODY})"
        ));
    }
    let mut body = Vec::new();
    let got = s
        .take(len as u64)
        .read_to_end(&mut body)
        .map_err(|e| e.to_string())?;
    if got != len {
        return Err("the connection closed inside a message".into());
    }
    Ok((head[0], body))
}

fn encode_table(table: &[SocketAddr]) -> Vec<u8> {
    let mut b = Vec::new();
    for a in table {
        let s = a.to_string();
        b.push(s.len() as u8); // an address's text is under 64 bytes
        b.extend_from_slice(s.as_bytes());
    }
    b
}

/// Decodes a table of `size` addresses.
#[doc(hidden)] // public for tests/tcp_fuzz.rs only
pub fn decode_table(b: &[u8], size: usize) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::with_capacity(size.min(MAX_BODY));
    let mut rest = b;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        let Some((text, tail)) = (len <= tail.len()).then(|| tail.split_at(len)) else {
            return Err("a truncated address table".into());
        };
        let text = std::str::from_utf8(text).map_err(|_| "an address that is not text")?;
        out.push(
            text.parse::<SocketAddr>()
                .map_err(|_| format!("{text:?} is not an address"))?,
        );
        rest = tail;
    }
    if out.len() != size {
        return Err(format!(
            "a table of {} addresses for {size} ranks",
            out.len()
        ));
    }
    Ok(out)
}

/// Rank 0: serves the store on `listener` until every rank registered (then sends each the
/// table) or the deadline (then tells every registered rank who is missing). `own_port` is
/// rank 0's data port.
pub fn serve(
    listener: &TcpListener,
    size: usize,
    own_port: u16,
    o: &TcpOptions,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, String> {
    let size32 = u32::try_from(size).map_err(|_| format!("{size} ranks are too many"))?;
    let hello = Hello::new(Purpose::Store, &o.job, 0, size32, 0, false)
        .map_err(|e| format!("no random nonce: {e}"))?;
    // Per rank: the address it registered, and its connection (to answer).
    let mut reg: Vec<Option<(IpAddr, u16, TcpStream)>> = (0..size).map(|_| None).collect();
    let mut count = 1; // rank 0 itself
    let mut refused = Vec::new();
    while count < size {
        let (mut s, agreed) =
            match accept_one(listener, &hello, o, deadline, deadline, &mut refused) {
                Ok(x) => x,
                Err(_) => break, // the deadline
            };
        let peer = agreed.peer.rank as usize;
        let from = match s.peer_addr() {
            Ok(a) => a,
            Err(_) => continue,
        };
        // A short wait for the registration, by one deadline: the store serves one connection
        // at a time, and a rank stopped (or a peer trickling bytes) between handshake and
        // registration must not hold up the others.
        let until = deadline.min(deadline_from(Instant::now(), crate::link::tcp::HANDSHAKE));
        let msg = read_msg(&mut Deadlined {
            s: &mut s,
            deadline: until,
        });
        let port = match msg {
            Ok((REGISTER, b)) if b.len() == 2 => u16::from_le_bytes([b[0], b[1]]),
            Ok((k, _)) => {
                tracing::warn!(%from, "the store dropped a connection that sent message {k}");
                continue;
            }
            Err(e) => {
                tracing::warn!(%from, "the store dropped a connection: {e}");
                continue;
            }
        };
        if peer == 0 || reg[peer].is_some() {
            let first = reg[peer]
                .as_ref()
                .map(|(ip, p, _)| SocketAddr::new(*ip, *p).to_string())
                .unwrap_or_else(|| "rank 0 itself".into());
            let m = format!(
                "rank {peer} registered twice: from {from} and before from {first} (two processes launched with the same rank?)"
            );
            tracing::error!("{m}");
            let _ = write_msg(&mut s, FAIL, m.as_bytes());
            continue;
        }
        reg[peer] = Some((from.ip(), port, s));
        count += 1;
    }
    if count < size {
        let missing: Vec<String> = (1..size)
            .filter(|&r| reg[r].is_none())
            .map(|r| r.to_string())
            .collect();
        let registered: Vec<String> = std::iter::once("0".to_string())
            .chain(
                (1..size)
                    .filter(|&r| reg[r].is_some())
                    .map(|r| r.to_string()),
            )
            .collect();
        // Refused connections may be the missing ranks (a wrong token, another job's size):
        // say so, so that this side's error is as clear as theirs.
        let m = format!(
            "rank{} {} of {size} did not register within {:?}; registered: {}{}",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(","),
            o.timeout,
            registered.join(","),
            if refused.is_empty() {
                String::new()
            } else {
                format!("; refused: {}", refused.join("; "))
            }
        );
        for (_, _, s) in reg.iter_mut().flatten() {
            let _ = write_msg(s, FAIL, m.as_bytes());
        }
        return Err(m);
    }
    let mut table: Vec<SocketAddr> = reg
        .iter()
        .map(|r| match r {
            Some((ip, port, _)) => SocketAddr::new(*ip, *port),
            None => SocketAddr::new(IpAddr::from([127, 0, 0, 1]), own_port),
        })
        .collect();
    // Per recipient: rank 0 is where this rank reached it, and so is every rank that reached
    // rank 0 over loopback (it lives on rank 0's host, which another host reaches at that
    // address, not at its own loopback).
    // A recipient's table depends only on the address it reached rank 0 at: one table per
    // such address (a few), not one per rank (n tables of n entries: gigabytes at thousands
    // of ranks).
    let mut tables: Vec<(Option<IpAddr>, Vec<u8>)> = Vec::new();
    let mut which = Vec::new();
    for (_, _, s) in reg.iter().flatten() {
        let local = s.local_addr().ok().map(|a| a.ip());
        let i = match tables.iter().position(|(ip, _)| *ip == local) {
            Some(i) => i,
            None => {
                let t = match local {
                    Some(ip) => encode_table(&table_for(&table, ip, own_port)),
                    None => encode_table(&table),
                };
                tables.push((local, t));
                tables.len() - 1
            }
        };
        which.push(i);
    }
    // A table no rank would take (long IPv6 addresses near `MAX_JOB_RANKS`): every rank told
    // why, not each left to refuse it.
    if let Some((_, t)) = tables.iter().find(|(_, t)| t.len() > MAX_BODY) {
        let m = format!(
            "the address table of {size} ranks takes {} bytes, over the store's {MAX_BODY}",
            t.len()
        );
        for (_, _, s) in reg.iter_mut().flatten() {
            let _ = write_msg(s, FAIL, m.as_bytes());
        }
        return Err(m);
    }
    for ((_, _, s), &i) in reg.iter_mut().flatten().zip(&which) {
        if let Err(e) = write_msg(s, TABLE, &tables[i].1) {
            tracing::warn!("the store could not send the table: {e}");
        }
    }
    // Rank 0's own view: it needs no address of its own to dial anyone.
    table[0] = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), own_port);
    Ok(table)
}

/// The table as a rank that reached rank 0 at `rank0_ip` must see it: rank 0 there, and every
/// rank that registered over loopback (on rank 0's host) at that address too.
fn table_for(table: &[SocketAddr], rank0_ip: IpAddr, own_port: u16) -> Vec<SocketAddr> {
    let mut theirs = table.to_vec();
    for a in theirs.iter_mut().skip(1) {
        if a.ip().is_loopback() {
            a.set_ip(rank0_ip);
        }
    }
    if let Some(first) = theirs.first_mut() {
        *first = SocketAddr::new(rank0_ip, own_port);
    }
    theirs
}

/// Why a registration failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// No store of this job took the registration (nobody there, another job, a refusal):
    /// where the address may be stale (a file), trying again may help.
    Unreached(String),
    /// The store took it, and then the job failed (a rank missing, one registered twice), or
    /// the answer was bad: final.
    Failed(String),
}

impl RegisterError {
    /// The message.
    pub fn message(self) -> String {
        match self {
            RegisterError::Unreached(m) | RegisterError::Failed(m) => m,
        }
    }
}

/// Ranks 1..: registers `port` at the store at `store` (dialling until `dial_deadline`) and
/// waits for the table (until `deadline`).
pub fn register(
    store: SocketAddr,
    rank: usize,
    size: usize,
    port: u16,
    o: &TcpOptions,
    dial_deadline: Instant,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, RegisterError> {
    use RegisterError::{Failed, Unreached};
    let (rank32, size32) = match (u32::try_from(rank), u32::try_from(size)) {
        (Ok(r), Ok(s)) => (r, s),
        _ => return Err(Failed(format!("{size} ranks are too many"))),
    };
    let hello = Hello::new(Purpose::Store, &o.job, rank32, size32, 0, false)
        .map_err(|e| Failed(format!("no random nonce: {e}")))?;
    let (mut s, _) = dial(store, &hello, Some(0), o, dial_deadline.min(deadline), true)
        .map_err(|e| Unreached(format!("the rendezvous store (rank 0): {e}")))?;
    write_msg(&mut s, REGISTER, &port.to_le_bytes())
        .map_err(|e| Unreached(format!("registering at {store}: {e}")))?;
    // The table comes once every rank registered: wait until the deadline, and a little
    // longer than rank 0 does, so that its message naming the missing ranks arrives.
    let wait = deadline_from(deadline, Duration::from_secs(2));
    let answer = read_msg(&mut Deadlined {
        s: &mut s,
        deadline: wait,
    });
    match answer {
        Ok((TABLE, b)) => decode_table(&b, size).map_err(Failed),
        Ok((FAIL, b)) => Err(Failed(String::from_utf8_lossy(&b).into_owned())),
        Ok((k, _)) => Err(Failed(format!("the store sent message {k}"))),
        Err(e) => Err(Failed(format!(
            "waiting for the table from rank 0 at {store}: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_round_trip_and_bad_ones_are_refused() {
        let t: Vec<SocketAddr> = vec![
            "127.0.0.1:5".parse().expect("addr"),
            "[::1]:65535".parse().expect("addr"),
        ];
        let b = encode_table(&t);
        assert_eq!(decode_table(&b, 2), Ok(t));
        assert!(decode_table(&b, 3).is_err());
        assert!(decode_table(&b[..b.len() - 1], 2).is_err());
        assert!(decode_table(&[200, b'x'], 1).is_err());
    }

    #[test]
    fn ranks_on_rank_0s_host_are_shown_at_its_address_to_other_hosts() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let table = [a("127.0.0.1:1"), a("127.0.1.1:7001"), a("10.0.0.2:7002")];
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            table_for(&table, ip, 7000),
            [a("10.0.0.1:7000"), a("10.0.0.1:7001"), a("10.0.0.2:7002")]
        );
        // A rank on rank 0's host, which reached it over loopback, keeps loopback.
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(table_for(&table, lo, 7000)[1], a("127.0.0.1:7001"));
    }

    #[test]
    fn a_huge_message_is_refused_before_allocation() {
        let mut m = vec![TABLE];
        m.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_msg(&mut &m[..]).expect_err("too long");
        assert!(e.contains("at most"), "{e}");
    }
}
