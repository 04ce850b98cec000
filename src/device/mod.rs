//! One rank's GPU: finding adapters, opening devices, typed buffers and the staging buffers that
//! carry data between a device and the host.

mod buffer;
mod context;
mod discovery;
pub(crate) mod lifecycle;
mod mapped;
mod staging;

pub use buffer::{DeviceBuffer, TensorRef};
pub(crate) use buffer::{read_tensor, wait_error};
pub use context::RankDevice;
pub(crate) use context::WaitError;
pub use discovery::{AdapterSelector, discover, discover_adapters};
pub(crate) use discovery::{next_adapter_token, same_physical};
pub(crate) use mapped::MappedTensor;
pub(crate) use staging::{ReadRing, ReadTicket, UploadRing};
