//! Element-wise reductions on the host, for algorithms that reduce in host memory (`naive`,
//! `staged`).
//! Same arithmetic as the WGSL kernels: wrapping integers, IEEE f32/f16, bf16
//! rounded to nearest even (the `half` crate's arithmetic goes through f32 and rounds once, as the
//! packed kernels do), truncating division.

use bytemuck::Pod;
use half::{bf16, f16};

use crate::types::{Combine, DType};

/// `dst[i] = combine(dst[i], src[i])` over elements of `dtype`; `dst` must be aligned for it.
pub(crate) fn combine(dtype: DType, c: Combine, dst: &mut [u8], src: &[u8]) {
    match dtype {
        DType::F32 => zip::<f32>(dst, src, |a, b| match c {
            Combine::Sum => a + b,
            Combine::Prod => a * b,
            Combine::Min => a.min(b),
            Combine::Max => a.max(b),
            Combine::Copy => b,
        }),
        DType::F16 => zip::<f16>(dst, src, |a, b| match c {
            Combine::Sum => a + b,
            Combine::Prod => a * b,
            Combine::Min => a.min(b),
            Combine::Max => a.max(b),
            Combine::Copy => b,
        }),
        DType::BF16 => zip::<bf16>(dst, src, |a, b| match c {
            Combine::Sum => a + b,
            Combine::Prod => a * b,
            Combine::Min => a.min(b),
            Combine::Max => a.max(b),
            Combine::Copy => b,
        }),
        DType::I32 => zip::<i32>(dst, src, |a, b| match c {
            Combine::Sum => a.wrapping_add(b),
            Combine::Prod => a.wrapping_mul(b),
            Combine::Min => a.min(b),
            Combine::Max => a.max(b),
            Combine::Copy => b,
        }),
        DType::U32 => zip::<u32>(dst, src, |a, b| match c {
            Combine::Sum => a.wrapping_add(b),
            Combine::Prod => a.wrapping_mul(b),
            Combine::Min => a.min(b),
            Combine::Max => a.max(b),
            Combine::Copy => b,
        }),
    }
}

/// `dst[i] = dst[i] / divisor` (avg's last step).
pub(crate) fn scale(dtype: DType, dst: &mut [u8], divisor: u32) {
    match dtype {
        DType::F32 => map::<f32>(dst, |a| a / divisor as f32),
        DType::F16 => map::<f16>(dst, |a| a / f16::from_f32(divisor as f32)),
        DType::BF16 => map::<bf16>(dst, |a| bf16::from_f32(a.to_f32() / divisor as f32)),
        DType::I32 => map::<i32>(dst, |a| a / divisor as i32),
        DType::U32 => map::<u32>(dst, |a| a / divisor),
    }
}

fn zip<T: Pod>(dst: &mut [u8], src: &[u8], f: impl Fn(T, T) -> T) {
    let dst: &mut [T] = bytemuck::cast_slice_mut(dst);
    // Frames arrive in byte vectors of no particular alignment.
    match bytemuck::try_cast_slice::<u8, T>(src) {
        Ok(src) => dst.iter_mut().zip(src).for_each(|(a, &b)| *a = f(*a, b)),
        Err(_) => {
            let src: Vec<T> = bytemuck::pod_collect_to_vec(src);
            dst.iter_mut().zip(&src).for_each(|(a, &b)| *a = f(*a, b));
        }
    }
}

fn map<T: Pod>(dst: &mut [u8], f: impl Fn(T) -> T) {
    let dst: &mut [T] = bytemuck::cast_slice_mut(dst);
    dst.iter_mut().for_each(|a| *a = f(*a));
}
