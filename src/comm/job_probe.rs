//! Probing a job of one rank per process (started by mpirun, torchrun or srun, or joined by
//! hand over TCP): every rank's device, the links between the processes (Hockney's α and β,
//! measured on the real transport), and the calls' fixed costs, gathered so that every rank
//! installs the same cost model and `Algorithm::Auto` picks alike everywhere.
//!
//! [`CommGroup::probe`](crate::CommGroup::probe) does this for ranks in one process, whose
//! links cost what their emulation says; here the links are whatever connects the processes.

use std::time::Instant;

use super::communicator::{CallOptions, Collective, Communicator};
use super::executor::{MAX_GRACE, MAX_STRAY, call_link_error};
use super::group::{CALL_SAMPLES, Rounds};
use super::survive::OnFailure;
use crate::algo::Algorithm;
use crate::deadline::deadline_after;
use crate::error::{At, Error, Result};
use crate::link::{Frame, LinkError};
use crate::model::{CostModel, Figures, LinkCost, Probe};
use crate::types::ReduceOp;

/// The probe's frames: a header of its own (no call's, agreement's or straggler's has this
/// length and magic), so that a rank in a collective that meets one, or a probing rank that
/// meets a call's frame, fails at once naming the peer instead of misreading it.
const MAGIC: [u8; 4] = *b"wPRB";
const HEADER_BYTES: usize = 16;

/// The phases, each a frame kind.
const LATENCY: u32 = 1;
const BANDWIDTH: u32 = 2;
const FIGURES: u32 = 3;

/// Laps of the latency token round the ring: warm-up laps, then timed ones (their median).
const WARM_LAPS: usize = 2;
const LAPS: usize = 21;
/// Rounds of the bandwidth exchange (every rank sends to the next at once): one warm-up,
/// then timed ones (their median).
const ROUNDS: usize = 7;
/// The most frames one bandwidth round sends (the probe's `bytes` in slices).
const MAX_FRAMES: usize = 64;
/// The largest adapter key a peer may send (its host and adapter, as text).
const MAX_KEY: usize = 1024;

/// One rank's measurements, as every rank receives them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    /// Its device's medians (measured with every rank probing at once).
    pub(crate) alone: Figures,
    /// Its device's throughputs over each measurement's whole span.
    pub(crate) spans: Figures,
    /// One message's latency round the ring, seconds.
    pub(crate) alpha: f64,
    /// Its egress while every rank sent to the next, bytes/s.
    pub(crate) rate: f64,
    /// Its medians of the call rounds (barrier, staged, naive, ring), seconds.
    pub(crate) rounds: [f64; ROUND_KINDS],
    /// Whether its device maps tensors in place.
    pub(crate) unified: bool,
    /// Its host and adapter: ranks with equal keys share an adapter.
    pub(crate) key: String,
}

/// The numbers of one `Figures` on the wire.
const FIELDS: usize = 13;

fn fields(f: &Figures) -> [f64; FIELDS] {
    [
        f.upload,
        f.readback,
        f.copy,
        f.reduce,
        f.host_reduce,
        f.step,
        f.native_copy,
        f.frame,
        f.call,
        f.submit,
        f.launch,
        f.wait,
        f.host_cached,
    ]
}

fn figures(v: &[f64]) -> Figures {
    let g = |i: usize| v.get(i).copied().unwrap_or(0.0);
    Figures {
        upload: g(0),
        readback: g(1),
        copy: g(2),
        reduce: g(3),
        host_reduce: g(4),
        step: g(5),
        native_copy: g(6),
        frame: g(7),
        call: g(8),
        submit: g(9),
        launch: g(10),
        wait: g(11),
        host_cached: g(12),
    }
}

/// The kinds of call the call probe times (see `call_rounds`).
const ROUND_KINDS: usize = 4;

/// The numbers of a record, in order: 13 figures, 13 spans, alpha, rate, 4 rounds, unified.
const NUMBERS: usize = 2 * FIELDS + 2 + ROUND_KINDS + 1;

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v: Vec<f64> = Vec::with_capacity(NUMBERS);
        v.extend(fields(&self.alone));
        v.extend(fields(&self.spans));
        v.extend([self.alpha, self.rate]);
        v.extend(self.rounds);
        v.push(if self.unified { 1.0 } else { 0.0 });
        let mut out: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        out.extend(self.key.as_bytes());
        out
    }

    /// A record from a peer's payload, validated before anything uses it: its length, every
    /// number finite and at least 0, the key short UTF-8. The error says what was wrong.
    pub(crate) fn decode(bytes: &[u8]) -> std::result::Result<Record, String> {
        let fixed = NUMBERS * 8;
        if bytes.len() < fixed || bytes.len() - fixed > MAX_KEY {
            return Err(format!(
                "{} bytes, not {fixed} to {}",
                bytes.len(),
                fixed + MAX_KEY
            ));
        }
        let (numbers, key) = bytes.split_at(fixed);
        let v: Vec<f64> = numbers
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b)
            })
            .collect();
        if let Some((i, x)) = v
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x >= 0.0))
        {
            return Err(format!("number {i} is {x}"));
        }
        // The throughputs (upload, read-back, copy, reduce, host reduce, native copy) of the
        // figures and the spans divide bytes: a zero one would predict infinities. (A zero
        // cached host reduce is "not measured": the model then uses the host reduce.)
        if let Some(i) = [0, 1, 2, 3, 4, 6]
            .iter()
            .flat_map(|&i| [i, i + FIELDS])
            .find(|&i| v[i] <= 0.0)
        {
            return Err(format!("number {i} (a throughput) is 0"));
        }
        let unified = match v[NUMBERS - 1] {
            0.0 => false,
            1.0 => true,
            x => return Err(format!("the unified-memory flag is {x}")),
        };
        let key = std::str::from_utf8(key)
            .map_err(|_| "the adapter key is not UTF-8".to_string())?
            .to_string();
        Ok(Record {
            alone: figures(&v[..FIELDS]),
            spans: figures(&v[FIELDS..2 * FIELDS]),
            alpha: v[2 * FIELDS],
            rate: v[2 * FIELDS + 1],
            rounds: [
                v[2 * FIELDS + 2],
                v[2 * FIELDS + 3],
                v[2 * FIELDS + 4],
                v[2 * FIELDS + 5],
            ],
            unified,
            key,
        })
    }
}

/// What every rank makes of the job's records (in rank order), the same on every rank: the
/// probe without the calls' fixed costs, the link, whether every device maps tensors in place.
///
/// Each rank's device was probed while the others probed theirs, as ranks run calls: where
/// devices are apart (`shared` false) each rank's medians are its own; where they share an
/// adapter, `together` is n measurements in the slowest rank's span, as
/// [`CommGroup::probe`](crate::CommGroup::probe) aggregates. The link's latency and rate are
/// the ranks' medians (one slow measurement must not set the job's model).
pub(crate) fn assemble(records: &[Record], bytes: usize) -> (Probe, Option<LinkCost>, bool) {
    let n = records.len();
    let agg = |f: fn(&Figures) -> f64| {
        n as f64
            * records
                .iter()
                .map(|r| f(&r.spans))
                .fold(f64::INFINITY, f64::min)
    };
    let mean =
        |f: fn(&Figures) -> f64| records.iter().map(|r| f(&r.alone)).sum::<f64>() / n.max(1) as f64;
    let together = if n == 0 {
        Figures::default()
    } else {
        Figures {
            upload: agg(|f| f.upload),
            readback: agg(|f| f.readback),
            copy: agg(|f| f.copy),
            reduce: agg(|f| f.reduce),
            host_reduce: agg(|f| f.host_reduce),
            host_cached: agg(|f| f.host_cached),
            native_copy: agg(|f| f.native_copy),
            step: mean(|f| f.step),
            launch: mean(|f| f.launch),
            frame: 0.0,
            call: 0.0,
            submit: 0.0,
            wait: 0.0,
        }
    };
    let shared = (0..n).any(|a| (0..a).any(|b| records[a].key == records[b].key));
    let unified = n > 0 && records.iter().all(|r| r.unified);
    let link = (n > 1).then(|| LinkCost {
        gbps: median(records.iter().map(|r| r.rate).collect()) / 1e9,
        latency_us: median(records.iter().map(|r| r.alpha).collect()) * 1e6,
    });
    let probe = Probe {
        // The calls' costs come from the rounds, solved on every rank alike: what a peer's
        // figures say of them is not used (nor is it in the bare model that solves them).
        alone: records
            .iter()
            .map(|r| Figures {
                frame: 0.0,
                call: 0.0,
                submit: 0.0,
                wait: 0.0,
                ..r.alone
            })
            .collect(),
        together,
        shared,
        bytes,
    };
    (probe, link, unified)
}

/// The median of `v`, the mean of the two middle values for an even count (0 when empty):
/// of two ranks, neither alone sets the job's figure.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let k = v.len() / 2;
    match (
        v.len() % 2,
        k.checked_sub(1).and_then(|j| v.get(j)),
        v.get(k),
    ) {
        (0, Some(a), Some(b)) => (a + b) / 2.0,
        (_, _, Some(b)) => *b,
        _ => 0.0,
    }
}

/// This process's host and its device's adapter, as text: ranks with equal keys share an
/// adapter (their device work adds up). The PCI bus tells identical GPUs of one host apart.
fn adapter_key(comm: &Communicator) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let i = comm.device().info();
    // Without a bus id, identical GPUs of one host look alike: taken as apart (one GPU per
    // rank, as launchers place them). A CPU adapter is the host's own cores, shared.
    let apart = if i.device_pci_bus_id.is_empty() && i.device_type != wgpu::DeviceType::Cpu {
        format!("rank {}", comm.rank())
    } else {
        String::new()
    };
    let key = format!(
        "{}|{}|{:?}|{:x}:{:x}|{}|{apart}",
        host.trim(),
        i.name,
        i.backend,
        i.vendor,
        i.device,
        i.device_pci_bus_id
    );
    // Cut at a character boundary below the limit peers accept.
    let mut end = key.len().min(MAX_KEY);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key[..end].to_string()
}

/// Whether a frame is one of a job probe's (a peer probing while this rank runs a call).
pub(super) fn is_probe_frame(frame: &Frame) -> bool {
    frame.header.len() == HEADER_BYTES && frame.header[..4] == MAGIC
}

/// What the latency token carries round the ring: rank 0's probe size and slice, which every
/// rank checks against its own (they set the frames of the egress phase and the model).
fn token(bytes: usize, slice: usize) -> Vec<u8> {
    [bytes as u64, slice as u64]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect()
}

/// Where a received token differs from this rank's `bytes` and `slice`: the field, this
/// rank's value and the token's (`None` when they agree).
fn token_differs(got: &[u8], bytes: usize, slice: usize) -> Option<(&'static str, usize, String)> {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        let b = got.get(i * 8..i * 8 + 8)?;
        w.copy_from_slice(b);
        Some(u64::from_le_bytes(w))
    };
    let show = |w: Option<u64>| {
        w.map_or_else(
            || format!("{} bytes of token", got.len()),
            |w| w.to_string(),
        )
    };
    if word(0) != Some(bytes as u64) {
        Some(("probe bytes", bytes, show(word(0))))
    } else if word(1) != Some(slice as u64) || got.len() != 16 {
        Some(("slice bytes", slice, show(word(1))))
    } else {
        None
    }
}

fn probe_frame(phase: u32, seq: u64, payload: Vec<u8>) -> Frame {
    let mut header = Vec::with_capacity(HEADER_BYTES);
    header.extend(MAGIC);
    header.extend(phase.to_le_bytes());
    header.extend(seq.to_le_bytes());
    Frame { header, payload }
}

/// Checks that a frame is the probe's, of this phase and this probe (its sequence number),
/// with `payload` bytes (any when `None`).
fn check_frame(
    frame: &Frame,
    phase: u32,
    at: At,
    peer: usize,
    payload: Option<usize>,
) -> Result<()> {
    let mismatch = |field: &'static str, ours: String, theirs: String| {
        Err(Error::Mismatch {
            at,
            peer,
            field,
            ours,
            theirs,
        })
    };
    let h = &frame.header;
    if !is_probe_frame(frame) {
        return mismatch(
            "call",
            "the job's probe".into(),
            format!("a collective (a frame header of {} bytes)", h.len()),
        );
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    let (theirs_phase, theirs_seq) = (word(4..8), word(8..16));
    if theirs_seq != at.seq {
        return mismatch(
            "sequence number (a rank skipped or repeated a call)",
            at.seq.to_string(),
            theirs_seq.to_string(),
        );
    }
    if theirs_phase != u64::from(phase) {
        return mismatch("probe phase", phase.to_string(), theirs_phase.to_string());
    }
    match payload {
        Some(want) if frame.payload.len() != want => mismatch(
            "probe frame (bytes)",
            want.to_string(),
            frame.payload.len().to_string(),
        ),
        _ => Ok(()),
    }
}

/// The probe's link phases: sends and receives with a call's checks and errors, each lap or
/// round with a call's deadline.
struct Wire<'a> {
    comm: &'a mut Communicator,
    at: At,
    started: Instant,
    deadline: Instant,
    /// The peers this step received from.
    heard: Vec<bool>,
}

impl Wire<'_> {
    /// A fresh deadline (the configured timeout from now), for the next lap or round.
    fn rearm(&mut self) {
        self.started = Instant::now();
        self.deadline = deadline_after(self.comm.config.timeout);
    }

    fn send(&self, to: usize, phase: u32, payload: Vec<u8>) -> Result<()> {
        self.comm
            .link
            .send(to, probe_frame(phase, self.at.seq, payload))
            .map_err(|e| self.error(e, to))
    }

    fn recv(&mut self, from: usize, phase: u32, payload: Option<usize>) -> Result<Frame> {
        let frame = loop {
            let frame = match self.comm.link.recv(from, self.deadline) {
                // A peer this step heard from is waiting on a rank further back, which is
                // about to say so: give its abort a moment to arrive (as a call's executor
                // does), so that every rank names the root cause.
                Err(LinkError::Timeout) if self.heard.get(from).copied().unwrap_or(false) => {
                    let grace =
                        (self.deadline.saturating_duration_since(self.started) / 20).min(MAX_GRACE);
                    self.comm
                        .link
                        .recv(from, crate::deadline::deadline_from(self.deadline, grace))
                }
                other => other,
            }
            .map_err(|e| self.error(e, from))?;
            match super::straggle::arrival_seq(&frame) {
                // A late rank's arrival for a call already decided without it (`skip_after`).
                Some(s) if s < self.at.seq => continue,
                _ => break frame,
            }
        };
        if let Some(h) = self.heard.get_mut(from) {
            *h = true;
        }
        if !is_probe_frame(&frame) && crate::comm::protocol::Header::decode(&frame.header).is_none()
        {
            // Neither the probe's nor a call's: a peer that left for an agreement, whose
            // frame is kept for it, as a call keeps one.
            let theirs = format!("{} bytes", frame.header.len());
            if self.comm.engine.stray.len() < MAX_STRAY {
                self.comm.engine.stray.push((from, frame));
            }
            return Err(Error::Mismatch {
                at: self.at,
                peer: from,
                field: super::protocol::NOT_A_CALL,
                ours: format!("the job's probe ({HEADER_BYTES} bytes)"),
                theirs,
            });
        }
        check_frame(&frame, phase, self.at, from, payload)?;
        Ok(frame)
    }

    fn error(&self, e: LinkError, peer: usize) -> Error {
        call_link_error(self.comm.link.as_ref(), self.at, self.started, e, peer)
    }

    /// One message's latency: a token sent round the ring (rank 0 starts each lap), the time
    /// between its arrivals at this rank over the ranks it passed (median of `LAPS` laps).
    /// The token carries rank 0's `bytes` and `slice`; a rank whose own differ fails, naming
    /// the rank it came from.
    fn latency(&mut self, bytes: usize, slice: usize) -> Result<f64> {
        let arrivals = self.laps(bytes, slice, WARM_LAPS + LAPS + 1)?;
        let laps: Vec<f64> = arrivals
            .windows(2)
            .skip(WARM_LAPS)
            .map(|w| w[1].saturating_duration_since(w[0]).as_secs_f64())
            .collect();
        Ok(median(laps) / self.comm.size.max(1) as f64)
    }

    /// `count` laps of the token (each with a fresh deadline); the times it reached this rank.
    fn laps(&mut self, bytes: usize, slice: usize, count: usize) -> Result<Vec<Instant>> {
        let (n, r) = (self.comm.size, self.comm.rank);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mine = token(bytes, slice);
        let mut arrivals = Vec::with_capacity(count);
        for _ in 0..count {
            self.rearm();
            if r == 0 {
                self.send(next, LATENCY, mine.clone())?;
            }
            let got = self.recv(prev, LATENCY, Some(mine.len()))?.payload;
            arrivals.push(Instant::now());
            if let Some((field, ours, theirs)) = token_differs(&got, bytes, slice) {
                return Err(Error::Mismatch {
                    at: self.at,
                    peer: prev,
                    field,
                    ours: ours.to_string(),
                    theirs,
                });
            }
            if r != 0 {
                self.send(next, LATENCY, got)?;
            }
        }
        Ok(arrivals)
    }

    /// This rank's egress while every rank sends `frames` frames of `bytes` to the next and
    /// takes as many from the previous, as a ring's steps do (median of `ROUNDS` rounds, to
    /// the last arrival), bytes/s. A round less one message's latency is the time on the
    /// wire, but never taken as under half the round: where `frames * bytes` crosses the link
    /// in less than a latency, the difference is noise, and the rate is at most twice what
    /// the round shows (an underestimate, never a thousandfold one).
    fn rate(&mut self, bytes: usize, frames: usize, alpha: f64) -> Result<f64> {
        let (n, r) = (self.comm.size, self.comm.rank);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let mut times = Vec::with_capacity(ROUNDS);
        for round in 0..=ROUNDS {
            // Allocated before the clock starts: the link's time, not the allocator's.
            let payloads: Vec<Vec<u8>> = (0..frames).map(|_| vec![0u8; bytes]).collect();
            self.rearm();
            let t = Instant::now();
            for p in payloads {
                self.send(next, BANDWIDTH, p)?;
            }
            for _ in 0..frames {
                self.recv(prev, BANDWIDTH, Some(bytes))?;
            }
            if round > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        let round = median(times);
        let secs = (round - alpha).max(round / 2.0).max(1e-9);
        Ok(bytes.saturating_mul(frames) as f64 / secs)
    }

    /// Every rank's record, in rank order (this rank's own through the same checks).
    fn exchange(&mut self, mine: &Record) -> Result<Vec<Record>> {
        let (n, r) = (self.comm.size, self.comm.rank);
        self.rearm();
        let payload = mine.encode();
        for peer in (0..n).filter(|&p| p != r) {
            self.send(peer, FIGURES, payload.clone())?;
        }
        let mut records = Vec::with_capacity(n);
        for peer in 0..n {
            let bytes = if peer == r {
                payload.clone()
            } else {
                self.recv(peer, FIGURES, None)?.payload
            };
            records.push(Record::decode(&bytes).map_err(|why| Error::Mismatch {
                at: self.at,
                peer,
                field: "probe figures",
                ours: "finite numbers of at least 0 and a short key".into(),
                theirs: why,
            })?);
        }
        Ok(records)
    }
}

impl Communicator {
    /// Probes the job this communicator belongs to and installs the resulting cost model, the
    /// same on every rank, so that `Algorithm::Auto` picks what it predicts fastest: the
    /// counterpart of [`CommGroup::probe`](crate::CommGroup::probe) for one rank per process
    /// ([`from_env`](Self::from_env), [`connect`](Self::connect)). **Every rank must call it**,
    /// as a collective, with the same `bytes` and the same `slice_bytes` configured (checked).
    ///
    /// It measures, in turn:
    /// - this rank's device as [`probe_device`](Self::probe_device) does, on `bytes`, every
    ///   rank at once (a barrier before each measurement): each rank's figures are its own
    ///   device's while the others work on theirs;
    /// - the links: one message's latency (a token round the ring, each rank's time between
    ///   its arrivals over the ranks it passed) and each rank's egress while every rank sends
    ///   to the next at once: `bytes` in slices of the configured `slice_bytes` (at least
    ///   4 KiB, at most 64 slices), the model's [`LinkCost`]. Probe with `bytes` well over
    ///   what the link carries in one latency (a few MiB), or the egress is underestimated;
    /// - the calls' fixed costs, as `CommGroup::probe` does: 26 rounds each of barriers and
    ///   tiny host-staged, naive and device-ring all-reduces;
    ///
    /// then every rank sends its figures to every other, and each makes the same model of
    /// them: ranks whose host and adapter are the same share it (their work adds up; the host
    /// is read from `/proc/sys/kernel/hostname`, else `HOSTNAME` or `COMPUTERNAME`, and ranks
    /// whose host is unknown count as on one host; GPUs without a PCI bus id count as apart,
    /// a CPU adapter as shared), the link is the ranks' median latency and egress.
    ///
    /// Every rank's `bytes` and slice are checked (a lap of the token) before the device
    /// phase. The barriers between the device measurements are ordinary barrier calls: a
    /// peer that runs barriers meanwhile passes through them, and fails at the first frame
    /// that is not a barrier's.
    ///
    /// Returns the probe; the link is in [`cost_model`](Self::cost_model)'s
    /// [`link`](CostModel::link). Its barriers and rounds of calls advance the call sequence
    /// and the counters (`bytes_sent`, `device_bytes`, `mapped_calls`) and set
    /// `last_algorithm`; each of them fails on a rank's failure whatever `on_failure` says
    /// (no finishing among survivors inside a measurement).
    ///
    /// # Errors
    /// A failure fails the probe and leaves the communicator broken, as a failed call does,
    /// and tells the peers, which fail too (a rank that dies while it sends its figures may
    /// leave the peers that got them with the model, and broken links that fail their next
    /// call): a peer that is in another call, or passed another `bytes` or slice (a
    /// [`Error::Mismatch`] naming it), a dead or silent peer (each lap or round of the link
    /// phases, and each call, has the configured timeout), a peer's figures that are not
    /// finite numbers of at least 0, a `bytes` over the device's largest buffer.
    pub fn probe(&mut self, bytes: usize) -> Result<Probe> {
        // A communicator that must shrink first is refused as its calls are, unbroken.
        self.run(Collective::Barrier, probe_opts(Algorithm::Ring))?;
        let result = self.probe_job(bytes);
        match result {
            // A call inside it that failed has broken the communicator and told the peers.
            Err(e) if self.broken.is_none() => {
                let at = e.at().unwrap_or(At::rank(self.rank));
                Err(self.fail(at, e))
            }
            other => other,
        }
    }

    fn probe_job(&mut self, bytes: usize) -> Result<Probe> {
        // Every rank's size and slice agreed first: they set the device phase's work too.
        if self.size > 1 {
            let slice = self.config.slice_bytes;
            self.link_step(|w| w.laps(bytes, slice, 1))?;
        }
        let (alone, spans) = self.probe_device_spans(bytes, &mut |c| {
            c.run(Collective::Barrier, probe_opts(Algorithm::Ring))
                .map(drop)
        })?;
        let (alpha, rate) = if self.size > 1 {
            self.probe_links(bytes)?
        } else {
            (0.0, 0.0)
        };
        let rounds = self.call_rounds()?;
        let mine = Record {
            alone,
            spans,
            alpha,
            rate,
            rounds,
            unified: self.device().unified_memory(),
            key: adapter_key(self),
        };
        let records = self.link_step(|w| w.exchange(&mine))?;
        let (mut probe, link, unified) = assemble(&records, bytes);
        let (n, slice) = (records.len(), self.config.slice_bytes);
        if n > 1 {
            // As `CommGroup::probe` solves its rounds: what the figures alone predict of each
            // (the slowest rank's: a call ends when its last rank does).
            let bare = CostModel::new(probe.clone(), slice)
                .with_unified_memory(unified)
                .with_link(link);
            let worst = |k: usize| records.iter().map(|r| r.rounds[k]).fold(0.0, f64::max);
            let tiny = n.saturating_mul(4);
            let calls = Rounds {
                barrier: worst(0),
                staged: worst(1),
                naive: worst(2),
                staged_rest: bare
                    .predict_for(Algorithm::Staged, tiny, true, unified)
                    .seconds,
                naive_rest: bare
                    .predict_for(Algorithm::Naive, tiny, true, false)
                    .seconds,
                ring: worst(3),
                ring_rest: bare.predict_for(Algorithm::Ring, tiny, true, false).seconds,
            }
            .solve(n, unified, link.map_or(0.0, |l| l.alpha()));
            calls.apply(&mut probe);
        }
        self.set_cost_model(
            CostModel::new(probe.clone(), slice)
                .with_unified_memory(unified)
                .with_link(link),
        );
        Ok(probe)
    }

    /// The link phases: latency (checking every rank's `bytes` and slice), then egress, on
    /// `bytes` in slices.
    fn probe_links(&mut self, bytes: usize) -> Result<(f64, f64)> {
        let slice = self.config.slice_bytes;
        let frame = slice.clamp(4096, bytes.max(4096));
        let frames = bytes.div_ceil(frame).clamp(1, MAX_FRAMES);
        let alpha = self.link_step(|w| w.latency(bytes, slice))?;
        let rate = self.link_step(|w| w.rate(frame, frames, alpha))?;
        Ok((alpha, rate))
    }

    /// One numbered step of the probe over the links (a sequence number of its own, as a
    /// call's), with a call's checks.
    fn link_step<R>(&mut self, f: impl FnOnce(&mut Wire<'_>) -> Result<R>) -> Result<R> {
        self.seq = self.seq.saturating_add(1);
        let at = At {
            rank: self.rank,
            op: None,
            seq: self.seq,
        };
        self.gate(at)?;
        let started = Instant::now();
        let deadline = deadline_after(self.config.timeout);
        let heard = vec![false; self.size];
        f(&mut Wire {
            comm: self,
            at,
            started,
            deadline,
            heard,
        })
    }

    /// Medians of `CALL_SAMPLES` rounds (after a warm-up) of barriers and tiny host-staged,
    /// naive and device-ring all-reduces, timed on this rank, seconds; zeros on one rank.
    fn call_rounds(&mut self) -> Result<[f64; ROUND_KINDS]> {
        if self.size < 2 {
            return Ok([0.0; ROUND_KINDS]);
        }
        let buf = self.upload(&vec![0f32; self.size])?;
        let mut times: [Vec<f64>; ROUND_KINDS] = Default::default();
        for i in 0..=CALL_SAMPLES {
            for (k, times) in times.iter_mut().enumerate() {
                let (call, algo) = match k {
                    0 => (Collective::Barrier, Algorithm::Staged),
                    1 => (all_reduce(&buf), Algorithm::Staged),
                    2 => (all_reduce(&buf), Algorithm::Naive),
                    _ => (all_reduce(&buf), Algorithm::Ring),
                };
                let t = Instant::now();
                self.run(call, probe_opts(algo))?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        Ok(times.map(median))
    }
}

/// The probe's calls: with `algo`, failing on a rank's failure (no recovery among survivors
/// inside a measurement: the group must stay the one probed).
fn probe_opts(algo: Algorithm) -> CallOptions {
    CallOptions {
        algorithm: Some(algo),
        on_failure: Some(OnFailure::Error),
        ..CallOptions::default()
    }
}

fn all_reduce(buf: &crate::DeviceBuffer<f32>) -> Collective<'_> {
    Collective::AllReduce {
        input: buf.view(),
        output: buf.view(),
        op: ReduceOp::Sum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(rank: usize, key: &str) -> Record {
        let f = |x: f64| Figures {
            upload: 1e9 * x,
            readback: 2e9 * x,
            copy: 3e9 * x,
            reduce: 4e9 * x,
            host_reduce: 5e9 * x,
            step: 1e-4 * x,
            native_copy: 6e9 * x,
            frame: 0.0,
            call: 0.0,
            submit: 0.0,
            launch: 2e-5 * x,
            wait: 0.0,
            host_cached: 7e9 * x,
        };
        let x = 1.0 + rank as f64;
        Record {
            alone: f(x),
            spans: f(x / 2.0),
            alpha: 1e-5 * x,
            rate: 1e9 * x,
            rounds: [1e-4 * x, 2e-4 * x, 3e-4 * x, 4e-4 * x],
            unified: rank != 2,
            key: key.into(),
        }
    }

    /// A record survives the wire bit for bit; every kind of bad payload is refused with
    /// what was wrong.
    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        let r = record(3, "host|llvmpipe|Vulkan|10005:0|");
        assert_eq!(Record::decode(&r.encode()), Ok(r.clone()));
        let bytes = r.encode();
        // Short, and a key over the limit.
        assert!(
            Record::decode(&bytes[..NUMBERS * 8 - 1])
                .unwrap_err()
                .contains("bytes")
        );
        let mut long = bytes.clone();
        long.extend(vec![b'k'; MAX_KEY + 1]);
        assert!(Record::decode(&long).unwrap_err().contains("bytes"));
        // NaN, infinity and a negative number, wherever they are: the figures' first, the
        // spans' read-back and last (the cached host reduce), the rate, the first round and the
        // last.
        let (alpha, rate, rounds) = (2 * FIELDS, 2 * FIELDS + 1, 2 * FIELDS + 2);
        for (i, bad) in [
            (0, f64::NAN),
            (FIELDS + 1, f64::INFINITY),
            (2 * FIELDS - 1, -1.0),
            (alpha, f64::NAN),
            (rate, -1.0),
            (rounds, -0.5),
            (rounds + ROUND_KINDS - 1, -0.5),
        ] {
            let mut b = bytes.clone();
            b[i * 8..i * 8 + 8].copy_from_slice(&bad.to_le_bytes());
            let e = Record::decode(&b).unwrap_err();
            assert!(e.contains(&format!("number {i}")), "{e}");
        }
        // A zero throughput, in the figures or the spans (the rate of a lone rank may be 0).
        for i in [3, 3 + FIELDS] {
            let mut b = bytes.clone();
            b[i * 8..i * 8 + 8].copy_from_slice(&0f64.to_le_bytes());
            assert!(
                Record::decode(&b).unwrap_err().contains("throughput"),
                "{i}"
            );
        }
        let mut b = bytes.clone();
        b[rate * 8..(rate + 1) * 8].copy_from_slice(&0f64.to_le_bytes());
        assert!(Record::decode(&b).is_ok_and(|r| r.rate == 0.0));
        // Nor may the cached host reduce (not measured where the probe is in cache already).
        let mut b = bytes.clone();
        for i in [FIELDS - 1, 2 * FIELDS - 1] {
            b[i * 8..i * 8 + 8].copy_from_slice(&0f64.to_le_bytes());
        }
        assert!(
            Record::decode(&b)
                .is_ok_and(|r| r.alone.host_cached == 0.0 && r.spans.host_cached == 0.0)
        );
        // A flag that is neither 0 nor 1.
        let mut b = bytes.clone();
        let i = NUMBERS - 1;
        b[i * 8..i * 8 + 8].copy_from_slice(&0.5f64.to_le_bytes());
        assert!(Record::decode(&b).unwrap_err().contains("unified"));
        // A key that is not UTF-8.
        let mut b = bytes[..NUMBERS * 8].to_vec();
        b.extend([0xff, 0xfe]);
        assert!(Record::decode(&b).unwrap_err().contains("UTF-8"));
    }

    /// Every rank makes the same probe of the same records: each rank's own medians, the
    /// aggregate of the slowest span, the ranks' median link, sharing by equal keys, unified
    /// memory only where every device has it.
    #[test]
    fn the_job_probe_is_assembled_from_every_rank() {
        let records: Vec<Record> = (0..4)
            .map(|r| {
                record(
                    r,
                    if r < 2 {
                        "a|gpu"
                    } else {
                        ["b|gpu", "c|gpu"][r - 2]
                    },
                )
            })
            .collect();
        let (p, link, unified) = assemble(&records, 1 << 20);
        assert_eq!(p.alone, records.iter().map(|r| r.alone).collect::<Vec<_>>());
        // The calls' costs a peer sends are not taken (the rounds set them).
        let mut sent = records.clone();
        sent[1].alone.wait = 1.0;
        sent[2].alone.call = 1.0;
        assert_eq!(assemble(&sent, 1 << 20).0, p);
        assert!(p.shared, "ranks 0 and 1 have one key");
        assert!(!unified, "rank 2 does not map tensors");
        // The slowest span is rank 0's (x = 0.5): 4 x 0.5e9.
        assert_eq!(p.together.upload, 4.0 * 0.5e9);
        assert_eq!(p.together.native_copy, 4.0 * 3e9);
        assert_eq!(p.together.host_cached, 4.0 * 3.5e9);
        assert!((p.together.step - 1e-4 * 2.5).abs() < 1e-12);
        let link = link.expect("a link between 4 ranks");
        // Medians of 1..4 (the mean of the middle two): 2.5.
        assert!((link.gbps - 2.5).abs() < 1e-12, "{link:?}");
        assert!((link.latency_us - 25.0).abs() < 1e-9, "{link:?}");
        // Three ranks: the middle one.
        let three = assemble(&records[..3], 0).1.expect("a link");
        assert!((three.gbps - 2.0).abs() < 1e-12, "{three:?}");
        assert_eq!(p.bytes, 1 << 20);
        // Apart: four keys.
        let apart: Vec<Record> = (0..4).map(|r| record(r, &format!("h{r}"))).collect();
        assert!(!assemble(&apart, 0).0.shared);
        // One rank: no link.
        assert_eq!(assemble(&records[..1], 0).1, None);
    }

    /// A token names the first field that differs, this rank's value first.
    #[test]
    fn a_token_names_what_differs() {
        let t = token(65536, 4 << 20);
        assert_eq!(token_differs(&t, 65536, 4 << 20), None);
        assert_eq!(
            token_differs(&t, 131072, 4 << 20),
            Some(("probe bytes", 131072, "65536".to_string()))
        );
        assert_eq!(
            token_differs(&t, 65536, 1 << 20),
            Some(("slice bytes", 1 << 20, (4usize << 20).to_string()))
        );
        // Short or long tokens are differences, not panics.
        assert_eq!(
            token_differs(&t[..12], 65536, 4 << 20),
            Some(("slice bytes", 4 << 20, "12 bytes of token".to_string()))
        );
        let mut long = t.clone();
        long.push(0);
        assert!(token_differs(&long, 65536, 4 << 20).is_some());
        assert!(token_differs(&[], 65536, 4 << 20).is_some());
    }

    /// A frame of another protocol, of another phase or probe, or of the wrong size is named.
    #[test]
    fn frames_that_are_not_this_probes_are_refused() {
        let at = At {
            rank: 1,
            op: None,
            seq: 7,
        };
        let ok = probe_frame(LATENCY, 7, Vec::new());
        assert!(check_frame(&ok, LATENCY, at, 0, Some(0)).is_ok());
        let field = |f: &Frame, phase, payload| match check_frame(f, phase, at, 0, payload) {
            Err(Error::Mismatch { field, peer: 0, .. }) => field,
            other => panic!("{other:?}"),
        };
        let call = Frame {
            header: vec![0; 56],
            payload: Vec::new(),
        };
        assert_eq!(field(&call, LATENCY, None), "call");
        assert_eq!(field(&ok, BANDWIDTH, None), "probe phase");
        assert!(field(&probe_frame(LATENCY, 8, Vec::new()), LATENCY, None).starts_with("sequence"));
        assert_eq!(field(&ok, LATENCY, Some(4)), "probe frame (bytes)");
        let mut bad_magic = ok.clone();
        bad_magic.header[0] ^= 1;
        assert_eq!(field(&bad_magic, LATENCY, None), "call");
    }
}
