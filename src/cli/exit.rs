//! How a command ends: its exit status and its one-line error.

/// A failure with its own exit status (docs/contract.md, "Exit status"); any other error of a
/// command exits 2.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl Exit {
    /// The command line is wrong (an unreadable file, a bad option).
    pub const USAGE: u8 = 2;
    /// The input is wrong: something a worker would reject (sysexits `EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// A dependency (the broker) is unreachable or failed (sysexits `EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;

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

    /// The exit status of a command's error.
    pub fn code_of(e: &anyhow::Error) -> u8 {
        e.downcast_ref::<Exit>().map_or(Self::USAGE, |x| x.code)
    }
}

/// An error and its causes on one line.
pub fn error_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
