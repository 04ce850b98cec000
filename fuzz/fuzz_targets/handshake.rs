//! The accepting side of the handshake, with the input as everything the dialling peer sends.
//! The acceptor's own hello is fixed (a fixed nonce), so that libFuzzer can learn a hello that
//! passes the checks; a proof it cannot forge without the key. Any panic, an agreement, or an
//! allocation past twice the input and 1 MiB is a finding.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use wccl::link::tcp::handshake::{Hello, Purpose, accept_side};

mod bounded;

#[global_allocator]
static ALLOC: bounded::Counting = bounded::Counting;

/// The peer's bytes in, this side's answers discarded.
struct Peer<'a>(&'a [u8]);

impl Read for Peer<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.0.read(b)
    }
}

impl Write for Peer<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const KEY: [u8; 32] = *b"wccl fuzz: a job token's MAC key";

fuzz_target!(|data: &[u8]| {
    let me = Hello {
        purpose: Purpose::Mesh,
        job: "fuzz-job".into(),
        rank: 0,
        size: 4,
        max_payload: 1 << 20,
        checksums: true,
        nonce: [7; 32],
    };
    let r = bounded::bounded(data.len(), || accept_side(&mut Peer(data), &me, &KEY));
    assert!(
        r.is_err(),
        "bytes that do not know the key were accepted: {r:?}"
    );
});
