//! Console output, as the collector carries it: the stream a line was written to, how it
//! ended, the record itself and its NDJSON form (files, API, CLI), and where bytes can be given
//! up. docs/console.md tells the whole story.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::identity::Identity;
#[cfg(test)]
use super::time;

/// Where a line was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Stream {
    Stdout,
    Stderr,
    /// A console file (`vm.log`, `-serial file:`).
    Console,
}

impl Stream {
    pub(crate) const ALL: [Self; 3] = [Self::Stdout, Self::Stderr, Self::Console];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Console => "console",
        }
    }
}

/// How a line ended. Two words: a record holds one, and gaps are rare, so a gap's details
/// live in a box of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LineEnd {
    /// A line terminator.
    Newline,
    /// The line was longer than the maximum; the next piece continues it.
    Split,
    /// Flushed without its terminator (idle, or the process left); may continue later.
    Partial,
    /// The kernel cut this many bytes of the write here.
    Cut(u64),
    /// Not a line: the mark of a place in the stream where output is missing. The line before
    /// it ended there and is not joined to the line after.
    Gap(Box<Gap>),
}

impl LineEnd {
    /// The mark of missing output (see [`LineEnd::Gap`]).
    pub(crate) fn gap(reason: GapReason, dropped_bytes: Option<u64>, since: SystemTime) -> Self {
        Self::Gap(Box::new(Gap {
            reason,
            dropped_bytes,
            since,
        }))
    }

    /// Heap bytes held besides the value itself: a gap's box.
    fn heap_bytes(&self) -> usize {
        match self {
            Self::Gap(_) => size_of::<Gap>(),
            _ => 0,
        }
    }
}

/// A wall-clock time in nanoseconds since the Unix epoch (earlier times are the epoch): a
/// record's time in 8 bytes where a `SystemTime` takes 16; it lasts until 2554.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct UnixNanos(u64);

impl UnixNanos {
    pub(crate) fn system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.0)
    }
}

impl From<SystemTime> for UnixNanos {
    fn from(t: SystemTime) -> Self {
        let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Self(u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Output missing from a stream, at the place it went missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) reason: GapReason,
    /// Bytes lost, when known (a restart of the collector does not know).
    pub(crate) dropped_bytes: Option<u64>,
    /// Start of the span in which output may be missing; the record's `ts` is its end.
    pub(crate) since: SystemTime,
}

/// Why output is missing (the gap record's `gap_reason`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum GapReason {
    /// The kernel's console ring was full.
    KernelRing,
    /// The instance wrote more than its budget (`console.rate_bytes_per_sec`).
    OverBudget,
    /// A pending write was evicted from the kernel's pending-syscall map.
    Evicted,
    /// The collector was not running (a restart).
    CollectorDown,
    /// The kernel's write numbering shows writes missing, cause unknown.
    #[default]
    Unknown,
}

impl GapReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::KernelRing => "kernel_ring",
            Self::OverBudget => "over_budget",
            Self::Evicted => "evicted",
            Self::CollectorDown => "collector_down",
            Self::Unknown => "unknown",
        }
    }
}

/// Where the console streams of instances that ran before the collector restarted pick up:
/// the last `seq` of each stream (stdout, stderr, console) by instance id, and the earliest
/// time the collector may have stopped capturing (each such stream gets one
/// [`GapReason::CollectorDown`] record from there to the restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Resume {
    pub(crate) seqs: std::collections::HashMap<String, [u64; 3]>,
    pub(crate) down_since: Option<SystemTime>,
}

/// Where console bytes were given up (the `where` label of
/// `compute_instance_console_dropped_bytes_total`): one value for every cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropWhere {
    /// The kernel's console ring was full.
    KernelRing,
    /// The instance was over its budget in the kernel (`console.rate_bytes_per_sec`).
    OverBudget,
    /// The kernel's pending-syscall map was full: the write could not be followed.
    Evicted,
    /// The part of a write over 64 KiB (or past 64 iovecs) the kernel cut.
    Cut,
    /// Lines over the instance's share of userspace's line handling (twice its budget).
    /// These bytes were captured (they are in `compute_instance_console_bytes_total`).
    LineBudget,
    /// The queue to the log files was full (the lines are still in the API).
    Queue,
    /// The log files could not take them (disk cap reached, write error).
    Sink,
}

/// Number of [`DropWhere`] values.
pub(crate) const DROP_WHERES: usize = 7;

impl DropWhere {
    pub(crate) const ALL: [Self; DROP_WHERES] = [
        Self::KernelRing,
        Self::OverBudget,
        Self::Evicted,
        Self::Cut,
        Self::LineBudget,
        Self::Queue,
        Self::Sink,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::KernelRing => "kernel_ring",
            Self::OverBudget => "over_budget",
            Self::Evicted => "evicted",
            Self::Cut => "cut",
            Self::LineBudget => "line_budget",
            Self::Queue => "queue",
            Self::Sink => "sink",
        }
    }

    /// Where the kernel's loss cause `cause` (`console_loss`) is counted.
    pub(crate) fn of_kernel_cause(cause: u32) -> Option<Self> {
        use collector_common::console_loss;
        match cause {
            console_loss::RING => Some(Self::KernelRing),
            console_loss::OVER_BUDGET => Some(Self::OverBudget),
            console_loss::PENDING_FULL => Some(Self::Evicted),
            _ => None,
        }
    }
}

/// A consumer of the console source's output: the calls come in order, from the source's
/// task, and must not block it (a subscriber that does I/O queues, bounded, and counts what it
/// drops).
pub(crate) trait ConsoleSubscriber: Send {
    /// An instance's console is being captured (again, if it ran before).
    fn begin(&mut self, uuid: &Arc<str>);
    /// New records, in order per (instance, stream); runs of one instance share the `Arc`.
    fn records(&mut self, batch: &[Arc<LogRecord>]);
    /// The instance is gone and its last lines are in.
    fn end(&mut self, uuid: &Arc<str>);
    /// The instance's retention ran out: forget it.
    fn expire(&mut self, uuid: &Arc<str>);
    /// The source stops: write out what is held (bounded), then return.
    fn close(self: Box<Self>);
}

/// One line of an instance's console output. Kept compact (72 bytes): the histories hold
/// millions of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogRecord {
    /// Kernel time of the write that began the line.
    pub(crate) ts: UnixNanos,
    pub(crate) instance_uuid: Arc<str>,
    pub(crate) stream: Stream,
    /// The line without its terminator; invalid UTF-8 replaced by U+FFFD. No spare capacity.
    pub(crate) message: Box<str>,
    /// Per (instance, stream), from 1, without gaps.
    pub(crate) seq: u64,
    pub(crate) invalid_utf8: bool,
    pub(crate) end: LineEnd,
}

#[cfg(test)]
impl LogRecord {
    /// A whole, valid line at time zero, for tests.
    pub(crate) fn test_line(uuid: &str, stream: Stream, seq: u64, message: &str) -> Arc<Self> {
        Arc::new(Self {
            ts: UnixNanos::default(),
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
#[allow(
    clippy::struct_excessive_bools,
    reason = "the NDJSON flags, each shown only when set"
)]
pub(crate) struct LogRecordView {
    /// RFC 3339, nanoseconds, UTC.
    pub(crate) ts: String,
    pub(crate) instance_uuid: String,
    pub(crate) stream: Stream,
    pub(crate) message: String,
    pub(crate) seq: u64,
    /// The bytes were not valid UTF-8; `message` is the lossy text.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) invalid_utf8: bool,
    /// Longer than `console.max_line_bytes`: the next record of the stream continues it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) split: bool,
    /// Flushed without its newline (idle or exit); the next record may continue it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) partial: bool,
    /// The kernel cut this many bytes of a write over 64 KiB right after this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) cut_bytes: Option<u64>,
    /// Not a line: output is missing here (`message` is empty). `gap_since` to `ts` is the
    /// span; `dropped_bytes` how much, when known.
    #[serde(default, skip_serializing_if = "is_false")]
    pub(crate) gap: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gap_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) dropped_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) gap_since: Option<String>,
    /// Whose instance wrote it (its Pod's identity), when known: stamped by the output (the
    /// console files, the API) rather than kept in the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) identity: Option<Identity>,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde passes a reference"
)]
fn is_false(b: &bool) -> bool {
    !*b
}

impl LogRecord {
    /// The record as its NDJSON form's type (the fast writer below must agree with it).
    #[cfg(test)]
    pub(crate) fn view(&self) -> LogRecordView {
        LogRecordView {
            ts: time::rfc3339(self.ts.system_time()),
            instance_uuid: self.instance_uuid.to_string(),
            stream: self.stream,
            message: self.message.to_string(),
            seq: self.seq,
            invalid_utf8: self.invalid_utf8,
            split: self.end == LineEnd::Split,
            partial: self.end == LineEnd::Partial,
            cut_bytes: match self.end {
                LineEnd::Cut(n) => Some(n),
                _ => None,
            },
            gap: matches!(self.end, LineEnd::Gap(_)),
            gap_reason: match &self.end {
                LineEnd::Gap(gap) => Some(gap.reason.as_str().to_owned()),
                _ => None,
            },
            dropped_bytes: match &self.end {
                LineEnd::Gap(gap) => gap.dropped_bytes,
                _ => None,
            },
            gap_since: match &self.end {
                LineEnd::Gap(gap) => Some(time::rfc3339(gap.since)),
                _ => None,
            },
            identity: None,
        }
    }

    /// The record as one NDJSON line, newline included.
    #[cfg(test)]
    pub(crate) fn to_ndjson(&self) -> String {
        let mut out = Vec::with_capacity(self.message.len() + 128);
        self.write_ndjson(&mut out);
        // SAFETY: only UTF-8 was written: ASCII, and strings escaped by serde_json.
        unsafe { String::from_utf8_unchecked(out) }
    }

    /// Appends the NDJSON line of [`Self::view`], written directly: this runs for every line,
    /// and building the view (two copies, a generic serializer, a date formatter) cost more
    /// than the rest of a line's handling.
    #[cfg(test)]
    pub(crate) fn write_ndjson(&self, out: &mut Vec<u8>) {
        self.write_ndjson_as(out, None);
    }

    /// [`Self::write_ndjson`] with an `identity` member: `identity` is the JSON of an
    /// [`Identity`] ([`identity_json`]), encoded once for many lines.
    pub(crate) fn write_ndjson_as(&self, out: &mut Vec<u8>, identity: Option<&[u8]>) {
        NdjsonEncoder::default().write(self, out, identity);
    }

    /// Bytes the record holds, for memory and queue accounting: the record, its `Arc`'s two
    /// counters, its text's heap allocation, a gap's box, and the slot that points at it.
    pub(crate) fn size(&self) -> usize {
        size_of::<Self>()
            + 2 * size_of::<usize>()
            + self.message.len()
            + self.end.heap_bytes()
            + size_of::<usize>()
    }
}

/// The JSON object of `identity`, as a record's `identity` member carries it.
pub(crate) fn identity_json(identity: &Identity) -> Vec<u8> {
    serde_json::to_vec(identity).unwrap_or_else(|_| b"{}".to_vec())
}

/// Writes records' NDJSON lines ([`LogRecord::write_ndjson_as`]), keeping what successive
/// lines share: the JSON of the last instance id, and the last timestamp's date and time to
/// the second. A file's lines come in runs of one instance, many within one second: this runs
/// for every line.
#[derive(Debug, Default)]
pub(crate) struct NdjsonEncoder {
    uuid: Option<(Arc<str>, Vec<u8>)>,
    /// Seconds since the epoch, and their `YYYY-MM-DDTHH:MM:SS`.
    second: Option<(u64, [u8; 19])>,
}

impl NdjsonEncoder {
    /// Appends the NDJSON line of `record`, with `identity` (the JSON of an [`Identity`]).
    pub(crate) fn write(&mut self, record: &LogRecord, out: &mut Vec<u8>, identity: Option<&[u8]>) {
        out.extend_from_slice(b"{\"ts\":\"");
        self.write_rfc3339(record.ts.system_time(), out);
        out.extend_from_slice(b"\",\"instance_uuid\":");
        out.extend_from_slice(self.uuid_json(&record.instance_uuid));
        out.extend_from_slice(b",\"stream\":\"");
        out.extend_from_slice(record.stream.as_str().as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        push_json_str(out, &record.message);
        out.extend_from_slice(b",\"seq\":");
        push_digits(out, record.seq, 1);
        if record.invalid_utf8 {
            out.extend_from_slice(b",\"invalid_utf8\":true");
        }
        match &record.end {
            LineEnd::Split => out.extend_from_slice(b",\"split\":true"),
            LineEnd::Partial => out.extend_from_slice(b",\"partial\":true"),
            LineEnd::Cut(n) => {
                out.extend_from_slice(b",\"cut_bytes\":");
                push_digits(out, *n, 1);
            }
            LineEnd::Gap(gap) => {
                out.extend_from_slice(b",\"gap\":true,\"gap_reason\":\"");
                out.extend_from_slice(gap.reason.as_str().as_bytes());
                out.push(b'"');
                if let Some(n) = gap.dropped_bytes {
                    out.extend_from_slice(b",\"dropped_bytes\":");
                    push_digits(out, n, 1);
                }
                out.extend_from_slice(b",\"gap_since\":\"");
                self.write_rfc3339(gap.since, out);
                out.push(b'"');
            }
            LineEnd::Newline => {}
        }
        if let Some(identity) = identity {
            out.extend_from_slice(b",\"identity\":");
            out.extend_from_slice(identity);
        }
        out.extend_from_slice(b"}\n");
    }

    /// The JSON string of `uuid`.
    fn uuid_json(&mut self, uuid: &Arc<str>) -> &[u8] {
        let cached = self
            .uuid
            .as_ref()
            .is_some_and(|(last, _)| Arc::ptr_eq(last, uuid) || **last == **uuid);
        if !cached {
            let mut json = Vec::with_capacity(uuid.len() + 2);
            let _ = serde_json::to_writer(&mut json, &**uuid);
            self.uuid = Some((uuid.clone(), json));
        }
        self.uuid.as_ref().map_or(&[], |(_, json)| json.as_slice())
    }

    /// RFC 3339 in UTC, as [`time::rfc3339`] writes it (fraction without trailing zeros),
    /// without its allocations.
    fn write_rfc3339(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        match self.second {
            Some((second, text)) if second == secs => out.extend_from_slice(&text),
            _ => {
                let start = out.len();
                write_second(secs, out);
                if let Ok(text) = <[u8; 19]>::try_from(&out[start..]) {
                    self.second = Some((secs, text));
                }
            }
        }
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
}

/// `YYYY-MM-DDTHH:MM:SS` of `secs` since the epoch, UTC.
fn write_second(secs: u64, out: &mut Vec<u8>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ndjson_shape() {
        let record = LogRecord {
            ts: (UNIX_EPOCH + Duration::new(1_795_845_042, 260_170_791)).into(),
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
    fn record_is_compact() {
        // The figures docs/console.md "Sizing" gives.
        assert_eq!(size_of::<LogRecord>(), 72);
        let line = LogRecord::test_line("i-1", Stream::Console, 1, &"x".repeat(100));
        assert_eq!(line.size(), 196);
        let gap = LogRecord {
            message: Box::default(),
            end: LineEnd::gap(GapReason::Unknown, None, UNIX_EPOCH),
            ..(*line).clone()
        };
        assert_eq!(gap.size(), 96 + size_of::<Gap>());
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
                LineEnd::gap(
                    GapReason::KernelRing,
                    Some(4096),
                    UNIX_EPOCH + Duration::new(secs / 2, nanos / 3),
                ),
                LineEnd::gap(GapReason::CollectorDown, None, UNIX_EPOCH),
            ] {
                let record = LogRecord {
                    ts: (UNIX_EPOCH + Duration::new(secs, nanos)).into(),
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
                let identity = Identity {
                    project: Some("p\"1".into()),
                    pod: "web-0".into(),
                    pod_namespace: "ns-1".into(),
                    node: "n1".into(),
                    ..Identity::default()
                };
                let mut named = Vec::new();
                record.write_ndjson_as(&mut named, Some(&identity_json(&identity)));
                let parsed: LogRecordView = serde_json::from_slice(&named).unwrap();
                let view = LogRecordView {
                    identity: Some(identity),
                    ..record.view()
                };
                assert_eq!(parsed, view);
            }
        }
    }

    #[test]
    fn a_reused_encoder_writes_what_a_fresh_one_does() {
        let mut encoder = NdjsonEncoder::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b\"".into());
        let mut seq = 0;
        for (secs, nanos) in [(5, 0), (5, 10), (6, 1), (6, 1), (86_399, 7), (86_400, 0)] {
            for uuid in [&a, &a, &b, &"a".into()] {
                seq += 1;
                let record = LogRecord {
                    ts: (UNIX_EPOCH + Duration::new(secs, nanos)).into(),
                    instance_uuid: uuid.clone(),
                    stream: Stream::Stdout,
                    message: "m".into(),
                    seq,
                    invalid_utf8: false,
                    end: LineEnd::gap(GapReason::OverBudget, Some(1), UNIX_EPOCH),
                };
                let mut reused = Vec::new();
                encoder.write(&record, &mut reused, None);
                assert_eq!(String::from_utf8(reused).unwrap(), record.to_ndjson());
            }
        }
    }
}
