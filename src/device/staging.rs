//! Staging buffers between one device and the host, created once per communicator and reused.
//!
//! A [`ReadRing`] holds `MAP_READ` buffers: a read-back copies a device range into a free slot
//! and asks for it to be mapped as soon as the copy finishes, so several read-backs can be in
//! flight while the host does other work. An [`UploadRing`] holds `MAP_WRITE` buffers, each with
//! a device-side twin that the kernels read: the host writes into a mapped slot, a copy moves it
//! to the twin, and the slot is re-mapped for writing as soon as that copy has run.
//!
//! Slots start at [`FIRST_SLOT_BYTES`] (or the slice, if smaller) and grow to the slice the
//! first time a call needs more: a communicator that only ever moves small tensors never
//! allocates (nor has its driver zero-fill) its full slices' worth, and making one, or remaking
//! one after a failure, costs little.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use wgpu::{Buffer, BufferUsages, CommandEncoder, MapMode, SubmissionIndex};

use super::context::{RankDevice, WaitError};

struct ReadSlot {
    buffer: Buffer,
    mapped: Arc<AtomicBool>,
}

/// A read-back in flight: which slot holds it and where the wanted bytes sit in it.
pub(crate) struct ReadTicket {
    slot: usize,
    submission: Option<SubmissionIndex>,
    head: usize,
    len: usize,
    mapped_len: u64,
}

/// Reusable `MAP_READ` staging slots.
///
/// A slot is busy from [`begin`](ReadRing::begin) until [`finish`](ReadRing::finish) or
/// [`abandon`](ReadRing::abandon) has unmapped it, so that a slot is never reused while its map
/// is pending or held.
pub(crate) struct ReadRing {
    slots: Vec<ReadSlot>,
    busy: Vec<bool>,
    /// Per slot: a map was requested and the buffer has not been unmapped since.
    held: Vec<bool>,
    /// The size a slot grows to: `slot_bytes` and room for rounding out to 4 bytes.
    full: u64,
}

/// How long clean-up after a failed call waits for a read-back's copy to land before it cancels
/// the map (the copy itself is harmless once nobody maps the slot).
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A slot's size until a call needs more (then it grows to the ring's full size, once).
pub(crate) const FIRST_SLOT_BYTES: u64 = 64 << 10;

fn read_buffer(dev: &RankDevice, size: u64) -> Buffer {
    dev.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wccl read staging"),
        size,
        usage: BufferUsages::MAP_READ | BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

impl ReadRing {
    /// `slots` buffers for read-backs of up to `slot_bytes` each (plus room for rounding a
    /// range out to 4 bytes), each [`FIRST_SLOT_BYTES`] until a read-back needs more.
    pub(crate) fn new(dev: &RankDevice, slots: usize, slot_bytes: u64) -> Self {
        let full = slot_bytes.next_multiple_of(4).saturating_add(8);
        let slots: Vec<ReadSlot> = (0..slots.max(1))
            .map(|_| ReadSlot {
                buffer: read_buffer(dev, full.min(FIRST_SLOT_BYTES)),
                mapped: Arc::new(AtomicBool::new(false)),
            })
            .collect();
        let busy = vec![false; slots.len()];
        let held = vec![false; slots.len()];
        ReadRing {
            slots,
            busy,
            held,
            full,
        }
    }

    /// Grows free slot `slot` to the full size. A free slot is unmapped (`release` unmaps
    /// before it frees), and the grown one has a flag of its own, so that no callback of the
    /// old buffer's can touch the new one's. A buffer that cannot be made leaves the slot as
    /// it was.
    fn grow(&mut self, dev: &RankDevice, slot: usize) -> Result<(), WaitError> {
        let (buffer, error) = dev.catching(|| read_buffer(dev, self.full));
        if let Some(e) = error {
            return Err(WaitError::Device(format!(
                "growing a read-back slot to {} bytes: {e}",
                self.full
            )));
        }
        self.slots[slot] = ReadSlot {
            buffer,
            mapped: Arc::new(AtomicBool::new(false)),
        };
        Ok(())
    }

    /// Grows every free slot to the full size now (a probe, so that its timings do not
    /// include the growth).
    pub(crate) fn reserve(&mut self, dev: &RankDevice) -> Result<(), WaitError> {
        for slot in 0..self.slots.len() {
            if !self.busy[slot] && self.slots[slot].buffer.size() < self.full {
                self.grow(dev, slot)?;
            }
        }
        Ok(())
    }

    /// Whether another read-back can begin.
    pub(crate) fn has_free_slot(&self) -> bool {
        self.busy.iter().any(|b| !b)
    }

    /// Slots that are busy or whose buffer is mapped or waiting for a map: zero between calls,
    /// whatever the last call returned.
    pub(crate) fn in_use(&self) -> usize {
        self.busy
            .iter()
            .zip(&self.held)
            .filter(|(b, h)| **b || **h)
            .count()
    }

    /// Starts copying `len` bytes at `offset` of `src` into a free slot. `len` must be within
    /// the slot size; with no slot free this is an error, never a busy slot taken over.
    pub(crate) fn begin(
        &mut self,
        dev: &RankDevice,
        src: &Buffer,
        offset: u64,
        len: usize,
    ) -> Result<ReadTicket, WaitError> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let slot = self.busy.iter().position(|b| !b).ok_or_else(|| {
            WaitError::Device("internal: a read-back began with every staging slot busy".into())
        })?;
        // Copies move whole 4-byte words: round the range out (f16 views may start mid-word).
        let start = offset & !3;
        let end = offset
            .checked_add(len as u64)
            .and_then(|e| e.checked_next_multiple_of(4))
            .filter(|&e| e - start <= self.full)
            .ok_or_else(|| {
                WaitError::Device(format!(
                    "internal: a read-back of {len} bytes at {offset} does not fit a staging slot"
                ))
            })?;
        if end - start > self.slots[slot].buffer.size() {
            self.grow(dev, slot)?;
        }
        let s = &self.slots[slot];
        self.busy[slot] = true;
        if len == 0 {
            return Ok(ReadTicket {
                slot,
                submission: None,
                head: 0,
                len: 0,
                mapped_len: 0,
            });
        }
        s.mapped.store(false, Ordering::Release);
        let mut enc = dev.device().create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, start, &s.buffer, 0, end - start);
        let flag = Arc::clone(&s.mapped);
        enc.map_buffer_on_submit(&s.buffer, MapMode::Read, 0..end - start, move |_| {
            flag.store(true, Ordering::Release)
        });
        let submission = dev.queue().submit([enc.finish()]);
        self.held[slot] = true;
        Ok(ReadTicket {
            slot,
            submission: Some(submission),
            head: (offset - start) as usize,
            len,
            mapped_len: end - start,
        })
    }

    /// Waits for a read-back and copies its bytes out of the slot.
    ///
    /// The slot is unmapped and free again once this returns, whether or not it succeeded.
    #[cfg(test)]
    pub(crate) fn finish(
        &mut self,
        dev: &RankDevice,
        ticket: ReadTicket,
        deadline: Instant,
    ) -> Result<Vec<u8>, WaitError> {
        self.finish_in(dev, ticket, deadline, Vec::new())
    }

    /// Like [`finish`](Self::finish), but into `buf` (cleared first): a buffer reused from call
    /// to call has its pages mapped already.
    pub(crate) fn finish_in(
        &mut self,
        dev: &RankDevice,
        ticket: ReadTicket,
        deadline: Instant,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, WaitError> {
        buf.clear();
        self.finish_append(dev, ticket, deadline, &mut buf)?;
        Ok(buf)
    }

    /// Like [`finish`](Self::finish), but appends the bytes to `out`.
    pub(crate) fn finish_append(
        &mut self,
        dev: &RankDevice,
        ticket: ReadTicket,
        deadline: Instant,
        out: &mut Vec<u8>,
    ) -> Result<(), WaitError> {
        self.finish_with(dev, ticket, deadline, |bytes| out.extend_from_slice(bytes))
    }

    /// Like [`finish`](Self::finish), but copies the bytes straight into `out` (its length
    /// must be the read-back's): no allocation, one copy fewer.
    pub(crate) fn finish_into(
        &mut self,
        dev: &RankDevice,
        ticket: ReadTicket,
        deadline: Instant,
        out: &mut [u8],
    ) -> Result<(), WaitError> {
        if out.len() != ticket.len {
            let len = ticket.len;
            self.abandon(dev, ticket);
            return Err(WaitError::Device(format!(
                "internal: a read-back of {len} bytes finished into {} bytes",
                out.len()
            )));
        }
        self.finish_with(dev, ticket, deadline, |bytes| out.copy_from_slice(bytes))
    }

    /// Waits for a read-back, hands its bytes to `take`, and frees the slot (whether or not it
    /// succeeded).
    fn finish_with(
        &mut self,
        dev: &RankDevice,
        ticket: ReadTicket,
        deadline: Instant,
        take: impl FnOnce(&[u8]),
    ) -> Result<(), WaitError> {
        let Some(submission) = &ticket.submission else {
            self.busy[ticket.slot] = false;
            take(&[]);
            return Ok(());
        };
        let s = &self.slots[ticket.slot];
        if let Err(e) = dev.wait_flag(&s.mapped, Some(submission), deadline) {
            // The wait already ran to its deadline (or the device failed): no drain on top of
            // it, the map still pending is cancelled; the call's other read-backs drain once,
            // together (`abandon_all`).
            self.abandon_by(dev, ticket, Instant::now());
            return Err(e);
        }
        let out = match s.buffer.get_mapped_range(0..ticket.mapped_len) {
            Ok(view) => {
                take(&view[ticket.head..ticket.head + ticket.len]);
                Ok(())
            }
            Err(e) => Err(WaitError::Device(format!("mapping a read-back: {e}"))),
        };
        self.release(dev, ticket.slot);
        out
    }

    /// Gives up a read-back that nobody will finish (the call failed): waits a bounded time for
    /// its copy and map, then unmaps the slot, or cancels a map still pending, and frees it.
    pub(crate) fn abandon(&mut self, dev: &RankDevice, ticket: ReadTicket) {
        self.abandon_by(dev, ticket, crate::deadline::deadline_after(DRAIN_WAIT));
    }

    /// [`abandon`](Self::abandon) for every ticket of a failed call, with one drain wait for
    /// them all: each waiting its own would return a stalled device's call a drain wait per
    /// read-back in flight late (up to the pipeline's depth of them).
    pub(crate) fn abandon_all(
        &mut self,
        dev: &RankDevice,
        tickets: impl IntoIterator<Item = ReadTicket>,
    ) {
        let until = crate::deadline::deadline_after(DRAIN_WAIT);
        for ticket in tickets {
            self.abandon_by(dev, ticket, until);
        }
    }

    /// Waits for the ticket's copy and map until `until` at most, then unmaps (or cancels the
    /// map) and frees the slot.
    ///
    /// A map cancelled before it landed stays on its submission's list in wgpu, and when that
    /// submission completes wgpu maps whatever request the buffer then has pending: a later
    /// read-back's, before that one's own copy ran, whose bytes would be this one's. So a slot
    /// whose map was cancelled gets a fresh buffer and flag (the old buffer is dropped, and its
    /// stale entry maps nothing of ours); where none can be made (a failing device, whose
    /// calls fail from here on), it keeps the old one.
    fn abandon_by(&mut self, dev: &RankDevice, ticket: ReadTicket, until: Instant) {
        let settled = match &ticket.submission {
            Some(submission) => {
                let s = &self.slots[ticket.slot];
                dev.settle(&s.mapped, Some(submission), until)
            }
            None => true,
        };
        self.release(dev, ticket.slot);
        if !settled {
            let size = self.slots[ticket.slot].buffer.size();
            let (buffer, error) = dev.catching(|| read_buffer(dev, size));
            if error.is_none() {
                self.slots[ticket.slot] = ReadSlot {
                    buffer,
                    mapped: Arc::new(AtomicBool::new(false)),
                };
            }
        }
    }

    /// Unmaps a slot whose map was requested (a pending map is cancelled) and frees it.
    fn release(&mut self, dev: &RankDevice, slot: usize) {
        if self.held[slot] {
            // In a scope: after a failed map (a lost device, say) the unmap is an error too, and
            // on a caller's device it must not reach the caller's handler.
            let _scope = dev.error_scope();
            self.slots[slot].buffer.unmap();
            self.held[slot] = false;
        }
        self.busy[slot] = false;
    }
}

struct UploadSlot {
    staging: Buffer,
    target: Buffer,
    mapped: Arc<AtomicBool>,
    last_use: Option<SubmissionIndex>,
}

/// Reusable `MAP_WRITE` staging slots with device-side twins that kernels read from.
pub(crate) struct UploadRing {
    slots: Vec<UploadSlot>,
    next: usize,
    slot_bytes: u64,
    /// A device buffer of `slot_bytes` for device-side copies, made the first time one needs it.
    bounce: Option<Buffer>,
}

impl UploadSlot {
    /// A slot of `size` bytes, its staging buffer mapped for writing.
    fn new(dev: &RankDevice, size: u64) -> Self {
        UploadSlot {
            staging: dev.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("wccl upload staging"),
                size,
                usage: BufferUsages::MAP_WRITE | BufferUsages::COPY_SRC,
                mapped_at_creation: true,
            }),
            target: target_buffer(dev, size, "wccl upload target"),
            mapped: Arc::new(AtomicBool::new(true)),
            last_use: None,
        }
    }
}

fn target_buffer(dev: &RankDevice, size: u64, label: &'static str) -> Buffer {
    dev.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size,
        usage: BufferUsages::STORAGE | BufferUsages::COPY_DST | BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    })
}

impl UploadRing {
    /// `slots` slots for uploads of up to `slot_bytes` each, each [`FIRST_SLOT_BYTES`] until
    /// an upload needs more.
    pub(crate) fn new(dev: &RankDevice, slots: usize, slot_bytes: u64) -> Self {
        let size = slot_bytes.next_multiple_of(4).max(4);
        let slots = (0..slots.max(1))
            .map(|_| UploadSlot::new(dev, size.min(FIRST_SLOT_BYTES)))
            .collect();
        UploadRing {
            slots,
            next: 0,
            slot_bytes: size,
            bounce: None,
        }
    }

    /// Grows slot `index`, whose staging is mapped and whose last use is done (waited for),
    /// to the full size, twin and flag too. A twin handed out before stays alive for the work
    /// that uses it (wgpu keeps a buffer until its submissions are done). Buffers that cannot
    /// be made leave the slot as it was.
    fn grow(&mut self, dev: &RankDevice, index: usize) -> Result<(), WaitError> {
        let full = self.slot_bytes;
        let (slot, error) = dev.catching(|| UploadSlot::new(dev, full));
        if let Some(e) = error {
            return Err(WaitError::Device(format!(
                "growing an upload slot to {full} bytes: {e}"
            )));
        }
        self.slots[index] = slot;
        Ok(())
    }

    /// Grows every slot to the full size now, each once its last use is done (a probe, so
    /// that its timings do not include the growth).
    pub(crate) fn reserve(&mut self, dev: &RankDevice, deadline: Instant) -> Result<(), WaitError> {
        for index in 0..self.slots.len() {
            let s = &self.slots[index];
            if s.staging.size() < self.slot_bytes {
                dev.wait_flag(&s.mapped, s.last_use.as_ref(), deadline)?;
                self.grow(dev, index)?;
            }
        }
        Ok(())
    }

    /// Capacity of one slot in bytes (what one upload may carry).
    pub(crate) fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Writes `bytes` into the next slot and records, in `enc`, the copy to its device twin and
    /// the slot's re-mapping. Returns the twin, which holds the bytes once `enc` has run. Call
    /// [`submitted`](Self::submitted) with the submission that carries `enc`.
    pub(crate) fn stage(
        &mut self,
        dev: &RankDevice,
        bytes: &[u8],
        enc: &mut CommandEncoder,
        deadline: Instant,
    ) -> Result<Buffer, WaitError> {
        self.stage_to(dev, bytes, enc, None, deadline)
    }

    /// Like [`stage`](Self::stage), but when `dst` is given the bytes are copied straight to
    /// that buffer and byte offset instead of to the slot's twin (`bytes.len()` and the offset
    /// must then be multiples of 4).
    pub(crate) fn stage_to(
        &mut self,
        dev: &RankDevice,
        bytes: &[u8],
        enc: &mut CommandEncoder,
        dst: Option<(&Buffer, u64)>,
        deadline: Instant,
    ) -> Result<Buffer, WaitError> {
        let len4 = (bytes.len() as u64).next_multiple_of(4);
        if len4 > self.slot_bytes {
            return Err(WaitError::Device(format!(
                "internal: an upload of {} bytes does not fit a staging slot of {}",
                bytes.len(),
                self.slot_bytes
            )));
        }
        let index = self.next;
        self.next = (self.next + 1) % self.slots.len();
        dev.wait_flag(
            &self.slots[index].mapped,
            self.slots[index].last_use.as_ref(),
            deadline,
        )?;
        if len4 > self.slots[index].staging.size() {
            self.grow(dev, index)?;
        }
        let slot = &mut self.slots[index];
        {
            let mut view = slot
                .staging
                .get_mapped_range_mut(0..len4)
                .map_err(|e| WaitError::Device(format!("mapping an upload slot: {e}")))?;
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        {
            let _scope = dev.error_scope();
            slot.staging.unmap();
        }
        slot.mapped.store(false, Ordering::Release);
        match dst {
            Some((buf, off)) => enc.copy_buffer_to_buffer(&slot.staging, 0, buf, off, len4),
            None => enc.copy_buffer_to_buffer(&slot.staging, 0, &slot.target, 0, len4),
        }
        let flag = Arc::clone(&slot.mapped);
        enc.map_buffer_on_submit(&slot.staging, MapMode::Write, .., move |_| {
            flag.store(true, Ordering::Release)
        });
        Ok(slot.target.clone())
    }

    /// Records the submission that used the slot most recently staged.
    pub(crate) fn submitted(&mut self, submission: &SubmissionIndex) {
        let last = (self.next + self.slots.len() - 1) % self.slots.len();
        self.slots[last].last_use = Some(submission.clone());
    }

    /// A device buffer of [`slot_bytes`](Self::slot_bytes) the caller may use as a bounce
    /// buffer for device-side copies (its GPU uses are ordered by the queue), made the first
    /// time it is asked for. One that cannot be made (out of memory) is an error, and is not
    /// kept: the next call tries again.
    pub(crate) fn bounce(&mut self, dev: &RankDevice) -> Result<Buffer, String> {
        if let Some(b) = &self.bounce {
            return Ok(b.clone());
        }
        let size = self.slot_bytes;
        let (buffer, error) = dev.catching(|| target_buffer(dev, size, "wccl bounce"));
        if let Some(message) = error {
            return Err(format!("a bounce buffer of {size} bytes: {message}"));
        }
        self.bounce = Some(buffer.clone());
        Ok(buffer)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use wgpu::{Buffer, BufferUsages};

    use super::FIRST_SLOT_BYTES;
    use crate::CommGroup;
    use crate::deadline::deadline_after;

    #[test]
    fn a_full_ring_refuses_and_a_failed_wait_frees_its_slot() {
        let Ok(mut g) = CommGroup::builder().ranks(1).build() else {
            panic!("no adapter for the test");
        };
        let comm = g.comm_mut(0);
        let e = &mut comm.engine;
        let src = e.dev.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("test source"),
            size: 64,
            usage: BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut tickets = Vec::new();
        while e.reads.has_free_slot() {
            let t = e.reads.begin(&e.dev, &src, 0, 16);
            tickets.push(t.unwrap_or_else(|_| panic!("a free slot refused")));
        }
        let depth = tickets.len();
        assert_eq!(e.reads.in_use(), depth);
        // No slot is taken over while busy: the next read-back is refused.
        assert!(e.reads.begin(&e.dev, &src, 0, 16).is_err());
        // A wait that fails (its deadline already passed) still unmaps and frees its slot.
        // (Its map may have landed already on a synchronous adapter: un-set the flag, as if not.)
        let first = tickets.remove(0);
        e.reads.slots[first.slot]
            .mapped
            .store(false, Ordering::Release);
        let (slot, before) = (first.slot, e.reads.slots[first.slot].buffer.clone());
        let past = deadline_after(Duration::ZERO);
        assert!(e.reads.finish(&e.dev, first, past).is_err());
        assert_eq!(e.reads.in_use(), depth - 1);
        // Its map was cancelled, not finished: the slot has a buffer of its own from here on,
        // which no stale map of the old one's can touch.
        assert!(e.reads.slots[slot].buffer != before);
        e.reads.abandon_all(&e.dev, tickets);
        assert_eq!(e.reads.in_use(), 0);
        // The ring works afterwards, and no clean-up left a device error behind.
        let t = e.reads.begin(&e.dev, &src, 0, 16);
        let t = t.unwrap_or_else(|_| panic!("a freed slot refused"));
        let bytes = e
            .reads
            .finish(&e.dev, t, deadline_after(Duration::from_secs(30)));
        assert_eq!(bytes.map(|b| b.len()).ok(), Some(16));
        assert!(e.dev.take_error().is_none());
    }

    /// The device probe grows every slot before it times anything, so that no timing includes
    /// the growth.
    #[test]
    fn the_probe_grows_every_slot_before_it_times() {
        let Ok(mut g) = CommGroup::builder().ranks(1).build() else {
            panic!("no adapter for the test");
        };
        let comm = g.comm_mut(0);
        let slice = comm.engine.uploads.slot_bytes();
        assert!(slice > FIRST_SLOT_BYTES);
        let figures = comm.probe_device(256 << 10, &|| Ok(()));
        assert!(figures.is_ok(), "{figures:?}");
        let e = &comm.engine;
        assert!(e.reads.slots.iter().all(|s| s.buffer.size() == slice + 8));
        assert!(e.uploads.slots.iter().all(|s| s.staging.size() == slice));
        assert!(e.uploads.slots.iter().all(|s| s.target.size() == slice));
    }

    /// Slots start small and grow to the slice the first time a read-back or an upload needs
    /// more, once (a slot used before, mapped again and its twin handed out, too), with the
    /// bytes intact through grown slots and in twins handed out before; beyond the slice both
    /// refuse and the rings go on; the bounce buffer is made once, of the slice.
    #[test]
    fn slots_grow_to_the_slice_when_a_call_needs_it() {
        let slice = 200_004u64;
        let Ok(mut g) = CommGroup::builder()
            .ranks(1)
            .config(crate::CommConfig::default().slice_bytes(slice as usize))
            .build()
        else {
            panic!("no adapter for the test");
        };
        let comm = g.comm_mut(0);
        let e = &mut comm.engine;
        assert!(
            e.reads
                .slots
                .iter()
                .all(|s| s.buffer.size() == FIRST_SLOT_BYTES)
        );
        assert!(
            e.uploads
                .slots
                .iter()
                .all(|s| s.staging.size() == FIRST_SLOT_BYTES)
        );
        assert_eq!(e.uploads.slot_bytes(), slice);
        // Distinct bytes over a period that is not a power of two.
        let data: Vec<u8> = (0..slice as usize).map(|i| (i % 251) as u8).collect();
        let depth = e.uploads.slots.len();
        fn stage(up: &mut super::UploadRing, dev: &crate::RankDevice, bytes: &[u8]) -> Buffer {
            let mut enc = dev.device().create_command_encoder(&Default::default());
            let deadline = deadline_after(Duration::from_secs(30));
            let twin = up.stage(dev, bytes, &mut enc, deadline);
            let twin =
                twin.unwrap_or_else(|_| panic!("an upload of {} bytes refused", bytes.len()));
            let submission = dev.queue().submit([enc.finish()]);
            up.submitted(&submission);
            twin
        }
        fn read(
            reads: &mut super::ReadRing,
            dev: &crate::RankDevice,
            src: &Buffer,
            at: u64,
            len: usize,
        ) -> Vec<u8> {
            let t = reads.begin(dev, src, at, len);
            let t = t.unwrap_or_else(|_| panic!("a read-back of {len} bytes refused"));
            let back = reads.finish(dev, t, deadline_after(Duration::from_secs(30)));
            back.unwrap_or_else(|_| panic!("a read-back of {len} bytes failed"))
        }
        // Every slot used once, small.
        let small: Vec<Buffer> = (0..depth)
            .map(|k| stage(&mut e.uploads, &e.dev, &data[8 * k..8 * k + 16]))
            .collect();
        // Just over the first size: slot 0 (used, mapped again) grows to the whole slice.
        let over = FIRST_SLOT_BYTES as usize + 4;
        let twin = stage(&mut e.uploads, &e.dev, &data[..over]);
        assert_eq!(twin.size(), slice);
        let grown = e.uploads.slots[0].staging.clone();
        assert_eq!(grown.size(), slice);
        // Round the ring: slot 0 takes the whole slice without growing again.
        for k in 1..depth {
            stage(&mut e.uploads, &e.dev, &data[8 * k..8 * k + 16]);
        }
        let whole = stage(&mut e.uploads, &e.dev, &data);
        assert!(e.uploads.slots[0].staging == grown, "slot 0 grew again");
        // The twin slot 0 handed out before it grew still holds its bytes; the grown one the
        // whole slice, read back from an offset that is not a word's (a read slot grows).
        assert_eq!(read(&mut e.reads, &e.dev, &small[0], 0, 16), &data[..16]);
        assert_eq!(
            read(&mut e.reads, &e.dev, &whole, 3, slice as usize - 3),
            &data[3..]
        );
        let full = slice + 8;
        assert_eq!(e.reads.slots[0].buffer.size(), full);
        let grown = e.reads.slots[0].buffer.clone();
        for _ in 0..4 {
            assert_eq!(read(&mut e.reads, &e.dev, &whole, 8, 16), &data[8..24]);
            assert_eq!(
                read(&mut e.reads, &e.dev, &whole, 0, slice as usize),
                &data[..]
            );
        }
        assert!(e.reads.slots[0].buffer == grown, "read slot 0 grew again");
        // Past a slot (the slice and its room for rounding out to words): refused, nothing
        // left busy, the next upload slot unmoved.
        assert!(e.reads.begin(&e.dev, &whole, 0, full as usize + 1).is_err());
        let next = e.uploads.next;
        let big = vec![0u8; slice as usize + 4];
        let mut enc = e.dev.device().create_command_encoder(&Default::default());
        let deadline = deadline_after(Duration::from_secs(30));
        assert!(e.uploads.stage(&e.dev, &big, &mut enc, deadline).is_err());
        assert_eq!(e.uploads.next, next);
        let after = stage(&mut e.uploads, &e.dev, &data[100..120]);
        assert_eq!(read(&mut e.reads, &e.dev, &after, 0, 20), &data[100..120]);
        assert_eq!(e.reads.in_use(), 0);
        // The bounce buffer: made once, of the slice.
        let bounce = e.uploads.bounce(&e.dev).expect("a bounce buffer");
        assert_eq!(bounce.size(), slice);
        assert!(e.uploads.bounce(&e.dev) == Ok(bounce));
        assert!(e.dev.take_error().is_none());
    }
}
