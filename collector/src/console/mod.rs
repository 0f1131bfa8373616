//! Console output as per-instance log streams.
//!
//! The data path: kernel programs (`collector-ebpf/src/console.rs`) -> ring reader
//! ([`crate::ebpf::console`]) -> [`decode`] (records to writes) -> [`pipeline`] (attributes each
//! write to its instance through the registry's snapshot) -> [`lines`] (line assembly per
//! process and stream) -> [`LogRecord`]s -> the in-memory [`store`] (API: tail, since, follow)
//! and the log files ([`crate::sinks::logs`]). [`stats`] counts bytes, lines and drops per
//! instance. docs/console.md tells the whole story.

pub mod decode;
pub mod lines;
pub mod pipeline;
pub mod rules;
pub mod stats;
pub mod store;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::clock;
use lines::LineEnd;

/// Where a line was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
    /// A console file (`vm.log`, `-serial file:`).
    Console,
}

impl Stream {
    pub const ALL: [Self; 3] = [Self::Stdout, Self::Stderr, Self::Console];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Console => "console",
        }
    }
}

/// One line of an instance's console output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Kernel time of the write that began the line.
    pub ts: SystemTime,
    pub instance_uuid: Arc<str>,
    pub stream: Stream,
    /// The line without its terminator; invalid UTF-8 replaced by U+FFFD.
    pub message: String,
    /// Per (instance, stream), from 1, without gaps.
    pub seq: u64,
    pub invalid_utf8: bool,
    pub end: LineEnd,
}

/// The NDJSON form of a [`LogRecord`] (files, API, CLI). Flags appear only when set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecordView {
    /// RFC 3339, nanoseconds, UTC.
    pub ts: String,
    pub instance_uuid: String,
    pub stream: Stream,
    pub message: String,
    pub seq: u64,
    /// The bytes were not valid UTF-8; `message` is the lossy text.
    #[serde(default, skip_serializing_if = "is_false")]
    pub invalid_utf8: bool,
    /// Longer than `console.max_line_bytes`: the next record of the stream continues it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub split: bool,
    /// Flushed without its newline (idle or exit); the next record may continue it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub partial: bool,
    /// The kernel cut this many bytes of a write over 64 KiB right after this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_bytes: Option<u64>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl LogRecord {
    pub fn view(&self) -> LogRecordView {
        LogRecordView {
            ts: clock::rfc3339(self.ts),
            instance_uuid: self.instance_uuid.to_string(),
            stream: self.stream,
            message: self.message.clone(),
            seq: self.seq,
            invalid_utf8: self.invalid_utf8,
            split: self.end == LineEnd::Split,
            partial: self.end == LineEnd::Partial,
            cut_bytes: match self.end {
                LineEnd::Cut(n) => Some(n),
                _ => None,
            },
        }
    }

    /// The record as one NDJSON line, newline included.
    pub fn to_ndjson(&self) -> String {
        let mut line = serde_json::to_string(&self.view()).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Bytes the record holds, for memory and queue accounting.
    pub fn size(&self) -> usize {
        self.message.len() + 64
    }
}

/// `CLOCK_BOOTTIME` to wall-clock time, with the offset taken once per batch (two clock reads
/// per line would cost more than the rest of the line's handling).
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    wall_at_boot_ns: i128,
}

impl BootClock {
    pub fn now() -> Self {
        let boot = i128::from(clock::boot_ns_now());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Self {
            wall_at_boot_ns: wall - boot,
        }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        let ns = (self.wall_at_boot_ns + i128::from(boot_ns)).max(0);
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_shape() {
        let record = LogRecord {
            ts: UNIX_EPOCH + Duration::new(1_795_845_042, 260_170_791),
            instance_uuid: "i-1".into(),
            stream: Stream::Console,
            message: "a\0b".into(),
            seq: 3,
            invalid_utf8: false,
            end: LineEnd::Cut(10),
        };
        assert_eq!(
            record.to_ndjson(),
            "{\"ts\":\"2026-11-28T05:50:42.260170791Z\",\"instance_uuid\":\"i-1\",\
             \"stream\":\"console\",\"message\":\"a\\u0000b\",\"seq\":3,\"cut_bytes\":10}\n"
        );
        let back: LogRecordView = serde_json::from_str(&record.to_ndjson()).unwrap();
        assert_eq!(back, record.view());
    }

    #[test]
    fn boot_clock_agrees_with_clock_module() {
        let now = clock::boot_ns_now();
        let a = BootClock::now().wall(now);
        let b = clock::boot_ns_to_system_time(now);
        let skew = a.duration_since(b).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(50), "{skew:?}");
    }
}
