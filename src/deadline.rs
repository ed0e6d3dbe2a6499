//! Deadlines from durations a user gave: one too long for an [`Instant`] (`Duration::MAX` is
//! the natural way to say "no limit") means no deadline, never an overflow panic.

use std::time::{Duration, Instant};

/// So far off that it never comes (a timer that needs an `Instant` for "never").
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `d` from now, or `None` (no deadline) if that is past what an `Instant` can hold.
pub(crate) fn after(d: Duration) -> Option<Instant> {
    Instant::now().checked_add(d)
}

/// `from + d`, or a time a century off if that is past what an `Instant` can hold.
pub(crate) fn at_or_never(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .unwrap_or_else(|| from.checked_add(NEVER).unwrap_or(from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_duration_is_no_deadline_not_a_panic() {
        assert!(after(Duration::MAX).is_none());
        let now = Instant::now();
        assert!(at_or_never(now, Duration::MAX) >= now + NEVER);
        let soon = after(Duration::from_secs(1)).unwrap();
        assert!(soon > now && soon <= Instant::now() + Duration::from_secs(1));
        assert_eq!(
            at_or_never(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
    }
}
