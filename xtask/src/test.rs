//! `cargo xtask test`: what CI runs. Format, lints, then every test: unit tests and the
//! privileged integration tests that load the programs into the running kernel, then the same
//! integration tests inside each kernel of the matrix (`cargo xtask test-kernels`).

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
};

use anyhow::{Context, bail};

use crate::{build, toolchain};

pub(crate) fn test(args: &[String]) -> anyhow::Result<()> {
    // The cheapest check first: the module layers, from the sources alone.
    crate::layers::layers(None)?;
    let linker_dir = build::build(false)?;
    toolchain::run(toolchain::cargo(&linker_dir).args(["fmt", "--all", "--check"]))?;
    toolchain::run(toolchain::cargo(&linker_dir).args([
        "clippy",
        "--locked",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs, linted for their own target as aya-build compiles them.
    toolchain::run(
        toolchain::cargo_with(toolchain::EBPF_TOOLCHAIN, &linker_dir)
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            )
            .args([
                "clippy",
                "--locked",
                "--package",
                "collector-ebpf",
                "--bins",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/ebpf-clippy",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    // The integration tests start target/debug/collector and the stand-in VMM binary.
    toolchain::run(toolchain::cargo(&linker_dir).args(["build", "--locked", "--bins"]))?;

    // Run the tests, echoing their output, and close with one total over every test binary.
    let mut child = toolchain::cargo(&linker_dir)
        .args(["test", "--locked", "--no-fail-fast"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count(result, " passed");
            failed += count(result, " failed");
        }
    }
    std::io::stdout().flush()?;
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    // The whole suite ends with the kernel matrix. `COLLECTOR_TEST_KERNELS=0` leaves it out of
    // a local run; a filtered run is someone working on a few tests: never the matrix.
    let off = std::env::var_os("COLLECTOR_TEST_KERNELS").is_some_and(|v| v == "0");
    if args.is_empty() && !off {
        crate::kernels::test_kernels(&crate::kernels::Options::default())?;
    } else {
        println!(
            "kernel matrix skipped ({}; run `cargo xtask test-kernels`)",
            if off {
                "COLLECTOR_TEST_KERNELS=0"
            } else {
                "`cargo test` arguments given"
            }
        );
    }
    Ok(())
}

/// The number before `label` in a `test result:` line ("ok. 5 passed; 0 failed; ...").
fn count(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| part.trim().strip_suffix(label.trim()))
        .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_from_cargo_summary() {
        let line =
            "ok. 22 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.66s";
        assert_eq!(count(line, " passed"), 22);
        assert_eq!(count(line, " failed"), 1);
        assert_eq!(count("FAILED. 3 passed; 2 failed;", " failed"), 2);
    }
}
