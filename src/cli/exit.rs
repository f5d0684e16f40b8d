//! How a command ends: its exit status and its one-line error.

/// A failure with its own exit status (docs/contract.md, "Exit status"); any other error of a
/// command exits 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    /// Any other failure.
    pub const FAILURE: u8 = 1;
    /// The command line is wrong (an unknown option, an unreadable file, a bad id): sysexits
    /// `EX_USAGE`.
    pub const USAGE: u8 = 64;
    /// The input is wrong: something a worker would reject (sysexits `EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// A dependency (the broker) is unreachable or failed (sysexits `EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// Not now, maybe later: a wait that timed out, a broker that refuses publishes for a
    /// while (sysexits `EX_TEMPFAIL`).
    pub const TEMPFAIL: u8 = 75;
    /// The configuration is invalid (sysexits `EX_CONFIG`).
    pub const CONFIG: u8 = 78;

    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: Self::USAGE,
            message: message.into(),
        }
    }

    pub fn data(message: impl Into<String>) -> Self {
        Self {
            code: Self::DATA,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            code: Self::UNAVAILABLE,
            message: message.into(),
        }
    }

    pub fn tempfail(message: impl Into<String>) -> Self {
        Self {
            code: Self::TEMPFAIL,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self {
            code: Self::CONFIG,
            message: message.into(),
        }
    }

    /// The exit status of a command's error: the [`Exit`] in its chain, else 1.
    pub fn code_of(e: &anyhow::Error) -> u8 {
        e.chain()
            .find_map(|c| c.downcast_ref::<Exit>())
            .map_or(Self::FAILURE, |x| x.code)
    }
}

/// An error and its causes on one line.
pub fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Ends the process at once with `code`, without running exit handlers or static destructors:
/// the GPU thread may still be inside a denoising step, and tearing libtorch down under it
/// crashes the process (a signal instead of the documented status).
pub fn hard_exit(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process; nothing runs after it.
    unsafe { libc::_exit(code) }
}
