//! A minimal HTTP/1.1 client for the CLI's calls to a running collector.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// GETs `path` from the collector at `addr`; returns the body of a 2xx answer, unread.
async fn request(addr: &str, path: &str) -> anyhow::Result<Incoming> {
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
    let status = response.status();
    let body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.context("reading response")?.to_bytes();
        bail!(
            "GET {path}: {status}: {}",
            String::from_utf8_lossy(&text).trim()
        );
    }
    Ok(body)
}

/// GETs `path` from the collector at `addr` and returns the body of a 2xx answer.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<Bytes> {
    let body = request(addr, path).await?;
    Ok(body.collect().await.context("reading response")?.to_bytes())
}

/// GETs `path` and calls `on_line` with each line of the (streamed) body as it arrives.
pub async fn get_lines(
    addr: &str,
    path: &str,
    mut on_line: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
    let mut body = request(addr, path).await?;
    let mut pending = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.context("reading response")?.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            on_line(&pending[..end]);
            pending.drain(..=end);
        }
    }
    if !pending.is_empty() {
        on_line(&pending);
    }
    Ok(())
}
