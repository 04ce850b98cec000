//! Host memory in the tensors themselves, for plans that allow it ([`Plan::host_split`]) on
//! unified-memory devices: host reads come from the input and host writes go to the output,
//! both mapped in place, so the read-back into host memory and the upload out of it (two copies
//! each through staging buffers) do not happen at all.

use std::time::Instant;

use crate::algo::{Action, Buf, Plan, Region, Source, Transfer};
use crate::device::{MappedTensor, RankDevice, TensorRef, WaitError};

/// The mapped tensors of one call; dropping it unmaps them.
pub(super) struct Split {
    /// What host reads see: the input mapped for reading. `None` in place, where the tensor
    /// was copied into the executor's host memory before it was mapped for writing (a buffer
    /// is mapped one way at a time).
    pub(super) input: Option<MappedTensor>,
    /// Where host writes go: the output mapped for writing (never read: a write mapping may be
    /// write-combined memory, and wgpu does not let it be read).
    pub(super) output: MappedTensor,
}

/// Maps the call's tensors for `plan` if it can run in them: a `host_split` plan whose host
/// memory is exactly the tensors (same length, nothing else touched on the device), a
/// unified-memory device, and tensors made with its
/// [`tensor_usages`](RankDevice::tensor_usages). `Ok(None)` where it cannot: the executor then
/// stages through host memory as on any device. In place, the input's bytes are copied into
/// `host` first (grown to hold them); out of place `host` is not used.
pub(super) fn open(
    dev: &RankDevice,
    tensors: Option<(TensorRef<'_>, TensorRef<'_>)>,
    plan: &Plan,
    host: &mut Vec<u32>,
    deadline: Instant,
) -> Result<Option<Split>, WaitError> {
    let Some((input, output)) = tensors else {
        return Ok(None);
    };
    let in_place = input.same_as(&output);
    let eligible = plan.host_split
        && plan.host > 0
        && input.count == plan.host
        && output.count == plan.host
        && tensors_map(dev, &input, &output)
        && plan.actions.iter().all(host_only);
    if !eligible {
        return Ok(None);
    }
    if in_place {
        let read = MappedTensor::map(dev, &input, false, deadline)?;
        let bytes = read.bytes().ok_or_else(|| {
            WaitError::Device("internal: a read mapping shorter than its tensor".into())
        })?;
        let words = bytes.len().div_ceil(4);
        if host.len() < words {
            host.resize(words, 0);
        }
        let all: &mut [u8] = bytemuck::cast_slice_mut(host);
        all[..bytes.len()].copy_from_slice(bytes);
        drop(read);
        let output = MappedTensor::map(dev, &output, true, deadline)?;
        return Ok(Some(Split {
            input: None,
            output,
        }));
    }
    let input = MappedTensor::map(dev, &input, false, deadline)?;
    let output = MappedTensor::map(dev, &output, true, deadline)?;
    Ok(Some(Split {
        input: Some(input),
        output,
    }))
}

/// Whether a call's tensors can be mapped in place for a split run: a unified-memory device,
/// tensors made with its [`tensor_usages`](RankDevice::tensor_usages), one element type, and
/// one mapping per buffer (in place, or two buffers).
pub(super) fn tensors_map(dev: &RankDevice, input: &TensorRef<'_>, output: &TensorRef<'_>) -> bool {
    input.dtype == output.dtype
        && MappedTensor::can_map(dev, output, true)
        && MappedTensor::can_map(dev, input, false)
        && (input.same_as(output) || input.buffer != output.buffer)
}

/// Whether an action of a split plan stays in host memory, apart from the mirror copies (the
/// input into host memory and host memory into the output, at the same offsets).
fn host_only(a: &Action) -> bool {
    let host = |r: &Region| r.buf == Buf::Host || r.len == 0;
    match a {
        Action::Copy { src, dst } => is_mirror(*src, *dst),
        Action::Scale { .. } => false,
        Action::Transfer(Transfer { send, recv, .. }) => {
            let send_ok = match send {
                None | Some((_, Source::Forward | Source::Previous)) => true,
                Some((_, Source::Device(r))) => host(r),
            };
            send_ok && recv.as_ref().is_none_or(|r| host(&r.dst))
        }
    }
}

/// A copy of the input into host memory or of host memory into the output, offsets kept: in a
/// split run, already done by the mapping itself.
pub(super) fn is_mirror(src: Region, dst: Region) -> bool {
    let same = src.offset == dst.offset && src.len == dst.len;
    same && matches!(
        (src.buf, dst.buf),
        (Buf::Input, Buf::Host) | (Buf::Host, Buf::Output)
    )
}
