//! A minimal HTTP/1.1 client for the CLI's calls to a running collector.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// GETs `path` from the collector at `addr` and returns the body of a 2xx answer.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Bytes> {
    let (status, body) = request(addr, path).await?;
    let body = body.collect().await.context("reading response")?.to_bytes();
    if !status.is_success() {
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

/// GETs `path` and hands each line of a 2xx answer to `line` as it arrives (NDJSON streams).
pub async fn get_lines(
    addr: &str,
    path: &str,
    mut line: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let (status, mut body) = request(addr, path).await?;
    if !status.is_success() {
        let body = body.collect().await.context("reading response")?.to_bytes();
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading response")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            line(&buf[..end])?;
            buf.drain(..=end);
        }
    }
    if !buf.is_empty() {
        line(&buf)?;
    }
    Ok(())
}

async fn request(
    addr: &str,
    path: &str,
) -> anyhow::Result<(hyper::StatusCode, hyper::body::Incoming)> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach a collector at {addr} (is `collector run` up?)"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .context("building request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("GET {path}"))?;
    Ok((response.status(), response.into_body()))
}

/// `s` as one path segment: every byte but the unreserved ones percent-encoded.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
