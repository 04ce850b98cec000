//! Deadlines from user- or peer-supplied durations, without overflow.
//!
//! `Instant + Duration` panics when the sum does not fit (`Duration::MAX` as a timeout), so every
//! deadline in the crate comes from here: a timeout too long to represent means "practically
//! never", capped at [`FAR_FUTURE`] from now.

use std::time::{Duration, Instant};

/// The latest deadline the crate sets: a year from now stands for "no deadline" and still fits
/// an `Instant` on every platform.
pub(crate) const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);

/// `start + timeout`, or `start + FAR_FUTURE` when that is earlier or the sum overflows.
pub(crate) fn deadline_from(start: Instant, timeout: Duration) -> Instant {
    let t = timeout.min(FAR_FUTURE);
    start
        .checked_add(t)
        // Both sums failing would need an `Instant` within a year of its end: keep `start`,
        // which makes the wait end at once rather than panic.
        .unwrap_or(start)
}

/// The deadline `timeout` from now (see [`deadline_from`]).
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    deadline_from(Instant::now(), timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_are_capped_not_panics() {
        let now = Instant::now();
        let d = deadline_from(now, Duration::MAX);
        assert_eq!(d, now + FAR_FUTURE);
        assert_eq!(
            deadline_from(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
        assert!(deadline_after(Duration::MAX) > Instant::now() + Duration::from_secs(3600));
    }
}
