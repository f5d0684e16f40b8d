//! Traces (OpenTelemetry). A job carries the W3C trace context of whoever submitted it
//! (`traceparent`/`tracestate`, from the HTTP request at the gateway or the AMQP headers of the
//! message); r2f continues that trace and passes it on in everything it publishes about the job
//! (events, retries, webhook deliveries), so one trace runs from the client's request to the
//! stored image.
//!
//! Spans are exported over OTLP/HTTP only when `telemetry.otlp_endpoint` is set. Without it
//! nothing is exported and nothing is built for export: the trace context a job came with is
//! passed through unchanged, and its trace id still lands in logs, events and `result.json`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{OtlpProtocol, TelemetrySettings};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Whether spans are exported (set once, at start).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// A W3C trace context, validated: `traceparent` is
/// `<version>-<32 hex trace id>-<16 hex parent id>-<2 hex flags>` with non-zero ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceHeaders {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

impl TraceHeaders {
    /// The context, if `traceparent` is a valid one (a `tracestate` of more than 512 bytes, or
    /// with characters a header cannot carry, is dropped).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let tp = traceparent.trim();
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() < 4 {
            return None;
        }
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let (version, trace, parent, flags) = (parts[0], parts[1], parts[2], parts[3]);
        let valid = hex(version, 2)
            && version != "ff"
            && (version != "00" || parts.len() == 4)
            && hex(trace, 32)
            && trace.bytes().any(|b| b != b'0')
            && hex(parent, 16)
            && parent.bytes().any(|b| b != b'0')
            && hex(flags, 2);
        if !valid {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty() && s.len() <= 512 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
            })
            .map(str::to_string);
        Some(Self {
            traceparent: tp.to_string(),
            tracestate,
        })
    }

    /// The trace id (32 lowercase hex digits).
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The context of an AMQP message's headers.
    pub fn from_amqp(props: &lapin::BasicProperties) -> Option<Self> {
        let headers = props.headers().as_ref()?;
        let text = |name: &str| match headers.inner().get(name)? {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        };
        Self::parse(&text(TRACEPARENT)?, text(TRACESTATE).as_deref())
    }

    /// The context of an HTTP request's headers.
    pub fn from_http(headers: &axum::http::HeaderMap) -> Option<Self> {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        Self::parse(text(TRACEPARENT)?, text(TRACESTATE))
    }

    /// Writes the context into AMQP headers (replacing any there).
    pub fn to_amqp(&self, headers: &mut lapin::types::FieldTable) {
        use lapin::types::{AMQPValue, LongString};
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(self.traceparent.as_str())),
        );
        match &self.tracestate {
            Some(s) => {
                headers.insert(
                    TRACESTATE.into(),
                    AMQPValue::LongString(LongString::from(s.as_str())),
                );
            }
            None => {
                let mut kept = lapin::types::FieldTable::default();
                for (k, v) in headers.inner() {
                    if k.as_str() != TRACESTATE {
                        kept.insert(k.clone(), v.clone());
                    }
                }
                *headers = kept;
            }
        }
    }

    fn carrier(&self) -> HashMap<String, String> {
        let mut c = HashMap::new();
        c.insert(TRACEPARENT.to_string(), self.traceparent.clone());
        if let Some(s) = &self.tracestate {
            c.insert(TRACESTATE.to_string(), s.clone());
        }
        c
    }
}

/// Makes `span` continue the trace of `incoming` (when spans are exported) and returns the
/// trace id the work goes by: the incoming one, or, when exporting, the one of the new trace
/// `span` starts; none when neither. It is recorded as the span's `trace_id` field (JSON logs
/// carry it on every line of the span) when the span has one.
pub fn adopt(span: &tracing::Span, incoming: Option<&TraceHeaders>) -> Option<String> {
    if exporting() {
        if let Some(t) = incoming {
            let parent = TraceContextPropagator::new().extract(&t.carrier());
            let _ = span.set_parent(parent);
        }
    }
    let id = trace_id_of(span, incoming);
    if let Some(id) = &id {
        span.record("trace_id", id.as_str());
    }
    id
}

/// The trace id of work done under `span` (see [`adopt`]).
pub fn trace_id_of(span: &tracing::Span, incoming: Option<&TraceHeaders>) -> Option<String> {
    if !exporting() {
        return incoming.map(|t| t.trace_id().to_string());
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.trace_id() == opentelemetry::trace::TraceId::INVALID {
        return incoming.map(|t| t.trace_id().to_string());
    }
    Some(sc.trace_id().to_string())
}

/// The context to pass on for work done under `span`: the span's own when exporting (its
/// children continue from it), else `incoming` unchanged.
pub fn outgoing(span: &tracing::Span, incoming: Option<&TraceHeaders>) -> Option<TraceHeaders> {
    if !exporting() {
        return incoming.cloned();
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier
        .get(TRACEPARENT)
        .and_then(|tp| TraceHeaders::parse(tp, carrier.get(TRACESTATE).map(String::as_str)))
        .or_else(|| incoming.cloned())
}

/// The exporter's provider: flushes and stops it when dropped (at the end of the command).
pub struct Exporter(opentelemetry_sdk::trace::SdkTracerProvider);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// The OpenTelemetry layer of the logging subscriber, when `settings` name an endpoint: spans
/// of `service` go there (batched; `OTEL_BSP_*` variables tune the batches).
pub fn layer<S>(
    settings: &TelemetrySettings,
    service: &'static str,
) -> anyhow::Result<Option<(impl tracing_subscriber::Layer<S>, Exporter)>>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

    let endpoint = settings.otlp_endpoint.trim();
    if endpoint.is_empty() {
        return Ok(None);
    }
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let protocol = match settings.otlp_protocol {
        OtlpProtocol::Protobuf => Protocol::HttpBinary,
        OtlpProtocol::Json => Protocol::HttpJson,
    };
    // The process's TLS configuration (the system roots plus tls.ca_file, the client
    // certificate), in the blocking client the exporter runs on its own thread (built on a
    // thread of its own: it may not be built inside an async runtime).
    let tls = (*crate::service::tls::get().client_config()).clone();
    let http = std::thread::spawn(move || {
        reqwest_otlp::blocking::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(std::time::Duration::from_secs(10))
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("telemetry: building the HTTP client panicked"))?
    .map_err(|e| anyhow::anyhow!("telemetry: the HTTP client: {e}"))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http)
        .with_endpoint(url)
        .with_protocol(protocol)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint: {e}"))?;
    let ratio = settings.sample_ratio.clamp(0.0, 1.0);
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer(env!("CARGO_CRATE_NAME"));
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Exporter(provider),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_trace_contexts_are_read() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceHeaders::parse(ok, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(TraceHeaders::parse(bad, None).is_none(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(TraceHeaders::parse(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            None
        )
        .is_some());
        let long = "a".repeat(600);
        assert_eq!(
            TraceHeaders::parse(ok, Some(&long)).unwrap().tracestate,
            None
        );
    }

    #[test]
    fn without_export_the_incoming_context_passes_through() {
        let t = TraceHeaders::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .unwrap();
        let span = tracing::Span::none();
        assert_eq!(
            adopt(&span, Some(&t)).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(outgoing(&span, Some(&t)), Some(t.clone()));
        assert_eq!(adopt(&span, None), None);
        let mut headers = lapin::types::FieldTable::default();
        t.to_amqp(&mut headers);
        let props = lapin::BasicProperties::default().with_headers(headers);
        assert_eq!(TraceHeaders::from_amqp(&props), Some(t));
    }
}
