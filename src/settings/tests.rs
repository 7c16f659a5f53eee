use std::io::Write;

use super::*;

fn file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn flags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    env(pairs)
}

/// Loads from a TOML text only and returns the error message of the single error expected.
fn file_error(contents: &str) -> String {
    let file = file(contents);
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let errors = Settings::check(&sources).expect_err("the settings should be rejected");
    assert_eq!(errors.len(), 1, "expected one error, got {errors:?}");
    errors[0].to_string()
}

fn env_error(pairs: &[(&str, &str)]) -> String {
    let sources = Sources {
        env: env(pairs),
        ..Sources::default()
    };
    Settings::load(&sources)
        .expect_err("the settings should be rejected")
        .to_string()
}

#[test]
fn defaults_load_without_sources() {
    let settings = Settings::load(&Sources::default()).unwrap();
    assert_eq!(settings, Settings::default());
}

#[test]
fn keys_match_struct_fields() {
    let json = serde_json::to_value(Settings::default()).unwrap();
    let mut fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut keys = KEYS.to_vec();
    fields.sort_unstable();
    keys.sort_unstable();
    assert_eq!(fields, keys);
}

#[test]
fn precedence_defaults_file_env_flags() {
    let file = file("damper = 5\ncluster = \"from-file\"\nnamespace = \"file.ns\"\ngrace = 7\n");
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        env: env(&[
            ("ochopod_cluster", "from-env"),
            ("OCHOPOD_GRACE", "8"),
            ("PATH", "/bin"),
        ]),
        flags: flags(&[("grace", "9")]),
        argv: vec!["sleep".to_string(), "1".to_string()],
    };
    let settings = Settings::load(&sources).unwrap();

    assert_eq!(settings.port, 8080, "default kept");
    assert_eq!(settings.damper, 5.0, "file over default");
    assert_eq!(settings.namespace, "file.ns", "file over default");
    assert_eq!(settings.cluster, "from-env", "env over file");
    assert_eq!(settings.grace, 9.0, "flag over env and file");
    assert_eq!(settings.argv, vec!["sleep", "1"]);
}

#[test]
fn upper_case_env_wins_over_lower_case() {
    let sources = Sources {
        env: env(&[("OCHOPOD_CLUSTER", "upper"), ("ochopod_cluster", "lower")]),
        ..Sources::default()
    };
    assert_eq!(Settings::load(&sources).unwrap().cluster, "upper");
}

#[test]
fn env_lists_and_booleans() {
    let sources = Sources {
        env: env(&[
            ("ochopod_depends_on", "zookeeper, kafka-*,/other.db"),
            ("ochopod_strict", "yes"),
            ("OCHOPOD_SOFT", "1"),
            ("OCHOPOD_DEBUG", "False"),
            ("ochopod_mesos_zk_files", "/a,/b"),
        ]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(
        settings.depends_on,
        vec!["zookeeper", "kafka-*", "/other.db"]
    );
    assert!(settings.strict);
    assert!(settings.soft);
    assert!(!settings.debug);
    assert_eq!(
        settings.mesos_zk_files,
        vec![PathBuf::from("/a"), PathBuf::from("/b")]
    );
}

#[test]
fn env_local_selects_local_binding() {
    let sources = Sources {
        env: env(&[("ochopod_local", "true")]),
        ..Sources::default()
    };
    assert_eq!(Settings::load(&sources).unwrap().binding, "local");

    let sources = Sources {
        env: env(&[("ochopod_local", "true"), ("ochopod_binding", "docker")]),
        ..Sources::default()
    };
    assert_eq!(
        Settings::load(&sources).unwrap().binding,
        "docker",
        "an explicit binding wins"
    );

    let sources = Sources {
        env: env(&[("ochopod_local", "false")]),
        ..Sources::default()
    };
    assert_eq!(Settings::load(&sources).unwrap().binding, "auto");
}

#[test]
fn env_ignores_runtime_and_unknown_names() {
    let sources = Sources {
        env: env(&[
            ("ochopod", "{\"ip\":\"1.2.3.4\"}"),
            ("OCHOPOD_INDEX", "x"),
            ("OCHOPOD_SEQ", "x"),
            ("OCHOPOD_SIZE", "x"),
            ("OCHOPOD_CLUSTER_JSON", "{}"),
            ("OCHOPOD_DEP_ZOOKEEPER_2181", "1.2.3.4:2181"),
            ("OCHOPOD_FOO", "bar"),
            ("ochopod_env", "A=b"),
            ("ochopod_application", "x"),
        ]),
        ..Sources::default()
    };
    assert_eq!(Settings::load(&sources).unwrap(), Settings::default());
}

#[test]
fn file_tables_and_flag_entries() {
    let file = file(
        "command = \"redis-server --port 6379\"\n[env]\nA = \"1\"\nB = \"2\"\n[hooks]\nconfigure = \"./configure.sh\"\n[ports]\n8080 = 31000\n",
    );
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        flags: flags(&[
            ("env", "B=3"),
            ("hooks", "probe=/bin/probe"),
            ("hooks", "signaled=./signaled.sh"),
            ("ports", "2181=31001"),
        ]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.env["A"], "1");
    assert_eq!(settings.env["B"], "3");
    // A relative hook path of the file is relative to the file's directory.
    assert_eq!(
        settings.hooks["configure"],
        file.path().parent().unwrap().join("./configure.sh")
    );
    assert_eq!(settings.hooks["probe"], PathBuf::from("/bin/probe"));
    // A relative hook path of a flag is relative to the working directory, as in a shell.
    assert_eq!(settings.hooks["signaled"], PathBuf::from("./signaled.sh"));
    assert_eq!(settings.ports["8080"], 31000);
    assert_eq!(settings.ports["2181"], 31001);
    assert_eq!(
        settings.command.as_deref(),
        Some("redis-server --port 6379")
    );
}

#[test]
fn file_integers_accepted_as_seconds() {
    let file = file("damper = 2\ngrace = 0.5\nsession_timeout = 3\n");
    let settings = Settings::load(&Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(settings.damper, 2.0);
    assert_eq!(settings.grace, 0.5);
    assert_eq!(settings.session_timeout, 3.0);
}

#[test]
fn unknown_key_names_closest() {
    let message = file_error("dampr = 3\n");
    assert!(message.contains("unknown setting `dampr`"), "{message}");
    assert!(message.contains("did you mean `damper`?"), "{message}");
}

#[test]
fn unknown_key_names_file() {
    let file = file("depends-on = [\"a\"]\n");
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let message = Settings::load(&sources).unwrap_err().to_string();
    assert!(
        message.contains(&file.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("`depends_on`"), "{message}");
}

#[test]
fn wrong_types_name_key_value_and_type() {
    let cases = [
        (
            "damper = \"abc\"\n",
            "`damper`",
            "\"abc\"",
            "a number of seconds",
        ),
        (
            "port = \"http\"\n",
            "`port`",
            "\"http\"",
            "a TCP port number",
        ),
        ("strict = \"maybe\"\n", "`strict`", "\"maybe\"", "a boolean"),
        ("depends_on = 3\n", "`depends_on`", "3", "a list of strings"),
        (
            "depends_on = [1]\n",
            "`depends_on`",
            "[1]",
            "a list of strings",
        ),
        ("checks = 1.5\n", "`checks`", "1.5", "a whole number"),
        ("cluster = 7\n", "`cluster`", "7", "a string"),
        ("env = \"A=b\"\n", "`env`", "\"A=b\"", "a table"),
        (
            "[ports]\n8080 = \"x\"\n",
            "`ports.8080`",
            "\"x\"",
            "a TCP port number",
        ),
    ];
    for (contents, key, value, expected) in cases {
        let message = file_error(contents);
        assert!(message.contains(key), "{contents}: {message}");
        assert!(message.contains(value), "{contents}: {message}");
        assert!(message.contains(expected), "{contents}: {message}");
    }
}

#[test]
fn durations_out_of_range_rejected() {
    for value in ["-1", "NaN", "inf", "100000", "1e9"] {
        let message = env_error(&[("OCHOPOD_DAMPER", value)]);
        assert!(message.contains("`damper`"), "{value}: {message}");
        assert!(message.contains("OCHOPOD_DAMPER"), "{value}: {message}");
        assert!(message.contains("from 0 to 86400"), "{value}: {message}");
    }
    let message = env_error(&[("ochopod_control_timeout", "0")]);
    assert!(message.contains("above 0"), "{message}");
    let message = file_error("session_timeout = -3\n");
    assert!(message.contains("`session_timeout`"), "{message}");
    assert!(message.contains("-3"), "{message}");
}

#[test]
fn port_zero_rejected() {
    let sources = Sources {
        flags: flags(&[("port", "0")]),
        ..Sources::default()
    };
    let message = Settings::load(&sources).unwrap_err().to_string();
    assert_eq!(message, "setting `port` (from flag --port) has an invalid value \"0\": expected a TCP port number from 1 to 65535");

    let message = file_error("port = 70000\n");
    assert!(message.contains("70000"), "{message}");
    let message = file_error("[ports]\n0 = 31000\n");
    assert!(message.contains("`ports`"), "{message}");
    assert!(message.contains("\"0\""), "{message}");
}

#[test]
fn invalid_binding_lists_allowed() {
    let message = env_error(&[("ochopod_binding", "mesos")]);
    assert!(message.contains("\"mesos\""), "{message}");
    assert!(
        message.contains("one of auto, local, marathon, kubernetes, docker, ec2"),
        "{message}"
    );
}

#[test]
fn names_rejected() {
    let cases = [
        ("namespace", ""),
        ("namespace", "a..b"),
        ("namespace", "shop staging"),
        ("namespace", ".shop"),
        ("cluster", ""),
        ("cluster", "a.b"),
        ("cluster", "a/b"),
        ("depends_on", "/nodot"),
        ("depends_on", "a.b"),
        ("depends_on", "a b"),
        ("depends_on", "kafka-[x"),
    ];
    for (key, value) in cases {
        let sources = Sources {
            flags: flags(&[(key, value)]),
            ..Sources::default()
        };
        let message = Settings::load(&sources).unwrap_err().to_string();
        assert!(
            message.contains(&format!("`{key}`")),
            "{key}={value}: {message}"
        );
        assert!(
            message.contains("letters, digits"),
            "{key}={value}: {message}"
        );
    }
}

#[test]
fn names_accepted() {
    let sources = Sources {
        flags: flags(&[
            ("namespace", "shop.staging-2"),
            ("cluster", "redis_main"),
            ("depends_on", "zookeeper,/ops.kafka-*,db?"),
        ]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.qualified_cluster(), "shop.staging-2.redis_main");
    assert_eq!(settings.depends_on.len(), 3);
}

#[test]
fn zookeeper_strings() {
    for good in [
        "127.0.0.1:2181",
        "a:1,b:2/chroot/x",
        "zk1,zk2:2182",
        "[::1]:2181",
        "host/",
    ] {
        let sources = Sources {
            flags: flags(&[("zk", good)]),
            ..Sources::default()
        };
        assert_eq!(Settings::load(&sources).unwrap().zk, good);
    }
    for bad in [
        "host:0", "host:abc", ",host:1", "a:1//x", "a:1/x/", "h st:1", "a:1/../x", "[::1",
    ] {
        let message = env_error(&[("ochopod_zk", bad)]);
        assert!(message.contains("`zk`"), "{bad}: {message}");
        assert!(
            message.contains("a ZooKeeper connection string"),
            "{bad}: {message}"
        );
    }
}

#[test]
fn other_values_rejected() {
    let cases = [
        ("ip", "not-an-ip", "an IPv4 or IPv6 address"),
        ("checks", "0", "a whole number from 1"),
        ("ec2_metadata_url", "https://x", "an http:// URL"),
        ("ec2_metadata_url", "http://", "an http:// URL"),
        ("hooks", "configur=/bin/x", "one of the steps"),
        ("hooks", "configure=", "not empty"),
        ("env", "novalue", "KEY=VALUE"),
        ("env", "=x", "environment variable name"),
        ("command", "  ", "not empty"),
        ("command", "echo 'unbalanced", "balanced quotes"),
    ];
    for (key, value, expected) in cases {
        let sources = Sources {
            flags: flags(&[(key, value)]),
            ..Sources::default()
        };
        let message = Settings::load(&sources).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("setting `{key}")),
            "{key}={value}: {message}"
        );
        assert!(message.contains(expected), "{key}={value}: {message}");
    }
}

#[test]
fn ec2_needs_explicit_metadata_url() {
    let sources = Sources {
        flags: flags(&[("binding", "ec2")]),
        ..Sources::default()
    };
    let message = Settings::load(&sources).unwrap_err().to_string();
    assert!(message.contains("`ec2_metadata_url`"), "{message}");
    assert!(message.contains("has no default"), "{message}");
    assert!(message.contains("--binding"), "{message}");

    let sources = Sources {
        flags: flags(&[
            ("binding", "ec2"),
            ("ec2_metadata_url", "http://127.0.0.1:9"),
        ]),
        ..Sources::default()
    };
    assert_eq!(
        Settings::load(&sources)
            .unwrap()
            .ec2_metadata_url
            .as_deref(),
        Some("http://127.0.0.1:9")
    );
}

#[test]
fn shell_command_skips_word_split() {
    let sources = Sources {
        flags: flags(&[("command", "echo 'a"), ("shell", "true")]),
        ..Sources::default()
    };
    assert!(Settings::load(&sources).unwrap().shell);
}

#[test]
fn unreadable_file_names_path_and_os_error() {
    let sources = Sources {
        file: Some(PathBuf::from("/nonexistent/ochopod.toml")),
        ..Sources::default()
    };
    let message = Settings::load(&sources).unwrap_err().to_string();
    assert!(message.contains("/nonexistent/ochopod.toml"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn device_and_directory_rejected_as_files() {
    for path in ["/dev/zero", "/tmp"] {
        let sources = Sources {
            file: Some(PathBuf::from(path)),
            ..Sources::default()
        };
        let message = Settings::load(&sources).unwrap_err().to_string();
        assert!(message.contains(path), "{message}");
        assert!(message.contains("not a regular file"), "{message}");
    }
}

#[test]
fn oversized_file_rejected() {
    let file = file(&"# padding\n".repeat(200_000));
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let message = Settings::load(&sources).unwrap_err().to_string();
    assert!(message.contains("2000000 bytes"), "{message}");
    assert!(message.contains("1048576 bytes"), "{message}");
}

#[test]
fn syntax_error_names_file() {
    let message = file_error("port = = 3\n");
    assert!(message.contains("is not valid TOML"), "{message}");
    assert!(message.contains("line 1"), "{message}");
}

#[test]
fn check_reports_every_error() {
    let file = file("port = 0\ndamper = -1\nbinding = \"x\"\nunknown = 1\n");
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let errors = Settings::check(&sources).unwrap_err();
    let mut keys: Vec<&str> = errors.iter().map(SettingsError::key).collect();
    keys.sort_unstable();
    assert_eq!(keys, vec!["binding", "damper", "port", "unknown"]);
}

#[test]
fn empty_optional_text_means_unset() {
    let sources = Sources {
        env: env(&[("ochopod_ip", "")]),
        flags: flags(&[("command", "")]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.ip, None);
    assert_eq!(settings.command, None);
}

#[test]
fn token_read_but_never_shown() {
    let secret = "correct-horse-battery-staple-42";
    let sources = Sources {
        env: env(&[("ochopod_token", secret)]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.token.as_ref().map(Token::expose), Some(secret));

    let debug = format!("{settings:?}");
    assert!(!debug.contains(secret), "{debug}");
    let printed = serde_json::to_string(&settings).unwrap();
    assert!(!printed.contains(secret), "{printed}");
    assert!(printed.contains(r#""token":"<redacted>""#), "{printed}");
}

#[test]
fn token_from_file_and_flag() {
    let file = file("token = \"from-the-file-0123456789\"\n");
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.token.unwrap().expose(), "from-the-file-0123456789");

    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        flags: flags(&[("token", "")]),
        ..Sources::default()
    };
    assert_eq!(
        Settings::load(&sources).unwrap().token,
        None,
        "empty unsets"
    );
}

#[test]
fn invalid_token_not_quoted() {
    for secret in [
        "short-secret",
        "has a space inside of it",
        "caf\u{e9}-0123456789abcdef",
    ] {
        let message = env_error(&[("OCHOPOD_TOKEN", secret)]);
        assert!(message.contains("`token`"), "{message}");
        assert!(message.contains("<redacted>"), "{message}");
        assert!(!message.contains(secret), "{message}");
        assert!(message.contains("16 to 1024"), "{message}");
    }
    let message = file_error("token = 1234567890123456789\n");
    assert!(!message.contains("1234567890123456789"), "{message}");
    assert!(message.contains("a string"), "{message}");
}

#[test]
fn zookeeper_auth_read_but_password_never_shown() {
    let password = "5d1c9e0f7a2b4c6d8e0f";
    let value = format!("shop:{password}");
    for name in ["ochopod_zookeeper_auth", "OCHOPOD_ZOOKEEPER_AUTH"] {
        let sources = Sources {
            env: env(&[(name, &value)]),
            ..Sources::default()
        };
        let settings = Settings::load(&sources).unwrap();
        let auth = settings.zookeeper_auth.as_ref().unwrap();
        assert_eq!(auth.user(), "shop");
        assert_eq!(auth.expose(), value.as_bytes());
        assert!(settings.zookeeper_world_read, "world-readable by default");

        let debug = format!("{settings:?}");
        assert!(!debug.contains(password), "{debug}");
        let printed = serde_json::to_string(&settings).unwrap();
        assert!(!printed.contains(password), "{printed}");
        assert!(
            printed.contains(r#""zookeeper_auth":"shop:<redacted>""#),
            "{printed}"
        );
    }
}

#[test]
fn zookeeper_auth_from_file_and_flag() {
    let file =
        file("zookeeper_auth = \"file-user:0123456789abcdef\"\nzookeeper_world_read = false\n");
    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.zookeeper_auth.unwrap().user(), "file-user");
    assert!(!settings.zookeeper_world_read);

    let sources = Sources {
        file: Some(file.path().to_path_buf()),
        flags: flags(&[("zookeeper_auth", "flag-user:fedcba9876543210")]),
        ..Sources::default()
    };
    let settings = Settings::load(&sources).unwrap();
    assert_eq!(settings.zookeeper_auth.unwrap().user(), "flag-user");
}

#[test]
fn invalid_zookeeper_auth_not_quoted() {
    for (value, problem) in [
        ("no-colon-in-this-value-at-all", "no `:`"),
        (":0123456789abcdef", "user before the `:` is empty"),
        ("shop:short", "password has 5 characters"),
        ("shop:0123456789 abcdef", "spaces, control or non-ASCII"),
    ] {
        let message = env_error(&[("ochopod_zookeeper_auth", value)]);
        assert!(message.contains("`zookeeper_auth`"), "{message}");
        assert!(
            message.contains("environment variable ochopod_zookeeper_auth"),
            "{message}"
        );
        assert!(message.contains(problem), "{message}");
        assert!(message.contains("<redacted>"), "{message}");
        assert!(!message.contains(value), "{message}");
    }
    let message = file_error("zookeeper_auth = 42\n");
    assert!(message.contains("a string"), "{message}");
}

#[test]
fn zookeeper_world_read_needs_auth() {
    let message = env_error(&[("ochopod_zookeeper_world_read", "false")]);
    assert!(message.contains("`zookeeper_world_read`"), "{message}");
    assert!(message.contains("set `zookeeper_auth`"), "{message}");

    let sources = Sources {
        env: env(&[("ochopod_zookeeper_world_read", "true")]),
        ..Sources::default()
    };
    assert!(
        Settings::load(&sources).is_ok(),
        "true needs no credentials"
    );
}
