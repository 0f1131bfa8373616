//! The per-syscall tracepoints console capture attaches to (`syscalls/sys_enter_<name>`,
//! `syscalls/sys_exit_<name>`): tracefs mounted if it is not, and the layout of each event's
//! record read from its `format` file, so that no offset is compiled in.

use std::path::Path;

use collector_common::SyscallTpOffsets;
use tracing::info;

use super::syscalls::SYSCALLS;

/// Where tracefs is (or gets) mounted.
pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";

/// One tracepoint to attach: its event name, `probe` label, and why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// `sys_enter_<syscall>` or `sys_exit_<syscall>`.
    pub(crate) name: String,
    pub(crate) syscall: &'static str,
    pub(crate) probe: &'static str,
    pub(crate) enter: bool,
    pub(crate) unusable: Option<String>,
}

/// How console capture hooks syscalls on this kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConsoleHooks {
    /// The per-syscall tracepoints, with their common record layout.
    PerSyscall {
        offsets: SyscallTpOffsets,
        events: Vec<Event>,
    },
    /// The raw `sys_enter`/`sys_exit` tracepoints (every syscall runs the programs), and why.
    Raw(String),
}

/// Picks the hooks: per-syscall tracepoints when the kernel has them (mounting tracefs first
/// if needed), the raw syscall tracepoints otherwise.
pub(crate) fn console_hooks() -> ConsoleHooks {
    let tracefs = Path::new(TRACEFS);
    if let Err(error) = ensure_mounted(tracefs) {
        return ConsoleHooks::Raw(error);
    }
    let syscalls = tracefs.join("events/syscalls");
    if !syscalls.is_dir() {
        return ConsoleHooks::Raw(format!(
            "{} is missing: this kernel has no per-syscall tracepoints (CONFIG_FTRACE_SYSCALLS)",
            syscalls.display()
        ));
    }
    let mut layout = Layout::default();
    let mut events = Vec::new();
    for followed in SYSCALLS {
        if followed.number.is_none() {
            continue;
        }
        for (enter, probe) in [(true, followed.enter_probe), (false, followed.exit_probe)] {
            let kind = if enter { "enter" } else { "exit" };
            let name = format!("sys_{kind}_{}", followed.name);
            let unusable = std::fs::read_to_string(syscalls.join(&name).join("format"))
                .map_err(|e| format!("no tracepoint syscalls/{name}: {e}"))
                .and_then(|text| layout.merge(enter, &parse_format(&text)))
                .err();
            events.push(Event {
                name,
                syscall: followed.name,
                probe,
                enter,
                unusable,
            });
        }
    }
    ConsoleHooks::PerSyscall {
        offsets: layout.offsets,
        events,
    }
}

/// Mounts tracefs at `path` unless its `events` folder is already there.
fn ensure_mounted(path: &Path) -> Result<(), String> {
    if path.join("events").is_dir() {
        return Ok(());
    }
    info!(path = %path.display(), "tracefs not mounted: mounting it for the syscall tracepoints");
    let target =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"tracefs".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot mount tracefs at {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A field of a tracepoint record, from its `format` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) offset: u32,
    pub(crate) size: u32,
}

/// The fields of a `format` file (`field:<type> <name>;\toffset:N;\tsize:N;\tsigned:N;`).
pub(crate) fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(';');
            let decl = parts.next()?.strip_prefix("field:")?;
            let name = decl.split_whitespace().last()?.trim_start_matches('*');
            let name = name.split('[').next()?;
            let mut number =
                |key: &str| parts.next()?.trim().strip_prefix(key)?.parse::<u32>().ok();
            let offset = number("offset:")?;
            let size = number("size:")?;
            Some(Field {
                name: name.to_owned(),
                offset,
                size,
            })
        })
        .collect()
}

/// The record layout common to the events seen so far.
#[derive(Default)]
struct Layout {
    offsets: SyscallTpOffsets,
    /// Which of `offsets.args` an event has set.
    args_seen: [bool; 3],
    enter_seen: bool,
    exit_seen: bool,
}

impl Layout {
    /// Takes in one event's fields; refuses an event whose layout differs from the others'.
    fn merge(&mut self, enter: bool, fields: &[Field]) -> Result<(), String> {
        let nr_at = fields
            .iter()
            .position(|f| f.name == "__syscall_nr" && f.size == 4)
            .ok_or("no 4-byte __syscall_nr field")?;
        let nr = fields[nr_at].offset;
        let mut next = self.offsets;
        let differs = || "record layout differs from the other syscall events".to_owned();
        if enter {
            if self.enter_seen && nr != self.offsets.enter_nr {
                return Err(differs());
            }
            next.enter_nr = nr;
            let args = &fields[nr_at + 1..];
            for (i, arg) in args.iter().take(3).enumerate() {
                if arg.size != 8 {
                    return Err(format!(
                        "argument {} is {} bytes, not 8",
                        arg.name, arg.size
                    ));
                }
                if self.args_seen[i] && arg.offset != self.offsets.args[i] {
                    return Err(differs());
                }
                next.args[i] = arg.offset;
            }
            self.args_seen
                .iter_mut()
                .take(args.len().min(3))
                .for_each(|seen| *seen = true);
            self.enter_seen = true;
        } else {
            let ret = fields
                .iter()
                .find(|f| f.name == "ret" && f.size == 8)
                .ok_or("no 8-byte ret field")?;
            if self.exit_seen && (nr != self.offsets.exit_nr || ret.offset != self.offsets.ret) {
                return Err(differs());
            }
            next.exit_nr = nr;
            next.ret = ret.offset;
            self.exit_seen = true;
        }
        self.offsets = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTER_OPENAT: &str = "name: sys_enter_openat
ID: 782
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int dfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:umode_t mode;\toffset:40;\tsize:8;\tsigned:0;

print fmt: \"dfd: 0x%08lx, filename: 0x%08lx\", ((unsigned long)(REC->dfd))
";

    const EXIT_WRITE: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;
";

    #[test]
    fn parses_fields_with_pointer_types() {
        let fields = parse_format(ENTER_OPENAT);
        assert_eq!(fields.len(), 9);
        assert_eq!(
            fields[6],
            Field {
                name: "filename".into(),
                offset: 24,
                size: 8
            }
        );
    }

    #[test]
    fn layout_from_enter_and_exit() {
        let mut layout = Layout::default();
        layout.merge(true, &parse_format(ENTER_OPENAT)).unwrap();
        layout.merge(false, &parse_format(EXIT_WRITE)).unwrap();
        assert_eq!(
            layout.offsets,
            SyscallTpOffsets {
                enter_nr: 8,
                args: [16, 24, 32],
                exit_nr: 8,
                ret: 16,
            }
        );
    }

    #[test]
    fn refuses_a_differing_layout() {
        let mut layout = Layout::default();
        layout.merge(false, &parse_format(EXIT_WRITE)).unwrap();
        let moved = EXIT_WRITE.replace("offset:16", "offset:24");
        assert!(layout.merge(false, &parse_format(&moved)).is_err());
        assert!(layout.merge(false, &parse_format("format:\n")).is_err());
        assert_eq!(layout.offsets.ret, 16);
    }
}
