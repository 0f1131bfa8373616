//! The real monitoring servers from Debian's packages, started for a test and killed when
//! dropped: Prometheus (`prometheus`, with `promtool`), VictoriaMetrics single node, vmagent
//! and vmalert (`victoria-metrics`). `.ci/run` installs both packages; a missing binary fails
//! the test (nothing skips).

use std::{
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{free_port, wait_for};

/// The path of `binary` from Debian `package`; panics if it is not installed.
pub fn require_binary(binary: &str, package: &str) -> PathBuf {
    let path = Path::new("/usr/bin").join(binary);
    assert!(
        path.exists(),
        "{} is missing: `apt-get install {package}` (.ci/run installs it)",
        path.display()
    );
    path
}

/// The workspace root (the folder of the root Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// A server process, killed when dropped, its output in a file of its work folder.
pub struct Server {
    pub name: &'static str,
    pub addr: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `binary` with `args(addr, work_dir)` and waits until `GET ready_path` is 200.
    pub fn start(
        name: &'static str,
        binary: &Path,
        ready_path: &str,
        args: impl FnOnce(&str, &Path) -> Vec<String>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("server dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("output.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .args(args(&addr, dir.path()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = Self {
            name,
            addr,
            child,
            log,
            _dir: dir,
        };
        let ready = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited ({status}):\n{}", server.output());
            }
            (server.status(ready_path) == Some(200)).then_some(())
        });
        assert!(
            ready.is_some(),
            "{name} not ready in 30 s:\n{}",
            server.output()
        );
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the server printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self, path: &str) -> Option<u16> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        agent
            .get(self.url(path))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    /// `GET path` as JSON (any status: the Prometheus API reports errors in the body).
    pub fn get_json(&self, path: &str) -> Value {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let mut response = agent
            .get(self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("{}: GET {path}: {e}", self.name));
        let body = response.body_mut().read_to_string().expect("body");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{}: GET {path}: not JSON ({e}): {body}", self.name))
    }

    /// An instant query through the Prometheus HTTP API (Prometheus and VictoriaMetrics alike).
    pub fn query(&self, expr: &str) -> Value {
        self.get_json(&format!("/api/v1/query?query={}", query_encode(expr)))
    }

    /// The result vector of `expr`, panicking on an error answer.
    pub fn query_ok(&self, expr: &str) -> Vec<Value> {
        let answer = self.query(expr);
        assert_eq!(
            answer["status"], "success",
            "{}: query failed: {expr}\n{answer}",
            self.name
        );
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `s` percent-encoded for a query string value.
pub fn query_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A stand-in Alertmanager for vmalert's `-notifier.url`: answers every request 200 and keeps
/// nothing. vmalert needs a notifier to run alerting rules; what it sends is not under test.
pub fn null_notifier() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind notifier");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = vec![0u8; 65536];
            let _ = stream.read(&mut buf);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    format!("http://{addr}")
}
