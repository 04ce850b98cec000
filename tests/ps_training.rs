//! Training through the parameter server converges (weights within 1e-3 of the truth) in
//! every mode, also with a worker killed halfway. Runs the `ps_training` example's trainer.

#[path = "../examples/ps_training.rs"]
#[allow(dead_code)]
mod ps_training;

use ps_training::{Options, train};
use wccl::ps::{Consistency, Mode};

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

/// Runs `train` on its own thread and gives up after `limit`: a run that hangs on a server that
/// never answers fails the test instead of stalling the suite (the thread is left behind).
fn train_bounded(o: &Options, limit: std::time::Duration) -> ps_training::Outcome {
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = o.clone();
    std::thread::spawn(move || {
        // The receiver may be gone after a timeout: nobody is left to tell.
        let _ = tx.send(train(&opts).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{o:?}: {e}"),
        Err(_) => panic!("{o:?}: no result within {limit:?}"),
    }
}

/// The options of a 3-server, 2-replica, `Strong`, `Sync` run whose primary of `w` (rank 0)
/// dies halfway; rank 2 holds nothing of `w`, rank 1 takes over.
fn three_servers(heal_then_kill: bool, timeout: std::time::Duration) -> Options {
    Options {
        mode: Mode::Sync,
        servers: Some(3),
        replicas: Some(2),
        consistency: Consistency::Strong,
        kill_primary: !heal_then_kill,
        heal_then_kill,
        steps: 100,
        timeout,
        ..Options::default()
    }
}

/// Under `Strong` the workers lose nothing they were answered with, the survivor took over
/// and reports skipping no version (a take-over that jumps versions lost the updates in
/// between, even those no worker's count can show), and training converges. Bounded: a
/// generous multiple (60x) of the 2 s deadline.
fn assert_nothing_lost(heal_then_kill: bool) {
    let timeout = std::time::Duration::from_secs(2);
    let out = train_bounded(&three_servers(heal_then_kill, timeout), timeout * 60);
    let events: Vec<&String> = out.reports.iter().flat_map(|r| &r.events).collect();
    assert_eq!(out.lost, 0, "{events:?}");
    assert!(out.failovers >= 1, "{events:?}");
    assert!(events.iter().any(|e| e.contains("took over")), "{events:?}");
    assert!(
        !events.iter().any(|e| e.contains("skipped from version")),
        "{events:?}"
    );
    assert!(out.max_error < 1e-3, "error {}", out.max_error);
}

/// `--servers 3 --replicas 2 --kill-primary` converges with 0 lost under `Strong`.
#[test]
fn three_servers_two_replicas_strong_lose_nothing_when_the_primary_dies() {
    assert_nothing_lost(false);
}

/// `--servers 3 --replicas 2 --heal-then-kill`: the backup cut off for a few steps and healed
/// must have caught up by the time the primary dies.
#[test]
fn a_healed_backup_has_caught_up_when_the_primary_dies() {
    assert_nothing_lost(true);
}
