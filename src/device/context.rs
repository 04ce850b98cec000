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
/// Opening one installs an uncaptured-error handler and a device-lost callback on the device, so
/// that validation errors and device loss become [`Error::Device`] values on the next call
/// instead of panics.
pub struct RankDevice {
    rank: usize,
    device: Device,
    queue: Queue,
    info: AdapterInfo,
    error: Arc<Mutex<Option<String>>>,
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
    pub fn open(rank: usize, adapter: &Adapter) -> Result<Self> {
        let wanted = Features::SHADER_F16 | Features::TIMESTAMP_QUERY;
        let desc = wgpu::DeviceDescriptor {
            label: Some("wccl rank device"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            Error::DeviceRequest {
                at: At::rank(rank),
                adapter: adapter.get_info().name,
                message: e.to_string(),
            }
        })?;
        Ok(Self::from_wgpu(rank, device, queue))
    }

    /// Wraps a device and queue that the caller already has (training code usually does).
    ///
    /// wccl replaces the device's uncaptured-error handler with its own, which records the
    /// first error so that the next collective on this rank reports it.
    pub fn from_wgpu(rank: usize, device: Device, queue: Queue) -> Self {
        let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&error);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            record(&sink, e.to_string());
        }));
        let sink = Arc::clone(&error);
        device.set_device_lost_callback(move |reason, message| {
            record(&sink, format!("device lost ({reason:?}): {message}"));
        });
        let info = device.adapter_info();
        RankDevice {
            rank,
            device,
            queue,
            info,
            error,
        }
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
        self.error.lock().ok().and_then(|mut e| e.take())
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
                return Ok(());
            }
            self.poll_once(submission, deadline)?;
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

fn record(sink: &Mutex<Option<String>>, message: String) {
    tracing::error!(%message, "wgpu device error");
    if let Ok(mut slot) = sink.lock()
        && slot.is_none()
    {
        *slot = Some(message);
    }
}
