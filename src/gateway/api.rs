//! The HTTP API's handlers (the OpenAPI document, `crate::job::api::openapi`, describes them).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use lapin::types::FieldTable;
use serde_json::Value;
use tracing::{info, warn, Instrument};

use super::events::{events_of, Cursor};
use super::quota::{self, Quota, Remembered};
use super::state::Gateway;
use crate::config::TenancyMode;
use crate::job::api::{Accepted, ApiError, ApiErrorBody};
use crate::job::status::{CancelAnswer, JobStatus};
use crate::job::{valid_id, JobMessage, JobState, ResultEvent};
use crate::service::amqp;
use crate::service::status::{self, Admission, Admit};
use crate::service::telemetry::{self, TraceHeaders};
use crate::service::tenancy::{JobKey, Scope};

/// A refused request: its status, code (`ApiErrorBody::code`), message and, for 429, when to
/// come back.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn unavailable(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what}: retry later"),
        )
    }

    fn not_found(id: &str) -> Self {
        let shown: String = id.chars().take(128).collect();
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job `{shown}`"),
        )
    }

    fn limited(code: &'static str, message: String, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: ApiErrorBody {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut r = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"r2f\""),
            );
        }
        r
    }
}

/// The tenant a response was for (the metrics label), set by the handlers.
#[derive(Debug, Clone)]
pub struct TenantLabel(pub String);

fn label(scope: &Scope) -> TenantLabel {
    TenantLabel(scope.name().unwrap_or("default").to_string())
}

/// A response labelled with its tenant.
fn labelled(scope: &Scope, r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    r.extensions_mut().insert(label(scope));
    r
}

impl Gateway {
    /// The caller's tenant (from its bearer key), after taking one request from its quota.
    async fn authorize(&self, headers: &HeaderMap) -> Result<Scope, Response> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(scope) = key.and_then(|k| self.keys.scope_of(k)) else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid API key is needed: Authorization: Bearer <key>",
            )
            .into_response());
        };
        let q = Quota::of(&self.settings, &scope);
        match quota::take(&self.redis, &scope, &q).await {
            Ok(None) => Ok(scope),
            Ok(Some(wait)) => Err(labelled(
                &scope,
                Refusal::limited(
                    "rate_limited",
                    format!(
                        "more than {} requests per second (burst {})",
                        q.rate_per_sec, q.burst
                    ),
                    wait,
                ),
            )),
            Err(e) => Err(labelled(&scope, Refusal::unavailable(e))),
        }
    }

    /// The broker user a tenant's jobs are published as (its first user, else its name).
    fn broker_user(&self, scope: &Scope) -> Option<String> {
        if self.tenancy.mode() == TenancyMode::Single {
            return None;
        }
        let name = scope.name()?;
        let users = self.tenancy.settings(scope).map(|t| t.users.clone());
        Some(
            users
                .and_then(|u| u.first().cloned())
                .unwrap_or_else(|| name.to_string()),
        )
    }

    /// Output URLs signed now (those of the record may have expired).
    async fn refresh_urls(&self, result: &mut ResultEvent) {
        let ttl = self.settings.storage.presign_ttl_secs;
        if ttl == 0 {
            return;
        }
        let root = self.storage.uri("");
        for out in &mut result.outputs {
            let Some(key) = out.uri.strip_prefix(root.as_str()) else {
                continue;
            };
            match self
                .storage
                .presigned_get(key, Duration::from_secs(ttl))
                .await
            {
                Ok(Some(url)) => out.url = Some(url),
                Ok(None) => {}
                Err(e) => warn!(error = %e.0, "no presigned URL"),
            }
        }
    }

    async fn read_status(&self, job: &JobKey) -> Result<JobStatus, Refusal> {
        match status::read(&self.redis, job).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(Refusal::not_found(&job.id)),
            Err(e) => Err(Refusal::unavailable(e)),
        }
    }

    fn accepted(&self, id: &str, state: JobState, trace_id: Option<String>) -> Accepted {
        Accepted {
            id: id.to_string(),
            state,
            status_url: format!("/v1/jobs/{id}"),
            events_url: format!("/v1/jobs/{id}/events"),
            trace_id,
        }
    }
}

/// `POST /v1/jobs`.
pub async fn submit(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Bytes) -> Response {
    let scope = match gw.authorize(&headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let span = tracing::info_span!(
        "submit",
        tenant = scope.name().unwrap_or("-"),
        job_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let incoming = TraceHeaders::from_http(&headers);
    let trace_id = telemetry::adopt(&span, incoming.as_ref());
    let r = submit_job(&gw, &scope, &headers, &body, trace_id, incoming.as_ref())
        .instrument(span)
        .await;
    match r {
        Ok(r) => labelled(&scope, r),
        Err(refusal) => labelled(&scope, refusal),
    }
}

async fn submit_job(
    gw: &Arc<Gateway>,
    scope: &Scope,
    headers: &HeaderMap,
    body: &[u8],
    trace_id: Option<String>,
    incoming: Option<&TraceHeaders>,
) -> Result<Response, Refusal> {
    let s = &gw.settings;
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_string()),
            _ => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Idempotency-Key: 1 to 255 visible ASCII characters",
                ))
            }
        },
    };
    // The id: the job's own, or one made here.
    let mut value: Value = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not JSON: {e}"),
        )
    })?;
    let Some(object) = value.as_object_mut() else {
        return Err(Refusal::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_job",
            "a job is a JSON object",
        ));
    };
    let body: Vec<u8> = match object.get("id") {
        None | Some(Value::Null) => {
            object.insert(
                "id".into(),
                Value::String(uuid::Uuid::new_v4().simple().to_string()),
            );
            serde_json::to_vec(&value).unwrap_or_default()
        }
        Some(_) => body.to_vec(),
    };
    let invalid = |why: String| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_job", why);
    // The workers' own validation, with the tenant's limits and models.
    let (job, priority) = {
        let _v = tracing::info_span!("validate").entered();
        let limits = gw.tenancy.limits(scope, &s.limits);
        let models = gw.tenancy.models(scope, &gw.models);
        let message = JobMessage::parse(&body, &limits).map_err(|r| invalid(r.0))?;
        let priority = message.priority;
        let job = message
            .validate(&limits, Some(&models), s.default_model())
            .map_err(|r| invalid(r.0))?;
        if let Some(spec) = &job.webhook {
            crate::service::webhook::Receivers::of(s, gw.tenancy.settings(scope))
                .check(spec)
                .map_err(|why| invalid(format!("output.webhook: {why}")))?;
        }
        let max = i64::from(s.amqp.max_priority);
        (job, priority.unwrap_or(0).clamp(0, max) as u8)
    };
    tracing::Span::current().record("job_id", job.id.as_str());
    let key = JobKey::new(scope.clone(), job.id.as_str());
    // A retried request with the same Idempotency-Key answers the first one's job.
    let body_sha256 = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&body))
    };
    if let Some(k) = &idempotency {
        let entry = Remembered {
            id: job.id.clone(),
            body_sha256: body_sha256.clone(),
        };
        let ttl = Duration::from_secs(s.gateway.idempotency_ttl_secs.max(1));
        match quota::remember(&gw.redis, scope, k, &entry, ttl).await {
            Ok(None) => {}
            Ok(Some(first)) => {
                // The request may have left out the id: then compare the job without it.
                if first.body_sha256 != body_sha256 && !same_without_id(&body, &first, &job.id) {
                    return Err(Refusal::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "idempotency_mismatch",
                        "this Idempotency-Key was used with another body",
                    ));
                }
                let first_key = JobKey::new(scope.clone(), first.id.as_str());
                let state = match status::read(&gw.redis, &first_key).await {
                    Ok(Some(st)) => st.state,
                    Ok(None) => JobState::Queued,
                    Err(e) => return Err(Refusal::unavailable(e)),
                };
                info!(job_id = %first.id, "idempotent request: answering the first job");
                let mut r = (
                    StatusCode::OK,
                    [(header::LOCATION, format!("/v1/jobs/{}", first.id))],
                    Json(gw.accepted(&first.id, state, trace_id)),
                )
                    .into_response();
                r.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                return Ok(r);
            }
            Err(e) => return Err(Refusal::unavailable(e)),
        }
    }
    let forget = || async {
        if let Some(k) = &idempotency {
            quota::forget(&gw.redis, scope, k).await;
        }
    };
    let q = Quota::of(s, scope);
    let admission = status::admit(
        &gw.redis,
        Admit {
            job: &key,
            fingerprint: &job.fingerprint,
            by: &gw.name,
            ttl: Duration::from_secs(s.redis.status_ttl_secs),
            open: Some((
                q.max_jobs_open,
                Duration::from_secs(s.gateway.open_lapse_secs.max(1)),
            )),
        },
    )
    .await;
    match admission {
        Ok(Admission::Admitted) => {}
        Ok(Admission::Exists) => {
            forget().await;
            let state = gw.read_status(&key).await?.state;
            info!("the same job was accepted before: answering it");
            return Ok((
                StatusCode::OK,
                [(header::LOCATION, format!("/v1/jobs/{}", job.id))],
                Json(gw.accepted(&job.id, state, trace_id)),
            )
                .into_response());
        }
        Ok(Admission::Conflict) => {
            forget().await;
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("the id `{}` is another job's", job.id),
            ));
        }
        Ok(Admission::Full) => {
            forget().await;
            return Err(Refusal::limited(
                "too_many_open_jobs",
                format!(
                    "{} jobs of this tenant are queued or running: wait for some to finish",
                    q.max_jobs_open
                ),
                Duration::from_secs(1),
            ));
        }
        Err(e) => {
            forget().await;
            return Err(Refusal::unavailable(e));
        }
    }
    let mut headers_out = FieldTable::default();
    if let Some(t) = telemetry::outgoing(&tracing::Span::current(), incoming) {
        t.to_amqp(&mut headers_out);
    }
    headers_out.insert("x-r2f-accepted-by".into(), amqp::header_str(&gw.name));
    let mut props = amqp::json_props()
        .with_timestamp(amqp::now_unix())
        .with_priority(priority)
        .with_headers(headers_out);
    if let Some(mid) = amqp::message_id(&job.id) {
        props = props.with_message_id(mid);
    }
    if let Some(user) = gw.broker_user(scope) {
        props = props.with_user_id(user.as_str().into());
    }
    let published = {
        let span = tracing::info_span!("publish", model = %job.model);
        gw.publisher
            .publish(&s.amqp.jobs_exchange, &job.model, &body, props)
            .instrument(span)
            .await
    };
    if let Err(e) = published {
        status::withdraw(&gw.redis, &key).await;
        forget().await;
        warn!(error = %e, "job not published");
        return Err(Refusal::unavailable("the broker did not take the job"));
    }
    gw.metrics
        .accepted
        .with_label_values(&[scope.name().unwrap_or("default")])
        .inc();
    info!(model = %job.model, "job accepted");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/jobs/{}", job.id))],
        Json(gw.accepted(&job.id, JobState::Queued, trace_id)),
    )
        .into_response())
}

/// Whether `body` (a request that left the id out, given `id` here) is the first request's job:
/// its digest with the first job's id in place of this one's.
fn same_without_id(body: &[u8], first: &Remembered, id: &str) -> bool {
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    if v.get("id").and_then(Value::as_str) != Some(id) {
        return false;
    }
    v["id"] = Value::String(first.id.clone());
    let again = serde_json::to_vec(&v).unwrap_or_default();
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(&again)) == first.body_sha256
}

fn job_key(scope: &Scope, id: &str) -> Result<JobKey, Refusal> {
    if !valid_id(id) {
        return Err(Refusal::not_found(id));
    }
    Ok(JobKey::new(scope.clone(), id))
}

/// `GET /v1/jobs/{id}`.
pub async fn get_job(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let scope = match gw.authorize(&headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let r = async {
        let key = job_key(&scope, &id)?;
        let mut st = gw.read_status(&key).await?;
        if let Some(result) = st.result.as_mut() {
            gw.refresh_urls(result).await;
        }
        Ok::<_, Refusal>(Json(st))
    }
    .await;
    labelled(&scope, r)
}

/// `POST /v1/jobs/{id}/cancel`.
pub async fn cancel_job(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let scope = match gw.authorize(&headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let r = async {
        let key = job_key(&scope, &id)?;
        gw.read_status(&key).await?;
        let ttl = Duration::from_secs(gw.settings.redis.status_ttl_secs);
        let answer: CancelAnswer = status::request_cancel(&gw.redis, &key, ttl)
            .await
            .map_err(Refusal::unavailable)?;
        info!(job_id = %id, tenant = scope.name().unwrap_or("-"), cancel = %answer.cancel, "cancel request");
        Ok::<_, Refusal>(Json(answer))
    }
    .await;
    labelled(&scope, r)
}

/// `GET /v1/jobs/{id}/events`.
pub async fn job_events(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let scope = match gw.authorize(&headers).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if gw.is_draining() {
        return labelled(
            &scope,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "this gateway is stopping: reconnect with Last-Event-ID",
            ),
        );
    }
    let key = match job_key(&scope, &id) {
        Ok(k) => k,
        Err(r) => return labelled(&scope, r),
    };
    // Watching before the first read: nothing announced in between is missed.
    let mut woken = gw.hub.watch(&status::channel(&gw.redis, &key));
    let first = match gw.read_status(&key).await {
        Ok(s) => s,
        Err(r) => return labelled(&scope, r),
    };
    let mut cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(Cursor::parse);
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(32);
    let gw2 = gw.clone();
    let tenant = scope.name().map(str::to_string);
    let mut draining = gw.draining.clone();
    tokio::spawn(async move {
        let gw = gw2;
        gw.metrics.streams.inc();
        let mut st = Some(first);
        'stream: loop {
            let current = match st.take() {
                Some(s) => s,
                None => match status::read(&gw.redis, &key).await {
                    Ok(Some(s)) => s,
                    // The record expired, or Redis blinked: try again at the next wake-up.
                    Ok(None) | Err(_) => {
                        tokio::select! {
                            _ = woken.changed() => continue,
                            _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                            _ = draining.changed() => break 'stream,
                            _ = tx.closed() => break 'stream,
                        }
                    }
                },
            };
            let mut result = current.result.clone();
            if let Some(r) = result.as_mut() {
                gw.refresh_urls(r).await;
            }
            for e in events_of(&current, tenant.as_deref(), cursor, result.as_ref()) {
                let data = e.data.to_string();
                let event = Event::default()
                    .id(e.cursor.text())
                    .event(e.name.as_str())
                    .data(data);
                if tx.send(event).await.is_err() {
                    break 'stream;
                }
                cursor = Some(e.cursor);
            }
            if current.is_terminal() {
                break;
            }
            tokio::select! {
                _ = woken.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = draining.changed() => break,
                _ = tx.closed() => break,
            }
        }
        gw.metrics.streams.dec();
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let sse = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)));
    let mut r = labelled(&scope, sse);
    // Proxies must not buffer the stream.
    r.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}
