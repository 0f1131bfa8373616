//! Each instance's share of userspace's line handling: a token bucket in bytes, each line
//! costing its bytes and [`LINE_COST`] more. Pure, no clock of its own: the caller says when.
//!
//! The kernel's budget bounds bytes, not lines: 1 MiB of `\n` is a million lines, and each
//! line costs userspace far more than a byte does. Lines over this share are given up before
//! they become records (counted, `where="line_budget"`, and marked with one gap record), so a
//! guest printing empty lines at full speed cannot take the reader's CPU from its neighbours.

use std::time::Instant;

/// What a line costs beyond its bytes: about a record's overhead.
pub(crate) const LINE_COST: u64 = 64;

#[derive(Debug, Clone)]
pub(crate) struct LineBudget {
    /// Bytes per second; 0: no budget.
    rate: u64,
    burst: u64,
    tokens: u64,
    at: Instant,
}

impl LineBudget {
    /// Twice the kernel's budget (`rate`, `burst` in bytes per second and bytes): whatever the
    /// kernel lets through in lines of ordinary length passes here too.
    pub(crate) fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate.saturating_mul(2),
            burst: burst.saturating_mul(2),
            tokens: burst.saturating_mul(2),
            at: now,
        }
    }

    /// Takes what a line of `bytes` costs; false when the instance has not got it.
    pub(crate) fn take(&mut self, bytes: usize, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at);
        let earned = (elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000) as u64;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            self.at = now;
        }
        let cost = bytes as u64 + LINE_COST;
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        // 1000 B/s and 1000 B of burst in the kernel: 2000 and 2000 here.
        let mut b = LineBudget::new(1000, 1000, t0);
        // 2000 / (36 + 64) = 20 lines of 36 bytes at once, not 21.
        assert_eq!((0..21).filter(|_| b.take(36, t0)).count(), 20);
        // 50 ms later: 100 bytes earned, one line.
        let t1 = t0 + Duration::from_millis(50);
        assert!(b.take(36, t1));
        assert!(!b.take(36, t1));
        // A long quiet spell refills the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..30).filter(|_| b.take(36, t2)).count(), 20);
        let mut free = LineBudget::new(0, 0, t0);
        assert!((0..10_000).all(|_| free.take(1 << 20, t0)));
    }
}
