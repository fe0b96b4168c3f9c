//! The HTTP admin listener (`[admin] listen`): Prometheus `/metrics`,
//! `/healthz`, and a JSON API over the queue, users and POP3 sessions.
//!
//! It is a thin translation: every change goes through
//! [`control::answer`], the same typed operations as the control socket
//! and `postino queue …`, so the two can never disagree; only read-only
//! views (a page of the queue, one entry, a mailbox listing) read the store
//! directly, through the storage seam: a node on a shared PostgreSQL shows
//! the cluster's queue and users. actix-web runs on actix-rt, the runtime the rest of the server
//! uses, on one worker thread of its own, so a slow scrape never delays a
//! mail session's thread.
//!
//! Every request needs `Authorization: Bearer <admin.token>` when a token is
//! set (the config refuses a non-loopback address without one); the check
//! takes the same time whatever the token's first wrong byte.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};
use postino_core::message::now_unix;
use postino_core::store::{QueueEntry, RecipientState};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control::{self, Live, Request, Response};

/// Most queue entries one `GET /api/queue` returns.
pub const MAX_PAGE: usize = 1000;
/// Entries per page when the request names no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// How long a sampled queue depth is reused by later scrapes: counting
/// walks the schedule index (about a second for a million entries).
pub const QUEUE_SAMPLE_AGE: Duration = Duration::from_secs(10);
/// Longest `/healthz` waits for the store's flush.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The running admin listener.
pub struct Admin {
    /// Where it listens (the port chosen, with port 0).
    pub addr: SocketAddr,
    handle: ServerHandle,
}

impl Admin {
    /// Stops accepting and ends open requests.
    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// What the handlers share.
struct State {
    live: Live,
    /// The last queue depth and when it was counted.
    depth: Mutex<Option<(Instant, usize)>>,
}

/// Binds `addr` and serves the admin API on one worker thread.
///
/// # Errors
/// When the address cannot be bound.
pub fn serve(addr: SocketAddr, live: Live) -> std::io::Result<Admin> {
    let state = web::Data::new(State {
        live,
        depth: Mutex::new(None),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(from_fn(bearer))
            .route("/metrics", web::get().to(metrics))
            .route("/healthz", web::get().to(healthz))
            .route("/api/queue", web::get().to(queue_list))
            .route("/api/queue/flush", web::post().to(queue_flush))
            .route("/api/queue/{id}", web::get().to(queue_show))
            .route("/api/queue/{id}", web::delete().to(queue_delete))
            .route("/api/queue/{id}/bounce", web::post().to(queue_bounce))
            .route("/api/trace/{id}", web::get().to(trace))
            .route("/api/users", web::get().to(users))
            .route("/api/users/{address}/mailbox", web::get().to(mailbox))
            .route("/api/aliases", web::get().to(aliases))
            .route("/api/pop3/sessions", web::get().to(who))
            .route("/api/pop3/sessions/{target}", web::delete().to(kick))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)?;
    let addr = server.addrs().first().copied().unwrap_or(addr);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    info!(%addr, "admin listener started");
    Ok(Admin { addr, handle })
}

/// Refuses requests without the configured bearer token (401, with the
/// `WWW-Authenticate` challenge RFC 6750 asks for).
async fn bearer(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let token = req
        .app_data::<web::Data<State>>()
        .and_then(|s| s.live.config.current().admin.token.clone());
    if let Some(token) = token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|g| same(g, token.as_bytes())) {
            warn!(peer = ?req.peer_addr(), path = %postino_core::logsafe::escape(req.path()), "admin request without a valid token");
            let response = HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"postino\""))
                .json(ErrorBody {
                    error: "missing or wrong bearer token".into(),
                });
            return Ok(req.into_response(response).map_into_right_body());
        }
    }
    next.call(req).await.map(|r| r.map_into_left_body())
}

/// Compares without returning early at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `{"error": "…"}`, the body of every failure.
#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// `{"ok": ["…"]}`, the lines the CLI prints for the same operation.
#[derive(Serialize)]
struct OkBody {
    ok: Vec<String>,
}

fn error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody {
        error: message.into(),
    })
}

/// An answer of [`control::answer`] as HTTP. Its errors are text today;
/// "no …" (nothing by that id or name) is 404, a malformed id 400, the rest
/// (store failures) 500.
fn reply(response: Response) -> HttpResponse {
    use actix_web::http::StatusCode;
    match response {
        Response::Ok(lines) | Response::More(lines) => {
            HttpResponse::Ok().json(OkBody { ok: lines })
        }
        Response::Error(e) if e.starts_with("no ") => error(StatusCode::NOT_FOUND, e),
        Response::Error(e) if e.contains("is not a queue id") => error(StatusCode::BAD_REQUEST, e),
        Response::Error(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn store_failure(e: impl std::fmt::Display) -> HttpResponse {
    error(
        actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
        e.to_string(),
    )
}

/// Runs a store read off the async thread (sled reads in place; a long
/// walk, such as counting the queue, must not hold up other requests).
async fn blocking<T: Send + 'static, Fut: std::future::Future<Output = T>>(
    f: impl FnOnce() -> Fut + Send + 'static,
) -> Result<T, HttpResponse> {
    web::block(move || futures::executor::block_on(f()))
        .await
        .map_err(store_failure)
}

async fn metrics(state: web::Data<State>) -> HttpResponse {
    let (stale, store) = {
        let depth = state.depth.lock().unwrap_or_else(|e| e.into_inner());
        let stale = depth.is_none_or(|(at, _)| at.elapsed() >= QUEUE_SAMPLE_AGE);
        (stale, state.live.store.clone())
    };
    let sample = blocking(move || async move {
        let depth = match stale {
            true => Some(store.queue_len().await),
            false => None,
        };
        (depth, store.oldest_queued().await)
    })
    .await;
    if let Ok((depth, oldest)) = sample {
        let mut cached = state.depth.lock().unwrap_or_else(|e| e.into_inner());
        match depth {
            Some(Ok(n)) => *cached = Some((Instant::now(), n)),
            Some(Err(e)) => warn!(error = %e, "cannot count the queue"),
            None => {}
        }
        let age = match oldest {
            Ok(at) => at.map_or(0, |at| now_unix().saturating_sub(at)),
            Err(e) => {
                warn!(error = %e, "cannot read the oldest queue entry");
                0
            }
        };
        postino_core::metrics::set_queue(cached.map_or(0, |(_, n)| n), age);
    }
    HttpResponse::Ok()
        .content_type(postino_core::metrics::CONTENT_TYPE)
        .body(postino_core::metrics::render())
}

/// 200 `ok` when the store still commits (a group commit within five
/// seconds), else 503 with the reason.
async fn healthz(state: web::Data<State>) -> HttpResponse {
    use actix_web::http::StatusCode;
    match tokio::time::timeout(HEALTH_TIMEOUT, state.live.store.durable()).await {
        Ok(Ok(())) => HttpResponse::Ok().content_type("text/plain").body("ok\n"),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, format!("store: {e}")),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "store: commit timed out"),
    }
}

/// `?limit=N&after=ID`.
#[derive(Deserialize)]
struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

/// A queue entry as the API shows it.
#[derive(Serialize)]
struct QueueView {
    id: String,
    /// The reverse path, `""` for `<>`.
    sender: String,
    received_at: u64,
    next_attempt: u64,
    attempts: u32,
    client: String,
    recipients: Vec<RecipientView>,
}

#[derive(Serialize)]
struct RecipientView {
    address: String,
    /// `pending`, `deferred`, `delivered`, `failed` (bounce not yet sent)
    /// or `bounced`.
    state: &'static str,
    /// The last error or the final reply, if any, as `queue show` words it.
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    /// The same, typed: remote host, reply code, enhanced status, text.
    #[serde(skip_serializing_if = "Option::is_none")]
    diagnostic: Option<postino_core::store::DeliveryDiagnostic>,
}

impl From<&QueueEntry> for QueueView {
    fn from(e: &QueueEntry) -> QueueView {
        QueueView {
            id: e.id.to_string(),
            sender: e.sender.clone().unwrap_or_default(),
            received_at: e.received_at,
            next_attempt: e.next_attempt,
            attempts: e.attempts,
            client: e.client.clone(),
            recipients: e
                .recipients
                .iter()
                .map(|r| {
                    let (state, detail) = match &r.state {
                        RecipientState::Pending => ("pending", None),
                        RecipientState::Deferred { last_error } => {
                            ("deferred", Some(last_error.clone()))
                        }
                        RecipientState::Delivered { reply } => ("delivered", Some(reply.clone())),
                        RecipientState::Failed { reply } => ("failed", Some(reply.clone())),
                        RecipientState::Bounced { reply } => ("bounced", Some(reply.clone())),
                    };
                    RecipientView {
                        address: r.address.clone(),
                        state,
                        detail: detail.as_ref().map(|d| d.to_string()),
                        diagnostic: detail,
                    }
                })
                .collect(),
        }
    }
}

/// One page of the queue, oldest first.
#[derive(Serialize)]
struct QueuePage {
    entries: Vec<QueueView>,
    /// The `after` of the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

fn bad_request(message: String) -> HttpResponse {
    error(actix_web::http::StatusCode::BAD_REQUEST, message)
}

async fn queue_list(state: web::Data<State>, page: web::Query<Page>) -> HttpResponse {
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let after = match page.after.as_deref().map(control::parse_id).transpose() {
        Ok(a) => a,
        Err(e) => return bad_request(e),
    };
    let store = state.live.store.clone();
    // One more than asked says whether another page follows.
    match blocking(move || async move { store.queue_page(after, limit + 1).await }).await {
        Ok(Ok(items)) => {
            let mut entries: Vec<QueueEntry> = items.into_iter().map(|i| i.entry).collect();
            let more = entries.len() > limit;
            entries.truncate(limit);
            let next = more
                .then(|| entries.last().map(|e| e.id.to_string()))
                .flatten();
            HttpResponse::Ok().json(QueuePage {
                entries: entries.iter().map(QueueView::from).collect(),
                next,
            })
        }
        Ok(Err(e)) => store_failure(e),
        Err(r) => r,
    }
}

async fn queue_show(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = match control::parse_id(&id) {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    let store = state.live.store.clone();
    match blocking(move || async move { store.queue_entry(id).await }).await {
        Ok(Ok(Some(entry))) => HttpResponse::Ok().json(QueueView::from(&entry)),
        Ok(Ok(None)) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no queued message {id}"),
        ),
        Ok(Err(e)) => store_failure(e),
        Err(r) => r,
    }
}

/// `GET /api/trace/ID`: the message's history as `{"id", "events"}`.
async fn trace(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = match control::parse_id(&id) {
        Ok(id) => id,
        Err(e) => return bad_request(e),
    };
    let store = state.live.store.clone();
    match blocking(move || async move { store.history(id).await }).await {
        Ok(Ok(events)) if events.is_empty() => error(
            actix_web::http::StatusCode::NOT_FOUND,
            crate::history::not_found(id),
        ),
        Ok(Ok(events)) => {
            HttpResponse::Ok().json(serde_json::json!({ "id": id.to_string(), "events": events }))
        }
        Ok(Err(e)) => store_failure(e),
        Err(r) => r,
    }
}

async fn queue_flush(state: web::Data<State>) -> HttpResponse {
    reply(control::answer(&state.live, Request::QueueFlush).await)
}

async fn queue_delete(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = id.into_inner();
    reply(control::answer(&state.live, Request::QueueDelete { id }).await)
}

async fn queue_bounce(state: web::Data<State>, id: web::Path<String>) -> HttpResponse {
    let id = id.into_inner();
    reply(control::answer(&state.live, Request::QueueBounce { id }).await)
}

async fn users(state: web::Data<State>) -> HttpResponse {
    reply(control::answer(&state.live, Request::UserList).await)
}

async fn aliases(state: web::Data<State>) -> HttpResponse {
    reply(control::answer(&state.live, Request::AliasList).await)
}

/// One message of a mailbox as the API lists it.
#[derive(Serialize)]
struct MailView {
    key: u64,
    uidl: String,
    size: u64,
}

async fn mailbox(state: web::Data<State>, address: web::Path<String>) -> HttpResponse {
    let address = address.into_inner().to_ascii_lowercase();
    let store = state.live.store.clone();
    let lookup = address.clone();
    let found = blocking(move || async move {
        match store.is_user(&lookup).await {
            Ok(true) => store.maildrop(&lookup).await.map(Some),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await;
    match found {
        Ok(Ok(Some(entries))) => HttpResponse::Ok().json(
            entries
                .into_iter()
                .map(|e| MailView {
                    key: e.key,
                    uidl: e.uidl,
                    size: e.size,
                })
                .collect::<Vec<_>>(),
        ),
        Ok(Ok(None)) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no user {address}"),
        ),
        Ok(Err(e)) => store_failure(e),
        Err(r) => r,
    }
}

async fn who(state: web::Data<State>) -> HttpResponse {
    HttpResponse::Ok().json(state.live.sessions.list())
}

async fn kick(state: web::Data<State>, target: web::Path<String>) -> HttpResponse {
    let target = target.into_inner();
    reply(control::answer(&state.live, Request::Kick { target }).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_every_byte() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3creT", b"s3cret"));
        assert!(!same(b"s3cre", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }
}
