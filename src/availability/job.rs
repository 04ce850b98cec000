//! A job-level model: the fraction of wall-clock a data-parallel training job spends making
//! progress, given its size, each rank's MTBF and the recovery times wccl measures, for three
//! ways of living with failures:
//!
//! - [`Scheme::CheckpointRestart`]: a fail-stop ring. Every failure stops the job; it restarts
//!   from its last checkpoint, losing the work since.
//! - [`Scheme::SurvivingRing`]: `OnFailure::FinishAmongSurvivors`. A failure costs one recovery
//!   and the step it interrupted (the kept input is a checkpoint taken every step, for free).
//! - [`Scheme::ReplicatedPs`]: a parameter server with replicated servers. A dead worker costs
//!   the deadline after which the servers stop waiting for it, a dead server its failover, and
//!   no work is lost (acknowledged updates survive a failover under `Strong`).
//!
//! # The model
//! Ranks (and servers) fail independently at exponential times of mean `mtbf` and are replaced
//! at once (a spare joins), so the job sees failures as a Poisson process of rate
//! `lambda = units / mtbf`. A failure during a recovery starts the recovery again. Under these
//! assumptions the long-run fractions have closed forms ([`JobModel::progress`]), exact rather
//! than first-order, which [`JobModel::simulate`] checks by simulating each rank's own failure
//! clock:
//!
//! - Work done in segments of `tau` useful seconds that take `len` seconds (overhead included),
//!   each lost whole when a failure interrupts it, with a restart of `r` seconds after each
//!   failure, progresses at `tau / E[T]`, where `E[T] = e^(lambda r) (e^(lambda len) - 1) / lambda`
//!   is the expected time to finish a segment (Daly's exact form). Checkpoint-restart is that
//!   with `tau` the checkpoint interval, `len = tau + checkpoint` and `r` the restart; the
//!   surviving ring is that with `tau` one step, `len` the step with survive mode's own cost, and
//!   `r` the recovery.
//! - Pauses that lose no work, of cost `c_i` for a failure of kind `i` (a share `p_i` of all
//!   failures), a failure during a pause starting a pause of its own kind: the job progresses a
//!   fraction `sum_i p_i e^(-lambda c_i)` of the time.
//!
//! What the model leaves out: a shrunken ring's smaller global batch (the step is taken to cost
//! the same), failures that take several ranks down together, and the time a spare takes to
//! arrive (take it into `restart` or `recovery`).

use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};

use super::{AvailabilityError, Result};

/// Seconds in an hour.
const HOUR: f64 = 3600.0;

/// The most failing units [`JobModel::simulate`] keeps a clock for (64 MiB of clocks).
pub const MAX_SIMULATED_UNITS: u32 = 1 << 22;

/// How a job lives with failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// A fail-stop ring that restarts from its last checkpoint.
    CheckpointRestart,
    /// A ring that finishes among survivors (`OnFailure::FinishAmongSurvivors`).
    SurvivingRing,
    /// A parameter server with replicated servers.
    ReplicatedPs,
}

impl Scheme {
    /// The three, in the order the tables print them.
    pub const ALL: [Scheme; 3] = [
        Scheme::CheckpointRestart,
        Scheme::SurvivingRing,
        Scheme::ReplicatedPs,
    ];

    /// A short name for tables and plots.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::CheckpointRestart => "fail-stop ring + checkpoint-restart",
            Scheme::SurvivingRing => "surviving ring",
            Scheme::ReplicatedPs => "replicated parameter server",
        }
    }
}

/// A training job and what each scheme's recovery costs it. All times in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct JobModel {
    /// Ranks (workers) in the job.
    pub ranks: u32,
    /// Each rank's (and each server's) mean time between failures.
    pub mtbf: f64,
    /// One training step, fault-free.
    pub step: f64,
    /// Writing one checkpoint (the fail-stop ring stops for it).
    pub checkpoint: f64,
    /// Seconds of work between checkpoints; `None` takes Young's optimum `sqrt(2 checkpoint
    /// mtbf_job)` (at least one step).
    pub checkpoint_interval: Option<f64>,
    /// Relaunching a fail-stop job and loading its checkpoint.
    pub restart: f64,
    /// The surviving ring's recovery: noticing the death (a deadline, for a silent one) plus
    /// the agreement and the shrink.
    pub recovery: f64,
    /// Survive mode's own cost per step, as a fraction of the step (the kept input and the
    /// commit round).
    pub survive_overhead: f64,
    /// Parameter servers (each key replicated among them).
    pub servers: u32,
    /// How long the servers wait for a dead worker before going on without it.
    pub worker_deadline: f64,
    /// A dead server's failover: noticing it, and its backup taking over.
    pub failover: f64,
}

impl Default for JobModel {
    /// 1024 ranks of 50,000 hours' MTBF each (one interruption every 49 hours on 1024 ranks,
    /// every 3 hours on 16,384: the order large training runs report), a 1 s step, a 60 s
    /// checkpoint and a 10 min restart; a 1 s deadline, after which the surviving ring's
    /// measured 51 ms recovery follows; 128 servers and a 0.4 s failover (the silent-failover
    /// figure measured here).
    fn default() -> Self {
        JobModel {
            ranks: 1024,
            mtbf: 50_000.0 * HOUR,
            step: 1.0,
            checkpoint: 60.0,
            checkpoint_interval: None,
            restart: 600.0,
            recovery: 1.051,
            survive_overhead: 0.0,
            servers: 128,
            worker_deadline: 1.0,
            failover: 0.4,
        }
    }
}

/// The failing units of a scheme, their costs, and the rate at which the job sees failures.
struct Shape {
    /// Failing units: ranks, plus servers for the parameter server.
    units: u32,
    lambda: f64,
}

fn positive(what: &'static str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(AvailabilityError::OutOfRange {
            what,
            range: "a finite number > 0",
            value: v,
        })
    }
}

fn non_negative(what: &'static str, v: f64) -> Result<f64> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(AvailabilityError::OutOfRange {
            what,
            range: "a finite number >= 0",
            value: v,
        })
    }
}

/// `tau / E[T]` for segments of `tau` useful seconds taking `len`, restart `r`, rate `lambda`.
fn segment_progress(tau: f64, len: f64, r: f64, lambda: f64) -> f64 {
    // E[T] = e^(lambda r) (e^(lambda len) - 1) / lambda, written with exp_m1 so that a small
    // lambda * len keeps its digits; and as an exponent, so that a huge one gives 0, not NaN.
    let x = lambda * len;
    if x == 0.0 {
        // Failures too rare to register against a segment: its own overhead and the restart
        // are all that is left (e^(lambda len) - 1 over lambda is len in the limit).
        return (tau / len * (-lambda * r).exp()).clamp(0.0, 1.0);
    }
    let log_t = lambda * r + x.exp_m1().ln() - lambda.ln();
    (tau.ln() - log_t).exp().clamp(0.0, 1.0)
}

impl JobModel {
    fn validate(&self) -> Result<()> {
        if self.ranks == 0 {
            return Err(AvailabilityError::OutOfRange {
                what: "ranks",
                range: "at least 1",
                value: 0.0,
            });
        }
        positive("mtbf", self.mtbf)?;
        positive("step", self.step)?;
        non_negative("checkpoint", self.checkpoint)?;
        if let Some(i) = self.checkpoint_interval {
            positive("checkpoint interval", i)?;
        }
        non_negative("restart", self.restart)?;
        non_negative("recovery", self.recovery)?;
        non_negative("survive overhead", self.survive_overhead)?;
        non_negative("worker deadline", self.worker_deadline)?;
        non_negative("failover", self.failover)?;
        Ok(())
    }

    fn shape(&self, scheme: Scheme) -> Shape {
        let units = match scheme {
            Scheme::ReplicatedPs => self.ranks.saturating_add(self.servers),
            _ => self.ranks,
        };
        Shape {
            units,
            lambda: f64::from(units) / self.mtbf,
        }
    }

    /// The job's mean time between failures under `scheme` (its units' MTBF over their count).
    pub fn job_mtbf(&self, scheme: Scheme) -> Result<f64> {
        self.validate()?;
        Ok(1.0 / self.shape(scheme).lambda)
    }

    /// The checkpoint interval the fail-stop ring uses: the one given, or Young's
    /// `sqrt(2 checkpoint job_mtbf)`, never below one step.
    pub fn interval(&self) -> Result<f64> {
        self.validate()?;
        let m = 1.0 / self.shape(Scheme::CheckpointRestart).lambda;
        Ok(self
            .checkpoint_interval
            .unwrap_or_else(|| (2.0 * self.checkpoint * m).sqrt())
            .max(self.step))
    }

    /// The long-run fraction of wall-clock spent making progress under `scheme`, in closed form
    /// (see the module's documentation for the model).
    pub fn progress(&self, scheme: Scheme) -> Result<f64> {
        self.validate()?;
        let Shape { units, lambda } = self.shape(scheme);
        Ok(match scheme {
            Scheme::CheckpointRestart => {
                let tau = self.interval()?;
                segment_progress(tau, tau + self.checkpoint, self.restart, lambda)
            }
            Scheme::SurvivingRing => segment_progress(
                self.step,
                self.step * (1.0 + self.survive_overhead),
                self.recovery,
                lambda,
            ),
            Scheme::ReplicatedPs => {
                let share = f64::from(self.ranks) / f64::from(units);
                share * (-lambda * self.worker_deadline).exp()
                    + (1.0 - share) * (-lambda * self.failover).exp()
            }
        })
    }

    /// The same fraction by simulation: every unit (rank, or server) has a failure clock of its
    /// own, exponential of mean `mtbf` and started afresh when the unit is replaced; the job runs
    /// its scheme's segments or pauses against those clocks until `failures` failures have
    /// happened. Deterministic for a `seed`. An independent check of [`progress`](Self::progress).
    pub fn simulate(&self, scheme: Scheme, failures: u64, seed: u64) -> Result<f64> {
        self.validate()?;
        let Shape { units, .. } = self.shape(scheme);
        if units > MAX_SIMULATED_UNITS {
            return Err(AvailabilityError::OutOfRange {
                what: "ranks and servers to simulate",
                range: "at most 2^22 (one clock each)",
                value: f64::from(units),
            });
        }
        let mut clocks = Clocks::new(units, self.mtbf, seed);
        let mut sim = Progress::default();
        match scheme {
            Scheme::CheckpointRestart => {
                let tau = self.interval()?;
                sim.segments(&mut clocks, failures, tau, tau + self.checkpoint, |_| {
                    self.restart
                });
            }
            Scheme::SurvivingRing => {
                let len = self.step * (1.0 + self.survive_overhead);
                sim.segments(&mut clocks, failures, self.step, len, |_| self.recovery);
            }
            Scheme::ReplicatedPs => {
                let cost = |unit: u32| {
                    if unit < self.ranks {
                        self.worker_deadline
                    } else {
                        self.failover
                    }
                };
                sim.pauses(&mut clocks, failures, cost);
            }
        }
        let fraction = if sim.now > 0.0 {
            sim.work / sim.now
        } else {
            1.0
        };
        if fraction.is_finite() {
            Ok(fraction.clamp(0.0, 1.0))
        } else {
            // Steps so short against the failures that the clock cannot count them.
            Err(AvailabilityError::OutOfRange {
                what: "step against mtbf (the simulation's clock cannot count the steps)",
                range: "a step above 1e-12 of the job's MTBF",
                value: self.step,
            })
        }
    }
}

/// Every unit's next failure time, earliest first.
struct Clocks {
    /// `(Reverse(time), unit)`: a min-heap on time. Times are finite and non-negative, so their
    /// bits order as the numbers do.
    heap: BinaryHeap<(std::cmp::Reverse<u64>, u32)>,
    mtbf: f64,
    rng: rand::rngs::StdRng,
}

impl Clocks {
    fn new(units: u32, mtbf: f64, seed: u64) -> Self {
        let mut c = Clocks {
            heap: BinaryHeap::with_capacity(units as usize),
            mtbf,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        };
        for u in 0..units {
            c.arm(u, 0.0);
        }
        c
    }

    /// Schedules unit `u`'s next failure, an exponential time after `from`.
    fn arm(&mut self, u: u32, from: f64) {
        // 1 - U is in (0, 1], so the logarithm is finite.
        let life = -self.mtbf * (1.0 - self.rng.random::<f64>()).ln();
        self.heap
            .push((std::cmp::Reverse((from + life).to_bits()), u));
    }

    /// The next failure: its time and unit (there is always one: units >= 1).
    fn next(&self) -> (f64, u32) {
        self.heap
            .peek()
            .map_or((f64::INFINITY, 0), |&(std::cmp::Reverse(t), u)| {
                (f64::from_bits(t), u)
            })
    }

    /// Takes the next failure and replaces its unit (a fresh clock from the failure).
    fn fail(&mut self) -> (f64, u32) {
        let (t, u) = self.next();
        self.heap.pop();
        self.arm(u, t);
        (t, u)
    }
}

#[derive(Default)]
struct Progress {
    now: f64,
    work: f64,
    failures: u64,
}

impl Progress {
    /// A recovery of `cost(unit)` after unit's failure at `self.now`; a failure during it starts
    /// a recovery of its own. Ends early once `budget` failures have happened: a job that fails
    /// far faster than it recovers would otherwise take e^(lambda cost) rounds to get out.
    fn recover(
        &mut self,
        clocks: &mut Clocks,
        mut unit: u32,
        cost: &impl Fn(u32) -> f64,
        budget: u64,
    ) {
        while self.failures < budget {
            let end = self.now + cost(unit);
            let (t, _) = clocks.next();
            if t >= end {
                self.now = end;
                return;
            }
            let (t, u) = clocks.fail();
            self.failures += 1;
            self.now = t;
            unit = u;
        }
    }

    /// Segments of `tau` useful seconds taking `len`, each lost whole at a failure, a recovery
    /// after each failure.
    fn segments(
        &mut self,
        clocks: &mut Clocks,
        failures: u64,
        tau: f64,
        len: f64,
        cost: impl Fn(u32) -> f64,
    ) {
        while self.failures < failures {
            // The whole segments that end before the next failure, at once: a 1 s step between
            // failures days apart would otherwise be a billion iterations.
            let (t, _) = clocks.next();
            let whole = ((t - self.now) / len).floor();
            if whole >= 1.0 {
                self.now += whole * len;
                self.work += whole * tau;
                continue;
            }
            let (t, u) = clocks.fail();
            self.failures += 1;
            self.now = t;
            self.recover(clocks, u, &cost, failures);
        }
    }

    /// Work at the full pace until a failure, then a pause of `cost(unit)`; nothing is lost.
    fn pauses(&mut self, clocks: &mut Clocks, failures: u64, cost: impl Fn(u32) -> f64) {
        while self.failures < failures {
            let (t, u) = clocks.fail();
            self.failures += 1;
            self.work += t - self.now;
            self.now = t;
            self.recover(clocks, u, &cost, failures);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model where failures are frequent enough to matter for every scheme, so that the
    /// simulation tests the closed forms where they bend, not where they are all 1.
    fn stressed() -> JobModel {
        JobModel {
            ranks: 64,
            mtbf: 64.0 * 200.0, // one failure every 200 s in the job
            step: 5.0,
            checkpoint: 20.0,
            checkpoint_interval: None,
            restart: 60.0,
            recovery: 10.0,
            survive_overhead: 0.2,
            servers: 16,
            worker_deadline: 30.0,
            failover: 50.0,
        }
    }

    #[test]
    fn the_closed_forms_match_the_simulation_within_one_percent() {
        for m in [stressed(), JobModel::default()] {
            for scheme in Scheme::ALL {
                let closed = m.progress(scheme).unwrap();
                let sim = m.simulate(scheme, 200_000, 7).unwrap();
                assert!(
                    (closed - sim).abs() <= 0.01 * closed,
                    "{}: closed form {closed}, simulated {sim}",
                    scheme.name()
                );
                // Near 1 the progress agrees whatever the model says: the loss is the test.
                let (lc, ls) = (1.0 - closed, 1.0 - sim);
                assert!(
                    (lc - ls).abs() <= 0.02 * lc,
                    "{}: loss closed form {lc}, simulated {ls}",
                    scheme.name()
                );
            }
        }
    }

    /// The simulation is not the closed form in disguise: a closed form with a planted error
    /// (the restart forgotten, or a failure during a recovery not restarting it) is more than
    /// 1% off the simulation.
    #[test]
    fn the_simulation_catches_a_wrong_closed_form() {
        let m = stressed();
        let sim = m.simulate(Scheme::CheckpointRestart, 200_000, 11).unwrap();
        let tau = m.interval().unwrap();
        let lambda = 1.0 / m.job_mtbf(Scheme::CheckpointRestart).unwrap();
        let no_restart = segment_progress(tau, tau + m.checkpoint, 0.0, lambda);
        assert!((no_restart - sim).abs() > 0.01 * sim, "{no_restart} {sim}");
        let sim = m.simulate(Scheme::ReplicatedPs, 200_000, 11).unwrap();
        let lambda = 1.0 / m.job_mtbf(Scheme::ReplicatedPs).unwrap();
        // First order: each failure's pause counted once, none restarted.
        let share = f64::from(m.ranks) / f64::from(m.ranks + m.servers);
        let mean_pause = share * m.worker_deadline + (1.0 - share) * m.failover;
        let first_order = 1.0 / (1.0 + lambda * mean_pause);
        assert!(
            (first_order - sim).abs() > 0.01 * sim,
            "{first_order} {sim}"
        );
    }

    #[test]
    fn limits_and_orderings() {
        // No failures to speak of: every scheme is at (about) full pace, the checkpointing one
        // below by its checkpoints' share.
        let m = JobModel {
            mtbf: 1e15,
            ..JobModel::default()
        };
        assert!(m.progress(Scheme::SurvivingRing).unwrap() > 0.999_999);
        assert!(m.progress(Scheme::ReplicatedPs).unwrap() > 0.999_999);
        // Bigger jobs fail more often: progress falls with the ranks, for every scheme.
        for scheme in Scheme::ALL {
            let mut last = 1.0;
            for ranks in [64, 1024, 16_384, 131_072] {
                let p = JobModel {
                    ranks,
                    servers: ranks / 8,
                    ..JobModel::default()
                }
                .progress(scheme)
                .unwrap();
                assert!(p > 0.0 && p < last, "{} at {ranks}: {p}", scheme.name());
                last = p;
            }
        }
        // The surviving ring beats checkpoint-restart at the default figures.
        let m = JobModel::default();
        assert!(
            m.progress(Scheme::SurvivingRing).unwrap()
                > m.progress(Scheme::CheckpointRestart).unwrap()
        );
        // Young's interval at the defaults: sqrt(2 * 60 s * 50,000 h / 1024).
        let young = (2.0 * 60.0 * 50_000.0 * 3600.0 / 1024.0f64).sqrt();
        assert!((m.interval().unwrap() - young).abs() < 1e-6);
        // A job that fails far faster than it can recover makes (almost) no progress, and
        // says so with a number, not a NaN.
        let hopeless = JobModel {
            mtbf: 1.0,
            ranks: 10_000,
            ..JobModel::default()
        };
        for scheme in Scheme::ALL {
            let p = hopeless.progress(scheme).unwrap();
            assert!(p.is_finite() && (0.0..1e-6).contains(&p), "{p}");
            // The simulation ends too (its recoveries count against the failures asked for;
            // cut off inside one endless recovery, it keeps the work before it, hence 1e-3).
            let s = hopeless.simulate(scheme, 10_000, 1).unwrap();
            assert!((0.0..1e-3).contains(&s), "{} {s}", scheme.name());
        }
        // Failures too rare to register: a number, not an infinity.
        let calm = JobModel {
            step: 1e-300,
            mtbf: 1e300,
            ..JobModel::default()
        };
        for scheme in Scheme::ALL {
            let p = calm.progress(scheme).unwrap();
            assert!(p.is_finite() && p <= 1.0, "{} {p}", scheme.name());
        }
        // More units than the simulation keeps clocks for: refused, not 64 GiB asked for.
        let huge = JobModel {
            ranks: u32::MAX,
            ..JobModel::default()
        };
        assert!(huge.simulate(Scheme::SurvivingRing, 1, 1).is_err());
    }

    #[test]
    fn bad_models_are_refused_naming_the_field() {
        let bad = [
            (
                JobModel {
                    ranks: 0,
                    ..JobModel::default()
                },
                "ranks",
            ),
            (
                JobModel {
                    mtbf: 0.0,
                    ..JobModel::default()
                },
                "mtbf",
            ),
            (
                JobModel {
                    step: f64::NAN,
                    ..JobModel::default()
                },
                "step",
            ),
            (
                JobModel {
                    restart: -1.0,
                    ..JobModel::default()
                },
                "restart",
            ),
            (
                JobModel {
                    checkpoint_interval: Some(0.0),
                    ..JobModel::default()
                },
                "interval",
            ),
        ];
        for (m, field) in bad {
            let e = m.progress(Scheme::SurvivingRing).unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
            assert!(m.simulate(Scheme::ReplicatedPs, 10, 1).is_err());
        }
    }
}
