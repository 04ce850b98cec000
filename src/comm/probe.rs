//! Measuring a rank's device through the same paths the executor uses (staging rings, kernels),
//! for the cost model.

use std::time::Instant;

use wgpu::{Buffer, BufferUsages};

use super::communicator::Communicator;
use super::host_ops;
use crate::deadline::deadline_after;
use crate::device::{TensorRef, wait_error};
use crate::error::{At, Error, Result};
use crate::kernels::KernelOp;
use crate::model::{CACHED_BYTES, Figures};
use crate::types::{Combine, DType};

const REPEATS: usize = 5;
const STEP_SAMPLES: usize = 41;

impl Communicator {
    /// Measures this rank's device: upload and read-back through the staging rings, the copy and
    /// reduce kernels, the host's reduce (on `bytes`, and on a buffer that stays in the CPU's
    /// caches: [`Figures::host_cached`]), and the fixed cost of one small pipeline step, each on
    /// `bytes` (median of 5, after one untimed). `sync` is called before each measurement, so
    /// that ranks probed at the same time measure the same thing together; its error (a peer
    /// that failed or never came) ends the probe. The untimed run, and the timed five, each
    /// have the communicator's timeout as their deadline.
    pub fn probe_device(
        &mut self,
        bytes: usize,
        sync: &(dyn Fn() -> Result<()> + Sync),
    ) -> Result<Figures> {
        self.probe_device_spans(bytes, &mut |_| sync())
            .map(|(f, _)| f)
    }

    /// [`probe_device`](Self::probe_device), and beside it the throughputs over each
    /// measurement's whole span (every repeat, from the `sync` that starts it): ranks probed
    /// at once do not run every repeat side by side (on shared cores one may run its repeats
    /// while another waits), so their medians can each look like a rank alone; their spans
    /// add up to what they did together. `sync` gets the communicator, so that ranks of
    /// separate processes can meet in a barrier call.
    pub(crate) fn probe_device_spans(
        &mut self,
        bytes: usize,
        sync: &mut dyn FnMut(&mut Communicator) -> Result<()>,
    ) -> Result<(Figures, Figures)> {
        // The probe's own allocations run in this scope, ended (and so recorded) before the first
        // wait; the measurements' submits have scopes of their own.
        let scope = self.engine.dev.error_scope();
        let at = At::rank(self.rank());
        self.gate(at)?;
        let max = self.engine.dev.limits().max_buffer_size;
        let bytes = bytes
            .checked_next_multiple_of(4)
            .map(|b| b.max(4096))
            .filter(|&b| b as u64 <= max)
            .ok_or_else(|| Error::InvalidArgument {
                at,
                message: format!("a probe of {bytes} bytes exceeds the largest buffer ({max})"),
            })?;
        let timeout = self.config().timeout;
        let make = |c: &Communicator| {
            c.engine
                .dev
                .device()
                .create_buffer(&wgpu::BufferDescriptor {
                    label: Some("wccl probe"),
                    size: bytes as u64,
                    usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
        };
        let (a, b) = (make(self), make(self));
        drop(scope);
        self.engine.dev.check(at)?;
        // Staging slots grow when a call first needs them: grown now, so that no timing below
        // includes it.
        let e = &mut self.engine;
        e.reads.reserve(&e.dev).map_err(|w| wait_error(at, w))?;
        let ready = deadline_after(timeout);
        e.uploads
            .reserve(&e.dev, ready)
            .map_err(|w| wait_error(at, w))?;
        let source = probe_source(bytes);
        let host: &[u8] = bytemuck::cast_slice(&source);
        let rate = |secs: f64| bytes as f64 / secs.max(1e-9);
        let rates = |(median, span): (f64, f64)| (rate(median), rate(span / REPEATS as f64));

        let mut warmed = |c: &mut Communicator,
                          f: &mut dyn FnMut(&mut Communicator, Instant) -> Result<f64>|
         -> Result<(f64, f64)> {
            // First-touch costs paid before the ranks meet, so that every rank's timed runs
            // start together and none of them carries them (see `timed`).
            f(c, deadline_after(timeout))?;
            sync(c)?;
            let deadline = deadline_after(timeout);
            timed(REPEATS, || f(c, deadline))
        };
        let upload = rates(warmed(self, &mut |c, d| c.upload_all(host, &b, d, at))?);
        // Into one buffer, reused: the executor reads back into host memory and spare buffers
        // it keeps from call to call, whose pages are mapped already. A fresh buffer a timing
        // pays the kernel for every page it first touches (on this machine's VM, read-backs
        // of 16 MiB with 2 and 4 ranks at once ran 1.3-1.55x faster reused).
        let mut landing = Vec::new();
        let readback = rates(warmed(self, &mut |c, d| {
            c.readback_all(&a, bytes, d, &mut landing)
        })?);
        let count = bytes / 4;
        let copy = rates(warmed(self, &mut |c, d| {
            c.kernel_once(KernelOp::Combine(Combine::Copy), &b, &a, count, d, at)
        })?);
        let reduce = rates(warmed(self, &mut |c, d| {
            c.kernel_once(KernelOp::Combine(Combine::Sum), &b, &a, count, d, at)
        })?);
        let native_copy = rates(warmed(self, &mut |c, d| {
            let t = Instant::now();
            let e = &mut c.engine;
            let mut enc = e.dev.device().create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes as u64);
            let idx = e.dev.queue().submit([enc.finish()]);
            e.dev
                .wait_submission(&idx, d)
                .map_err(|w| wait_error(at, w))?;
            Ok(t.elapsed().as_secs_f64())
        })?);
        // Written before it is timed, as `host` is, for the same reason.
        let mut acc = vec![1.0f32.to_bits(); count];
        let host_reduce = rates(warmed(self, &mut |_, _| {
            let t = Instant::now();
            host_ops::combine(
                DType::F32,
                Combine::Sum,
                bytemuck::cast_slice_mut(&mut acc),
                host,
            );
            Ok(t.elapsed().as_secs_f64())
        })?);
        // The same fold on the first `CACHED_BYTES` of both, over and over in each timing (at
        // least as many bytes as one timing above, so that the ranks' spans are as long): what
        // a fold costs on buffers that stay in the CPU's caches, where a call's host memory is
        // small. Not where the probe is that small itself (the fold above measured it), but
        // the ranks meet all the same, so that every probe meets as often whatever its size
        // (ranks probing different sizes learn it only later, in the job probe's token).
        let host_cached = if bytes > CACHED_BYTES {
            let folds = bytes.div_ceil(CACHED_BYTES);
            let timed = warmed(self, &mut |_, _| {
                let t = Instant::now();
                let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut acc);
                for _ in 0..folds {
                    host_ops::combine(
                        DType::F32,
                        Combine::Sum,
                        &mut dst[..CACHED_BYTES],
                        &host[..CACHED_BYTES],
                    );
                }
                Ok(t.elapsed().as_secs_f64())
            })?;
            let folded = |secs: f64| folds.saturating_mul(CACHED_BYTES) as f64 / secs.max(1e-9);
            (folded(timed.0), folded(timed.1 / REPEATS as f64))
        } else {
            sync(self)?;
            (0.0, 0.0)
        };
        sync(self)?;
        let deadline = deadline_after(timeout);
        // One pipeline step's fixed cost: a 4-byte read-back, then a 4-byte upload (no kernel).
        let step = median(STEP_SAMPLES, || {
            let t = Instant::now();
            self.readback_all(&a, 4, deadline, &mut landing)?;
            self.upload_all(&host[..4], &b, deadline, at)?;
            Ok(t.elapsed().as_secs_f64())
        })?;
        sync(self)?;
        let deadline = deadline_after(timeout);
        // A step that folds on the device, as the executor folds a received slice: the same
        // read-back, then the 4 bytes staged and reduced by a kernel in one submission. What
        // it costs over a plain step, the two timed in turn (drift and load hit both alike;
        // which goes first alternates), is the kernel's launch.
        let mut folds_first = false;
        let launch = median(STEP_SAMPLES, || {
            folds_first = !folds_first;
            let mut plain = 0.0;
            let mut folding = 0.0;
            for fold in [folds_first, !folds_first] {
                let t = Instant::now();
                self.readback_all(&a, 4, deadline, &mut landing)?;
                if fold {
                    self.upload_fold(&host[..4], &b, deadline, at)?;
                    folding = t.elapsed().as_secs_f64();
                } else {
                    self.upload_all(&host[..4], &b, deadline, at)?;
                    plain = t.elapsed().as_secs_f64();
                }
            }
            Ok(folding - plain)
        })?;
        let figures = Figures {
            upload: upload.0,
            readback: readback.0,
            copy: copy.0,
            reduce: reduce.0,
            host_reduce: host_reduce.0,
            step,
            native_copy: native_copy.0,
            // Measured for all ranks at once by `CommGroup::probe` (they need the links).
            frame: 0.0,
            call: 0.0,
            submit: 0.0,
            launch: launch.max(0.0),
            // Measured for all ranks at once by `CommGroup::probe` (a peer's steps).
            wait: 0.0,
            host_cached: host_cached.0,
        };
        let spans = Figures {
            upload: upload.1,
            readback: readback.1,
            copy: copy.1,
            reduce: reduce.1,
            host_reduce: host_reduce.1,
            native_copy: native_copy.1,
            host_cached: host_cached.1,
            ..figures
        };
        Ok((figures, spans))
    }

    /// Uploads `host` through the upload ring in slot-sized pieces and copies each into `dst`.
    fn upload_all(&mut self, host: &[u8], dst: &Buffer, deadline: Instant, at: At) -> Result<f64> {
        // No scope of its own: staging and `submit` have theirs, ended before any wait here.
        let t = Instant::now();
        let e = &mut self.engine;
        let slot = e.uploads.slot_bytes() as usize;
        let mut last = None;
        for (i, piece) in host.chunks(slot).enumerate() {
            let mut enc = e.dev.device().create_command_encoder(&Default::default());
            let staged = e
                .uploads
                .stage(&e.dev, piece, &mut enc, deadline)
                .map_err(|w| wait_error(at, w))?;
            let off = (i * slot) as u64;
            let len = (piece.len() as u64).next_multiple_of(4);
            enc.copy_buffer_to_buffer(&staged, 0, dst, off, len.min(dst.size() - off));
            let idx = e.kernels.submit(&e.dev, enc);
            e.uploads.submitted(&idx);
            last = Some(idx);
        }
        if let Some(idx) = last {
            e.dev
                .wait_submission(&idx, deadline)
                .map_err(|w| wait_error(at, w))?;
        }
        e.dev.check(at)?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Stages `host` (at most a slot) through the upload ring and reduces it into the start of
    /// `dst` with a kernel in the same submission, as the executor folds a received slice;
    /// waits for it.
    fn upload_fold(&mut self, host: &[u8], dst: &Buffer, deadline: Instant, at: At) -> Result<f64> {
        let t = Instant::now();
        let e = &mut self.engine;
        let mut enc = e.dev.device().create_command_encoder(&Default::default());
        let staged = e
            .uploads
            .stage(&e.dev, host, &mut enc, deadline)
            .map_err(|w| wait_error(at, w))?;
        e.kernels.encode(
            &e.dev,
            &mut enc,
            KernelOp::Combine(Combine::Sum),
            DType::F32,
            (dst, 0),
            Some((&staged, 0)),
            host.len() / 4,
        );
        let idx = e.kernels.submit(&e.dev, enc);
        e.uploads.submitted(&idx);
        e.dev
            .wait_submission(&idx, deadline)
            .map_err(|w| wait_error(at, w))?;
        e.dev.check(at)?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Reads `bytes` of `src` back through the read ring into `into`, as the executor does.
    fn readback_all(
        &mut self,
        src: &Buffer,
        bytes: usize,
        deadline: Instant,
        into: &mut Vec<u8>,
    ) -> Result<f64> {
        let t = Instant::now();
        self.read_into(
            TensorRef::new(src, 0, bytes / 4, DType::F32),
            deadline,
            into,
        )?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn kernel_once(
        &mut self,
        op: KernelOp,
        dst: &Buffer,
        src: &Buffer,
        count: usize,
        deadline: Instant,
        at: At,
    ) -> Result<f64> {
        // No scope of its own: `encode` and `submit` have theirs, ended before the wait.
        let t = Instant::now();
        let e = &mut self.engine;
        let mut enc = e.dev.device().create_command_encoder(&Default::default());
        e.kernels.encode(
            &e.dev,
            &mut enc,
            op,
            DType::F32,
            (dst, 0),
            Some((src, 0)),
            count,
        );
        let idx = e.kernels.submit(&e.dev, enc);
        e.dev
            .wait_submission(&idx, deadline)
            .map_err(|w| wait_error(at, w))?;
        e.dev.check(at)?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// The median of `k` timings (seconds), and the span of all `k` (seconds, from the first's
/// start to the last's end). The probe runs each measurement once untimed first: a first run
/// pays for the memory it touches first (staging slots grown just before, a kernel's first
/// dispatch, a read-back's destination). On this machine's VM that took 30-43 ms against 4-9
/// ms for each later run of 16 MiB, and the span, from which ranks probed at once get their
/// figures, carried all of it, where a call's transfers reuse memory in place already.
fn timed(k: usize, f: impl FnMut() -> Result<f64>) -> Result<(f64, f64)> {
    let t = Instant::now();
    let m = median(k, f)?;
    Ok((m, t.elapsed().as_secs_f64()))
}

/// The probe's host data, `bytes / 4` f32 ones: real data in real pages. A zeroed allocation
/// that nobody wrote maps every page to the kernel's one zero page, so reading it (the upload's
/// source, the host fold's operand) hits the cache and measures a rate no caller's tensor gets,
/// and whether an allocation came fresh (zero pages) or reused (real ones) changed the figure
/// from rank to rank and run to run. Ones: no denormals to slow the fold. As f32, so that the
/// fold takes its aligned path, as the executor's host memory (u32 words) does.
fn probe_source(bytes: usize) -> Vec<f32> {
    vec![1.0f32; bytes / 4]
}

/// The median of `k` timings (seconds).
fn median(k: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..k).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}
