//! Element-wise reductions on the host, for algorithms that reduce in host memory (`naive`,
//! `staged`).
//! Same arithmetic as the WGSL kernels: wrapping integers, IEEE f32/f16, bf16
//! rounded to nearest even (the `half` crate's arithmetic goes through f32 and rounds once, as the
//! packed kernels do), truncating division.

use bytemuck::Pod;
use half::{bf16, f16};

use crate::types::{Combine, DType};

/// `dst[i] = combine(dst[i], src[i])` over elements of `dtype` (either side of any alignment).
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
    // Frames arrive in byte vectors of no particular alignment, on either side (the forwarding
    // ring folds host memory into a received frame).
    let fold = |dst: &mut [T]| match bytemuck::try_cast_slice::<u8, T>(src) {
        Ok(src) => dst.iter_mut().zip(src).for_each(|(a, &b)| *a = f(*a, b)),
        Err(_) => {
            let src: Vec<T> = bytemuck::pod_collect_to_vec(src);
            dst.iter_mut().zip(&src).for_each(|(a, &b)| *a = f(*a, b));
        }
    };
    in_place(dst, fold);
}

fn map<T: Pod>(dst: &mut [u8], f: impl Fn(T) -> T) {
    in_place(dst, |dst: &mut [T]| dst.iter_mut().for_each(|a| *a = f(*a)));
}

/// Runs `f` on `bytes` as elements of `T`: in place where they are aligned for `T`, else on an
/// aligned copy written back.
fn in_place<T: Pod>(bytes: &mut [u8], f: impl FnOnce(&mut [T])) {
    match bytemuck::try_cast_slice_mut::<u8, T>(bytes) {
        Ok(elems) => f(elems),
        Err(_) => {
            let mut elems: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
            f(&mut elems);
            let n = bytes.len().min(elems.len() * std::mem::size_of::<T>());
            bytes[..n].copy_from_slice(&bytemuck::cast_slice(&elems)[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A received frame's bytes may start anywhere: folding into them (the forwarding ring)
    /// gives the same values as folding into aligned memory.
    #[test]
    fn folds_into_unaligned_bytes() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 7) as f32 + 0.25).collect();
        let mut raw = vec![0u8; 1 + 4 * a.len()];
        raw[1..].copy_from_slice(bytemuck::cast_slice(&a));
        // Offset 1 of a fresh vector: never aligned for f32.
        combine(
            DType::F32,
            Combine::Sum,
            &mut raw[1..],
            bytemuck::cast_slice(&b),
        );
        scale(DType::F32, &mut raw[1..], 2);
        let got: Vec<f32> = bytemuck::pod_collect_to_vec(&raw[1..]);
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
        assert_eq!(got, want);
        assert_eq!(raw[0], 0, "the byte before the elements is untouched");
    }
}
