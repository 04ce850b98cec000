//! Dissemination barrier (Hensgen, Finkel and Manber; MPICH's): in round k each rank sends an
//! empty frame to rank+2^k and waits for one from rank-2^k. After round k a rank has heard,
//! directly or through others, from the 2^(k+1)-1 ranks before it, so after ceil(log2 n)
//! rounds from every rank: log2 n steps against the ring's n-1.

use super::plan::{Buf, Fold, Plan, Recv, Region, Source};
use crate::types::Combine;

/// The plan of rank `rank` of `n` for a barrier.
///
/// ```
/// use wccl::algo::dissemination_barrier;
/// assert_eq!(dissemination_barrier(32, 5).sends(), 5);
/// assert_eq!(dissemination_barrier(33, 5).sends(), 6);
/// assert_eq!(dissemination_barrier(1, 0).sends(), 0);
/// ```
pub fn dissemination_barrier(n: usize, rank: usize) -> Plan {
    let mut plan = Plan::default();
    let empty = Region::new(Buf::Output, 0, 0);
    let mut d = 1usize;
    while d < n {
        plan.transfer(
            Some(((rank + d) % n, Source::Device(empty))),
            Some(Recv {
                from: (rank + n - d) % n,
                dst: empty,
                combine: Combine::Copy,
                fold: Fold::Dst,
            }),
        );
        match d.checked_mul(2) {
            Some(next) => d = next,
            None => break,
        }
    }
    plan
}
