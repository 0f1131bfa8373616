//! The kernel side, seen from userspace: loading and attaching the programs, the BTF offsets
//! they need, and readers of what they produce.

pub mod btf_offsets;
pub mod console;
pub mod loader;
pub mod process_events;
pub mod sched;
pub mod tracefs;
