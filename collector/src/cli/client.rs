//! The CLI's HTTP client for a running collector: ureq (blocking: a CLI needs no runtime) for
//! `HOST:PORT`, and for `unix:PATH` (the API socket) one HTTP/1 connection with hyper on a
//! small runtime of its own.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Where the collector is.
enum Target<'a> {
    Tcp(&'a str),
    Unix(&'a Path),
}

fn target(addr: &str) -> Target<'_> {
    match addr.strip_prefix("unix:") {
        Some(path) => Target::Unix(Path::new(path)),
        None => Target::Tcp(addr),
    }
}

/// GETs `path` from the collector at `addr`; returns the body of a 2xx answer, unread.
fn request(addr: &str, path: &str) -> anyhow::Result<ureq::Body> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response =
        agent
            .get(format!("http://{addr}{path}"))
            .call()
            .map_err(|error| match error {
                ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
                    anyhow::anyhow!(
                        "cannot reach a collector at {addr} (is `collector run` up?): {error}"
                    )
                }
                other => anyhow::Error::new(other).context(format!("GET {path}")),
            })?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.read_to_string().unwrap_or_default();
        bail!("GET {path}: {status}: {}", text.trim());
    }
    Ok(body)
}

/// GETs `path` from the collector at `addr` and returns the body of a 2xx answer.
pub(crate) fn get(addr: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    match target(addr) {
        Target::Tcp(addr) => {
            request(addr, path)?
                .into_reader()
                .read_to_end(&mut body)
                .context("reading response")?;
        }
        Target::Unix(socket) => unix_get(socket, path, |chunk| body.extend_from_slice(chunk))?,
    }
    Ok(body)
}

/// GETs `path` and calls `on_line` with each line of the (streamed) body as it arrives.
pub(crate) fn get_lines(
    addr: &str,
    path: &str,
    mut on_line: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    match target(addr) {
        Target::Tcp(addr) => {
            let mut reader = BufReader::new(request(addr, path)?.into_reader());
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = reader
                    .read_until(b'\n', &mut line)
                    .context("reading response")?;
                if n == 0 {
                    return Ok(());
                }
                on_line(line.strip_suffix(b"\n").unwrap_or(&line));
            }
        }
        Target::Unix(socket) => {
            let mut pending = Vec::new();
            unix_get(socket, path, |chunk| {
                pending.extend_from_slice(chunk);
                let mut start = 0;
                while let Some(end) = memchr::memchr(b'\n', &pending[start..]) {
                    on_line(&pending[start..start + end]);
                    start += end + 1;
                }
                pending.drain(..start);
            })?;
            if !pending.is_empty() {
                on_line(&pending);
            }
            Ok(())
        }
    }
}

/// GETs `path` over the unix socket at `socket`, handing each piece of a 2xx body to
/// `on_chunk` as it arrives.
fn unix_get(socket: &Path, path: &str, mut on_chunk: impl FnMut(&[u8])) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|error| {
                anyhow::anyhow!(
                    "cannot reach a collector at unix:{} (is `collector run --api-socket` up?): \
                 {error}",
                    socket.display()
                )
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake on the API socket")?;
        let connection = tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .context("building the request")?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            bail!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&text).trim()
            );
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.context("reading response")?;
            if let Some(data) = frame.data_ref() {
                on_chunk(data);
            }
        }
        connection.abort();
        Ok(())
    })
}
