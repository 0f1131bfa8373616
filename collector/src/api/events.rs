//! `/v1/instances/{uuid}/events` and `/v1/events[?follow=true][&instance=UUID]`.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiState, NDJSON, error};
use crate::model::lifecycle::Sequenced;

fn ndjson_line(event: &Sequenced) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// Events per chunk of a streamed backlog.
const CHUNK_EVENTS: usize = 256;

/// `events` as an NDJSON body sent in chunks, each encoded only when the client takes it (a
/// node's whole retained history is never one buffer).
fn ndjson_body(events: &[Arc<Sequenced>]) -> Body {
    Body::from_stream(chunks(events))
}

fn chunks(
    events: &[Arc<Sequenced>],
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + use<> {
    let chunks: Vec<Vec<Arc<Sequenced>>> = events.chunks(CHUNK_EVENTS).map(<[_]>::to_vec).collect();
    stream::iter(chunks).map(|chunk| {
        let body: Vec<u8> = chunk.iter().flat_map(|e| ndjson_line(e)).collect();
        Ok(Bytes::from(body))
    })
}

/// `GET /v1/instances/{uuid}/events`: the instance's retained events, oldest first.
pub(super) async fn of_instance(
    State(state): State<ApiState>,
    Path(uuid): Path<String>,
) -> Response {
    let Some(events) = state.events.of_instance(&uuid) else {
        return error(StatusCode::NOT_FOUND, "no events for this instance");
    };
    ([(header::CONTENT_TYPE, NDJSON)], ndjson_body(&events)).into_response()
}

#[derive(Debug, Deserialize)]
pub(super) struct EventsQuery {
    /// Keep the response open and stream new events as they happen.
    #[serde(default)]
    follow: bool,
    /// Only this instance's events.
    instance: Option<String>,
}

/// `GET /v1/events[?follow=true][&instance=UUID]`: retained events, oldest first, then (with
/// `follow`) every new one. A follower too slow for the live feed gets a `{"lagged": N}` line
/// saying how many it missed.
pub(super) async fn all(
    State(state): State<ApiState>,
    Query(query): Query<EventsQuery>,
) -> Response {
    let (backlog, receiver) = state.events.follow(query.instance.as_deref());
    if !query.follow {
        return ([(header::CONTENT_TYPE, NDJSON)], ndjson_body(&backlog)).into_response();
    }
    let last_seq = backlog.last().map_or(0, |e| e.seq);
    let head = chunks(&backlog);
    let tail = stream::unfold(
        (receiver, last_seq, query.instance),
        |(mut receiver, last_seq, instance)| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) if event.seq <= last_seq => {}
                    Ok(event)
                        if instance
                            .as_ref()
                            .is_some_and(|i| *i != event.event.instance_uuid) => {}
                    Ok(event) => {
                        let line = ndjson_line(&event);
                        return Some((Ok(line), (receiver, event.seq, instance)));
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let line = Bytes::from(format!("{{\"lagged\":{missed}}}\n"));
                        return Some((Ok(line), (receiver, last_seq, instance)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    let shutdown = state.shutdown.clone();
    let tail = tail.take_until(async move { shutdown.cancelled().await });
    (
        [(header::CONTENT_TYPE, NDJSON)],
        Body::from_stream(head.chain(tail)),
    )
        .into_response()
}
