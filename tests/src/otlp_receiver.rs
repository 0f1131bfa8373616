//! An in-process OTLP logs receiver, OTLP/HTTP (protobuf) and OTLP/gRPC, decoding requests
//! with the official protocol types (`opentelemetry-proto`), with faults on demand: a status
//! (with `Retry-After`), a connection reset, a partial success, and the whole receiver down.
//!
//! The HTTP side is a small HTTP/1.1 server of its own (keep-alive, `Content-Length` bodies,
//! as the OTLP exporters send them), so a fault can be exactly what a real network does: a
//! reset is a close with `SO_LINGER` 0. What it does not cover: TLS, gzip bodies, chunked
//! request bodies, HTTP/2 for OTLP/HTTP.

use std::{
    collections::{BTreeMap, VecDeque},
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsPartialSuccess, ExportLogsServiceRequest, ExportLogsServiceResponse,
        logs_service_server::{LogsService, LogsServiceServer},
    },
    common::v1::{AnyValue, any_value},
};
use prost::Message;
use serde_json::Value;

/// A record as received: its Resource's attributes and its own, values as JSON.
#[derive(Debug, Clone)]
pub struct Received {
    pub resource: BTreeMap<String, Value>,
    pub attributes: BTreeMap<String, Value>,
    pub body: String,
    pub time_unix_nano: u64,
    pub observed_time_unix_nano: u64,
    pub event_name: String,
}

impl Received {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(Value::as_str)
    }

    pub fn res_str(&self, key: &str) -> Option<&str> {
        self.resource.get(key).and_then(Value::as_str)
    }
}

/// What the next request gets instead of a plain success.
#[derive(Debug, Clone)]
pub enum Fault {
    /// This HTTP status (gRPC: the matching code), with `Retry-After` seconds if given.
    Status(u16, Option<u64>),
    /// The connection is reset before an answer (gRPC: `UNAVAILABLE`).
    Reset,
    /// Accepted, but this many records rejected (partial success); the records are still
    /// taken as received minus that many from the request's end.
    Reject(u64),
}

fn value(v: Option<&AnyValue>) -> Value {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => Value::String(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(other) => Value::String(format!("{other:?}")),
        None => Value::Null,
    }
}

#[derive(Default)]
struct State {
    records: Mutex<Vec<Received>>,
    faults: Mutex<VecDeque<Fault>>,
    /// Requests seen (faulted or not).
    requests: AtomicU64,
    /// Requests answered with a fault.
    faulted: AtomicU64,
    down: AtomicBool,
}

impl State {
    /// Takes a decoded request: the fault to answer with, if any (the records of a faulted
    /// request are not kept, except a partial success's accepted ones).
    fn take(&self, request: &ExportLogsServiceRequest) -> Option<Fault> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let fault = self.faults.lock().unwrap().pop_front();
        let mut records = Vec::new();
        for rl in &request.resource_logs {
            let resource: BTreeMap<String, Value> = rl
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                .collect();
            for sl in &rl.scope_logs {
                for r in &sl.log_records {
                    records.push(Received {
                        resource: resource.clone(),
                        attributes: r
                            .attributes
                            .iter()
                            .map(|kv| (kv.key.clone(), value(kv.value.as_ref())))
                            .collect(),
                        body: value(r.body.as_ref())
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        time_unix_nano: r.time_unix_nano,
                        observed_time_unix_nano: r.observed_time_unix_nano,
                        event_name: r.event_name.clone(),
                    });
                }
            }
        }
        match &fault {
            None => self.records.lock().unwrap().extend(records),
            Some(Fault::Reject(n)) => {
                let keep = records.len().saturating_sub(*n as usize);
                records.truncate(keep);
                self.records.lock().unwrap().extend(records);
                self.faulted.fetch_add(1, Ordering::Relaxed);
            }
            Some(_) => {
                self.faulted.fetch_add(1, Ordering::Relaxed);
            }
        }
        fault
    }
}

/// The receiver, stopped when dropped.
pub struct OtlpReceiver {
    state: Arc<State>,
    pub port: u16,
    grpc: bool,
    runtime: Option<tokio::runtime::Runtime>,
    /// Ends the gRPC server (restarted by [`OtlpReceiver::up`]).
    grpc_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// OTLP/HTTP on a free loopback port (`POST /v1/logs`).
    pub fn http() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut receiver = Self {
            state: Arc::new(State::default()),
            port,
            grpc: false,
            runtime: None,
            grpc_stop: None,
        };
        receiver.serve_http(listener);
        receiver
    }

    /// OTLP/gRPC on a free loopback port.
    pub fn grpc() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut receiver = Self {
            state: Arc::new(State::default()),
            port,
            grpc: true,
            runtime: Some(runtime),
            grpc_stop: None,
        };
        receiver.serve_grpc(listener);
        receiver
    }

    /// The endpoint to configure (`export.otlp.endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `protocol` to configure.
    pub fn protocol(&self) -> &'static str {
        if self.grpc { "grpc" } else { "http/protobuf" }
    }

    /// Every record received so far, in arrival order.
    pub fn records(&self) -> Vec<Received> {
        self.state.records.lock().unwrap().clone()
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn faulted(&self) -> u64 {
        self.state.faulted.load(Ordering::Relaxed)
    }

    /// Queues faults for the next requests, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = Fault>) {
        self.state.faults.lock().unwrap().extend(faults);
    }

    /// Faults still queued.
    pub fn faults_left(&self) -> usize {
        self.state.faults.lock().unwrap().len()
    }

    /// Stops listening and closes every connection: the port refuses connections.
    pub fn down(&mut self) {
        self.state.down.store(true, Ordering::SeqCst);
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(());
        }
        // The HTTP accept loop sees `down` at its next connection: poke it.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        std::thread::sleep(Duration::from_millis(100));
    }

    /// Listens again on the same port.
    pub fn up(&mut self) {
        let listener = (0..100)
            .find_map(|_| {
                TcpListener::bind(("127.0.0.1", self.port))
                    .ok()
                    .or_else(|| {
                        std::thread::sleep(Duration::from_millis(50));
                        None
                    })
            })
            .expect("rebind the receiver's port");
        self.state.down.store(false, Ordering::SeqCst);
        if self.grpc {
            self.serve_grpc(listener);
        } else {
            self.serve_http(listener);
        }
    }

    fn serve_http(&mut self, listener: TcpListener) {
        let state = self.state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if state.down.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let state = state.clone();
                std::thread::spawn(move || http_connection(stream, &state));
            }
        });
    }

    fn serve_grpc(&mut self, listener: TcpListener) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.grpc_stop = Some(tx);
        let state = self.state.clone();
        let runtime = self.runtime.as_ref().expect("gRPC runtime");
        listener.set_nonblocking(true).unwrap();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming = futures_util::stream::unfold(listener, |l| async move {
                let accepted = l.accept().await.map(|(s, _)| s);
                Some((accepted, l))
            });
            let _ = tonic::transport::Server::builder()
                .add_service(LogsServiceServer::new(Grpc { state }))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.state.down.store(true, Ordering::SeqCst);
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(());
        }
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct Grpc {
    state: Arc<State>,
}

#[tonic::async_trait]
impl LogsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        match self.state.take(&request) {
            None => Ok(tonic::Response::new(ExportLogsServiceResponse::default())),
            Some(Fault::Reject(n)) => Ok(tonic::Response::new(ExportLogsServiceResponse {
                partial_success: Some(ExportLogsPartialSuccess {
                    rejected_log_records: n as i64,
                    error_message: "rejected by the test".into(),
                }),
            })),
            Some(Fault::Reset) => Err(tonic::Status::unavailable("reset by the test")),
            Some(Fault::Status(code, _)) => Err(match code {
                429 => tonic::Status::resource_exhausted("429"),
                502..=504 => tonic::Status::unavailable("unavailable"),
                _ => tonic::Status::invalid_argument("refused by the test"),
            }),
        }
    }
}

/// Serves one keep-alive connection.
fn http_connection(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Headers.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if state.down.load(Ordering::SeqCst) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default().to_owned();
        let length: usize = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 16384];
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf[head_end..head_end + length].to_vec();
        buf.drain(..head_end + length);
        if state.down.load(Ordering::SeqCst) {
            return;
        }
        if !request_line.starts_with("POST /v1/logs ") {
            respond(&mut stream, 404, None, &[]);
            continue;
        }
        let Ok(request) = ExportLogsServiceRequest::decode(body.as_slice()) else {
            respond(&mut stream, 400, None, b"not an ExportLogsServiceRequest");
            continue;
        };
        match state.take(&request) {
            None => respond(
                &mut stream,
                200,
                None,
                &ExportLogsServiceResponse::default().encode_to_vec(),
            ),
            Some(Fault::Reject(n)) => respond(
                &mut stream,
                200,
                None,
                &ExportLogsServiceResponse {
                    partial_success: Some(ExportLogsPartialSuccess {
                        rejected_log_records: n as i64,
                        error_message: "rejected by the test".into(),
                    }),
                }
                .encode_to_vec(),
            ),
            Some(Fault::Status(code, retry_after)) => {
                respond(&mut stream, code, retry_after, b"fault");
            }
            Some(Fault::Reset) => {
                reset(&stream);
                return;
            }
        }
    }
}

fn respond(stream: &mut TcpStream, code: u16, retry_after: Option<u64>, body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {code} X\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n",
        body.len()
    );
    if let Some(s) = retry_after {
        head.push_str(&format!("retry-after: {s}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

/// Sets `SO_LINGER` 0: the close that follows (the stream dropped) is a TCP reset, as from a
/// crashed peer or a middlebox.
fn reset(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on our own socket with a correctly sized `linger`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
