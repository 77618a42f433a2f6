//! The HTTP side (axum on tokio): health, readiness, metrics, the live stream, uploads, and
//! the live page (`GET /`, its assets, and the JSON and events it reads: `/v1/run`,
//! `/v1/cells`, `/v1/events`). Nothing here does CPU work; uploads stream straight to a
//! file in the spool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{watch, Semaphore};

use super::Shared;
use crate::sink::stream::{lagged_record, to_sse};
use crate::source::spool::check_name;

/// Uploads are written under `incoming/<UPLOAD_PREFIX>…` (a hidden, hence ignored, name)
/// and linked to their real name once complete and synced.
pub const UPLOAD_PREFIX: &str = ".upload-";

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    uploads: Arc<Semaphore>,
    upload_seq: Arc<AtomicU64>,
}

pub fn router(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) -> Router {
    let uploads = Arc::new(Semaphore::new(shared.config().http.max_concurrent_uploads));
    Router::new()
        .route("/", get(page))
        .route("/ui/page.js", get(page_js))
        .route("/ui/page.css", get(page_css))
        .route("/v1/run", get(run))
        .route("/v1/cells", get(cells))
        .route("/v1/events", get(events))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/stream", get(stream))
        .route("/v1/batches", post(upload))
        // The upload handler enforces `http.max_upload_bytes` itself, while streaming.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(App {
            shared,
            shutdown,
            uploads,
            upload_seq: Arc::new(AtomicU64::new(0)),
        })
}

/// The cookie that carries the token for a browser (which cannot send a bearer header
/// when it follows a link or opens an event stream).
const TOKEN_COOKIE: &str = "cellstream_token";

/// With `[http] token_file` set, every endpoint but `/healthz` needs the bearer token:
/// `Authorization: Bearer <token>`, or, for reading (GET and HEAD) only, the cookie a
/// browser is given by opening the page once as `/?token=<token>` (HttpOnly,
/// SameSite=Strict, so that no other site's page can use it, and never for uploads).
async fn require_token(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let cfg = shared.config();
    let Some(token) = cfg.token() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let matches = |given: &str| same_secret(given.as_bytes(), token.as_bytes());
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(matches) {
        return next.run(req).await;
    }
    let reading =
        req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD;
    if reading && cookie(req.headers(), TOKEN_COOKIE).is_some_and(matches) {
        return next.run(req).await;
    }
    if reading && req.uri().path() == "/" {
        let query = req.uri().query().unwrap_or("");
        let offered = query.split('&').find_map(|kv| kv.strip_prefix("token="));
        if offered.is_some_and(matches) {
            // Into the cookie, and out of the address bar (and the browser's history). No
            // Path: the cookie's path is then the page's, behind a reverse proxy's prefix too.
            return (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, "./".to_string()),
                    (
                        header::SET_COOKIE,
                        format!("{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict"),
                    ),
                ],
            )
                .into_response();
        }
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "a bearer token is required (Authorization: Bearer <token>; in a browser, open the page once as /?token=<token>)\n",
    )
        .into_response()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Compares in constant time (subtle), so that timing does not reveal how much of a guess was
/// right. Only the length can differ in time, and it is not secret.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The page and its assets, compiled in: no CDN, nothing fetched from elsewhere (the
/// Content-Security-Policy says so to the browser too). Every URL in them is relative, so
/// the page works behind a reverse proxy that serves the daemon under a path prefix.
const PAGE_HTML: &str = include_str!("page/index.html");
const PAGE_JS: &str = include_str!("page/page.js");
const PAGE_CSS: &str = include_str!("page/page.css");
const PAGE_CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, PAGE_CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE_HTML)
}

async fn page_js() -> Response {
    asset("text/javascript; charset=utf-8", PAGE_JS)
}

async fn page_css() -> Response {
    asset("text/css; charset=utf-8", PAGE_CSS)
}

fn json(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The alert conditions of `dashboards/alerts.yml`, evaluated on the daemon's own state.
fn alerts(shared: &Shared) -> Vec<super::live::AlertState> {
    let queued: i64 = ["incoming", "claimed", "emit"]
        .iter()
        .map(|s| shared.metrics.queue_depth.with_label_values(&[s]).get())
        .sum();
    shared
        .watch
        .alerts(queued, shared.is_ready() && !shared.is_draining())
}

/// `GET /v1/run`: the run so far, as the page starts from it (the last batches, run-wide
/// counts and QC histograms, the reference's composition, the alert states).
async fn run(State(app): State<App>) -> Response {
    let s = &app.shared;
    let model = serde_json::to_value(&s.model).unwrap_or_default();
    json(s.watch.run_json(model, &alerts(s)))
}

/// `GET /v1/cells`: a bounded sample of the run's cells on a 2-D map.
async fn cells(State(app): State<App>) -> Response {
    json(app.shared.watch.cells_json())
}

/// `GET /v1/events`: Server-Sent Events for the page. `event: batch` per finished batch
/// (its history entry, the run's totals and histograms, the alert states), `event: alerts`
/// every 15 s (the states alone: some depend on time), `event: reload` after a client fell
/// more than [`super::live::EVENT_BUFFER`] updates behind. Ends when the daemon stops.
async fn events(State(app): State<App>) -> Response {
    let rx = app.shared.watch.subscribe();
    let shared = app.shared.clone();
    let state = (rx, app.shutdown.clone(), shared);
    let body = futures_util::stream::unfold(state, |(mut rx, mut shutdown, shared)| async move {
        let tick = tokio::time::sleep(Duration::from_secs(15));
        let alerts_json = |shared: &Shared| {
            serde_json::to_string(&alerts(shared)).unwrap_or_else(|_| "[]".into())
        };
        let bytes = tokio::select! {
            r = rx.recv() => match r {
                Ok(update) => {
                    // The update is a JSON object: the alert states join it.
                    let body = update.strip_suffix('}').unwrap_or(&update);
                    format!("event: batch\ndata: {body},\"alerts\":{}}}\n\n", alerts_json(&shared))
                }
                Err(RecvError::Lagged(_)) => "event: reload\ndata: {}\n\n".to_string(),
                Err(RecvError::Closed) => return None,
            },
            _ = tick => format!("event: alerts\ndata: {}\n\n", alerts_json(&shared)),
            _ = shutdown.wait_for(|&stop| stop) => return None,
        };
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(bytes)),
            (rx, shutdown, shared),
        ))
    });
    // A comment first, so that the client sees the stream open at once.
    let hello = futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(Bytes::from_static(b": cellstream events\n\n"))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(hello.chain(body)),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<App>) -> Response {
    let s = &app.shared;
    if s.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else if !s.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading the model\n").into_response()
    } else if let Some(problem) = s.upstream_problem() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")).into_response()
    } else {
        "ready\n".into_response()
    }
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.shared.metrics.render(),
    )
        .into_response()
}

/// `GET /v1/stream`: every committed batch's records as NDJSON (cell records, then the
/// `"type":"batch"` summary), or as Server-Sent Events when the client accepts
/// `text/event-stream`. Ends when the daemon stops.
async fn stream(State(app): State<App>, headers: HeaderMap) -> Response {
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let rx = app.shared.stream.subscribe();
    let clients = app.shared.metrics.stream_clients.clone();
    clients.inc();
    let guard = ClientGuard(clients);
    let state = (rx, app.shutdown.clone(), guard);
    let body =
        futures_util::stream::unfold(state, move |(mut rx, mut shutdown, guard)| async move {
            let keep_alive = tokio::time::sleep(Duration::from_secs(15));
            let next = tokio::select! {
                r = rx.recv() => match r {
                    Ok(batch) => Some(batch.ndjson.clone()),
                    Err(RecvError::Lagged(n)) => Some(Bytes::from(lagged_record(n))),
                    Err(RecvError::Closed) => None,
                },
                _ = keep_alive, if sse => Some(Bytes::new()),
                _ = shutdown.wait_for(|&stop| stop) => None,
            };
            let bytes = match next? {
                keep_alive if keep_alive.is_empty() => Bytes::from_static(b": keep-alive\n\n"),
                ndjson if sse => Bytes::from(to_sse(&ndjson)),
                ndjson => ndjson,
            };
            Some((
                Ok::<_, std::convert::Infallible>(bytes),
                (rx, shutdown, guard),
            ))
        });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// Counts a connected stream client while it lives.
struct ClientGuard(prometheus::IntGauge);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Deserialize)]
struct UploadQuery {
    /// The batch's file name in the spool (its id is the name without format extensions).
    name: Option<String>,
}

/// `POST /v1/batches[?name=NAME]`: the body is one batch file in any readable format. It is
/// written to the spool (synced, then linked into `incoming/` without replacing anything)
/// and answered 202 with its batch id; the daemon processes it like any dropped file.
/// 413: over `http.max_upload_bytes`. 429: too many uploads at once, or `spool.max_queued`
/// batches already waiting. 409: a batch of that name is already waiting.
async fn upload(
    State(app): State<App>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let shared = &app.shared;
    let count = |outcome: &str| shared.metrics.uploads.with_label_values(&[outcome]).inc();
    let refuse = |status: StatusCode, outcome: &str, msg: String| {
        count(outcome);
        (status, format!("{msg}\n")).into_response()
    };
    if shared.is_draining() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the daemon is shutting down".into(),
        );
    }
    let Some(spool) = shared.spool.clone() else {
        return refuse(
            StatusCode::NOT_FOUND,
            "bad_request",
            "this daemon has no spool folder ([spool] dir): send batches with `cellstream submit --nats URL`".into(),
        );
    };
    let cfg = shared.config();
    let cap = cfg.http.max_upload_bytes;
    let name = match query.name.as_deref().map(check_name) {
        Some(Ok(n)) => n.to_string(),
        Some(Err(e)) => return refuse(StatusCode::BAD_REQUEST, "bad_request", e),
        None => format!(
            "upload-{}-{}",
            std::process::id(),
            app.upload_seq.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is over http.max_upload_bytes = {cap} bytes"),
        );
    }
    let Ok(_permit) = app.uploads.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!(
                "{} uploads are already being written; retry later",
                cfg.http.max_concurrent_uploads
            ),
        );
    };
    let incoming = spool.incoming.clone();
    let waiting = tokio::task::spawn_blocking(move || spool.waiting().map(|w| w.len()))
        .await
        .unwrap_or(Ok(usize::MAX));
    match waiting {
        Ok(n) if n >= cfg.spool.max_queued => {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("{n} batches are already waiting (spool.max_queued); retry later"),
            )
        }
        Ok(_) => {}
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                format!("cannot list the spool: {e}"),
            )
        }
    }
    let seq = app.upload_seq.fetch_add(1, Ordering::Relaxed);
    let tmp = incoming.join(format!("{UPLOAD_PREFIX}{}-{seq}.part", std::process::id()));
    let written = receive(body, &tmp, cap).await;
    let written = match written {
        Ok(n) => n,
        Err(Received::TooLarge) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the body is over http.max_upload_bytes = {cap} bytes"),
            );
        }
        Err(Received::Failed(status, msg)) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return refuse(status, "error", msg);
        }
    };
    if written == 0 {
        let _ = tokio::fs::remove_file(&tmp).await;
        return refuse(StatusCode::BAD_REQUEST, "bad_request", "empty body".into());
    }
    let final_name = name.clone();
    let tmp2 = tmp.clone();
    let linked = tokio::task::spawn_blocking(move || {
        // link(2) fails when the name exists: an upload never replaces a waiting batch.
        let linked = std::fs::hard_link(&tmp2, incoming.join(&final_name));
        let _ = std::fs::remove_file(&tmp2);
        linked?;
        crate::fsutil::sync_dir(&incoming)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match linked {
        Ok(()) => {
            count("accepted");
            shared.wake();
            let id = crate::batch::batch_id_of(std::path::Path::new(&name));
            (
                StatusCode::ACCEPTED,
                [(header::CONTENT_TYPE, "application/json")],
                format!(
                    "{}\n",
                    serde_json::json!({"batch": id, "file": name, "bytes": written})
                ),
            )
                .into_response()
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => refuse(
            StatusCode::CONFLICT,
            "bad_request",
            format!("a batch named {name:?} is already waiting"),
        ),
        Err(e) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "error",
            format!("cannot store the upload: {e}"),
        ),
    }
}

enum Received {
    TooLarge,
    Failed(StatusCode, String),
}

/// Streams `body` into `path` (never more than `cap` bytes) and syncs it.
async fn receive(body: Body, path: &std::path::Path, cap: u64) -> Result<u64, Received> {
    let io_err = |e: std::io::Error| {
        Received::Failed(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store the upload: {e}"),
        )
    };
    let mut file = tokio::fs::File::create(path).await.map_err(io_err)?;
    let mut chunks = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            Received::Failed(StatusCode::BAD_REQUEST, format!("reading the body: {e}"))
        })?;
        total += chunk.len() as u64;
        if total > cap {
            return Err(Received::TooLarge);
        }
        file.write_all(&chunk).await.map_err(io_err)?;
    }
    file.sync_all().await.map_err(io_err)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_uses_only_relative_urls_of_its_own() {
        for (name, text) in [
            ("index.html", PAGE_HTML),
            ("page.js", PAGE_JS),
            ("page.css", PAGE_CSS),
        ] {
            // An absolute path would leave a reverse proxy's prefix; another host, the
            // appliance's network.
            for absolute in ["=\"/", "='/", "('/", "(\"/", "(`/", "url(/", "https:"] {
                assert!(!text.contains(absolute), "{name} has {absolute:?}");
            }
            let foreign = text
                .match_indices("http://")
                .filter(|(i, _)| !text[*i..].starts_with("http://www.w3.org/2000/svg"))
                .count();
            assert_eq!(foreign, 0, "{name} names another host");
        }
        for path in ["ui/page.js", "ui/page.css"] {
            assert!(PAGE_HTML.contains(&format!("\"{path}\"")), "{path}");
        }
        for path in ["'v1/run'", "'v1/cells'", "'v1/events'"] {
            assert!(PAGE_JS.contains(path), "{path}");
        }
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; cellstream_token2=x".parse().unwrap());
        h.append(header::COOKIE, "cellstream_token=secret".parse().unwrap());
        assert_eq!(cookie(&h, TOKEN_COOKIE), Some("secret"));
        assert_eq!(cookie(&h, "a"), Some("1"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
