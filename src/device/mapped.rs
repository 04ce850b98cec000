//! Tensors mapped in place, on devices whose memory is the host's (see
//! [`RankDevice::unified_memory`]): the host-staged algorithms read and write them directly
//! instead of copying through staging buffers, two copies of the buffer fewer each way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use wgpu::{Buffer, BufferUsages, BufferView, BufferViewMut, MapMode};

use super::buffer::TensorRef;
use super::context::{RankDevice, WaitError, push_scopes};

enum View {
    Read(BufferView),
    Write(BufferViewMut),
}

/// A tensor's bytes, mapped for the host. Dropping it unmaps the buffer (a map still pending is
/// cancelled, a failed one's record cleared), on every path: no buffer stays mapped after the
/// call that mapped it. A map that was never wccl's (wgpu turned it away at once because the
/// buffer is mapped already, by its owner) is left alone.
///
/// The whole wgpu buffer is mapped while this lives (wgpu maps buffers, not ranges): work the
/// caller submits that touches any part of it fails until the call returns.
pub(crate) struct MappedTensor {
    buffer: Buffer,
    device: wgpu::Device,
    /// Whether the mapping is wccl's to undo.
    owned: bool,
    view: Option<View>,
    /// Where the tensor's first byte lies in the view (the view starts on a map boundary).
    head: usize,
    len: usize,
}

impl MappedTensor {
    /// Whether `t` can be mapped in place for reading (`write == false`) or for reading and
    /// writing: a unified-memory device, the usage the mode needs, and a range that rounded out
    /// to the map alignments stays inside the buffer.
    pub(crate) fn can_map(dev: &RankDevice, t: &TensorRef<'_>, write: bool) -> bool {
        let usage = if write {
            BufferUsages::MAP_WRITE
        } else {
            BufferUsages::MAP_READ
        };
        dev.unified_memory()
            && t.bytes() > 0
            && t.buffer.usage().contains(usage)
            && map_range(t).is_some()
    }

    /// Maps `t` (see [`can_map`](Self::can_map)), waiting until `deadline` for the device work
    /// queued on it to finish. A write mapping shows the tensor's current contents.
    pub(crate) fn map(
        dev: &RankDevice,
        t: &TensorRef<'_>,
        write: bool,
        deadline: Instant,
    ) -> Result<Self, WaitError> {
        let range = map_range(t).ok_or_else(|| {
            WaitError::Device("internal: a tensor mapped outside its buffer".into())
        })?;
        let head = usize::try_from(t.offset - range.start)
            .map_err(|_| WaitError::Device("internal: a map offset out of range".into()))?;
        let len = usize::try_from(t.bytes())
            .map_err(|_| WaitError::Device("internal: a mapped tensor over usize".into()))?;
        // wgpu sends the writes the caller queued on the buffer before it maps it.
        let done = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicBool::new(false));
        let (d, o) = (Arc::clone(&done), Arc::clone(&ok));
        let mode = if write { MapMode::Write } else { MapMode::Read };
        let scopes = push_scopes(dev.device());
        t.buffer.map_async(mode, range.clone(), move |r| {
            o.store(r.is_ok(), Ordering::Release);
            d.store(true, Ordering::Release);
        });
        let mut refused = None;
        for scope in scopes.into_iter().rev() {
            refused = refused.or(pollster::block_on(scope.pop()));
        }
        // Turned away before the call returned, with no error of wgpu's own: the buffer is
        // mapped already (wgpu's record of it, which every map, `map_buffer_on_submit`'s too,
        // passes first), by someone else; or the device is lost (its errors reach no scope).
        // Anything else is wccl's map from here on (pending, failed or done) and the guard
        // unmaps it on every exit, which cancels a pending one and clears a failed one's
        // record.
        let owners =
            done.load(Ordering::Acquire) && !ok.load(Ordering::Acquire) && refused.is_none();
        let mut mapped = MappedTensor {
            buffer: t.buffer.clone(),
            device: dev.device().clone(),
            owned: !owners,
            view: None,
            head,
            len,
        };
        if owners {
            return Err(WaitError::Device(
                "a tensor's buffer is mapped already (by its owner: unmap it before the call, \
                 and leave it unmapped until the call returns), or the device was lost"
                    .into(),
            ));
        }
        if let Some(e) = refused {
            return Err(WaitError::Device(format!(
                "mapping a tensor in place failed: {e}"
            )));
        }
        dev.wait_flag(&done, None, deadline)?;
        if !ok.load(Ordering::Acquire) {
            return Err(WaitError::Device(
                "mapping a tensor in place failed (the buffer was destroyed, or the device lost)"
                    .into(),
            ));
        }
        let view = if write {
            t.buffer.get_mapped_range_mut(range).map(View::Write)
        } else {
            t.buffer.get_mapped_range(range).map(View::Read)
        };
        mapped.view = Some(view.map_err(|e| WaitError::Device(e.to_string()))?);
        Ok(mapped)
    }

    /// The tensor's bytes; `None` for a write mapping (never read, see [`write`](Self::write)).
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        match &self.view {
            Some(View::Read(v)) => v.get(self.head..self.head.checked_add(self.len)?),
            _ => None,
        }
    }

    /// Writes `bytes` at byte `at` of the tensor; false (nothing written) for a read mapping or
    /// a range outside the tensor. A write mapping is never read (it may be write-combined
    /// memory; wgpu gives it no read access).
    pub(crate) fn write(&mut self, at: usize, bytes: &[u8]) -> bool {
        let Some(end) = at.checked_add(bytes.len()).filter(|&e| e <= self.len) else {
            return false;
        };
        match &mut self.view {
            Some(View::Write(v)) => {
                v.slice(self.head + at..self.head + end)
                    .copy_from_slice(bytes);
                true
            }
            _ => false,
        }
    }
}

impl Drop for MappedTensor {
    fn drop(&mut self) {
        // The view first: wgpu refuses to unmap a buffer with a live view.
        self.view = None;
        if !self.owned {
            return;
        }
        // A failed map, a device lost or a buffer destroyed meanwhile makes the unmap an error
        // (it still clears wgpu's record of the map): the call has failed already, and the
        // next one finds the device's state; nothing for any handler.
        let scopes = push_scopes(&self.device);
        self.buffer.unmap();
        for scope in scopes.into_iter().rev() {
            let _ = pollster::block_on(scope.pop());
        }
    }
}

/// The byte range to map for `t`: its own, rounded out to the map alignment at the start and to
/// whole words at the end (f16 views may start and end mid-word), if that fits the buffer.
fn map_range(t: &TensorRef<'_>) -> Option<std::ops::Range<u64>> {
    let start = t.offset - t.offset % wgpu::MAP_ALIGNMENT;
    let end = t
        .offset
        .checked_add(t.bytes())?
        .checked_next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT)?;
    (end <= t.buffer.size()).then_some(start..end)
}
