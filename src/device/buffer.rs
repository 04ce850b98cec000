//! Typed device buffers and views of caller-owned ones.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wgpu::{Buffer, BufferUsages};

use super::context::{RankDevice, WaitError};
use crate::deadline::deadline_after;
use crate::error::{At, Error, Result};
use crate::types::{DType, Element};

/// Usages a buffer needs to take part in a collective: the reduce kernels bind it as storage, and
/// read-backs copy out of it.
pub const COLLECTIVE_USAGES: BufferUsages = BufferUsages::STORAGE.union(BufferUsages::COPY_SRC);

/// A view of `count` elements of `dtype` starting `offset` bytes into a wgpu buffer: the form in
/// which collectives take their inputs and outputs.
///
/// The buffer needs `STORAGE | COPY_SRC` usage (wccl writes through compute kernels and reads
/// through copies), the offset must be a multiple of the element size, and for `f16` and `bf16`
/// the view, rounded out to 4-byte boundaries, must stay inside the buffer (wgpu copies whole
/// 4-byte words, and the kernels bind 16-bit elements as u32 words). The halves of those words
/// outside the view are never changed.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    /// The buffer.
    pub buffer: &'a Buffer,
    /// Byte offset of the first element.
    pub offset: u64,
    /// Number of elements.
    pub count: usize,
    /// Element type.
    pub dtype: DType,
}

impl<'a> TensorRef<'a> {
    /// A view of a caller-owned buffer.
    pub fn new(buffer: &'a Buffer, offset: u64, count: usize, dtype: DType) -> Self {
        TensorRef {
            buffer,
            offset,
            count,
            dtype,
        }
    }

    /// Size of the view in bytes (saturating at `u64::MAX`, which no buffer can hold, so that a
    /// wild count fails validation instead of wrapping).
    pub fn bytes(&self) -> u64 {
        (self.count as u64).saturating_mul(self.dtype.size() as u64)
    }

    /// One past the view's last byte; `None` when that overflows `u64`.
    fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.bytes())
    }

    /// The sub-view of `count` elements starting `start` elements in (the offset saturates, so a
    /// wild `start` gives a view that fails validation).
    pub fn slice(&self, start: usize, count: usize) -> TensorRef<'a> {
        let skip = (start as u64).saturating_mul(self.dtype.size() as u64);
        TensorRef {
            offset: self.offset.saturating_add(skip),
            count,
            ..*self
        }
    }

    /// Same buffer and same byte range.
    pub fn same_as(&self, other: &TensorRef<'_>) -> bool {
        self.buffer == other.buffer && self.offset == other.offset && self.count == other.count
    }

    /// Whether the two views share a byte.
    pub fn overlaps(&self, other: &TensorRef<'_>) -> bool {
        self.buffer == other.buffer
            && self.bytes() > 0
            && other.bytes() > 0
            && self.offset < other.offset.saturating_add(other.bytes())
            && other.offset < self.offset.saturating_add(self.bytes())
    }

    /// Checks usage, alignment and bounds; `at` says where the error is reported.
    pub(crate) fn validate(&self, at: At, what: &str) -> Result<()> {
        let bad = |message: String| Error::InvalidArgument {
            at,
            message: format!("{what}: {message}"),
        };
        if !self.buffer.usage().contains(COLLECTIVE_USAGES) {
            return Err(bad(format!(
                "buffer usage {:?} lacks STORAGE | COPY_SRC",
                self.buffer.usage()
            )));
        }
        if !self.offset.is_multiple_of(self.dtype.size() as u64) {
            return Err(bad(format!(
                "offset {} is not a multiple of the {} element size {}",
                self.offset,
                self.dtype,
                self.dtype.size()
            )));
        }
        let start = self.offset & !3;
        // Checked: an offset or count from the caller must not wrap past the bounds check.
        let end = self.end().and_then(|e| e.checked_next_multiple_of(4));
        if end.is_none_or(|end| end > self.buffer.size()) {
            let end = end.map_or_else(|| "overflow".to_string(), |e| e.to_string());
            return Err(bad(format!(
                "{} elements of {} at byte {} (rounded out to 4-byte words: {start}..{end}) do not fit a buffer of {} bytes",
                self.count,
                self.dtype,
                self.offset,
                self.buffer.size()
            )));
        }
        Ok(())
    }
}

/// A typed buffer on one rank's device, usable by every collective.
///
/// ```no_run
/// # fn main() -> wccl::Result<()> {
/// let mut group = wccl::CommGroup::builder().ranks(2).build()?;
/// let buf = group.comm(0).upload(&[1.0f32, 2.0, 3.0])?;
/// assert_eq!(group.comm(0).download(&buf)?, vec![1.0, 2.0, 3.0]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DeviceBuffer<T: Element> {
    buffer: Buffer,
    len: usize,
    _element: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    /// Allocates `len` elements (zero-initialised). Zero-length buffers are valid.
    pub fn zeroed(dev: &RankDevice, len: usize) -> Result<Self> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let scope = dev.error_scope();
        let at = At::rank(dev.rank());
        dev.check_dtype(at, T::DTYPE)?;
        // wgpu copies whole 4-byte words and rejects empty bindings: round up, at least one word.
        // Checked: `len` is the caller's, and a wrapped size would allocate a small buffer.
        let max = dev.limits().max_buffer_size;
        let size = (len as u64)
            .checked_mul(T::DTYPE.size() as u64)
            .and_then(|b| b.checked_next_multiple_of(4))
            .filter(|&b| b <= max)
            .ok_or_else(|| Error::InvalidArgument {
                at,
                message: format!(
                    "{len} elements of {} exceed the device's largest buffer ({max} bytes)",
                    T::DTYPE
                ),
            })?
            .max(4);
        let buffer = dev.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wccl tensor"),
            size,
            usage: dev.tensor_usages(),
            mapped_at_creation: false,
        });
        // End the scope first: an allocation that failed (out of memory) is this call's error.
        drop(scope);
        dev.check(At::rank(dev.rank()))?;
        Ok(DeviceBuffer {
            buffer,
            len,
            _element: PhantomData,
        })
    }

    /// Allocates a buffer holding `data`.
    pub fn from_slice(dev: &RankDevice, data: &[T]) -> Result<Self> {
        Self::from_slice_until(dev, data, deadline_after(TRANSFER_DEADLINE))
    }

    /// [`from_slice`](Self::from_slice) with the caller's deadline (a communicator's timeout).
    pub(crate) fn from_slice_until(
        dev: &RankDevice,
        data: &[T],
        deadline: Instant,
    ) -> Result<Self> {
        let buf = Self::zeroed(dev, data.len())?;
        buf.write_until(dev, data, deadline)?;
        Ok(buf)
    }

    /// Overwrites the buffer with `data`, which must have the buffer's length.
    pub fn write(&self, dev: &RankDevice, data: &[T]) -> Result<()> {
        self.write_until(dev, data, deadline_after(TRANSFER_DEADLINE))
    }

    /// [`write`](Self::write) with the caller's deadline.
    pub(crate) fn write_until(
        &self,
        dev: &RankDevice,
        data: &[T],
        deadline: Instant,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let scope = dev.error_scope();
        let at = At::rank(dev.rank());
        if data.len() != self.len {
            return Err(Error::InvalidArgument {
                at,
                message: format!(
                    "write of {} elements into a buffer of {}",
                    data.len(),
                    self.len
                ),
            });
        }
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        if !bytes.is_empty() {
            dev.queue().write_buffer(&self.buffer, 0, &bytes);
        }
        // End the scope before the wait, so that an error of this write is seen by it.
        drop(scope);
        let idx = dev.queue().submit([]);
        dev.wait_submission(&idx, deadline)
            .map_err(|e| wait_error(at, e))?;
        dev.check(at)
    }

    /// Reads the buffer back to the host (a blocking read through a temporary staging buffer).
    pub fn read(&self, dev: &RankDevice) -> Result<Vec<T>> {
        self.read_until(dev, deadline_after(TRANSFER_DEADLINE))
    }

    /// [`read`](Self::read) with the caller's deadline.
    pub(crate) fn read_until(&self, dev: &RankDevice, deadline: Instant) -> Result<Vec<T>> {
        read_tensor(dev, &self.view(), deadline).map(|bytes| bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying wgpu buffer.
    pub fn raw(&self) -> &Buffer {
        &self.buffer
    }

    /// The whole buffer as a collective argument.
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef::new(&self.buffer, 0, self.len, T::DTYPE)
    }

    /// `count` elements starting at element `start`.
    pub fn range(&self, start: usize, count: usize) -> TensorRef<'_> {
        self.view().slice(start, count)
    }
}

impl<'a, T: Element> From<&'a DeviceBuffer<T>> for TensorRef<'a> {
    fn from(b: &'a DeviceBuffer<T>) -> Self {
        b.view()
    }
}

/// How long a plain upload or download outside a communicator may take before it is reported
/// as a device error (a communicator's own use its configured timeout instead).
const TRANSFER_DEADLINE: Duration = Duration::from_secs(120);

pub(crate) fn wait_error(at: At, e: WaitError) -> Error {
    Error::Device {
        at,
        message: match e {
            WaitError::Deadline => "the device did not finish its work before the deadline".into(),
            WaitError::Device(m) => m,
        },
    }
}

/// Reads any tensor view back to the host as bytes (blocking, through a temporary buffer).
pub(crate) fn read_tensor(
    dev: &RankDevice,
    t: &TensorRef<'_>,
    deadline: Instant,
) -> Result<Vec<u8>> {
    // Errors of this device work reach the rank's error store when the scope ends.
    let scope = dev.error_scope();
    let at = At::rank(dev.rank());
    t.validate(at, "read")?;
    if t.count == 0 {
        return Ok(Vec::new());
    }
    let start = t.offset & !3;
    let end = (t.offset + t.bytes()).next_multiple_of(4);
    let staging = dev.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("wccl read-back"),
        size: end - start,
        usage: BufferUsages::MAP_READ | BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = dev.device().create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(t.buffer, start, &staging, 0, end - start);
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    enc.map_buffer_on_submit(&staging, wgpu::MapMode::Read, .., move |_| {
        flag.store(true, Ordering::Release)
    });
    let idx = dev.queue().submit([enc.finish()]);
    // End the scope before the wait: a failed copy must not come back as Ok with no data.
    drop(scope);
    // On an error the temporary is dropped here, mapped or not: nothing stays behind.
    dev.wait_flag(&done, Some(&idx), deadline)
        .map_err(|e| wait_error(at, e))?;
    dev.check(at)?;
    let view = staging.get_mapped_range(..).map_err(|e| Error::Device {
        at,
        message: e.to_string(),
    })?;
    let head = (t.offset - start) as usize;
    let out = view[head..head + t.bytes() as usize].to_vec();
    drop(view);
    staging.unmap();
    Ok(out)
}
