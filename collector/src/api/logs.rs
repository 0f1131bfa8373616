//! `GET /v1/instances/{uuid}/logs?tail=N&since=TS&follow=true&stream=S`: an instance's console
//! lines as NDJSON, like `kubectl logs [-f]`. History comes from the in-memory store
//! (`console.history_bytes` per instance); with `follow=true` the response then streams each
//! new line until the instance exits. A follower that falls more than 8192 lines behind gets
//! a `{"lagged": N}` line (the N lines it missed) and continues from the newest.

use std::{convert::Infallible, sync::Arc, time::SystemTime};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{
    console::{LogRecord, Stream, store::LiveStore},
    registry::SnapshotReceiver,
};

#[derive(Clone)]
pub struct LogsState {
    pub store: Arc<LiveStore>,
    pub snapshot: SnapshotReceiver,
}

pub fn router(state: LogsState) -> Router {
    Router::new()
        .route("/v1/instances/{uuid}/logs", get(logs))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
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
        self.stream.is_none_or(|s| s == record.stream) && self.since.is_none_or(|t| record.ts >= t)
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn logs(
    State(state): State<LogsState>,
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
    let mut subscription = state.store.subscribe(&uuid, query.follow);
    if subscription.is_none() && state.snapshot.borrow().by_uuid(&uuid).next().is_some() {
        // Listed, but the console pipeline has not caught up with it yet.
        state.store.begin(&uuid.as_str().into());
        subscription = state.store.subscribe(&uuid, query.follow);
    }
    let Some(subscription) = subscription else {
        return error(
            StatusCode::NOT_FOUND,
            "no such instance (or its logs expired)",
        );
    };
    let kept: Vec<&Arc<LogRecord>> = subscription
        .history
        .iter()
        .filter(|r| filter.keep(r))
        .collect();
    let skip = query.tail.map_or(0, |n| kept.len().saturating_sub(n));
    let history: String = kept[skip..].iter().map(|r| r.to_ndjson()).collect();
    let head = futures_util::stream::iter([Ok::<_, Infallible>(Bytes::from(history))]);
    let body = match subscription.live {
        Some(live) => Body::from_stream(head.chain(follow(live, filter))),
        None => Body::from_stream(head),
    };
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// Each later record that passes `filter`, until the instance's log ends.
fn follow(
    live: broadcast::Receiver<Arc<LogRecord>>,
    filter: Filter,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(live, move |mut live| async move {
        loop {
            match live.recv().await {
                Ok(record) if filter.keep(&record) => {
                    return Some((Ok(Bytes::from(record.to_ndjson())), live));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(skipped)) => {
                    // Same shape as the events feed's notice.
                    let line = format!("{{\"lagged\":{skipped}}}\n");
                    return Some((Ok(Bytes::from(line)), live));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}
