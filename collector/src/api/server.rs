//! The HTTP servers: one accept loop per listener (TCP or unix socket), run by the runtime on
//! the collector's own HTTP threads, so that no handler and no client ever holds up the
//! kernel-ring readers. What a client cannot get past:
//! - a header-read timeout (hyper's), which also closes a connection idle between requests,
//!   and bounds a TLS handshake (done on the connection's task, never in the accept loop);
//! - a connection limit: at the limit the oldest connection without a request in progress is
//!   closed to make room, so idle connections can neither exhaust descriptors nor lock out
//!   the scraper; when every connection is busy, new ones wait in the kernel's backlog;
//! - the router's concurrency limit and request timeouts ([`super::router`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener},
    sync::Notify,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::model::metrics::CounterVec;

/// Pause after a failed `accept` (out of descriptors, say) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connection limits of one server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_connections: usize,
}

/// A bound listener.
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// TCP with TLS.
    Tls(TcpListener, TlsAcceptor),
    /// The socket and its path (removed when the server ends).
    Unix(UnixListener, PathBuf),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(listener) => f.debug_tuple("Tcp").field(listener).finish(),
            Self::Tls(listener, _) => f.debug_tuple("Tls").field(listener).finish(),
            Self::Unix(_, path) => f.debug_tuple("Unix").field(path).finish(),
        }
    }
}

/// The peer of a request's connection (`None` on a unix socket), in the request's extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) Option<std::net::SocketAddr>);

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// An accepted connection, its TLS handshake (if any) still to do.
enum Accepted {
    Plain(Box<dyn Io>),
    Tls(TcpStream, TlsAcceptor),
}

impl Accepted {
    /// The stream to serve HTTP on: a TLS handshake within `timeout`; `None` if it fails.
    async fn stream(self, server: &'static str, timeout: Duration) -> Option<Box<dyn Io>> {
        match self {
            Self::Plain(stream) => Some(stream),
            Self::Tls(stream, acceptor) => {
                match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => Some(Box::new(stream)),
                    Ok(Err(error)) => {
                        debug!(server, %error, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        debug!(server, "TLS handshake timed out");
                        None
                    }
                }
            }
        }
    }
}

impl Listener {
    /// Binds a unix socket at `path` with permission bits `mode`: a stale socket left by an
    /// earlier run is replaced, anything else at the path (or a socket something still
    /// serves) is an error.
    pub(crate) fn bind_unix(path: &Path, mode: u32) -> io::Result<Self> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process serves this socket",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; refusing to replace it",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Bound with the umask's bits (no write for others: nobody else can connect yet).
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        Ok(Self::Unix(listener, path.to_owned()))
    }

    /// The next connection, and its peer's address (TCP).
    async fn accept(&self) -> io::Result<(Accepted, Peer)> {
        Ok(match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                (Accepted::Plain(Box::new(stream)), Peer(Some(peer)))
            }
            Self::Tls(listener, acceptor) => {
                let (stream, peer) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                (Accepted::Tls(stream, acceptor.clone()), Peer(Some(peer)))
            }
            Self::Unix(listener, _) => (
                Accepted::Plain(Box::new(listener.accept().await?.0)),
                Peer(None),
            ),
        })
    }

    /// The local address of a TCP listener.
    pub(crate) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Self::Tcp(listener) | Self::Tls(listener, _) => listener.local_addr().ok(),
            Self::Unix(..) => None,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets the open connections finish
/// (follow streams end on the same token) and returns. `closed` counts the connections closed
/// to make room (`server`, `reason="evicted"`).
pub(crate) async fn serve(
    server: &'static str,
    listener: Listener,
    router: Router,
    limits: ConnectionLimits,
    closed: CounterVec,
    shutdown: CancellationToken,
) {
    let table = Arc::new(Connections::new(limits.max_connections));
    let tasks = TaskTracker::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(server, %error, "cannot accept an HTTP connection");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let Some(slot) = table.admit(&shutdown, server, &closed).await else {
            break;
        };
        let service = hyper::service::service_fn({
            let router = router.clone();
            let busy = slot.busy.clone();
            move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(peer);
                let guard = Busy::enter(&busy);
                let router = router.clone();
                async move {
                    let response = router.oneshot(request.map(Body::new)).await?;
                    Ok::<_, Infallible>(response.map(|inner| {
                        Body::new(Tracked {
                            inner,
                            _busy: guard,
                        })
                    }))
                }
            }
        });
        let shutdown = shutdown.clone();
        let builder = builder.clone();
        tasks.spawn(async move {
            let handshake = stream.stream(server, limits.header_read_timeout);
            let stream = tokio::select! {
                stream = handshake => match stream {
                    Some(stream) => stream,
                    None => return,
                },
                () = slot.evicted.cancelled() => return,
                () = shutdown.cancelled() => return,
            };
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let mut closing = false;
            loop {
                tokio::select! {
                    ended = connection.as_mut() => {
                        if let Err(error) = ended {
                            debug!(server, %error, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    () = slot.evicted.cancelled() => {
                        debug!(server, "idle HTTP connection closed to make room");
                        break;
                    }
                    () = shutdown.cancelled(), if !closing => {
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(slot);
        });
    }
    tasks.close();
    tasks.wait().await;
    if let Listener::Unix(_, path) = &listener {
        let _ = std::fs::remove_file(path);
    }
}

/// The open connections of one server, oldest first.
struct Connections {
    max: usize,
    table: Mutex<Table>,
    freed: Notify,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    open: BTreeMap<u64, Entry>,
}

struct Entry {
    busy: Arc<AtomicUsize>,
    evict: CancellationToken,
}

/// One admitted connection; its place is freed when it is dropped.
struct Slot {
    id: u64,
    /// Requests in progress on it (from their headers to the end of their response).
    busy: Arc<AtomicUsize>,
    /// Cancelled when the connection is closed to make room.
    evicted: CancellationToken,
    connections: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self.connections.table.lock().expect("connections lock");
        table.open.remove(&self.id);
        drop(table);
        self.connections.freed.notify_one();
    }
}

impl Connections {
    fn new(max: usize) -> Self {
        Self {
            max,
            table: Mutex::new(Table::default()),
            freed: Notify::new(),
        }
    }

    /// A place for a new connection: at the limit the oldest idle connection is closed for
    /// it; when none is idle, waits until one ends. `None` at shutdown.
    async fn admit(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
        server: &'static str,
        closed: &CounterVec,
    ) -> Option<Slot> {
        loop {
            let freed = self.freed.notified();
            {
                let mut table = self.table.lock().expect("connections lock");
                if table.open.len() >= self.max {
                    let idle = table
                        .open
                        .iter()
                        .find(|(_, e)| e.busy.load(Ordering::Acquire) == 0)
                        .map(|(id, _)| *id);
                    if let Some(entry) = idle.and_then(|id| table.open.remove(&id)) {
                        entry.evict.cancel();
                        closed.inc(&[server, "evicted"]);
                    }
                }
                if table.open.len() < self.max {
                    let id = table.next_id;
                    table.next_id += 1;
                    let busy = Arc::new(AtomicUsize::new(0));
                    let evicted = CancellationToken::new();
                    table.open.insert(
                        id,
                        Entry {
                            busy: busy.clone(),
                            evict: evicted.clone(),
                        },
                    );
                    return Some(Slot {
                        id,
                        busy,
                        evicted,
                        connections: self.clone(),
                    });
                }
            }
            tokio::select! {
                () = freed => {}
                () = shutdown.cancelled() => return None,
            }
        }
    }
}

/// A request in progress on a connection, until its response body is done.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Self(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection busy until it is sent (or dropped).
struct Tracked {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_idle_connection_makes_room() {
        let connections = Arc::new(Connections::new(2));
        let shutdown = CancellationToken::new();
        let closed = CounterVec::default();
        let first = connections.admit(&shutdown, "t", &closed).await.unwrap();
        let second = connections.admit(&shutdown, "t", &closed).await.unwrap();
        let _request = Busy::enter(&first.busy);
        // The first is busy: the second (idle) is closed for the third.
        let third = connections.admit(&shutdown, "t", &closed).await.unwrap();
        assert!(second.evicted.is_cancelled());
        assert!(!first.evicted.is_cancelled());
        assert_eq!(
            closed.values(),
            vec![(vec!["t".to_owned(), "evicted".to_owned()], 1)]
        );
        drop(second);
        // Both busy: the next waits until one ends.
        let busy = Busy::enter(&third.busy);
        let waiting = {
            let connections = connections.clone();
            let shutdown = shutdown.clone();
            let closed = closed.clone();
            tokio::spawn(async move { connections.admit(&shutdown, "t", &closed).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(busy);
        drop(third);
        let fourth = waiting.await.unwrap();
        assert!(fourth.is_some());
        assert_eq!(connections.table.lock().unwrap().open.len(), 2);
    }
}
