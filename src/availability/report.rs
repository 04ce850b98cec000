//! The text `wccl-bench availability` prints: the lecture's table, one number of nines, one
//! replica count, and the job model over job sizes (with its Monte Carlo check).

use std::fmt::Write;

use super::job::{JobModel, Scheme};
use super::{
    Result, availability_from_nines, downtime_minutes_per_year, nines, replicas_needed, replicated,
};

/// Minutes as the largest unit that keeps them readable.
fn duration(minutes: f64) -> String {
    match minutes {
        m if m >= 2.0 * 24.0 * 60.0 => format!("{:.2} days", m / (24.0 * 60.0)),
        m if m >= 120.0 => format!("{:.2} hours", m / 60.0),
        m if m >= 1.0 => format!("{m:.2} minutes"),
        m => format!("{:.2} seconds", m * 60.0),
    }
}

/// "4 nines (99.99%): 52.56 minutes of downtime a year".
pub fn nines_line(n: f64) -> Result<String> {
    let a = availability_from_nines(n)?;
    let minutes = downtime_minutes_per_year(a)?;
    Ok(format!(
        "{n} nines ({}%): {} of downtime a year ({minutes:.2} minutes)",
        percent(a),
        duration(minutes)
    ))
}

/// An availability as a percentage with as many digits as its nines need.
fn percent(a: f64) -> String {
    // A hair below each whole number of nines, so that 0.9999 (4.0000000000001 nines in binary)
    // prints as 99.99, not 99.990.
    let digits = nines(a).map_or(2, |n| {
        ((n - 1e-6).ceil() as usize).saturating_sub(2).min(12)
    });
    format!("{:.*}", digits, a * 100.0)
}

/// "target 0.9999 from nodes of 0.99: 2 replicas, reaching 99.99% (52.56 minutes ...)".
pub fn replicas_line(node: f64, target: f64) -> Result<String> {
    let n = replicas_needed(node, target)?;
    let reached = replicated(node, n)?;
    Ok(format!(
        "target {target} from independent nodes of {node} each: {n} replica{}, reaching {}% \
         ({:.2} nines, {} of downtime a year)",
        if n == 1 { "" } else { "s" },
        percent(reached),
        nines(reached)?,
        duration(downtime_minutes_per_year(reached)?)
    ))
}

/// The lecture's arithmetic as a table: downtime for 1 to 6 nines, and what replicas of 99%
/// (and of 99.9%) nodes reach.
pub fn lecture_table() -> Result<String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# downtime a year (525,600 minutes) for each number of nines"
    );
    let _ = writeln!(s, "# nines  availability     downtime a year");
    for k in 1..=6 {
        let a = availability_from_nines(f64::from(k))?;
        let _ = writeln!(
            s,
            "  {k:>5}  {:>13}%  {:>18}",
            percent(a),
            duration(downtime_minutes_per_year(a)?)
        );
    }
    let _ = writeln!(
        s,
        "# independent replicas: availability = 1 - (1 - p)^N (down only when all are)"
    );
    let _ = writeln!(s, "#     p  N  availability     nines  downtime a year");
    for p in [0.99, 0.999] {
        for n in 1..=3 {
            let a = replicated(p, n)?;
            let _ = writeln!(
                s,
                "  {p:>5}  {n}  {:>13}%  {:>6.2}  {:>15}",
                percent(a),
                nines(a)?,
                duration(downtime_minutes_per_year(a)?)
            );
        }
    }
    Ok(s)
}

/// One row of the job table: a job size and each scheme's progress (closed form, and the
/// simulation's where asked for).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Ranks in the job.
    pub ranks: u32,
    /// The job's MTBF (seconds) counting its ranks only.
    pub job_mtbf: f64,
    /// Per scheme, in [`Scheme::ALL`]'s order: the closed form and the simulation.
    pub progress: Vec<(f64, Option<f64>)>,
}

impl JobRow {
    /// The largest relative difference between the closed form and the simulation, of the
    /// progress and of the loss (1 - progress): near 1 the progress always agrees, the loss is
    /// what the model predicts. NaN (which `max` would drop) counts as infinitely far.
    pub fn worst_difference(&self) -> (f64, f64) {
        let rel = |a: f64, b: f64| {
            let d = ((a - b) / b).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        };
        self.progress
            .iter()
            .filter_map(|&(c, s)| s.map(|s| (rel(s, c), rel(1.0 - s, 1.0 - c))))
            .fold((0.0, 0.0), |(p, l), (dp, dl)| (p.max(dp), l.max(dl)))
    }

    /// Whether the simulation, over `failures` failures, confirms the closed forms: the
    /// progress within 1%, and the loss within 1% or its statistical noise (5 / sqrt(failures)
    /// relative), whichever is larger.
    pub fn agrees(&self, failures: u64) -> bool {
        let (p, l) = self.worst_difference();
        p <= 0.01 && l <= loss_tolerance(failures)
    }
}

/// The relative difference in loss the simulation of `failures` failures can show by chance.
pub fn loss_tolerance(failures: u64) -> f64 {
    (5.0 / (failures.max(1) as f64).sqrt()).max(0.01)
}

/// The model at each of `ranks` (servers: one per `ranks_per_server`, at least one), each
/// simulated over `simulate` failures when that is not 0.
pub fn job_rows(
    base: &JobModel,
    ranks: &[u32],
    ranks_per_server: u32,
    simulate: u64,
    seed: u64,
) -> Result<Vec<JobRow>> {
    ranks
        .iter()
        .map(|&n| {
            let m = JobModel {
                ranks: n,
                servers: (n / ranks_per_server.max(1)).max(1),
                ..base.clone()
            };
            let progress = Scheme::ALL
                .iter()
                .map(|&s| {
                    let sim = (simulate > 0)
                        .then(|| m.simulate(s, simulate, seed))
                        .transpose()?;
                    Ok((m.progress(s)?, sim))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(JobRow {
                ranks: n,
                job_mtbf: m.job_mtbf(Scheme::SurvivingRing)?,
                progress,
            })
        })
        .collect()
}

/// The job table: the model's figures, then a row per job size.
pub fn job_table(base: &JobModel, ranks_per_server: u32, rows: &[JobRow]) -> String {
    let mut s = String::new();
    let interval = base
        .checkpoint_interval
        .map_or("Young's optimum".to_string(), |i| format!("{i} s"));
    let _ = writeln!(
        s,
        "# fraction of wall-clock making progress: MTBF {:.0} hours per rank and per server, \
         step {} s",
        base.mtbf / 3600.0,
        base.step
    );
    let _ = writeln!(
        s,
        "#   fail-stop ring: checkpoint {} s every {interval} of work, restart {} s",
        base.checkpoint, base.restart
    );
    let _ = writeln!(
        s,
        "#   surviving ring: recovery {} s, survive mode's cost {}% of a step",
        base.recovery,
        base.survive_overhead * 100.0
    );
    let _ = writeln!(
        s,
        "#   replicated PS: one server per {ranks_per_server} ranks, dead worker {} s \
         (deadline), dead server {} s (failover)",
        base.worker_deadline, base.failover
    );
    let simulated = rows
        .iter()
        .any(|r| r.progress.iter().any(|p| p.1.is_some()));
    let _ = write!(s, "#   ranks  job MTBF (h)");
    for scheme in Scheme::ALL {
        let _ = write!(s, "  {:>11}", short(scheme));
        if simulated {
            let _ = write!(s, "  {:>11}", "simulated");
        }
    }
    let _ = writeln!(s);
    for r in rows {
        let _ = write!(s, "  {:>7}  {:>12.2}", r.ranks, r.job_mtbf / 3600.0);
        for &(c, sim) in &r.progress {
            let _ = write!(s, "  {:>11.6}", c);
            if simulated {
                match sim {
                    Some(x) => {
                        let _ = write!(s, "  {x:>11.6}");
                    }
                    None => {
                        let _ = write!(s, "  {:>11}", "-");
                    }
                }
            }
        }
        let _ = writeln!(s);
    }
    s
}

/// A column heading for `scheme`.
pub fn short(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::CheckpointRestart => "fail-stop",
        Scheme::SurvivingRing => "surviving",
        Scheme::ReplicatedPs => "PS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_the_issue_names() {
        let four = nines_line(4.0).unwrap();
        assert!(four.contains("52.56 minutes"), "{four}");
        assert!(four.contains("99.99%"), "{four}");
        let two = replicas_line(0.99, 0.9999).unwrap();
        assert!(two.contains(": 2 replicas"), "{two}");
        assert!(two.contains("99.99%"), "{two}");
        let table = lecture_table().unwrap();
        assert!(table.contains("52.56 minutes"), "{table}");
        assert!(table.contains("36.50 days"), "{table}");
        assert!(table.contains("8.76 hours"), "{table}");
        assert!(nines_line(-1.0).is_err());
        assert!(replicas_line(0.99, 1.0).is_err());
    }

    #[test]
    fn the_job_table_has_a_row_per_size_and_the_simulation_beside() {
        let base = JobModel::default();
        let rows = job_rows(&base, &[64, 1024], 8, 20_000, 3).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.progress.len() == 3));
        assert!(rows.iter().all(|r| r.agrees(20_000)), "{rows:?}");
        let t = job_table(&base, 8, &rows);
        assert!(t.contains("simulated"), "{t}");
        assert_eq!(t.lines().filter(|l| !l.starts_with('#')).count(), 2, "{t}");
    }
}
