//! Runs an algorithm's [`Plan`] on one rank: device copies and kernels through the reduce
//! kernels, frames through the link, read-backs begun ahead of the sends and the copies into
//! host memory that need them, so that reading back slice k+1 overlaps sending and reducing
//! slice k.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use wgpu::{Buffer, BufferUsages, SubmissionIndex};

use super::host_ops;
use super::last_write::Painter;
use super::protocol::Header;
use super::split::{self, Split};
use crate::algo::{Action, Buf, Fold, Plan, Recv, Region, Source, Transfer};
use crate::deadline::deadline_from;
use crate::device::{RankDevice, ReadRing, ReadTicket, TensorRef, UploadRing, wait_error};
use crate::error::{At, Error, Result};
use crate::kernels::{KernelOp, ReduceKernels};
use crate::link::{Frame, Link, LinkError};
use crate::types::{Combine, DType};

/// One rank's device-side machinery, created once per communicator and reused by every call.
pub(crate) struct Engine {
    pub(crate) dev: RankDevice,
    pub(crate) kernels: ReduceKernels,
    pub(crate) reads: ReadRing,
    pub(crate) uploads: UploadRing,
    scratch: Option<Buffer>,
    placeholder: Buffer,
    /// Host memory for plans with host regions, kept across calls (no page faults per call).
    host: Vec<u32>,
    /// Payload buffers kept across calls (see `Run::spare`).
    spare: Vec<Vec<u8>>,
    /// Payload bytes sent over the link since the engine was made (headers not counted).
    pub(crate) bytes_sent: u64,
    /// Calls that ran in their tensors mapped in place (see `split.rs`).
    pub(crate) mapped_calls: u64,
    /// Bytes read back from the device and uploaded to it through staging buffers by calls
    /// since the engine was made: a call's device traffic, counted, not modelled.
    pub(crate) device_bytes: u64,
    /// Frames a call read that were not a call's (a peer's agreement frames, read by a rank
    /// still in the call): the next agreement looks at them (see `agree.rs`).
    pub(crate) stray: Vec<(usize, Frame)>,
    /// Taken when the engine is dropped and released after every field above it (fields drop
    /// in order, after `drop`): destroying the device, which happens when the last of them
    /// lets go of it, then waits for its turn in the process (see `device::lifecycle`).
    /// Declared last for that reason.
    dropping: Option<crate::device::lifecycle::Turn>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.dropping = Some(crate::device::lifecycle::turn());
    }
}

impl Engine {
    pub(crate) fn new(
        dev: RankDevice,
        slice_bytes: u64,
        depth: usize,
        max_binding: Option<u64>,
    ) -> Self {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let kernels = ReduceKernels::new(&dev, max_binding);
        let reads = ReadRing::new(&dev, depth, slice_bytes);
        let uploads = UploadRing::new(&dev, depth, slice_bytes);
        let placeholder = dev.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wccl placeholder"),
            size: 4,
            usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Engine {
            dev,
            kernels,
            reads,
            uploads,
            scratch: None,
            placeholder,
            host: Vec::new(),
            spare: Vec::new(),
            bytes_sent: 0,
            mapped_calls: 0,
            device_bytes: 0,
            stray: Vec::new(),
            dropping: None,
        }
    }

    /// A tiny buffer for calls that move no data.
    pub(crate) fn placeholder(&self) -> &Buffer {
        &self.placeholder
    }

    /// Grows the scratch buffer to `bytes`. A buffer that cannot be made (out of memory) is an
    /// error of this call, and the scratch stays as it was: kept, an invalid buffer would fail
    /// every later call that needs scratch, after a recovery too.
    fn ensure_scratch(&mut self, at: At, bytes: u64) -> Result<()> {
        let size = bytes.saturating_add(3) & !3;
        let size = size.max(4);
        if self.scratch.as_ref().is_none_or(|s| s.size() < size) {
            let dev = &self.dev;
            let (buffer, error) = dev.catching(|| {
                dev.device().create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wccl scratch"),
                    size,
                    usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            });
            if let Some(message) = error {
                return Err(Error::Device {
                    at,
                    message: format!("scratch of {size} bytes: {message}"),
                });
            }
            self.scratch = Some(buffer);
        }
        Ok(())
    }
}

/// Received payloads a call keeps for reuse (one per send in flight is plenty: a send gives its
/// buffer to the link).
const MAX_SPARE: usize = 2;

/// Frames of other protocols kept for the next agreement, at most.
pub(super) const MAX_STRAY: usize = 16;

/// The longest extra wait for a peer's abort after this rank's own deadline.
pub(super) const MAX_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Everything about the call that the executor needs besides the plan.
pub(crate) struct Call<'a> {
    pub at: At,
    pub header: Header,
    pub dtype: DType,
    /// Input and output; `None` for calls that move no data (barrier).
    pub tensors: Option<(TensorRef<'a>, TensorRef<'a>)>,
    pub started: Instant,
    pub deadline: Instant,
}

/// A read-back that the plan will send or copy into host memory, with the action it depends
/// on.
struct SendRead {
    action: usize,
    /// The last action (possibly `action` itself) that writes memory this read covers.
    after: Option<usize>,
    region: Region,
}

struct Run<'e, 'a> {
    eng: &'e mut Engine,
    link: &'e dyn Link,
    call: &'e Call<'a>,
    scratch: Option<Buffer>,
    sent: Vec<u32>,
    received: Vec<u32>,
    last: Option<SubmissionIndex>,
    /// Host memory for `Buf::Host` regions (u32 words keep every element type aligned).
    host: Vec<u32>,
    /// The payload of the last send, for `Source::Previous`.
    previous: Vec<u8>,
    /// Received payloads already folded, reused for the payloads of sends (from host memory,
    /// read-backs, `Source::Previous`): their pages are mapped already. Kept in the engine
    /// between calls.
    spare: Vec<Vec<u8>>,
    /// Per action: whether a later send re-sends this action's payload.
    keep: Vec<bool>,
    /// The tensors mapped in place, when host memory lives in them (see `split.rs`).
    split: Option<Split>,
}

/// Executes `plan` for this rank. Returns once this rank's part is on its device.
pub(crate) fn execute(
    eng: &mut Engine,
    link: &dyn Link,
    call: &Call<'_>,
    plan: &Plan,
) -> Result<()> {
    if plan.scratch > 0 {
        let bytes = plan.scratch.saturating_mul(call.dtype.size());
        eng.ensure_scratch(call.at, u64::try_from(bytes).unwrap_or(u64::MAX))?;
    }
    let n = link.size();
    let mut host = std::mem::take(&mut eng.host);
    let split = match split::open(&eng.dev, call.tensors, plan, &mut host, call.deadline) {
        Ok(s) => s,
        Err(e) => {
            eng.host = host;
            return Err(wait_error(call.at, e));
        }
    };
    match split {
        Some(_) => eng.mapped_calls += 1,
        // Host memory of its own (in a split run the tensors are the host memory).
        None => {
            let words = (plan.host * call.dtype.size()).div_ceil(4);
            if host.len() < words {
                host.resize(words, 0);
            }
        }
    }
    let spare = std::mem::take(&mut eng.spare);
    let mut run = Run {
        scratch: eng.scratch.clone(),
        eng,
        link,
        call,
        sent: vec![0; n],
        received: vec![0; n],
        last: None,
        host,
        previous: Vec::new(),
        spare,
        keep: keep_flags(plan),
        split,
    };
    let result = run.plan(plan);
    // Unmapped before anything waits: the tensors are the caller's again.
    run.split = None;
    run.eng.host = std::mem::take(&mut run.host);
    run.eng.spare = std::mem::take(&mut run.spare);
    result?;
    if let Some(last) = run.last.take() {
        run.eng
            .dev
            .wait_submission(&last, call.deadline)
            .map_err(|e| wait_error(call.at, e))?;
    }
    run.eng.dev.check(call.at)
}

impl Run<'_, '_> {
    /// Runs the plan's actions; on every exit, the read-backs begun and not finished are
    /// abandoned, so that no staging slot stays busy or mapped after an error.
    fn plan(&mut self, plan: &Plan) -> Result<()> {
        let mut tickets = VecDeque::new();
        let result = self.actions(plan, &mut tickets);
        let eng = &mut *self.eng;
        eng.reads
            .abandon_all(&eng.dev, tickets.drain(..).map(|(_, t)| t));
        result
    }

    fn actions(&mut self, plan: &Plan, tickets: &mut VecDeque<(usize, ReadTicket)>) -> Result<()> {
        let reads = self.send_reads(plan);
        let mut next_read = 0usize;
        for (i, action) in plan.actions.iter().enumerate() {
            self.begin_reads(&reads, &mut next_read, tickets, i as isize - 1)?;
            match action {
                Action::Copy { src, dst } if self.reads_ahead(src, dst) => {
                    self.copy_in(i, *src, *dst, &reads, &mut next_read, tickets)?;
                }
                Action::Copy { src, dst } => self.copy(*src, *dst)?,
                Action::Scale { dst, divisor } if dst.buf == Buf::Host => {
                    if self.split.is_some() {
                        return Err(self.internal("a split plan scales host memory"));
                    }
                    let dtype = self.call.dtype;
                    host_ops::scale(dtype, self.host_bytes(*dst), *divisor);
                }
                Action::Scale { dst, divisor } => {
                    let (buf, off) = self.locate(*dst);
                    self.kernel(KernelOp::Scale(*divisor), (&buf, off), None, dst.len);
                }
                Action::Transfer(t) => {
                    self.transfer(i, t, &reads, &mut next_read, tickets)?;
                }
            }
        }
        Ok(())
    }

    fn transfer(
        &mut self,
        i: usize,
        t: &Transfer,
        reads: &[SendRead],
        next_read: &mut usize,
        tickets: &mut VecDeque<(usize, ReadTicket)>,
    ) -> Result<()> {
        let mut received = None;
        if t.recv_first
            && let Some(r) = &t.recv
        {
            received = Some(self.receive(r)?);
        }
        if let Some((to, source)) = t.send {
            let payload = match source {
                // Nothing reads the received payload after it is forwarded: moved, not copied.
                Source::Forward => received.take().unwrap_or_default(),
                Source::Previous => {
                    let mut payload = self.spare.pop().unwrap_or_default();
                    payload.clone_from(&self.previous);
                    payload
                }
                Source::Device(r) if r.buf == Buf::Host => {
                    // Into the buffer of an earlier received payload: its pages are mapped
                    // already (a fresh vector of a slice's size costs page faults per send).
                    let mut payload = self.spare.pop().unwrap_or_default();
                    payload.clear();
                    payload.extend_from_slice(self.host_read(r)?);
                    payload
                }
                Source::Device(_) => {
                    let done = if t.recv_first {
                        i as isize
                    } else {
                        i as isize - 1
                    };
                    self.begin_reads(reads, next_read, tickets, done)?;
                    match tickets.pop_front() {
                        Some((a, ticket)) if a == i => {
                            let spare = self.spare.pop().unwrap_or_default();
                            self.eng
                                .reads
                                .finish_in(&self.eng.dev, ticket, self.call.deadline, spare)
                                .map_err(|e| wait_error(self.call.at, e))?
                        }
                        other => {
                            if let Some((_, ticket)) = other {
                                self.eng.reads.abandon(&self.eng.dev, ticket);
                            }
                            return Err(Error::Device {
                                at: self.call.at,
                                message: "internal: read-back schedule out of order".into(),
                            });
                        }
                    }
                }
            };
            self.send(to, payload, self.keep.get(i).copied().unwrap_or(false))?;
        }
        if !t.recv_first
            && let Some(r) = &t.recv
        {
            received = Some(self.receive(r)?);
        }
        if let Some(payload) = received
            && self.spare.len() < MAX_SPARE
        {
            self.spare.push(payload);
        }
        Ok(())
    }

    /// The read-backs the plan's sends and copies into host memory need, in order, each with
    /// the last earlier write that touches the same memory (the read may only begin once that
    /// write is submitted).
    fn send_reads(&self, plan: &Plan) -> Vec<SendRead> {
        let mut out = Vec::new();
        // Per device buffer (input and output can be one), its last writers.
        let mut painter = Painter::new();
        for (i, a) in plan.actions.iter().enumerate() {
            // A read-back into host memory is begun ahead too, and finished at its copy.
            let (region, upto) = match a {
                Action::Copy { src, dst } if self.reads_ahead(src, dst) => (*src, i),
                Action::Transfer(t) => {
                    let Some((_, Source::Device(region))) = t.send else {
                        continue;
                    };
                    if region.buf == Buf::Host {
                        continue;
                    }
                    (region, if t.recv_first { i + 1 } else { i })
                }
                _ => continue,
            };
            let after = painter.after(&plan.actions, upto, self.bytes_of(region), |r| {
                self.bytes_of(r)
            });
            out.push(SendRead {
                action: i,
                after,
                region,
            });
        }
        out
    }

    /// Whether a copy is a read-back into host memory that is begun ahead of it (not in a split
    /// run, where the tensors are host memory and the copy does not happen).
    fn reads_ahead(&self, src: &Region, dst: &Region) -> bool {
        self.split.is_none() && dst.buf == Buf::Host && src.buf != Buf::Host && src.len > 0
    }

    /// A read-back into host memory, begun ahead by [`begin_reads`](Self::begin_reads): waits
    /// for it and copies it into place.
    fn copy_in(
        &mut self,
        i: usize,
        src: Region,
        dst: Region,
        reads: &[SendRead],
        next_read: &mut usize,
        tickets: &mut VecDeque<(usize, ReadTicket)>,
    ) -> Result<()> {
        let bytes = src.len * self.call.dtype.size();
        let range = self.host_range(dst);
        // Checked before its ticket is taken: a ticket left queued is abandoned on the way out.
        if range.end > self.host.len() * 4 || range.len() != bytes {
            return Err(self.internal("a read-back into host memory out of its range"));
        }
        self.begin_reads(reads, next_read, tickets, i as isize - 1)?;
        match tickets.pop_front() {
            Some((a, ticket)) if a == i => {
                let host: &mut [u8] = bytemuck::cast_slice_mut(&mut self.host);
                self.eng
                    .reads
                    .finish_into(&self.eng.dev, ticket, self.call.deadline, &mut host[range])
                    .map_err(|e| wait_error(self.call.at, e))
            }
            other => {
                if let Some((_, ticket)) = other {
                    self.eng.reads.abandon(&self.eng.dev, ticket);
                }
                Err(self.internal("read-back schedule out of order"))
            }
        }
    }

    /// Begins read-backs in plan order while slots are free and their inputs are submitted
    /// (`done` is the last action whose device work has been submitted).
    fn begin_reads(
        &mut self,
        reads: &[SendRead],
        next: &mut usize,
        tickets: &mut VecDeque<(usize, ReadTicket)>,
        done: isize,
    ) -> Result<()> {
        while *next < reads.len() && self.eng.reads.has_free_slot() {
            let r = &reads[*next];
            if r.after.is_some_and(|a| a as isize > done) {
                break;
            }
            let (buf, off) = self.locate(r.region);
            let bytes = r.region.len * self.call.dtype.size();
            let ticket = self
                .eng
                .reads
                .begin(&self.eng.dev, &buf, off, bytes)
                .map_err(|e| wait_error(self.call.at, e))?;
            self.eng.device_bytes = self.eng.device_bytes.saturating_add(bytes as u64);
            tickets.push_back((r.action, ticket));
            *next += 1;
        }
        Ok(())
    }

    /// Sends a frame; `keep` keeps a copy of the payload for a following `Source::Previous`.
    fn send(&mut self, to: usize, payload: Vec<u8>, keep: bool) -> Result<()> {
        if keep {
            self.previous.clone_from(&payload);
        }
        let header = Header {
            unit: self.sent[to],
            payload_bytes: payload.len() as u64,
            ..self.call.header
        };
        self.sent[to] += 1;
        self.eng.bytes_sent += payload.len() as u64;
        self.link
            .send(
                to,
                Frame {
                    header: header.encode(),
                    payload,
                },
            )
            .map_err(|e| self.link_error(e, to))
    }

    /// Receives one frame, checks it against what this rank expects, and folds it into the
    /// destination on the device. Returns the payload (for forwarding).
    fn receive(&mut self, r: &Recv) -> Result<Vec<u8>> {
        let frame = self.recv_frame(r)?;
        self.fold(r, frame)
    }

    /// The next frame from `r.from`, past the arrivals of calls it was skipped in (see
    /// `straggle.rs`: a late rank announces itself for calls already decided without it, and
    /// rank 0 reads on in a later call).
    fn recv_frame(&mut self, r: &Recv) -> Result<Frame> {
        loop {
            let frame = self.recv_once(r)?;
            match super::straggle::arrival_seq(&frame) {
                None => return Ok(frame),
                Some(s) if s < self.call.header.seq => {}
                // The peer is in a call with `skip_after` now, this rank in one without: they
                // disagree about the call (not a peer that left it).
                Some(s) => {
                    return Err(Error::Mismatch {
                        at: self.call.at,
                        peer: r.from,
                        field: "skip_after",
                        ours: "not set".into(),
                        theirs: format!("set (its arrival for call #{s})"),
                    });
                }
            }
        }
    }

    fn recv_once(&mut self, r: &Recv) -> Result<Frame> {
        match self.link.recv(r.from, self.call.deadline) {
            // This peer has taken part in the call, so the rank at fault is further back in
            // the ring, and the rank waiting on it directly is about to say so: give its abort
            // a moment to arrive, so that every rank reports the root cause: a twentieth of
            // the wait, so that the call still returns within its deadline plus 10%.
            Err(LinkError::Timeout) if self.received[r.from] > 0 => {
                let grace = (self.call.deadline - self.call.started) / 20;
                let grace = grace.min(MAX_GRACE);
                self.link
                    .recv(r.from, deadline_from(self.call.deadline, grace))
            }
            other => other,
        }
        .map_err(|e| self.link_error(e, r.from))
    }

    /// Checks a received frame against what this rank expects and folds it into the
    /// destination on the device. Returns the payload (for forwarding).
    fn fold(&mut self, r: &Recv, frame: Frame) -> Result<Vec<u8>> {
        let expected = Header {
            unit: self.received[r.from],
            payload_bytes: (r.dst.len * self.call.dtype.size()) as u64,
            ..self.call.header
        };
        self.received[r.from] += 1;
        let Some(theirs) = Header::decode(&frame.header) else {
            // A peer probing the job while this rank runs a call: they disagree about the call
            // (not a peer that left it for an agreement).
            if super::job_probe::is_probe_frame(&frame) {
                return Err(Error::Mismatch {
                    at: self.call.at,
                    peer: r.from,
                    field: "call",
                    ours: "a collective".into(),
                    theirs: "the job's probe (Communicator::probe)".into(),
                });
            }
            let e = Error::Mismatch {
                at: self.call.at,
                peer: r.from,
                field: super::protocol::NOT_A_CALL,
                ours: format!("{} bytes", std::mem::size_of::<Header>()),
                theirs: format!("{} bytes", frame.header.len()),
            };
            // Kept for the agreement it may belong to (a few at most: each ends a call).
            if self.eng.stray.len() < MAX_STRAY {
                self.eng.stray.push((r.from, frame));
            }
            return Err(e);
        };
        expected.check(&theirs, self.call.at, r.from)?;
        if frame.payload.len() as u64 != expected.payload_bytes {
            return Err(Error::Mismatch {
                at: self.call.at,
                peer: r.from,
                field: "payload length",
                ours: expected.payload_bytes.to_string(),
                theirs: frame.payload.len().to_string(),
            });
        }
        let dtype = self.call.dtype;
        match r.fold {
            Fold::Payload { divide, write } => {
                if r.dst.buf != Buf::Host {
                    return Err(self.internal("a fold into the payload of device memory"));
                }
                let mut payload = frame.payload;
                host_ops::combine(dtype, r.combine, &mut payload, self.host_read(r.dst)?);
                if divide > 1 {
                    host_ops::scale(dtype, &mut payload, divide);
                }
                if write {
                    self.host_write(r.dst, &payload)?;
                }
                Ok(payload)
            }
            Fold::Dst if r.dst.buf == Buf::Host => {
                if self.split.is_some() {
                    // Host memory is the output here, which is written, never read.
                    if r.combine != Combine::Copy {
                        return Err(self.internal("a split plan folds into host memory"));
                    }
                    self.host_write(r.dst, &frame.payload)?;
                } else {
                    host_ops::combine(dtype, r.combine, self.host_bytes(r.dst), &frame.payload);
                }
                Ok(frame.payload)
            }
            Fold::Dst => {
                self.upload(&frame.payload, r.dst, r.combine)?;
                Ok(frame.payload)
            }
        }
    }

    /// The bytes of a host region for reading: the input's own, mapped, in a split run.
    fn host_read(&self, r: Region) -> Result<&[u8]> {
        let range = self.host_range(r);
        let all: &[u8] = match self.split.as_ref().and_then(|s| s.input.as_ref()) {
            Some(input) => input.bytes().unwrap_or_default(),
            None => bytemuck::cast_slice(&self.host),
        };
        all.get(range)
            .ok_or_else(|| self.internal("a host region outside host memory"))
    }

    /// Writes `bytes` into a host region: into the output, mapped, in a split run.
    fn host_write(&mut self, r: Region, bytes: &[u8]) -> Result<()> {
        let range = self.host_range(r);
        if range.len() != bytes.len() {
            return Err(self.internal("a host write of the wrong length"));
        }
        let written = match self.split.as_mut() {
            Some(split) => split.output.write(range.start, bytes),
            None => {
                let all: &mut [u8] = bytemuck::cast_slice_mut(&mut self.host);
                match all.get_mut(range) {
                    Some(dst) => {
                        dst.copy_from_slice(bytes);
                        true
                    }
                    None => false,
                }
            }
        };
        if written {
            Ok(())
        } else {
            Err(self.internal("a host region outside host memory"))
        }
    }

    /// An error of wccl's own bookkeeping (a plan the executor cannot run).
    fn internal(&self, what: &str) -> Error {
        Error::Device {
            at: self.call.at,
            message: format!("internal: {what}"),
        }
    }

    /// Folds host bytes into a device region: staged through an upload slot, then the kernel.
    fn upload(&mut self, bytes: &[u8], dst: Region, combine: Combine) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = self.eng.dev.error_scope();
        if dst.len == 0 {
            return Ok(());
        }
        let mut enc = self
            .eng
            .dev
            .device()
            .create_command_encoder(&Default::default());
        let (buf, off) = self.locate(dst);
        self.eng.device_bytes = self.eng.device_bytes.saturating_add(bytes.len() as u64);
        if combine == Combine::Copy && aligned4(off, bytes.len()) && copy_target(&buf) {
            // A plain copy goes straight from the staging slot to its place: no kernel.
            self.eng
                .uploads
                .stage_to(
                    &self.eng.dev,
                    bytes,
                    &mut enc,
                    Some((&buf, off)),
                    self.call.deadline,
                )
                .map_err(|e| wait_error(self.call.at, e))?;
            let idx = self.eng.kernels.submit(&self.eng.dev, enc);
            self.eng.uploads.submitted(&idx);
            self.last = Some(idx);
            return Ok(());
        }
        let staged = self
            .eng
            .uploads
            .stage(&self.eng.dev, bytes, &mut enc, self.call.deadline)
            .map_err(|e| wait_error(self.call.at, e))?;
        self.eng.kernels.encode(
            &self.eng.dev,
            &mut enc,
            KernelOp::Combine(combine),
            self.call.dtype,
            (&buf, off),
            Some((&staged, 0)),
            dst.len,
        );
        let idx = self.eng.kernels.submit(&self.eng.dev, enc);
        self.eng.uploads.submitted(&idx);
        self.last = Some(idx);
        Ok(())
    }

    /// The bytes of a host region.
    fn host_bytes(&mut self, r: Region) -> &mut [u8] {
        let range = self.host_range(r);
        let all: &mut [u8] = bytemuck::cast_slice_mut(&mut self.host);
        &mut all[range]
    }

    /// The byte range of a host region in host memory.
    fn host_range(&self, r: Region) -> std::ops::Range<usize> {
        let es = self.call.dtype.size();
        r.offset * es..(r.offset + r.len) * es
    }

    /// Device copy; through the bounce buffer when both sides are in the same wgpu buffer
    /// (a kernel may not bind one buffer twice).
    fn copy(&mut self, src: Region, dst: Region) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = self.eng.dev.error_scope();
        if self.split.is_some() {
            // The mapping is the copy: host reads are the input's, host writes the output's.
            return if split::is_mirror(src, dst) {
                Ok(())
            } else {
                Err(self.internal("a split plan copies outside its mirror copies"))
            };
        }
        match (src.buf, dst.buf) {
            (Buf::Host, Buf::Host) => {
                let bytes = self.host_bytes(src).to_vec();
                self.host_bytes(dst).copy_from_slice(&bytes);
                return Ok(());
            }
            (_, Buf::Host) => {
                // Read-backs into host memory are begun ahead and finished in `copy_in`; only
                // an empty one comes here (a read-back begun here could find every slot held
                // by those begun ahead).
                return if src.len == 0 {
                    Ok(())
                } else {
                    Err(self.internal("a read-back into host memory not begun ahead"))
                };
            }
            (Buf::Host, _) => {
                // Host memory is lent to the upload instead of copied for it (the upload
                // touches device buffers only), and put back whatever it returns.
                let range = self.host_range(src);
                let host = std::mem::take(&mut self.host);
                let bytes: &[u8] = bytemuck::cast_slice(&host);
                let r = self.upload(&bytes[range], dst, Combine::Copy);
                self.host = host;
                return r;
            }
            _ => {}
        }
        let (sb, so) = self.locate(src);
        let (db, doff) = self.locate(dst);
        if sb == db && so == doff {
            return Ok(());
        }
        let es = self.call.dtype.size();
        let bytes = src.len * es;
        if sb != db && aligned4(so, bytes) && aligned4(doff, 0) && copy_target(&db) {
            // The adapter's own copy: on most adapters far faster than a kernel.
            let mut enc = self
                .eng
                .dev
                .device()
                .create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&sb, so, &db, doff, bytes as u64);
            self.last = Some(self.eng.kernels.submit(&self.eng.dev, enc));
            return Ok(());
        }
        if sb != db {
            self.kernel(
                KernelOp::Combine(Combine::Copy),
                (&db, doff),
                Some((&sb, so)),
                src.len,
            );
            return Ok(());
        }
        let bounce = self
            .eng
            .uploads
            .bounce(&self.eng.dev)
            .map_err(|message| Error::Device {
                at: self.call.at,
                message,
            })?;
        let per = (self.eng.uploads.slot_bytes() as usize / es).max(1);
        let mut done = 0;
        while done < src.len {
            let n = per.min(src.len - done);
            let off = (done * es) as u64;
            let copy = KernelOp::Combine(Combine::Copy);
            self.kernel(copy, (&bounce, 0), Some((&sb, so + off)), n);
            self.kernel(copy, (&db, doff + off), Some((&bounce, 0)), n);
            done += n;
        }
        Ok(())
    }

    /// Encodes and submits one kernel, in as many submissions as its size needs.
    fn kernel(
        &mut self,
        op: KernelOp,
        dst: (&Buffer, u64),
        src: Option<(&Buffer, u64)>,
        len: usize,
    ) {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = self.eng.dev.error_scope();
        let es = self.call.dtype.size() as u64;
        let per = self.eng.kernels.max_elements_per_submit(self.call.dtype);
        let mut done = 0;
        while done < len {
            let n = per.min(len - done);
            let off = done as u64 * es;
            let mut enc = self
                .eng
                .dev
                .device()
                .create_command_encoder(&Default::default());
            self.eng.kernels.encode(
                &self.eng.dev,
                &mut enc,
                op,
                self.call.dtype,
                (dst.0, dst.1 + off),
                src.map(|(b, o)| (b, o + off)),
                n,
            );
            self.last = Some(self.eng.kernels.submit(&self.eng.dev, enc));
            done += n;
        }
    }

    /// The wgpu buffer and byte offset of a region.
    fn locate(&self, r: Region) -> (Buffer, u64) {
        let es = self.call.dtype.size() as u64;
        let (buf, base) = match (r.buf, &self.call.tensors, &self.scratch) {
            (Buf::Input, Some((input, _)), _) => (input.buffer, input.offset),
            (Buf::Output, Some((_, output)), _) => (output.buffer, output.offset),
            (Buf::Scratch, _, Some(s)) => (s, 0),
            // Only empty regions get here (barrier frames); they are never read or written.
            _ => (self.eng.placeholder(), 0),
        };
        (buf.clone(), base + r.offset as u64 * es)
    }

    /// The device buffer and byte range a region covers (input and output can be one buffer);
    /// none for host regions, which are read and written synchronously (no device read waits
    /// on them), and for empty ones.
    fn bytes_of(&self, r: Region) -> Option<(Buffer, u64, u64)> {
        if r.len == 0 || r.buf == Buf::Host {
            return None;
        }
        let es = self.call.dtype.size() as u64;
        let (buf, start) = self.locate(r);
        Some((buf, start, start + r.len as u64 * es))
    }

    fn link_error(&self, e: LinkError, peer: usize) -> Error {
        call_link_error(self.link, self.call.at, self.call.started, e, peer)
    }
}

/// What a call (begun at `started`, failing at `at`) reports for a link error while it waited
/// on, or sent to, `peer`: the executor's and the straggler handshake's.
pub(crate) fn call_link_error(
    link: &dyn Link,
    at: At,
    started: Instant,
    e: LinkError,
    peer: usize,
) -> Error {
    match e {
        LinkError::Timeout => {
            // The peers that fell silent (a stopped or hung process, where the link can
            // tell) are the cause; the peer this rank waited on may be waiting on them too.
            let waited = started.elapsed();
            let silent = link.silent_peers((waited / 2).max(MIN_SILENCE));
            Error::Timeout {
                at,
                waiting_on: if silent.is_empty() {
                    vec![peer]
                } else {
                    silent
                },
                waited,
            }
        }
        LinkError::Closed => Error::LinkClosed { at, peer },
        LinkError::Gone(p) => Error::LinkClosed { at, peer: p },
        LinkError::Exited(p) => Error::PeerExited { at, peer: p },
        LinkError::Corrupt { peer, reason } => Error::Corrupt { at, peer, reason },
        LinkError::Unsendable(message) => Error::InvalidArgument { at, message },
        LinkError::Aborted { from, reason } => match super::communicator::revoked(&reason) {
            Some(why) => Error::Revoked {
                at,
                by: from,
                reason: why.to_string(),
            },
            // This rank's own abort handle fired while it waited (see `Link::remote_abort`).
            None if from == at.rank => Error::Aborted { at, reason },
            None => Error::PeerAborted {
                at,
                peer: from,
                reason,
            },
        },
    }
}

/// The shortest silence that names a peer as the cause of a timeout: two heartbeats of the TCP
/// link's default half-second, missed.
pub(crate) const MIN_SILENCE: Duration = Duration::from_secs(1);

/// Whether a byte offset and length suit `copy_buffer_to_buffer` (multiples of 4).
fn aligned4(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(4) && len.is_multiple_of(4)
}

/// Whether copies may write into `buf` (caller buffers need only `STORAGE | COPY_SRC`; without
/// `COPY_DST` the kernels write instead).
fn copy_target(buf: &Buffer) -> bool {
    buf.usage().contains(BufferUsages::COPY_DST)
}

/// For each action, whether the next sending action re-sends its payload (`Source::Previous`),
/// so that only those payloads are copied.
fn keep_flags(plan: &Plan) -> Vec<bool> {
    let sends: Vec<Option<Source>> = plan
        .actions
        .iter()
        .map(|a| match a {
            Action::Transfer(t) => t.send.map(|s| s.1),
            _ => None,
        })
        .collect();
    (0..sends.len())
        .map(|i| {
            sends[i].is_some()
                && sends[i + 1..]
                    .iter()
                    .flatten()
                    .next()
                    .is_some_and(|s| *s == Source::Previous)
        })
        .collect()
}
