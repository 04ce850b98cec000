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
        let frame = self.inner.recv(from, deadline)?;
        self.deliver(frame, deadline)
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        let (peer, frame) = self.inner.recv_any(peers, deadline)?;
        self.deliver(frame, deadline).map(|f| (peer, f))
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
    /// Strips the delivery stamp and holds the frame until its delivery time.
    fn deliver(&self, mut frame: Frame, deadline: Instant) -> Result<Frame, LinkError> {
        if frame.header.len() < STAMP {
            return Err(LinkError::Closed);
        }
        let mut stamp = [0u8; STAMP];
        stamp.copy_from_slice(&frame.header[..STAMP]);
        // The stamp comes from the peer: a wild one must not overflow the `Instant`.
        let deliver = deadline_from(self.epoch, Duration::from_nanos(u64::from_le_bytes(stamp)));
        frame.header.drain(..STAMP);
        // The frame is on the wire until its delivery time: the emulated network's delay.
        let now = Instant::now();
        if deliver > now {
            if deliver > deadline {
                std::thread::sleep(deadline.saturating_duration_since(now));
                return Err(LinkError::Timeout);
            }
            std::thread::sleep(deliver - now);
        }
        Ok(frame)
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
    fn a_frame_due_after_the_deadline_times_out() {
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
        links[0].send(1, Frame::default()).expect("send");
        let r = links[1].recv(0, Instant::now() + Duration::from_millis(50));
        assert_eq!(r.err(), Some(LinkError::Timeout));
    }
}
