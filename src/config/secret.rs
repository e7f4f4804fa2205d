//! Secrets: `Secret`, a string Debug and Display never print, and `SecretSource`, where a
//! password comes from (inline, a file or an environment variable; `load` resolves it).

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// A secret string: never printed by Debug or Display.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The only way to read the secret; grep for it when auditing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**REDACTED**")
    }
}

/// Where a secret comes from: inline, a file (whole content, trailing newline trimmed) or an
/// environment variable. At most one may be given; `load` resolves it into `resolved`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretSource {
    #[serde(default)]
    pub password: Option<Secret>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// Filled by `load` from whichever source was given.
    #[serde(skip)]
    pub resolved: Option<Secret>,
}

impl SecretSource {
    /// Whether any of `password`, `password_file`, `password_env` was given.
    pub fn is_given(&self) -> bool {
        self.password.is_some() || self.password_file.is_some() || self.password_env.is_some()
    }
    /// The secret after `load` resolved it (None when no source was given).
    pub fn secret(&self) -> Option<&Secret> {
        self.resolved.as_ref()
    }
}
