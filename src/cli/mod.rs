//! The `r2f` command line: its arguments (clap) and one function per command. `main.rs` only
//! parses the arguments, loads the settings, starts logging and calls the command.

mod args;
mod enqueue;
mod exit;
mod local;
mod remote;
mod values;

pub use args::{BenchArgs, Cli, Command, GenerateArgs, ParityArgs, PromptScheduleArgs, RegionArgs};
pub use exit::{error_line, Exit};
pub use local::{bench, generate, parity, schedule};
pub use remote::{bench_service, cancel, enqueue, plan, status, wait, worker};

/// Starts logging to standard error, as text or JSON lines, filtered by `RUST_LOG` (default
/// `info`).
pub fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
