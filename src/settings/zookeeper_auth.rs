//! The credentials a pod's ZooKeeper sessions authenticate with, for ZooKeeper's `digest`
//! scheme. Like the token, the type keeps the password out of log lines and printed settings:
//! `Debug` and `Serialize` show the user and a placeholder, never the password.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::REDACTED;

/// Minimum number of characters of the password. ZooKeeper stores an unsalted digest of
/// `user:password` (SHA-1 by default) in every ACL, which its data files, their backups and
/// sessions with ADMIN rights reveal, so the password must withstand an offline guess.
pub const MIN_ZOOKEEPER_PASSWORD_CHARS: usize = 16;

/// Maximum number of characters of the whole `user:password` value.
pub const MAX_ZOOKEEPER_AUTH_CHARS: usize = 1024;

/// A user and password for ZooKeeper's `digest` authentication scheme, written
/// `user:password`. The user is the identity that the ACLs of the cluster's znodes name.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ZookeeperAuth {
    user: String,
    password: String,
}

impl ZookeeperAuth {
    /// Parses and checks `user:password` by the rules of [`check_zookeeper_auth`]. The error
    /// never quotes the text.
    pub fn parse(text: &str) -> Result<ZookeeperAuth, String> {
        let problem = |problem: &str| {
            format!(
                "`<user>:<password>` for ZooKeeper's digest scheme, at most \
                 {MAX_ZOOKEEPER_AUTH_CHARS} visible ASCII characters without spaces, with a \
                 user that is not empty and a password of at least \
                 {MIN_ZOOKEEPER_PASSWORD_CHARS} characters ({problem}); generate a password \
                 with `openssl rand -hex 16`"
            )
        };

        let Some((user, password)) = text.split_once(':') else {
            return Err(problem("this value has no `:` between user and password"));
        };
        if !text.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(problem(
                "this value has spaces, control or non-ASCII characters",
            ));
        }
        if text.len() > MAX_ZOOKEEPER_AUTH_CHARS {
            return Err(problem(&format!(
                "this value has {} characters",
                text.len()
            )));
        }
        if user.is_empty() {
            return Err(problem("the user before the `:` is empty"));
        }
        if password.len() < MIN_ZOOKEEPER_PASSWORD_CHARS {
            return Err(problem(&format!(
                "the password has {} characters",
                password.len()
            )));
        }

        Ok(ZookeeperAuth {
            user: user.to_string(),
            password: password.to_string(),
        })
    }

    /// Returns the user, which is not secret: the znodes' ACLs name it.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Returns `user:password` as ZooKeeper's `digest` scheme expects it, for the code that
    /// authenticates a session and nothing else.
    pub fn expose(&self) -> Vec<u8> {
        format!("{}:{}", self.user, self.password).into_bytes()
    }
}

/// Checks the text of the `zookeeper_auth` setting, `user:password` split at the first `:` (the
/// password may contain more). It must be visible ASCII, at most [`MAX_ZOOKEEPER_AUTH_CHARS`]
/// characters in all, with a user that is not empty and a password of at least
/// [`MIN_ZOOKEEPER_PASSWORD_CHARS`] characters. The reason never quotes the text.
pub fn check_zookeeper_auth(text: &str) -> Result<(), String> {
    ZookeeperAuth::parse(text).map(|_| ())
}

impl TryFrom<String> for ZookeeperAuth {
    type Error = String;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        ZookeeperAuth::parse(&text)
    }
}

impl fmt::Debug for ZookeeperAuth {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ZookeeperAuth")
            .field("user", &self.user)
            .field("password", &format_args!("{REDACTED}"))
            .finish()
    }
}

impl Serialize for ZookeeperAuth {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}:{REDACTED}", self.user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "3f9a0c1d2e4b5a6978";

    #[test]
    fn parse_splits_at_first_colon() {
        let auth = ZookeeperAuth::parse(&format!("shop:{PASSWORD}:x")).unwrap();
        assert_eq!(auth.user(), "shop");
        assert_eq!(auth.expose(), format!("shop:{PASSWORD}:x").into_bytes());
    }

    #[test]
    fn parse_rejects_without_quoting() {
        let empty_user = format!(":{PASSWORD}");
        let with_space = format!("shop:{PASSWORD} x");
        let non_ascii = format!("sh\u{f6}p:{PASSWORD}");
        let long = format!("shop:{}", "p".repeat(MAX_ZOOKEEPER_AUTH_CHARS));
        let cases = [
            ("shop-without-colon-0123456789", "no `:`"),
            (empty_user.as_str(), "user before the `:` is empty"),
            ("shop:", "password has 0 characters"),
            ("shop:short-pass", "password has 10 characters"),
            (with_space.as_str(), "spaces, control or non-ASCII"),
            (non_ascii.as_str(), "spaces, control or non-ASCII"),
            (long.as_str(), "this value has 1029 characters"),
        ];
        for (text, problem) in cases {
            let message = ZookeeperAuth::parse(text).unwrap_err();
            assert!(message.contains(problem), "{text}: {message}");
            assert!(message.contains("openssl rand"), "{message}");
            assert!(!message.contains(text), "{message}");
            assert!(!message.contains(PASSWORD), "{message}");
        }
    }

    #[test]
    fn debug_and_serialize_hide_password() {
        let auth = ZookeeperAuth::parse(&format!("shop:{PASSWORD}")).unwrap();

        let debug = format!("{auth:?}");
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(debug.contains("shop"), "{debug}");

        let printed = serde_json::to_string(&auth).unwrap();
        assert_eq!(printed, r#""shop:<redacted>""#);
    }

    #[test]
    fn deserialize_checks_value() {
        let auth: ZookeeperAuth = serde_json::from_str(&format!("\"shop:{PASSWORD}\"")).unwrap();
        assert_eq!(auth.user(), "shop");
        let error = serde_json::from_str::<ZookeeperAuth>("\"shop:short\"").unwrap_err();
        assert!(!error.to_string().contains("shop:short"), "{error}");
    }
}
