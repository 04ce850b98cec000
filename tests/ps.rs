//! The parameter server: aggregation against an f64 reference, each mode's rule for pulls,
//! backup workers, duplicate pushes, bad input, and a worker that never pushes.

use std::time::Duration;

use rand::Rng;
use wccl::ps::{Mode, ParameterServer, PsWorker, ServerReport, Sgd, UpdateRule};
use wccl::{Error, Result};

const SIZES: [(&str, usize); 2] = [("big", 1000), ("odd", 7)];

/// grads[step][worker][key]
fn random_grads(steps: usize, workers: usize) -> Vec<Vec<Vec<Vec<f32>>>> {
    let mut rng = rand::rng();
    (0..steps)
        .map(|_| {
            (0..workers)
                .map(|_| {
                    SIZES
                        .iter()
                        .map(|&(_, n)| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
                        .collect()
                })
                .collect()
        })
        .collect()
}

fn init() -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .map(|&(_, n)| (0..n).map(|i| (i % 5) as f32 * 0.5).collect())
        .collect()
}

fn builder(workers: usize, mode: Mode, rule: Sgd) -> ParameterServer {
    let mut b = ParameterServer::builder()
        .servers(2)
        .workers(workers)
        .mode(mode)
        .rule(rule)
        .timeout(Duration::from_secs(20));
    for (k, (name, _)) in SIZES.iter().enumerate() {
        b = b.param(*name, init()[k].clone());
    }
    b
}

/// Runs the servers and one closure per worker; returns the servers' reports.
fn run(
    servers: Vec<wccl::ps::PsServer>,
    workers: Vec<PsWorker>,
    f: impl Fn(PsWorker) -> Result<()> + Sync,
) -> Vec<ServerReport> {
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = servers
            .into_iter()
            .map(|sv| s.spawn(move || sv.serve()))
            .collect();
        let ws: Vec<_> = workers.into_iter().map(|w| s.spawn(move || f(w))).collect();
        for w in ws {
            w.join().expect("worker thread").expect("worker");
        }
        hs.into_iter()
            .map(|h| h.join().expect("server thread").expect("server"))
            .collect()
    })
}

fn final_params(reports: &[ServerReport]) -> Vec<Vec<f32>> {
    SIZES
        .iter()
        .map(|(name, _)| {
            reports
                .iter()
                .flat_map(|r| r.params.iter())
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .expect("every key is served")
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// The synchronous reference: per step, the mean of the given workers' gradients.
fn sync_reference(
    rule: &Sgd,
    grads: &[Vec<Vec<Vec<f32>>>],
    counted: &[usize],
) -> Vec<Vec<Vec<f64>>> {
    // params[step][key] before step's update
    let mut w: Vec<Vec<f64>> = init()
        .iter()
        .map(|v| v.iter().map(|&x| x as f64).collect())
        .collect();
    let mut m: Vec<Vec<f64>> = w.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut out = vec![w.clone()];
    for step in grads {
        for k in 0..SIZES.len() {
            for i in 0..w[k].len() {
                let g: f64 = counted.iter().map(|&q| step[q][k][i] as f64).sum::<f64>()
                    / counted.len() as f64;
                (w[k][i], m[k][i]) = rule.host(w[k][i], m[k][i], g);
            }
        }
        out.push(w.clone());
    }
    out
}

#[test]
fn sync_aggregates_every_step_like_the_reference() {
    let (steps, workers) = (4, 3);
    let rule = Sgd {
        lr: 0.1,
        momentum: 0.9,
    };
    let grads = random_grads(steps, workers);
    let reference = sync_reference(&rule, &grads, &[0, 1, 2]);
    let (servers, ws) = builder(workers, Mode::Sync, rule).build().expect("build");
    let reports = run(servers, ws, |mut w| {
        let q = w.index();
        for (t, step) in grads.iter().enumerate() {
            for (k, (name, n)) in SIZES.iter().enumerate() {
                let params = w.comm().buffer::<f32>(*n)?;
                let info = w.pull(name, t as u64, &params)?;
                assert_eq!(
                    info.version, t as u64,
                    "sync pull sees exactly the updates before step t"
                );
                let got = w.comm().download(&params)?;
                assert_close(
                    &got,
                    &reference[t][k],
                    &format!("worker {q} step {t} {name}"),
                );
                let g = w.comm().upload(&step[q][k])?;
                w.push(name, &g, t as u64)?;
            }
        }
        w.done()
    });
    let fin = final_params(&reports);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &reference[steps][k], "final");
    }
    let applied: u64 = reports.iter().map(|r| r.applied).sum();
    assert_eq!(applied, (steps * SIZES.len()) as u64);
}

#[test]
fn backup_workers_apply_the_first_n_and_count_the_late() {
    let (steps, workers) = (3, 3);
    let rule = Sgd {
        lr: 0.5,
        momentum: 0.0,
    };
    let grads = random_grads(steps, workers);
    let reference = sync_reference(&rule, &grads, &[0, 1]);
    let (servers, ws) = builder(workers, Mode::Sync, rule)
        .backups(1)
        .build()
        .expect("build");
    let (tx, rx) = crossbeam::channel::unbounded::<()>();
    let reports = run(servers, ws, |mut w| {
        let q = w.index();
        for (t, step) in grads.iter().enumerate() {
            for (k, (name, n)) in SIZES.iter().enumerate() {
                if q == 2 {
                    // The straggler pushes step t only after the others have seen step t+1.
                    for _ in 0..2 {
                        rx.recv().expect("signal");
                    }
                } else {
                    let params = w.comm().buffer::<f32>(*n)?;
                    w.pull(name, t as u64, &params)?;
                }
                let g = w.comm().upload(&step[q][k])?;
                w.push(name, &g, t as u64)?;
                if q != 2 {
                    let params = w.comm().buffer::<f32>(*n)?;
                    w.pull(name, t as u64 + 1, &params)?;
                    tx.send(()).expect("signal");
                }
            }
        }
        w.done()
    });
    let fin = final_params(&reports);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &reference[steps][k], "final");
    }
    let late: u64 = reports.iter().map(|r| r.late).sum();
    assert_eq!(
        late,
        (steps * SIZES.len()) as u64,
        "every straggler push is late and dropped"
    );
}

/// With plain SGD the order of per-push updates does not matter: the final parameters are the
/// initial ones minus lr/n times the sum of every gradient.
fn async_reference(lr: f64, grads: &[Vec<Vec<Vec<f32>>>], workers: usize) -> Vec<Vec<f64>> {
    init()
        .iter()
        .enumerate()
        .map(|(k, v)| {
            v.iter()
                .enumerate()
                .map(|(i, &x)| {
                    let s: f64 = grads
                        .iter()
                        .flat_map(|st| st.iter().map(|w| w[k][i] as f64))
                        .sum();
                    x as f64 - lr * s / workers as f64
                })
                .collect()
        })
        .collect()
}

fn staleness_run(mode: Mode, bound: Option<u64>) {
    let (steps, workers) = (6, 3);
    let rule = Sgd {
        lr: 0.05,
        momentum: 0.0,
    };
    let grads = random_grads(steps, workers);
    let (servers, ws) = builder(workers, mode, rule).build().expect("build");
    let reports = run(servers, ws, |mut w| {
        let q = w.index();
        for (t, step) in grads.iter().enumerate() {
            for (k, (name, n)) in SIZES.iter().enumerate() {
                let params = w.comm().buffer::<f32>(*n)?;
                let info = w.pull(name, t as u64, &params)?;
                if let Some(s) = bound {
                    // A pull at step t sees every update of the steps up to t-s-1.
                    assert!(
                        info.clock >= (t as u64).saturating_sub(s),
                        "worker {q} step {t}: clock {} with bound {s}",
                        info.clock
                    );
                }
                let g = w.comm().upload(&step[q][k])?;
                w.push(name, &g, t as u64)?;
            }
        }
        w.done()
    });
    let fin = final_params(&reports);
    let want = async_reference(0.05, &grads, workers);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &want[k], "final");
    }
    let applied: u64 = reports.iter().map(|r| r.applied).sum();
    assert_eq!(
        applied,
        (steps * workers * SIZES.len()) as u64,
        "every push applies on arrival"
    );
}

#[test]
fn bounded_staleness_never_exceeds_its_bound() {
    staleness_run(Mode::BoundedStaleness(1), Some(1));
}

#[test]
fn async_applies_every_push() {
    staleness_run(Mode::Async, None);
}

#[test]
fn duplicate_pushes_apply_once() {
    let rule = Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    let grads = random_grads(1, 1);
    let reference = sync_reference(&rule, &grads, &[0]);
    let (servers, ws) = builder(1, Mode::Async, rule).build().expect("build");
    let reports = run(servers, ws, |mut w| {
        for (k, (name, _)) in SIZES.iter().enumerate() {
            let g = w.comm().upload(&grads[0][0][k])?;
            w.push(name, &g, 0)?;
            w.push(name, &g, 0)?; // a retry
        }
        w.done()
    });
    let fin = final_params(&reports);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &reference[1][k], "final");
    }
    assert_eq!(
        reports.iter().map(|r| r.duplicates).sum::<u64>(),
        SIZES.len() as u64
    );
}

#[test]
fn bad_input_is_refused() {
    let rule = Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    let (servers, ws) = builder(1, Mode::Sync, rule).build().expect("build");
    run(servers, ws, |mut w| {
        let wrong = w.comm().upload(&[1.0f32; 3])?;
        assert!(matches!(
            w.push("big", &wrong, 0),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            w.push("nope", &wrong, 0),
            Err(Error::InvalidArgument { .. })
        ));
        let ints = w.comm().upload(&[1i32; 7])?;
        assert!(matches!(
            w.push("odd", &ints, 0),
            Err(Error::InvalidArgument { .. })
        ));
        // A pull before any push gets the initial values.
        let p = w.comm().buffer::<f32>(7)?;
        let info = w.pull("odd", 0, &p)?;
        assert_eq!(info.version, 0);
        assert_eq!(w.comm().download(&p)?, init()[1]);
        // A push for a step ahead of the one being aggregated is refused, and says why; the
        // refusal is that push's error, and the next pull gets its own answer.
        let g = w.comm().upload(&[0.0f32; 7])?;
        let e = w.push("odd", &g, 5).expect_err("refused");
        assert!(e.to_string().contains("step 5"), "{e}");
        assert_eq!(w.pull("odd", 0, &p)?.version, 0);
        w.done()
    });
    assert!(
        ParameterServer::builder()
            .workers(2)
            .backups(2)
            .build()
            .is_err()
    );
    assert!(
        ParameterServer::builder()
            .param("a", vec![1.0])
            .param("a", vec![2.0])
            .build()
            .is_err()
    );
    // Counts whose sum overflows: an error, not a panic (nor a wrapped sum of 1 rank).
    assert!(
        ParameterServer::builder()
            .servers(usize::MAX)
            .workers(2)
            .param("a", vec![1.0])
            .build()
            .is_err()
    );
}

/// Async: a worker pulls a key it pushes only some steps (a sparse one) at whatever step its
/// other keys reached; an async pull never waits, so it is bounded by the furthest the server
/// knows the worker to be (on any key it holds), as a push is, not by that key's own pushes.
/// A step far past that is still refused.
#[test]
fn async_pulls_a_sparse_key_at_the_workers_step() {
    let rule = Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    let (servers, ws) = builder(1, Mode::Async, rule).build().expect("build");
    run(servers, ws, |mut w| {
        let g = w.comm().upload(&[0.25f32; 1000])?;
        for t in 0..6u64 {
            w.push("big", &g, t)?;
        }
        let p = w.comm().buffer::<f32>(7)?;
        let info = w.pull("odd", 6, &p)?;
        assert_eq!(info.version, 0);
        assert_eq!(w.comm().download(&p)?, init()[1]);
        // Far past one step ahead of the key's own clock (0), within 1024 of it.
        assert_eq!(w.pull("odd", 1000, &p)?.version, 0);
        let e = w
            .pull("odd", 5000, &p)
            .expect_err("a step no push could reach");
        assert!(e.to_string().contains("step 5000"), "{e}");
        w.done()
    });
}

/// Pushes whose size is wrong, sent past the worker's own check (which would refuse them
/// first), reach the server's: it refuses each one naming the key and both sizes, applies
/// nothing, and goes on serving: every worker's right push afterwards lands, as in the f64
/// reference. Each answer is taken only for the request it names: each worker's later pulls
/// return step 1's parameters, never an earlier answer.
#[test]
fn the_server_itself_refuses_a_wrong_size_push_and_keeps_serving() {
    let rule = Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    let workers = 3;
    let grads = random_grads(1, workers);
    let reference = sync_reference(&rule, &grads, &[0, 1, 2]);
    let (servers, ws) = builder(workers, Mode::Sync, rule).build().expect("build");
    let reports = run(servers, ws, |mut w| {
        let p = w.comm().buffer::<f32>(1000)?;
        // Per worker: too few values, saying so; too few values claiming the right count; the
        // right number of values claiming a wrong count.
        let (count, len, says) = [
            (3, 3, "push of 3 values for 'big', which has 1000"),
            (1000, 3, "push of 3 values for 'big', which has 1000"),
            (999, 1000, "'big', which has 1000"),
        ][w.index()];
        // The refusal is that push's own answer.
        let e = w
            .push_unchecked("big", 0, count, &vec![7.0f32; len])
            .expect_err(&format!("the server refuses {count} claimed, {len} sent"));
        assert_eq!(w.pull("big", 0, &p)?.version, 0);
        let what = format!("{count} claimed, {len} sent: {e}");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{what}");
        assert!(e.to_string().contains(says), "{what}");
        // Still serving: the right pushes for step 0 apply, the wrong ones nowhere.
        for (k, (name, _)) in SIZES.iter().enumerate() {
            let q = w.index();
            let g = w.comm().upload(&grads[0][q][k])?;
            w.push(name, &g, 0)?;
        }
        // The refused pull's own answer is queued or on its way: these pulls return their own.
        for (k, (name, count)) in SIZES.iter().enumerate() {
            let p = w.comm().buffer::<f32>(*count)?;
            let info = w.pull(name, 1, &p)?;
            assert_eq!(
                info.version,
                1,
                "worker {}: '{name}' pulled a stale answer",
                w.index()
            );
            assert_close(
                &w.comm().download(&p)?,
                &reference[1][k],
                "pulled after a refusal",
            );
        }
        w.done()
    });
    let fin = final_params(&reports);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &reference[1][k], "final");
    }
}

#[test]
fn a_worker_that_never_pushes_is_named() {
    let rule = Sgd {
        lr: 1.0,
        momentum: 0.0,
    };
    let (mut servers, ws) = ParameterServer::builder()
        .workers(2)
        .mode(Mode::Sync)
        .rule(rule)
        .param("w", vec![0.0; 4])
        .timeout(Duration::from_millis(800))
        .build()
        .expect("build");
    let server = servers.remove(0);
    let (done_tx, done_rx) = crossbeam::channel::bounded::<()>(0);
    let result = std::thread::scope(|s| {
        let h = s.spawn(move || server.serve());
        let mut ws = ws.into_iter();
        let mut w0 = ws.next().expect("worker 0");
        let w1 = ws.next().expect("worker 1");
        // Worker 1 stays alive (its link open) but never pushes.
        s.spawn(move || {
            let _ = done_rx.recv();
            drop(w1);
        });
        let g = w0.comm().upload(&[1.0f32; 4]).expect("upload");
        let p = w0.comm().buffer::<f32>(4).expect("buffer");
        // The push waits for step 0's update, which waits for worker 1: it fails.
        let pulled = w0
            .push("w", &g, 0)
            .and_then(|()| w0.pull("w", 1, &p).map(|_| ()));
        let served = h.join().expect("server thread");
        drop(done_tx);
        (pulled, served)
    });
    let (pulled, served) = result;
    assert!(pulled.is_err());
    match served {
        Err(Error::Timeout { waiting_on, .. }) => {
            assert_eq!(waiting_on, vec![2], "rank 2 is worker 1")
        }
        other => panic!("the server should name the silent worker: {other:?}"),
    }
}

#[test]
fn a_failed_worker_is_dropped_above_quorum_and_rejoins() {
    let (steps, workers) = (3, 3);
    let rule = Sgd {
        lr: 0.5,
        momentum: 0.0,
    };
    let grads = random_grads(steps, workers);
    // Step 1 is aggregated without worker 2, which misses the deadline; steps 0 and 2 with all.
    let mut reference = sync_reference(&rule, &grads[..1], &[0, 1, 2]);
    let w1 = {
        let mut w: Vec<Vec<f64>> = reference[1].clone();
        for k in 0..SIZES.len() {
            for i in 0..w[k].len() {
                let g = (grads[1][0][k][i] as f64 + grads[1][1][k][i] as f64) / 2.0;
                w[k][i] = rule.host(w[k][i], 0.0, g).0;
            }
        }
        w
    };
    reference.push(w1.clone());
    let mut w2 = w1.clone();
    for k in 0..SIZES.len() {
        for i in 0..w2[k].len() {
            let g: f64 = (0..3).map(|q| grads[2][q][k][i] as f64).sum::<f64>() / 3.0;
            w2[k][i] = rule.host(w2[k][i], 0.0, g).0;
        }
    }
    let b = ParameterServer::builder()
        .servers(1)
        .workers(workers)
        .mode(Mode::Sync)
        .rule(rule)
        .quorum(2)
        .param("big", init()[0].clone())
        .param("odd", init()[1].clone())
        // Long enough that a busy CI machine never declares a merely slow worker failed.
        .timeout(Duration::from_secs(3));
    let (servers, ws) = b.build().expect("build");
    let (tx, rx) = crossbeam::channel::unbounded::<()>();
    let (back_tx, back_rx) = crossbeam::channel::unbounded::<()>();
    let reports = run(servers, ws, |mut w| {
        let q = w.index();
        for (t, step) in grads.iter().enumerate() {
            if q != 2 && t == 2 {
                // Step 2 waits until worker 2 is back, so that it counts again.
                back_rx.recv().expect("signal");
            }
            if q == 2 && t == 1 {
                // Silent through step 1 (alive, link open) until the others saw step 2.
                for _ in 0..2 * SIZES.len() {
                    rx.recv().expect("signal");
                }
                continue;
            }
            for (k, (name, n)) in SIZES.iter().enumerate() {
                let params = w.comm().buffer::<f32>(*n)?;
                w.pull(name, t as u64, &params)?;
                let got = w.comm().download(&params)?;
                let want = if t == 2 { &w1[k] } else { &reference[t][k] };
                assert_close(&got, want, &format!("worker {q} step {t} {name}"));
                if q == 2 && t == 2 && k == 0 {
                    // Its pull brought it back; let the others go on.
                    back_tx.send(()).expect("signal");
                    back_tx.send(()).expect("signal");
                }
                let g = w.comm().upload(&step[q][k])?;
                w.push(name, &g, t as u64)?;
                if q != 2 && t == 1 {
                    w.pull(name, 2, &params)?;
                    tx.send(()).expect("signal");
                }
            }
        }
        w.done()
    });
    let fin = final_params(&reports);
    for k in 0..SIZES.len() {
        assert_close(&fin[k], &w2[k], "final");
    }
    let events = reports[0].events.join("\n");
    assert!(events.contains("worker rank 3 missed"), "{events}");
    assert!(events.contains("worker rank 3 came back"), "{events}");
}
