//! Kernel timestamps (`CLOCK_BOOTTIME`, what `bpf_ktime_get_boot_ns` returns) to wall-clock time,
//! and RFC 3339 formatting.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Nanoseconds since boot, suspend included: the clock of the kernel programs' timestamps.
pub(crate) fn boot_ns_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &raw mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a `CLOCK_BOOTTIME` timestamp, as of now (a later wall-clock step
/// moves it; the boot time line does not).
pub(crate) fn boot_ns_to_system_time(boot_ns: u64) -> SystemTime {
    let now_boot = boot_ns_now();
    let now = SystemTime::now();
    if boot_ns <= now_boot {
        now - Duration::from_nanos(now_boot - boot_ns)
    } else {
        now + Duration::from_nanos(boot_ns - now_boot)
    }
}

/// RFC 3339 with nanoseconds, in UTC.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// An RFC 3339 time, as [`rfc3339`] writes it.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// The `CLOCK_BOOTTIME` of a wall-clock time, as of now (0 for a time before this boot).
pub(crate) fn system_time_to_boot_ns(t: SystemTime) -> u64 {
    let now_boot = boot_ns_now();
    match SystemTime::now().duration_since(t) {
        Ok(ago) => now_boot.saturating_sub(u64::try_from(ago.as_nanos()).unwrap_or(u64::MAX)),
        Err(ahead) => {
            now_boot.saturating_add(u64::try_from(ahead.duration().as_nanos()).unwrap_or(u64::MAX))
        }
    }
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// Bytes per page (the unit of the kernel's memory counters).
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

/// `CLOCK_BOOTTIME` to wall-clock time, with the offset taken once per batch (two clock reads
/// per line would cost more than the rest of the line's handling).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BootClock {
    wall_at_boot_ns: i128,
}

impl BootClock {
    pub(crate) fn now() -> Self {
        let boot = i128::from(boot_ns_now());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Self {
            wall_at_boot_ns: wall - boot,
        }
    }

    pub(crate) fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (self.wall_at_boot_ns + i128::from(boot_ns)).max(0);
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_round_trip_is_close() {
        let t = boot_ns_to_system_time(boot_ns_now());
        let skew = SystemTime::now().duration_since(t).unwrap_or_default();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
        assert!(rfc3339(t).ends_with('Z'));
    }

    #[test]
    fn rfc3339_round_trip_and_boot_clock() {
        let t = UNIX_EPOCH + Duration::new(1_800_000_000, 120_000_001);
        assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
        let now = boot_ns_now();
        let back = system_time_to_boot_ns(boot_ns_to_system_time(now));
        assert!(back.abs_diff(now) < 50_000_000, "{back} vs {now}");
        assert_eq!(system_time_to_boot_ns(UNIX_EPOCH), 0);
    }

    #[test]
    fn boot_clock_agrees_with_the_per_call_conversion() {
        let now = boot_ns_now();
        let a = BootClock::now().wall(now);
        let b = boot_ns_to_system_time(now);
        let skew = a.duration_since(b).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(50), "{skew:?}");
    }
}
