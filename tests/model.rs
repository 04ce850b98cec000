//! The probe and the cost model on real devices: figures that make sense, a model installed on
//! every rank, and `Auto` running what the model predicts fastest.

mod common;

use wccl::{Algorithm, CallOptions, Collective, ReduceOp};

#[test]
fn auto_runs_what_the_model_chooses() {
    let mut g = common::group(3);
    let probe = g.probe(256 << 10).expect("probe");
    assert_eq!(probe.alone.len(), 3);
    assert!(probe.shared, "in CI every rank shares the software adapter");
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
        assert!(f.step > 0.0 && f.step < 1.0, "{f:?}");
    }
    let model = g.comm(0).cost_model().cloned().expect("model installed");
    for r in 0..3 {
        assert_eq!(
            g.comm(r).cost_model(),
            Some(&model),
            "every rank holds the same model"
        );
    }
    for count in [1usize, 1000, 300_000] {
        let bufs: Vec<_> = (0..3)
            .map(|r| g.comm(r).upload(&vec![1.0f32; count]).unwrap())
            .collect();
        let calls: Vec<_> = bufs
            .iter()
            .map(|b| Collective::AllReduce {
                input: b.view(),
                output: b.view(),
                op: ReduceOp::Sum,
            })
            .collect();
        let opts = CallOptions {
            algorithm: Some(Algorithm::Auto),
            ..CallOptions::default()
        };
        g.run(&calls, opts).expect("auto all_reduce");
        let chosen = model.choose(count * 4, true);
        for (r, b) in bufs.iter().enumerate() {
            assert_eq!(g.comm(r).last_algorithm(), Some(chosen));
            assert!(g.comm(r).download(b).unwrap().iter().all(|&x| x == 3.0));
        }
        // The choice is the minimum of the predictions.
        let best = Algorithm::CONCRETE
            .iter()
            .map(|&a| model.predict(a, count * 4, true).seconds)
            .fold(f64::INFINITY, f64::min);
        assert_eq!(model.predict(chosen, count * 4, true).seconds, best);
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
