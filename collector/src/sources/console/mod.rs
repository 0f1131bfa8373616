//! The console source: reads the console ring, attributes each write to its instance,
//! assembles lines and hands them to its subscribers (the history the API reads, the log
//! files, ...).
//!
//! Instances come from the registry's snapshot, the one owner of "which pid runs which
//! instance". A write can arrive before the registry has named its process (the kernel follows
//! a VMM from its exec; userspace names it a moment later): such writes wait, bounded, and are
//! replayed in order once the process is named, or dropped and counted as unattributed if it
//! never is. When a process leaves the snapshot its last writes are still taken for a short
//! grace, then its partial lines are flushed and its log is ended (kept for the retention).
//!
//! Nothing here waits for a reader or the disk: subscribers never block (the history is memory,
//! the file queue is bounded and counts what it drops).
//!
//! After a restart of the collector, the streams of an instance that ran before continue their
//! numbering ([`Resume`]), each with one `collector_down` gap record first: output written
//! while the collector was down is missing there.

mod budget;
pub(crate) mod lines;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use budget::LineBudget;
use collector_common::console_loss;
use lines::{Line, LineAssembler};

use crate::{
    config::ConsoleConfig,
    host::proc,
    kernel::{
        console::{ConsoleKernel, ConsoleReader},
        console_decode::{self, Chunk, OwnedChunk},
    },
    matching::{Matchers, console_rules::Rule},
    model::{
        console::{ConsoleSubscriber, DropWhere, GapReason, LineEnd, LogRecord, Resume, Stream},
        console_stats::ConsoleStats,
        health::Health,
        instance::{Instance, SnapshotReceiver},
        time::BootClock,
    },
};

/// How long writes of a process that left the snapshot are still attributed to it.
const EXIT_GRACE: Duration = Duration::from_secs(1);
/// How long writes of a process not (yet) named wait for it.
const UNKNOWN_WAIT: Duration = Duration::from_secs(5);
/// Bytes of writes waiting for their process to be named, all processes together.
const UNKNOWN_MAX_BYTES: usize = 16 << 20;
/// Records read from the ring before the rest of the work gets a turn.
const READ_BATCH: usize = 4096;
/// Least time between two reads of the ring: the most a line waits for it (the ring holds
/// far more than that: 8 MiB is 40 ms at 200 MB/s).
const READ_PAUSE: Duration = Duration::from_millis(1);
/// Records read from the ring at shutdown, at most (more than a full ring holds).
const SHUTDOWN_READ: usize = 1 << 20;

struct Proc {
    uuid: Arc<str>,
    streams: [LineAssembler; 3],
    /// When each stream last received bytes (for the idle flush of partial lines).
    last_write: [Instant; 3],
    left: Option<Instant>,
    /// The kernel's loss totals of each stream already marked with a gap record.
    marked: [u64; 3],
    /// Kernel time of each stream's latest write (where a gap after it begins).
    last_ns: [u64; 3],
    /// The kernel's loss totals of each cause already counted in the metrics.
    counted: [u64; console_loss::COUNT as usize],
    /// The instance's share of line handling.
    budget: LineBudget,
    /// Lines given up to the budget since the stream's last record: one gap record marks them
    /// before the next line that passes (or at the idle flush, or at the end).
    shed: [Option<Shed>; 3],
}

#[derive(Debug, Clone, Copy)]
struct Shed {
    bytes: u64,
    since_ns: u64,
    until_ns: u64,
}

impl Proc {
    fn new(uuid: Arc<str>, config: &ConsoleConfig, now: Instant) -> Self {
        Self {
            uuid,
            streams: std::array::from_fn(|_| LineAssembler::new(config.max_line_bytes)),
            last_write: [now; 3],
            left: None,
            marked: [0; 3],
            last_ns: [0; 3],
            counted: [0; console_loss::COUNT as usize],
            budget: LineBudget::new(config.rate_bytes_per_sec, config.burst_bytes, now),
            shed: [None; 3],
        }
    }

    /// Moves the lines of stream `slot` that pass the budget to `out`, with a gap record where
    /// lines were given up; adds the bytes given up to `shed_bytes`.
    fn admit(
        &mut self,
        slot: usize,
        lines: &mut Vec<Line>,
        out: &mut Vec<Line>,
        now: Instant,
        shed_bytes: &mut u64,
    ) {
        for line in lines.drain(..) {
            let is_gap = matches!(line.end, LineEnd::Gap(_));
            if is_gap || self.budget.take(line.bytes.len(), now) {
                if let Some(gap) = self.take_shed(slot) {
                    out.push(gap);
                }
                out.push(line);
                continue;
            }
            let bytes = line.bytes.len() as u64 + u64::from(line.end == LineEnd::Newline);
            *shed_bytes += bytes;
            let shed = self.shed[slot].get_or_insert(Shed {
                bytes: 0,
                since_ns: line.boot_ns,
                until_ns: line.boot_ns,
            });
            shed.bytes += bytes;
            shed.until_ns = line.boot_ns;
        }
    }

    /// The gap record of the lines given up on stream `slot`, if any.
    fn take_shed(&mut self, slot: usize) -> Option<Line> {
        let shed = self.shed[slot].take()?;
        Some(gap_line(
            GapReason::OverBudget,
            shed.bytes,
            shed.since_ns,
            shed.until_ns,
        ))
    }
}

/// A gap record as a line: `dropped` bytes missing between kernel times `since_ns` and `at_ns`.
/// Its `since` is resolved to wall time when it is emitted.
fn gap_line(reason: GapReason, dropped: u64, since_ns: u64, at_ns: u64) -> Line {
    Line {
        boot_ns: at_ns,
        bytes: Vec::new(),
        end: LineEnd::gap(
            reason,
            Some(dropped),
            std::time::UNIX_EPOCH + Duration::from_nanos(since_ns.min(at_ns)),
        ),
    }
}

#[derive(Default)]
struct Unknown {
    chunks: Vec<OwnedChunk>,
    bytes: usize,
    since: Option<Instant>,
}

pub(crate) struct ConsoleSource {
    pub(crate) kernel: ConsoleKernel,
    pub(crate) snapshot: SnapshotReceiver,
    pub(crate) rules: Vec<Rule>,
    pub(crate) matchers: Matchers,
    pub(crate) subscribers: Vec<Box<dyn ConsoleSubscriber>>,
    pub(crate) stats: ConsoleStats,
    pub(crate) health: Health,
    pub(crate) config: ConsoleConfig,
    /// Where the streams of instances that ran before a restart continue.
    pub(crate) resume: Resume,
}

/// The mutable state of the running pipeline.
struct State {
    /// Boxed: a `Proc` is some 440 bytes, and the table keeps up to twice as many slots as
    /// processes (900 KiB instead of 460 at 1000 instances).
    procs: HashMap<u32, Box<Proc>>,
    unknown: HashMap<u32, Unknown>,
    unknown_bytes: usize,
    seqs: HashMap<Arc<str>, [u64; 3]>,
    /// Instances whose console ended, and when (their retention counts from there).
    ended: HashMap<Arc<str>, Instant>,
    out: Vec<Arc<LogRecord>>,
    /// Scratch for one write's lines, before and after the budget (kept: this runs for every
    /// write).
    lines: Vec<Line>,
    admitted: Vec<Line>,
}

/// Capacity the scratch vectors keep between writes (a 64 KiB write of empty lines is 64 Ki
/// lines).
const SCRATCH_KEEP: usize = 1024;
/// Records the dispatch vector keeps between batches.
const OUT_KEEP: usize = 16 << 10;

/// Why the console source stopped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsoleError {
    #[error("console ring reader failed")]
    Reader(#[source] std::io::Error),
}

impl ConsoleSource {
    /// Runs until `stop` is cancelled (or the reader fails): then flushes every partial line,
    /// has the subscribers write out what they hold, and returns.
    pub(crate) async fn run(
        mut self,
        mut reader: ConsoleReader,
        stop: CancellationToken,
    ) -> Result<(), ConsoleError> {
        let mut state = State {
            procs: HashMap::new(),
            unknown: HashMap::new(),
            unknown_bytes: 0,
            seqs: HashMap::new(),
            ended: HashMap::new(),
            out: Vec::new(),
            lines: Vec::new(),
            admitted: Vec::new(),
        };
        let mut failure = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_slow = Instant::now();
        let mut last_read = Instant::now();
        self.sync_snapshot(&mut state);
        loop {
            let mut read = false;
            tokio::select! {
                ready = reader.ready() => {
                    let ready = match ready {
                        Ok(ready) => ready,
                        Err(error) => {
                            error!(%error, "console reader failed; console capture stopped");
                            failure = Some(ConsoleError::Reader(error));
                            break;
                        }
                    };
                    // Each write is handled in place, in the ring, without a copy.
                    let clock = BootClock::now();
                    let mut bad: Vec<&'static str> = Vec::new();
                    read = true;
                    ready.drain(READ_BATCH, |bytes| match console_decode::chunk(bytes) {
                        Ok(chunk) => self.on_chunk(&mut state, chunk, &clock),
                        Err(error) => {
                            warn!(%error, ring = "console", "undecodable kernel record");
                            bad.push(error.reason());
                        }
                    });
                    for reason in bad {
                        self.health.decode_errors.inc(&["console", reason]);
                    }
                }
                changed = self.snapshot.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.sync_snapshot(&mut state);
                }
                () = stop.cancelled() => {
                    // What the kernel wrote before the signal is on the ring: into the files.
                    let clock = BootClock::now();
                    reader.drain_now(SHUTDOWN_READ, |bytes| {
                        if let Ok(chunk) = console_decode::chunk(bytes) {
                            self.on_chunk(&mut state, chunk, &clock);
                        }
                    });
                    break;
                }
                _ = tick.tick() => {
                    self.flush_idle(&mut state);
                    if last_slow.elapsed() >= Duration::from_secs(1) {
                        last_slow = Instant::now();
                        self.housekeeping(&mut state);
                    }
                }
            }
            self.dispatch(&mut state);
            if read {
                // Writes coming faster than one a pause apart are read a pause's worth at a
                // time: one wake-up for many writes rather than one each.
                if let Some(rest) = READ_PAUSE.checked_sub(last_read.elapsed()) {
                    tokio::time::sleep(rest).await;
                }
                last_read = Instant::now();
            }
        }
        let pids: Vec<u32> = state.procs.keys().copied().collect();
        for pid in pids {
            self.finish(&mut state, pid);
        }
        self.dispatch(&mut state);
        let subscribers = std::mem::take(&mut self.subscribers);
        // Subscribers may write files: off the async workers.
        let _ = tokio::task::spawn_blocking(move || {
            for subscriber in subscribers {
                subscriber.close();
            }
        })
        .await;
        failure.map_or(Ok(()), Err)
    }

    fn on_chunk(&mut self, state: &mut State, chunk: Chunk<'_>, clock: &BootClock) {
        if !state.procs.contains_key(&chunk.tgid) && self.snapshot.has_changed().unwrap_or(false) {
            self.sync_snapshot(state);
        }
        if state.procs.contains_key(&chunk.tgid) {
            self.assemble(state, chunk, clock);
            return;
        }
        let bytes = chunk.data.len();
        if state.unknown_bytes + bytes > UNKNOWN_MAX_BYTES {
            self.stats.unattributed(bytes as u64 + chunk.cut);
            return;
        }
        state.unknown_bytes += bytes;
        let waiting = state.unknown.entry(chunk.tgid).or_default();
        waiting.since.get_or_insert_with(Instant::now);
        waiting.bytes += bytes;
        waiting.chunks.push(chunk.to_owned_chunk());
    }

    fn assemble(&mut self, state: &mut State, chunk: Chunk<'_>, clock: &BootClock) {
        let Some(proc) = state.procs.get_mut(&chunk.tgid) else {
            return;
        };
        let slot = chunk.stream.index();
        self.stats.update(&proc.uuid, |c| {
            c.bytes[slot] += chunk.data.len() as u64;
            c.dropped[DropWhere::Cut as usize] += chunk.cut;
        });
        let now = Instant::now();
        proc.last_write[slot] = now;
        let mut lines = std::mem::take(&mut state.lines);
        // The kernel lost writes of this stream since its previous record: one gap, here.
        if chunk.lost.bytes > proc.marked[slot] {
            let dropped = chunk.lost.bytes - proc.marked[slot];
            proc.marked[slot] = chunk.lost.bytes;
            proc.streams[slot].break_at_gap(&mut lines);
            let since = if proc.last_ns[slot] == 0 {
                chunk.boot_ns
            } else {
                proc.last_ns[slot]
            };
            lines.push(gap_line(chunk.lost.reason, dropped, since, chunk.boot_ns));
        }
        proc.last_ns[slot] = chunk.boot_ns;
        proc.streams[slot].push(chunk.boot_ns, chunk.data, chunk.cut, &mut lines);
        let mut shed = 0;
        let mut admitted = std::mem::take(&mut state.admitted);
        proc.admit(slot, &mut lines, &mut admitted, now, &mut shed);
        let uuid = proc.uuid.clone();
        if shed > 0 {
            self.stats.dropped(&uuid, DropWhere::LineBudget, shed);
        }
        emit(
            state,
            &uuid,
            chunk.stream,
            &mut admitted,
            clock,
            &self.stats,
        );
        lines.shrink_to(SCRATCH_KEEP);
        admitted.shrink_to(SCRATCH_KEEP);
        state.lines = lines;
        state.admitted = admitted;
    }

    /// Brings the set of named processes in line with the registry.
    fn sync_snapshot(&mut self, state: &mut State) {
        let snapshot = self.snapshot.borrow_and_update().clone();
        for (pid, instance) in &snapshot.by_pid {
            match state.procs.get_mut(pid) {
                Some(proc) if *proc.uuid == *instance.instance_uuid => proc.left = None,
                existing => {
                    if existing.is_some() {
                        // The pid re-exec'd as another instance: the old one is over.
                        self.finish(state, *pid);
                    }
                    self.begin(state, *pid, instance);
                }
            }
        }
        let now = Instant::now();
        for (pid, proc) in &mut state.procs {
            if proc.left.is_none() && !snapshot.by_pid.contains_key(pid) {
                proc.left = Some(now);
            }
        }
    }

    fn begin(&mut self, state: &mut State, pid: u32, instance: &Instance) {
        let uuid: Arc<str> = instance.instance_uuid.as_str().into();
        debug!(instance_uuid = %uuid, pid, "console capture follows instance");
        if let Some(seqs) = self.resume.seqs.remove(&*uuid) {
            resume_streams(state, &uuid, seqs, self.resume.down_since);
        }
        state.ended.remove(&uuid);
        for subscriber in &mut self.subscribers {
            subscriber.begin(&uuid);
        }
        self.add_open_console_files(pid, instance);
        state
            .procs
            .insert(pid, Box::new(Proc::new(uuid, &self.config, Instant::now())));
        if let Some(waiting) = state.unknown.remove(&pid) {
            state.unknown_bytes -= waiting.bytes;
            let clock = BootClock::now();
            for chunk in &waiting.chunks {
                self.assemble(state, chunk.as_chunk(), &clock);
            }
        }
    }

    /// Console files the process already had open (it ran before the collector, or inherited
    /// them): from `/proc/PID/fd`, with the same rules as the kernel.
    fn add_open_console_files(&mut self, pid: u32, instance: &Instance) {
        let Some(matcher_id) = self
            .matchers
            .iter()
            .position(|m| m.name == instance.matcher)
        else {
            return;
        };
        let rules: Vec<&Rule> = self
            .rules
            .iter()
            .filter(|r| r.matcher_id as usize == matcher_id)
            .collect();
        if rules.is_empty() {
            return;
        }
        for (fd, target) in proc::open_files(pid) {
            let target = target.as_os_str().as_encoded_bytes();
            if rules.iter().any(|r| r.matches(target))
                && let Err(error) = self.kernel.add_console_fd(pid, fd, instance.seen_boot_ns)
            {
                warn!(pid, fd, %error, "cannot record console descriptor");
            }
        }
    }

    /// The process is gone for good: flush its lines, end its log unless another process
    /// runs the same instance.
    fn finish(&mut self, state: &mut State, pid: u32) {
        self.read_kernel_losses(state);
        let last = self.kernel.proc(pid);
        let Some(mut proc) = state.procs.remove(&pid) else {
            return;
        };
        let clock = BootClock::now();
        let now_ns = crate::model::time::boot_ns_now();
        for stream in Stream::ALL {
            let slot = stream.index();
            let mut lines = Vec::new();
            proc.streams[slot].flush(&mut lines);
            if let Some(gap) = proc.take_shed(slot) {
                lines.push(gap);
            }
            // Losses after the stream's last record: no later record carries them.
            if let Some(last) = &last
                && last.start_boot_ns != 0
            {
                let kernel_slot = slot + 1;
                let lost = last.lost_bytes[kernel_slot];
                if lost > proc.marked[slot] {
                    let reason = console_decode::loss_reason(last.last_cause[kernel_slot]);
                    let since = if proc.last_ns[slot] == 0 {
                        now_ns
                    } else {
                        proc.last_ns[slot]
                    };
                    lines.push(gap_line(reason, lost - proc.marked[slot], since, now_ns));
                    proc.marked[slot] = lost;
                }
            }
            emit(state, &proc.uuid, stream, &mut lines, &clock, &self.stats);
        }
        self.kernel.forget_fds(|tgid| tgid == pid);
        self.kernel.forget_procs(&HashSet::from([pid]));
        if !state.procs.values().any(|p| p.uuid == proc.uuid) {
            // Lines flushed above must reach the subscribers before the log ends.
            self.dispatch(state);
            for subscriber in &mut self.subscribers {
                subscriber.end(&proc.uuid);
            }
            state.ended.insert(proc.uuid, Instant::now());
        }
    }

    /// Partial lines idle for `partial_flush_ms` are flushed.
    fn flush_idle(&mut self, state: &mut State) {
        let idle = Duration::from_millis(self.config.partial_flush_ms);
        let clock = BootClock::now();
        let mut flushed = Vec::new();
        for proc in state.procs.values_mut() {
            for stream in Stream::ALL {
                let slot = stream.index();
                let idle_now = proc.last_write[slot].elapsed() >= idle;
                if idle_now && (proc.streams[slot].pending() > 0 || proc.shed[slot].is_some()) {
                    let mut lines = Vec::new();
                    proc.streams[slot].flush(&mut lines);
                    if let Some(gap) = proc.take_shed(slot) {
                        lines.insert(0, gap);
                    }
                    flushed.push((proc.uuid.clone(), stream, lines));
                }
            }
        }
        for (uuid, stream, mut lines) in flushed {
            emit(state, &uuid, stream, &mut lines, &clock, &self.stats);
        }
    }

    /// Once a second: processes past their exit grace, writes that waited too long for a
    /// name, kernel drop counters, expired logs, and descriptor entries of dead processes.
    fn housekeeping(&mut self, state: &mut State) {
        let gone: Vec<u32> = state
            .procs
            .iter()
            .filter(|(_, p)| p.left.is_some_and(|t| t.elapsed() >= EXIT_GRACE))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.finish(state, pid);
        }
        let stale: Vec<u32> = state
            .unknown
            .iter()
            .filter(|(_, u)| u.since.is_some_and(|t| t.elapsed() >= UNKNOWN_WAIT))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in stale {
            if let Some(waiting) = state.unknown.remove(&pid) {
                state.unknown_bytes -= waiting.bytes;
                let cut: u64 = waiting.chunks.iter().map(|c| c.cut).sum();
                self.stats.unattributed(waiting.bytes as u64 + cut);
                debug!(
                    pid,
                    bytes = waiting.bytes,
                    "console output of an unnamed process dropped"
                );
            }
        }
        self.read_kernel_losses(state);
        // Threads that died inside a syscall leave their pending entry (the map never evicts).
        self.kernel
            .forget_pending(|tgid, tid| !proc::thread_exists(tgid, tid));
        let retention = Duration::from_secs(self.config.retention_seconds);
        let expired: Vec<Arc<str>> = state
            .ended
            .iter()
            .filter(|(_, at)| at.elapsed() >= retention)
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in expired {
            state.ended.remove(&uuid);
            self.stats.forget(&uuid);
            state.seqs.remove(&uuid);
            for subscriber in &mut self.subscribers {
                subscriber.expire(&uuid);
            }
        }
        let procs = &state.procs;
        self.kernel
            .forget_fds(|tgid| !procs.contains_key(&tgid) && !proc::exists(tgid));
    }

    /// Folds the kernel's per-process loss counters (by cause) into the instances' counters;
    /// forgets those of processes that are gone.
    fn read_kernel_losses(&mut self, state: &mut State) {
        let mut dead = HashSet::new();
        for (tgid, kernel) in self.kernel.procs() {
            let Some(proc) = state.procs.get_mut(&tgid) else {
                if !proc::exists(tgid) {
                    // Never named: what it lost is unattributed (its captured bytes were).
                    self.stats
                        .unattributed(kernel.cause_bytes.iter().sum::<u64>());
                    dead.insert(tgid);
                }
                continue;
            };
            for cause in 0..console_loss::COUNT {
                let total = kernel.cause_bytes[cause as usize];
                let seen = &mut proc.counted[cause as usize];
                if total > *seen
                    && let Some(at) = DropWhere::of_kernel_cause(cause)
                {
                    self.stats.dropped(&proc.uuid, at, total - *seen);
                    *seen = total;
                }
            }
        }
        if !dead.is_empty() {
            self.kernel.forget_procs(&dead);
        }
    }

    fn dispatch(&mut self, state: &mut State) {
        if state.out.is_empty() {
            return;
        }
        for subscriber in &mut self.subscribers {
            subscriber.records(&state.out);
        }
        state.out.clear();
        state.out.shrink_to(OUT_KEEP);
    }
}

/// Continues the streams of `uuid` after a restart at `seqs`, each with one gap record from
/// `down_since` (the earliest the previous run may have stopped capturing) to now.
fn resume_streams(
    state: &mut State,
    uuid: &Arc<str>,
    mut seqs: [u64; 3],
    down_since: Option<std::time::SystemTime>,
) {
    let now = std::time::SystemTime::now();
    for stream in Stream::ALL {
        seqs[stream.index()] += 1;
        state.out.push(Arc::new(LogRecord {
            ts: now.into(),
            instance_uuid: uuid.clone(),
            stream,
            message: Box::default(),
            seq: seqs[stream.index()],
            invalid_utf8: false,
            end: LineEnd::gap(
                GapReason::CollectorDown,
                None,
                down_since.unwrap_or(now).min(now),
            ),
        }));
    }
    state.seqs.insert(uuid.clone(), seqs);
}

/// Turns assembled lines (taken out of `lines`) into records with the stream's next sequence
/// numbers.
fn emit(
    state: &mut State,
    uuid: &Arc<str>,
    stream: Stream,
    lines: &mut Vec<Line>,
    clock: &BootClock,
    stats: &ConsoleStats,
) {
    if lines.is_empty() {
        return;
    }
    let seqs = state.seqs.entry(uuid.clone()).or_insert([0; 3]);
    // Gap records are marks, not lines.
    let count = lines
        .iter()
        .filter(|l| !matches!(l.end, LineEnd::Gap(_)))
        .count() as u64;
    for mut line in lines.drain(..) {
        seqs[stream.index()] += 1;
        if let LineEnd::Gap(gap) = &mut line.end
            && let Ok(since_ns) = gap.since.duration_since(std::time::UNIX_EPOCH)
        {
            // Carried as kernel time by `gap_line`.
            gap.since = clock.wall(since_ns.as_nanos() as u64);
        }
        let (message, invalid_utf8) = match String::from_utf8(line.bytes) {
            Ok(text) => (text, false),
            Err(err) => (String::from_utf8_lossy(err.as_bytes()).into_owned(), true),
        };
        state.out.push(Arc::new(LogRecord {
            ts: clock.wall(line.boot_ns).into(),
            instance_uuid: uuid.clone(),
            stream,
            // Held for the retention: no spare capacity (the assembler's buffer grew in steps).
            message: message.into_boxed_str(),
            seq: seqs[stream.index()],
            invalid_utf8,
            end: line.end,
        }));
    }
    stats.update(uuid, |c| c.lines[stream.index()] += count);
}
