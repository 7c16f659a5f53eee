//! The sources of settings and their merge: defaults, then the TOML file, then the environment,
//! then command-line flags, each later value replacing an earlier one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use log::warn;

use super::value::{self, Input, Raw};
use super::{
    check_token, check_zookeeper_auth, Origin, Settings, SettingsError, Token, ZookeeperAuth,
};

/// Inputs of the settings. The environment is passed in rather than read by `load`, so
/// tests (and embedders) decide what it contains.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// TOML file given with `--config`.
    pub file: Option<PathBuf>,
    /// Environment variables, in any order; only `ochopod_<name>` and `OCHOPOD_<NAME>` are read.
    pub env: Vec<(String, String)>,
    /// Command-line flags as (setting, text) pairs, applied in order. Table settings (`env`,
    /// `hooks`, `ports`) take one `KEY=VALUE` entry per pair.
    pub flags: Vec<(String, String)>,
    /// Command given after `--` on the command line.
    pub argv: Vec<String>,
}

impl Sources {
    /// Returns the environment of this process, skipping variables that are not valid UTF-8.
    pub fn process_env() -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect()
    }
}

/// Every setting name, as written in the TOML file.
pub const KEYS: &[&str] = &[
    "zk",
    "namespace",
    "cluster",
    "port",
    "binding",
    "debug",
    "start",
    "session_timeout",
    "ip",
    "exit_when_dead",
    "token",
    "zookeeper_auth",
    "zookeeper_world_read",
    "damper",
    "depends_on",
    "full_shutdown",
    "sequential",
    "control_timeout",
    "probe_every",
    "checks",
    "check_every",
    "cwd",
    "grace",
    "pipe_subprocess",
    "shell",
    "soft",
    "strict",
    "command",
    "env",
    "hooks",
    "hook_timeout",
    "ports",
    "mesos_zk_files",
    "ec2_metadata_url",
];

/// Table settings, which the environment cannot set (the binding reads `PORT_<n>` variables
/// into `ports` itself).
const TABLE_KEYS: &[&str] = &["env", "hooks", "ports"];

/// `OCHOPOD_*` variables that this agent sets for its own sub-processes and hooks, which are
/// not settings. They are skipped without a warning.
const RUNTIME_VARIABLES: &[&str] = &[
    "index",
    "seq",
    "size",
    "cluster_json",
    "run_id",
    "hook",
    "pid",
];

/// Merges the sources over the defaults; see `Settings::check`.
pub fn merge(sources: &Sources) -> Result<Settings, Vec<SettingsError>> {
    let mut merger = Merger {
        settings: Settings::default(),
        origins: BTreeMap::new(),
        errors: Vec::new(),
    };

    if let Some(path) = &sources.file {
        merger.apply_file(path);
    }
    merger.apply_environment(&sources.env);
    for (key, text) in &sources.flags {
        merger.apply(key, Raw::Text(text), Origin::Flag(key.clone()));
    }
    merger.settings.argv = sources.argv.clone();

    merger.check_combinations();
    if merger.errors.is_empty() {
        Ok(merger.settings)
    } else {
        Err(merger.errors)
    }
}

/// Largest settings file read. Real files are a few KiB; the limit keeps a wrong path such as
/// `/dev/zero` from filling the memory.
const MAX_SETTINGS_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a settings file, which must be a regular file of at most
/// [`MAX_SETTINGS_FILE_BYTES`]; a FIFO or a device would block or never end.
fn read_settings_file(path: &PathBuf) -> Result<String, String> {
    use std::io::Read;

    let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
    if !metadata.is_file() {
        return Err("not a regular file; give the path of a TOML file".to_string());
    }
    if metadata.len() > MAX_SETTINGS_FILE_BYTES {
        return Err(format!(
            "{} bytes, more than the {MAX_SETTINGS_FILE_BYTES} bytes a settings file may have",
            metadata.len()
        ));
    }

    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_SETTINGS_FILE_BYTES).read_to_string(&mut text))
        .map_err(|error| error.to_string())?;
    Ok(text)
}

struct Merger {
    settings: Settings,
    /// Source of the current value of each setting (absent: the default).
    origins: BTreeMap<String, Origin>,
    errors: Vec<SettingsError>,
}

impl Merger {
    fn apply_file(&mut self, path: &PathBuf) {
        let text = match read_settings_file(path) {
            Ok(text) => text,
            Err(reason) => {
                self.errors.push(SettingsError::Unreadable {
                    path: path.clone(),
                    reason,
                });
                return;
            }
        };
        let table = match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(error) => {
                let reason = error.to_string().trim().replace('\n', " ");
                self.errors.push(SettingsError::Syntax {
                    path: path.clone(),
                    reason,
                });
                return;
            }
        };

        for (key, value) in &table {
            self.apply(key, Raw::Toml(value), Origin::File(path.clone()));
        }
    }

    /// Applies the `ochopod_<name>` and `OCHOPOD_<NAME>` variables. When both forms of a name
    /// are set, the upper-case one wins. `ochopod_local=true` (the original agent's switch)
    /// selects the local binding unless a binding variable is also set.
    fn apply_environment(&mut self, env: &[(String, String)]) {
        let mut variables: Vec<(String, bool, &str, &str)> = Vec::new();
        for (name, text) in env {
            let (rest, upper) = if let Some(rest) = name.strip_prefix("ochopod_") {
                (rest, false)
            } else if let Some(rest) = name.strip_prefix("OCHOPOD_") {
                (rest, true)
            } else {
                continue;
            };
            let key = rest.to_ascii_lowercase();
            if RUNTIME_VARIABLES.contains(&key.as_str()) || key.starts_with("dep_") {
                continue;
            }
            variables.push((key, upper, name, text));
        }
        // `local` first so that an explicit binding overrides it, then lower case before upper
        // case so that the upper-case form wins.
        variables.sort_by(|left, right| {
            (left.0 != "local", &left.0, left.1).cmp(&(right.0 != "local", &right.0, right.1))
        });

        for (key, _, name, text) in variables {
            let origin = Origin::Env(name.to_string());
            if key == "local" {
                let input = Input {
                    key: "local",
                    raw: Raw::Text(text),
                    origin: &origin,
                };
                match input.boolean() {
                    Ok(true) => self.apply("binding", Raw::Text("local"), origin),
                    Ok(false) => {}
                    Err(error) => self.errors.push(error),
                }
            } else if TABLE_KEYS.contains(&key.as_str()) {
                warn!("ignoring environment variable {name}: `{key}` is a table and can only be set in the settings file");
            } else if KEYS.contains(&key.as_str()) {
                self.apply(&key, Raw::Text(text), origin);
            } else {
                warn!(
                    "ignoring environment variable {name}: `{key}` is not a setting ({})",
                    closest_hint(&key)
                );
            }
        }
    }

    fn apply(&mut self, key: &str, raw: Raw<'_>, origin: Origin) {
        if !KEYS.contains(&key) {
            self.errors.push(SettingsError::UnknownKey {
                key: key.to_string(),
                origin,
                hint: closest_hint(key),
            });
            return;
        }

        let input = Input {
            key,
            raw,
            origin: &origin,
        };
        match set(&mut self.settings, &input) {
            Ok(()) => {
                self.origins.insert(key.to_string(), origin);
            }
            Err(error) => self.errors.push(error),
        }
    }

    /// Checks the rules that involve several settings, once every source is merged.
    fn check_combinations(&mut self) {
        let settings = &self.settings;

        if settings.binding == "ec2" && settings.ec2_metadata_url.is_none() {
            self.errors.push(SettingsError::Invalid {
                key: "ec2_metadata_url".to_string(),
                value: "(unset)".to_string(),
                expected: "the http:// URL of the instance metadata service, which the ec2 binding needs and which has no default".to_string(),
                origin: self.origin("binding"),
            });
        }

        if !settings.zookeeper_world_read && settings.zookeeper_auth.is_none() {
            self.errors.push(SettingsError::Invalid {
                key: "zookeeper_world_read".to_string(),
                value: "false".to_string(),
                expected: "true unless `zookeeper_auth` is set: without credentials the znodes \
                           stay open to anyone, so set `zookeeper_auth` as well or remove \
                           `zookeeper_world_read`"
                    .to_string(),
                origin: self.origin("zookeeper_world_read"),
            });
        }

        if let (Some(command), false) = (&settings.command, settings.shell) {
            if let Err(error) = shell_words::split(command) {
                self.errors.push(SettingsError::Invalid {
                    key: "command".to_string(),
                    value: format!("{command:?}"),
                    expected: format!(
                        "a command line with balanced quotes ({error}), or `shell = true`"
                    ),
                    origin: self.origin("command"),
                });
            }
        }
    }

    fn origin(&self, key: &str) -> Origin {
        self.origins.get(key).cloned().unwrap_or(Origin::Default)
    }
}

/// Converts one value and stores it in its field.
fn set(settings: &mut Settings, input: &Input<'_>) -> Result<(), SettingsError> {
    match input.key {
        "zk" => settings.zk = input.text(value::zookeeper)?,
        "namespace" => settings.namespace = input.text(value::namespace)?,
        "cluster" => settings.cluster = input.text(value::cluster_name)?,
        "port" => settings.port = input.port()?,
        "binding" => settings.binding = input.text(value::binding)?,
        "debug" => settings.debug = input.boolean()?,
        "start" => settings.start = input.boolean()?,
        "session_timeout" => settings.session_timeout = input.seconds(true)?,
        "ip" => settings.ip = input.optional_text(value::ip_address)?,
        "exit_when_dead" => settings.exit_when_dead = input.boolean()?,
        "token" => settings.token = input.secret(check_token)?.map(Token::new),
        "zookeeper_auth" => {
            settings.zookeeper_auth = input
                .secret(check_zookeeper_auth)?
                .map(|text| ZookeeperAuth::parse(&text).expect("checked by check_zookeeper_auth"));
        }
        "zookeeper_world_read" => settings.zookeeper_world_read = input.boolean()?,
        "damper" => settings.damper = input.seconds(false)?,
        "depends_on" => settings.depends_on = input.list(value::dependency)?,
        "full_shutdown" => settings.full_shutdown = input.boolean()?,
        "sequential" => settings.sequential = input.boolean()?,
        "control_timeout" => settings.control_timeout = input.seconds(true)?,
        "probe_every" => settings.probe_every = input.seconds(true)?,
        "checks" => settings.checks = input.count()?,
        "check_every" => settings.check_every = input.seconds(true)?,
        "cwd" => settings.cwd = input.optional_path()?,
        "grace" => settings.grace = input.seconds(false)?,
        "pipe_subprocess" => settings.pipe_subprocess = input.boolean()?,
        "shell" => settings.shell = input.boolean()?,
        "soft" => settings.soft = input.boolean()?,
        "strict" => settings.strict = input.boolean()?,
        "command" => settings.command = input.optional_text(value::not_empty)?,
        "hook_timeout" => settings.hook_timeout = input.seconds(true)?,
        "mesos_zk_files" => {
            settings.mesos_zk_files = input
                .list(value::not_empty)?
                .into_iter()
                .map(PathBuf::from)
                .collect();
        }
        "ec2_metadata_url" => settings.ec2_metadata_url = input.optional_text(value::http_url)?,
        "env" => input.entries(|name, entry| {
            check_entry_name(input, name, value::environment_name)?;
            settings
                .env
                .insert(name.to_string(), entry.text(|_| Ok(()))?);
            Ok(())
        })?,
        "hooks" => input.entries(|name, entry| {
            check_entry_name(input, name, value::hook_name)?;
            let path = PathBuf::from(entry.text(value::not_empty)?);
            settings
                .hooks
                .insert(name.to_string(), beside_settings_file(path, input.origin));
            Ok(())
        })?,
        "ports" => input.entries(|name, entry| {
            check_entry_name(input, name, |name| match name.parse::<u16>() {
                Ok(port) if port > 0 && port.to_string() == name => Ok(()),
                _ => Err("a container port number from 1 to 65535 as the key".to_string()),
            })?;
            settings.ports.insert(name.to_string(), entry.port()?);
            Ok(())
        })?,
        other => unreachable!("setting `{other}` is listed in KEYS but has no conversion"),
    }
    Ok(())
}

/// Resolves a relative path read from the settings file against the file's directory, so that
/// a file and the hooks beside it work from any working directory. Paths from the environment
/// or a flag stay relative to the agent's working directory, as a shell user expects.
fn beside_settings_file(path: PathBuf, origin: &Origin) -> PathBuf {
    match origin {
        Origin::File(file) if path.is_relative() => match file.parent() {
            Some(directory) => directory.join(path),
            None => path,
        },
        _ => path,
    }
}

/// Checks the key of one table entry, reporting the key itself as the invalid value.
fn check_entry_name(
    table: &Input<'_>,
    name: &str,
    rule: impl Fn(&str) -> Result<(), String>,
) -> Result<(), SettingsError> {
    rule(name).map_err(|expected| SettingsError::Invalid {
        key: table.key.to_string(),
        value: format!("{name:?}"),
        expected: format!("{expected} (keys of `{}`)", table.key),
        origin: table.origin.clone(),
    })
}

/// Returns "did you mean `<closest setting>`?" for an unknown key.
fn closest_hint(key: &str) -> String {
    let closest = KEYS
        .iter()
        .min_by_key(|candidate| value::edit_distance(key, candidate))
        .expect("KEYS is not empty");
    format!("did you mean `{closest}`? Valid settings are listed by `ochopod run --help`")
}
