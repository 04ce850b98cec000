//! The TCP link measured against a raw socket between the same two processes: an echo of
//! `count` chunks with `window` in flight, through a plain `TcpStream` (the floor: what the
//! kernel's loopback copies) and through a [`TcpLink`] (framing, checksums, reader and writer
//! threads, channels). Both echo the same bytes the same way, so their ratio is the link's
//! overhead. `wccl-bench tcp-probe` runs it, the second process being `wccl-bench` itself.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::deadline::deadline_from;
use crate::link::{Frame, Link, LinkError};

fn tune(s: &TcpStream) -> std::io::Result<()> {
    // The link's own settings, so that the floor is measured on the same socket options.
    let r = socket2::SockRef::from(s);
    r.set_tcp_nodelay(true)?;
    let _ = r.set_send_buffer_size(4 << 20);
    let _ = r.set_recv_buffer_size(4 << 20);
    Ok(())
}

/// The measuring side of the raw echo: seconds to send `count` chunks of `chunk` bytes and read
/// each back, `window` chunks in flight.
pub fn raw_echo_send(
    stream: TcpStream,
    chunk: usize,
    count: usize,
    window: usize,
) -> std::io::Result<f64> {
    tune(&stream)?;
    let mut reader = stream.try_clone()?;
    let (tokens_tx, tokens) = mpsc::sync_channel::<()>(window.max(1));
    for _ in 0..window.max(1) {
        let _ = tokens_tx.send(());
    }
    let t = Instant::now();
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; chunk];
        for _ in 0..count {
            reader.read_exact(&mut buf)?;
            // The writer may have finished; a closed token channel is not an error.
            let _ = tokens_tx.send(());
        }
        Ok(())
    });
    let mut w = stream;
    let data = vec![0xA5u8; chunk];
    let mut sent = Ok(());
    for _ in 0..count {
        if tokens.recv_timeout(Duration::from_secs(60)).is_err() {
            sent = Err(std::io::Error::other("no echo within 60 s"));
            break;
        }
        if let Err(e) = w.write_all(&data) {
            sent = Err(e);
            break;
        }
    }
    if sent.is_err() {
        // Unblocks the echo thread's read.
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    let echoed = echo
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the echo thread panicked")));
    sent?;
    echoed?;
    Ok(t.elapsed().as_secs_f64())
}

/// The echoing side of the raw echo: reads chunks and writes them back until the stream ends.
pub fn raw_echo_serve(mut stream: TcpStream, chunk: usize) -> std::io::Result<()> {
    tune(&stream)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut buf = vec![0u8; chunk];
    loop {
        match stream.read_exact(&mut buf) {
            Ok(()) => stream.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The measuring side of the link echo: seconds to send `count` frames of `chunk` payload bytes
/// to `peer` and receive each back, `window` in flight. The frames echoed back are sent again,
/// so neither side allocates in steady state (as in a ring, where a rank sends what it got).
pub fn link_echo_send(
    link: &dyn Link,
    peer: usize,
    chunk: usize,
    count: usize,
    window: usize,
) -> Result<f64, LinkError> {
    let t = Instant::now();
    let window = window.clamp(1, count.max(1));
    for _ in 0..window.min(count) {
        link.send(
            peer,
            Frame {
                header: vec![0; 16],
                payload: vec![0xA5; chunk],
            },
        )?;
    }
    let mut sent = window.min(count);
    for _ in 0..count {
        let f = link.recv(peer, deadline_from(Instant::now(), Duration::from_secs(60)))?;
        if sent < count {
            link.send(peer, f)?;
            sent += 1;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The echoing side of the link echo: sends back `count` frames from `peer`.
pub fn link_echo_serve(link: &dyn Link, peer: usize, count: usize) -> Result<(), LinkError> {
    for _ in 0..count {
        let f = link.recv(peer, deadline_from(Instant::now(), Duration::from_secs(60)))?;
        link.send(peer, f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{TcpLink, TcpOptions};

    #[test]
    fn both_echoes_run_in_one_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            raw_echo_serve(s, 1000)
        });
        let s = TcpStream::connect(addr).expect("connect");
        let secs = raw_echo_send(s, 1000, 50, 4).expect("raw echo");
        assert!(secs > 0.0);
        server.join().expect("join").expect("serve");

        let mut links = TcpLink::loopback_mesh(2, &TcpOptions::default()).expect("mesh");
        let b = links.pop().expect("rank 1");
        let a = links.pop().expect("rank 0");
        let echo = std::thread::spawn(move || link_echo_serve(&b, 0, 50));
        link_echo_send(&a, 1, 1000, 50, 4).expect("link echo");
        echo.join().expect("join").expect("serve");
    }
}
