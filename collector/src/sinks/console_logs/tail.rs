//! The end of an instance's console files, read at start-up: where each stream's numbering
//! stopped, and when its last line was written (the console source continues from there after a
//! restart).

use std::{path::Path, time::SystemTime};

use super::FILE_NAME;
use crate::{
    host::{files::LogDir, names},
    model::{console::LogRecordView, time},
};

/// Bytes read from the end of each file.
const TAIL_BYTES: u64 = 1 << 20;

/// The last record of each stream (stdout, stderr, console) in `uuid`'s console files: its
/// `seq` and time. Looks through the rotated files for a stream the current one lacks, each
/// only at its end.
pub(crate) fn last_records(log_dir: &Path, uuid: &str) -> [Option<(u64, SystemTime)>; 3] {
    let mut last = [None; 3];
    let Ok(root) = LogDir::open(log_dir) else {
        return last;
    };
    let dir = names::dir_name(uuid);
    for rotation in 0.. {
        let name = if rotation == 0 {
            FILE_NAME.to_owned()
        } else {
            format!("{FILE_NAME}.{rotation}")
        };
        let Ok(bytes) = root.read_in(&dir, &name, Some(TAIL_BYTES)) else {
            break;
        };
        // The first line of a tail may be cut; it does not parse and is skipped.
        for line in bytes.split(|b| *b == b'\n') {
            let Ok(record) = serde_json::from_slice::<LogRecordView>(line) else {
                continue;
            };
            if record.instance_uuid != uuid {
                continue;
            }
            let slot = &mut last[record.stream.index()];
            if slot.is_none_or(|(seq, _)| record.seq > seq) {
                let ts = time::parse_rfc3339(&record.ts).unwrap_or(SystemTime::UNIX_EPOCH);
                *slot = Some((record.seq, ts));
            }
        }
        if last.iter().all(Option::is_some) {
            break;
        }
    }
    last
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
            RotatingFile::open(root.instance_dir("i/1").unwrap(), FILE_NAME, 1 << 20, 2).unwrap();
        let line = |stream, seq| LogRecord::test_line("i/1", stream, seq, "m").to_ndjson();
        file.append(line(Stream::Console, 4).as_bytes()).unwrap();
        file.rotate().unwrap();
        for (stream, seq) in [
            (Stream::Stdout, 1),
            (Stream::Stdout, 2),
            (Stream::Stderr, 1),
        ] {
            file.append(line(stream, seq).as_bytes()).unwrap();
        }
        file.append(b"{\"torn").unwrap();
        let last = last_records(tmp.path(), "i/1");
        let seqs: Vec<Option<u64>> = last.iter().map(|l| l.map(|(seq, _)| seq)).collect();
        assert_eq!(seqs, [Some(2), Some(1), Some(4)]);
        assert_eq!(last[0].unwrap().1, SystemTime::UNIX_EPOCH);
        assert_eq!(last_records(tmp.path(), "other"), [None; 3]);
    }
}
