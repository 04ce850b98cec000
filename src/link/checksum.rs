//! Payload integrity above a link that cannot vouch for it: each frame carries a CRC32C of its
//! header and payload (the same checksum the TCP transport puts on the wire), computed by the
//! sender before the frame enters the link and checked by the receiver before anyone reads it.
//! A frame that fails is [`LinkError::Corrupt`] naming the sender: the communicator reports it
//! as [`Error::Corrupt`](crate::Error::Corrupt) and never folds the payload in. The pair is
//! then closed on both sides, as TCP closes a connection after a bad frame.
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
//! // The pair is closed on both sides, as TCP would close it: the sender is told.
//! assert!(matches!(links[0].recv(1, deadline), Err(LinkError::Corrupt { peer: 1, .. })));
//! assert!(links[0].send(1, frame).is_err());
//! ```

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Frame, Link, LinkError, RemoteAbort};

/// Bytes the checksum adds to each frame's header.
const TRAILER: usize = 4;

/// The header of the frame that tells a peer its frame was refused and the link to it closed
/// (no trailer, no payload: it is recognised before any check).
const CLOSED: [u8; 16] = *b"wcclCRC-REFUSED\0";

/// A [`Link`] whose frames carry a CRC32C of header and payload, checked on receipt.
///
/// After a corrupt frame from a peer, nothing more from that peer can be trusted: as TCP closes
/// the connection, this closes the pair on both sides. It tells the peer with a marker frame;
/// from then on this rank's sends to and receives from the peer fail (`Corrupt` naming it), and
/// so do the peer's once it has read the marker (a peer that only sends, as a ring's sender
/// to its successor, finds out at its next receive from this rank, or by the abort that
/// follows).
#[derive(Debug)]
pub struct Checksummed<L: Link> {
    inner: L,
    /// Peers whose link is closed since a corrupt frame (theirs or ours).
    closed: Mutex<BTreeSet<usize>>,
}

impl<L: Link> Checksummed<L> {
    /// Checksums the frames sent over `inner` and checks those received from it (the peers'
    /// links must be wrapped too).
    pub fn new(inner: L) -> Self {
        Checksummed {
            inner,
            closed: Mutex::new(BTreeSet::new()),
        }
    }

    fn closed(&self) -> MutexGuard<'_, BTreeSet<usize>> {
        // A panic elsewhere while holding the lock leaves a plain set; keep using it.
        self.closed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed_error(peer: usize) -> LinkError {
        LinkError::Corrupt {
            peer,
            reason: "the link was closed after a frame between the two failed its checks".into(),
        }
    }

    /// A received frame checked: the frame, or the error that closes the pair.
    fn receive(&self, peer: usize, frame: Frame) -> Result<Frame, LinkError> {
        if frame.header == CLOSED && frame.payload.is_empty() {
            self.closed().insert(peer);
            return Err(LinkError::Corrupt {
                peer,
                reason: "it refused a corrupt frame from this rank and closed the link".into(),
            });
        }
        verify(peer, frame).inspect_err(|_| {
            if self.closed().insert(peer) {
                // Best effort, as TCP's close: a peer that cannot be told finds out at its
                // deadline.
                let _ = self.inner.send(
                    peer,
                    Frame {
                        header: CLOSED.to_vec(),
                        payload: Vec::new(),
                    },
                );
            }
        })
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
        if self.closed().contains(&to) {
            return Err(Self::closed_error(to));
        }
        let sum = crc(&frame.header, &frame.payload);
        frame.header.extend_from_slice(&sum.to_le_bytes());
        self.inner.send(to, frame)
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        if self.closed().contains(&from) {
            return Err(Self::closed_error(from));
        }
        let frame = self.inner.recv(from, deadline)?;
        self.receive(from, frame)
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        if let Some(&p) = peers.iter().find(|p| self.closed().contains(p)) {
            return Err(Self::closed_error(p));
        }
        let (from, frame) = self.inner.recv_any(peers, deadline)?;
        Ok((from, self.receive(from, frame)?))
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

    /// Every corrupted frame is refused, naming its sender, whatever its size, and closes the
    /// pair on both sides (the other pairs go on); a frame with no room for a checksum is
    /// refused too.
    #[test]
    fn a_flipped_bit_is_refused_and_names_the_sender() {
        for len in [0, 1, 100, 4096] {
            let plan = FaultPlan::new();
            let links: Vec<_> = plan
                .wrap(in_process_mesh(3))
                .into_iter()
                .map(Checksummed::new)
                .collect();
            plan.corrupt_next(2, 0, 1);
            links[2].send(0, frame(1, len)).expect("send");
            links[2].send(0, frame(2, len)).expect("send");
            let got = links[0].recv_any(&[1, 2], soon());
            assert!(
                matches!(&got, Err(LinkError::Corrupt { peer: 2, .. })),
                "{len} bytes: {got:?}"
            );
            // Closed both ways: the next frame is not used, and the sender is told.
            assert!(matches!(
                links[0].recv(2, soon()),
                Err(LinkError::Corrupt { peer: 2, .. })
            ));
            assert!(links[0].send(2, frame(3, len)).is_err());
            assert!(matches!(
                links[2].recv(0, soon()),
                Err(LinkError::Corrupt { peer: 0, .. })
            ));
            assert!(links[2].send(0, frame(4, len)).is_err());
            // The other pairs are intact.
            links[1].send(0, frame(5, len)).expect("send");
            assert_eq!(links[0].recv(1, soon()), Ok(frame(5, len)), "{len} bytes");
            links[2].send(1, frame(6, len)).expect("send");
            assert_eq!(links[1].recv(2, soon()), Ok(frame(6, len)), "{len} bytes");
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
