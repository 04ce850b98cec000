//! A ring that survives a dead rank: 4 ranks train a linear model with data-parallel
//! all-reduce (`Avg` of the gradients) for 200 steps. At step 100 rank 2 is killed at a random
//! point of the call (`FaultPlan::kill_after`); the other three finish that call among
//! themselves (`OnFailure::FinishAmongSurvivors`) and go on. At step 150 a fresh rank joins
//! (`Communicator::grow` / `join`) and receives the parameters by broadcast.
//!
//! Every step's averaged gradient is checked on every rank against the f64 mean of exactly the
//! ranks the call's `Outcome` names; the program exits non-zero if any differs. It prints each
//! step's contributors, the recovery time, and the final loss against a fault-free run of the
//! same seed.
//!
//! `cargo run --release --example survive -- [seed]`

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use wccl::link::{FaultPlan, Link, LinkStack};
use wccl::{
    AdapterSelector, CallOptions, Collective, CommConfig, CommGroup, Communicator, OnFailure,
    RankDevice, ReduceOp,
};

const RANKS: usize = 4;
const STEPS: usize = 200;
const KILL_AT: usize = 100;
const JOIN_AT: usize = 150;
const VICTIM: usize = 2;
/// Features of the model, samples per rank and step.
const DIM: usize = 61;
const BATCH: usize = 16;
const LR: f32 = 0.05;

type Boxed = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let seed: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    match run(seed) {
        Ok(s) if s.wrong == 0 => {}
        Ok(_) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// What the two runs showed.
pub struct Summary {
    /// Steps whose averaged gradient differed from the f64 mean of its contributors.
    pub wrong: usize,
    /// Steps checked (every rank's every step, both runs).
    pub checked: usize,
    /// The recovery of the call that lost a rank (`None`: the run without faults never needs
    /// one).
    pub recovered_in: Option<Duration>,
    /// Held-out loss at the end, with the faults and without.
    pub loss: (f64, f64),
}

/// Both runs, printed.
pub fn run(seed: u64) -> Result<Summary, Boxed> {
    let clean = train(seed, false)?;
    let faulty = train(seed, true)?;
    println!(
        "final loss: {:.6} with the faults, {:.6} without (same seed {seed})",
        faulty.loss, clean.loss
    );
    if let Some(t) = faulty.recovered_in {
        println!(
            "recovery (agree + shrink + finish the call): {:.1} ms",
            t.as_secs_f64() * 1e3
        );
    }
    let (checked, wrong) = (clean.checked + faulty.checked, clean.wrong + faulty.wrong);
    println!("{checked} steps checked against the f64 mean of their contributors: {wrong} wrong");
    Ok(Summary {
        wrong,
        checked,
        recovered_in: faulty.recovered_in,
        loss: (faulty.loss, clean.loss),
    })
}

/// What one training run ended with.
struct Report {
    loss: f64,
    recovered_in: Option<Duration>,
    checked: usize,
    wrong: usize,
}

/// The true model the data comes from.
fn truth() -> Vec<f64> {
    (0..DIM)
        .map(|i| ((i * 37) % 11) as f64 / 11.0 - 0.5)
        .collect()
}

/// The samples data shard `shard` sees at `step`: deterministic per (seed, shard, step).
fn batch(seed: u64, shard: usize, step: usize) -> Vec<(Vec<f64>, f64)> {
    let mut rng = StdRng::seed_from_u64(seed ^ ((shard as u64) << 32) ^ (step as u64 * 7919));
    let w = truth();
    (0..BATCH)
        .map(|_| {
            let x: Vec<f64> = (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect();
            let y =
                x.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>() + rng.random_range(-0.01..0.01);
            (x, y)
        })
        .collect()
}

/// Mean squared error of `w` on a held-out set.
fn loss(seed: u64, w: &[f32]) -> f64 {
    let data = batch(seed, 1000, 0);
    data.iter()
        .map(|(x, y)| {
            let p: f64 = x.iter().zip(w).map(|(a, b)| a * f64::from(*b)).sum();
            (p - y).powi(2)
        })
        .sum::<f64>()
        / data.len() as f64
}

/// The gradient of the squared error on one batch.
fn gradient(data: &[(Vec<f64>, f64)], w: &[f32]) -> Vec<f32> {
    let mut g = vec![0.0f64; DIM];
    for (x, y) in data {
        let p: f64 = x.iter().zip(w).map(|(a, b)| a * f64::from(*b)).sum();
        for (gi, xi) in g.iter_mut().zip(x) {
            *gi += 2.0 * (p - y) * xi / data.len() as f64;
        }
    }
    g.into_iter().map(|v| v as f32).collect()
}

/// Shared by the ranks of one run: each gradient as it was sent, by (step, worker), for the
/// checks; and the links of the grown group, taken by rank.
struct Shared {
    sent: Mutex<HashMap<(usize, usize), Vec<f32>>>,
    grown: Mutex<Vec<Option<Box<dyn Link>>>>,
    log: Mutex<Vec<String>>,
    wrong: Mutex<usize>,
    checked: Mutex<usize>,
    recovered: Mutex<Option<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn train(seed: u64, faults: bool) -> Result<Report, Boxed> {
    let plan = FaultPlan::new();
    let config = CommConfig::default()
        .timeout(Duration::from_secs(20))
        .on_failure(OnFailure::FinishAmongSurvivors);
    let comms = CommGroup::builder()
        .ranks(RANKS)
        .config(config.clone())
        .links(LinkStack::new().faults(plan.clone()))
        .build()?
        .into_communicators();
    // The grown group's links (a fresh mesh: nothing of the old group's traffic is on it).
    let grown = LinkStack::new().mesh(RANKS)?;
    let shared = Shared {
        sent: Mutex::new(HashMap::new()),
        grown: Mutex::new(grown.into_iter().map(Some).collect()),
        log: Mutex::new(Vec::new()),
        wrong: Mutex::new(0),
        checked: Mutex::new(0),
        recovered: Mutex::new(None),
    };
    let (join_tx, join_rx) = crossbeam::channel::bounded::<()>(1);
    let mut kill_rng = StdRng::seed_from_u64(seed.wrapping_add(1));
    // One ring all-reduce of 4 ranks sends 3 (n-1) frames per rank at this size.
    let kill_after = kill_rng.random_range(0..=3 * (RANKS - 1));
    let finals: Vec<Result<Option<Vec<f32>>, Boxed>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for comm in comms {
            let (shared, plan, join_tx) = (&shared, plan.clone(), join_tx.clone());
            handles.push(s.spawn(move || {
                let worker = comm.rank();
                worker_loop(
                    Worker {
                        comm,
                        worker,
                        shard: worker,
                        members: (0..RANKS).collect(),
                        w: vec![0.0; DIM],
                        first: 0,
                    },
                    seed,
                    faults,
                    shared,
                    &plan,
                    kill_after,
                    Some(join_tx),
                )
            }));
        }
        if faults {
            let (shared, config) = (&shared, config.clone());
            let join_rx = join_rx.clone();
            handles.push(s.spawn(move || -> Result<Option<Vec<f32>>, Boxed> {
                // Bounded: rank 0 says when the group grows.
                join_rx.recv_timeout(Duration::from_secs(300))?;
                let link = lock(&shared.grown)[RANKS - 1].take().ok_or("no link")?;
                let adapter = wccl::device::discover(&AdapterSelector::default())?
                    .into_iter()
                    .next()
                    .ok_or("no adapter")?;
                let dev = RankDevice::open(RANKS - 1, &adapter)?;
                let comm = Communicator::join(dev, link, config)?;
                // A replacement: it takes the dead rank's data shard.
                worker_loop(
                    Worker {
                        comm,
                        worker: RANKS,
                        shard: VICTIM,
                        members: Vec::new(),
                        w: vec![0.0; DIM],
                        first: JOIN_AT,
                    },
                    seed,
                    faults,
                    shared,
                    &plan,
                    kill_after,
                    None,
                )
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
            .collect()
    });
    let mut w0 = None;
    for f in finals {
        if let Some(w) = f? {
            w0.get_or_insert(w);
        }
    }
    for line in lock(&shared.log).iter() {
        if faults {
            println!("{line}");
        }
    }
    let w = w0.ok_or("no rank finished")?;
    Ok(Report {
        loss: loss(seed, &w),
        recovered_in: *lock(&shared.recovered),
        checked: *lock(&shared.checked),
        wrong: *lock(&shared.wrong),
    })
}

/// One rank's state.
struct Worker {
    comm: Communicator,
    /// Who this rank is across renumberings (0..4, and 4 for the newcomer).
    worker: usize,
    shard: usize,
    /// The workers of the communicator, in its rank order (empty until a newcomer joins).
    members: Vec<usize>,
    w: Vec<f32>,
    first: usize,
}

/// Trains from `first` to the end; returns the final parameters (`None` for the victim).
fn worker_loop(
    mut me: Worker,
    seed: u64,
    faults: bool,
    shared: &Shared,
    plan: &FaultPlan,
    kill_after: usize,
    join_tx: Option<crossbeam::channel::Sender<()>>,
) -> Result<Option<Vec<f32>>, Boxed> {
    let opts = CallOptions::default();
    for step in me.first..STEPS {
        if faults && step == JOIN_AT {
            // The newcomer has joined already (before its first step).
            if me.first != JOIN_AT {
                // Every survivor grows at this boundary; rank 0 lets the newcomer in.
                if me.comm.rank() == 0
                    && let Some(tx) = &join_tx
                {
                    tx.send(())?;
                }
                let link = lock(&shared.grown)[me.comm.rank()]
                    .take()
                    .ok_or("no link")?;
                me.comm.grow(link)?;
            }
            // Who is who in the grown group: each rank's worker id, gathered.
            let ids = me.comm.upload(&[me.worker as u32])?;
            let all = me.comm.buffer::<u32>(me.comm.size())?;
            me.comm.all_gather(&ids, &all)?;
            me.members = me
                .comm
                .download(&all)?
                .into_iter()
                .map(|x| x as usize)
                .collect();
            // The newcomer holds nothing: rank 0 broadcasts the parameters.
            let params = me.comm.upload(&me.w)?;
            me.comm.broadcast(&params, 0)?;
            me.w = me.comm.download(&params)?;
        }
        if faults && step == KILL_AT && me.worker == VICTIM {
            plan.kill_after(VICTIM, kill_after);
        }
        let g = gradient(&batch(seed, me.shard, step), &me.w);
        lock(&shared.sent).insert((step, me.worker), g.clone());
        let buf = me.comm.upload(&g)?;
        let members = me.members.clone();
        let outcome = match me.comm.run(
            Collective::AllReduce {
                input: buf.view(),
                output: buf.view(),
                op: ReduceOp::Avg,
            },
            opts,
        ) {
            Ok(o) => o,
            // The victim is dead: it stops here (its process would be gone).
            Err(_) if me.worker == VICTIM && plan.is_killed(VICTIM) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if me.worker == VICTIM && plan.is_killed(VICTIM) {
            return Ok(None);
        }
        let avg = me.comm.download(&buf)?;
        // The check: the f64 mean of exactly the contributors' gradients.
        let workers: Vec<usize> = outcome.contributors.iter().map(|&r| members[r]).collect();
        let sent = lock(&shared.sent);
        let mut bad = 0;
        for (i, got) in avg.iter().enumerate() {
            let want = workers
                .iter()
                .map(|wk| sent.get(&(step, *wk)).map_or(f64::NAN, |g| f64::from(g[i])))
                .sum::<f64>()
                / workers.len() as f64;
            if (f64::from(*got) - want).abs() > 1e-6 + 1e-5 * want.abs() {
                bad += 1;
            }
        }
        drop(sent);
        *lock(&shared.checked) += 1;
        if bad > 0 {
            *lock(&shared.wrong) += 1;
            lock(&shared.log).push(format!(
                "step {step}: worker {}: {bad} elements differ from the mean of {workers:?}",
                me.worker
            ));
        }
        if let Some(t) = outcome.recovered_in {
            lock(&shared.recovered).get_or_insert(t);
        }
        // The members after the call: the excluded are out.
        me.members = members
            .iter()
            .enumerate()
            .filter(|(r, _)| !outcome.excluded.contains(r))
            .map(|(_, &wk)| wk)
            .collect();
        if me.comm.rank() == 0 {
            lock(&shared.log).push(format!(
                "step {step}: contributors (workers) {workers:?}{}",
                match outcome.recovered_in {
                    Some(t) => format!(
                        ", excluded {:?}, recovered in {:.1} ms",
                        outcome
                            .excluded
                            .iter()
                            .map(|&r| members[r])
                            .collect::<Vec<_>>(),
                        t.as_secs_f64() * 1e3
                    ),
                    None => String::new(),
                }
            ));
        }
        for (wi, gi) in me.w.iter_mut().zip(&avg) {
            *wi -= LR * gi;
        }
    }
    Ok(Some(me.w))
}
