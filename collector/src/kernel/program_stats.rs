//! The kernel's BPF run-time statistics, which `collector_ebpf_program_*` read.
//!
//! While any process holds a `BPF_ENABLE_STATS` descriptor, the kernel reads the clock before
//! and after every run of every BPF program on the host (ours and everyone else's): about
//! 80 ns a run here. So the collector holds one only when `kernel.program_stats` asks: never
//! (`off`, the default), always (`on`), or for a window of `program_stats_sample_seconds`
//! every `program_stats_every_seconds` (`sampled`). The counters only move inside windows, so
//! a program's mean cost is `run_seconds / runs` in every mode, and its CPU share is
//! `rate(run_seconds) / rate(collector_ebpf_program_stats_seconds_total)`: run time per
//! second of counting.

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

/// Turns the kernel's statistics on and off, and keeps the time it held them on.
#[derive(Clone, Default)]
pub(crate) struct ProgramStatsSwitch(Arc<Mutex<Held>>);

#[derive(Default)]
struct Held {
    fd: Option<OwnedFd>,
    since: Option<Instant>,
    before: Duration,
    /// The kernel refused once already (logged once, not at every window).
    refused: bool,
}

impl std::fmt::Debug for ProgramStatsSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramStatsSwitch").finish_non_exhaustive()
    }
}

impl ProgramStatsSwitch {
    /// Holds a statistics descriptor until [`Self::off`]; a refusal is logged once.
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
                    "kernel BPF statistics unavailable; collector_ebpf_program_* stay at 0"
                );
            }
            Err(_) => {}
        }
    }

    /// Lets go of the descriptor (the kernel stops counting unless someone else holds one).
    pub(crate) fn off(&self) {
        let mut held = self.0.lock().expect("stats lock");
        if let Some(since) = held.since.take() {
            held.before += since.elapsed();
        }
        held.fd = None;
    }

    /// Seconds the collector has held the statistics on, the current window included.
    pub(crate) fn held_seconds(&self) -> f64 {
        let held = self.0.lock().expect("stats lock");
        (held.before + held.since.map_or(Duration::ZERO, |s| s.elapsed())).as_secs_f64()
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

    /// Applies `config.program_stats` until `stop`: `on` holds the statistics from the start,
    /// `sampled` opens a window at once and then every period. Always ends with them off.
    pub(crate) async fn run(self, config: KernelConfig, stop: CancellationToken) {
        let window = Duration::from_secs(config.program_stats_sample_seconds);
        let period = Duration::from_secs(config.program_stats_every_seconds);
        match config.program_stats {
            ProgramStatsMode::Off => return,
            ProgramStatsMode::On => {
                self.on();
                stop.cancelled().await;
            }
            ProgramStatsMode::Sampled => {
                info!(
                    window_s = window.as_secs(),
                    period_s = period.as_secs(),
                    "kernel BPF statistics sampled"
                );
                loop {
                    self.on();
                    if wait(&stop, window).await {
                        break;
                    }
                    self.off();
                    if wait(&stop, period.saturating_sub(window)).await {
                        break;
                    }
                }
            }
        }
        self.off();
    }
}

/// Sleeps for `duration`; true if `stop` came first.
async fn wait(stop: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_time_adds_up_across_windows() {
        let switch = ProgramStatsSwitch::default();
        assert!(switch.held_seconds() < f64::EPSILON);
        let mut held = switch.0.lock().unwrap();
        held.before = Duration::from_secs(3);
        held.since = Some(Instant::now().checked_sub(Duration::from_secs(2)).unwrap());
        drop(held);
        let seconds = switch.held_seconds();
        assert!((5.0..6.0).contains(&seconds), "{seconds}");
        switch.off();
        let after = switch.held_seconds();
        assert!((5.0..6.0).contains(&after), "{after}");
        assert!(switch.0.lock().unwrap().since.is_none());
    }
}
