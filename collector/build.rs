//! Builds the kernel programs (`collector-ebpf`) for the BPF target with the pinned nightly and
//! leaves the object in OUT_DIR, where `src/ebpf/loader.rs` embeds it. `cargo xtask build-ebpf`
//! installs the toolchain and bpf-linker this needs and puts them on PATH.

/// The nightly that builds the kernel programs. Keep in step with `xtask/src/toolchain.rs`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-10-30";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=COLLECTOR_EBPF_TOOLCHAIN");
    // The shared ABI is compiled into the kernel object too.
    println!("cargo::rerun-if-changed=../collector-common");
    let toolchain =
        std::env::var("COLLECTOR_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.to_owned());
    let ebpf = aya_build::Package {
        name: "collector-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../collector-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom(&toolchain))
}
