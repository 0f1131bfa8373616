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

#[cfg(test)]
impl LogRecord {
    /// A whole, valid line at time zero, for tests.
    pub fn test_line(uuid: &str, stream: Stream, seq: u64, message: &str) -> Arc<Self> {
        Arc::new(Self {
            ts: SystemTime::UNIX_EPOCH,
            instance_uuid: uuid.into(),
            stream,
            message: message.into(),
            seq,
            invalid_utf8: false,
            end: LineEnd::Newline,
        })
    }
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
        let mut out = Vec::with_capacity(self.message.len() + 128);
        self.write_ndjson(&mut out);
        // SAFETY: only UTF-8 was written: ASCII, and strings escaped by serde_json.
        unsafe { String::from_utf8_unchecked(out) }
    }

    /// Appends the NDJSON line of [`Self::view`], written directly: this runs for every line,
    /// and building the view (two copies, a generic serializer, a date formatter) cost more
    /// than the rest of a line's handling.
    pub fn write_ndjson(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":\"");
        write_rfc3339(self.ts, out);
        out.extend_from_slice(b"\",\"instance_uuid\":");
        let _ = serde_json::to_writer(&mut *out, &*self.instance_uuid);
        out.extend_from_slice(b",\"stream\":\"");
        out.extend_from_slice(self.stream.as_str().as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        push_json_str(out, &self.message);
        out.extend_from_slice(b",\"seq\":");
        push_digits(out, self.seq, 1);
        if self.invalid_utf8 {
            out.extend_from_slice(b",\"invalid_utf8\":true");
        }
        match self.end {
            LineEnd::Split => out.extend_from_slice(b",\"split\":true"),
            LineEnd::Partial => out.extend_from_slice(b",\"partial\":true"),
            LineEnd::Cut(n) => {
                out.extend_from_slice(b",\"cut_bytes\":");
                push_digits(out, n, 1);
            }
            LineEnd::Newline => {}
        }
        out.extend_from_slice(b"}\n");
    }

    /// Bytes the record holds, for memory and queue accounting.
    pub fn size(&self) -> usize {
        self.message.len() + 64
    }
}

/// RFC 3339 in UTC, as [`clock::rfc3339`] writes it (fraction without trailing zeros), without
/// its allocations.
fn write_rfc3339(t: SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let (era, doe) = (z / 146_097, z % 146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, month, 2);
    out.push(b'-');
    push_digits(out, day, 2);
    out.push(b'T');
    push_digits(out, rem / 3600, 2);
    out.push(b':');
    push_digits(out, rem / 60 % 60, 2);
    out.push(b':');
    push_digits(out, rem % 60, 2);
    let mut nanos = u64::from(d.subsec_nanos());
    if nanos != 0 {
        let mut width = 9;
        while nanos % 10 == 0 {
            nanos /= 10;
            width -= 1;
        }
        out.push(b'.');
        push_digits(out, nanos, width);
    }
    out.push(b'Z');
}

/// Appends `s` as a JSON string. Most console text needs no escape: that is checked eight
/// bytes at a time and copied as is; the rest goes through serde_json.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if needs_escape(s.as_bytes()) {
        let _ = serde_json::to_writer(&mut *out, s);
    } else {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    }
}

/// Whether `bytes` hold a control character, `"` or `\\`.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `w` is zero (the classic "has zero byte" bit trick).
    let zero_byte = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS != 0;
    let (words, rest) = bytes.as_chunks::<8>();
    for word in words {
        let w = u64::from_le_bytes(*word);
        // Bytes below 0x20: subtracting 0x20 borrows into the high bit of a byte that had it
        // clear (bytes >= 0x80 are UTF-8 and never need escaping).
        let below_space = w.wrapping_sub(ONES * 0x20) & !w & HIGHS != 0;
        if below_space
            || zero_byte(w ^ (ONES * u64::from(b'"')))
            || zero_byte(w ^ (ONES * u64::from(b'\\')))
        {
            return true;
        }
    }
    rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Appends `n` in decimal, zero-padded to `width` digits.
fn push_digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    while n > 0 || buf.len() - i < width {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[i..]);
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
    fn escape_check_agrees_with_a_plain_scan() {
        let plain = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        let mut cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"plain ascii text, long enough for words".to_vec(),
            "é ü \u{fffd} 漢字 over eight bytes".as_bytes().to_vec(),
        ];
        for special in [
            0u8, 0x1f, b'\t', b'"', b'\\', 0x7f, 0x20, 0x80, 0xff, b'!', b'#',
        ] {
            for at in 0..17 {
                let mut v = vec![b'a'; 17];
                v[at] = special;
                cases.push(v);
            }
        }
        for case in cases {
            assert_eq!(needs_escape(&case), plain(&case), "{case:?}");
        }
    }

    #[test]
    fn fast_ndjson_is_the_view() {
        for (secs, nanos) in [
            (0, 0),
            (951_782_400, 5),
            (1_795_845_042, 260_170_790),
            (4_102_444_799, 999_999_999),
            (1_709_164_800, 100_000_000),
        ] {
            for end in [
                LineEnd::Newline,
                LineEnd::Split,
                LineEnd::Partial,
                LineEnd::Cut(7),
            ] {
                let record = LogRecord {
                    ts: UNIX_EPOCH + Duration::new(secs, nanos),
                    instance_uuid: "a\"b/\u{1}".into(),
                    stream: Stream::Stderr,
                    message: "tab\t \"q\" \\ é \u{fffd}".into(),
                    seq: 9,
                    invalid_utf8: true,
                    end,
                };
                let line = record.to_ndjson();
                assert!(line.ends_with("}\n"));
                let parsed: LogRecordView = serde_json::from_str(&line).unwrap();
                assert_eq!(parsed, record.view(), "{line}");
            }
        }
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
