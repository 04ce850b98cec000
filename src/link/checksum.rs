//! Payload integrity above a link that cannot vouch for it: each frame carries a CRC32C of its
//! header and payload (the same checksum the TCP transport puts on the wire), computed by the
//! sender before the frame enters the link and checked by the receiver before anyone reads it.
//! A frame that fails is [`LinkError::Corrupt`] naming the sender: the communicator reports it
//! as [`Error::Corrupt`](crate::Error::Corrupt) and never folds the payload in.
//!
//! Where corruption can happen decides where the checksum goes. TCP checksums what crosses the
//! wire itself; channels inside one process do not corrupt. A [`FaultyLink`](super::FaultyLink)
//! can ([`FaultPlan::corrupt_next`](super::FaultPlan::corrupt_next)), so
//! [`LinkStack`](super::LinkStack) puts this layer around it whenever it injects faults:
//! `Checksummed<FaultyLink<L>>`, the checksum above the medium that flips the bits, as TCP's is
//! above the network.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use wccl::link::{Checksummed, FaultPlan, Frame, Link, LinkError, in_process_mesh};
//! let faults = FaultPlan::new();
//! let links: Vec<_> = faults.wrap(in_process_mesh(2)).into_iter().map(Checksummed::new).collect();
//! faults.corrupt_next(0, 1, 1);
//! let frame = Frame { header: vec![1], payload: vec![7; 64] };
//! links[0].send(1, frame.clone()).unwrap();
//! links[0].send(1, frame.clone()).unwrap();
//! let deadline = Instant::now() + Duration::from_secs(5);
//! assert!(matches!(links[1].recv(0, deadline), Err(LinkError::Corrupt { peer: 0, .. })));
//! assert_eq!(links[1].recv(0, deadline), Ok(frame)); // the next frame is intact
//! ```

use std::time::{Duration, Instant};

use super::{Frame, Link, LinkError, RemoteAbort};

/// Bytes the checksum adds to each frame's header.
const TRAILER: usize = 4;

/// A [`Link`] whose frames carry a CRC32C of header and payload, checked on receipt.
#[derive(Debug)]
pub struct Checksummed<L: Link> {
    inner: L,
}

impl<L: Link> Checksummed<L> {
    /// Checksums the frames sent over `inner` and checks those received from it (the peers'
    /// links must be wrapped too).
    pub fn new(inner: L) -> Self {
        Checksummed { inner }
    }

    /// The wrapped link.
    pub fn inner(&self) -> &L {
        &self.inner
    }
}

fn crc(header: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header), payload)
}

/// The frame as sent: the checksum stripped, or why it cannot be trusted.
fn verify(peer: usize, mut frame: Frame) -> Result<Frame, LinkError> {
    let Some(at) = frame.header.len().checked_sub(TRAILER) else {
        return Err(LinkError::Corrupt {
            peer,
            reason: format!(
                "a frame header of {} bytes, too short to hold its checksum",
                frame.header.len()
            ),
        });
    };
    let mut trailer = [0u8; TRAILER];
    trailer.copy_from_slice(&frame.header[at..]);
    let expected = u32::from_le_bytes(trailer);
    frame.header.truncate(at);
    let actual = crc(&frame.header, &frame.payload);
    if actual != expected {
        return Err(LinkError::Corrupt {
            peer,
            reason: format!(
                "the CRC32C of a frame ({} payload bytes) is {actual:08x}, its sender's was \
                 {expected:08x}",
                frame.payload.len()
            ),
        });
    }
    Ok(frame)
}

impl<L: Link> Link for Checksummed<L> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn send(&self, to: usize, mut frame: Frame) -> Result<(), LinkError> {
        let sum = crc(&frame.header, &frame.payload);
        frame.header.extend_from_slice(&sum.to_le_bytes());
        self.inner.send(to, frame)
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        verify(from, self.inner.recv(from, deadline)?)
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        let (from, frame) = self.inner.recv_any(peers, deadline)?;
        Ok((from, verify(from, frame)?))
    }

    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        self.inner.silent_peers(longer_than)
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    fn remote_abort(&self) -> Option<RemoteAbort> {
        self.inner.remote_abort()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{FaultPlan, in_process_mesh};

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn frame(tag: u8, len: usize) -> Frame {
        Frame {
            header: vec![tag, 3, 5],
            payload: (0..len).map(|i| (i % 251) as u8 ^ tag).collect(),
        }
    }

    #[test]
    fn intact_frames_pass_with_the_checksum_stripped() {
        let links: Vec<_> = in_process_mesh(2)
            .into_iter()
            .map(Checksummed::new)
            .collect();
        for len in [0, 1, 4097] {
            links[0].send(1, frame(9, len)).expect("send");
            assert_eq!(links[1].recv(0, soon()), Ok(frame(9, len)));
            links[1].send(0, frame(4, len)).expect("send");
            assert_eq!(links[0].recv_any(&[1], soon()), Ok((1, frame(4, len))));
        }
    }

    /// Every corrupted frame is refused, naming its sender, whatever its size; the frames
    /// around it pass; a frame with no room for a checksum is refused too.
    #[test]
    fn a_flipped_bit_is_refused_and_names_the_sender() {
        let plan = FaultPlan::new();
        let links: Vec<_> = plan
            .wrap(in_process_mesh(3))
            .into_iter()
            .map(Checksummed::new)
            .collect();
        for len in [0, 1, 100, 4096] {
            plan.corrupt_next(2, 0, 1);
            links[2].send(0, frame(1, len)).expect("send");
            links[2].send(0, frame(2, len)).expect("send");
            let got = links[0].recv_any(&[1, 2], soon());
            assert!(
                matches!(&got, Err(LinkError::Corrupt { peer: 2, .. })),
                "{len} bytes: {got:?}"
            );
            assert_eq!(links[0].recv(2, soon()), Ok(frame(2, len)), "{len} bytes");
        }
        // A peer that does not checksum (or a header cut short): refused, not a panic.
        let raw = in_process_mesh(2);
        raw[1].send(0, Frame::default()).expect("send");
        let lone = Checksummed::new(raw.into_iter().next().expect("two links"));
        assert!(matches!(
            lone.recv(1, soon()),
            Err(LinkError::Corrupt { peer: 1, .. })
        ));
    }
}
