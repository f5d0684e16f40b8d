//! `r2f gateway`: the HTTP door in front of the broker. Stateless (everything it knows is in
//! Redis and the broker), so replicas scale out behind a load balancer.
//!
//! - `POST /v1/jobs` validates a job as a worker would, records it `queued` and publishes it
//!   with the broker's confirm; `Idempotency-Key` makes a retried POST answer the first job.
//! - `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`, `GET /v1/jobs/{id}/events` (Server-Sent
//!   Events, resumable with `Last-Event-ID`): a tenant sees only its own jobs.
//! - Bearer API keys name tenants ([`auth`]); per-tenant rate limits and caps on open jobs
//!   ([`quota`]); a body limit; CORS; `/openapi.json`, `/healthz`, `/readyz`, `/metrics`.
//! - SIGTERM drains: `/readyz` fails at once and event streams end (clients resume on another
//!   replica with `Last-Event-ID`; new ones are refused with 503); jobs are still taken for a
//!   few seconds, while the load balancer notices, then the listener closes and the requests
//!   in hand finish, all within `gateway.drain_secs`.

pub mod api;
pub mod auth;
pub mod broker;
pub mod events;
pub mod metrics;
pub mod quota;
pub mod state;

pub use state::Gateway;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Settings;
use crate::worker::shutdown::Shutdown;

/// The gateway's routes, with the body limit, CORS and the request metrics.
pub fn router(gw: Arc<Gateway>) -> Router {
    let s = &gw.settings;
    let openapi = crate::job::schema::Document::Openapi
        .schema(&s.limits, &gw.models)
        .to_string();
    let mut app = Router::new()
        .route("/v1/jobs", post(api::submit))
        .route("/v1/jobs/{id}", get(api::get_job))
        .route("/v1/jobs/{id}/cancel", post(api::cancel_job))
        .route("/v1/jobs/{id}/events", get(api::job_events))
        .route(
            "/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { ([("content-type", "application/json")], doc) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(DefaultBodyLimit::max(s.limits.max_message_bytes))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), observe));
    if let Some(cors) = cors(&s.gateway.cors_origins) {
        app = app.layer(cors);
    }
    app.with_state(gw)
}

fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([
                axum::http::header::AUTHORIZATION,
                axum::http::header::CONTENT_TYPE,
                "idempotency-key".parse().expect("header name"),
                "last-event-id".parse().expect("header name"),
                "traceparent".parse().expect("header name"),
                "tracestate".parse().expect("header name"),
            ])
            .expose_headers([
                axum::http::header::LOCATION,
                axum::http::header::RETRY_AFTER,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        gw.metrics.render(),
    )
        .into_response()
}

/// Counts every request by route, method, status code and tenant, and times it.
async fn observe(State(gw): State<Arc<Gateway>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let response = next.run(req).await;
    let tenant = response
        .extensions()
        .get::<api::TenantLabel>()
        .map(|t| t.0.clone())
        .unwrap_or_else(|| "-".into());
    let code = response.status().as_u16().to_string();
    gw.metrics
        .requests
        .with_label_values(&[&route, &method, &code, &tenant])
        .inc();
    gw.metrics
        .seconds
        .with_label_values(&[&route, &method])
        .observe(start.elapsed().as_secs_f64());
    response
}

/// Serves on `listener` until `shutdown` asks for a drain; then drains within
/// `gateway.drain_secs`.
pub async fn serve(
    settings: Settings,
    listener: tokio::net::TcpListener,
    mut shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (drain_tx, drain_rx) = watch::channel(false);
    let gw = Arc::new(Gateway::new(settings, drain_rx).await?);
    let drain_secs = gw.settings.gateway.drain_secs;
    // Keys rotate without a restart.
    {
        let gw = Arc::downgrade(&gw);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(gw) = gw.upgrade() else { return };
                match gw.keys.reload_if_changed() {
                    Ok(true) => info!("API keys read again"),
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "API key files not read again"),
                }
            }
        });
    }
    match gw.ready().await {
        Ok(()) => info!("broker and Redis reachable"),
        Err(why) => warn!(why, "not ready yet (see /readyz)"),
    }
    let addr = listener.local_addr()?;
    info!(%addr, tenancy = %gw.tenancy.mode(), "gateway listening");
    let app = router(gw.clone());
    let mut drain = shutdown.clone();
    let graceful = async move {
        drain.requested().await;
        info!(
            drain_secs,
            "draining: not ready, event streams ended, finishing requests"
        );
        let _ = drain_tx.send(true);
        // Still listening while the load balancer sees /readyz fail.
        tokio::time::sleep(Duration::from_secs(drain_secs.min(5))).await;
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    let mut stop = shutdown.clone();
    let bounded = async move {
        stop.requested().await;
        tokio::time::sleep(Duration::from_secs(drain_secs)).await;
        warn!("drain_secs passed: stopping with requests in hand");
    };
    tokio::select! {
        r = server => r.map_err(|e| anyhow::anyhow!("gateway server: {e}"))?,
        () = bounded => {}
        () = shutdown.immediate() => warn!("second signal: stopping now"),
    }
    gw.publisher.close().await;
    info!("gateway stopped");
    Ok(())
}
