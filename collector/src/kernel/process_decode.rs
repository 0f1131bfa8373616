//! Decoding of process-ring records into the model's process events. Pure functions over bytes: no I/O, so
//! every malformed input is a table test away.

use collector_common::{
    COMM_LEN, EXEC_ARGV_LEN, EXEC_FILENAME_LEN, ExecEvent, ExitEvent, OomEvent, ProcessEventHeader,
    TRACKED_OOM_VICTIM, process_event_kind,
};

use crate::matching::split_cmdline;
use crate::model::process::{OomCounters, OomVictim, ProcessEvent, ProcessExec, ProcessExit};
use crate::model::time::page_size;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum DecodeError {
    #[error("record of {len} bytes is shorter than its {kind} layout ({need} bytes)")]
    Short {
        kind: &'static str,
        len: usize,
        need: usize,
    },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
}

impl DecodeError {
    /// Bounded label value for metrics.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Short { .. } => "short_record",
            Self::UnknownKind(_) => "unknown_kind",
        }
    }
}

/// Reads a `T` from the front of `bytes` (ring records are only 8-byte aligned by the kernel and
/// we do not rely on it).
fn read<T: Copy>(bytes: &[u8], kind: &'static str) -> Result<T, DecodeError> {
    let need = size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: length checked; T is a plain-old-data ABI type (integers and byte arrays only).
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// Decodes one record of the process-events ring buffer.
pub(crate) fn process_event(bytes: &[u8]) -> Result<ProcessEvent, DecodeError> {
    let header: ProcessEventHeader = read(bytes, "header")?;
    match header.kind {
        process_event_kind::EXEC => {
            let ev: ExecEvent = read(bytes, "exec")?;
            let argv_len = (ev.argv_len as usize).min(EXEC_ARGV_LEN);
            let prefix = &ev.argv[..argv_len];
            let args_total = (ev.argv_total as usize).max(argv_len);
            Ok(ProcessEvent::Exec(ProcessExec {
                tgid: header.tgid,
                boot_ns: header.boot_ns,
                matcher_id: ev.matcher_id,
                comm: c_string(&ev.comm[..COMM_LEN]),
                filename: c_string(&ev.filename[..EXEC_FILENAME_LEN]),
                args: whole_args(prefix, args_total > argv_len),
                args_prefix: prefix.to_vec(),
                args_total,
            }))
        }
        process_event_kind::EXIT => {
            let ev: ExitEvent = read(bytes, "exit")?;
            Ok(ProcessEvent::Exit(ProcessExit {
                tgid: header.tgid,
                boot_ns: header.boot_ns,
                oom_victim: ev.tracked_flags & TRACKED_OOM_VICTIM != 0,
                exit_code: ev.exit_code,
                group_exit_code: ev.group_exit_code,
                signal_flags: ev.signal_flags,
            }))
        }
        process_event_kind::UNTRACK => Ok(ProcessEvent::Untrack {
            tgid: header.tgid,
            boot_ns: header.boot_ns,
        }),
        process_event_kind::OOM_VICTIM => {
            let ev: OomEvent = read(bytes, "oom")?;
            let page = page_size();
            Ok(ProcessEvent::OomVictim(OomVictim {
                tgid: header.tgid,
                pid: ev.pid,
                boot_ns: header.boot_ns,
                memcg_id: ev.memcg_id,
                counters: (ev.has_counters != 0).then(|| OomCounters {
                    total_vm_bytes: ev.total_vm_pages.saturating_mul(page),
                    anon_rss_bytes: ev.anon_rss_pages.saturating_mul(page),
                    file_rss_bytes: ev.file_rss_pages.saturating_mul(page),
                    shmem_rss_bytes: ev.shmem_rss_pages.saturating_mul(page),
                    oom_score_adj: ev.oom_score_adj,
                }),
            }))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// The arguments in `prefix`; of a cut command line, only those it holds whole (the last,
/// cut one could name a wrong instance).
fn whole_args(prefix: &[u8], cut: bool) -> Vec<String> {
    if !cut {
        return split_cmdline(prefix);
    }
    let whole = prefix
        .iter()
        .rposition(|b| *b == 0)
        .map_or(&prefix[..0], |end| &prefix[..=end]);
    split_cmdline(whole)
}

/// The text before the first NUL, invalid UTF-8 replaced.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain ABI struct.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(v).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn exec_event(argv: &[u8]) -> ExecEvent {
        let mut ev = ExecEvent {
            header: ProcessEventHeader {
                kind: process_event_kind::EXEC,
                tgid: 42,
                boot_ns: 7,
            },
            matcher_id: 1,
            argv_len: argv.len() as u32,
            argv_total: argv.len() as u32,
            pid: 42,
            comm: [0; COMM_LEN],
            filename: [0; EXEC_FILENAME_LEN],
            argv: [0; EXEC_ARGV_LEN],
        };
        ev.comm[..11].copy_from_slice(b"firecracker");
        ev.filename[..20].copy_from_slice(b"/usr/bin/firecracker");
        ev.argv[..argv.len()].copy_from_slice(argv);
        ev
    }

    #[test]
    fn exec_round_trip() {
        let bytes = as_bytes(&exec_event(b"firecracker\0--uuid\0abc\0"));
        let ProcessEvent::Exec(exec) = process_event(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!(exec.tgid, 42);
        assert_eq!(exec.comm, "firecracker");
        assert_eq!(exec.filename, "/usr/bin/firecracker");
        assert_eq!(exec.args, ["firecracker", "--uuid", "abc"]);
        assert_eq!(exec.args_total, exec.args_prefix.len());
    }

    #[test]
    fn cut_command_line_keeps_whole_arguments_only() {
        let mut ev = exec_event(b"qemu\0-uuid\0abc-d");
        ev.argv_total = 4000;
        let ProcessEvent::Exec(exec) = process_event(&as_bytes(&ev)).unwrap() else {
            panic!()
        };
        assert_eq!(exec.args, ["qemu", "-uuid"], "the cut `abc-d` is not an id");
        assert_eq!(exec.args_total, 4000);
        assert_eq!(exec.args_prefix, b"qemu\0-uuid\0abc-d");
    }

    #[test]
    fn exec_with_lying_length_is_clamped() {
        let mut ev = exec_event(b"a\0");
        ev.argv_len = u32::MAX;
        let ProcessEvent::Exec(exec) = process_event(&as_bytes(&ev)).unwrap() else {
            panic!()
        };
        assert_eq!(exec.args[0], "a");
    }

    #[test]
    fn exit_and_untrack() {
        let ev = ExitEvent {
            header: ProcessEventHeader {
                kind: process_event_kind::EXIT,
                tgid: 9,
                boot_ns: 1,
            },
            exit_code: 3 << 8,
            group_exit_code: 3 << 8,
            signal_flags: 4,
            tracked_flags: 0,
        };
        let decoded = process_event(&as_bytes(&ev)).unwrap();
        assert!(matches!(
            decoded,
            ProcessEvent::Exit(ProcessExit {
                tgid: 9,
                exit_code: 768,
                ..
            })
        ));
        let mut untrack = ev;
        untrack.header.kind = process_event_kind::UNTRACK;
        assert_eq!(
            process_event(&as_bytes(&untrack)).unwrap(),
            ProcessEvent::Untrack {
                tgid: 9,
                boot_ns: 1
            }
        );
    }

    #[test]
    fn oom_victim_counters_in_bytes() {
        let ev = OomEvent {
            header: ProcessEventHeader {
                kind: process_event_kind::OOM_VICTIM,
                tgid: 5,
                boot_ns: 2,
            },
            pid: 6,
            has_counters: 1,
            total_vm_pages: 10,
            anon_rss_pages: 3,
            file_rss_pages: 2,
            shmem_rss_pages: 1,
            oom_score_adj: -500,
            _pad: 0,
            memcg_id: 77,
        };
        let ProcessEvent::OomVictim(oom) = process_event(&as_bytes(&ev)).unwrap() else {
            panic!()
        };
        let page = page_size();
        let counters = oom.counters.unwrap();
        assert_eq!((oom.tgid, oom.pid, oom.memcg_id), (5, 6, 77));
        assert_eq!(counters.anon_rss_bytes, 3 * page);
        assert_eq!(counters.oom_score_adj, -500);
        let no_task = OomEvent {
            has_counters: 0,
            ..ev
        };
        let ProcessEvent::OomVictim(oom) = process_event(&as_bytes(&no_task)).unwrap() else {
            panic!()
        };
        assert_eq!(oom.counters, None);
    }

    #[test]
    fn malformed_records() {
        assert_eq!(
            process_event(&[1, 2, 3]).unwrap_err().reason(),
            "short_record"
        );
        let mut header = as_bytes(&ProcessEventHeader {
            kind: 99,
            tgid: 1,
            boot_ns: 0,
        });
        assert_eq!(
            process_event(&header).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
        header[0] = process_event_kind::EXEC as u8;
        assert!(matches!(
            process_event(&header),
            Err(DecodeError::Short { kind: "exec", .. })
        ));
    }
}
