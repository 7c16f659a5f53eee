//! The shared token that guards the control API. Its type keeps the secret out of log lines and
//! printed settings: `Debug` and `Serialize` show a placeholder, never the value.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// Placeholder printed in place of a token.
pub const REDACTED: &str = "<redacted>";

/// Minimum number of characters of a token. A shorter secret could be guessed over the network,
/// because the control server replies to every attempt.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Maximum number of characters of a token, which travels in an HTTP header.
pub const MAX_TOKEN_CHARS: usize = 1024;

/// A secret shared by the pods of a cluster and their operators. When a pod has one,
/// `/control/*` and `/reset` require it (see the control server).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    /// Wraps `text` without checking it; settings check a token with [`check_token`].
    pub fn new(text: impl Into<String>) -> Self {
        Token(text.into())
    }

    /// Returns the secret itself, for the code that sends or verifies it and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Token({REDACTED})")
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

/// Checks the text of a token: visible ASCII characters only (it goes into an HTTP header),
/// from [`MIN_TOKEN_CHARS`] to [`MAX_TOKEN_CHARS`] of them. The reason never quotes the text.
pub fn check_token(text: &str) -> Result<(), String> {
    let visible = text.bytes().all(|byte| byte.is_ascii_graphic());
    let length_ok = (MIN_TOKEN_CHARS..=MAX_TOKEN_CHARS).contains(&text.len());
    if visible && length_ok {
        Ok(())
    } else {
        Err(format!(
            "a secret of {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} visible ASCII characters without \
             spaces (this one has {} characters{}); generate one with `openssl rand -hex 32`",
            text.chars().count(),
            if visible {
                ""
            } else {
                ", some of them spaces, control or non-ASCII characters"
            }
        ))
    }
}
