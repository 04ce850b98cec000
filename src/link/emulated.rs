//! A link wrapper that behaves like a network: each rank's outgoing frames share one egress of
//! a given bandwidth (as a NIC does), and each frame arrives a latency (plus random jitter)
//! after its last byte left. Used to show how algorithms behave when links, not devices, are the
//! bottleneck.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Frame, Link, LinkError};
use crate::deadline::deadline_from;

/// Link characteristics to emulate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkEmulation {
    /// Egress bandwidth of each rank, GB/s.
    pub gbps: f64,
    /// One-way latency, microseconds.
    pub latency_us: f64,
    /// Extra uniformly random delay per frame, up to this many microseconds.
    pub jitter_us: f64,
}

impl LinkEmulation {
    /// Seconds the egress is busy with `bytes`.
    pub fn wire_seconds(&self, bytes: f64) -> f64 {
        bytes / (self.gbps * 1e9)
    }
}

/// Bytes this wrapper puts before the inner header: the delivery time, in nanoseconds since the
/// mesh's common epoch.
const STAMP: usize = 8;

/// A [`Link`] with emulated bandwidth, latency and jitter around another link.
pub struct EmulatedLink<L: Link> {
    inner: L,
    emu: LinkEmulation,
    epoch: Instant,
    state: Mutex<EgressState>,
    /// Frames taken from the inner link that were due after the receive's deadline: still on
    /// the emulated wire, kept for the next receive (at most one per peer, the oldest from it,
    /// so each peer's frames stay in order). A receive that waits in slices, as a
    /// [`FaultyLink`](super::FaultyLink) around this one does, must not lose them.
    held: Mutex<Vec<Held>>,
}

/// A frame received before its delivery time, with that time and its sender.
struct Held {
    from: usize,
    at: Instant,
    frame: Frame,
}

impl<L: Link> std::fmt::Debug for EmulatedLink<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatedLink")
            .field("rank", &self.inner.rank())
            .field("emu", &self.emu)
            .finish_non_exhaustive()
    }
}

struct EgressState {
    free_at: Instant,
    rng: u64,
}

/// A duration from emulation settings in seconds; a negative or NaN figure (a zero bandwidth
/// gives infinity) becomes zero or the far future instead of a panic in `from_secs_f64`.
fn seconds(x: f64) -> Duration {
    if x.is_nan() || x <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(x).unwrap_or(crate::deadline::FAR_FUTURE)
    }
}

impl<L: Link> EmulatedLink<L> {
    /// Wraps `inner`; every link of one mesh must share `epoch`.
    pub fn new(inner: L, emu: LinkEmulation, epoch: Instant) -> Self {
        let seed =
            0x9E37_79B9_7F4A_7C15 ^ (inner.rank() as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        EmulatedLink {
            inner,
            emu,
            epoch,
            state: Mutex::new(EgressState {
                free_at: epoch,
                rng: seed,
            }),
            held: Mutex::new(Vec::new()),
        }
    }
}

/// splitmix64: enough randomness for jitter.
fn next_random(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

impl<L: Link> Link for EmulatedLink<L> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn send(&self, to: usize, frame: Frame) -> Result<(), LinkError> {
        let bytes = (frame.header.len() + frame.payload.len()) as f64;
        let deliver = {
            let mut s = self.state.lock().map_err(|_| LinkError::Closed)?;
            let start = s.free_at.max(Instant::now());
            s.free_at = deadline_from(start, seconds(self.emu.wire_seconds(bytes)));
            let jitter = self.emu.jitter_us * next_random(&mut s.rng);
            deadline_from(s.free_at, seconds((self.emu.latency_us + jitter) * 1e-6))
        };
        let stamp = deliver.saturating_duration_since(self.epoch).as_nanos() as u64;
        let mut header = stamp.to_le_bytes().to_vec();
        header.extend_from_slice(&frame.header);
        self.inner.send(
            to,
            Frame {
                header,
                payload: frame.payload,
            },
        )
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        // A held frame is the oldest from its peer: it goes before anything still inside.
        let held = self.take_held(|h| h.from == from)?;
        let held = match held {
            Some(h) => h,
            None => self.unstamp(from, self.inner.recv(from, deadline)?)?,
        };
        self.deliver(held, deadline)
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        // The earliest held frame among `peers` first; the inner link is read only when none
        // is held, so at most one frame per peer is ever held.
        let held = self.take_held(|h| peers.contains(&h.from))?;
        let held = match held {
            Some(h) => h,
            None => {
                let (peer, frame) = self.inner.recv_any(peers, deadline)?;
                self.unstamp(peer, frame)?
            }
        };
        let peer = held.from;
        self.deliver(held, deadline).map(|f| (peer, f))
    }

    fn silent_peers(&self, longer_than: Duration) -> Vec<usize> {
        self.inner.silent_peers(longer_than)
    }

    fn abort(&self, reason: &str) {
        self.inner.abort(reason);
    }

    fn remote_abort(&self) -> Option<super::RemoteAbort> {
        // Aborts are control messages, not emulated traffic: no delay, as `abort`.
        self.inner.remote_abort()
    }
}

impl<L: Link> EmulatedLink<L> {
    /// Strips the delivery stamp of a frame from `from`.
    fn unstamp(&self, from: usize, mut frame: Frame) -> Result<Held, LinkError> {
        if frame.header.len() < STAMP {
            return Err(LinkError::Closed);
        }
        let mut stamp = [0u8; STAMP];
        stamp.copy_from_slice(&frame.header[..STAMP]);
        // The stamp comes from the peer: a wild one must not overflow the `Instant`.
        let at = deadline_from(self.epoch, Duration::from_nanos(u64::from_le_bytes(stamp)));
        frame.header.drain(..STAMP);
        Ok(Held { from, at, frame })
    }

    /// Takes out the held frame that `pick` accepts with the earliest delivery time, if any.
    fn take_held(&self, pick: impl Fn(&Held) -> bool) -> Result<Option<Held>, LinkError> {
        let mut held = self.held.lock().map_err(|_| LinkError::Closed)?;
        let first = held
            .iter()
            .enumerate()
            .filter(|(_, h)| pick(h))
            .min_by_key(|(_, h)| h.at)
            .map(|(i, _)| i);
        Ok(first.map(|i| held.swap_remove(i)))
    }

    /// Holds the frame until its delivery time (the emulated network's delay); one due after
    /// `deadline` stays held for the next receive, and this one times out at the deadline.
    fn deliver(&self, held: Held, deadline: Instant) -> Result<Frame, LinkError> {
        let now = Instant::now();
        if held.at > now {
            if held.at > deadline {
                std::thread::sleep(deadline.saturating_duration_since(now));
                self.held.lock().map_err(|_| LinkError::Closed)?.push(held);
                return Err(LinkError::Timeout);
            }
            std::thread::sleep(held.at.saturating_duration_since(now));
        }
        Ok(held.frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::in_process_mesh;

    #[test]
    fn frames_take_latency_plus_size_over_bandwidth() {
        let epoch = Instant::now();
        let emu = LinkEmulation {
            gbps: 0.01, // 10 MB/s: 100 KB take 10 ms
            latency_us: 20_000.0,
            jitter_us: 0.0,
        };
        let links: Vec<_> = in_process_mesh(2)
            .into_iter()
            .map(|l| EmulatedLink::new(l, emu, epoch))
            .collect();
        let t = Instant::now();
        for _ in 0..2 {
            let f = Frame {
                header: vec![7],
                payload: vec![0; 100_000],
            };
            links[0].send(1, f).expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = links[1].recv(0, deadline).expect("recv");
        let t1 = t.elapsed();
        links[1].recv(0, deadline).expect("recv");
        let t2 = t.elapsed();
        assert_eq!(first.header, vec![7]);
        // First: 10 ms on the wire + 20 ms latency; second queues behind it: +10 ms. Lower
        // bounds only (a loaded machine may deliver late; the 5 s deadline bounds that).
        assert!(t1 >= Duration::from_millis(30), "{t1:?}");
        assert!(t2 >= Duration::from_millis(40) && t2 >= t1, "{t1:?} {t2:?}");
    }

    #[test]
    fn a_frame_due_after_the_deadline_times_out_and_stays_held() {
        let epoch = Instant::now();
        let emu = LinkEmulation {
            gbps: 1.0,
            latency_us: 500_000.0,
            jitter_us: 0.0,
        };
        let links: Vec<_> = in_process_mesh(2)
            .into_iter()
            .map(|l| EmulatedLink::new(l, emu, epoch))
            .collect();
        let tagged = |t: u8| Frame {
            header: vec![t, 1],
            payload: vec![t; 5],
        };
        links[0].send(1, tagged(3)).expect("send");
        links[0].send(1, tagged(4)).expect("send");
        let r = links[1].recv(0, Instant::now() + Duration::from_millis(50));
        assert_eq!(r.err(), Some(LinkError::Timeout));
        // Still on the wire, not lost: the next receives get both frames, in order (one by
        // `recv_any`, which must look at the held frame before the inner link).
        let r = links[1].recv_any(&[0], Instant::now() + Duration::from_millis(50));
        assert_eq!(r.err(), Some(LinkError::Timeout));
        let later = Instant::now() + Duration::from_secs(10);
        let (peer, first) = links[1].recv_any(&[0], later).expect("held frame");
        assert_eq!(
            (peer, first.header, first.payload),
            (0, vec![3, 1], vec![3; 5])
        );
        let second = links[1].recv(0, later).expect("second frame");
        assert_eq!((second.header, second.payload), (vec![4, 1], vec![4; 5]));
    }
}
