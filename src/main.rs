//! `r2f`: the command-line entry point. Parses the arguments, loads the settings, starts
//! logging and runs one command (each command lives in `r2f::cli`).

use std::process::ExitCode;

use clap::Parser;

use r2f::cli::{self, Cli, Command};
use r2f::config::{LogFormat, Settings};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not failures; a wrong command line is EX_USAGE.
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(cli::Exit::USAGE),
            };
        }
    };
    // The trust (the system roots and tls.ca_file) and the client certificate of every TLS
    // client, the telemetry exporter's included: built once, before any client.
    let settings = Settings::load(cli.config.as_deref())
        .and_then(|s| {
            r2f::service::tls::install(&s.tls)?;
            Ok(s)
        })
        .map_err(|e| anyhow::Error::new(cli::Exit::config(cli::error_line(&e))));
    let json_logs = cli.log_json || matches!(&settings, Ok(s) if s.log.format == LogFormat::Json);
    // The services export their spans when telemetry is configured.
    let export_as = match &cli.command {
        Command::Worker => Some("r2f-worker"),
        Command::Gateway => Some("r2f-gateway"),
        _ => None,
    };
    let exporter = cli::init_tracing(
        json_logs,
        settings.as_ref().ok().map(|s| &s.telemetry),
        export_as,
    );
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {}", cli::error_line(&e));
            return ExitCode::from(cli::Exit::code_of(&e));
        }
    };
    let result = settings.and_then(|settings| match cli.command {
        Command::Generate(a) => cli::generate(&settings, *a),
        Command::Bench(a) => cli::bench(a),
        Command::Schedule(a) => cli::schedule(a),
        Command::Parity(a) => cli::parity(a),
        Command::Status { id, tenant } => cli::status(&settings, &id, tenant.as_deref()),
        Command::Cancel { id, tenant, force } => {
            cli::cancel(&settings, &id, tenant.as_deref(), force)
        }
        Command::Wait {
            id,
            timeout,
            tenant,
        } => cli::wait(
            &settings,
            &id,
            tenant.as_deref(),
            std::time::Duration::from_secs_f64(timeout.clamp(0.0, 1e7)),
        ),
        Command::Schema { document } => {
            print!(
                "{}",
                document.schema_json(&settings.limits, &settings.routed_models())
            );
            Ok(())
        }
        Command::Worker => cli::worker(settings),
        Command::Plan { prompt, mode } => cli::plan(&settings, &prompt, mode),
        Command::BenchService { jobs, steps, size } => {
            cli::bench_service(&settings, jobs, steps, size)
        }
        Command::Enqueue {
            file,
            check,
            no_validate,
        } => cli::enqueue(&settings, &file, check, !no_validate),
        Command::Gateway => cli::gateway(settings),
        Command::Key { hash } => cli::key(hash),
        Command::Inspect { image } => cli::inspect(&image),
        Command::Config {
            action: cli::ConfigCommand::Check { no_probe },
        } => cli::config_check(&settings, cli.config.as_deref(), no_probe),
        Command::Replay(a) => cli::replay(&settings, a),
        Command::BenchGateway(a) => cli::bench_gateway(&settings, a),
        Command::Rarebench(a) => cli::rarebench(&settings, *a),
    });
    // Spans still batched go out before the process ends.
    drop(exporter);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::error_line(&e));
            ExitCode::from(cli::Exit::code_of(&e))
        }
    }
}
