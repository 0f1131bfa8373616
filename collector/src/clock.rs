//! Kernel timestamps (`CLOCK_BOOTTIME`, what `bpf_ktime_get_boot_ns` returns) to wall-clock time,
//! and RFC 3339 formatting.

use std::time::{Duration, SystemTime};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Nanoseconds since boot, suspend included: the clock of the kernel programs' timestamps.
pub fn boot_ns_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_BOOTTIME always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a `CLOCK_BOOTTIME` timestamp, as of now (a later wall-clock step
/// moves it; the boot time line does not).
pub fn boot_ns_to_system_time(boot_ns: u64) -> SystemTime {
    let now_boot = boot_ns_now();
    let now = SystemTime::now();
    if boot_ns <= now_boot {
        now - Duration::from_nanos(now_boot - boot_ns)
    } else {
        now + Duration::from_nanos(boot_ns - now_boot)
    }
}

/// RFC 3339 with nanoseconds, in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Clock ticks per second of `/proc/PID/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
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
}
