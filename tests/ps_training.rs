//! Training through the parameter server converges (weights within 1e-3 of the truth) in
//! every mode, also with a worker killed halfway. Runs the `ps_training` example's trainer.

#[path = "../examples/ps_training.rs"]
#[allow(dead_code)]
mod ps_training;

use ps_training::{Options, train};
use wccl::ps::Mode;

#[test]
fn converges_in_every_mode_also_with_a_worker_killed() {
    for mode in [Mode::Sync, Mode::BoundedStaleness(2), Mode::Async] {
        for kill_worker in [false, true] {
            let o = Options {
                mode,
                kill_worker,
                steps: 200,
                ..Options::default()
            };
            let out = train(&o).unwrap_or_else(|e| panic!("{mode:?} kill={kill_worker}: {e}"));
            assert!(
                out.max_error < 1e-3,
                "{mode:?} kill={kill_worker}: error {}",
                out.max_error
            );
            if kill_worker {
                assert!(
                    out.reports[0]
                        .events
                        .iter()
                        .any(|e| e.contains("rank 2 is gone")),
                    "{:?}",
                    out.reports[0].events
                );
            }
        }
    }
}

#[test]
fn converges_when_the_primary_server_is_killed() {
    for mode in [Mode::Sync, Mode::Async] {
        let o = Options {
            mode,
            kill_primary: true,
            steps: 200,
            ..Options::default()
        };
        let out = train(&o).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert!(out.max_error < 1e-3, "{mode:?}: error {}", out.max_error);
        assert!(
            out.reports[0]
                .events
                .iter()
                .any(|e| e.contains("took over")),
            "{:?}",
            out.reports[0].events
        );
    }
}
