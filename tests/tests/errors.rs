//! Start-up mistakes end in one clear line, not a backtrace.

use std::process::Command;

use collector_tests::{collector_bin, free_port};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(collector_bin())
        .args(args)
        .output()
        .expect("run collector");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line(stderr: &str, expected: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "want one error line:\n{stderr}");
    assert!(
        lines[0].contains(expected),
        "want {expected:?} in:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("stack backtrace"),
        "{stderr}"
    );
    // Each cause once: no part of the chain (`a: b: c`) repeats a part before it.
    let parts: Vec<&str> = lines[0]["error:".len()..]
        .split(": ")
        .map(str::trim)
        .collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(
            !parts[..i]
                .iter()
                .any(|earlier| earlier.contains(part) && part.len() > 3),
            "cause {part:?} printed twice in {:?}",
            lines[0]
        );
    }
}

#[test]
fn bad_matcher_regex_names_the_matcher_and_the_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(
        &path,
        "[[matcher]]\nname = \"crosvm\"\nexecutable = \"crosvm\"\ninstance_id = '(unclosed'\n\
         vcpu_thread = '^vcpu(\\d+)$'\n",
    )
    .unwrap();
    let (ok, stderr) = run(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert_one_line(
        &stderr,
        "matcher crosvm: bad instance_id regex: regex parse error",
    );
    assert_eq!(stderr.matches("unclosed group").count(), 1, "{stderr}");
}

#[test]
fn bad_config_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:1\"\n\n[kernel]\nbogus = 3\n").unwrap();
    let (ok, stderr) = run(&["run", "--config", path.to_str().unwrap()]);
    assert!(!ok);
    assert_one_line(
        &stderr,
        &format!("config {}:4:1: unknown field `bogus`", path.display()),
    );
}

#[test]
fn missing_config_file() {
    let (ok, stderr) = run(&["run", "--config", "/nonexistent/collector.toml"]);
    assert!(!ok);
    assert_one_line(&stderr, "config /nonexistent/collector.toml: No such file");
}

#[test]
fn address_in_use() {
    let port = free_port();
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let addr = format!("127.0.0.1:{port}");
    let (ok, stderr) = run(&["run", "--listen", &addr]);
    assert!(!ok);
    assert_one_line(
        &stderr,
        &format!("cannot listen on {addr}: Address already in use"),
    );
}

#[test]
fn not_privileged() {
    use std::os::unix::process::CommandExt;
    let addr = format!("127.0.0.1:{}", free_port());
    let out = Command::new(collector_bin())
        .args(["run", "--listen", &addr])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run collector as nobody");
    assert!(!out.status.success());
    assert_one_line(
        &String::from_utf8_lossy(&out.stderr),
        "needs root, or CAP_BPF and CAP_PERFMON",
    );
}

#[test]
fn instances_without_a_collector() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (ok, stderr) = run(&["instances", "--addr", &addr]);
    assert!(!ok);
    assert_one_line(&stderr, &format!("cannot reach a collector at {addr}"));
}
