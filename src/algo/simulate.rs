//! A host-side interpreter of plans over many ranks, so every algorithm is checked on rank
//! counts and slice sizes that would be slow on a software GPU.

use std::collections::VecDeque;

use super::plan::{Action, Buf, Fold, Plan, Region, Source};
use super::{
    Algorithm, central_all_reduce, chain_broadcast, chain_reduce, halving_doubling_all_reduce,
    naive_all_reduce, ring_all_gather, ring_all_reduce, ring_reduce_scatter, staged_all_gather,
    staged_halving_doubling_all_reduce, staged_reduce_scatter, staged_ring_all_reduce,
};
use crate::types::{Combine, ReduceOp};

struct Rank {
    plan: Plan,
    pc: usize,
    sent: bool,
    received: Option<Vec<f64>>,
    in_place: bool,
    input: Vec<f64>,
    output: Vec<f64>,
    scratch: Vec<f64>,
    host: Vec<f64>,
    /// Host elements the plan has written (the checks of `Plan::host_split`).
    written: Vec<bool>,
    previous: Vec<f64>,
}

impl Rank {
    fn buf(&mut self, b: Buf) -> &mut Vec<f64> {
        match b {
            // In place, input and output are one buffer.
            Buf::Input if self.in_place => &mut self.output,
            Buf::Input => &mut self.input,
            Buf::Output => &mut self.output,
            Buf::Scratch => &mut self.scratch,
            Buf::Host => &mut self.host,
        }
    }
    fn get(&mut self, r: Region) -> Vec<f64> {
        self.buf(r.buf)[r.offset..r.offset + r.len].to_vec()
    }
    /// A read of host memory by a `host_split` plan: only of elements not yet written.
    fn read_host(&self, r: Region) {
        if self.plan.host_split && r.buf == Buf::Host {
            assert!(
                !self.written[r.offset..r.offset + r.len].contains(&true),
                "a host_split plan read host memory it had written: {r:?}"
            );
        }
    }
    fn wrote_host(&mut self, r: Region) {
        if r.buf == Buf::Host {
            self.written[r.offset..r.offset + r.len].fill(true);
        }
    }
}

fn apply(c: Combine, a: f64, b: f64) -> f64 {
    match c {
        Combine::Sum => a + b,
        Combine::Prod => a * b,
        Combine::Min => a.min(b),
        Combine::Max => a.max(b),
        Combine::Copy => b,
    }
}

/// Runs every rank's plan to completion (in-place when `in_place`), returning the outputs.
/// Panics on a deadlock or a frame of the wrong length.
fn simulate(
    plans: Vec<Plan>,
    inputs: Vec<Vec<f64>>,
    out_len: usize,
    in_place: bool,
) -> Vec<Vec<f64>> {
    simulate_with(plans, inputs, out_len, in_place, None).0
}

/// Like [`simulate`], with rank `odd` (if any) disagreeing about the call: frames to and from
/// it are refused (the receiver stops there for good, as a rank that finds a header mismatch
/// does), and a deadlock ends the run instead of panicking. Returns the outputs and which
/// ranks reached the end of their plans.
fn simulate_with(
    plans: Vec<Plan>,
    inputs: Vec<Vec<f64>>,
    out_len: usize,
    in_place: bool,
    odd: Option<usize>,
) -> (Vec<Vec<f64>>, Vec<bool>) {
    let n = plans.len();
    let mut refused = vec![false; n];
    let mut ranks: Vec<Rank> = plans
        .into_iter()
        .zip(inputs)
        .map(|(plan, input)| Rank {
            scratch: vec![f64::NAN; plan.scratch],
            host: vec![f64::NAN; plan.host],
            written: vec![false; plan.host],
            previous: Vec::new(),
            output: if in_place {
                input.clone()
            } else {
                vec![f64::NAN; out_len]
            },
            plan,
            pc: 0,
            sent: false,
            received: None,
            in_place,
            input,
        })
        .collect();
    let mut queues: Vec<VecDeque<Vec<f64>>> = (0..n * n).map(|_| VecDeque::new()).collect();
    loop {
        let mut progress = false;
        for r in 0..n {
            while !refused[r] {
                let rank = &mut ranks[r];
                let Some(&action) = rank.plan.actions.get(rank.pc) else {
                    break;
                };
                match action {
                    Action::Copy { src, dst } => {
                        if rank.plan.host_split {
                            // The only copies: the input in, the output out, offsets and lengths
                            // kept; what goes out was all written (a split run skips the copy,
                            // so an unwritten element would leave the output stale).
                            let mirror = |a: Buf, b: Buf| {
                                src.buf == a
                                    && dst.buf == b
                                    && src.offset == dst.offset
                                    && src.len == dst.len
                            };
                            assert!(
                                mirror(Buf::Input, Buf::Host) || mirror(Buf::Host, Buf::Output),
                                "a host_split plan copies {src:?} to {dst:?}"
                            );
                            if src.buf == Buf::Host {
                                assert!(
                                    rank.written[src.offset..src.offset + src.len]
                                        .iter()
                                        .all(|&w| w),
                                    "a host_split plan copies out host memory it never wrote: {src:?}"
                                );
                            }
                        } else {
                            rank.read_host(src);
                            rank.wrote_host(dst);
                        }
                        let v = rank.get(src);
                        rank.buf(dst.buf)[dst.offset..dst.offset + dst.len].copy_from_slice(&v);
                    }
                    Action::Scale { dst, divisor } => {
                        assert!(
                            !(rank.plan.host_split && dst.buf == Buf::Host),
                            "a host_split plan scales host memory"
                        );
                        for x in &mut rank.buf(dst.buf)[dst.offset..dst.offset + dst.len] {
                            *x /= divisor as f64;
                        }
                    }
                    Action::Transfer(t) => {
                        let recv_now =
                            |rank: &mut Rank,
                             queues: &mut Vec<VecDeque<Vec<f64>>>,
                             refused: &mut Vec<bool>| {
                                let Some(rv) = t.recv else { return true };
                                if rank.received.is_some() {
                                    return true;
                                }
                                let Some(p) = queues[rv.from * n + r].pop_front() else {
                                    return false;
                                };
                                if odd == Some(r) || odd == Some(rv.from) {
                                    refused[r] = true;
                                    return false;
                                }
                                assert_eq!(p.len(), rv.dst.len, "frame length");
                                let d = rv.dst;
                                let mut p = p;
                                match rv.fold {
                                    Fold::Dst => {
                                        if rv.combine != Combine::Copy {
                                            rank.read_host(d);
                                        }
                                        rank.wrote_host(d);
                                        for (x, y) in rank.buf(d.buf)[d.offset..d.offset + d.len]
                                            .iter_mut()
                                            .zip(&p)
                                        {
                                            *x = apply(rv.combine, *x, *y);
                                        }
                                    }
                                    Fold::Payload { divide, write } => {
                                        rank.read_host(d);
                                        let mine = rank.get(d);
                                        for (y, x) in p.iter_mut().zip(&mine) {
                                            *y = apply(rv.combine, *y, *x)
                                                / f64::from(divide.max(1));
                                        }
                                        if write {
                                            rank.wrote_host(d);
                                            rank.buf(d.buf)[d.offset..d.offset + d.len]
                                                .copy_from_slice(&p);
                                        }
                                    }
                                }
                                rank.received = Some(p);
                                true
                            };
                        if t.recv_first && !recv_now(rank, &mut queues, &mut refused) {
                            break;
                        }
                        if let (Some((to, src)), false) = (t.send, rank.sent) {
                            let payload = match src {
                                Source::Device(reg) => {
                                    rank.read_host(reg);
                                    rank.get(reg)
                                }
                                Source::Forward => rank.received.clone().unwrap_or_default(),
                                Source::Previous => rank.previous.clone(),
                            };
                            rank.previous.clone_from(&payload);
                            queues[r * n + to].push_back(payload);
                            rank.sent = true;
                        }
                        if !recv_now(rank, &mut queues, &mut refused) {
                            break;
                        }
                    }
                }
                rank.pc += 1;
                rank.sent = false;
                rank.received = None;
                progress = true;
            }
        }
        if ranks.iter().all(|k| k.pc == k.plan.actions.len()) {
            break;
        }
        if odd.is_some() && !progress {
            break;
        }
        assert!(progress, "deadlock");
    }
    let finished = ranks.iter().map(|k| k.pc == k.plan.actions.len()).collect();
    if odd.is_none() {
        assert!(queues.iter().all(|q| q.is_empty()), "frames left unread");
    }
    (ranks.into_iter().map(|k| k.output).collect(), finished)
}

fn inputs(n: usize, len: usize, seed: u64) -> Vec<Vec<f64>> {
    (0..n)
        .map(|r| {
            (0..len)
                .map(|i| ((i as u64 * 31 + r as u64 * 7 + seed) % 13) as f64 + 1.0)
                .collect()
        })
        .collect()
}

fn reduce(op: ReduceOp, xs: &[Vec<f64>], i: usize) -> f64 {
    let it = xs.iter().map(|v| v[i]);
    match op {
        ReduceOp::Sum => it.sum(),
        ReduceOp::Prod => it.product(),
        ReduceOp::Min => it.fold(f64::INFINITY, f64::min),
        ReduceOp::Max => it.fold(f64::NEG_INFINITY, f64::max),
        ReduceOp::Avg => it.sum::<f64>() / xs.len() as f64,
    }
}

const SIZES: [usize; 7] = [0, 1, 2, 5, 17, 64, 101];
const SLICES: [usize; 3] = [1, 3, 1 << 20];

#[test]
fn every_algorithm_on_1_to_16_ranks() {
    for n in 1..=16 {
        for &count in &SIZES {
            for &slice in &SLICES {
                for in_place in [false, true] {
                    for (op, algo) in ReduceOp::ALL
                        .into_iter()
                        .flat_map(|op| Algorithm::ALL.into_iter().map(move |a| (op, a)))
                    {
                        let x = inputs(n, count, n as u64);
                        let plans = (0..n)
                            .map(|r| match algo {
                                Algorithm::Central => {
                                    central_all_reduce(n, r, 0, count, op, in_place, slice)
                                }
                                Algorithm::Naive => naive_all_reduce(n, r, 0, count, op, slice),
                                Algorithm::Staged => staged_ring_all_reduce(n, r, count, op, slice),
                                Algorithm::HalvingDoubling => {
                                    halving_doubling_all_reduce(n, r, count, op, in_place, slice)
                                }
                                Algorithm::StagedHalvingDoubling => {
                                    staged_halving_doubling_all_reduce(n, r, count, op, slice)
                                }
                                _ => ring_all_reduce(n, r, count, op, in_place, slice),
                            })
                            .collect();
                        let out = simulate(plans, x.clone(), count, in_place);
                        for (r, o) in out.iter().enumerate() {
                            for (i, got) in o.iter().enumerate() {
                                let e = reduce(op, &x, i);
                                assert!(
                                    (got - e).abs() <= 1e-9 * e.abs(),
                                    "{algo} all_reduce n={n} r={r} i={i}: {got} vs {e}"
                                );
                            }
                        }
                    }
                    let root = count % n;
                    let x = inputs(n, count, 3);
                    let plans = (0..n)
                        .map(|r| chain_broadcast(n, r, root, count, slice))
                        .collect();
                    for o in simulate(plans, x.clone(), count, in_place) {
                        assert_eq!(o, x[root], "broadcast n={n} count={count}");
                    }
                    let plans = (0..n)
                        .map(|r| chain_reduce(n, r, root, count, ReduceOp::Sum, slice))
                        .collect();
                    let out = simulate(plans, x.clone(), count, in_place);
                    let e: Vec<f64> = (0..count).map(|i| reduce(ReduceOp::Sum, &x, i)).collect();
                    assert_eq!(out[root], e, "reduce n={n} count={count}");
                }
                // Reduce-scatter and all-gather, out of place.
                let x = inputs(n, n * count, 5);
                let plans = (0..n)
                    .map(|r| ring_reduce_scatter(n, r, count, ReduceOp::Max, slice))
                    .collect();
                for (r, o) in simulate(plans, x.clone(), count, false).iter().enumerate() {
                    let e: Vec<f64> = (0..count)
                        .map(|i| reduce(ReduceOp::Max, &x, r * count + i))
                        .collect();
                    assert_eq!(o, &e, "reduce_scatter n={n} count={count}");
                }
                let x = inputs(n, count, 7);
                let plans = (0..n)
                    .map(|r| ring_all_gather(n, r, count, slice))
                    .collect();
                for o in simulate(plans, x.clone(), n * count, false) {
                    assert_eq!(o, x.concat(), "all_gather n={n} count={count}");
                }
            }
        }
    }
}

/// The binomial trees and the dissemination barrier on every rank count from 1 to 64, every
/// root of the small ones, every op, sizes below and above the rank count and the slice.
#[test]
fn trees_on_1_to_64_ranks() {
    for n in 1..=64 {
        let roots: Vec<usize> = if n <= 9 {
            (0..n).collect()
        } else {
            vec![0, 1, n / 2, n - 1]
        };
        for &root in &roots {
            for &(count, slice) in &[(0, 1), (3, 1), (n + 5, 2), (257, 1 << 20)] {
                for in_place in [false, true] {
                    let x = inputs(n, count, 13);
                    let plans = (0..n)
                        .map(|r| super::tree_broadcast(n, r, root, count, slice))
                        .collect();
                    for (r, o) in simulate(plans, x.clone(), count, in_place)
                        .iter()
                        .enumerate()
                    {
                        assert_eq!(o, &x[root], "tree broadcast n={n} root={root} r={r}");
                    }
                    for op in ReduceOp::ALL {
                        let plans = (0..n)
                            .map(|r| super::tree_reduce(n, r, root, count, op, slice))
                            .collect();
                        let out = simulate(plans, x.clone(), count, in_place);
                        for (i, &got) in out[root].iter().enumerate() {
                            let e = reduce(op, &x, i);
                            assert!(
                                (got - e).abs() <= 1e-9 * e.abs(),
                                "tree reduce {op} n={n} root={root} i={i}: {got} vs {e}"
                            );
                        }
                        // The other ranks' outputs are untouched (theirs is the input).
                        for (r, o) in out.iter().enumerate().filter(|(r, _)| *r != root) {
                            if in_place {
                                assert_eq!(o, &x[r], "tree reduce wrote rank {r}'s buffer");
                            } else {
                                assert!(o.iter().all(|v| v.is_nan()), "rank {r} output written");
                            }
                        }
                    }
                }
            }
        }
        let plans = (0..n).map(|r| super::dissemination_barrier(n, r)).collect();
        simulate(plans, inputs(n, 0, 1), 0, false);
    }
}

/// No rank finishes while another refuses the call, on the trees and the dissemination barrier
/// at the rank counts they run on (16 or more), partial subtrees included: every rank in turn
/// disagrees, as every root is tried with rank 0 disagreeing.
#[test]
fn no_rank_finishes_on_a_tree_while_another_refuses() {
    for n in [16, 17, 31, 33, 63, 64] {
        for root in 0..n {
            for &(count, slice) in &[(0, 1), (17, 3)] {
                let x = inputs(n, count, 1);
                for (name, plans) in [
                    (
                        "tree broadcast",
                        (0..n)
                            .map(|r| super::tree_broadcast(n, r, root, count, slice))
                            .collect::<Vec<_>>(),
                    ),
                    (
                        "tree reduce",
                        (0..n)
                            .map(|r| super::tree_reduce(n, r, root, count, ReduceOp::Sum, slice))
                            .collect(),
                    ),
                ] {
                    let (_, finished) = simulate_with(plans, x.clone(), count, true, Some(0));
                    assert!(
                        finished.iter().all(|f| !f),
                        "{name} n={n} root={root} count={count}: rank 0 disagrees, yet {:?} finish",
                        (0..n).filter(|&r| finished[r]).collect::<Vec<_>>()
                    );
                }
            }
        }
        for odd in 0..n {
            let plans = (0..n).map(|r| super::dissemination_barrier(n, r)).collect();
            let (_, finished) = simulate_with(plans, inputs(n, 0, 1), 0, true, Some(odd));
            assert!(finished.iter().all(|f| !f), "barrier n={n} odd={odd}");
        }
    }
}

/// The trees and the dissemination barrier take log steps: at 32 ranks the root's broadcast
/// plan has 5 sends of data, the barrier 5 rounds, against the chain's and ring's 31.
#[test]
fn trees_take_log_steps() {
    for n in [2usize, 5, 8, 32, 33, 64] {
        let log = (usize::BITS - (n - 1).leading_zeros()) as usize;
        for r in 0..n {
            assert_eq!(super::dissemination_barrier(n, r).sends(), log, "n={n}");
            // Data, then at most one acknowledgement up and one "done" per child.
            let b = super::tree_broadcast(n, r, 0, 10, 1 << 20);
            assert!(b.sends() <= 2 * log + 1, "n={n} r={r}: {}", b.sends());
            let d = super::tree_reduce(n, r, 0, 10, ReduceOp::Sum, 1 << 20);
            assert!(d.sends() <= log + 1, "n={n} r={r}: {}", d.sends());
        }
        assert_eq!(super::tree_broadcast(n, 0, 0, 10, 1 << 20).sends(), 2 * log);
    }
}

/// Halving-doubling, on the devices and host-staged, on every rank count from 1 to 64 (the
/// folds of 2(n-p) ranks for every p up to 32), every op, in and out of place, sizes below and
/// above the rank count.
#[test]
fn halving_doubling_on_1_to_64_ranks() {
    for n in 1..=64 {
        for &(count, slice) in &[(0, 1), (3, 1), (n + 5, 2), (257, 1 << 20)] {
            for (in_place, staged) in [(false, false), (true, false), (false, true), (true, true)] {
                for op in ReduceOp::ALL {
                    let x = inputs(n, count, 11);
                    let plans = (0..n)
                        .map(|r| {
                            if staged {
                                staged_halving_doubling_all_reduce(n, r, count, op, slice)
                            } else {
                                halving_doubling_all_reduce(n, r, count, op, in_place, slice)
                            }
                        })
                        .collect();
                    for (r, o) in simulate(plans, x.clone(), count, in_place)
                        .iter()
                        .enumerate()
                    {
                        for (i, got) in o.iter().enumerate() {
                            let e = reduce(op, &x, i);
                            assert!(
                                (got - e).abs() <= 1e-9 * e.abs(),
                                "hd (staged {staged}) n={n} r={r} count={count} i={i}: {got} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Halving-doubling moves the ring's volume (2(p-1)/p of the buffer each way among the p that
/// exchange) in 2·log2(p) exchanges, plus the folds.
#[test]
fn halving_doubling_takes_log_steps() {
    let sends = |n: usize, r: usize| {
        halving_doubling_all_reduce(n, r, 1 << 12, ReduceOp::Sum, true, 1 << 20).sends()
    };
    assert_eq!(sends(32, 7), 10);
    assert_eq!(sends(64, 0), 12);
    // 33 ranks: rank 0 folds into 1 (one send); rank 1 exchanges 10 times and sends back.
    assert_eq!(sends(33, 0), 1);
    assert_eq!(sends(33, 1), 11);
    assert_eq!(sends(33, 2), 10);
    // The volume: 2(p-1)/p of the buffer among the p, and the whole buffer once more on a
    // folding rank (the even one sends it in, the odd one sends the result back).
    let count = 7000;
    for n in [2usize, 4, 6, 8, 13, 32, 33] {
        let p = 1usize << n.ilog2();
        for r in 0..n {
            let plan = halving_doubling_all_reduce(n, r, count, ReduceOp::Sum, true, 1 << 20);
            let sent = device_sent(&plan);
            let folds = r < 2 * (n - p);
            let want = match (folds, r % 2) {
                (true, 0) => count,
                (true, _) => 2 * (p - 1) * count / p + count,
                _ => 2 * (p - 1) * count / p,
            };
            assert!(
                sent.abs_diff(want) <= 2 * p,
                "n={n} r={r}: sent {sent}, want {want}"
            );
        }
    }
}

/// The host-staged ring mirrors host memory in windows of at most a slice, interleaved with
/// the ring: every element is read back once and uploaded once; a window is read back before
/// the first transfer that reads it and uploaded after the last that writes it; a call within
/// one slice reads back once and uploads once; a longer one uploads before its last transfer
/// (the overlap) and reads back after its first (each chunk as the ring reaches it).
#[test]
fn the_staged_ring_reads_back_and_uploads_as_the_ring_goes() {
    for n in 2..=9 {
        for &count in &[1usize, 2, 5, 17, 101, 1000] {
            for &slice in &[1usize, 3, 7, 64, 1 << 20] {
                for r in 0..n {
                    let plan = staged_ring_all_reduce(n, r, count, ReduceOp::Sum, slice);
                    let (mut down, mut up) = (vec![0u32; count], vec![0u32; count]);
                    let mut read_at = vec![usize::MAX; count];
                    let (mut reads, mut uploads) = (0, 0);
                    let (mut first_upload, mut transfers) = (None, vec![]);
                    for (i, a) in plan.actions.iter().enumerate() {
                        match a {
                            Action::Copy { src, dst } if dst.buf == Buf::Host => {
                                assert!(src.len <= slice, "n={n} count={count} r={r}");
                                for (d, at) in down
                                    .iter_mut()
                                    .zip(read_at.iter_mut())
                                    .skip(dst.offset)
                                    .take(dst.len)
                                {
                                    *d += 1;
                                    *at = i;
                                }
                                reads += 1;
                            }
                            Action::Copy { src, .. } => {
                                for u in up.iter_mut().skip(src.offset).take(src.len) {
                                    *u += 1;
                                }
                                uploads += 1;
                                first_upload.get_or_insert(i);
                            }
                            Action::Transfer(t) => {
                                let touched =
                                    t.recv.map(|x| x.dst).or(t.send.and_then(|(_, s)| match s {
                                        Source::Device(reg) => Some(reg),
                                        _ => None,
                                    }));
                                if let Some(reg) = touched {
                                    // Read back before, and not uploaded yet: no transfer
                                    // touches an element after its upload.
                                    let span = reg.offset..reg.offset + reg.len;
                                    assert!(
                                        read_at[span.clone()].iter().all(|&at| at < i),
                                        "n={n} count={count} r={r} {reg:?}"
                                    );
                                    assert!(
                                        up[span].iter().all(|&u| u == 0),
                                        "n={n} count={count} r={r} {reg:?}"
                                    );
                                    transfers.push((i, reg.offset, reg.offset + reg.len));
                                }
                            }
                            Action::Scale { .. } => {}
                        }
                    }
                    assert!(
                        down.iter().chain(&up).all(|&c| c == 1),
                        "n={n} count={count} slice={slice} r={r}"
                    );
                    let last_transfer = transfers.last().map_or(0, |t| t.0);
                    if count <= slice {
                        assert_eq!((reads, uploads), (1, 1), "n={n} count={count} r={r}");
                    } else if count.div_ceil(n) > slice {
                        // Chunks of more than one slice: the windows follow the ring.
                        assert!(
                            first_upload.is_some_and(|u| u < last_transfer),
                            "n={n} count={count} slice={slice} r={r}"
                        );
                        let first_transfer = transfers.first().map_or(0, |t| t.0);
                        assert!(reads > 1 && plan.actions.iter().skip(first_transfer).any(|a| matches!(a, Action::Copy { dst, .. } if dst.buf == Buf::Host)), "n={n} count={count} slice={slice} r={r}");
                    }
                }
            }
        }
    }
}

/// The host-staged halving-doubling sends what the device one sends, frame for frame (the
/// same peers, lengths and folds in the same order), and touches the devices only to read the
/// input back once and upload the result once; avg divides on the host.
#[test]
fn staged_halving_doubling_moves_the_same_frames_and_one_buffer_each_way() {
    let count = 7000;
    let scales = |p: &Plan| {
        p.actions
            .iter()
            .filter(|a| matches!(a, Action::Scale { .. }))
            .count()
    };
    for (n, op) in [2usize, 3, 6, 8, 13, 32, 33]
        .into_iter()
        .flat_map(|n| ReduceOp::ALL.into_iter().map(move |op| (n, op)))
    {
        for r in 0..n {
            let dev = halving_doubling_all_reduce(n, r, count, op, true, 1000);
            let host = staged_halving_doubling_all_reduce(n, r, count, op, 1000);
            assert_eq!(frames(&host), frames(&dev), "n={n} r={r} {op:?}");
            assert_eq!(scales(&host), scales(&dev), "n={n} r={r} {op:?}");
            assert_eq!(device_sent(&host), device_sent(&dev), "n={n} r={r}");
            let (mut down, mut up) = (0, 0);
            for a in &host.actions {
                match a {
                    Action::Copy { src, dst } if dst.buf == Buf::Host => {
                        assert_eq!(src.buf, Buf::Input);
                        down += src.len;
                    }
                    Action::Copy { src, dst } => {
                        assert_eq!((src.buf, dst.buf), (Buf::Host, Buf::Output));
                        up += src.len;
                    }
                    Action::Transfer(t) => {
                        let sent = t.send.map(|(_, s)| s);
                        if let Some(Source::Device(reg)) = sent {
                            assert_eq!(reg.buf, Buf::Host, "n={n} r={r}");
                        }
                        if let Some(recv) = t.recv {
                            assert_eq!(recv.dst.buf, Buf::Host, "n={n} r={r}");
                        }
                    }
                    Action::Scale { dst, .. } => assert_eq!(dst.buf, Buf::Host),
                }
            }
            assert_eq!((down, up), (count, count), "n={n} r={r}");
        }
    }
}

/// The host-staged reduce-scatter and all-gather on 1 to 16 ranks, every op, sizes below and
/// above the rank count and the slice, against the f64 reference; frame for frame what the
/// device rings send and receive; and per rank one read-back of the input and one upload of
/// the result (all-gather: its own piece in, the others' pieces out, its own piece copied on
/// the device), with every frame sent from and received into host memory.
#[test]
fn staged_reduce_scatter_and_all_gather_on_1_to_16_ranks() {
    // (read back, uploaded, copied on the device), in elements; every frame on host memory, and
    // every read-back and upload within a slice (a staging slot holds one).
    let traffic = |p: &Plan, slice: usize| {
        let (mut down, mut up, mut dev) = (0, 0, 0);
        for a in &p.actions {
            match a {
                Action::Copy { src, dst } => match (src.buf, dst.buf) {
                    (Buf::Host, Buf::Host) => panic!("a host copy {src:?}"),
                    (_, Buf::Host) | (Buf::Host, _) if src.len > slice => {
                        panic!("a copy of {} elements past a slice of {slice}", src.len)
                    }
                    (_, Buf::Host) => down += src.len,
                    (Buf::Host, _) => up += src.len,
                    _ => dev += src.len,
                },
                Action::Transfer(t) => {
                    if let Some((_, Source::Device(r))) = t.send {
                        assert_eq!(r.buf, Buf::Host, "{t:?}");
                    }
                    if let Some(r) = t.recv {
                        assert_eq!(r.dst.buf, Buf::Host, "{t:?}");
                    }
                }
                Action::Scale { dst, .. } => assert_eq!(dst.buf, Buf::Host),
            }
        }
        (down, up, dev)
    };
    for n in 1..=16 {
        for &count in &SIZES {
            for &slice in &SLICES {
                for op in ReduceOp::ALL {
                    let x = inputs(n, n * count, n as u64 + 5);
                    let plans: Vec<Plan> = (0..n)
                        .map(|r| staged_reduce_scatter(n, r, count, op, slice))
                        .collect();
                    for (r, p) in plans.iter().enumerate() {
                        let ring = ring_reduce_scatter(n, r, count, op, slice);
                        assert_eq!(frames(p), frames(&ring), "n={n} r={r} {op:?}");
                        if n > 1 {
                            assert_eq!(traffic(p, slice), (n * count, count, 0), "n={n} r={r}");
                        }
                    }
                    for (r, o) in simulate(plans, x.clone(), count, false).iter().enumerate() {
                        for (i, got) in o.iter().enumerate() {
                            let e = reduce(op, &x, r * count + i);
                            assert!(
                                (got - e).abs() <= 1e-9 * e.abs(),
                                "staged reduce_scatter n={n} r={r} i={i} {op:?}: {got} vs {e}"
                            );
                        }
                    }
                }
                let x = inputs(n, count, n as u64 + 9);
                let plans: Vec<Plan> = (0..n)
                    .map(|r| staged_all_gather(n, r, count, slice))
                    .collect();
                for (r, p) in plans.iter().enumerate() {
                    let ring = ring_all_gather(n, r, count, slice);
                    assert_eq!(frames(p), frames(&ring), "n={n} r={r}");
                    if n > 1 {
                        assert_eq!(
                            traffic(p, slice),
                            (count, (n - 1) * count, count),
                            "n={n} r={r}"
                        );
                    }
                }
                for o in simulate(plans, x.clone(), n * count, false) {
                    assert_eq!(o, x.concat(), "staged all_gather n={n} count={count}");
                }
            }
        }
    }
}

/// Each transfer's (to, length sent) and (from, length received, combine), in order.
type Step = (Option<(usize, usize)>, Option<(usize, usize, Combine)>);

/// A plan's frames: each transfer's [`Step`], in order (what a peer sees of it).
fn frames(p: &Plan) -> Vec<Step> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::Transfer(t) => Some((
                t.send.map(|(to, s)| match s {
                    Source::Device(r) => (to, r.len),
                    _ => (to, usize::MAX),
                }),
                t.recv.map(|r| (r.from, r.dst.len, r.combine)),
            )),
            _ => None,
        })
        .collect()
}

/// Elements a plan sends out of its own memory (not forwarded): its share of the link volume.
fn device_sent(plan: &Plan) -> usize {
    plan.actions
        .iter()
        .filter_map(|a| match a {
            Action::Transfer(t) => match t.send {
                Some((_, Source::Device(r))) => Some(r.len),
                _ => None,
            },
            _ => None,
        })
        .sum()
}

#[test]
fn ring_all_reduce_moves_the_bandwidth_optimal_volume() {
    // Each rank sends 2(n-1)/n of the buffer: Patarasuk and Yuan's lower bound.
    for n in [2, 4, 7] {
        let count = 7000;
        let plan = ring_all_reduce(n, 1, count, ReduceOp::Sum, true, 1 << 20);
        let sent = device_sent(&plan);
        let bound = 2 * (n - 1) * count / n;
        assert!(
            sent.abs_diff(bound) <= 2 * n,
            "n={n}: sent {sent}, bound {bound}"
        );
        assert_eq!(plan.sends(), 2 * (n - 1));
    }
}

#[test]
fn no_rank_finishes_while_another_refuses_the_call() {
    // A rank whose view of the call differs refuses the first frame it receives, and its
    // successor refuses the first frame it sends; with the plans otherwise alike (as for a
    // count, type or op disagreement), no rank may reach the end of its plan, or it would
    // return success while another fails.
    for n in 2..=16 {
        // By symmetry only the odd rank's place relative to the root matters.
        let odd = 0;
        for root in 0..n {
            for &(count, slice) in &[(0, 1), (5, 1), (17, 3), (64, 1 << 20)] {
                type Make = Box<dyn Fn(usize) -> Plan>;
                let algorithms: Vec<(&str, Make, usize)> = vec![
                    (
                        "ring all_reduce",
                        Box::new(move |r| ring_all_reduce(n, r, count, ReduceOp::Sum, true, slice)),
                        count,
                    ),
                    (
                        "central all_reduce",
                        Box::new(move |r| {
                            central_all_reduce(n, r, root, count, ReduceOp::Sum, true, slice)
                        }),
                        count,
                    ),
                    (
                        "staged all_reduce",
                        Box::new(move |r| {
                            staged_ring_all_reduce(n, r, count, ReduceOp::Sum, slice)
                        }),
                        count,
                    ),
                    (
                        "halving-doubling all_reduce",
                        Box::new(move |r| {
                            halving_doubling_all_reduce(n, r, count, ReduceOp::Sum, true, slice)
                        }),
                        count,
                    ),
                    (
                        "staged halving-doubling all_reduce",
                        Box::new(move |r| {
                            staged_halving_doubling_all_reduce(n, r, count, ReduceOp::Sum, slice)
                        }),
                        count,
                    ),
                    (
                        "naive all_reduce",
                        Box::new(move |r| {
                            naive_all_reduce(n, r, root, count, ReduceOp::Sum, slice)
                        }),
                        count,
                    ),
                    (
                        "reduce_scatter",
                        Box::new(move |r| ring_reduce_scatter(n, r, count, ReduceOp::Sum, slice)),
                        n * count,
                    ),
                    (
                        "all_gather",
                        Box::new(move |r| ring_all_gather(n, r, count, slice)),
                        n * count,
                    ),
                    (
                        "broadcast",
                        Box::new(move |r| chain_broadcast(n, r, root, count, slice)),
                        count,
                    ),
                    (
                        "reduce",
                        Box::new(move |r| chain_reduce(n, r, root, count, ReduceOp::Sum, slice)),
                        count,
                    ),
                    ("barrier", Box::new(move |r| super::ring_barrier(n, r)), 0),
                    (
                        "tree broadcast",
                        Box::new(move |r| super::tree_broadcast(n, r, root, count, slice)),
                        count,
                    ),
                    (
                        "tree reduce",
                        Box::new(move |r| {
                            super::tree_reduce(n, r, root, count, ReduceOp::Sum, slice)
                        }),
                        count,
                    ),
                    (
                        "dissemination barrier",
                        Box::new(move |r| super::dissemination_barrier(n, r)),
                        0,
                    ),
                ];
                for (name, make, len) in algorithms {
                    // Halving-doubling is not symmetric in the ranks (folding pairs, partners
                    // by bit): every rank takes its turn disagreeing.
                    let odds = if name.starts_with("halving") {
                        (0..n).collect()
                    } else {
                        vec![odd]
                    };
                    for odd in odds {
                        let plans = (0..n).map(&make).collect();
                        let x = inputs(n, len, 1);
                        let (_, finished) = simulate_with(plans, x, len, true, Some(odd));
                        let done: Vec<usize> = (0..n).filter(|&r| finished[r]).collect();
                        assert!(
                            done.is_empty(),
                            "{name} n={n} root={root} count={count} slice={slice}: rank {odd} \
                             disagrees, yet ranks {done:?} finish"
                        );
                    }
                }
            }
        }
    }
}
