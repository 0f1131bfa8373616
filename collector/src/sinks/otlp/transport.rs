//! Sending one export request: OTLP/HTTP (protobuf body, `POST /v1/logs`) over hyper's pooled
//! client, or OTLP/gRPC (`LogsService/Export`) over tonic. The answer is one of [`Outcome`]:
//! the caller retries, drops or resolves.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse, logs_service_client::LogsServiceClient,
};
use prost::Message;

use crate::config::{OtlpConfig, OtlpProtocol};

/// Most bytes of a response body read.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// What became of a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Accepted; the receiver rejected this many of its records (partial success).
    Accepted { rejected: u64, message: String },
    /// Worth another try (429, 502, 503, 504, a connection error, a timeout), after at least
    /// `after` when the receiver said so (`Retry-After`).
    Retry {
        reason: &'static str,
        after: Option<Duration>,
        detail: String,
    },
    /// Refused for good (another status): the records are dropped and counted.
    Refused { detail: String },
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A connection to the receiver.
pub(crate) enum Transport {
    Http {
        client: Box<HttpClient>,
        uri: hyper::Uri,
    },
    Grpc {
        client: LogsServiceClient<tonic::transport::Channel>,
    },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("export.otlp.endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
}

impl Transport {
    /// A client for `config`'s endpoint (connecting lazily: a receiver that is not up yet is
    /// a retry, not a start-up error).
    pub(crate) fn new(config: &OtlpConfig) -> Result<Self, TransportError> {
        let bad = |message: String| TransportError::Endpoint {
            endpoint: config.endpoint.clone(),
            message,
        };
        let timeout = Duration::from_millis(config.request_timeout_ms);
        match config.protocol {
            OtlpProtocol::HttpProtobuf => {
                let base = config.endpoint.trim_end_matches('/');
                // The signal's path is added to a bare endpoint, as the OTLP exporters'
                // OTEL_EXPORTER_OTLP_ENDPOINT is; an endpoint with a path is used as is.
                let has_path = base
                    .strip_prefix("http://")
                    .is_some_and(|rest| rest.contains('/'));
                let url = if has_path {
                    base.to_owned()
                } else {
                    format!("{base}/v1/logs")
                };
                let uri: hyper::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
                let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
                connector.set_connect_timeout(Some(timeout));
                connector.set_nodelay(true);
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
                Ok(Self::Http {
                    client: Box::new(client),
                    uri,
                })
            }
            OtlpProtocol::Grpc => {
                let channel = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| bad(format!("{e}")))?
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .connect_lazy();
                Ok(Self::Grpc {
                    client: LogsServiceClient::new(channel),
                })
            }
        }
    }

    /// Sends `request` once, within `timeout`.
    pub(crate) async fn send(
        &mut self,
        request: ExportLogsServiceRequest,
        timeout: Duration,
    ) -> Outcome {
        match self {
            Self::Http { client, uri } => {
                let body = request.encode_to_vec();
                let req = hyper::Request::post(uri.clone())
                    .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(body)))
                    .expect("a valid request");
                match tokio::time::timeout(timeout, http_exchange(client, req)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Retry {
                        reason: "timeout",
                        after: None,
                        detail: format!("no answer in {} ms", timeout.as_millis()),
                    },
                }
            }
            Self::Grpc { client } => {
                let mut req = tonic::Request::new(request);
                req.set_timeout(timeout);
                match tokio::time::timeout(timeout + Duration::from_secs(1), client.export(req))
                    .await
                {
                    Ok(Ok(response)) => accepted(&response.into_inner()),
                    Ok(Err(status)) => grpc_outcome(&status),
                    Err(_) => Outcome::Retry {
                        reason: "timeout",
                        after: None,
                        detail: format!("no answer in {} ms", timeout.as_millis()),
                    },
                }
            }
        }
    }
}

fn accepted(response: &ExportLogsServiceResponse) -> Outcome {
    let (rejected, message) = response
        .partial_success
        .as_ref()
        .map_or((0, String::new()), |p| {
            (
                u64::try_from(p.rejected_log_records).unwrap_or(0),
                p.error_message.clone(),
            )
        });
    Outcome::Accepted { rejected, message }
}

async fn http_exchange(client: &HttpClient, req: hyper::Request<Full<Bytes>>) -> Outcome {
    let response = match client.request(req).await {
        Ok(r) => r,
        Err(error) => {
            return Outcome::Retry {
                reason: "connection",
                after: None,
                detail: format!("{error}"),
            };
        }
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = http_body_util::Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes);
    let reason = match status.as_u16() {
        200..=299 => {
            let Ok(body) = body else {
                // Accepted: the answer's body only tells of a partial success.
                return Outcome::Accepted {
                    rejected: 0,
                    message: String::new(),
                };
            };
            return match ExportLogsServiceResponse::decode(body) {
                Ok(r) => accepted(&r),
                // An empty or foreign body on a 2xx: accepted in full.
                Err(_) => Outcome::Accepted {
                    rejected: 0,
                    message: String::new(),
                },
            };
        }
        429 => "429",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => {
            let text = body
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned())
                .unwrap_or_default();
            return Outcome::Refused {
                detail: format!("HTTP {status}: {text}"),
            };
        }
    };
    Outcome::Retry {
        reason,
        after: retry_after,
        detail: format!("HTTP {status}"),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured: the backoff applies).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The OTLP/gRPC spec's retryable codes; the rest are refused.
fn grpc_outcome(status: &tonic::Status) -> Outcome {
    use tonic::Code;
    let reason = match status.code() {
        Code::Unavailable => "503",
        Code::ResourceExhausted => "429",
        Code::DeadlineExceeded => "timeout",
        Code::Cancelled | Code::Aborted | Code::OutOfRange | Code::DataLoss => "connection",
        _ => {
            return Outcome::Refused {
                detail: format!("gRPC {:?}: {}", status.code(), status.message()),
            };
        }
    };
    Outcome::Retry {
        reason,
        after: None,
        detail: format!("gRPC {:?}: {}", status.code(), status.message()),
    }
}

/// The delay before retry `attempt` (from 0): doubled each time from `initial`, capped at
/// `max`, with jitter (between half and all of it); at least `after` when the receiver asked.
pub(crate) fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    after: Option<Duration>,
    random: u32,
) -> Duration {
    let base = initial
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let jittered = base / 2 + (base / 2).mul_f64(f64::from(random) / f64::from(u32::MAX));
    match after {
        // Honoured, up to 5 minutes.
        Some(after) => after.min(Duration::from_secs(300)).max(jittered.min(after)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_under_the_cap_and_honours_retry_after() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(backoff(0, i, m, None, 0), Duration::from_millis(50));
        assert_eq!(backoff(0, i, m, None, u32::MAX), Duration::from_millis(100));
        assert_eq!(backoff(3, i, m, None, u32::MAX), Duration::from_millis(800));
        assert_eq!(backoff(30, i, m, None, u32::MAX), m);
        assert_eq!(
            backoff(0, i, m, Some(Duration::from_secs(3)), 0),
            Duration::from_secs(3)
        );
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn grpc_codes_map_to_the_spec() {
        assert!(matches!(
            grpc_outcome(&tonic::Status::unavailable("x")),
            Outcome::Retry { reason: "503", .. }
        ));
        assert!(matches!(
            grpc_outcome(&tonic::Status::invalid_argument("x")),
            Outcome::Refused { .. }
        ));
    }
}
