//! Recovery of a ring that loses a rank mid-call (`OnFailure::FinishAmongSurvivors`), at 4
//! ranks x 16 MiB (f32 sum, in place): over `KILLS` kills (default 100) of a random rank after
//! a random number of its frames, the time from the failure to the end of the call (revoke +
//! agree + shrink + finish) against one fault-free all-reduce of the same group measured just
//! before, its p50 and p99, and every survivor's every element checked against the f64 sum of
//! exactly the ranks its outcome names. Also the price of the feature without faults: the
//! all-reduce with its input kept and its commit round against the plain one.
//!
//! Then stragglers (`CallOptions::skip_after`): 4 ranks train `STEPS` steps (default 40) of
//! 20 ms compute and a 1 MiB all-reduce, one rank 10x slow (200 ms) on every step; rank 0's
//! steps/s with the slow rank skipped after 10 ms, against the same without the slow rank
//! (the fault-free pace) and with it waited for.
//!
//! `cargo bench --bench survive` (`KILLS=20` for a quick run; `PART=kills` or `PART=stragglers`
//! for one half)

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use wccl::link::{FaultPlan, LinkStack};
use wccl::{
    CallOptions, Collective, CommConfig, CommGroup, Communicator, OnFailure, Outcome, ReduceOp,
};

const RANKS: usize = 4;
const MIB: usize = 16;

fn input(rank: usize, count: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((rank * 1009 + i * 7) % 997) as f32 + 1000.0 * rank as f32)
        .collect()
}

fn all_reduce(
    c: &mut Communicator,
    buf: &wccl::DeviceBuffer<f32>,
    opts: CallOptions,
) -> wccl::Result<Outcome> {
    c.run(
        Collective::AllReduce {
            input: buf.view(),
            output: buf.view(),
            op: ReduceOp::Sum,
        },
        opts,
    )
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs.get(i).copied().unwrap_or(f64::NAN)
}

fn main() {
    let part = std::env::var("PART").unwrap_or_default();
    if part != "stragglers" {
        kills();
    }
    if part != "kills" {
        stragglers();
    }
}

/// Rank 0's steps per second over `steps` steps of `compute` (the slow rank's: `slow`) and a
/// 1 MiB all-reduce with `opts`.
fn pace(steps: usize, slow: Option<Duration>, opts: CallOptions) -> f64 {
    let compute = Duration::from_millis(20);
    let count = (1 << 20) / 4;
    let comms = match CommGroup::builder()
        .ranks(RANKS)
        .config(CommConfig::default().timeout(Duration::from_secs(120)))
        .build()
    {
        Ok(g) => g.into_communicators(),
        Err(e) => panic!("no adapter for the bench: {e}"),
    };
    let paces: Vec<Option<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let me = c.rank();
                    let buf = c.upload(&vec![1.0f32; count]).expect("upload");
                    // Warm-up, every rank in.
                    all_reduce(&mut c, &buf, CallOptions::default()).expect("warm-up");
                    let t = Instant::now();
                    for _ in 0..steps {
                        // The step's compute, emulated (10x for the slow rank).
                        std::thread::sleep(if me == 2 {
                            slow.unwrap_or(compute)
                        } else {
                            compute
                        });
                        if let Err(e) = all_reduce(&mut c, &buf, opts) {
                            // The slow rank, still behind when rank 0 has gone: done.
                            assert!(me == 2, "rank {me}: {e}");
                            return None;
                        }
                    }
                    (me == 0).then(|| steps as f64 / t.elapsed().as_secs_f64())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    paces.into_iter().flatten().next().unwrap_or(f64::NAN)
}

fn stragglers() {
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let slow = Some(Duration::from_millis(200));
    let skip = CallOptions::default().skip_after(Duration::from_millis(10));
    let clean = pace(steps, None, CallOptions::default());
    let waited = pace(steps, slow, CallOptions::default());
    let skipped = pace(steps, slow, skip);
    // Skipping with nobody slow: the window is never waited out, the price is the arrival round.
    let clean_skip = pace(steps, None, skip);
    println!(
        "stragglers: {RANKS} ranks, 1 MiB all-reduce after 20 ms of compute, rank 2 at 200 ms, {steps} steps"
    );
    println!(
        "  fault-free: {clean:.1} steps/s (with skip_after and nobody slow: {clean_skip:.1}, {:.2}x)",
        clean_skip / clean
    );
    println!(
        "  slow rank waited for: {waited:.1} steps/s ({:.2}x the fault-free pace)",
        waited / clean
    );
    println!(
        "  slow rank skipped after 10 ms: {skipped:.1} steps/s ({:.2}x the fault-free pace; target 0.70x)",
        skipped / clean
    );
}

fn kills() {
    let kills: usize = std::env::var("KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let count = (MIB << 20) / 4;
    let inputs: Vec<Vec<f32>> = (0..RANKS).map(|r| input(r, count)).collect();
    let mut rng = StdRng::seed_from_u64(12);
    let (mut recovery, mut faulty_call) = (Vec::new(), Vec::new());
    let (mut plain, mut kept) = (Vec::new(), Vec::new());
    let (mut wrong, mut checked, mut full) = (0usize, 0usize, 0usize);
    for k in 0..kills {
        let faults = FaultPlan::new();
        let comms = match CommGroup::builder()
            .ranks(RANKS)
            .config(
                CommConfig::default()
                    .timeout(Duration::from_secs(60))
                    .on_failure(OnFailure::FinishAmongSurvivors),
            )
            .links(LinkStack::new().faults(faults.clone()))
            .build()
        {
            Ok(g) => g.into_communicators(),
            Err(e) => panic!("no adapter for the bench: {e}"),
        };
        let victim = rng.random_range(0..RANKS);
        // 4 MiB slices: one per ring step at 16 MiB, 2 (n-1) data frames and n-1 commit frames.
        let frames = rng.random_range(0..3 * (RANKS - 1));
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    let (faults, inputs) = (faults.clone(), &inputs);
                    s.spawn(move || {
                        let me = c.rank();
                        let buf = c.upload(&inputs[me]).expect("upload");
                        // Warm-up, then the fault-free references: plain, and kept + commit.
                        let plain_opts = CallOptions::default().on_failure(OnFailure::Error);
                        all_reduce(&mut c, &buf, plain_opts).expect("warm-up");
                        let mut times = Vec::new();
                        for opts in [plain_opts, CallOptions::default()] {
                            c.write(&buf, &inputs[me]).expect("write");
                            c.barrier().expect("barrier");
                            let t = Instant::now();
                            all_reduce(&mut c, &buf, opts).expect("fault-free");
                            times.push(t.elapsed());
                        }
                        c.write(&buf, &inputs[me]).expect("write");
                        c.barrier().expect("barrier");
                        if me == victim {
                            faults.kill_after(victim, frames);
                        }
                        let t = Instant::now();
                        let got = all_reduce(&mut c, &buf, CallOptions::default());
                        let took = t.elapsed();
                        if me == victim {
                            return (me, times, None);
                        }
                        let values = got
                            .as_ref()
                            .ok()
                            .map(|_| c.download(&buf).expect("download"));
                        // A next call, as training makes: a rank that returned before the death
                        // joins the recovery from it.
                        let next = c.barrier();
                        (me, times, Some((got, took, values, next)))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("rank")).collect()
        });
        let mut slowest = Duration::ZERO;
        let mut rec = None::<Duration>;
        for (me, times, res) in results {
            if me == 0 {
                plain.push(times[0].as_secs_f64());
                kept.push(times[1].as_secs_f64());
            }
            let Some((got, took, values, next)) = res else {
                continue;
            };
            let o = got.unwrap_or_else(|e| panic!("kill {k}: rank {me}: {e}"));
            next.unwrap_or_else(|e| panic!("kill {k}: rank {me}: next call: {e}"));
            if o.contributors.len() == RANKS {
                full += 1;
            }
            let values = values.expect("values");
            for (i, v) in values.iter().enumerate() {
                let want: f64 = o
                    .contributors
                    .iter()
                    .map(|&r| f64::from(inputs[r][i]))
                    .sum();
                checked += 1;
                if f64::from(*v) != want {
                    wrong += 1;
                }
            }
            slowest = slowest.max(took);
            if let Some(t) = o.recovered_in {
                rec = Some(rec.map_or(t, |r: Duration| r.max(t)));
            }
        }
        if let Some(r) = rec {
            recovery.push(r.as_secs_f64());
            faulty_call.push(slowest.as_secs_f64());
        }
        eprintln!(
            "kill {k}: rank {victim} after {frames} frames: recovered in {:?}, call {:?}",
            rec, slowest
        );
    }
    // The baseline: one plain fault-free all-reduce (no kept input, no commit round).
    let clean_p50 = percentile(&mut plain.clone(), 0.5);
    let (p50, p99) = (
        percentile(&mut recovery, 0.5),
        percentile(&mut recovery.clone(), 0.99),
    );
    let (c50, c99) = (
        percentile(&mut faulty_call, 0.5),
        percentile(&mut faulty_call.clone(), 0.99),
    );
    let target = 2.0 * clean_p50 + 0.1;
    println!(
        "survive: {RANKS} ranks x {MIB} MiB, {kills} kills ({} recovered in the call, the rest after it)",
        recovery.len()
    );
    println!(
        "  fault-free all_reduce: plain p50 {:.1} ms, kept input + commit round p50 {:.1} ms ({:.2}x)",
        percentile(&mut plain, 0.5) * 1e3,
        percentile(&mut kept, 0.5) * 1e3,
        percentile(&mut kept, 0.5) / percentile(&mut plain, 0.5)
    );
    println!(
        "  recovery (failure to end of call): p50 {:.1} ms, p99 {:.1} ms; target 2 x {:.1} + 100 = {:.1} ms: p50 {:.2}x, p99 {:.2}x of the target",
        p50 * 1e3,
        p99 * 1e3,
        clean_p50 * 1e3,
        target * 1e3,
        p50 / target,
        p99 / target
    );
    println!(
        "  whole faulty call: p50 {:.1} ms, p99 {:.1} ms ({:.2}x, {:.2}x one fault-free call)",
        c50 * 1e3,
        c99 * 1e3,
        c50 / clean_p50,
        c99 / clean_p50
    );
    println!(
        "  no silent mix: {wrong} wrong elements of {checked} checked ({full} survivor results held every rank)"
    );
}
