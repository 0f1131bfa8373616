//! The collector's kernel programs.
//!
//! Each hook lives in its own module; maps shared between hooks live in [`maps`]. Programs are
//! thin: the attribute function calls a `try_` function and turns its error into "do nothing".
//! No kernel struct offset is compiled in: they arrive in [`maps::OFFSETS`], computed by the
//! collector from the running kernel's BTF.
#![no_std]
#![no_main]
// Inline BPF assembly for atomic adds (see `sched::add`).
#![feature(asm_experimental_arch)]
// A BPF-to-BPF call costs instructions and verifier state on every event: hot helpers inline.
#![allow(clippy::inline_always)]
// aya's program macros hand each program its context by value.
#![allow(clippy::needless_pass_by_value)]
// Every program has the same shape: its attribute function calls a `try_` function and turns
// its error into "do nothing", whether or not that function can fail today.
#![allow(clippy::unnecessary_wraps)]

mod console;
mod kernel;
mod maps;
mod process;
mod sched;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies the compiler.
    loop {}
}

/// License of the programs: GPL, so they may call GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
