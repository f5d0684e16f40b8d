//! The `r2f` command line: its arguments (clap) and one function per command. `main.rs` only
//! parses the arguments, loads the settings, starts logging and calls the command.

mod args;
mod enqueue;
mod exit;
mod local;
mod ops;
mod rarebench;
mod remote;
mod values;

pub use args::{
    BenchArgs, BenchGatewayArgs, Cli, Command, ConfigCommand, GenerateArgs, ParityArgs,
    PromptScheduleArgs, RarebenchArgs, RegionArgs, ReplayArgs,
};
pub use exit::{error_line, Exit};
pub use local::{bench, generate, inspect, parity, schedule};
pub use ops::{config_check, replay};
pub use rarebench::rarebench;
pub use remote::{
    bench_gateway, bench_service, cancel, enqueue, gateway, key, plan, status, wait, worker,
};

/// Starts logging to standard error, as text or JSON lines, filtered by `RUST_LOG` (default
/// `info`); and, for a service (`export_as` names it) with `telemetry.otlp_endpoint` set, the
/// export of its spans, which the returned guard flushes when dropped.
pub fn init_tracing(
    json: bool,
    telemetry: Option<&crate::config::TelemetrySettings>,
    export_as: Option<&'static str>,
) -> anyhow::Result<Option<crate::service::telemetry::Exporter>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let (otel, exporter) = match (telemetry, export_as) {
        (Some(t), Some(service)) => match crate::service::telemetry::layer(t, service)? {
            Some((layer, exporter)) => (Some(layer), Some(exporter)),
            None => (None, None),
        },
        _ => (None, None),
    };
    // Only r2f's own spans are exported (not those of the HTTP, AMQP and Redis clients, nor
    // the exporter's own requests).
    let ours = tracing_subscriber::filter::Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel.map(|l| l.with_filter(ours)))
        .init();
    Ok(exporter)
}
