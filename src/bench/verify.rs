//! Inputs whose reductions are exact in every element type, the expected results, and the count
//! of wrong elements (`#wrong`).
//!
//! The inputs must make a misplaced chunk visible: a chunk written `d` elements off, or swapped
//! with another rank's, has to change the values the checker sees. So each rank's input is
//! `(i + rank * stride) mod period` with a prime `period` (never a power of two, so no power-of-two
//! offset maps the pattern onto itself) as long as the element type's exactness allows: the sum
//! over `ranks` stays below the largest integer the type holds exactly (2^24 for f32, i32 and u32,
//! 2^11 for f16, 2^8 for bf16). Since `period` is prime and larger than the rank count, the sum
//! over ranks at element `i` differs from the sum at `i + d` for every `d` that is not a multiple
//! of `period`: `n * d` is then no multiple of `period`.

use half::{bf16, f16};

use crate::types::{CollectiveKind, DType, ReduceOp};

/// The inputs of one check: which value rank `r` holds at element `i`, for one element type,
/// operator and rank count.
///
/// ```
/// use wccl::{DType, ReduceOp, bench::Pattern};
/// let p = Pattern::new(DType::F32, ReduceOp::Sum, 8);
/// assert!(p.period() >= 1 << 17 && !p.period().is_power_of_two());
/// assert_ne!(p.value(0, 5), p.value(1, 5)); // ranks differ
/// assert_ne!(p.value(0, 5), p.value(0, 5 + 1024)); // so do nearby elements
/// assert_eq!(p.value(3, 5), p.value(3, 5 + p.period()));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    op: ReduceOp,
    period: u64,
    stride: u64,
}

impl Pattern {
    /// The pattern for `ranks` ranks reducing `dtype` under `op`.
    pub fn new(dtype: DType, op: ReduceOp, ranks: usize) -> Pattern {
        let exact = exact_integers(dtype);
        let ranks = (ranks as u64).max(1);
        // Every value is below `period`, so the sum over all ranks is at most `exact`. At least
        // 3 (an odd prime): with more ranks than bf16 can sum exactly, avg's tolerance covers it.
        // Not a divisor of the rank count either: with p | n, n * d would be a multiple of p and
        // every sum over the ranks the same constant (bf16 on 28 ranks: p = 7).
        let period = prime_not_dividing((exact / ranks).saturating_add(1).max(3), ranks);
        // Ranks start the pattern at distinct points (stride is nonzero modulo a prime, so
        // `r * stride` differs for every r below `period`), far apart rather than neighbours.
        let stride = (period * 5 / 8).max(1) % period;
        Pattern {
            op,
            period,
            stride: if stride == 0 { 1 } else { stride },
        }
    }

    /// Elements after which every rank's input repeats.
    pub fn period(&self) -> usize {
        self.period as usize
    }

    /// Rank `rank`'s input elements `start..start + out.len()`, into `out` (what
    /// [`value`](Self::value) gives, without a division per element).
    pub fn fill(&self, rank: usize, start: usize, out: &mut [f64]) {
        let p = self.period;
        let r = (rank as u64) % p;
        let mut v = ((start as u64) % p + r * self.stride % p) % p;
        for o in out {
            *o = self.of(rank, v);
            v += 1;
            if v == p {
                v = 0;
            }
        }
    }

    /// The input that position `v` of the period stands for on `rank`.
    fn of(&self, rank: usize, v: u64) -> f64 {
        match self.op {
            // 1 or 2, and 2 only on the first 8 ranks: products stay within 2^8, exact in
            // every type; which elements get a 2 still depends on (rank, element).
            // The choice hashes the position, so a chunk shifted by any distance (not only one
            // that is no multiple of 3) changes which elements hold a 2.
            ReduceOp::Prod => {
                let h = (v ^ (rank as u64).wrapping_mul(0x9e37_79b9))
                    .wrapping_mul(0x2545_f491_4f6c_dd1d);
                1.0 + (rank < 8 && (h >> 61) < 3) as u8 as f64
            }
            _ => v as f64,
        }
    }

    /// Rank `rank`'s input element `i`.
    pub fn value(&self, rank: usize, i: usize) -> f64 {
        let p = self.period;
        let r = (rank as u64) % p;
        let v = ((i as u64) % p + r * self.stride % p) % p;
        self.of(rank, v)
    }
}

/// Integers up to this are exact in `dtype` (capped at 2^24 for the 32-bit types, so that every
/// type sees the same inputs where it can).
fn exact_integers(dtype: DType) -> u64 {
    match dtype {
        DType::F16 => 1 << 11,
        DType::BF16 => 1 << 8,
        DType::F32 | DType::I32 | DType::U32 => 1 << 24,
    }
}

/// The largest prime at or below `n` that does not divide `ranks` (a prime above `n` if every
/// one at or below does).
fn prime_not_dividing(n: u64, ranks: u64) -> u64 {
    let fits = |p: u64| p >= 3 && is_prime(p) && !ranks.is_multiple_of(p);
    // Below n: primes are dense enough that this ends at once; above: as many steps as the
    // rank count has prime factors, at most.
    (3..=n.max(3))
        .rev()
        .find(|&p| fits(p))
        .or_else(|| (n.saturating_add(1)..).find(|&p| fits(p)))
        .unwrap_or(3)
}

fn is_prime(k: u64) -> bool {
    k >= 2
        && (2..)
            .take_while(|d| d * d <= k)
            .all(|d| !k.is_multiple_of(d))
}

/// The reduction of `values` (one per rank) under `op`, with `dtype`'s integer semantics.
pub fn reduce_values(dtype: DType, op: ReduceOp, values: impl Iterator<Item = f64>) -> f64 {
    let (mut count, mut acc) = (0usize, None::<f64>);
    for v in values {
        count += 1;
        acc = Some(match (acc, op) {
            (None, _) => v,
            (Some(a), ReduceOp::Sum | ReduceOp::Avg) => a + v,
            (Some(a), ReduceOp::Prod) => a * v,
            (Some(a), ReduceOp::Min) => a.min(v),
            (Some(a), ReduceOp::Max) => a.max(v),
        });
    }
    let acc = acc.unwrap_or(match op {
        ReduceOp::Prod => 1.0,
        ReduceOp::Min => f64::INFINITY,
        ReduceOp::Max => f64::NEG_INFINITY,
        ReduceOp::Sum | ReduceOp::Avg => 0.0,
    });
    match op {
        ReduceOp::Avg if dtype.is_float() => acc / count.max(1) as f64,
        ReduceOp::Avg => (acc / count.max(1) as f64).trunc(),
        _ => acc,
    }
}

/// What every rank of one collective call should hold afterwards, from the call's inputs
/// ([`Pattern`]) and an f64 reduction on the host.
#[derive(Clone, Copy, Debug)]
pub struct Expected {
    /// The collective.
    pub kind: CollectiveKind,
    /// The element type.
    pub dtype: DType,
    /// The operator (ignored by collectives that do not reduce).
    pub op: ReduceOp,
    /// The number of ranks.
    pub ranks: usize,
    /// The root of broadcast and reduce.
    pub root: usize,
    /// The per-rank count of the call: output count for reduce_scatter, input count for
    /// all_gather, the whole count for the others.
    pub count: usize,
    /// The inputs.
    pub pattern: Pattern,
}

impl Expected {
    /// The expectation of one call, with the inputs [`Pattern::new`] gives.
    pub fn new(
        kind: CollectiveKind,
        dtype: DType,
        op: ReduceOp,
        ranks: usize,
        root: usize,
        count: usize,
    ) -> Expected {
        Expected {
            kind,
            dtype,
            op,
            ranks,
            root,
            count,
            pattern: Pattern::new(dtype, op, ranks),
        }
    }

    /// Every rank's expected results at once, laid out as one array: for all-reduce, reduce
    /// and broadcast the `count` elements every rank (or the root) holds; for reduce_scatter
    /// and all_gather the `ranks * count` elements of the whole (rank r's share of a
    /// reduce_scatter at `r * count`). Computed rank by rank over slices, on every core, so a
    /// check of hundreds of MiB costs little beside the call.
    pub fn results(&self) -> Vec<f64> {
        let p = &self.pattern;
        let count = self.count;
        match self.kind {
            CollectiveKind::Barrier => Vec::new(),
            CollectiveKind::Broadcast => {
                par_fill(count, |start, out| p.fill(self.root, start, out))
            }
            CollectiveKind::AllGather => {
                let total = count.saturating_mul(self.ranks);
                par_fill(total, |start, out| {
                    // A part may span several ranks' blocks.
                    let mut i = start;
                    let mut rest = out;
                    while !rest.is_empty() {
                        let (r, j) = (i / count.max(1), i % count.max(1));
                        let take = (count - j).min(rest.len());
                        let (now, later) = rest.split_at_mut(take);
                        p.fill(r, j, now);
                        (i, rest) = (i + take, later);
                    }
                })
            }
            CollectiveKind::AllReduce | CollectiveKind::Reduce | CollectiveKind::ReduceScatter => {
                let total = if self.kind == CollectiveKind::ReduceScatter {
                    count.saturating_mul(self.ranks)
                } else {
                    count
                };
                let (dtype, op, ranks) = (self.dtype, self.op, self.ranks);
                par_fill(total, move |start, out| {
                    let mut one = vec![0.0; out.len()];
                    for q in 0..ranks {
                        p.fill(q, start, &mut one);
                        for (acc, &v) in out.iter_mut().zip(&one) {
                            *acc = if q == 0 {
                                v
                            } else {
                                match op {
                                    ReduceOp::Sum | ReduceOp::Avg => *acc + v,
                                    ReduceOp::Prod => *acc * v,
                                    ReduceOp::Min => acc.min(v),
                                    ReduceOp::Max => acc.max(v),
                                }
                            };
                        }
                    }
                    if op == ReduceOp::Avg {
                        let n = ranks.max(1) as f64;
                        for acc in out.iter_mut() {
                            *acc = if dtype.is_float() {
                                *acc / n
                            } else {
                                (*acc / n).trunc()
                            };
                        }
                    }
                })
            }
        }
    }

    /// Rank `rank`'s expected output element `i`; `None` where the call defines no result
    /// (non-root ranks of reduce, barrier).
    pub fn at(&self, rank: usize, i: usize) -> Option<f64> {
        let p = &self.pattern;
        let all =
            |j: usize| reduce_values(self.dtype, self.op, (0..self.ranks).map(|q| p.value(q, j)));
        let count = self.count.max(1);
        match self.kind {
            CollectiveKind::AllReduce => Some(all(i)),
            CollectiveKind::ReduceScatter => {
                Some(all(rank.saturating_mul(count).saturating_add(i)))
            }
            CollectiveKind::AllGather => Some(p.value(i / count, i % count)),
            CollectiveKind::Broadcast => Some(p.value(self.root, i)),
            CollectiveKind::Reduce if rank == self.root => Some(all(i)),
            CollectiveKind::Reduce | CollectiveKind::Barrier => None,
        }
    }
}

/// Whether `got` is `expected` up to `dtype`'s rounding.
///
/// The inputs make every result but float avg an integer that the type holds exactly, and such a
/// result must match exactly in f16 and bf16: a tolerance of a few of their coarse steps would
/// let a misplaced chunk whose sums differ by one or two pass. f32 allows two units in the last
/// place (avg's division, and a mean taken as a product with 1/n). Other results (float avg,
/// sums past bf16's exact range on very many ranks) get a few units of each type's last place.
///
/// ```
/// use wccl::{DType, bench::is_right};
/// assert!(is_right(DType::F16, 1000.0, 1000.0));
/// assert!(!is_right(DType::F16, 1001.0, 1000.0));
/// assert!(is_right(DType::F16, 333.25, 1000.0 / 3.0));
/// assert!(!is_right(DType::F32, 8_000_002.0, 8_000_000.0));
/// ```
pub fn is_right(dtype: DType, got: f64, expected: f64) -> bool {
    let exact = expected.fract() == 0.0 && expected.abs() <= exact_integers(dtype) as f64;
    let tol = match dtype {
        DType::F16 | DType::BF16 if exact => 0.0,
        DType::F32 => 2.4e-7 * expected.abs().max(1.0),
        DType::F16 => 2e-3 * expected.abs().max(1.0),
        // bf16 keeps 8 significant bits: sums past 256 over many ranks round at every step.
        DType::BF16 => 1.6e-2 * expected.abs().max(1.0),
        DType::I32 | DType::U32 => 0.0,
    };
    (got - expected).abs() <= tol
}

/// [`is_right`] for a result of `op`: every result but float avg is an integer the type holds
/// exactly (the inputs make it so), and must match exactly, in f32 too (where `is_right`'s
/// tolerance would let a sum off by a few pass above 2^22).
pub fn is_right_for(dtype: DType, op: ReduceOp, got: f64, expected: f64) -> bool {
    let exact = op != ReduceOp::Avg
        && expected.fract() == 0.0
        && expected.abs() <= exact_integers(dtype) as f64;
    if exact {
        got == expected
    } else {
        is_right(dtype, got, expected)
    }
}

/// Counts the elements of `got` that are not right, on every core of the host (the check of a
/// 512 MiB result must not dominate a GPU run).
///
/// ```
/// use wccl::{DType, bench::count_wrong};
/// assert_eq!(count_wrong(DType::I32, &[1.0, 2.0, 3.0], |i| (i + 1) as f64), 0);
/// assert_eq!(count_wrong(DType::I32, &[1.0, 5.0, 3.0], |i| (i + 1) as f64), 1);
/// assert_eq!(count_wrong(DType::F32, &[f64::NAN], |_| 0.0), 1);
/// ```
pub fn count_wrong(dtype: DType, got: &[f64], expected: impl Fn(usize) -> f64 + Sync) -> u64 {
    count_wrong_by(got, expected, |g, e| is_right(dtype, g, e))
}

/// [`count_wrong`] with the comparison given: `right(got, expected)`.
pub fn count_wrong_by(
    got: &[f64],
    expected: impl Fn(usize) -> f64 + Sync,
    right: impl Fn(f64, f64) -> bool + Sync,
) -> u64 {
    let (expected, right) = (&expected, &right);
    let count = |start: usize, part: &[f64]| {
        part.iter()
            .enumerate()
            .filter(|&(k, &g)| !right(g, expected(start + k)))
            .count() as u64
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    const MIN_PART: usize = 1 << 16;
    if threads < 2 || got.len() < 2 * MIN_PART {
        return count(0, got);
    }
    let part = got.len().div_ceil(threads).max(MIN_PART);
    std::thread::scope(|s| {
        let handles: Vec<_> = got
            .chunks(part)
            .enumerate()
            .map(|(k, chunk)| s.spawn(move || count(k * part, chunk)))
            .collect();
        // A checker thread cannot panic on these inputs; if one did, count its part as wrong
        // rather than unwinding into the caller.
        handles
            .into_iter()
            .zip(got.chunks(part))
            .map(|(h, chunk)| h.join().unwrap_or(chunk.len() as u64))
            .sum()
    })
}

/// A `len`-element array filled part by part by `f(start, part)`, on every core of the host.
pub(crate) fn par_fill(len: usize, f: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    const MIN_PART: usize = 1 << 16;
    let mut out = vec![0.0; len];
    let part = len.div_ceil(threads.max(1)).max(MIN_PART);
    let f = &f;
    std::thread::scope(|s| {
        for (k, chunk) in out.chunks_mut(part).enumerate() {
            s.spawn(move || f(k * part, chunk));
        }
    });
    out
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

    const ALL_KINDS: [CollectiveKind; 5] = [
        CollectiveKind::AllReduce,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllGather,
        CollectiveKind::Broadcast,
        CollectiveKind::Reduce,
    ];

    #[test]
    fn results_are_exact_in_every_type() {
        for dtype in DType::ALL {
            for op in ReduceOp::ALL {
                for n in [1, 2, 3, 8, 64] {
                    let p = Pattern::new(dtype, op, n);
                    for i in (0..p.period())
                        .step_by(p.period() / 97 + 1)
                        .chain([p.period() - 1])
                    {
                        let e = reduce_values(dtype, op, (0..n).map(|q| p.value(q, i)));
                        if op != ReduceOp::Avg {
                            let back = decode(dtype, &encode(dtype, &[e]))[0];
                            assert_eq!(back, e, "{dtype} {op} n={n} i={i}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn periods_are_long_and_not_powers_of_two() {
        for dtype in DType::ALL {
            let exact = exact_integers(dtype) as usize;
            for n in 1..=128 {
                let p = Pattern::new(dtype, ReduceOp::Sum, n).period();
                assert!(!p.is_power_of_two(), "{dtype} n={n}: {p}");
                // Sums stay exact, and the period is as long as that allows (a prime lies
                // between k/2 and k), where the type leaves room for a few values per rank
                // (bf16 past 16 ranks may have none that also avoids the rank count's factors).
                assert!(p % 2 == 1 && n % p != 0 || n == 1, "{dtype} n={n}: {p}");
                if exact / n >= 16 {
                    assert!((p - 1) * n <= exact, "{dtype} n={n}: {p}");
                }
                assert!(p >= exact / n / 2, "{dtype} n={n}: {p}");
                if !matches!(dtype, DType::F16 | DType::BF16) && n <= 64 {
                    assert!(p >= 1 << 17, "{dtype} n={n}: period {p}");
                }
            }
        }
    }

    /// Rank `r`'s correct result for the call, then the same with one chunk misplaced.
    fn right_then_broken(e: &Expected, r: usize, len: usize) -> Vec<f64> {
        (0..len).map(|i| e.at(r, i).unwrap_or(0.0)).collect()
    }

    #[test]
    fn a_chunk_written_1024k_elements_off_is_wrong() {
        for kind in ALL_KINDS {
            for dtype in [DType::F32, DType::I32, DType::F16] {
                for n in [2, 4, 8] {
                    let len = 1 << 18;
                    let count = match kind {
                        CollectiveKind::AllGather => len / n,
                        CollectiveKind::ReduceScatter => len,
                        _ => len,
                    };
                    let e = Expected::new(kind, dtype, ReduceOp::Sum, n, 0, count);
                    let right = right_then_broken(&e, 0, len);
                    assert_eq!(count_wrong(dtype, &right, |i| e.at(0, i).unwrap_or(0.0)), 0);
                    for k in [1, 2, 3, 4, 16, 64, 127] {
                        let by = 1024 * k;
                        let chunk = 4096;
                        let mut got = right.clone();
                        let at = 1024;
                        got.copy_within(at + by..at + by + chunk, at);
                        let wrong = count_wrong(dtype, &got, |i| e.at(0, i).unwrap_or(0.0));
                        // Every element of the moved chunk is seen (bar coincidences in the
                        // small f16 period, at most a few per period).
                        let min = if dtype == DType::F16 {
                            chunk / 2
                        } else {
                            chunk
                        };
                        assert!(
                            wrong as usize >= min,
                            "{kind} {dtype} n={n}: a chunk {by} elements off gave #wrong {wrong}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_shifted_chunk_is_wrong_under_prod_and_with_p_dividing_n_cases_gone() {
        // prod: any shift, multiples of 3 included (the old pattern repeated every 3).
        for n in [3, 4, 8] {
            let len = 1 << 18;
            let e = Expected::new(
                CollectiveKind::AllReduce,
                DType::F32,
                ReduceOp::Prod,
                n,
                0,
                len,
            );
            let right = e.results();
            for by in [3, 1024, 3072, 12288, 65536] {
                let mut got = right.clone();
                got.copy_within(1024 + by..1024 + by + 4096, 1024);
                let wrong = count_wrong_by(
                    &got,
                    |i| right[i],
                    |g, w| is_right_for(DType::F32, ReduceOp::Prod, g, w),
                );
                assert!(
                    wrong >= 1000,
                    "prod n={n}: a chunk {by} off gave #wrong {wrong}"
                );
            }
        }
        // No period divides the rank count.
        for dtype in DType::ALL {
            for n in 1..=200u64 {
                let p = Pattern::new(dtype, ReduceOp::Sum, n as usize).period() as u64;
                assert!(n == 1 || !n.is_multiple_of(p), "{dtype} n={n}: period {p}");
            }
        }
        // bf16 on 28 ranks (period 7 once): sums must still tell a shifted chunk apart.
        let e = Expected::new(
            CollectiveKind::AllReduce,
            DType::BF16,
            ReduceOp::Sum,
            28,
            0,
            5000,
        );
        let right = e.results();
        let mut got = right.clone();
        got.copy_within(2..1002, 1);
        let wrong = count_wrong_by(
            &got,
            |i| right[i],
            |g, w| is_right_for(DType::BF16, ReduceOp::Sum, g, w),
        );
        assert!(wrong >= 900, "bf16 n=28: #wrong {wrong}");
    }

    #[test]
    fn f32_sums_must_be_exact() {
        assert!(is_right(DType::F32, 8_000_001.0, 8_000_000.0));
        assert!(!is_right_for(
            DType::F32,
            ReduceOp::Sum,
            8_000_001.0,
            8_000_000.0
        ));
        assert!(is_right_for(
            DType::F32,
            ReduceOp::Avg,
            2_666_666.75,
            8_000_000.0 / 3.0
        ));
    }

    #[test]
    fn another_ranks_chunk_is_wrong() {
        for dtype in [DType::F32, DType::U32, DType::F16] {
            for n in [2, 3, 8] {
                let per = 3000;
                // all-gather: rank chunks a and b swapped.
                let e = Expected::new(CollectiveKind::AllGather, dtype, ReduceOp::Sum, n, 0, per);
                let right = right_then_broken(&e, 0, per * n);
                let mut got = right.clone();
                let (a, b) = (0, n - 1);
                for i in 0..per {
                    got.swap(a * per + i, b * per + i);
                }
                let wrong = count_wrong(dtype, &got, |i| e.at(0, i).unwrap_or(0.0));
                assert!(
                    wrong as usize >= 2 * per * 9 / 10,
                    "{dtype} n={n}: #wrong {wrong}"
                );
                // reduce_scatter: rank 1 holding rank 0's share.
                let e = Expected::new(
                    CollectiveKind::ReduceScatter,
                    dtype,
                    ReduceOp::Sum,
                    n,
                    0,
                    per,
                );
                let theirs = right_then_broken(&e, 0, per);
                let wrong = count_wrong(dtype, &theirs, |i| e.at(1, i).unwrap_or(0.0));
                assert!(
                    wrong as usize >= per * 9 / 10,
                    "{dtype} n={n}: #wrong {wrong}"
                );
                // broadcast: the wrong root's data.
                let e = Expected::new(CollectiveKind::Broadcast, dtype, ReduceOp::Sum, n, 1, per);
                let from0: Vec<f64> = (0..per).map(|i| e.pattern.value(0, i)).collect();
                let wrong = count_wrong(dtype, &from0, |i| e.at(2, i).unwrap_or(0.0));
                assert!(
                    wrong as usize >= per * 9 / 10,
                    "{dtype} n={n}: #wrong {wrong}"
                );
            }
        }
    }

    #[test]
    fn the_parallel_count_matches_the_serial_one() {
        let got: Vec<f64> = (0..300_007).map(|i| (i % 1013) as f64).collect();
        let expected = |i: usize| {
            if i.is_multiple_of(7) {
                -1.0
            } else {
                (i % 1013) as f64
            }
        };
        let serial = got
            .iter()
            .enumerate()
            .filter(|&(i, &g)| !is_right(DType::F32, g, expected(i)))
            .count() as u64;
        assert_eq!(count_wrong(DType::F32, &got, expected), serial);
        let filled = par_fill(300_007, |start, out| {
            for (k, o) in out.iter_mut().enumerate() {
                *o = (start + k) as f64;
            }
        });
        assert!(filled.iter().enumerate().all(|(i, &v)| v == i as f64));
    }

    #[test]
    fn fill_and_results_agree_with_the_element_wise_forms() {
        for kind in ALL_KINDS {
            for op in ReduceOp::ALL {
                for (dtype, n) in [(DType::F32, 3), (DType::F16, 5), (DType::I32, 1)] {
                    let count = 70_001;
                    let e = Expected::new(kind, dtype, op, n, n - 1, count);
                    let all = e.results();
                    for r in 0..n {
                        let mut got = vec![0.0; 1000];
                        e.pattern.fill(r, 69_500, &mut got);
                        for (k, &g) in got.iter().enumerate() {
                            assert_eq!(g, e.pattern.value(r, 69_500 + k));
                        }
                        let (at, len) = match kind {
                            CollectiveKind::ReduceScatter => (r * count, count),
                            _ => (0, all.len()),
                        };
                        for i in (0..len).step_by(97) {
                            if let Some(want) = e.at(r, i) {
                                assert_eq!(all[at + i], want, "{kind} {op} {dtype} r={r} i={i}");
                            }
                        }
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
