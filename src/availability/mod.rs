//! Availability arithmetic: the lecture's nines and replicas, and a job-level model of how much
//! of its wall-clock a training job spends making progress under each way of surviving failures
//! ([`job`]).
//!
//! The lecture's numbers, which the unit tests below hold:
//!
//! ```
//! use wccl::availability::{downtime_minutes_per_year, replicas_needed, replicated};
//! // 99.99% allows 52.56 minutes of downtime a year.
//! assert!((downtime_minutes_per_year(0.9999)? - 52.56).abs() < 1e-9);
//! // Two independent servers of 99% each reach four nines.
//! assert!((replicated(0.99, 2)? - 0.9999).abs() < 1e-12);
//! assert_eq!(replicas_needed(0.99, 0.9999)?, 2);
//! # Ok::<(), wccl::availability::AvailabilityError>(())
//! ```
//!
//! Replicas are taken as independent: a failure that takes several down together (one switch,
//! one power feed, one bad release) is outside this arithmetic, as it is outside the lecture's.

pub mod job;
pub mod report;

/// Minutes in a (365-day) year: the lecture's 525,600.
pub const MINUTES_PER_YEAR: f64 = 525_600.0;

/// The most replicas [`replicas_needed`] will consider.
pub const MAX_REPLICAS: u32 = 1_000;

/// A number outside the range the arithmetic is defined on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AvailabilityError {
    /// An argument outside its range (or not a finite number).
    #[error("{what} must be {range}, not {value}")]
    OutOfRange {
        /// Which argument.
        what: &'static str,
        /// The range it must be in, in words.
        range: &'static str,
        /// The value given.
        value: f64,
    },
    /// No number of replicas up to [`MAX_REPLICAS`] reaches the target.
    #[error(
        "no number of replicas up to {max} of availability {node} each reaches {target} (a node that is never up never helps; a target of 1 is never reached)"
    )]
    Unreachable {
        /// Each replica's availability.
        node: f64,
        /// The availability wanted.
        target: f64,
        /// The most replicas considered.
        max: u32,
    },
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, AvailabilityError>;

/// `value` if it is a probability (finite, in `[0, 1]`).
pub(crate) fn probability(what: &'static str, value: f64) -> Result<f64> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(AvailabilityError::OutOfRange {
            what,
            range: "a probability in [0, 1]",
            value,
        })
    }
}

/// The availability of `nines` nines: `1 - 10^-nines` (4 gives 0.9999). Fractional nines are
/// allowed (3.5 is 99.968%).
pub fn availability_from_nines(nines: f64) -> Result<f64> {
    if !nines.is_finite() || nines < 0.0 {
        return Err(AvailabilityError::OutOfRange {
            what: "nines",
            range: "a finite number >= 0",
            value: nines,
        });
    }
    Ok(1.0 - 10f64.powf(-nines))
}

/// How many nines `availability` has: `-log10(1 - availability)` (infinite for 1).
pub fn nines(availability: f64) -> Result<f64> {
    let a = probability("availability", availability)?;
    Ok(-(1.0 - a).log10())
}

/// Minutes of downtime a year that `availability` allows: `(1 - availability) * 525,600`.
pub fn downtime_minutes_per_year(availability: f64) -> Result<f64> {
    let a = probability("availability", availability)?;
    Ok((1.0 - a) * MINUTES_PER_YEAR)
}

/// The availability of `n` independent replicas of availability `node` each, any one of which
/// serves: `1 - (1 - node)^n` (the system is down only when all are).
pub fn replicated(node: f64, n: u32) -> Result<f64> {
    let p = probability("node availability", node)?;
    let n = i32::try_from(n).map_err(|_| AvailabilityError::OutOfRange {
        what: "replicas",
        range: "at most 2^31 - 1",
        value: f64::from(n),
    })?;
    Ok(1.0 - (1.0 - p).powi(n))
}

/// The fewest independent replicas of availability `node` each whose [`replicated`]
/// availability reaches `target` (1 for any target when `node` is 1, and for a target of 0).
///
/// Compared in the unavailability domain with a relative slack of 1e-9, so that 2 replicas of
/// 0.99 reach 0.9999 although `1 - 0.99` is not exactly `0.01` in binary.
pub fn replicas_needed(node: f64, target: f64) -> Result<u32> {
    let p = probability("node availability", node)?;
    let t = probability("target availability", target)?;
    let (down, allowed) = (1.0 - p, 1.0 - t);
    if allowed == 0.0 && down > 0.0 {
        // Never reached: the product below would underflow to 0 and seem to.
        return Err(AvailabilityError::Unreachable {
            node,
            target,
            max: MAX_REPLICAS,
        });
    }
    let limit = allowed * (1.0 + 1e-9);
    let mut unavailable = 1.0;
    for n in 1..=MAX_REPLICAS {
        unavailable *= down;
        if unavailable <= limit {
            return Ok(n);
        }
    }
    Err(AvailabilityError::Unreachable {
        node,
        target,
        max: MAX_REPLICAS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn the_lectures_year_and_four_nines() {
        assert_eq!(MINUTES_PER_YEAR, 365.0 * 24.0 * 60.0);
        let four = availability_from_nines(4.0).unwrap();
        assert!(close(four, 0.9999, 1e-15));
        assert!(close(downtime_minutes_per_year(four).unwrap(), 52.56, 1e-9));
        // Every number of nines: 10x less downtime per nine.
        for k in 0..=9 {
            let a = availability_from_nines(f64::from(k)).unwrap();
            let want = MINUTES_PER_YEAR / 10f64.powi(k);
            assert!(
                close(downtime_minutes_per_year(a).unwrap(), want, want * 1e-6),
                "{k}"
            );
            assert!(close(nines(a).unwrap(), f64::from(k), 1e-6), "{k}");
        }
        assert!(close(
            downtime_minutes_per_year(0.999).unwrap(),
            525.6,
            1e-9
        ));
        assert_eq!(nines(1.0).unwrap(), f64::INFINITY);
    }

    #[test]
    fn two_servers_of_99_percent_reach_four_nines() {
        assert!(close(replicated(0.99, 1).unwrap(), 0.99, 1e-15));
        assert!(close(replicated(0.99, 2).unwrap(), 0.9999, 1e-12));
        assert!(close(replicated(0.99, 3).unwrap(), 0.999999, 1e-12));
        assert_eq!(replicas_needed(0.99, 0.9999).unwrap(), 2);
        // One more nine than two replicas give needs a third.
        assert_eq!(replicas_needed(0.99, 0.99999).unwrap(), 3);
        assert_eq!(replicas_needed(0.99, 0.99).unwrap(), 1);
        assert_eq!(replicas_needed(0.9, 0.9999).unwrap(), 4);
        assert_eq!(replicas_needed(0.5, 0.99).unwrap(), 7);
        assert_eq!(replicas_needed(1.0, 1.0).unwrap(), 1);
        assert_eq!(replicas_needed(0.3, 0.0).unwrap(), 1);
    }

    /// The n found is the smallest that reaches the target, checked on both sides with `powi`
    /// (not the walk the function does) in the unavailability domain, where nine nines still
    /// have their digits, over a grid of nodes and targets.
    #[test]
    fn replicas_needed_is_the_smallest_that_reaches_the_target() {
        for node in [0.5, 0.9, 0.95, 0.99, 0.999, 0.9999] {
            for target_nines in [1.0, 2.0, 3.0, 4.0, 5.0, 6.5, 9.0] {
                let target = availability_from_nines(target_nines).unwrap();
                let n = replicas_needed(node, target).unwrap();
                let allowed = (1.0 - target) * (1.0 + 1e-9);
                let down = |k: u32| (1.0 - node).powi(k as i32);
                assert!(down(n) <= allowed, "{node} {target}: {n}");
                assert!(n == 1 || down(n - 1) > allowed, "{node} {target}: {n}");
            }
        }
    }

    #[test]
    fn bad_numbers_are_errors_that_name_them() {
        for bad in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let e = downtime_minutes_per_year(bad).unwrap_err();
            assert!(e.to_string().contains("availability"), "{e}");
            assert!(replicated(bad, 2).is_err());
            assert!(replicas_needed(bad, 0.9).is_err());
            assert!(replicas_needed(0.9, bad).is_err());
        }
        assert!(availability_from_nines(-1.0).is_err());
        assert!(availability_from_nines(f64::NAN).is_err());
        assert!(matches!(
            replicas_needed(0.0, 0.5),
            Err(AvailabilityError::Unreachable { .. })
        ));
        assert!(matches!(
            replicas_needed(0.99, 1.0),
            Err(AvailabilityError::Unreachable { .. })
        ));
        assert!(replicated(0.9, u32::MAX).is_err());
    }
}
