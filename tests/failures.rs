//! Calls that must fail cleanly: ranks that disagree about the call, a rank that never arrives,
//! a rank that is gone, bad arguments, an adapter that does not exist (f16 without SHADER_F16
//! is no failure: tests/half.rs runs it).
//! Every rank must return an error naming the operation and its sequence number, promptly.

mod common;

use std::time::{Duration, Instant};

use wccl::{
    AdapterSelector, CallOptions, Collective, CollectiveKind, CommConfig, CommGroup, Communicator,
    DType, Error, ReduceOp, TensorRef,
};

fn comms(n: usize, timeout: Duration) -> Vec<Communicator> {
    common::group_with(n, CommConfig::default().timeout(timeout)).into_communicators()
}

/// Runs `f(comm)` on every rank's own thread and returns each rank's result and duration.
fn per_rank<R: Send>(
    comms: &mut [Communicator],
    f: impl Fn(&mut Communicator) -> wccl::Result<R> + Sync,
) -> Vec<(wccl::Result<R>, Duration)> {
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let t = Instant::now();
                    let r = f(c);
                    (r, t.elapsed())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

/// Every rank fails, none returns `Ok`, each with an error naming the collective and sequence
/// 1, and at least one reports a mismatch on `field`. They fail because of the disagreement,
/// not by the deadline: a `Timeout` is refused (the callers' deadline is a minute). Every
/// communicator is broken afterwards, its next call naming call #1.
fn expect_mismatch(
    comms: &mut [Communicator],
    results: Vec<(wccl::Result<()>, Duration)>,
    kind: CollectiveKind,
    field: &str,
) {
    let mut saw = false;
    for (r, (res, _)) in results.into_iter().enumerate() {
        let e = match res {
            Ok(()) => panic!("rank {r} returned Ok from a call its peers disagree on"),
            Err(e) => e,
        };
        let at = e.at().expect("the error names a rank");
        assert_eq!(at.rank, r);
        assert_eq!(at.op, Some(kind), "{e}");
        assert_eq!(at.seq, 1, "{e}");
        match &e {
            Error::Mismatch { field: f, .. } if f.contains(field) => saw = true,
            Error::Mismatch { .. } | Error::PeerAborted { .. } => {}
            other => panic!("unexpected error on rank {r}: {other}"),
        }
        let next = comms[r]
            .barrier()
            .expect_err("the next call after a failed one fails");
        assert!(
            matches!(next, Error::Broken { .. })
                && next.to_string().contains(&format!("{kind} #1")),
            "rank {r}: {next}"
        );
    }
    assert!(saw, "no rank reported a mismatch on {field}");
}

#[test]
fn mismatched_lengths_types_ops_collectives_and_roots() {
    let timeout = Duration::from_secs(60);
    // Lengths.
    let mut c = comms(3, timeout);
    let r = per_rank(&mut c, |c| {
        let b = c.buffer::<f32>(100 + c.rank() % 2)?;
        c.all_reduce(&b, ReduceOp::Sum)
    });
    expect_mismatch(&mut c, r, CollectiveKind::AllReduce, "count");
    // Element types.
    let mut c = comms(3, timeout);
    let r = per_rank(&mut c, |c| {
        if c.rank() == 1 {
            let b = c.buffer::<i32>(64)?;
            c.all_reduce(&b, ReduceOp::Sum)
        } else {
            let b = c.buffer::<f32>(64)?;
            c.all_reduce(&b, ReduceOp::Sum)
        }
    });
    expect_mismatch(&mut c, r, CollectiveKind::AllReduce, "element type");
    // Ops.
    let mut c = comms(2, timeout);
    let r = per_rank(&mut c, |c| {
        let b = c.buffer::<f32>(64)?;
        let op = if c.rank() == 0 {
            ReduceOp::Sum
        } else {
            ReduceOp::Max
        };
        c.all_reduce(&b, op)
    });
    expect_mismatch(&mut c, r, CollectiveKind::AllReduce, "reduce op");
    // Roots.
    let mut c = comms(3, timeout);
    let r = per_rank(&mut c, |c| {
        let b = c.buffer::<u32>(10)?;
        c.broadcast(&b, c.rank().min(1))
    });
    expect_mismatch(&mut c, r, CollectiveKind::Broadcast, "root");
}

#[test]
fn mismatched_collectives() {
    let mut c = comms(2, Duration::from_secs(60));
    let results = per_rank(&mut c, |c| {
        let b = c.buffer::<f32>(16)?;
        if c.rank() == 0 {
            c.all_reduce(&b, ReduceOp::Sum)
        } else {
            c.broadcast(&b, 0)
        }
    });
    let mut saw = false;
    for (res, _) in results {
        match res {
            Err(Error::Mismatch {
                field: "collective",
                ..
            }) => saw = true,
            Err(Error::Mismatch { .. } | Error::PeerAborted { .. }) => {}
            other => panic!("unexpected result {other:?}"),
        }
    }
    assert!(saw);
}

#[test]
fn a_rank_that_never_arrives_times_out_everyone_within_the_deadline() {
    let deadline = Duration::from_millis(1500);
    let mut c = comms(4, deadline);
    let (done_tx, done_rx) = crossbeam::channel::bounded::<()>(0);
    let results = std::thread::scope(|s| {
        let mut hs = Vec::new();
        for comm in c.iter_mut() {
            let done_rx = done_rx.clone();
            hs.push(s.spawn(move || {
                let t = Instant::now();
                if comm.rank() == 2 {
                    // Alive, holding its links open, but never calling: wait for the others.
                    let _ = done_rx.recv();
                    return None;
                }
                let b = comm.buffer::<f32>(4096).ok()?;
                // A first call that works, so the failing one is sequence number 2.
                Some((
                    comm.barrier().map(|_| comm.all_reduce(&b, ReduceOp::Sum)),
                    t.elapsed(),
                ))
            }));
        }
        // Join the callers first, then release rank 2.
        let mut out: Vec<_> = Vec::new();
        let mut holder = None;
        for (r, h) in hs.into_iter().enumerate() {
            if r == 2 {
                holder = Some(h);
            } else {
                out.push(h.join().expect("thread"));
            }
        }
        drop(done_tx);
        if let Some(h) = holder {
            out.insert(2, h.join().expect("thread"));
        }
        out
    });
    // The barrier fails (rank 2 never arrives): it is sequence 1.
    for (r, res) in results.into_iter().enumerate() {
        let Some((res, took)) = res else { continue };
        let e = res.expect_err("must fail");
        // Within a generous multiple of the deadline: never a hang, on a loaded machine too.
        assert!(took < deadline * 10, "rank {r} returned after {took:?}");
        let at = e.at().expect("rank");
        assert_eq!(
            (at.rank, at.op, at.seq),
            (r, Some(CollectiveKind::Barrier), 1),
            "{e}"
        );
        if r == 3 {
            // Rank 3 waits on rank 2 directly.
            match &e {
                Error::Timeout { waiting_on, .. } => {
                    assert_eq!(waiting_on, &vec![2]);
                    // Not before its deadline.
                    assert!(took >= deadline, "rank 3 gave up after {took:?}");
                }
                other => panic!("rank 3 should time out waiting on rank 2: {other}"),
            }
        }
        // Every rank's error leads to the rank that never came.
        assert!(e.to_string().contains("rank(s) [2]"), "rank {r}: {e}");
    }
    // The communicators are broken now, and say so.
    let e = c[0].barrier().expect_err("broken");
    assert!(matches!(e, Error::Broken { .. }), "{e}");
    // Rebuilt, the group works again.
    let mut g = CommGroup::rebuild_from(c);
    g.barrier().expect("barrier after rebuild");
}

#[test]
fn a_rank_that_is_gone_is_reported_at_once() {
    let mut c = comms(3, Duration::from_secs(60));
    drop(c.pop()); // rank 2's communicator is dropped: its links close
    let results = per_rank(&mut c, |c| {
        let b = c.buffer::<f32>(100)?;
        c.all_reduce(&b, ReduceOp::Sum)
    });
    // At once: by the closed link (or a peer's abort), not by the minute's deadline.
    for (res, _) in results {
        let e = res.expect_err("must fail");
        assert!(
            matches!(
                e,
                Error::LinkClosed { peer: 2, .. } | Error::PeerAborted { .. }
            ),
            "{e}"
        );
    }
}

#[test]
fn per_call_deadline_overrides_the_default() {
    let mut c = comms(2, Duration::from_secs(600));
    let t = Instant::now();
    let e = c[0]
        .run(
            Collective::Barrier,
            CallOptions::timeout(Duration::from_millis(300)),
        )
        .expect_err("rank 1 never calls");
    // The call waited its own 300 ms, not the default 600 s: at least the one, and well
    // under a tenth of the other (200 times the per-call deadline).
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(60),
        "{took:?}"
    );
    assert!(
        matches!(e, Error::Timeout { ref waiting_on, .. } if waiting_on == &vec![1]),
        "{e}"
    );
}

#[test]
fn bad_arguments_are_refused_without_touching_data() {
    let cases: Vec<(&str, usize)> = vec![
        ("elements", 0),
        ("ranks", 1),
        ("overlap", 2),
        ("root", 3),
        ("multiple", 4),
        ("fit", 5),
    ];
    for (words, which) in cases {
        // Each refused call breaks its communicator, so every case gets a fresh one.
        let mut g = common::group(1);
        let c = g.comm_mut(0);
        let a = c.upload(&[1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let b = c.buffer::<f32>(3).unwrap();
        let call = match which {
            0 => Collective::AllReduce {
                input: a.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            },
            1 => Collective::ReduceScatter {
                input: a.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            },
            2 => Collective::AllReduce {
                input: a.range(0, 3),
                output: a.range(1, 3),
                op: ReduceOp::Sum,
            },
            3 => Collective::Broadcast {
                input: a.view(),
                output: a.view(),
                root: 7,
            },
            4 => Collective::AllReduce {
                input: TensorRef::new(a.raw(), 2, 1, DType::F32),
                output: TensorRef::new(a.raw(), 2, 1, DType::F32),
                op: ReduceOp::Sum,
            },
            _ => Collective::AllReduce {
                input: a.range(2, 4),
                output: a.range(2, 4),
                op: ReduceOp::Sum,
            },
        };
        let e = c
            .run(call, CallOptions::default())
            .expect_err("must be refused");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(
            e.to_string().contains(words),
            "'{e}' should mention '{words}'"
        );
        // Nothing was written.
        assert_eq!(c.download(&a).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }
}

#[test]
fn a_refused_call_on_one_rank_aborts_the_others_promptly() {
    let mut c = comms(2, Duration::from_secs(60));
    let results = per_rank(&mut c, |c| {
        let b = c.buffer::<f32>(8)?;
        let root = if c.rank() == 0 { 9 } else { 0 };
        c.broadcast(&b, root)
    });
    assert!(matches!(results[0].0, Err(Error::InvalidArgument { .. })));
    match &results[1] {
        // Promptly: by rank 0's abort (not a timeout, the deadline being a minute).
        (
            Err(Error::PeerAborted {
                peer: 0, reason, ..
            }),
            _,
        ) => {
            assert!(reason.contains("root"), "{reason}");
        }
        other => panic!("rank 1 should see rank 0's abort: {other:?}"),
    }
}

#[test]
fn an_adapter_name_that_matches_nothing() {
    let e = CommGroup::builder()
        .adapters(AdapterSelector::default().name("no-such-gpu-3000"))
        .build()
        .expect_err("must fail");
    match e {
        Error::NoAdapter { wanted, found } => {
            assert!(wanted.contains("no-such-gpu-3000"));
            assert!(!found.is_empty());
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn local_takes_one_adapter_of_the_host_and_refuses_one_past_the_end() {
    let all = wccl::device::discover(&AdapterSelector::default()).expect("discover");
    let key = |i: &wgpu::AdapterInfo| (i.name.clone(), i.backend, i.device_pci_bus_id.clone());
    for (i, adapter) in all.iter().enumerate() {
        let g = CommGroup::builder()
            .ranks(2)
            .adapters(AdapterSelector::default().local(i))
            .build()
            .expect("build on one local adapter");
        for info in g.adapters() {
            assert_eq!(key(&info), key(&adapter.get_info()));
        }
    }
    let n = all.len();
    let e = CommGroup::builder()
        .adapters(AdapterSelector::default().local(n))
        .build()
        .expect_err("one past the host's adapters must fail");
    match e {
        Error::NoAdapter { wanted, .. } => {
            assert!(
                wanted.contains(&format!("local adapter {n} (the host has {n})")),
                "{wanted}"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_lost_device_is_an_error_value_not_a_panic() {
    let mut g = common::group(1);
    let input = g.comm(0).upload(&[1.0f32; 64]).unwrap();
    let output = g.comm(0).buffer::<f32>(64).unwrap();
    g.comm(0).device().device().destroy();
    let e = g
        .comm_mut(0)
        .all_reduce_into(&input, &output, ReduceOp::Sum)
        .expect_err("a destroyed device cannot run a collective");
    assert!(matches!(e, Error::Device { .. }), "{e}");
    assert_eq!(e.rank(), Some(0));
}
