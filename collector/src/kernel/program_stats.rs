//! The kernel's BPF run-time statistics, which `collector_ebpf_program_*` read.
//!
//! While any process holds a `BPF_ENABLE_STATS` descriptor (or the sysctl
//! `kernel.bpf_stats_enabled` is set), the kernel reads the clock before and after every run
//! of every BPF program on the host (ours and everyone else's): about 80 ns a run here. So the
//! collector holds one only when `kernel.program_stats` asks: never (`off`, the default),
//! always (`on`), or for a window of `program_stats_sample_seconds` every
//! `program_stats_every_seconds` (`sampled`). Holding one needs CAP_SYS_ADMIN, which the
//! DaemonSet does not grant: there an operator sets the sysctl for as long as the figures are
//! wanted. Either way the collector counts the seconds the statistics were on, so a program's
//! mean cost is `run_seconds / runs` and its CPU share `rate(run_seconds) /
//! rate(collector_ebpf_program_stats_seconds_total)`: run time per second of counting.

use std::{
    os::fd::OwnedFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{KernelConfig, ProgramStatsMode};

/// The administrator's switch for the same statistics.
const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Turns the kernel's statistics on and off, and counts the time they were on.
#[derive(Clone, Default)]
pub(crate) struct ProgramStatsSwitch(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    fd: Option<OwnedFd>,
    /// When the collector took the descriptor it holds.
    since: Option<Instant>,
    /// Time the statistics were on before `since`: held by the collector (exact), or set
    /// with the sysctl while it held nothing (seen once a second).
    counted: Duration,
    /// The kernel refused once already (logged once, not at every window).
    refused: bool,
}

impl std::fmt::Debug for ProgramStatsSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramStatsSwitch").finish_non_exhaustive()
    }
}

/// How often the switch looks at the sysctl and counts.
const TICK: Duration = Duration::from_secs(1);

impl ProgramStatsSwitch {
    /// Holds a statistics descriptor until [`Self::off`]; a refusal (it needs CAP_SYS_ADMIN)
    /// is logged once.
    pub(crate) fn on(&self) {
        let mut held = self.0.lock().expect("stats lock");
        if held.fd.is_some() {
            return;
        }
        match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => {
                held.fd = Some(fd);
                held.since = Some(Instant::now());
            }
            Err(error) if !held.refused => {
                held.refused = true;
                warn!(
                    %error,
                    "kernel BPF statistics refused (they need CAP_SYS_ADMIN); \
                     collector_ebpf_program_* move only while kernel.bpf_stats_enabled is set"
                );
            }
            Err(_) => {}
        }
    }

    /// Lets go of the descriptor (the kernel stops counting unless someone else holds one).
    pub(crate) fn off(&self) {
        let mut held = self.0.lock().expect("stats lock");
        if let Some(since) = held.since.take() {
            held.counted += since.elapsed();
        }
        held.fd = None;
    }

    /// Adds `elapsed` to the counted time if the sysctl had the statistics on while the
    /// collector held nothing (its own holding is counted exactly by `on`/`off`).
    fn count_sysctl(&self, elapsed: Duration, sysctl_set: bool) {
        let mut held = self.0.lock().expect("stats lock");
        if held.fd.is_none() && sysctl_set {
            held.counted += elapsed;
        }
    }

    /// Seconds the statistics were on while the collector ran, the current window included.
    pub(crate) fn counted_seconds(&self) -> f64 {
        let held = self.0.lock().expect("stats lock");
        (held.counted + held.since.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64()
    }

    /// Whether the collector holds the statistics on now.
    pub(crate) fn holding(&self) -> bool {
        self.0.lock().expect("stats lock").fd.is_some()
    }

    /// Whether `kernel.bpf_stats_enabled` is set (by an administrator or another tool: the
    /// sysctl shows only its own setting, not the descriptors held); `None` if unreadable.
    pub(crate) fn sysctl_set() -> Option<bool> {
        let text = std::fs::read_to_string(SYSCTL).ok()?;
        Some(text.trim() != "0")
    }

    /// Applies `config.program_stats` until `stop`, counting the time the statistics are on
    /// once a second: `on` holds them from the start, `sampled` opens a window at once and
    /// then every period, `off` only counts what the sysctl turns on. Ends with them let go.
    pub(crate) async fn run(self, config: KernelConfig, stop: CancellationToken) {
        let window = Duration::from_secs(config.program_stats_sample_seconds);
        let period = Duration::from_secs(config.program_stats_every_seconds);
        if config.program_stats == ProgramStatsMode::Sampled {
            info!(
                window_s = window.as_secs(),
                period_s = period.as_secs(),
                "kernel BPF statistics sampled"
            );
        }
        let started = Instant::now();
        let mut last = started;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            self.count_sysctl(now - last, Self::sysctl_set().unwrap_or(false));
            last = now;
            match config.program_stats {
                ProgramStatsMode::Off => {}
                ProgramStatsMode::On => self.on(),
                ProgramStatsMode::Sampled => {
                    let into_period = Duration::from_nanos(
                        ((now - started).as_nanos() % period.as_nanos()) as u64,
                    );
                    if into_period < window {
                        self.on();
                    } else {
                        self.off();
                    }
                }
            }
        }
        self.off();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_time_with_the_statistics_on_is_counted() {
        let switch = ProgramStatsSwitch::default();
        switch.count_sysctl(Duration::from_secs(5), false);
        assert!(switch.counted_seconds() < f64::EPSILON);
        // Set by the sysctl: counted although the collector holds nothing.
        switch.count_sysctl(Duration::from_secs(2), true);
        assert!((switch.counted_seconds() - 2.0).abs() < 1e-9);
        // A window the collector held: counted exactly, the open one included.
        let mut held = switch.0.lock().unwrap();
        held.since = Some(Instant::now().checked_sub(Duration::from_secs(3)).unwrap());
        drop(held);
        let during = switch.counted_seconds();
        assert!((5.0..6.0).contains(&during), "{during}");
        switch.off();
        let after = switch.counted_seconds();
        assert!((5.0..6.0).contains(&after) && !switch.holding(), "{after}");
    }
}
