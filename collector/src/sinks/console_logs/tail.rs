//! The end of an instance's console files, read at start-up: where each stream's numbering
//! stopped, and when its last line was written (the console source continues from there after a
//! restart).

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::Path,
    time::SystemTime,
};

use super::FILE_NAME;
use crate::{
    host::{files::LogDir, names},
    model::{console::LogRecordView, time},
};

/// Bytes read at a time, from the end back.
const CHUNK: u64 = 64 << 10;
/// Bytes read of one instance's files, at most.
const MAX_BYTES: u64 = 16 << 20;

/// The last record of each stream.
type Last = [Option<(u64, SystemTime)>; 3];

/// The last record of each stream (stdout, stderr, console) in `uuid`'s console files: its
/// `seq` and time. Reads from the end back (into the rotated files for a stream the newer ones
/// lack) until every stream is found, or lines written before `covered_before` are reached (what
/// is older is known from elsewhere: the restart state), or [`MAX_BYTES`] are read.
pub(crate) fn last_records(log_dir: &Path, uuid: &str, covered_before: Option<SystemTime>) -> Last {
    let mut last = [None; 3];
    let Ok(root) = LogDir::open(log_dir) else {
        return last;
    };
    let dir = names::dir_name(uuid);
    let mut budget = MAX_BYTES;
    for rotation in 0.. {
        let name = if rotation == 0 {
            FILE_NAME.to_owned()
        } else {
            format!("{FILE_NAME}.{rotation}")
        };
        let Ok(mut file) = root.open_in(&dir, &name) else {
            break;
        };
        let done = read_back(&mut file, uuid, covered_before, &mut budget, &mut last);
        if done || budget == 0 {
            break;
        }
    }
    last
}

/// Reads `file` from its end back into `last`; true once nothing older is needed.
fn read_back(
    file: &mut File,
    uuid: &str,
    covered_before: Option<SystemTime>,
    budget: &mut u64,
    last: &mut Last,
) -> bool {
    let Ok(mut end) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    // The start of a line whose end was in the chunk read before.
    let mut carry: Vec<u8> = Vec::new();
    while end > 0 && *budget > 0 {
        let start = end.saturating_sub(CHUNK.min(*budget));
        let mut chunk = vec![0; (end - start) as usize];
        if file.seek(SeekFrom::Start(start)).is_err() || file.read_exact(&mut chunk).is_err() {
            return false;
        }
        *budget -= end - start;
        chunk.extend_from_slice(&carry);
        let whole = if start == 0 {
            carry = Vec::new();
            &chunk[..]
        } else {
            let cut = chunk
                .iter()
                .position(|b| *b == b'\n')
                .map_or(chunk.len(), |i| i + 1);
            carry = chunk[..cut].to_vec();
            &chunk[cut..]
        };
        let mut older_than_covered = false;
        for line in whole.split(|b| *b == b'\n').rev() {
            let Ok(record) = serde_json::from_slice::<LogRecordView>(line) else {
                continue;
            };
            if record.instance_uuid != uuid {
                continue;
            }
            let ts = time::parse_rfc3339(&record.ts).unwrap_or(SystemTime::UNIX_EPOCH);
            older_than_covered |= covered_before.is_some_and(|t| ts < t);
            let slot = &mut last[record.stream.index()];
            // Going back, the first record of a stream is its last.
            if slot.is_none() {
                *slot = Some((record.seq, ts));
            }
        }
        if last.iter().all(Option::is_some) || older_than_covered {
            return true;
        }
        end = start;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::files::RotatingFile,
        model::console::{LogRecord, Stream},
    };

    #[test]
    fn last_seq_of_each_stream() {
        let tmp = tempfile::tempdir().unwrap();
        let root = LogDir::open(tmp.path()).unwrap();
        let mut file =
            RotatingFile::open(root.instance_dir("i/1").unwrap(), FILE_NAME, 1 << 30, 2).unwrap();
        let line = |stream, seq| LogRecord::test_line("i/1", stream, seq, "m").to_ndjson();
        file.append(line(Stream::Console, 4).as_bytes()).unwrap();
        file.rotate().unwrap();
        // More than a chunk of stdout after the last stderr line: read back across chunks.
        file.append(line(Stream::Stderr, 1).as_bytes()).unwrap();
        let lines = 3 * CHUNK as usize / line(Stream::Stdout, 1).len();
        for seq in 1..=lines as u64 {
            file.append(line(Stream::Stdout, seq).as_bytes()).unwrap();
        }
        file.append(b"{\"torn").unwrap();
        let last = last_records(tmp.path(), "i/1", None);
        let seqs: Vec<Option<u64>> = last.iter().map(|l| l.map(|(seq, _)| seq)).collect();
        assert_eq!(seqs, [Some(lines as u64), Some(1), Some(4)]);
        assert_eq!(last[0].unwrap().1, SystemTime::UNIX_EPOCH);
        assert_eq!(last_records(tmp.path(), "other", None), [None; 3]);
        // Lines older than what is covered end the search: stderr and console not looked for.
        let covered = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
        let last = last_records(tmp.path(), "i/1", Some(covered));
        assert_eq!(last[0].map(|(seq, _)| seq), Some(lines as u64));
        assert_eq!((last[1], last[2]), (None, None));
    }
}
