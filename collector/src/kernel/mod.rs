//! The kernel side, seen from userspace: loading and attaching the programs with the offsets
//! and layouts of the running kernel (BTF, tracefs), handles on the maps userspace reads and
//! writes, and the readers and decoders of the rings.

pub(crate) mod batch;
pub(crate) mod btf_offsets;
pub(crate) mod console;
pub(crate) mod console_decode;
pub(crate) mod console_fds;
pub(crate) mod loader;
pub(crate) mod process_decode;
pub(crate) mod process_ring;
pub(crate) mod program_stats;
pub(crate) mod sched;
pub(crate) mod syscalls;
pub(crate) mod tracefs;
pub(crate) mod tracked;
