//! Inputs whose reductions are exact in every element type, the expected results, and the count
//! of wrong elements (`#wrong`).

use half::{bf16, f16};

use crate::types::{CollectiveKind, DType, ReduceOp};

/// Rank `rank`'s input element `i` for `op`: small integers, so that sums, products, minima and
/// maxima over up to 64 ranks are exact in f16, f32, i32 and u32 alike.
pub fn input_value(op: ReduceOp, rank: usize, i: usize) -> f64 {
    let h = (i.wrapping_mul(2654435761) ^ rank.wrapping_mul(40503)) % 1024;
    match op {
        // 1 or 2, and 2 only on the first 8 ranks: products stay within 2^8.
        ReduceOp::Prod => 1.0 + (rank < 8 && h.is_multiple_of(7)) as u8 as f64,
        _ => (h % 9) as f64, // 0..8
    }
}

/// The reduction of `values` (one per rank) under `op`, with `dtype`'s integer semantics.
pub fn reduce_values(dtype: DType, op: ReduceOp, values: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = values.collect();
    let n = v.len().max(1) as f64;
    match op {
        ReduceOp::Sum => v.iter().sum(),
        ReduceOp::Prod => v.iter().product(),
        ReduceOp::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
        ReduceOp::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Avg if dtype.is_float() => v.iter().sum::<f64>() / n,
        ReduceOp::Avg => (v.iter().sum::<f64>() / n).trunc(),
    }
}

#[allow(clippy::too_many_arguments)]
/// Rank `rank`'s expected output element `i` of a collective over `n` ranks. `count` is the
/// per-rank count of the call (output count for reduce_scatter, input count for all_gather).
pub fn expected(
    kind: CollectiveKind,
    dtype: DType,
    op: ReduceOp,
    n: usize,
    rank: usize,
    root: usize,
    count: usize,
    i: usize,
) -> Option<f64> {
    let all = |j: usize| reduce_values(dtype, op, (0..n).map(|q| input_value(op, q, j)));
    match kind {
        CollectiveKind::AllReduce => Some(all(i)),
        CollectiveKind::ReduceScatter => Some(all(rank * count + i)),
        CollectiveKind::AllGather => Some(input_value(op, i / count.max(1), i % count.max(1))),
        CollectiveKind::Broadcast => Some(input_value(op, root, i)),
        CollectiveKind::Reduce if rank == root => Some(all(i)),
        CollectiveKind::Reduce | CollectiveKind::Barrier => None,
    }
}

/// Whether `got` is `expected` up to `dtype`'s rounding (the inputs make most results exact;
/// avg on floats is not).
pub fn is_right(dtype: DType, got: f64, expected: f64) -> bool {
    let tol = match dtype {
        DType::F32 => 1e-6 * expected.abs().max(1.0),
        DType::F16 => 2e-3 * expected.abs().max(1.0),
        // bf16 keeps 8 significant bits: sums past 256 over many ranks round at every step.
        DType::BF16 => 1.6e-2 * expected.abs().max(1.0),
        DType::I32 | DType::U32 => 0.0,
    };
    (got - expected).abs() <= tol
}

/// Counts the elements of `got` that are not right.
///
/// ```
/// use wccl::{DType, bench::count_wrong};
/// assert_eq!(count_wrong(DType::I32, &[1.0, 2.0, 3.0], |i| (i + 1) as f64), 0);
/// assert_eq!(count_wrong(DType::I32, &[1.0, 5.0, 3.0], |i| (i + 1) as f64), 1);
/// assert_eq!(count_wrong(DType::F32, &[f64::NAN], |_| 0.0), 1);
/// ```
pub fn count_wrong(dtype: DType, got: &[f64], expected: impl Fn(usize) -> f64) -> u64 {
    got.iter()
        .enumerate()
        .filter(|&(i, &g)| !is_right(dtype, g, expected(i)))
        .count() as u64
}

/// The bytes of `values` as `dtype`.
pub fn encode(dtype: DType, values: &[f64]) -> Vec<u8> {
    fn cast<T: bytemuck::Pod>(v: Vec<T>) -> Vec<u8> {
        bytemuck::cast_slice(&v).to_vec()
    }
    match dtype {
        DType::F32 => cast(values.iter().map(|&v| v as f32).collect()),
        DType::F16 => cast(values.iter().map(|&v| f16::from_f64(v)).collect()),
        DType::BF16 => cast(values.iter().map(|&v| bf16::from_f64(v)).collect()),
        DType::I32 => cast(values.iter().map(|&v| v as i32).collect()),
        DType::U32 => cast(values.iter().map(|&v| v as u32).collect()),
    }
}

/// `dtype` elements as f64.
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(bytes)
            .into_iter()
            .map(f64::from)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_reduce_exactly_in_half_precision() {
        for op in ReduceOp::ALL {
            for n in [1, 2, 8, 64] {
                for i in 0..500 {
                    let e = reduce_values(DType::F16, op, (0..n).map(|q| input_value(op, q, i)));
                    if op != ReduceOp::Avg {
                        assert_eq!(f16::from_f64(e).to_f64(), e, "{op} n={n} i={i}");
                    }
                }
            }
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let v = [0.0, 1.0, 7.0, 2.0];
        for d in DType::ALL {
            assert_eq!(decode(d, &encode(d, &v)), v.to_vec());
        }
    }
}
