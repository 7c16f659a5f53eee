//! The platform probe: works out where the pod runs (application, task, node, addresses,
//! remapped ports, ZooKeeper location) from the platform it was started on.
//!
//! Each binding reads only what the platform hands the container: environment variables and a
//! few local files. None of them probes a network address to decide anything. The only network
//! lookups are the resolution of the marathon `HOST` name (DNS or `/etc/hosts`) and the EC2
//! instance metadata, which is opt-in and reached only at the URL the operator configured.
//!
//! `identify` does the work; the `PlatformProbe` actor runs it once and keeps the result.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use log::{info, warn};
use serde::Serialize;

use crate::registration::{Registration, AGENT_VERSION};
use crate::settings::Settings;

/// ZooKeeper of the local binding when `zk` is not set.
pub const LOCAL_ZOOKEEPER: &str = "127.0.0.1:2181";

/// Time each EC2 metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(2);

/// Inputs the bindings read from the host: environment variables and the paths of a few files.
/// Tests build their own instead of changing the process environment.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub env: BTreeMap<String, String>,
    /// Kernel host name, read when `HOSTNAME` is not set.
    pub hostname_file: PathBuf,
    /// Static host table, where Docker writes the container's address under its host name.
    pub hosts_file: PathBuf,
    /// Routing table dump listing the addresses local to this network namespace.
    pub fib_trie_file: PathBuf,
    /// Marker file Docker creates in every container, read by `auto`.
    pub dockerenv_file: PathBuf,
}

impl Host {
    /// Returns the host of this process: its environment and the usual Linux paths.
    pub fn current() -> Host {
        let env = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        Host {
            env,
            hostname_file: PathBuf::from("/proc/sys/kernel/hostname"),
            hosts_file: PathBuf::from("/etc/hosts"),
            fib_trie_file: PathBuf::from("/proc/net/fib_trie"),
            dockerenv_file: PathBuf::from("/.dockerenv"),
        }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }

    fn required(&self, binding: &'static str, name: &str) -> Result<&str, BindingError> {
        self.var(name).ok_or_else(|| BindingError::MissingVariable {
            binding,
            variable: name.to_string(),
        })
    }
}

/// The pod's facts that come from the platform and the settings: its registration without the
/// `seq` (assigned by ZooKeeper) and the `status` (set by the leader).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Identity {
    pub application: String,
    pub task: String,
    pub node: String,
    /// Address other pods reach this pod at.
    pub ip: String,
    /// Address reachable from outside the platform network.
    pub public: String,
    /// Container port (as a string) to the port it is reachable at.
    pub ports: BTreeMap<String, u16>,
    /// Binding that produced this identity (never `auto`).
    pub binding: String,
    pub zk: String,
    pub namespace: String,
    pub cluster: String,
    /// Control port inside the container.
    pub port: u16,
    pub debug: bool,
    pub local: bool,
    pub version: String,
}

impl Identity {
    /// Returns the registration of this pod before ZooKeeper assigns its seq.
    pub fn registration(&self) -> Registration {
        Registration {
            application: self.application.clone(),
            task: self.task.clone(),
            node: self.node.clone(),
            seq: 0,
            zk: self.zk.clone(),
            binding: self.binding.clone(),
            namespace: self.namespace.clone(),
            cluster: self.cluster.clone(),
            port: self.port.to_string(),
            ip: self.ip.clone(),
            public: self.public.clone(),
            ports: self.ports.clone(),
            debug: self.debug,
            local: self.local,
            status: String::new(),
            version: self.version.clone(),
            extra: BTreeMap::new(),
        }
    }

    /// Returns the port the control server listens on; see `listen_port`.
    pub fn listen_port(&self) -> u16 {
        listen_port(&self.binding, self.port, &self.ports)
    }
}

/// Returns the port the control server listens on. Inside a container it is the control port
/// itself. With the local binding, where several pods share one host, it is the port the
/// control port is remapped to, so that each pod listens where the others reach it.
pub fn listen_port(binding: &str, port: u16, ports: &BTreeMap<String, u16>) -> u16 {
    if binding == "local" {
        ports.get(&port.to_string()).copied().unwrap_or(port)
    } else {
        port
    }
}

/// Failure to establish the pod's identity. Each message names the
/// variable, file or URL it looked at.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BindingError {
    #[error(
        "the {binding} binding needs environment variable {variable}, which is not set or empty"
    )]
    MissingVariable {
        binding: &'static str,
        variable: String,
    },
    #[error("environment variable {variable} has an invalid value {value:?}: expected {expected}")]
    InvalidVariable {
        variable: String,
        value: String,
        expected: String,
    },
    #[error("the {binding} binding needs setting `{setting}`, which is not set")]
    MissingSetting {
        binding: &'static str,
        setting: &'static str,
    },
    #[error(
        "the {binding} binding found no ZooKeeper connection string: set `zk` (ochopod_zk){}",
        looked_in(files)
    )]
    NoZooKeeper {
        binding: &'static str,
        files: Vec<PathBuf>,
    },
    #[error("cannot resolve host {host:?} from environment variable HOST: {reason}; set `ip` to skip the lookup")]
    Unresolved { host: String, reason: String },
    #[error("the docker binding found no address of this container in {} or {}; set `ip`", hosts.display(), fib_trie.display())]
    NoAddress { hosts: PathBuf, fib_trie: PathBuf },
    #[error("the docker binding cannot find the host name: HOSTNAME is not set and {} is unreadable ({reason})", path.display())]
    NoHostname { path: PathBuf, reason: String },
    #[error("EC2 instance metadata request {url} failed: {reason}")]
    Metadata { url: String, reason: String },
}

fn looked_in(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let names: Vec<String> = files
        .iter()
        .map(|file| file.display().to_string())
        .collect();
    format!(", or provide a zk:// URL in one of {}", names.join(", "))
}

/// Returns the binding `auto` stands for, decided from the environment and the Docker marker
/// file only: `MARATHON_APP_ID` means marathon, `KUBERNETES_SERVICE_HOST` or `POD_IP` means
/// kubernetes, `/.dockerenv` means docker, anything else local.
pub fn choose_binding(host: &Host) -> &'static str {
    if host.var("MARATHON_APP_ID").is_some() {
        "marathon"
    } else if host.var("KUBERNETES_SERVICE_HOST").is_some() || host.var("POD_IP").is_some() {
        "kubernetes"
    } else if host.dockerenv_file.exists() {
        "docker"
    } else {
        "local"
    }
}

/// Establishes the pod's identity with the binding the settings name.
pub async fn identify(settings: &Settings, host: &Host) -> Result<Identity, BindingError> {
    let binding = match settings.binding.as_str() {
        "auto" => choose_binding(host),
        "marathon" => "marathon",
        "kubernetes" => "kubernetes",
        "docker" => "docker",
        "ec2" => "ec2",
        _ => "local",
    };

    let mut identity = Identity {
        application: String::new(),
        task: String::new(),
        node: String::new(),
        ip: String::new(),
        public: String::new(),
        ports: BTreeMap::new(),
        binding: binding.to_string(),
        zk: settings.zk.clone(),
        namespace: settings.namespace.clone(),
        cluster: settings.cluster.clone(),
        port: settings.port,
        debug: settings.debug,
        local: binding == "local",
        version: AGENT_VERSION.to_string(),
    };
    match binding {
        "marathon" => marathon(settings, host, &mut identity).await?,
        "kubernetes" => kubernetes(settings, host, &mut identity)?,
        "docker" => docker(settings, host, &mut identity)?,
        "ec2" => ec2(settings, host, &mut identity).await?,
        _ => local(settings, host, &mut identity)?,
    }

    identity
        .ports
        .entry(identity.port.to_string())
        .or_insert(identity.port);
    Ok(identity)
}

fn local(settings: &Settings, host: &Host, identity: &mut Identity) -> Result<(), BindingError> {
    identity.application = "local".to_string();
    identity.task = "local".to_string();
    identity.node = "local".to_string();
    identity.ip = settings
        .ip
        .clone()
        .unwrap_or_else(|| "127.0.0.1".to_string());
    identity.public = identity.ip.clone();
    identity.ports = remapped_ports(settings, host)?;
    if identity.zk.is_empty() {
        identity.zk = LOCAL_ZOOKEEPER.to_string();
    }
    Ok(())
}

async fn marathon(
    settings: &Settings,
    host: &Host,
    identity: &mut Identity,
) -> Result<(), BindingError> {
    identity.application = host.required("marathon", "MARATHON_APP_ID")?.to_string();
    identity.task = host.required("marathon", "MESOS_TASK_ID")?.to_string();
    identity.node = host.required("marathon", "HOST")?.to_string();
    identity.ip = match &settings.ip {
        Some(ip) => ip.clone(),
        None => resolve(&identity.node).await?,
    };
    identity.public = identity.ip.clone();
    identity.ports = remapped_ports(settings, host)?;
    if identity.zk.is_empty() {
        identity.zk = mesos_zookeeper("marathon", &settings.mesos_zk_files)?;
    }
    Ok(())
}

fn kubernetes(
    settings: &Settings,
    host: &Host,
    identity: &mut Identity,
) -> Result<(), BindingError> {
    let name = host.required("kubernetes", "POD_NAME")?;
    let namespace = host.required("kubernetes", "POD_NAMESPACE")?;
    identity.application = name.to_string();
    identity.task = format!("{namespace}/{name}");
    identity.node = host.required("kubernetes", "NODE_NAME")?.to_string();
    identity.ip = match &settings.ip {
        Some(ip) => ip.clone(),
        None => address_variable(host, "kubernetes", "POD_IP")?,
    };
    identity.public = identity.ip.clone();

    // Pods have their own network namespace: every container port is reachable as itself.
    let ports = remapped_ports(settings, host)?;
    identity.ports = ports
        .keys()
        .filter_map(|port| Some((port.clone(), port.parse().ok()?)))
        .collect();
    if identity.zk.is_empty() {
        return Err(BindingError::NoZooKeeper {
            binding: "kubernetes",
            files: Vec::new(),
        });
    }
    Ok(())
}

fn docker(settings: &Settings, host: &Host, identity: &mut Identity) -> Result<(), BindingError> {
    let hostname = match host.var("HOSTNAME") {
        Some(name) => name.to_string(),
        None => std::fs::read_to_string(&host.hostname_file)
            .map(|text| text.trim().to_string())
            .map_err(|error| BindingError::NoHostname {
                path: host.hostname_file.clone(),
                reason: error.to_string(),
            })?,
    };
    identity.application = hostname.clone();
    identity.task = hostname.clone();
    identity.node = hostname.clone();
    identity.ip = match &settings.ip {
        Some(ip) => ip.clone(),
        None => container_address(host, &hostname)?,
    };
    identity.public = identity.ip.clone();
    identity.ports = remapped_ports(settings, host)?;
    if identity.zk.is_empty() {
        return Err(BindingError::NoZooKeeper {
            binding: "docker",
            files: Vec::new(),
        });
    }
    Ok(())
}

async fn ec2(
    settings: &Settings,
    host: &Host,
    identity: &mut Identity,
) -> Result<(), BindingError> {
    let base = settings
        .ec2_metadata_url
        .as_deref()
        .ok_or(BindingError::MissingSetting {
            binding: "ec2",
            setting: "ec2_metadata_url",
        })?;
    let metadata = Metadata::connect(base).await;

    let instance = metadata
        .get("instance-id")
        .await?
        .ok_or_else(|| metadata.missing("instance-id"))?;
    let local_ip = match &settings.ip {
        Some(ip) => ip.clone(),
        None => metadata
            .get("local-ipv4")
            .await?
            .ok_or_else(|| metadata.missing("local-ipv4"))?,
    };
    let public_ip = metadata.get("public-ipv4").await?;
    let node = metadata.get("local-hostname").await?;

    identity.application = host.var("MARATHON_APP_ID").unwrap_or(&instance).to_string();
    identity.task = host.var("MESOS_TASK_ID").unwrap_or(&instance).to_string();
    identity.node = node.unwrap_or_else(|| instance.clone());
    identity.public = public_ip.unwrap_or_else(|| local_ip.clone());
    identity.ip = local_ip;
    identity.ports = remapped_ports(settings, host)?;
    if identity.zk.is_empty() {
        identity.zk = mesos_zookeeper("ec2", &settings.mesos_zk_files)?;
    }
    Ok(())
}

/// Returns the `ports` setting overlaid with the `PORT_<container port>` variables.
fn remapped_ports(settings: &Settings, host: &Host) -> Result<BTreeMap<String, u16>, BindingError> {
    let mut ports = settings.ports.clone();
    for (name, value) in &host.env {
        let Some(container) = name.strip_prefix("PORT_") else {
            continue;
        };
        let container_port = container
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0 && port.to_string() == container);
        let Some(container_port) = container_port else {
            continue;
        };
        let reachable = value
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| BindingError::InvalidVariable {
                variable: name.clone(),
                value: value.clone(),
                expected: "a port number from 1 to 65535".to_string(),
            })?;
        ports.insert(container_port.to_string(), reachable);
    }
    Ok(ports)
}

fn address_variable(
    host: &Host,
    binding: &'static str,
    name: &str,
) -> Result<String, BindingError> {
    let value = host.required(binding, name)?;
    value
        .parse::<IpAddr>()
        .map(|ip| ip.to_string())
        .map_err(|_| BindingError::InvalidVariable {
            variable: name.to_string(),
            value: value.to_string(),
            expected: "an IPv4 or IPv6 address".to_string(),
        })
}

/// Resolves the marathon `HOST` name, preferring an IPv4 address.
async fn resolve(name: &str) -> Result<String, BindingError> {
    let unresolved = |reason: String| BindingError::Unresolved {
        host: name.to_string(),
        reason,
    };
    let addresses: Vec<IpAddr> = tokio::net::lookup_host((name, 0))
        .await
        .map_err(|error| unresolved(error.to_string()))?
        .map(|address| address.ip())
        .collect();
    let chosen = addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| addresses.first());
    chosen
        .map(IpAddr::to_string)
        .ok_or_else(|| unresolved("no address found".to_string()))
}

/// Reads the ZooKeeper hosts from the first readable Mesos file holding a `zk://` URL, with the
/// scheme, any credentials and the `/mesos` path removed.
fn mesos_zookeeper(binding: &'static str, files: &[PathBuf]) -> Result<String, BindingError> {
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        match zookeeper_from_url(&text) {
            Some(hosts) => {
                info!(
                    "binding {binding}: read the ZooKeeper hosts from {}",
                    file.display()
                );
                return Ok(hosts);
            }
            None => warn!(
                "binding {binding}: {} holds no zk:// URL, trying the next file",
                file.display()
            ),
        }
    }
    Err(BindingError::NoZooKeeper {
        binding,
        files: files.to_vec(),
    })
}

/// Extracts `host:port,...` from the first `zk://` URL in `text`.
fn zookeeper_from_url(text: &str) -> Option<String> {
    let start = text.find("zk://")? + "zk://".len();
    let url: String = text[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && !"\"'".contains(*c))
        .collect();
    let hosts = url.split('/').next().unwrap_or_default();
    let hosts = hosts.rsplit_once('@').map_or(hosts, |(_, hosts)| hosts);
    (!hosts.is_empty() && crate::settings::check_zookeeper(hosts).is_ok())
        .then(|| hosts.to_string())
}

/// Finds the container's address: the non-loopback address `/etc/hosts` gives its host name,
/// else the first non-loopback local address of the routing table.
fn container_address(host: &Host, hostname: &str) -> Result<String, BindingError> {
    if let Ok(text) = std::fs::read_to_string(&host.hosts_file) {
        if let Some(ip) = address_in_hosts(&text, hostname) {
            return Ok(ip);
        }
    }
    if let Ok(text) = std::fs::read_to_string(&host.fib_trie_file) {
        if let Some(ip) = address_in_fib_trie(&text) {
            return Ok(ip);
        }
    }
    Err(BindingError::NoAddress {
        hosts: host.hosts_file.clone(),
        fib_trie: host.fib_trie_file.clone(),
    })
}

fn address_in_hosts(text: &str, hostname: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default();
        let mut fields = line.split_whitespace();
        let ip: IpAddr = fields.next()?.parse().ok()?;
        let named = fields.any(|name| name.eq_ignore_ascii_case(hostname));
        (named && !ip.is_loopback() && !ip.is_unspecified()).then(|| ip.to_string())
    })
}

/// Returns the first address that `/proc/net/fib_trie` lists as `/32 host LOCAL`, other than
/// loopback. In that dump, each address line (`|-- 10.0.0.5`) is followed by its route type.
fn address_in_fib_trie(text: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines.windows(2).find_map(|pair| {
        let ip: IpAddr = pair[0].trim().strip_prefix("|--")?.trim().parse().ok()?;
        let local = pair[1].trim() == "/32 host LOCAL";
        (local && !ip.is_loopback()).then(|| ip.to_string())
    })
}

/// A client of the EC2 instance metadata service at a configured base URL, using a session
/// token when the service hands one out (IMDSv2) and plain requests otherwise.
struct Metadata {
    client: awc::Client,
    base: String,
    /// Session token; never logged.
    token: Option<String>,
}

impl Metadata {
    async fn connect(base: &str) -> Metadata {
        let client = awc::Client::builder().timeout(METADATA_TIMEOUT).finish();
        let base = base.trim_end_matches('/').to_string();
        let url = format!("{base}/latest/api/token");
        let reply = client
            .put(&url)
            .insert_header(("X-aws-ec2-metadata-token-ttl-seconds", "300"))
            .send()
            .await;
        let token = match reply {
            Ok(mut response) if response.status().is_success() => response
                .body()
                .await
                .ok()
                .and_then(|body| String::from_utf8(body.to_vec()).ok()),
            Ok(response) => {
                info!(
                    "binding ec2: {url} replied {}, reading the metadata without a session token",
                    response.status()
                );
                None
            }
            Err(error) => {
                info!("binding ec2: {url} failed ({error}), reading the metadata without a session token");
                None
            }
        };
        Metadata {
            client,
            base,
            token,
        }
    }

    /// Returns the metadata item at `latest/meta-data/<item>`, or `None` when it does not exist.
    async fn get(&self, item: &str) -> Result<Option<String>, BindingError> {
        let url = self.url(item);
        let failed = |reason: String| BindingError::Metadata {
            url: url.clone(),
            reason,
        };
        let mut request = self.client.get(&url);
        if let Some(token) = &self.token {
            request = request.insert_header(("X-aws-ec2-metadata-token", token.as_str()));
        }

        let mut response = request
            .send()
            .await
            .map_err(|error| failed(error.to_string()))?;
        if response.status() == awc::http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(failed(format!("status {}", response.status())));
        }
        let body = response
            .body()
            .await
            .map_err(|error| failed(error.to_string()))?;
        let text = String::from_utf8_lossy(&body).trim().to_string();
        Ok((!text.is_empty()).then_some(text))
    }

    fn missing(&self, item: &str) -> BindingError {
        BindingError::Metadata {
            url: self.url(item),
            reason: "not found".to_string(),
        }
    }

    fn url(&self, item: &str) -> String {
        format!("{}/latest/meta-data/{item}", self.base)
    }
}

/// Asks the platform probe for the pod's identity.
#[derive(Debug, Message)]
#[rtype(result = "Result<Identity, BindingError>")]
pub struct Identify;

/// The platform probe actor: establishes the identity on the first `Identify` and returns the
/// same identity afterwards (a failure is not kept, so the next request tries again).
pub struct PlatformProbe {
    settings: Arc<Settings>,
    host: Host,
    identity: Option<Identity>,
}

impl PlatformProbe {
    pub fn new(settings: Arc<Settings>, host: Host) -> Self {
        PlatformProbe {
            settings,
            host,
            identity: None,
        }
    }
}

impl Actor for PlatformProbe {
    type Context = Context<Self>;
}

impl Handler<Identify> for PlatformProbe {
    type Result = ResponseActFuture<Self, Result<Identity, BindingError>>;

    fn handle(&mut self, _: Identify, _: &mut Self::Context) -> Self::Result {
        if let Some(identity) = &self.identity {
            return Box::pin(fut::ready(Ok(identity.clone())));
        }

        let settings = self.settings.clone();
        let host = self.host.clone();
        let work = async move { identify(&settings, &host).await };
        Box::pin(work.into_actor(self).map(|result, probe, _| {
            match &result {
                Ok(identity) => {
                    info!(
                        "cluster {}.{}: binding {} identified the pod at {} on node {}, ZooKeeper {}",
                        identity.namespace, identity.cluster, identity.binding, identity.ip, identity.node, identity.zk
                    );
                    probe.identity = Some(identity.clone());
                }
                Err(error) => warn!("cluster {}: platform probe failed: {error}", probe.settings.qualified_cluster()),
            }
            result
        }))
    }
}

#[cfg(test)]
mod tests;
