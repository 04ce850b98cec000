//! The in-process link: one thread per rank, an unbounded crossbeam channel per ordered pair of
//! ranks, and one control channel per rank that carries aborts from anyone.

use std::time::Instant;

use crossbeam::channel::{Receiver, Sender, TryRecvError, select_biased, unbounded};

use super::{Abort, Frame, Link, LinkError, RemoteAbort};

/// One rank's end of an in-process mesh; see [`in_process_mesh`].
pub struct InProcLink {
    rank: usize,
    to: Vec<Sender<Frame>>,
    from: Vec<Receiver<Frame>>,
    control_to: Vec<Sender<Abort>>,
    control: Receiver<Abort>,
}

impl std::fmt::Debug for InProcLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcLink")
            .field("rank", &self.rank)
            .field("size", &self.to.len())
            .finish_non_exhaustive()
    }
}

/// Builds the links of `n` ranks that talk through channels in one process.
///
/// ```
/// use std::time::{Duration, Instant};
/// use wccl::link::{Frame, Link, in_process_mesh};
/// let links = in_process_mesh(2);
/// links[0].send(1, Frame { header: vec![1], payload: vec![2, 3] }).unwrap();
/// let f = links[1].recv(0, Instant::now() + Duration::from_secs(1)).unwrap();
/// assert_eq!(f.payload, vec![2, 3]);
/// ```
pub fn in_process_mesh(n: usize) -> Vec<InProcLink> {
    // data[i][j] carries frames from i to j.
    let mut tx: Vec<Vec<Option<Sender<Frame>>>> = (0..n).map(|_| vec![None; n]).collect();
    let mut rx: Vec<Vec<Option<Receiver<Frame>>>> = (0..n).map(|_| vec![None; n]).collect();
    for (i, row) in tx.iter_mut().enumerate() {
        for (j, slot) in row.iter_mut().enumerate() {
            let (s, r) = unbounded();
            *slot = Some(s);
            rx[j][i] = Some(r);
        }
    }
    let (control_tx, control_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded()).unzip();
    tx.into_iter()
        .zip(rx)
        .zip(control_rx)
        .enumerate()
        .map(|(rank, ((to, from), control))| InProcLink {
            rank,
            to: to.into_iter().flatten().collect(),
            from: from.into_iter().flatten().collect(),
            control_to: control_tx.clone(),
            control,
        })
        .collect()
}

impl Link for InProcLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send(&self, to: usize, frame: Frame) -> Result<(), LinkError> {
        self.to
            .get(to)
            .ok_or(LinkError::Closed)?
            .send(frame)
            .map_err(|_| LinkError::Closed)
    }

    fn recv(&self, from: usize, deadline: Instant) -> Result<Frame, LinkError> {
        let data = self.from.get(from).ok_or(LinkError::Closed)?;
        let timeout = deadline.saturating_duration_since(Instant::now());
        // Aborts first: once someone gave up, data still queued is of no use.
        select_biased! {
            recv(self.control) -> abort => match abort {
                Ok(a) => Err(LinkError::Aborted { from: a.from, reason: a.reason }),
                Err(_) => Err(LinkError::Closed),
            },
            recv(data) -> frame => frame.map_err(|_| LinkError::Closed),
            default(timeout) => match data.try_recv() {
                Ok(frame) => Ok(frame),
                Err(TryRecvError::Disconnected) => Err(LinkError::Closed),
                Err(TryRecvError::Empty) => Err(LinkError::Timeout),
            },
        }
    }

    fn recv_any(&self, peers: &[usize], deadline: Instant) -> Result<(usize, Frame), LinkError> {
        let receivers: Vec<(usize, &Receiver<Frame>)> = peers
            .iter()
            .filter_map(|&p| self.from.get(p).map(|r| (p, r)))
            .collect();
        super::select_any(&self.control, &receivers, deadline, LinkError::Gone)
    }

    fn abort(&self, reason: &str) {
        for (peer, c) in self.control_to.iter().enumerate() {
            if peer != self.rank {
                let _ = c.send(Abort {
                    from: self.rank,
                    reason: reason.to_string(),
                });
            }
        }
    }

    fn remote_abort(&self) -> Option<RemoteAbort> {
        // Every control channel including this rank's own: a receive blocked on this rank's
        // thread wakes up exactly as its peers' do. A send to a dropped rank fails; ignored.
        let (rank, control) = (self.rank, self.control_to.clone());
        Some(std::sync::Arc::new(move |reason: &str| {
            for c in &control {
                let _ = c.send(Abort {
                    from: rank,
                    reason: reason.to_string(),
                });
            }
        }))
    }
}
