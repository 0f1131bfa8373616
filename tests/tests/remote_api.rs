//! The tenant-scoped remote API (`--api-listen`): a real collector, real stand-in VMMs, and
//! the fake Kubernetes API server (collector_tests::kube_api) holding the Pods that back them
//! (their containerID is the stand-in's uuid), the tokens and the RBAC grants. The collector's
//! kube-rs client makes real TokenReviews and SubjectAccessReviews over HTTP; the test counts
//! them at the fake server. Privileged (the collector loads its programs).

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::Duration,
};

use collector_tests::{
    Collector, Standin, free_port,
    kube_api::{FakeKube, FakePod, Grant, PolicyRule, Subject},
    new_uuid, path_segment, sample, wait_for,
};

const NODE: &str = "n1";
/// The default field selector's virtual node for `NODE`.
const POD_NODE: &str = "kraftlet-n1";
// Tokens: distinctive, so that the test can tell none of them reached a log line.
const TOKEN_A: &str = "tok-tenant-a-4f1d9c";
const TOKEN_B: &str = "tok-tenant-b-77ae02";
const TOKEN_OPERATOR: &str = "tok-operator-c39b51";
const TOKEN_FORGED: &str = "tok-forged-000000";

/// Two tenants' instances on this node, each with its Pod in its own namespace, and the
/// collector with the remote API on a free loopback port.
struct Setup {
    fake: FakeKube,
    collector: Collector,
    /// `http://` or `https://` base of the remote API (host:port).
    api: String,
    a: String,
    b: String,
    _vmms: Vec<Standin>,
}

fn fake_cluster(a: &str, b: &str) -> FakeKube {
    let fake = FakeKube::start();
    fake.add_token(TOKEN_A, "alice", &["tenants"]);
    fake.add_token(TOKEN_B, "bob", &["tenants"]);
    fake.add_token(TOKEN_OPERATOR, "oscar", &["operators"]);
    for (user, ns) in [("alice", "ns-a"), ("bob", "ns-b")] {
        fake.grant(Grant {
            subject: Subject::User(user.into()),
            namespace: Some(ns.into()),
            rules: vec![PolicyRule::core("get", "pods/log")],
        });
    }
    fake.grant(Grant {
        subject: Subject::Group("operators".into()),
        namespace: None,
        rules: vec![PolicyRule {
            resource_names: vec![NODE.into()],
            ..PolicyRule::core("get", "nodes/proxy")
        }],
    });
    for (ns, uuid, id) in [("ns-a", a, format!("ukp://{a}")), ("ns-b", b, b.to_owned())] {
        fake.create_namespace(ns, &[("resourcemanager.miloapis.com/project-name", ns)]);
        fake.create_pod(&FakePod {
            namespace: ns.into(),
            name: format!("pod-{}", &uuid[..8]),
            node: POD_NODE.into(),
            labels: vec![("managed-by".into(), "infra-provider-unikraft".into())],
            container_id: Some(id),
        });
    }
    fake
}

impl Setup {
    fn start(tls: Option<(&std::path::Path, &std::path::Path)>) -> Self {
        Self::start_configured(tls, None)
    }

    /// [`Setup::start`] with a config file of this text.
    fn start_configured(
        tls: Option<(&std::path::Path, &std::path::Path)>,
        config: Option<&str>,
    ) -> Self {
        let (a, b) = (new_uuid("rapi-a"), new_uuid("rapi-b"));
        let fake = fake_cluster(&a, &b);
        let addr = format!("127.0.0.1:{}", free_port());
        let log_dir = tempfile::tempdir().unwrap();
        let config_path = log_dir.path().join("collector.toml");
        let config_arg = config_path.to_str().unwrap().to_owned();
        let mut args = vec!["--api-listen", &addr, "--node-name", NODE];
        if let Some(text) = config {
            std::fs::write(&config_path, text).unwrap();
            args.extend(["--config", &config_arg]);
        }
        let paths;
        if let Some((cert, key)) = tls {
            paths = [cert.to_str().unwrap(), key.to_str().unwrap()];
            args.extend([
                "--api-tls-cert-file",
                paths[0],
                "--api-tls-key-file",
                paths[1],
            ]);
        }
        let kubeconfig = fake.kubeconfig();
        let collector = Collector::start_in_env(
            log_dir,
            &args,
            &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
        );
        // After the collector is up, so that their console lines are captured.
        let vmms = [&a, &b]
            .iter()
            .map(|uuid| {
                Standin::spawn(
                    "firecracker",
                    &["--uuid", uuid.as_str()],
                    &[("STANDIN_LINES", "3")],
                )
            })
            .collect();
        Self {
            fake,
            collector,
            api: addr,
            a,
            b,
            _vmms: vmms,
        }
    }

    /// `GET path` on the remote API (plain HTTP) with `token` and extra headers: status,
    /// `WWW-Authenticate`, body.
    fn get(&self, path: &str, token: Option<&str>, headers: &[(&str, &str)]) -> Response {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        let mut request = agent.get(format!("http://{}{path}", self.api));
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        Response {
            status: response.status().as_u16(),
            www_authenticate: response
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: response.body_mut().read_to_string().unwrap(),
        }
    }

    fn status(&self, path: &str, token: Option<&str>) -> u16 {
        self.get(path, token, &[]).status
    }

    /// Waits until the collector has named `uuid`'s Pod (the tenant's token reads its logs)
    /// and its three stdout lines arrived.
    fn wait_identity(&self, uuid: &str, token: &str) {
        let path = format!("/v1/instances/{}/logs", path_segment(uuid));
        let ready = wait_for(Duration::from_secs(15), || {
            let r = self.get(&path, Some(token), &[]);
            (r.status == 200 && r.body.contains("stdout line 3")).then_some(())
        });
        assert!(
            ready.is_some(),
            "{uuid}: no identity or lines in 15 s; last: {}\n{}",
            self.status(&path, Some(token)),
            self.collector.stderr()
        );
    }

    fn metric(&self, series: &str) -> f64 {
        sample(&self.collector.get_text("/metrics"), series).unwrap_or(0.0)
    }
}

struct Response {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

fn instance(uuid: &str, rest: &str) -> String {
    format!("/v1/instances/{}{rest}", path_segment(uuid))
}

#[test]
fn tenants_read_their_own_instances_and_operators_the_node() {
    let s = Setup::start(None);
    s.wait_identity(&s.a, TOKEN_A);
    s.wait_identity(&s.b, TOKEN_B);
    let (a, b) = (s.a.as_str(), s.b.as_str());

    // Tenant A: its own instance's logs, events and record; none of B's.
    let logs = s.get(&instance(a, "/logs"), Some(TOKEN_A), &[]);
    assert_eq!(logs.status, 200);
    assert!(logs.body.contains("stdout line 1"), "{}", logs.body);
    let events = s.get(&instance(a, "/events"), Some(TOKEN_A), &[]);
    assert_eq!(events.status, 200, "{}", events.body);
    assert!(
        events.body.contains(r#""event":"start""#),
        "{}",
        events.body
    );
    let record = s.get(&instance(a, ""), Some(TOKEN_A), &[]);
    assert_eq!(record.status, 200);
    assert!(record.body.contains(a));
    for rest in ["/logs", "/events", ""] {
        let refused = s.get(&instance(b, rest), Some(TOKEN_A), &[]);
        assert_eq!(refused.status, 403, "A reading B's {rest:?}");
        assert!(!refused.body.contains(b) && !refused.body.contains("stdout"));
        assert_eq!(s.status(&instance(a, rest), Some(TOKEN_B)), 403);
    }
    // An instance that does not exist is 403 too: existence does not leak to a tenant.
    let unknown = new_uuid("rapi-none");
    assert_eq!(s.status(&instance(&unknown, "/logs"), Some(TOKEN_A)), 403);
    assert_eq!(s.status(&instance(&unknown, ""), Some(TOKEN_A)), 403);

    // No token, a forged one, another scheme: 401, with the challenge.
    for (token, header) in [
        (None, None),
        (Some(TOKEN_FORGED), None),
        (None, Some(format!("Basic {TOKEN_A}"))),
    ] {
        let headers: Vec<(&str, &str)> = header
            .as_deref()
            .map(|h| ("Authorization", h))
            .into_iter()
            .collect();
        let r = s.get(&instance(a, "/logs"), token, &headers);
        assert_eq!(r.status, 401, "{token:?} {header:?}");
        assert_eq!(r.www_authenticate.as_deref(), Some("Bearer"));
    }

    // Node-wide routes: the node's operator only; no header a tenant sends widens access.
    for path in ["/v1/instances", "/v1/events"] {
        assert_eq!(s.status(path, Some(TOKEN_A)), 403, "{path}");
        let impersonating = s.get(
            path,
            Some(TOKEN_A),
            &[
                ("Impersonate-User", "oscar"),
                ("Impersonate-Group", "operators"),
                ("X-Remote-User", "oscar"),
                ("X-Tenant", "operators"),
            ],
        );
        assert_eq!(impersonating.status, 403, "{path} with identity headers");
    }
    let all = s.get("/v1/instances", Some(TOKEN_OPERATOR), &[]);
    assert_eq!(all.status, 200);
    assert!(all.body.contains(a) && all.body.contains(b), "{}", all.body);
    assert_eq!(s.status("/v1/events", Some(TOKEN_OPERATOR)), 200);
    assert_eq!(s.status(&instance(b, "/logs"), Some(TOKEN_OPERATOR)), 200);
    // Only after authorisation does an unknown instance say so.
    assert_eq!(s.status(&instance(&unknown, ""), Some(TOKEN_OPERATOR)), 404);

    // Probes without a token; /metrics is not served to remote readers.
    assert_eq!(s.status("/healthz", None), 200);
    assert_eq!(s.status("/readyz", None), 200);
    assert_eq!(s.status("/metrics", None), 404);
    assert_eq!(s.status("/metrics", Some(TOKEN_OPERATOR)), 404);

    // Counted: the three 401s of this test exactly (the waits only made allowed requests).
    assert_eq!(
        s.metric(r#"collector_api_auth_decisions_total{decision="unauthenticated"}"#),
        3.0
    );
    assert!(s.metric(r#"collector_api_auth_decisions_total{decision="forbidden"}"#) >= 12.0);
    assert!(s.metric(r#"collector_api_auth_decisions_total{decision="allowed"}"#) >= 9.0);
    // Every refusal logged, naming the user when known, never a token.
    let stderr = s.collector.stderr();
    let refusals: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("remote API request refused"))
        .collect();
    assert!(refusals.len() >= 15, "{}", refusals.join("\n"));
    assert!(
        refusals.iter().any(|l| l.contains("forbidden")
            && l.contains("alice")
            && l.contains("/v1/events")
            && l.contains("\"127.0.0.1:")),
        "{}",
        refusals.join("\n")
    );
    for token in [TOKEN_A, TOKEN_B, TOKEN_OPERATOR, TOKEN_FORGED] {
        assert!(!stderr.contains(token), "a token in the collector's log");
    }
}

#[test]
fn decisions_are_cached_and_a_review_failure_is_503() {
    let s = Setup::start(None);
    s.wait_identity(&s.a, TOKEN_A);
    let reviews = |what| s.fake.counts().requests(what);
    let (tokens, accesses) = (
        reviews("create tokenreviews"),
        reviews("create subjectaccessreviews"),
    );
    // The collector's counter of reviews sent agrees with the server's count.
    assert_eq!(
        s.metric(r#"collector_api_reviews_total{review="token",outcome="ok"}"#),
        tokens as f64
    );
    assert_eq!(
        s.metric(r#"collector_api_reviews_total{review="access",outcome="ok"}"#),
        accesses as f64
    );
    // Fifty more reads, allowed and refused alike, within the cache's 10 s: no new review.
    for _ in 0..25 {
        assert_eq!(s.status(&instance(&s.a, "/logs"), Some(TOKEN_A)), 200);
        assert_eq!(s.status(&instance(&s.b, "/logs"), Some(TOKEN_A)), 403);
    }
    // B's instance cost one access review per permission tried, once: pods/log in ns-b, and
    // nodes/proxy unless the wait above already asked it (before A's Pod was known).
    assert_eq!(reviews("create tokenreviews"), tokens);
    let asked = reviews("create subjectaccessreviews") - accesses;
    assert!(
        (1..=2).contains(&asked),
        "{asked} access reviews for 50 reads"
    );

    // The API server unreachable: a token not reviewed yet is 503 (never allowed), counted;
    // a decision already cached still holds.
    s.fake.cut();
    let r = s.get(&instance(&s.b, "/logs"), Some(TOKEN_B), &[]);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(s.status(&instance(&s.a, "/logs"), Some(TOKEN_A)), 200);
    s.fake.restore();
    assert_eq!(
        s.metric(r#"collector_api_auth_decisions_total{decision="unavailable"}"#),
        1.0
    );
    assert!(s.metric(r#"collector_api_reviews_total{review="token",outcome="error"}"#) >= 1.0);
    // Back: B is reviewed and reads its own.
    let back = wait_for(Duration::from_secs(10), || {
        (s.status(&instance(&s.b, "/logs"), Some(TOKEN_B)) == 200).then_some(())
    });
    assert!(back.is_some(), "{}", s.collector.stderr());
}

#[test]
fn an_open_stream_ends_once_its_access_is_revoked() {
    // Reviews are reused for 1 s: an open stream is reviewed again every second.
    let s = Setup::start_configured(None, Some("[kubernetes]\nauth_cache_seconds = 1\n"));
    s.wait_identity(&s.a, TOKEN_A);
    let forbidden = r#"collector_api_auth_decisions_total{decision="forbidden"}"#;
    let refused_before = s.metric(forbidden);
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .new_agent();
    let url = format!("http://{}{}", s.api, instance(&s.a, "/logs?follow=true"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut response = agent
            .get(&url)
            .header("Authorization", format!("Bearer {TOKEN_A}"))
            .call()
            .unwrap();
        let status = response.status().as_u16();
        let mut reader = response.body_mut().as_reader();
        let mut body = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    body.extend_from_slice(&buf[..n]);
                    let _ = tx.send(None);
                }
            }
        }
        let _ = tx.send(Some((status, String::from_utf8_lossy(&body).into_owned())));
    });
    // The stream stays open across several reviews while alice keeps the permission.
    let mut ended = None;
    let open_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < open_until {
        if let Ok(Some(done)) = rx.recv_timeout(Duration::from_millis(200)) {
            ended = Some(done);
            break;
        }
    }
    assert!(ended.is_none(), "ended while allowed: {ended:?}");
    // Alice's RoleBinding goes: the stream ends at the next review.
    s.fake.revoke(&Subject::User("alice".into()));
    let revoked = std::time::Instant::now();
    let (status, body) = loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(e) => panic!("the stream did not end after the revocation: {e}"),
        }
    };
    eprintln!(
        "follow stream ended {} ms after the revocation",
        revoked.elapsed().as_millis()
    );
    assert_eq!(status, 200);
    assert!(body.contains("stdout line 3"), "{body}");
    assert!(s.metric(forbidden) > refused_before);
    // And the next request is refused outright.
    assert_eq!(s.status(&instance(&s.a, "/logs"), Some(TOKEN_A)), 403);
}

/// A throwaway CA and a server certificate for 127.0.0.1 signed by it, as PEM files; the CA's
/// certificate (DER) for the client to trust.
fn certificates(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "remote-api test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, ca.der().to_vec())
}

/// `GET path` over TLS to `addr`, trusting only `ca`: the status, or the error.
fn tls_get(addr: &str, ca: &[u8], path: &str, token: Option<&str>) -> Result<u16, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    // A peer closing without close_notify still gave us the whole response (Connection: close).
    if let Err(e) = stream.read_to_end(&mut response)
        && response.is_empty()
    {
        return Err(e.to_string());
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {text:?}"))?;
    Ok(status)
}

#[test]
fn tls_with_a_certificate_the_client_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = certificates(dir.path());
    let s = Setup::start(Some((&cert, &key)));
    let logs = instance(&s.a, "/logs");
    let ok = wait_for(Duration::from_secs(15), || {
        (tls_get(&s.api, &ca, &logs, Some(TOKEN_A)) == Ok(200)).then_some(())
    });
    assert!(ok.is_some(), "{}", s.collector.stderr());
    assert_eq!(
        tls_get(&s.api, &ca, &instance(&s.b, "/logs"), Some(TOKEN_A)),
        Ok(403)
    );
    assert_eq!(tls_get(&s.api, &ca, &logs, None), Ok(401));
    assert_eq!(tls_get(&s.api, &ca, "/healthz", None), Ok(200));

    // A client trusting another CA refuses the server: the certificate is verified.
    let (_, _, other_ca) = certificates(tempfile::tempdir().unwrap().path());
    let refused = tls_get(&s.api, &other_ca, "/healthz", None);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("certificate")),
        "{refused:?}"
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(&s.api).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let stderr = s.collector.stderr();
    assert!(
        !stderr.contains("travel in clear"),
        "TLS configured: no warning"
    );

    // A renewed certificate (another CA, the same files) is served without a restart, once
    // the collector looks at the files again (at most every 10 s).
    let renewed = tempfile::tempdir().unwrap();
    let (new_cert, new_key, new_ca) = certificates(renewed.path());
    std::fs::copy(new_key, &key).unwrap();
    std::fs::copy(new_cert, &cert).unwrap();
    let served = wait_for(Duration::from_secs(25), || {
        (tls_get(&s.api, &new_ca, "/healthz", None) == Ok(200)).then_some(())
    });
    assert!(served.is_some(), "{}", s.collector.stderr());
    assert!(
        tls_get(&s.api, &ca, "/healthz", None).is_err(),
        "the old one is gone"
    );
    assert_eq!(tls_get(&s.api, &new_ca, &logs, Some(TOKEN_A)), Ok(200));
    assert!(
        s.collector
            .stderr()
            .contains("remote API TLS certificate reloaded")
    );
}

#[test]
fn without_tls_it_warns_and_without_kubernetes_it_refuses_to_start() {
    let s = Setup::start(None);
    assert!(
        s.collector.stderr().contains("travel in clear"),
        "{}",
        s.collector.stderr()
    );
    drop(s);
    // No client configuration: a clear start-up error, not a remote API that allows all.
    let addr = format!("127.0.0.1:{}", free_port());
    let output = std::process::Command::new(collector_tests::collector_bin())
        .args(["run", "--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &addr, "--node-name", NODE])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("api_listen") && stderr.contains("KUBECONFIG"),
        "{stderr}"
    );
}
