//! Conversion of one raw setting value (a TOML value, or the text of an environment variable or
//! flag) into its typed form, and the syntax rules of each kind of value.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{Origin, SettingsError, BINDINGS, HOOKS, REDACTED};

/// Largest duration any setting accepts, in seconds (one day). Longer values are almost
/// certainly a unit mistake, such as milliseconds given where seconds are expected.
pub const MAX_SECONDS: f64 = 86_400.0;

/// A value before conversion.
#[derive(Clone, Copy, Debug)]
pub enum Raw<'a> {
    Toml(&'a toml::Value),
    /// Text of an environment variable or of a flag.
    Text(&'a str),
}

/// One value to convert, with what an error message needs.
pub struct Input<'a> {
    pub key: &'a str,
    pub raw: Raw<'a>,
    pub origin: &'a Origin,
}

impl Input<'_> {
    /// Builds the error for this value.
    pub fn invalid(&self, expected: impl Into<String>) -> SettingsError {
        SettingsError::Invalid {
            key: self.key.to_string(),
            value: shown(self.raw),
            expected: expected.into(),
            origin: self.origin.clone(),
        }
    }

    fn string(&self, expected: &str) -> Result<&str, SettingsError> {
        match self.raw {
            Raw::Toml(toml::Value::String(text)) => Ok(text),
            Raw::Text(text) => Ok(text),
            Raw::Toml(_) => Err(self.invalid(expected)),
        }
    }

    /// Converts a string that `rule` accepts; `rule` returns what is allowed when it rejects.
    pub fn text(&self, rule: impl Fn(&str) -> Result<(), String>) -> Result<String, SettingsError> {
        let text = self.string("a string")?;
        rule(text).map_err(|expected| self.invalid(expected))?;
        Ok(text.to_string())
    }

    /// Converts an optional string: an empty string means unset.
    pub fn optional_text(
        &self,
        rule: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Option<String>, SettingsError> {
        let text = self.string("a string")?;
        if text.is_empty() {
            return Ok(None);
        }
        rule(text).map_err(|expected| self.invalid(expected))?;
        Ok(Some(text.to_string()))
    }

    /// Converts an optional secret like [`Input::optional_text`], but an error shows a
    /// placeholder instead of the value, so a rejected secret is not printed.
    pub fn secret(
        &self,
        rule: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Option<String>, SettingsError> {
        let hidden = |expected: String| SettingsError::Invalid {
            key: self.key.to_string(),
            value: REDACTED.to_string(),
            expected,
            origin: self.origin.clone(),
        };
        let text = match self.raw {
            Raw::Toml(toml::Value::String(text)) => text.as_str(),
            Raw::Text(text) => text,
            Raw::Toml(_) => return Err(hidden("a string".to_string())),
        };
        if text.is_empty() {
            return Ok(None);
        }
        rule(text).map_err(hidden)?;
        Ok(Some(text.to_string()))
    }

    /// Converts an optional path: an empty string means unset.
    pub fn optional_path(&self) -> Result<Option<PathBuf>, SettingsError> {
        Ok(self.optional_text(|_| Ok(()))?.map(PathBuf::from))
    }

    /// Converts a boolean; text accepts `true`/`false`, `1`/`0` and `yes`/`no` in any case.
    pub fn boolean(&self) -> Result<bool, SettingsError> {
        const EXPECTED: &str = "a boolean (true/false, 1/0 or yes/no)";
        match self.raw {
            Raw::Toml(toml::Value::Boolean(value)) => Ok(*value),
            Raw::Text(text) => parse_boolean(text).ok_or_else(|| self.invalid(EXPECTED)),
            Raw::Toml(_) => Err(self.invalid(EXPECTED)),
        }
    }

    fn integer(&self, expected: &str) -> Result<i64, SettingsError> {
        match self.raw {
            Raw::Toml(toml::Value::Integer(value)) => Ok(*value),
            Raw::Text(text) => text.trim().parse().map_err(|_| self.invalid(expected)),
            Raw::Toml(_) => Err(self.invalid(expected)),
        }
    }

    /// Converts a TCP port number, 1 to 65535.
    pub fn port(&self) -> Result<u16, SettingsError> {
        const EXPECTED: &str = "a TCP port number from 1 to 65535";
        let value = self.integer(EXPECTED)?;
        u16::try_from(value)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| self.invalid(EXPECTED))
    }

    /// Converts a count of at least 1.
    pub fn count(&self) -> Result<u32, SettingsError> {
        const EXPECTED: &str = "a whole number from 1 to 4294967295";
        let value = self.integer(EXPECTED)?;
        u32::try_from(value)
            .ok()
            .filter(|count| *count > 0)
            .ok_or_else(|| self.invalid(EXPECTED))
    }

    /// Converts a number of seconds: finite, at most `MAX_SECONDS`, and above zero when
    /// `positive` (zero allowed otherwise).
    pub fn seconds(&self, positive: bool) -> Result<f64, SettingsError> {
        let expected = if positive {
            format!("a number of seconds above 0 and at most {MAX_SECONDS}")
        } else {
            format!("a number of seconds from 0 to {MAX_SECONDS}")
        };
        let value = match self.raw {
            Raw::Toml(toml::Value::Integer(value)) => *value as f64,
            Raw::Toml(toml::Value::Float(value)) => *value,
            Raw::Text(text) => text
                .trim()
                .parse()
                .map_err(|_| self.invalid(expected.as_str()))?,
            Raw::Toml(_) => return Err(self.invalid(expected)),
        };

        let in_range = value.is_finite()
            && value <= MAX_SECONDS
            && (value > 0.0 || (!positive && value == 0.0));
        if in_range {
            Ok(value)
        } else {
            Err(self.invalid(expected))
        }
    }

    /// Converts a list: a TOML array of strings, or a comma-separated string. Blank items are
    /// dropped; every item must pass `rule`.
    pub fn list(
        &self,
        rule: impl Fn(&str) -> Result<(), String>,
    ) -> Result<Vec<String>, SettingsError> {
        const EXPECTED: &str = "a list of strings (a TOML array, or comma-separated text)";
        let items: Vec<String> = match self.raw {
            Raw::Toml(toml::Value::Array(values)) => {
                let mut items = Vec::with_capacity(values.len());
                for value in values {
                    match value {
                        toml::Value::String(text) => items.push(text.trim().to_string()),
                        _ => return Err(self.invalid(EXPECTED)),
                    }
                }
                items
            }
            Raw::Toml(toml::Value::String(text)) => split_list(text),
            Raw::Text(text) => split_list(text),
            Raw::Toml(_) => return Err(self.invalid(EXPECTED)),
        };

        let items: Vec<String> = items.into_iter().filter(|item| !item.is_empty()).collect();
        for item in &items {
            rule(item).map_err(|expected| {
                self.invalid(format!("every item to be {expected} (`{item}` is not)"))
            })?;
        }
        Ok(items)
    }

    /// Converts a table of entries: a TOML table, or one `KEY=VALUE` text (a flag). Each entry
    /// goes through `entry`, which gets the entry's own `Input` named `<key>.<entry key>`.
    pub fn entries(
        &self,
        mut entry: impl FnMut(&str, &Input<'_>) -> Result<(), SettingsError>,
    ) -> Result<(), SettingsError> {
        match self.raw {
            Raw::Toml(toml::Value::Table(table)) => {
                for (name, value) in table {
                    let key = format!("{}.{}", self.key, name);
                    let input = Input {
                        key: &key,
                        raw: Raw::Toml(value),
                        origin: self.origin,
                    };
                    entry(name, &input)?;
                }
                Ok(())
            }
            Raw::Text(text) => {
                let Some((name, value)) = text.split_once('=') else {
                    return Err(self.invalid("KEY=VALUE"));
                };
                let key = format!("{}.{}", self.key, name);
                let input = Input {
                    key: &key,
                    raw: Raw::Text(value),
                    origin: self.origin,
                };
                entry(name, &input)
            }
            Raw::Toml(_) => Err(self.invalid(format!(
                "a table (for example `[{}]` with `name = \"value\"` lines)",
                self.key
            ))),
        }
    }
}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|item| item.trim().to_string())
        .collect()
}

/// Formats a raw value for a message: TOML values in TOML syntax, text quoted.
fn shown(raw: Raw<'_>) -> String {
    match raw {
        Raw::Toml(value) => value.to_string(),
        Raw::Text(text) => format!("{text:?}"),
    }
}

/// Parses the text form of a boolean.
pub fn parse_boolean(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// Tells whether `text` is a name token: letters, digits, `-` and `_`, at least one.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub fn cluster_name(text: &str) -> Result<(), String> {
    if is_token(text) {
        Ok(())
    } else {
        Err("a cluster name made of letters, digits, `-` and `_`".to_string())
    }
}

pub fn namespace(text: &str) -> Result<(), String> {
    if text.split('.').all(is_token) {
        Ok(())
    } else {
        Err(
            "dot-separated names made of letters, digits, `-` and `_` (for example `shop.staging`)"
                .to_string(),
        )
    }
}

pub fn binding(text: &str) -> Result<(), String> {
    if BINDINGS.contains(&text) {
        Ok(())
    } else {
        Err(format!("one of {}", BINDINGS.join(", ")))
    }
}

/// Checks a dependency: `name`, `/namespace.name`, each part possibly a glob pattern.
pub fn dependency(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "a cluster name, or `/<namespace>.<cluster>`, letters, digits, `-`, `_` and glob characters";
    let (absolute, name) = match text.strip_prefix('/') {
        Some(rest) => (true, rest),
        None => (false, text),
    };

    let glob_token = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_*?[]!".contains(c))
    };
    let parts: Vec<&str> = name.split('.').collect();
    let shape_ok = if absolute {
        parts.len() >= 2
    } else {
        parts.len() == 1
    };
    if !shape_ok || !parts.iter().all(|part| glob_token(part)) || glob::Pattern::new(name).is_err()
    {
        return Err(EXPECTED.to_string());
    }
    Ok(())
}

/// Checks a ZooKeeper connection string: `host[:port][,host[:port]...][/chroot]`. An empty
/// string is allowed and means that the binding decides.
pub fn zookeeper(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "a ZooKeeper connection string `host:port[,host:port...][/chroot]`";
    if text.is_empty() {
        return Ok(());
    }

    let (hosts, chroot) = match text.find('/') {
        Some(index) => (&text[..index], Some(&text[index..])),
        None => (text, None),
    };
    for address in hosts.split(',') {
        if !zookeeper_address(address) {
            return Err(format!(
                "{EXPECTED}; `{address}` is not a host with an optional port from 1 to 65535"
            ));
        }
    }

    if let Some(chroot) = chroot {
        let segments_ok = chroot == "/"
            || chroot[1..]
                .split('/')
                .all(|segment| !segment.is_empty() && segment != "." && segment != "..");
        if !segments_ok {
            return Err(format!("{EXPECTED}; chroot `{chroot}` must be an absolute path without empty, `.` or `..` parts"));
        }
    }
    Ok(())
}

/// Checks one `host[:port]` of a connection string; IPv6 hosts are written in brackets.
fn zookeeper_address(address: &str) -> bool {
    let address = address.trim();
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return false;
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return false,
        }
    } else {
        let (host, port) = match address.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        };
        let host_ok = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
        if !host_ok {
            return false;
        }
        (host, port)
    };

    let port_ok = match port {
        Some(port) => port.parse::<u16>().is_ok_and(|port| port > 0),
        None => true,
    };
    !host.is_empty() && port_ok
}

pub fn ip_address(text: &str) -> Result<(), String> {
    text.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| "an IPv4 or IPv6 address".to_string())
}

/// Checks an `http://host[:port][/path]` URL (the metadata service speaks plain HTTP).
pub fn http_url(text: &str) -> Result<(), String> {
    const EXPECTED: &str = "an http:// URL with a host, such as `http://127.0.0.1:8081`";
    let Some(rest) = text.strip_prefix("http://") else {
        return Err(EXPECTED.to_string());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains(char::is_whitespace) || authority.contains('@') {
        return Err(EXPECTED.to_string());
    }
    Ok(())
}

pub fn not_empty(text: &str) -> Result<(), String> {
    if text.trim().is_empty() {
        Err("a value that is not empty".to_string())
    } else {
        Ok(())
    }
}

/// Checks the name of an environment variable: no `=`, no NUL, not empty.
pub fn environment_name(text: &str) -> Result<(), String> {
    if text.is_empty() || text.contains('=') || text.contains('\0') {
        Err("an environment variable name (not empty, without `=`)".to_string())
    } else {
        Ok(())
    }
}

pub fn hook_name(text: &str) -> Result<(), String> {
    if HOOKS.contains(&text) {
        Ok(())
    } else {
        Err(format!("one of the steps {}", HOOKS.join(", ")))
    }
}

/// Returns the edit distance between two short strings (Levenshtein), to suggest the setting
/// an unknown key was probably meant to be.
pub fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (i, left_char) in left.chars().enumerate() {
        let mut current = vec![i + 1; right.len() + 1];
        for (j, right_char) in right.iter().enumerate() {
            let substitution = previous[j] + usize::from(left_char != *right_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[right.len()]
}
