//! Reads of kernel memory at offsets from [`crate::maps::OFFSETS`].
//!
//! Two ways, by where the pointer comes from:
//!
//! - [`load_at`]: a plain load, for the arguments of BTF tracepoints (`tp_btf`). The verifier
//!   knows their type (`struct task_struct *`), checks the access against its BTF layout and
//!   makes the load fault-safe itself; no helper call. The offset must be a constant to the
//!   verifier: a field of `OFFSETS` (frozen, so its values are known at load), never a value
//!   computed at run time.
//! - [`read_at`]: `bpf_probe_read_kernel`, for everything else (a pointer read out of a struct,
//!   `bpf_get_current_task()`, which the verifier sees as a plain number).

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) fn read_at<T>(base: *const u8, offset: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(base.add(offset as usize).cast::<T>()) }.map_err(i64::from)
}

/// Loads the `T` at `base + offset` of a BTF-typed argument of a `tp_btf` program.
///
/// # Safety
///
/// `base` must be such an argument, unchanged, and `offset` a field of `OFFSETS` naming a field
/// of `base`'s type of at least `size_of::<T>()` bytes (the verifier refuses the program
/// otherwise; a load it accepts cannot fault).
#[inline(always)]
pub(crate) unsafe fn load_at<T: Copy>(base: *const u8, offset: u32) -> T {
    // SAFETY: see above; the verifier turns this into a fault-safe load of a checked field.
    unsafe { base.add(offset as usize).cast::<T>().read() }
}
