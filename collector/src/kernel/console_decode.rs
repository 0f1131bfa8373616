//! Decoding of console-ring records. Pure: every malformed input is a table test away.

use collector_common::{CONSOLE_MAX_WRITE, ConsoleRecordHeader, console_loss, console_stream};

use crate::model::console::{GapReason, Stream};

/// The kernel's losses of a stream so far, as a record carries them: totals, so the gap
/// before a record is its totals less the previous record's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Lost {
    pub(crate) bytes: u64,
    pub(crate) writes: u64,
    /// Cause of the latest loss.
    pub(crate) reason: GapReason,
}

/// The gap reason of a kernel loss cause (`console_loss`).
pub(crate) fn loss_reason(cause: u32) -> GapReason {
    match cause {
        console_loss::RING => GapReason::KernelRing,
        console_loss::OVER_BUDGET => GapReason::OverBudget,
        console_loss::PENDING_FULL => GapReason::Evicted,
        _ => GapReason::Unknown,
    }
}

/// One write of a tracked process, as the kernel captured it, borrowed from the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk<'a> {
    pub(crate) tgid: u32,
    pub(crate) stream: Stream,
    /// `CLOCK_BOOTTIME` when the write returned.
    pub(crate) boot_ns: u64,
    pub(crate) data: &'a [u8],
    /// Bytes the write accepted beyond `data` (a write over 64 KiB): cut in the kernel.
    pub(crate) cut: u64,
    /// The stream's kernel losses up to this write.
    pub(crate) lost: Lost,
}

/// A [`Chunk`] kept beyond its ring record (its process is not named yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnedChunk {
    pub(crate) tgid: u32,
    pub(crate) stream: Stream,
    pub(crate) boot_ns: u64,
    pub(crate) data: Vec<u8>,
    pub(crate) cut: u64,
    pub(crate) lost: Lost,
}

impl Chunk<'_> {
    pub(crate) fn to_owned_chunk(self) -> OwnedChunk {
        OwnedChunk {
            tgid: self.tgid,
            stream: self.stream,
            boot_ns: self.boot_ns,
            data: self.data.to_vec(),
            cut: self.cut,
            lost: self.lost,
        }
    }
}

impl OwnedChunk {
    pub(crate) fn as_chunk(&self) -> Chunk<'_> {
        Chunk {
            tgid: self.tgid,
            stream: self.stream,
            boot_ns: self.boot_ns,
            data: &self.data,
            cut: self.cut,
            lost: self.lost,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConsoleDecodeError {
    #[error("console record of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("console record announces {len} bytes but carries {have}")]
    Length { len: u32, have: usize },
    #[error("console record with unknown stream {0}")]
    UnknownStream(u32),
}

impl ConsoleDecodeError {
    /// Bounded label value for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Short(_) => "short_record",
            Self::Length { .. } => "bad_length",
            Self::UnknownStream(_) => "unknown_stream",
        }
    }
}

pub(crate) fn chunk(bytes: &[u8]) -> Result<Chunk<'_>, ConsoleDecodeError> {
    let header_len = size_of::<ConsoleRecordHeader>();
    if bytes.len() < header_len {
        return Err(ConsoleDecodeError::Short(bytes.len()));
    }
    // SAFETY: length checked; the header is plain integers.
    let header: ConsoleRecordHeader = unsafe {
        bytes
            .as_ptr()
            .cast::<ConsoleRecordHeader>()
            .read_unaligned()
    };
    let data = &bytes[header_len..];
    let len = header.len as usize;
    if len > data.len() || len > CONSOLE_MAX_WRITE || u64::from(header.len) > header.total {
        return Err(ConsoleDecodeError::Length {
            len: header.len,
            have: data.len(),
        });
    }
    let stream = match header.stream {
        console_stream::STDOUT => Stream::Stdout,
        console_stream::STDERR => Stream::Stderr,
        console_stream::CONSOLE => Stream::Console,
        other => return Err(ConsoleDecodeError::UnknownStream(other)),
    };
    Ok(Chunk {
        tgid: header.tgid,
        stream,
        boot_ns: header.boot_ns,
        data: &data[..len],
        cut: header.total - u64::from(header.len),
        lost: Lost {
            bytes: header.lost_bytes,
            writes: header.lost_writes,
            reason: loss_reason(header.lost_cause),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stream: u32, len: u32, total: u64, data: &[u8]) -> Vec<u8> {
        let header = ConsoleRecordHeader {
            tgid: 7,
            fd: 1,
            stream,
            len,
            total,
            boot_ns: 99,
            lost_bytes: 5,
            lost_writes: 1,
            lost_cause: console_loss::OVER_BUDGET,
            _pad: 0,
        };
        // SAFETY: reading the bytes of a plain ABI struct.
        let mut bytes = unsafe {
            std::slice::from_raw_parts((&raw const header).cast::<u8>(), size_of_val(&header))
        }
        .to_vec();
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn records() {
        let bytes = record(console_stream::STDERR, 3, 3, b"abc\0\0");
        let c = chunk(&bytes).unwrap();
        assert_eq!(
            c,
            Chunk {
                tgid: 7,
                stream: Stream::Stderr,
                boot_ns: 99,
                data: b"abc",
                cut: 0,
                lost: Lost {
                    bytes: 5,
                    writes: 1,
                    reason: GapReason::OverBudget
                },
            }
        );
        assert_eq!(c.to_owned_chunk().as_chunk(), c);
        let bytes = record(console_stream::CONSOLE, 2, 1 << 20, b"ab");
        let c = chunk(&bytes).unwrap();
        assert_eq!(c.cut, (1 << 20) - 2);
        assert_eq!(c.stream, Stream::Console);
    }

    #[test]
    fn malformed() {
        assert_eq!(chunk(&[0; 5]).unwrap_err().reason(), "short_record");
        let e = chunk(&record(console_stream::STDOUT, 9, 9, b"abc")).unwrap_err();
        assert_eq!(e.reason(), "bad_length");
        let e = chunk(&record(console_stream::STDOUT, 3, 2, b"abc")).unwrap_err();
        assert_eq!(e.reason(), "bad_length");
        let e = chunk(&record(console_stream::NONE, 0, 0, b"")).unwrap_err();
        assert_eq!(e, ConsoleDecodeError::UnknownStream(0));
    }
}
