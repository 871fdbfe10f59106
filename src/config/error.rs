//! Why a configuration file could not be used: [`ConfigError`], whose `Display` is the whole
//! operator-facing message (the file, and where it applies the line, column and key).

use std::path::PathBuf;

/// Why a configuration file could not be used. `Display` is the whole operator-facing message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is empty: it needs an `allowlist:` list of {{address, port}} entries")]
    Empty { path: PathBuf },
    #[error("configuration file {path}{}: {message}", location_suffix(*.line, *.column))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
}

fn location_suffix(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(", line {l}, column {c}"),
        (Some(l), None) => format!(", line {l}"),
        _ => String::new(),
    }
}

impl ConfigError {
    /// The line the error points at, when the YAML parser knows it.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            _ => None,
        }
    }
}
