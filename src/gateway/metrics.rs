//! The gateway's Prometheus metrics: requests by route, method, status class and tenant, their
//! latency by route, jobs accepted, event streams open.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Request latencies: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

pub struct GatewayMetrics {
    registry: Registry,
    /// `r2f_gateway_requests_total{route, method, code, tenant}`.
    pub requests: IntCounterVec,
    /// `r2f_gateway_request_seconds{route, method}`.
    pub seconds: HistogramVec,
    /// `r2f_gateway_jobs_accepted_total{tenant}`.
    pub accepted: IntCounterVec,
    /// `r2f_gateway_event_streams`.
    pub streams: IntGauge,
}

impl GatewayMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "r2f_gateway_requests_total",
                "HTTP requests by route, method, status code and tenant (`-` before the key is known).",
            ),
            &["route", "method", "code", "tenant"],
        )
        .expect("metric");
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "r2f_gateway_request_seconds",
                "HTTP request latency by route and method (event streams: until the headers).",
            )
            .buckets(BUCKETS.to_vec()),
            &["route", "method"],
        )
        .expect("metric");
        let accepted = IntCounterVec::new(
            Opts::new(
                "r2f_gateway_jobs_accepted_total",
                "Jobs accepted and published, by tenant.",
            ),
            &["tenant"],
        )
        .expect("metric");
        let streams =
            IntGauge::new("r2f_gateway_event_streams", "Event streams open.").expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(seconds.clone()),
            Box::new(accepted.clone()),
            Box::new(streams.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        let _ = registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        Self {
            registry,
            requests,
            seconds,
            accepted,
            streams,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}
