//! `collector`: the daemon and its CLI.

fn main() -> std::process::ExitCode {
    collector::cli::main()
}
