//! One rank's device and queue, with its errors caught as values.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wgpu::{Adapter, AdapterInfo, Device, Features, Limits, PollType, Queue, SubmissionIndex};

use crate::error::{At, Error, Result};
use crate::types::DType;

/// The longest single blocking poll; waits loop so that a device error is seen promptly.
const POLL_SLICE: Duration = Duration::from_millis(200);

/// One rank's wgpu device and queue, with the adapter's description.
///
/// wccl's own device work runs inside wgpu error scopes, so its
/// validation and out-of-memory errors become [`Error::Device`] values on this rank's next wait
/// or check, and errors of the caller's own work on a shared device stay the caller's: a device
/// passed in with [`RankDevice::from_wgpu`] keeps its uncaptured-error handler and device-lost
/// callback. Only a device that wccl opened itself ([`RankDevice::open`]) gets a device-lost
/// callback and an uncaptured-error handler of wccl's (as a net under the scopes).
pub struct RankDevice {
    rank: usize,
    device: Device,
    queue: Queue,
    info: AdapterInfo,
    error: Arc<Mutex<Option<String>>>,
    /// Which adapter object the device was opened on (see `discovery::next_adapter_token`):
    /// ranks with the same token share a GPU even where the driver reports no bus id.
    adapter_token: Option<u64>,
}

impl std::fmt::Debug for RankDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RankDevice")
            .field("rank", &self.rank)
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .finish_non_exhaustive()
    }
}

/// wgpu error scopes around a piece of wccl's device work on this thread: when dropped, it pops
/// them and records what they caught in the rank's error store, where the next wait or check
/// finds it (as an [`Error::Device`]). Not `Send`: wgpu's scopes are per thread.
#[must_use = "the scope catches errors only while it is alive"]
pub(crate) struct ErrorScope {
    // Innermost last; popped in reverse order, as wgpu requires.
    guards: Vec<wgpu::ErrorScopeGuard>,
    sink: Arc<Mutex<Option<String>>>,
}

impl Drop for ErrorScope {
    fn drop(&mut self) {
        while let Some(guard) = self.guards.pop() {
            // Native backends resolve the pop at once; the future only wraps the value.
            if let Some(e) = pollster::block_on(guard.pop()) {
                record(&self.sink, e.to_string());
            }
        }
    }
}

/// Why a wait on the device ended without success.
#[derive(Debug)]
pub(crate) enum WaitError {
    Deadline,
    Device(String),
}

impl RankDevice {
    /// Opens a device on `adapter` with the adapter's own limits and the features wccl can use
    /// (`SHADER_F16`, `TIMESTAMP_QUERY`) where the adapter has them.
    ///
    /// The device is wccl's: device loss and errors outside wccl's scopes (the caller's own work
    /// on [`RankDevice::device`], say) are recorded, so the next call on this rank reports them.
    ///
    /// On a Vulkan CPU adapter (lavapipe, SwiftShader), where device memory is host memory, it
    /// also asks for `MAPPABLE_PRIMARY_BUFFERS`, so that tensors can be mapped in place (see
    /// [`unified_memory`](Self::unified_memory)).
    pub fn open(rank: usize, adapter: &Adapter) -> Result<Self> {
        let mut wanted = Features::SHADER_F16 | Features::TIMESTAMP_QUERY;
        if maps_in_place(&adapter.get_info()) {
            wanted |= Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("wccl rank device"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        // One device made or destroyed at a time in the process (see `lifecycle`).
        let turn = super::lifecycle::turn();
        let made = pollster::block_on(adapter.request_device(&desc));
        drop(turn);
        let (device, queue) = made.map_err(|e| Error::DeviceRequest {
            at: At::rank(rank),
            adapter: adapter.get_info().name,
            message: e.to_string(),
        })?;
        let dev = Self::from_wgpu(rank, device, queue);
        let sink = Arc::clone(&dev.error);
        dev.device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                record(&sink, e.to_string());
            }));
        let sink = Arc::clone(&dev.error);
        dev.device.set_device_lost_callback(move |reason, message| {
            record(&sink, format!("device lost ({reason:?}): {message}"));
        });
        Ok(dev)
    }

    /// Wraps a device and queue that the caller already has (training code usually does).
    ///
    /// wccl installs nothing on the device: the caller's uncaptured-error handler and
    /// device-lost callback stay as they are. wccl catches its own errors with error scopes, so a
    /// validation error in the caller's own work neither fails a collective nor reaches wccl,
    /// and several ranks can share one device.
    pub fn from_wgpu(rank: usize, device: Device, queue: Queue) -> Self {
        let info = device.adapter_info();
        RankDevice {
            rank,
            device,
            queue,
            info,
            error: Arc::new(Mutex::new(None)),
            adapter_token: None,
        }
    }

    /// Another handle on the same device, queue and error store: what a rebuilt communicator
    /// keeps of an old one (whose engine is then dropped, the device staying alive).
    pub(crate) fn share(&self) -> RankDevice {
        RankDevice {
            rank: self.rank,
            device: self.device.clone(),
            queue: self.queue.clone(),
            info: self.info.clone(),
            error: Arc::clone(&self.error),
            adapter_token: self.adapter_token,
        }
    }

    /// Error scopes for wccl's own work on this thread, until the returned value is dropped.
    pub(crate) fn error_scope(&self) -> ErrorScope {
        ErrorScope {
            guards: push_scopes(&self.device),
            sink: Arc::clone(&self.error),
        }
    }

    /// Runs `f` in error scopes of its own and returns the first error it raised instead of
    /// recording it: for work whose failure the caller handles (a staging slot that could not
    /// grow keeps its old buffer).
    pub(crate) fn catching<T>(&self, f: impl FnOnce() -> T) -> (T, Option<String>) {
        let mut guards = push_scopes(&self.device);
        let value = f();
        let mut first = None;
        // Innermost first, as wgpu requires; native backends resolve each pop at once.
        while let Some(guard) = guards.pop() {
            if let Some(e) = pollster::block_on(guard.pop()) {
                first.get_or_insert(e.to_string());
            }
        }
        (value, first)
    }

    /// Records which adapter object the device was opened on.
    pub(crate) fn set_adapter_token(&mut self, token: u64) {
        self.adapter_token = Some(token);
    }

    /// The adapter object's token, where the device was opened by discovery.
    pub(crate) fn adapter_token(&self) -> Option<u64> {
        self.adapter_token
    }

    /// The rank this device serves.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The wgpu device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The adapter's name, backend and type.
    pub fn info(&self) -> &AdapterInfo {
        &self.info
    }

    /// The device's limits.
    pub fn limits(&self) -> Limits {
        self.device.limits()
    }

    /// Whether the device's memory is the host's and its buffers can be mapped in place: a
    /// Vulkan CPU adapter (lavapipe, SwiftShader: ordinary, coherent host memory), opened with
    /// `MAPPABLE_PRIMARY_BUFFERS`. There the host-staged ring maps tensors made with
    /// [`tensor_usages`](Self::tensor_usages) and works in them directly, with no copy through
    /// staging buffers. Integrated GPUs and DX12's WARP share memory too, but map such buffers
    /// as write-combined (uncached) memory; they stay on the staging path until measured.
    pub fn unified_memory(&self) -> bool {
        maps_in_place(&self.info)
            && self
                .device
                .features()
                .contains(Features::MAPPABLE_PRIMARY_BUFFERS)
    }

    /// The usages wccl gives the tensors it allocates, and that callers should give theirs:
    /// `STORAGE | COPY_SRC | COPY_DST`, plus `MAP_READ | MAP_WRITE` where the device has
    /// [`unified_memory`](Self::unified_memory) (tensors mapped in place, no staging copies).
    ///
    /// While a host-staged call runs in a mapped tensor, its whole wgpu buffer is mapped (wgpu
    /// maps buffers, not ranges): work submitted meanwhile that touches any part of that buffer
    /// fails, and so does mapping it: do not map it or hold views of it until the call
    /// returns (a tensor already mapped is refused, with an error that says so). Training
    /// code that overlaps an all-reduce of one bucket with kernels writing another bucket of
    /// the same buffer should give the buckets buffers of their own, or leave the map usages
    /// off (the call then stages through staging buffers).
    pub fn tensor_usages(&self) -> wgpu::BufferUsages {
        let mut usages = super::buffer::COLLECTIVE_USAGES | wgpu::BufferUsages::COPY_DST;
        if self.unified_memory() {
            usages |= wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::MAP_WRITE;
        }
        usages
    }

    /// Whether tensors of `dtype` can be buffers and collective arguments on this device. Every
    /// type can: f16 and bf16 are reduced two to a u32 word in f32, with no device feature.
    pub fn supports(&self, dtype: DType) -> bool {
        DType::ALL.contains(&dtype)
    }

    /// Whether the device has native f16 arithmetic (`SHADER_F16`), which the tensor-parallel
    /// kernels (matmul, GELU) need for f16 operands.
    pub fn native_f16(&self) -> bool {
        self.device.features().contains(Features::SHADER_F16)
    }

    /// Refuses f16 where the device lacks native f16: for the kernels that compute in the
    /// element type itself (the tensor-parallel ones).
    pub(crate) fn check_native(&self, at: At, dtype: DType) -> Result<()> {
        if dtype != DType::F16 || self.native_f16() {
            Ok(())
        } else {
            Err(Error::UnsupportedDType {
                at,
                dtype,
                adapter: self.info.name.clone(),
            })
        }
    }

    pub(crate) fn check_dtype(&self, at: At, dtype: DType) -> Result<()> {
        if self.supports(dtype) {
            Ok(())
        } else {
            Err(Error::UnsupportedDType {
                at,
                dtype,
                adapter: self.info.name.clone(),
            })
        }
    }

    /// Takes the first device error recorded since the last call, if any.
    pub(crate) fn take_error(&self) -> Option<String> {
        take(&self.error)
    }

    /// Turns a recorded device error into an [`Error::Device`].
    pub(crate) fn check(&self, at: At) -> Result<()> {
        match self.take_error() {
            Some(message) => Err(Error::Device { at, message }),
            None => Ok(()),
        }
    }

    /// Blocks until `flag` is set by a map callback (driven by polling), or the deadline passes.
    pub(crate) fn wait_flag(
        &self,
        flag: &AtomicBool,
        submission: Option<&SubmissionIndex>,
        deadline: Instant,
    ) -> Result<(), WaitError> {
        loop {
            if flag.load(Ordering::Acquire) {
                // Set by a poll elsewhere (a shared device): the error store still speaks first,
                // so data read after a failed submission is never passed on.
                return match self.take_error() {
                    Some(message) => Err(WaitError::Device(message)),
                    None => Ok(()),
                };
            }
            match self.poll_once(submission, deadline) {
                Ok(_) => {}
                // The deadline's last poll may have run the callback that sets the flag; the
                // error store still speaks first.
                Err(WaitError::Deadline) if flag.load(Ordering::Acquire) => {
                    return match self.take_error() {
                        Some(message) => Err(WaitError::Device(message)),
                        None => Ok(()),
                    };
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Polls until `flag` is set, the deadline passes or the device has recorded an error;
    /// whether the flag was set. Unlike [`wait_flag`](Self::wait_flag) it leaves a recorded
    /// error in place: clean-up after a failed call must not swallow the cause that the next
    /// [`check`](Self::check) reports.
    pub(crate) fn settle(
        &self,
        flag: &AtomicBool,
        submission: Option<&SubmissionIndex>,
        deadline: Instant,
    ) -> bool {
        loop {
            if flag.load(Ordering::Acquire) {
                return true;
            }
            let now = Instant::now();
            let failed = self.error.lock().map_or(true, |e| e.is_some());
            if failed || now >= deadline {
                return false;
            }
            let timeout = (deadline - now).min(POLL_SLICE);
            match self.device.poll(PollType::Wait {
                submission_index: submission.cloned(),
                timeout: Some(timeout),
            }) {
                // The work is done and its map callbacks have run: the flag is final.
                Ok(_) => return flag.load(Ordering::Acquire),
                Err(wgpu::PollError::Timeout) => {}
                Err(_) => return false,
            }
        }
    }

    /// Blocks until a submission has finished, or the deadline passes.
    pub(crate) fn wait_submission(
        &self,
        submission: &SubmissionIndex,
        deadline: Instant,
    ) -> Result<(), WaitError> {
        loop {
            match self.poll_once(Some(submission), deadline)? {
                true => return Ok(()),
                false => continue,
            }
        }
    }

    /// One bounded blocking poll; `Ok(true)` when the submission (or all work) has finished.
    fn poll_once(
        &self,
        submission: Option<&SubmissionIndex>,
        deadline: Instant,
    ) -> Result<bool, WaitError> {
        if let Some(message) = self.take_error() {
            return Err(WaitError::Device(message));
        }
        let now = Instant::now();
        if now >= deadline {
            // One last non-blocking look, so work that just finished still counts.
            let _ = self.device.poll(PollType::Poll);
            return Err(WaitError::Deadline);
        }
        let timeout = (deadline - now).min(POLL_SLICE);
        match self.device.poll(PollType::Wait {
            submission_index: submission.cloned(),
            timeout: Some(timeout),
        }) {
            Ok(_) => Ok(true),
            Err(wgpu::PollError::Timeout) => Ok(false),
            Err(e) => Err(WaitError::Device(e.to_string())),
        }
    }
}

/// Takes the recorded error. A thread that panicked while holding the lock leaves the error it
/// recorded intact: a poisoned lock still yields it.
fn take(sink: &Mutex<Option<String>>) -> Option<String> {
    sink.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

fn record(sink: &Mutex<Option<String>>, message: String) {
    tracing::error!(%message, "wgpu device error");
    let mut slot = sink
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if slot.is_none() {
        *slot = Some(message);
    }
}

/// wgpu error scopes of every filter on `device`, innermost last (pop them in reverse).
pub(crate) fn push_scopes(device: &Device) -> Vec<wgpu::ErrorScopeGuard> {
    [
        wgpu::ErrorFilter::Validation,
        wgpu::ErrorFilter::OutOfMemory,
        wgpu::ErrorFilter::Internal,
    ]
    .into_iter()
    .map(|f| device.push_error_scope(f))
    .collect()
}

/// A Vulkan CPU adapter: its device memory is ordinary host memory, coherent and cached, so
/// tensors can be mapped and worked in in place.
fn maps_in_place(info: &AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu && info.backend == wgpu::Backend::Vulkan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_store_keeps_its_error() {
        let sink = Arc::new(Mutex::new(None));
        record(&sink, "first".into());
        record(&sink, "second".into());
        let s2 = Arc::clone(&sink);
        let _ = std::thread::spawn(move || {
            let _held = s2.lock();
            panic!("poison the store");
        })
        .join();
        assert!(sink.is_poisoned());
        assert_eq!(take(&sink).as_deref(), Some("first"));
        assert_eq!(take(&sink), None);
        record(&sink, "third".into());
        assert_eq!(take(&sink).as_deref(), Some("third"));
    }
}
