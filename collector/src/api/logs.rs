//! `GET /v1/instances/{uuid}/logs?tail=N&since=TS&follow=true&stream=S`: an instance's console
//! lines as NDJSON, like `kubectl logs [-f]`. History comes from the in-memory store
//! (`console.history_bytes` per instance); with `follow=true` the response then streams each
//! new line until the instance exits. A follower that falls more than 8192 lines behind gets
//! a `{"lagged": N}` line (the N lines it missed) and continues from the newest.
//!
//! Each line carries the instance's `identity` as the registry knows it when the line is sent
//! (its Pod's, or its tombstone's once it is gone): lines captured before the Pod was seen
//! carry it too once it is.

use std::{
    convert::Infallible,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::broadcast::{self, error::RecvError};

use super::{ApiState, NDJSON, error};
use crate::model::{
    console::{LogRecord, Stream, identity_json},
    instance::SnapshotReceiver,
};

/// How long a request for a listed instance waits for the console source to begin its log
/// (the registry publishes the instance a moment before the source sees it).
const BEGIN_WAIT: Duration = Duration::from_secs(2);
/// Records per chunk of a streamed history, at most.
const CHUNK_RECORDS: usize = 256;
/// Encoded bytes at which a chunk ends (a line of NUL bytes grows sixfold as JSON).
const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
pub(super) struct LogsQuery {
    /// Only the last N lines of the history.
    tail: Option<usize>,
    /// Only lines from this time on (RFC 3339).
    since: Option<String>,
    #[serde(default)]
    follow: bool,
    stream: Option<Stream>,
}

/// Which records a request wants.
#[derive(Clone, Copy)]
struct Filter {
    since: Option<SystemTime>,
    stream: Option<Stream>,
}

impl Filter {
    fn keep(&self, record: &LogRecord) -> bool {
        self.stream.is_none_or(|s| s == record.stream)
            && self.since.is_none_or(|t| record.ts.system_time() >= t)
    }
}

pub(super) async fn logs(
    State(state): State<ApiState>,
    Path(uuid): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Response {
    let since = match query
        .since
        .as_deref()
        .map(|s| OffsetDateTime::parse(s, &Rfc3339))
    {
        None => None,
        Some(Ok(t)) => Some(SystemTime::from(t)),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "since: not an RFC 3339 time"),
    };
    let filter = Filter {
        since,
        stream: query.stream,
    };
    let listed = state.snapshot.borrow().by_uuid(&uuid).next().is_some();
    let wait = if listed { BEGIN_WAIT } else { Duration::ZERO };
    let Some(subscription) = state.logs.subscribe(&uuid, query.follow, wait).await else {
        return error(
            StatusCode::NOT_FOUND,
            "no such instance (or its logs expired)",
        );
    };
    let kept: Vec<Arc<LogRecord>> = subscription
        .history
        .into_iter()
        .filter(|r| filter.keep(r))
        .collect();
    let skip = query.tail.map_or(0, |n| kept.len().saturating_sub(n));
    let stamp = Stamp::new(state.snapshot.clone(), uuid);
    let head = history_chunks(kept, skip, stamp.clone());
    let body = match subscription.live {
        Some(live) => {
            let shutdown = state.shutdown.clone();
            let tail =
                follow(live, filter, stamp).take_until(async move { shutdown.cancelled().await });
            Body::from_stream(head.chain(tail))
        }
        None => Body::from_stream(head),
    };
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

/// The identity a response stamps on its lines, looked up again whenever the registry has
/// published a change since.
struct Stamp {
    snapshot: SnapshotReceiver,
    uuid: String,
    json: Option<Arc<[u8]>>,
}

impl Clone for Stamp {
    fn clone(&self) -> Self {
        Self::new(self.snapshot.clone(), self.uuid.clone())
    }
}

impl Stamp {
    fn new(mut snapshot: SnapshotReceiver, uuid: String) -> Self {
        let json = Self::look_up(&mut snapshot, &uuid);
        Self {
            snapshot,
            uuid,
            json,
        }
    }

    fn look_up(snapshot: &mut SnapshotReceiver, uuid: &str) -> Option<Arc<[u8]>> {
        snapshot
            .borrow_and_update()
            .identity_of(uuid)
            .map(|identity| identity_json(identity).into())
    }

    /// The identity's JSON now, `None` while unknown.
    fn current(&mut self) -> Option<Arc<[u8]>> {
        if self.snapshot.has_changed().unwrap_or(false) {
            self.json = Self::look_up(&mut self.snapshot, &self.uuid);
        }
        self.json.clone()
    }
}

/// The history from `skip` on, in chunks of at most [`CHUNK_RECORDS`] records or about
/// [`CHUNK_BYTES`] bytes (one record more than that at most), each encoded only when the
/// client takes it: a history is never one buffer.
fn history_chunks(
    records: Vec<Arc<LogRecord>>,
    skip: usize,
    stamp: Stamp,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(
        (records, skip, stamp),
        |(records, mut next, mut stamp)| async move {
            if next >= records.len() {
                return None;
            }
            let identity = stamp.current();
            let mut out = Vec::new();
            let end = (next + CHUNK_RECORDS).min(records.len());
            while next < end && out.len() < CHUNK_BYTES {
                records[next].write_ndjson_as(&mut out, identity.as_deref());
                next += 1;
            }
            Some((Ok(Bytes::from(out)), (records, next, stamp)))
        },
    )
}

/// Each later record that passes `filter`, until the instance's log ends.
fn follow(
    live: broadcast::Receiver<Arc<LogRecord>>,
    filter: Filter,
    stamp: Stamp,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold((live, stamp), move |(mut live, mut stamp)| async move {
        loop {
            match live.recv().await {
                Ok(record) if filter.keep(&record) => {
                    let mut out = Vec::with_capacity(record.message.len() + 256);
                    record.write_ndjson_as(&mut out, stamp.current().as_deref());
                    return Some((Ok(Bytes::from(out)), (live, stamp)));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    // Same shape as the events feed's notice.
                    let line = format!("{{\"lagged\":{skipped}}}\n");
                    return Some((Ok(Bytes::from(line)), (live, stamp)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_history_goes_out_in_bounded_chunks() {
        // 16 KiB lines of NUL: about 96 KiB each as JSON.
        let nul = "\0".repeat(16 * 1024);
        let records: Vec<Arc<LogRecord>> = (1..=10)
            .map(|seq| LogRecord::test_line("u", Stream::Stdout, seq, &nul))
            .collect();
        let (_tx, snapshot) = crate::registry::snapshot_channel();
        let stamp = Stamp::new(snapshot, "u".into());
        let chunks: Vec<Bytes> = history_chunks(records, 2, stamp.clone())
            .map(Result::unwrap)
            .collect()
            .await;
        // One record a chunk (each is over the byte bound), from the third on.
        assert_eq!(chunks.len(), 8);
        assert!(chunks.iter().all(|c| c.len() < 2 * 96 * 1024));
        let small: Vec<Arc<LogRecord>> = (1..=600)
            .map(|seq| LogRecord::test_line("u", Stream::Stdout, seq, "x"))
            .collect();
        let lines: Vec<usize> = history_chunks(small, 0, stamp)
            .map(|c| memchr::memchr_iter(b'\n', &c.unwrap()).count())
            .collect()
            .await;
        assert_eq!(lines, [256, 256, 88]);
    }
}
