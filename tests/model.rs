//! The probe and the cost model on real devices: figures that make sense, a model installed on
//! every rank, and `Auto` running what the installed model chooses, which changes when figures
//! make a different algorithm cheapest.

mod common;

use wccl::model::{CostModel, Figures, Probe};
use wccl::{Algorithm, CallOptions, Collective, CollectiveKind, CommGroup, ReduceOp, TensorRef};

/// Distinct per (rank, element) with period 11, exact in f32, and so are their sums.
fn value(r: usize, i: usize) -> f64 {
    ((i * 3 + r * 5) % 11) as f64 * 0.5 - 2.0 + r as f64 * 0.125
}

/// Runs an in-place `Auto` all-reduce of `count` elements on every rank, checks every rank's
/// result against the f64 sum and returns the algorithm each rank ran. The tensors are
/// mappable in place where the device allows it (`RankDevice::tensor_usages`).
fn run_auto(g: &mut CommGroup, count: usize) -> Vec<Option<Algorithm>> {
    run_auto_with(g, count, |_| true)
}

/// [`run_auto`] with each rank's tensors mappable in place or not (`STORAGE | COPY_SRC |
/// COPY_DST` only), as `mappable(rank)` says.
fn run_auto_with(
    g: &mut CommGroup,
    count: usize,
    mappable: impl Fn(usize) -> bool,
) -> Vec<Option<Algorithm>> {
    let n = g.size();
    let dtype = wccl::DType::F32;
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|r| (0..count).map(|i| value(r, i)).collect())
        .collect();
    let bufs: Vec<wgpu::Buffer> = (0..n)
        .map(|r| common::make_buffer_with(g.comm(r), dtype, &inputs[r], 0, mappable(r)))
        .collect();
    let views: Vec<TensorRef<'_>> = bufs
        .iter()
        .map(|b| TensorRef::new(b, 0, count, dtype))
        .collect();
    let calls: Vec<_> = views
        .iter()
        .map(|&v| Collective::AllReduce {
            input: v,
            output: v,
            op: ReduceOp::Sum,
        })
        .collect();
    let opts = CallOptions {
        algorithm: Some(Algorithm::Auto),
        ..CallOptions::default()
    };
    g.run(&calls, opts).expect("auto all_reduce");
    let want = common::reference(dtype, ReduceOp::Sum, &inputs);
    (0..n)
        .map(|r| {
            let got = common::read(g.comm(r), views[r]);
            common::assert_close(&format!("rank {r}, {count} elements"), &got, &want, |_| 0.0);
            g.comm(r).last_algorithm()
        })
        .collect()
}

#[test]
fn auto_runs_what_the_model_chooses() {
    let mut g = common::group(3);
    let probe = g.probe(256 << 10).expect("probe");
    assert_eq!(probe.alone.len(), 3);
    // Ranks on the same adapter share it; on distinct adapters they may not.
    let adapters = g.adapters();
    if (0..3).any(|a| (0..a).any(|b| adapters[a] == adapters[b])) {
        assert!(probe.shared, "ranks on one adapter share it: {adapters:?}");
    }
    for f in probe.alone.iter().chain([&probe.together]) {
        for v in [
            f.upload,
            f.readback,
            f.copy,
            f.reduce,
            f.host_reduce,
            f.native_copy,
        ] {
            assert!(v.is_finite() && v > 1e6, "{f:?}");
        }
        // A probe of 1 MiB or less is in cache already: no cached figure of its own.
        assert_eq!(f.host_cached, 0.0, "{f:?}");
        assert!(f.step > 0.0 && f.step < 1.0, "{f:?}");
        // The call probe's costs are differences of timings, clamped at 0 (`Rounds::solve`,
        // tested on made-up rounds in `comm::group`): here only that none is absurd, a second
        // or more for a tiny call.
        for v in [f.launch, f.call, f.frame, f.submit, f.wait] {
            assert!((0.0..1.0).contains(&v), "{f:?}");
        }
    }
    let model = g.comm(0).cost_model().cloned().expect("model installed");
    for r in 0..3 {
        assert_eq!(
            g.comm(r).cost_model(),
            Some(&model),
            "every rank holds the same model"
        );
    }
    // Where every rank's device maps tensors in place, `Auto` weighs the host-staged ring too.
    assert_eq!(
        model.unified_memory(),
        (0..3).all(|r| g.comm(r).device().unified_memory())
    );
    for count in [1usize, 1000, 300_000] {
        // Out of place or in, one choice (the call runs in place here).
        let chosen = model.choose_for(count * 4, false, model.unified_memory());
        for (r, ran) in run_auto(&mut g, count).into_iter().enumerate() {
            assert_eq!(ran, Some(chosen), "rank {r}, {count} elements");
        }
    }
}

/// A probe larger than 1 MiB, and not a multiple of it, also times the host's fold in cache
/// (`Figures::host_cached`), which the model then uses for calls of up to 1 MiB a rank.
#[test]
fn a_probe_beyond_the_cache_times_the_fold_in_it() {
    let mut g = common::group(1);
    let bytes = (1 << 20) + 4100;
    let f = g
        .comm_mut(0)
        .probe_device(bytes, &|| Ok(()))
        .expect("probe");
    assert!(f.host_cached.is_finite() && f.host_cached > 1e6, "{f:?}");
    assert!(f.host_reduce.is_finite() && f.host_reduce > 1e6, "{f:?}");
    assert_eq!(f.host_rate(1 << 20, bytes), f.host_cached);
    assert_eq!(f.host_rate(bytes, bytes), f.host_reduce);
}

/// The same figures everywhere: `rate` bytes/s for every resource, no step cost.
fn uniform(rate: f64) -> Figures {
    Figures {
        upload: rate,
        readback: rate,
        copy: rate,
        reduce: rate,
        host_reduce: rate,
        step: 0.0,
        native_copy: rate,
        frame: 0.0,
        call: 0.0,
        submit: 0.0,
        launch: 0.0,
        wait: 0.0,
        // Not measured: `host_reduce` at every size.
        host_cached: 0.0,
    }
}

/// Hand-built figures under which each algorithm is the cheapest on 3 ranks, for reasons that
/// follow from what each algorithm does (not from the model's arithmetic), then `Auto` on real
/// devices with that model installed: every rank runs the expected algorithm, and the results
/// are right. Were `choose` or `Auto` to ignore the figures, at most one case could pass.
#[test]
fn auto_follows_hand_built_figures_to_each_algorithm() {
    let mut g = common::group(3);
    let slice = g.comm(0).config().slice_bytes;
    let count = 1000;
    // Naive never reduces on the device (the host folds); ring and central do. A device
    // reduce a million times slower than anything else rules them out.
    let mut naive = uniform(1e9);
    naive.reduce = 1e3;
    naive.host_reduce = 1e12;
    // Ring never reduces on the host; central and naive do. A slow host rules them out.
    let mut ring = uniform(1e9);
    ring.host_reduce = 1e3;
    // When steps cost 1 s each and the host folds the call's 4000 bytes in 1 s (transfers
    // free): with one slice per chunk the ring takes 2(n-1) = 4 steps on each of 3 ranks;
    // halving-doubling 3 on the rank that folds a partner in (2 exchanges, and the partner's
    // buffer in); central's root 1.5 (its peers' 2 slices in, the result back: half a step
    // each) and one buffer copied on the host for the second peer (1 s); naive's root 1 step,
    // but all of its peers' buffers folded and the result copied for each on the host (4 s):
    // the busiest rank's, one after another, above the average on a shared device.
    let mut central = uniform(1e15);
    central.step = 1.0;
    central.host_reduce = (count * 4) as f64;
    let cases = [
        (naive, true, Algorithm::Naive),
        (ring, true, Algorithm::Ring),
        (ring, false, Algorithm::Ring),
        (central, true, Algorithm::Central),
    ];
    for (f, shared, want) in cases {
        let model = CostModel::new(
            Probe {
                alone: vec![f; 3],
                together: f,
                shared,
                bytes: 0,
            },
            slice,
        );
        assert_eq!(
            model.choose(count * 4, false),
            want,
            "{f:?}, shared {shared}"
        );
        for r in 0..3 {
            g.comm_mut(r).set_cost_model(model.clone());
        }
        // Plain tensors: the host-staged ring is not a candidate.
        for (r, ran) in run_auto_with(&mut g, count, |_| false)
            .into_iter()
            .enumerate()
        {
            assert_eq!(ran, Some(want), "rank {r} under {f:?}, shared {shared}");
        }
    }
    // Every rank's device maps tensors in place (the probe says so): the host-staged ring moves
    // nothing between device and host there, so where the host folds fast it beats naive
    // (which still reads back and uploads); where the host is slow, the ring stays the choice.
    // The choice rests on the model alone, the same on every rank: with tensors that cannot be
    // mapped the staged ring runs through staging buffers, still right.
    for (f, want) in [(naive, Algorithm::Staged), (ring, Algorithm::Ring)] {
        let model = CostModel::new(
            Probe {
                alone: vec![f; 3],
                together: f,
                shared: true,
                bytes: 0,
            },
            slice,
        )
        .with_unified_memory(true);
        assert_eq!(model.choose_for(count * 4, false, true), want, "{f:?}");
        for r in 0..3 {
            g.comm_mut(r).set_cost_model(model.clone());
        }
        // Every rank's tensors mappable, none, and only rank 0's: every rank runs the same
        // algorithm whatever its own tensors are.
        type Kind = (&'static str, fn(usize) -> bool);
        let kinds: [Kind; 3] = [
            ("all", |_| true),
            ("none", |_| false),
            ("rank 0's", |r| r == 0),
        ];
        for (kind, mappable) in kinds {
            let before: Vec<u64> = (0..3).map(|r| g.comm(r).mapped_calls()).collect();
            for (r, ran) in run_auto_with(&mut g, count, mappable)
                .into_iter()
                .enumerate()
            {
                assert_eq!(ran, Some(want), "rank {r}, {kind} mappable, under {f:?}");
                // In the tensors themselves exactly where they and the device allow it.
                let mapped = g.comm(r).mapped_calls() - before[r];
                let expected =
                    want == Algorithm::Staged && mappable(r) && g.comm(r).device().unified_memory();
                assert_eq!(mapped, u64::from(expected), "rank {r}, {kind} mappable");
            }
        }
    }
    // A model not made for unified-memory ranks never weighs the host-staged ring, even with
    // every rank's tensors mappable: naive, as with plain tensors.
    let model = CostModel::new(
        Probe {
            alone: vec![naive; 3],
            together: naive,
            shared: true,
            bytes: 0,
        },
        slice,
    );
    for r in 0..3 {
        g.comm_mut(r).set_cost_model(model.clone());
    }
    for (r, ran) in run_auto(&mut g, count).into_iter().enumerate() {
        assert_eq!(
            ran,
            Some(Algorithm::Naive),
            "rank {r}, a model without unified memory"
        );
    }
}

/// Reduce-scatter and all-gather under `Auto`, with hand-built figures on 3 ranks: the device
/// ring folds on the device and the staged reduce-scatter on the host, so a slow device reduce
/// picks the staged one and a slow host the ring; the staged all-gather reads back only its own
/// piece (the ring 2/3 of the output) but copies what it receives on the host, so a slow
/// read-back picks it and a slow host the ring. `Auto` on real devices runs the choice on every
/// rank, and the results are right; without a model it runs the ring.
#[test]
fn auto_reduce_scatter_and_all_gather_follow_the_model() {
    let config = wccl::CommConfig::default().algorithm(Algorithm::Auto);
    let mut g = common::group_with(3, config.clone());
    let slice = g.comm(0).config().slice_bytes;
    let mut rng = rand::rng();
    let mut slow_reduce = uniform(1e9);
    slow_reduce.reduce = 1e3;
    let mut slow_host = uniform(1e9);
    slow_host.host_reduce = 1e3;
    let mut slow_readback = uniform(1e9);
    slow_readback.readback = 1e3;
    let count = 1001;
    let cases = [
        (
            CollectiveKind::ReduceScatter,
            slow_reduce,
            Algorithm::Staged,
        ),
        (CollectiveKind::ReduceScatter, slow_host, Algorithm::Ring),
        (CollectiveKind::AllGather, slow_readback, Algorithm::Staged),
        (CollectiveKind::AllGather, slow_host, Algorithm::Ring),
    ];
    for (kind, f, want) in cases {
        let model = CostModel::new(
            Probe {
                alone: vec![f; 3],
                together: f,
                shared: false,
                bytes: 0,
            },
            slice,
        );
        // The larger tensor: 3 x 1001 f32.
        assert_eq!(
            model.choose_call(kind, 3 * count * 4, false),
            Some(want),
            "{kind:?} under {f:?}"
        );
        for r in 0..3 {
            g.comm_mut(r).set_cost_model(model.clone());
        }
        for in_place in [false, true] {
            let case = common::Case {
                kind,
                op: ReduceOp::Sum,
                dtype: wccl::DType::F32,
                count,
                in_place,
                root: 0,
                pad: 1,
            };
            common::check(&mut g, case, &mut rng);
            for r in 0..3 {
                assert_eq!(
                    g.comm(r).last_algorithm(),
                    Some(want),
                    "rank {r}, {kind:?} in place {in_place} under {f:?}"
                );
            }
        }
    }
    let mut g = common::group_with(3, config);
    for kind in [CollectiveKind::ReduceScatter, CollectiveKind::AllGather] {
        let case = common::Case {
            kind,
            op: ReduceOp::Sum,
            dtype: wccl::DType::F32,
            count,
            in_place: false,
            root: 0,
            pad: 0,
        };
        common::check(&mut g, case, &mut rng);
        for r in 0..3 {
            let ran = g.comm(r).last_algorithm();
            assert_eq!(
                ran,
                Some(Algorithm::Ring),
                "{kind:?} without a model, rank {r}"
            );
        }
    }
}

#[test]
fn ranks_that_pick_different_algorithms_get_a_mismatch() {
    let mut g = common::group(2);
    let bufs: Vec<_> = (0..2)
        .map(|r| g.comm(r).upload(&[1.0f32; 64]).unwrap())
        .collect();
    let results = g.run_each(|c| {
        let algorithm = if c.rank() == 0 {
            Algorithm::Ring
        } else {
            Algorithm::Central
        };
        let b = bufs[c.rank()].view();
        c.run(
            Collective::AllReduce {
                input: b,
                output: b,
                op: ReduceOp::Sum,
            },
            CallOptions {
                algorithm: Some(algorithm),
                ..CallOptions::default()
            },
        )
    });
    let text: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
    assert!(results.iter().all(|r| r.is_err()), "{text:?}");
    assert!(text.iter().any(|t| t.contains("algorithm")), "{text:?}");
}

/// A group whose links emulate a network gets a model with that network's terms from the
/// probe, and `Auto` runs what that model chooses: over a 1 MB/s link, where the link is all
/// that counts at 1 MiB, never the star (the critical path through its root's egress carries
/// n buffers, the ring's and, at a power of two, halving-doubling's 2(n-1)/n of one).
#[test]
fn an_emulated_network_reaches_the_model_and_auto() {
    use wccl::link::{LinkEmulation, LinkStack};
    use wccl::model::LinkCost;
    let emu = LinkEmulation {
        gbps: 0.001,
        latency_us: 40.0,
        jitter_us: 20.0,
    };
    let mut g = common::group_linked(
        4,
        wccl::CommConfig::default(),
        LinkStack::new().emulate(emu),
    );
    g.probe(64 << 10).expect("probe");
    let model = g.comm(0).cost_model().cloned().expect("model installed");
    assert_eq!(
        model.link(),
        Some(LinkCost {
            gbps: 0.001,
            latency_us: 50.0
        })
    );
    let bytes = 1 << 20;
    let chosen = model.choose_for(bytes, false, model.unified_memory());
    assert!(
        !matches!(chosen, Algorithm::Naive | Algorithm::Central),
        "{chosen:?}"
    );
    let free = model.clone().with_link(None);
    let p = model.predict(Algorithm::Naive, bytes, false);
    assert!(
        p.seconds > free.predict(Algorithm::Naive, bytes, false).seconds + 2.0,
        "{p:?}"
    );
    // The call itself, small enough for the emulated link to carry in a moment.
    let count = 300;
    let small = model.choose_for(count * 4, false, model.unified_memory());
    for (r, ran) in run_auto(&mut g, count).into_iter().enumerate() {
        assert_eq!(ran, Some(small), "rank {r}");
    }
}

/// The probe of a job of one rank per process (`Communicator::probe`), here over in-process
/// links that emulate a slow network: every rank installs the same model, whose link is
/// measured, not configured; it cannot beat the emulation (a message takes at least its
/// latency, a byte at least its share of the bandwidth); `Auto` then runs the same algorithm on
/// every rank, and right.
#[test]
fn a_job_probe_measures_the_links_and_every_rank_holds_its_model() {
    use wccl::link::{LinkEmulation, LinkStack};
    let emu = LinkEmulation {
        gbps: 0.02,
        latency_us: 1500.0,
        jitter_us: 0.0,
    };
    let n = 3;
    let mut g = common::group_linked(
        n,
        wccl::CommConfig::default().timeout(std::time::Duration::from_secs(60)),
        LinkStack::new().emulate(emu),
    );
    assert!((0..n).all(|r| g.comm(r).cost_model().is_none()));
    let probes: Vec<Probe> = g
        .run_each(|c| c.probe(256 << 10))
        .into_iter()
        .collect::<wccl::Result<_>>()
        .expect("every rank's probe");
    let models: Vec<CostModel> = (0..n)
        .map(|r| {
            g.comm(r)
                .cost_model()
                .cloned()
                .expect("a model on every rank")
        })
        .collect();
    for r in 1..n {
        assert_eq!(models[r], models[0], "rank {r}'s model");
        assert_eq!(probes[r], probes[0], "rank {r}'s probe");
    }
    let p = &probes[0];
    assert_eq!(p.alone.len(), n);
    assert!(
        p.alone.iter().all(|f| f.upload > 0.0 && f.step > 0.0),
        "{p:?}"
    );
    // Ranks share an adapter where two of them run on the same one (one host here).
    let infos = g.adapters();
    let key = |i: &wgpu::AdapterInfo| {
        (
            i.name.clone(),
            i.backend,
            i.vendor,
            i.device,
            i.device_pci_bus_id.clone(),
        )
    };
    let same = (0..n).any(|a| (0..a).any(|b| key(&infos[a]) == key(&infos[b])));
    assert_eq!(p.shared, same, "{p:?}");
    let link = models[0].link().expect("a measured link");
    // Each hop takes the latency and the token's time on the wire: strictly more.
    assert!(
        link.latency_us > emu.latency_us,
        "a message in {} us, under the emulated {} us",
        link.latency_us,
        emu.latency_us
    );
    // Its egress: what crosses in a round less a latency (noise in both: a loose bound).
    assert!(
        link.gbps > 0.0 && link.gbps <= 1.25 * emu.gbps,
        "{} GB/s over a link of {} GB/s",
        link.gbps,
        emu.gbps
    );
    let count = 300;
    let chosen = models[0].choose_for(count * 4, false, models[0].unified_memory());
    for (r, ran) in run_auto(&mut g, count).into_iter().enumerate() {
        assert_eq!(ran, Some(chosen), "rank {r}");
    }
}

/// A rank that runs a collective while the others probe the job, at the probe's start (its
/// first barrier) and in its first link step (after that barrier, every rank's size goes
/// round in a token): every rank fails, none by its deadline (no `Timeout`), and every
/// communicator is broken after. In the link step the rank in the call names the probe it
/// met, and the others hear it.
#[test]
fn a_rank_in_another_call_fails_the_job_probe_everywhere() {
    let n = 3;
    for barriers in [0, 1] {
        let mut g = common::group_linked(
            n,
            wccl::CommConfig::default().timeout(std::time::Duration::from_secs(120)),
            wccl::link::LinkStack::new(),
        );
        let results = g.run_each(|c| {
            if c.rank() == 1 {
                for _ in 0..barriers {
                    c.barrier()?;
                }
                let b = c.upload(&[1f32; 16])?;
                if barriers == 0 {
                    c.all_reduce(&b, ReduceOp::Sum)?;
                } else {
                    // A chain broadcast from rank 0: rank 1 first waits for rank 0's frame,
                    // which is the probe's latency token.
                    c.broadcast(&b, 0)?;
                }
                Ok(None)
            } else {
                c.probe(64 << 10).map(Some)
            }
        });
        for (r, res) in results.iter().enumerate() {
            match (barriers, r, res) {
                (0, _, Err(wccl::Error::Mismatch { .. } | wccl::Error::PeerAborted { .. })) => {}
                (
                    1,
                    1,
                    Err(wccl::Error::Mismatch {
                        field,
                        theirs,
                        peer: 0,
                        ..
                    }),
                ) => {
                    assert_eq!(
                        (*field, theirs.as_str()),
                        ("call", "the job's probe (Communicator::probe)")
                    );
                }
                (
                    1,
                    _,
                    Err(wccl::Error::PeerAborted {
                        peer: 1, reason, ..
                    }),
                ) => {
                    assert!(reason.contains("probe"), "rank {r}: {reason}");
                }
                other => panic!("{barriers} barriers, rank {r}: {other:?}"),
            }
            assert!(g.comm(r).broken().is_some(), "rank {r} is not broken");
        }
    }
}

/// Ranks that probe with different sizes: the rank that meets rank 0's size in the latency
/// token fails naming rank 0 and the field, the others hear it from that rank; nobody runs
/// on to a model of its own.
#[test]
fn ranks_that_probe_different_sizes_fail_naming_who_differs() {
    let n = 3;
    let mut g = common::group_linked(
        n,
        wccl::CommConfig::default().timeout(std::time::Duration::from_secs(120)),
        wccl::link::LinkStack::new(),
    );
    let results = g.run_each(|c| c.probe(if c.rank() == 1 { 128 << 10 } else { 64 << 10 }));
    for (r, res) in results.iter().enumerate() {
        match (r, res) {
            (
                1,
                Err(wccl::Error::Mismatch {
                    peer: 0,
                    field,
                    ours,
                    theirs,
                    at,
                }),
            ) => {
                assert_eq!(
                    (*field, ours.as_str(), theirs.as_str()),
                    ("probe bytes", "131072", "65536")
                );
                assert_eq!(at.op, None, "in the probe's first link step");
            }
            (
                0 | 2,
                Err(wccl::Error::PeerAborted {
                    peer: 1, reason, ..
                }),
            ) => {
                assert!(reason.contains("probe bytes"), "rank {r}: {reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(g.comm(r).cost_model().is_none(), "rank {r} holds a model");
        assert!(g.comm(r).broken().is_some(), "rank {r} is not broken");
    }
}

/// A rank that dies in each of the probe's link phases (the latency token, the egress round):
/// every survivor fails there (not in a call: `at.op` is `None`), naming the dead rank, and
/// is broken.
#[test]
fn a_rank_that_dies_in_the_link_phases_is_named_by_every_survivor() {
    use wccl::link::{FaultPlan, LinkStack};
    // Rank 1 sends 21 frames before the latency token (10 barriers of 2 frames, the size's lap
    // of 1), then 24 tokens, then 8 frames of 64 KiB in the egress phase.
    for frames in [21, 32, 46] {
        let faults = FaultPlan::new();
        faults.kill_after(1, frames);
        let mut g = common::group_linked(
            3,
            wccl::CommConfig::default().timeout(std::time::Duration::from_secs(60)),
            LinkStack::new().faults(faults),
        );
        let results = g.run_each(|c| c.probe(64 << 10));
        for r in [0, 2] {
            let e = results[r].as_ref().expect_err("a survivor's probe fails");
            assert_eq!(
                e.at().and_then(|a| a.op),
                None,
                "{frames} frames, rank {r}: {e}"
            );
            let names_it = match e {
                wccl::Error::LinkClosed { peer, .. } | wccl::Error::PeerExited { peer, .. } => {
                    *peer == 1
                }
                wccl::Error::PeerAborted { reason, .. } => reason.contains("rank 1"),
                wccl::Error::Timeout { waiting_on, .. } => waiting_on == &[1],
                _ => false,
            };
            assert!(names_it, "{frames} frames, rank {r}: {e}");
            assert!(g.comm(r).broken().is_some(), "rank {r} is not broken");
        }
    }
}
