//! Device work outside collectives, for layers built on a communicator (the parameter server):
//! read a tensor back through the staging ring, fold host bytes into a tensor, and reach the
//! link. Crate-internal.

use std::time::Instant;

use super::communicator::Communicator;
use crate::device::{TensorRef, WaitError, wait_error};
use crate::error::{At, Error, Result};
use crate::kernels::KernelOp;
use crate::link::Link;
use crate::types::Combine;

impl Communicator {
    /// This rank's link.
    pub(crate) fn link(&self) -> &dyn Link {
        self.link_ref()
    }

    /// Reads `t` back to the host through the read ring, keeping every slot busy. On an error
    /// the read-backs in flight are abandoned: no slot stays busy or mapped.
    pub(crate) fn read_now(&mut self, t: TensorRef<'_>, deadline: Instant) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(t, deadline, &mut out)?;
        Ok(out)
    }

    /// [`read_now`](Self::read_now) into `out` (cleared first; left cleared on an error): a
    /// buffer reused from read to read, whose pages are mapped already, as the executor's host
    /// memory and spare buffers are from call to call (the probe times read-backs this way).
    pub(crate) fn read_into(
        &mut self,
        t: TensorRef<'_>,
        deadline: Instant,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        let at = At::rank(self.rank());
        self.gate(at)?;
        t.validate(at, "read")?;
        let e = &mut self.engine;
        let slot = e.uploads.slot_bytes() as usize;
        let total = usize::try_from(t.bytes()).map_err(|_| Error::InvalidArgument {
            at,
            message: format!("{} bytes do not fit this host's memory", t.bytes()),
        })?;
        out.reserve(total);
        let mut pending = std::collections::VecDeque::new();
        let mut off = 0;
        let result = (|| {
            while off < total || !pending.is_empty() {
                while off < total && e.reads.has_free_slot() {
                    let len = slot.min(total - off);
                    // `off < total <= t.bytes()`, and the view's end was checked: no overflow.
                    let ticket = e
                        .reads
                        .begin(&e.dev, t.buffer, t.offset + off as u64, len)?;
                    pending.push_back(ticket);
                    off += len;
                }
                // With no slot free and none of ours in flight nothing would ever progress:
                // an error, not a loop that spins for ever.
                let Some(ticket) = pending.pop_front() else {
                    return Err(WaitError::Device(
                        "internal: every read staging slot is busy".into(),
                    ));
                };
                e.reads.finish_append(&e.dev, ticket, deadline, out)?;
            }
            Ok(())
        })();
        e.reads.abandon_all(&e.dev, pending);
        let checked = result
            .map_err(|w| wait_error(at, w))
            .and_then(|()| e.dev.check(at));
        if checked.is_err() {
            out.clear();
        }
        checked
    }

    /// `t = combine(t, bytes)` on the device: the bytes go through the upload ring, slot by
    /// slot, into the reduce kernel. Waits until done.
    pub(crate) fn fold_now(
        &mut self,
        bytes: &[u8],
        t: TensorRef<'_>,
        combine: Combine,
        deadline: Instant,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let scope = self.engine.dev.error_scope();
        let at = At::rank(self.rank());
        self.gate(at)?;
        t.validate(at, "fold")?;
        if bytes.len() as u64 != t.bytes() {
            return Err(Error::InvalidArgument {
                at,
                message: format!("{} bytes for a tensor of {}", bytes.len(), t.bytes()),
            });
        }
        let es = t.dtype.size();
        let e = &mut self.engine;
        let slot = (e.uploads.slot_bytes() as usize / es) * es;
        let mut last = None;
        for (i, piece) in bytes.chunks(slot.max(es)).enumerate() {
            let mut enc = e.dev.device().create_command_encoder(&Default::default());
            let staged = e
                .uploads
                .stage(&e.dev, piece, &mut enc, deadline)
                .map_err(|w| wait_error(at, w))?;
            let off = t.offset + (i * slot) as u64;
            e.kernels.encode(
                &e.dev,
                &mut enc,
                KernelOp::Combine(combine),
                t.dtype,
                (t.buffer, off),
                Some((&staged, 0)),
                piece.len() / es,
            );
            let idx = e.kernels.submit(&e.dev, enc);
            e.uploads.submitted(&idx);
            last = Some(idx);
        }
        // End the scope before the wait, so that an error of this work is this call's.
        drop(scope);
        if let Some(idx) = last {
            e.dev
                .wait_submission(&idx, deadline)
                .map_err(|w| wait_error(at, w))?;
        }
        e.dev.check(at)
    }
}
