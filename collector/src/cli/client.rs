//! The CLI's HTTP client for a running collector (ureq, blocking: a CLI needs no runtime).

use std::io::{BufRead, BufReader, Read};

use anyhow::{Context, bail};

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
    request(addr, path)?
        .into_reader()
        .read_to_end(&mut body)
        .context("reading response")?;
    Ok(body)
}

/// GETs `path` and calls `on_line` with each line of the (streamed) body as it arrives.
pub(crate) fn get_lines(
    addr: &str,
    path: &str,
    mut on_line: impl FnMut(&[u8]),
) -> anyhow::Result<()> {
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
