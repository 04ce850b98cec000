//! The API's promises beyond the collectives' results: an abort handle that a watchdog thread
//! fires, out-of-place broadcast and reduce (no output off the root), `write` on the
//! communicator, a builder whose `config` keeps earlier settings, `Auto` without a probe, real
//! error types, `comm`/`comm_mut`/`get`, and the thread-safety of the public handles.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use wccl::{
    AbortHandle, Algorithm, CommConfig, CommGroup, Communicator, DeviceBuffer, Error, ReduceOp,
    TensorRef,
};

/// The deadline of every call here: an abort must end a call long before it.
const DEADLINE: Duration = Duration::from_secs(30);
const RANKS: usize = 3;
const LEN: usize = 1000;

fn group(n: usize) -> CommGroup {
    common::group_with(n, CommConfig::default().timeout(DEADLINE))
}

/// Rank `r`'s input: distinct per (rank, element) over a period of 7 (not a power of two),
/// small integers, so that every sum is exact in f32.
fn input(r: usize) -> Vec<f32> {
    (0..LEN).map(|i| (r * 10 + i % 7) as f32).collect()
}

/// The element-wise sum of every rank's input, in f64 on the host.
fn host_sum(n: usize) -> Vec<f64> {
    (0..LEN)
        .map(|i| (0..n).map(|r| f64::from(input(r)[i])).sum())
        .collect()
}

fn assert_equal(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(f64::from(g) == w, "{what}: element {i} is {g}, want {w}");
    }
}

fn poisoned(comm: &Communicator) -> DeviceBuffer<f32> {
    comm.upload(&vec![f32::NAN; LEN]).expect("poisoned output")
}

#[test]
fn the_public_handles_are_thread_safe() {
    fn assert_sync<T: Send + Sync + Clone + std::fmt::Debug>() {}
    fn assert_send_sync<T: Send + Sync + std::fmt::Debug>() {}
    assert_sync::<AbortHandle>();
    assert_send_sync::<Communicator>();
    assert_send_sync::<CommGroup>();
    assert_send_sync::<Error>();
}

/// NCCL's watchdog pattern: rank 2 never calls, ranks 0 and 1 wait in an all-reduce, and a
/// watchdog thread fires rank 1's handle. Both waiting ranks must leave with the abort as the
/// cause (not at their 30 s deadline with a timeout), and rank 2's next call fails at once too.
#[test]
fn a_watchdog_aborts_ranks_waiting_for_a_rank_that_never_calls() {
    let mut comms = group(RANKS).into_communicators();
    let absent = comms.pop().expect("rank 2");
    let watchdog = comms[1].abort_handle();
    assert!(!watchdog.is_aborted());
    let (entering, entered) = mpsc::channel();
    let started = Instant::now();
    let results: Vec<wccl::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter_mut()
            .map(|comm| {
                let entering = entering.clone();
                s.spawn(move || {
                    let buf = comm.upload(&input(comm.rank()))?;
                    // Told just before the call; whether the abort lands before or during the
                    // wait, the outcome must be the same.
                    let _ = entering.send(());
                    comm.all_reduce(&buf, ReduceOp::Sum)
                })
            })
            .collect();
        s.spawn(move || {
            for _ in 0..2 {
                let _ = entered.recv_timeout(DEADLINE);
            }
            // The watchdog's own patience, not a wait for a race to settle.
            std::thread::sleep(Duration::from_millis(200));
            watchdog.abort("watchdog: no progress");
            watchdog.abort("a second abort is ignored");
        });
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank's thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    match &results[1] {
        Err(Error::Aborted { at, reason }) => {
            assert_eq!(at.rank, 1);
            assert_eq!(at.seq, 1);
            assert_eq!(reason, "watchdog: no progress");
        }
        other => panic!("rank 1: {other:?}"),
    }
    match &results[0] {
        Err(Error::PeerAborted {
            at,
            peer: 1,
            reason,
        }) => {
            assert_eq!(at.rank, 0);
            assert!(reason.contains("no progress"), "{reason}");
        }
        other => panic!("rank 0: {other:?}"),
    }
    // The causes above already rule out the deadline (it gives `Timeout`); this only says so.
    assert!(elapsed < DEADLINE, "took {elapsed:?}");
    // The communicator stays broken, its cause the abort, reachable as the error's source.
    let e = comms[1].barrier().expect_err("broken after the abort");
    let source = std::error::Error::source(&e).expect("Broken has its cause as source");
    assert!(source.to_string().contains("no progress"), "{source}");
    // Rank 2 was told too: its first call fails without waiting for anyone.
    let mut absent = absent;
    let buf = absent.upload(&input(2)).expect("upload");
    let t = Instant::now();
    let e = absent
        .all_reduce(&buf, ReduceOp::Sum)
        .expect_err("rank 2 was told of the abort");
    assert!(matches!(e, Error::PeerAborted { peer: 1, .. }), "{e}");
    assert!(t.elapsed() < DEADLINE, "took {:?}", t.elapsed());
}

/// A handle fired between calls fails the next call at once on its rank, its peers are told,
/// and a group rebuilt in place afterwards (with `&mut`) computes exactly again.
#[test]
fn an_abort_between_calls_fails_the_next_call_and_rebuild_recovers() {
    let mut g = group(2);
    let bufs: Vec<_> = (0..2)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let handle = g.comm(0).abort_handle();
    handle.abort("operator asked");
    assert!(handle.is_aborted());
    assert_eq!(handle.rank(), 0);
    let views: Vec<TensorRef<'_>> = bufs.iter().map(|b| b.view()).collect();
    let res = g.run_each(|c| c.all_reduce(views[c.rank()], ReduceOp::Sum));
    assert!(
        matches!(&res[0], Err(Error::Aborted { at, .. }) if at.rank == 0),
        "{:?}",
        res[0]
    );
    assert!(
        matches!(&res[1], Err(Error::PeerAborted { peer: 0, .. })),
        "{:?}",
        res[1]
    );
    g.rebuild();
    for (r, b) in bufs.iter().enumerate() {
        g.comm(r).write(b, &input(r)).expect("reset the input");
    }
    g.all_reduce(&views, ReduceOp::Sum).expect("after rebuild");
    for (r, b) in bufs.iter().enumerate() {
        let got = g.comm(r).download(b).expect("download");
        assert_equal(&format!("rank {r}"), &got, &host_sum(2));
    }
}

/// Out-of-place reduce from one thread per rank: only the root passes an output; every
/// input is left as it was.
#[test]
fn reduce_into_needs_an_output_on_the_root_only() {
    let root = 1;
    let mut g = group(RANKS);
    let inputs: Vec<_> = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let output = poisoned(g.comm(root));
    let res = g.run_each(|c| {
        let out = (c.rank() == root).then(|| output.view());
        c.reduce_into(&inputs[c.rank()], out, ReduceOp::Sum, root)
    });
    for (r, x) in res.into_iter().enumerate() {
        x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
    }
    let got = g.comm(root).download(&output).expect("download");
    assert_equal("root's output", &got, &host_sum(RANKS));
    for (r, b) in inputs.iter().enumerate() {
        let got = g.comm(r).download(b).expect("download");
        let want: Vec<f64> = input(r).into_iter().map(f64::from).collect();
        assert_equal(&format!("rank {r}'s input"), &got, &want);
    }
    // The group call: the root's output only.
    let output = poisoned(g.comm(0));
    let views: Vec<_> = inputs.iter().map(|b| b.view()).collect();
    g.reduce_into(&views, output.view(), ReduceOp::Sum, 0)
        .expect("group reduce_into");
    let got = g.comm(0).download(&output).expect("download");
    assert_equal("group root's output", &got, &host_sum(RANKS));
}

/// A root without an output fails the call, and its peers learn it from the root instead of
/// waiting for their deadline.
#[test]
fn a_root_without_an_output_fails_every_rank_promptly() {
    let mut g = group(RANKS);
    let inputs: Vec<_> = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let res = g.run_each(|c| c.reduce_into(&inputs[c.rank()], None, ReduceOp::Sum, 2));
    assert!(
        matches!(&res[2], Err(Error::InvalidArgument { at, .. }) if at.rank == 2 && at.seq == 1),
        "{:?}",
        res[2]
    );
    for r in [0, 1] {
        assert!(
            matches!(&res[r], Err(Error::PeerAborted { peer: 2, .. })),
            "rank {r}: {:?}",
            res[r]
        );
    }
}

#[test]
fn broadcast_into_fills_every_output_from_the_root() {
    let root = 2;
    let mut g = group(RANKS);
    let inputs: Vec<_> = (0..RANKS)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let want: Vec<f64> = input(root).into_iter().map(f64::from).collect();
    // One thread per rank: non-root ranks name their output as the (unread) input.
    let outputs: Vec<_> = (0..RANKS).map(|r| poisoned(g.comm(r))).collect();
    let res = g.run_each(|c| {
        let r = c.rank();
        c.broadcast_into(&inputs[r], &outputs[r], root)
    });
    for (r, x) in res.into_iter().enumerate() {
        x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        let got = g.comm(r).download(&outputs[r]).expect("download");
        assert_equal(&format!("rank {r}"), &got, &want);
    }
    // The group call: the root's input, everyone's output.
    let outputs: Vec<_> = (0..RANKS).map(|r| poisoned(g.comm(r))).collect();
    let views: Vec<_> = outputs.iter().map(|b| b.view()).collect();
    g.broadcast_into(inputs[root].view(), &views, root)
        .expect("group broadcast_into");
    for (r, b) in outputs.iter().enumerate() {
        let got = g.comm(r).download(b).expect("download");
        assert_equal(&format!("group rank {r}"), &got, &want);
    }
    let kept = g.comm(root).download(&inputs[root]).expect("download");
    assert_equal("root's input", &kept, &want);
}

#[test]
fn write_goes_through_the_communicator() {
    let g = group(1);
    let comm = g.comm(0);
    let buf = poisoned(comm);
    comm.write(&buf, &input(0)).expect("write");
    let want: Vec<f64> = input(0).into_iter().map(f64::from).collect();
    assert_equal("written", &comm.download(&buf).expect("download"), &want);
    let e = comm.write(&buf, &[1.0; 3]).expect_err("wrong length");
    assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
}

#[test]
fn config_keeps_the_builders_earlier_settings() {
    let config = CommConfig::default()
        .algorithm(Algorithm::Central)
        .pipeline_depth(2);
    let b = CommGroup::builder()
        .timeout(Duration::from_secs(7))
        .slice_bytes(4096)
        .config(config);
    let s = b.settings();
    assert_eq!(s.timeout, Duration::from_secs(7));
    assert_eq!(s.slice_bytes, 4096);
    assert_eq!(s.algorithm, Algorithm::Central);
    assert_eq!(s.pipeline_depth, 2);
    // Later ones win as well, and the group gets them.
    let g = b.timeout(Duration::from_secs(9)).build().expect("group");
    assert_eq!(g.comm(1).config().timeout, Duration::from_secs(9));
    assert_eq!(g.comm(1).config().slice_bytes, 4096);
    assert_eq!(g.comm(1).config().algorithm, Algorithm::Central);
}

#[test]
fn auto_without_a_probe_runs_and_reports_the_ring() {
    let mut g = common::group_with(2, CommConfig::default().algorithm(Algorithm::Auto));
    assert!(g.comm(0).cost_model().is_none());
    let bufs: Vec<_> = (0..2)
        .map(|r| g.comm(r).upload(&input(r)).expect("upload"))
        .collect();
    let views: Vec<_> = bufs.iter().map(|b| b.view()).collect();
    g.all_reduce(&views, ReduceOp::Sum).expect("all_reduce");
    for r in 0..2 {
        assert_eq!(g.comm(r).last_algorithm(), Some(Algorithm::Ring));
    }
}

#[test]
fn parse_errors_and_lookups_are_plain_values() {
    let e = "bogus".parse::<Algorithm>().expect_err("not an algorithm");
    let e: Box<dyn std::error::Error + Send + Sync> = Box::new(e);
    assert!(e.to_string().contains("'bogus'"), "{e}");
    assert_eq!("auto".parse::<Algorithm>(), Ok(Algorithm::Auto));
    let mut g = group(2);
    assert!(g.get(2).is_none());
    assert!(g.get_mut(2).is_none());
    assert_eq!(g.get(1).map(Communicator::rank), Some(1));
    g.comm_mut(1).set_timeout(Duration::from_secs(3));
    assert_eq!(g.comm(1).config().timeout, Duration::from_secs(3));
}
