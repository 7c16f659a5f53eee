use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Mutex;

use super::*;

/// Builds a host with the given variables, whose files do not exist.
fn host(pairs: &[(&str, &str)]) -> Host {
    Host {
        env: pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect(),
        hostname_file: PathBuf::from("/nonexistent/hostname"),
        hosts_file: PathBuf::from("/nonexistent/hosts"),
        fib_trie_file: PathBuf::from("/nonexistent/fib_trie"),
        dockerenv_file: PathBuf::from("/nonexistent/.dockerenv"),
    }
}

fn settings(binding: &str) -> Settings {
    Settings {
        binding: binding.to_string(),
        mesos_zk_files: Vec::new(),
        ..Settings::default()
    }
}

fn text_file(contents: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(contents.as_bytes()).unwrap();
    file
}

const FIB_TRIE: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
";

#[actix::test]
async fn local_identity_and_remapped_ports() {
    let host = host(&[
        ("PORT_8080", "31000"),
        ("PORT_2181", "31001"),
        ("PORTS", "1,2"),
        ("PORT0", "5"),
    ]);
    let identity = identify(&settings("local"), &host).await.unwrap();

    assert_eq!(identity.binding, "local");
    assert!(identity.local);
    assert_eq!(identity.ip, "127.0.0.1");
    assert_eq!(identity.public, "127.0.0.1");
    assert_eq!(identity.node, "local");
    assert_eq!(identity.zk, LOCAL_ZOOKEEPER);
    assert_eq!(
        identity.ports,
        BTreeMap::from([("8080".to_string(), 31000), ("2181".to_string(), 31001)])
    );
    assert_eq!(identity.listen_port(), 31000);
    assert_eq!(identity.version, AGENT_VERSION);
}

#[actix::test]
async fn local_keeps_zk_setting_and_own_port() {
    let settings = Settings {
        zk: "127.0.0.1:2999".to_string(),
        port: 9000,
        ..settings("local")
    };
    let identity = identify(&settings, &host(&[])).await.unwrap();
    assert_eq!(identity.zk, "127.0.0.1:2999");
    assert_eq!(identity.ports, BTreeMap::from([("9000".to_string(), 9000)]));
    assert_eq!(identity.listen_port(), 9000);

    let registration = identity.registration();
    assert_eq!(registration.port, "9000");
    assert_eq!(registration.seq, 0);
    assert_eq!(registration.control_address(), "127.0.0.1:9000");
}

#[actix::test]
async fn invalid_port_variable_named() {
    let error = identify(&settings("local"), &host(&[("PORT_8080", "high")]))
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "environment variable PORT_8080 has an invalid value \"high\": expected a port number from 1 to 65535"
    );
}

#[test]
fn listen_port_only_remapped_for_local() {
    let ports = BTreeMap::from([("8080".to_string(), 31000)]);
    assert_eq!(listen_port("local", 8080, &ports), 31000);
    assert_eq!(listen_port("local", 8081, &ports), 8081);
    assert_eq!(listen_port("marathon", 8080, &ports), 8080);
}

#[actix::test]
async fn marathon_identity_from_environment() {
    let zk_file = text_file("zk://10.0.0.1:2181,10.0.0.2:2181/mesos\n");
    let settings = Settings {
        mesos_zk_files: vec![
            PathBuf::from("/nonexistent/zk"),
            zk_file.path().to_path_buf(),
        ],
        ..settings("marathon")
    };
    let host = host(&[
        ("MARATHON_APP_ID", "/shop/redis"),
        ("MESOS_TASK_ID", "redis.1234"),
        ("HOST", "127.0.0.1"),
        ("PORT_8080", "31000"),
    ]);
    let identity = identify(&settings, &host).await.unwrap();

    assert_eq!(identity.application, "/shop/redis");
    assert_eq!(identity.task, "redis.1234");
    assert_eq!(identity.node, "127.0.0.1");
    assert_eq!(identity.ip, "127.0.0.1");
    assert_eq!(identity.zk, "10.0.0.1:2181,10.0.0.2:2181");
    assert_eq!(identity.ports["8080"], 31000);
    assert!(!identity.local);
    assert_eq!(
        identity.listen_port(),
        8080,
        "inside a container the agent listens on its own port"
    );
}

#[actix::test]
async fn marathon_resolves_host_name() {
    let settings = Settings {
        zk: "127.0.0.1:2181".to_string(),
        ..settings("marathon")
    };
    let host = host(&[
        ("MARATHON_APP_ID", "a"),
        ("MESOS_TASK_ID", "t"),
        ("HOST", "localhost"),
    ]);
    let identity = identify(&settings, &host).await.unwrap();
    assert_eq!(identity.ip, "127.0.0.1");

    let settings = Settings {
        ip: Some("127.0.0.9".to_string()),
        ..settings
    };
    let identity = identify(&settings, &host).await.unwrap();
    assert_eq!(identity.ip, "127.0.0.9");
    assert_eq!(identity.public, "127.0.0.9");
}

#[actix::test]
async fn marathon_missing_variable_named() {
    let host = host(&[("MARATHON_APP_ID", "a"), ("HOST", "127.0.0.1")]);
    let error = identify(&settings("marathon"), &host).await.unwrap_err();
    assert_eq!(
        error,
        BindingError::MissingVariable {
            binding: "marathon",
            variable: "MESOS_TASK_ID".to_string()
        }
    );
    assert!(error.to_string().contains("MESOS_TASK_ID"));
}

#[actix::test]
async fn marathon_without_zookeeper_names_files() {
    let empty = text_file("no url here\n");
    let settings = Settings {
        mesos_zk_files: vec![PathBuf::from("/nonexistent/zk"), empty.path().to_path_buf()],
        ..settings("marathon")
    };
    let host = host(&[
        ("MARATHON_APP_ID", "a"),
        ("MESOS_TASK_ID", "t"),
        ("HOST", "127.0.0.1"),
    ]);
    let message = identify(&settings, &host).await.unwrap_err().to_string();
    assert!(message.contains("set `zk`"), "{message}");
    assert!(message.contains("/nonexistent/zk"), "{message}");
    assert!(
        message.contains(&empty.path().display().to_string()),
        "{message}"
    );
}

#[test]
fn zookeeper_url_forms() {
    assert_eq!(
        zookeeper_from_url("zk://a:2181,b:2181/mesos"),
        Some("a:2181,b:2181".to_string())
    );
    assert_eq!(
        zookeeper_from_url(
            "MESOS_MASTER=zk://user:secret@zk-1.zk:2181,zk-2.zk:2181/mesos\nOTHER=1"
        ),
        Some("zk-1.zk:2181,zk-2.zk:2181".to_string())
    );
    assert_eq!(
        zookeeper_from_url("MASTER=\"zk://10.0.0.1:2181\""),
        Some("10.0.0.1:2181".to_string())
    );
    assert_eq!(zookeeper_from_url("http://a:2181"), None);
    assert_eq!(zookeeper_from_url("zk:///mesos"), None);
}

#[actix::test]
async fn kubernetes_identity_from_downward_api() {
    let settings = Settings {
        zk: "zk.default.svc:2181".to_string(),
        ..settings("kubernetes")
    };
    let host = host(&[
        ("POD_IP", "10.1.2.3"),
        ("POD_NAME", "redis-0"),
        ("POD_NAMESPACE", "shop"),
        ("NODE_NAME", "node-7"),
        ("PORT_6379", "31000"),
    ]);
    let identity = identify(&settings, &host).await.unwrap();
    assert_eq!(identity.ip, "10.1.2.3");
    assert_eq!(identity.application, "redis-0");
    assert_eq!(identity.task, "shop/redis-0");
    assert_eq!(identity.node, "node-7");
    assert_eq!(
        identity.ports,
        BTreeMap::from([("6379".to_string(), 6379), ("8080".to_string(), 8080)])
    );
}

#[actix::test]
async fn kubernetes_errors_name_what_is_missing() {
    let settings_with_zk = Settings {
        zk: "zk:2181".to_string(),
        ..settings("kubernetes")
    };
    let error = identify(
        &settings_with_zk,
        &host(&[
            ("POD_NAME", "p"),
            ("POD_NAMESPACE", "n"),
            ("NODE_NAME", "x"),
        ]),
    )
    .await
    .unwrap_err();
    assert_eq!(
        error,
        BindingError::MissingVariable {
            binding: "kubernetes",
            variable: "POD_IP".to_string()
        }
    );

    let invalid_ip = host(&[
        ("POD_IP", "nope"),
        ("POD_NAME", "p"),
        ("POD_NAMESPACE", "n"),
        ("NODE_NAME", "x"),
    ]);
    let message = identify(&settings_with_zk, &invalid_ip)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("POD_IP") && message.contains("\"nope\""),
        "{message}"
    );

    let complete = host(&[
        ("POD_IP", "10.0.0.1"),
        ("POD_NAME", "p"),
        ("POD_NAMESPACE", "n"),
        ("NODE_NAME", "x"),
    ]);
    let message = identify(&settings("kubernetes"), &complete)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("the kubernetes binding found no ZooKeeper"),
        "{message}"
    );
}

#[actix::test]
async fn docker_address_from_hosts_file() {
    let hosts = text_file("127.0.0.1 localhost\n# 10.9.9.9 c0ffee\n172.17.0.5\tc0ffee\n");
    let mut host = host(&[("HOSTNAME", "c0ffee"), ("PORT_6379", "32768")]);
    host.hosts_file = hosts.path().to_path_buf();
    let settings = Settings {
        zk: "127.0.0.1:2181".to_string(),
        ..settings("docker")
    };

    let identity = identify(&settings, &host).await.unwrap();
    assert_eq!(identity.ip, "172.17.0.5");
    assert_eq!(identity.node, "c0ffee");
    assert_eq!(identity.ports["6379"], 32768);
}

#[actix::test]
async fn docker_address_from_fib_trie() {
    let hosts = text_file("127.0.0.1 localhost vm\n");
    let hostname = text_file("vm\n");
    let fib_trie = text_file(FIB_TRIE);
    let mut host = host(&[]);
    host.hosts_file = hosts.path().to_path_buf();
    host.hostname_file = hostname.path().to_path_buf();
    host.fib_trie_file = fib_trie.path().to_path_buf();
    let settings = Settings {
        zk: "127.0.0.1:2181".to_string(),
        ..settings("docker")
    };

    let identity = identify(&settings, &host).await.unwrap();
    assert_eq!(identity.ip, "192.0.2.2");
    assert_eq!(identity.node, "vm");
}

#[actix::test]
async fn docker_without_address_names_files() {
    let settings = Settings {
        zk: "127.0.0.1:2181".to_string(),
        ..settings("docker")
    };
    let message = identify(&settings, &host(&[("HOSTNAME", "c0ffee")]))
        .await
        .unwrap_err()
        .to_string();
    assert!(message.contains("/nonexistent/hosts"), "{message}");
    assert!(message.contains("/nonexistent/fib_trie"), "{message}");

    let message = identify(&settings, &host(&[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("HOSTNAME") && message.contains("/nonexistent/hostname"),
        "{message}"
    );
}

#[test]
fn auto_decides_from_environment_only() {
    assert_eq!(
        choose_binding(&host(&[("MARATHON_APP_ID", "/a"), ("POD_IP", "1.2.3.4")])),
        "marathon"
    );
    assert_eq!(
        choose_binding(&host(&[("KUBERNETES_SERVICE_HOST", "10.0.0.1")])),
        "kubernetes"
    );
    assert_eq!(
        choose_binding(&host(&[("POD_IP", "10.0.0.1")])),
        "kubernetes"
    );
    assert_eq!(choose_binding(&host(&[])), "local");

    let marker = tempfile::NamedTempFile::new().unwrap();
    let mut docker = host(&[]);
    docker.dockerenv_file = marker.path().to_path_buf();
    assert_eq!(choose_binding(&docker), "docker");
}

/// Requests the fake metadata service received: method, path and whether a token came with it.
type Requests = Arc<Mutex<Vec<(String, String, bool)>>>;

/// Starts an HTTP server on 127.0.0.1 that plays the EC2 instance metadata service (IMDSv2:
/// a token from `PUT /latest/api/token`, required on every read), and returns its base URL.
fn metadata_server(items: &'static [(&'static str, &'static str)]) -> (String, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let requests: Requests = Arc::default();
    let seen = requests.clone();

    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut with_token = false;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                with_token |= header
                    .to_ascii_lowercase()
                    .starts_with("x-aws-ec2-metadata-token: secret-token");
            }

            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            seen.lock()
                .unwrap()
                .push((method.clone(), path.clone(), with_token));

            let item = path
                .strip_prefix("/latest/meta-data/")
                .and_then(|item| items.iter().find(|(name, _)| *name == item));
            let (status, body) = match (method.as_str(), path.as_str(), item) {
                ("PUT", "/latest/api/token", _) => ("200 OK", "secret-token"),
                ("GET", _, _) if !with_token => ("401 Unauthorized", ""),
                ("GET", _, Some((_, value))) => ("200 OK", *value),
                _ => ("404 Not Found", ""),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    (format!("http://{address}"), requests)
}

const EC2_ITEMS: &[(&str, &str)] = &[
    ("instance-id", "i-0abc"),
    ("local-ipv4", "10.0.3.4"),
    ("local-hostname", "ip-10-0-3-4.internal"),
];

#[actix::test]
async fn ec2_identity_from_metadata_server() {
    let (url, requests) = metadata_server(EC2_ITEMS);
    let zk_file = text_file("zk://10.0.0.1:2181/mesos");
    let settings = Settings {
        ec2_metadata_url: Some(format!("{url}/")),
        mesos_zk_files: vec![zk_file.path().to_path_buf()],
        ..settings("ec2")
    };
    let identity = identify(&settings, &host(&[("PORT_8080", "31000")]))
        .await
        .unwrap();

    assert_eq!(identity.binding, "ec2");
    assert_eq!(identity.task, "i-0abc");
    assert_eq!(identity.application, "i-0abc");
    assert_eq!(identity.node, "ip-10-0-3-4.internal");
    assert_eq!(identity.ip, "10.0.3.4");
    assert_eq!(
        identity.public, "10.0.3.4",
        "no public-ipv4 item: the local address is the public one"
    );
    assert_eq!(identity.zk, "10.0.0.1:2181");
    assert_eq!(identity.ports["8080"], 31000);

    let requests = requests.lock().unwrap().clone();
    assert_eq!(
        requests[0],
        ("PUT".to_string(), "/latest/api/token".to_string(), false)
    );
    assert!(
        requests[1..]
            .iter()
            .all(|(method, _, with_token)| method == "GET" && *with_token),
        "{requests:?}"
    );
}

#[actix::test]
async fn ec2_needs_configured_url() {
    let error = identify(&settings("ec2"), &host(&[])).await.unwrap_err();
    assert_eq!(
        error,
        BindingError::MissingSetting {
            binding: "ec2",
            setting: "ec2_metadata_url"
        }
    );
}

#[actix::test]
async fn ec2_missing_item_names_url() {
    let (url, _) = metadata_server(&[("local-ipv4", "10.0.3.4")]);
    let settings = Settings {
        ec2_metadata_url: Some(url.clone()),
        zk: "127.0.0.1:2181".to_string(),
        ..settings("ec2")
    };
    let message = identify(&settings, &host(&[]))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        format!(
            "EC2 instance metadata request {url}/latest/meta-data/instance-id failed: not found"
        )
    );
}

#[actix::test]
async fn probe_actor_keeps_identity() {
    let (url, requests) = metadata_server(EC2_ITEMS);
    let settings = Settings {
        ec2_metadata_url: Some(url),
        zk: "127.0.0.1:2181".to_string(),
        ..settings("ec2")
    };
    let probe = PlatformProbe::new(Arc::new(settings), host(&[])).start();

    let first = probe.send(Identify).await.unwrap().unwrap();
    let served = requests.lock().unwrap().len();
    let second = probe.send(Identify).await.unwrap().unwrap();

    assert_eq!(first, second);
    assert_eq!(
        requests.lock().unwrap().len(),
        served,
        "the second request must not reach the metadata service"
    );
}
