//! Access control on the cluster's znodes: the `digest` credentials every ZooKeeper session of
//! a pod authenticates with, the ACLs of the znodes it creates, and the explanation and retry
//! delay of a request that ZooKeeper denies.
//!
//! Without credentials every znode is created open to anyone (`world:anyone` ALL), as the
//! original Ochopod did. With `zookeeper_auth`, the znodes of the cluster (its directory,
//! `pods`, `coordinator`, `snapshot`, `hash`, registrations and lock nodes) grant every right to
//! the session's digest identity (`auth` scheme, which ZooKeeper expands to `digest:<user>:<hash>`)
//! and, with `zookeeper_world_read`, READ to anyone. The parents that every cluster shares,
//! `/ochopod` and `/ochopod/clusters`, stay open, so that clusters with other credentials, or
//! none, can still create their own directory beside this one.

use std::time::Duration;

use zookeeper_client as zk;

use crate::settings::{Settings, ZookeeperAuth};

/// ZooKeeper's scheme for `user:password` credentials.
pub const DIGEST_SCHEME: &str = "digest";

/// Every right to the session's authenticated identity, READ to anyone.
static CREATOR_ALL_ANYONE_READ: [zk::Acl; 2] = [
    zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
    zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
];

/// First delay before a denied request is tried again. It doubles with every denial in a row.
const FIRST_DENIED_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Maximum delay between two attempts of a request that ZooKeeper keeps denying. Credentials
/// or ACLs change only when an operator acts, so a fast retry would only fill the log.
pub const MAX_DENIED_RETRY_DELAY: Duration = Duration::from_secs(60);

/// The credentials of a pod's ZooKeeper sessions and the ACLs of the znodes it creates.
/// `Debug` hides the password.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZookeeperAccess {
    auth: Option<ZookeeperAuth>,
    /// Whether anyone may read the cluster's znodes when `auth` is set.
    world_read: bool,
}

impl ZookeeperAccess {
    /// Builds the access from `auth` and whether anyone may read the znodes it protects.
    pub fn new(auth: Option<ZookeeperAuth>, world_read: bool) -> Self {
        ZookeeperAccess { auth, world_read }
    }

    /// Builds the access from the `zookeeper_auth` and `zookeeper_world_read` settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self::new(
            settings.zookeeper_auth.clone(),
            settings.zookeeper_world_read,
        )
    }

    /// Returns whether sessions authenticate, and so whether the cluster's znodes are protected.
    pub fn is_authenticated(&self) -> bool {
        self.auth.is_some()
    }

    /// Returns a connector whose sessions authenticate with the credentials, if any. The client
    /// sends them again on every reconnection of the same session; a new session needs a new
    /// connector from here.
    pub fn connector(&self) -> zk::Connector {
        let connector = zk::Client::connector();
        match &self.auth {
            Some(auth) => connector.with_auth(DIGEST_SCHEME, &auth.expose()),
            None => connector,
        }
    }

    /// Returns the ACLs of every znode of the cluster that the pod creates.
    pub fn cluster_acls(&self) -> zk::Acls<'static> {
        match (&self.auth, self.world_read) {
            (None, _) => zk::Acls::anyone_all(),
            (Some(_), true) => zk::Acls::new(&CREATOR_ALL_ANYONE_READ),
            (Some(_), false) => zk::Acls::creator_all(),
        }
    }

    /// Returns the ACLs of the parents that every cluster shares (`/ochopod` and
    /// `/ochopod/clusters`), which stay open so that any cluster can create its directory.
    pub fn shared_acls(&self) -> zk::Acls<'static> {
        zk::Acls::anyone_all()
    }

    /// Explains a request on the znode `path` that ZooKeeper denied (`NoAuth`), or a session
    /// that failed to authenticate (`AuthFailed`), with what to check. Returns `None` for any
    /// other error. The text names the digest user, never the password.
    pub fn explain_denial(&self, error: &zk::Error, path: Option<&str>) -> Option<String> {
        let identity = match &self.auth {
            Some(auth) => format!("digest user `{}`", auth.user()),
            None => "a session without credentials".to_string(),
        };
        let (on_path, get_acl) = match path {
            Some(path) => (format!(" on {path}"), format!("getAcl {path}")),
            None => (String::new(), "getAcl".to_string()),
        };
        match (error, &self.auth) {
            (zk::Error::NoAuth, Some(_)) => Some(format!(
                "ZooKeeper denied the request{on_path} to {identity} (not authorized): the \
                 znode's ACL does not grant this pod's `zookeeper_auth` credentials. The \
                 credentials probably differ from those of the pods that created the cluster's \
                 znodes. Give every pod of the cluster the same `zookeeper_auth`, or change \
                 the ACLs of the znodes (`{get_acl}` in zkCli shows them)"
            )),
            (zk::Error::NoAuth, None) => Some(format!(
                "ZooKeeper denied the request{on_path} to {identity} (not authorized): the \
                 znode's ACL requires credentials. Set `zookeeper_auth` (ochopod_zookeeper_auth) \
                 to the `user:password` of the pods that created the cluster's znodes"
            )),
            (zk::Error::AuthFailed, Some(_)) => Some(format!(
                "ZooKeeper rejected the authentication of {identity} (authentication failed). \
                 Check `zookeeper_auth` and what the servers require (for example SASL, or \
                 `enforce.auth.schemes` in zoo.cfg)"
            )),
            (zk::Error::AuthFailed, None) => Some(format!(
                "ZooKeeper rejected {identity} (authentication failed) because the servers \
                 require authentication (for example `enforce.auth.enabled` in zoo.cfg). Set \
                 `zookeeper_auth` (ochopod_zookeeper_auth) to credentials of a scheme they accept"
            )),
            _ => None,
        }
    }
}

/// Returns the rights that `acls` grant to anyone (`world:anyone`) beyond READ, or `None` when
/// anyone may read at most.
pub fn world_permission_beyond_read(acls: &[zk::Acl]) -> Option<zk::Permission> {
    acls.iter()
        .filter(|acl| acl.scheme() == "world" && acl.id() == "anyone")
        .map(zk::Acl::permission)
        .find(|permission| !matches!(*permission, zk::Permission::NONE | zk::Permission::READ))
}

/// Returns the delay before trying again a request that ZooKeeper denied `denials` times in a
/// row (at least 1): 1 s, doubled with every further denial, at most [`MAX_DENIED_RETRY_DELAY`].
pub fn denied_retry_delay(denials: u32) -> Duration {
    let doublings = denials.saturating_sub(1).min(16);
    FIRST_DENIED_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_DENIED_RETRY_DELAY)
}

/// A ZooKeeper request that failed, with the znode it was about.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{path}: {error}")]
pub struct ZnodeError {
    pub path: String,
    pub error: zk::Error,
}

/// Attaches the znode to the error of a ZooKeeper request.
pub trait AtZnode<T> {
    fn at(self, path: &str) -> Result<T, ZnodeError>;
}

impl<T, E: Into<zk::Error>> AtZnode<T> for Result<T, E> {
    fn at(self, path: &str) -> Result<T, ZnodeError> {
        self.map_err(|error| ZnodeError {
            path: path.to_string(),
            error: error.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "a3f9a0c1d2e4b5a6978c";

    fn authenticated(world_read: bool) -> ZookeeperAccess {
        let auth = ZookeeperAuth::parse(&format!("shop:{PASSWORD}")).unwrap();
        ZookeeperAccess::new(Some(auth), world_read)
    }

    #[test]
    fn acls_open_without_credentials() {
        let access = ZookeeperAccess::default();
        assert!(!access.is_authenticated());
        assert_eq!(&*access.cluster_acls(), &*zk::Acls::anyone_all());
        assert_eq!(&*access.shared_acls(), &*zk::Acls::anyone_all());
    }

    #[test]
    fn acls_with_credentials() {
        let acls = authenticated(true).cluster_acls();
        assert_eq!(acls.len(), 2);
        assert_eq!(acls[0].scheme(), "auth");
        assert_eq!(acls[0].permission(), zk::Permission::ALL);
        assert_eq!(acls[1].scheme(), "world");
        assert_eq!(acls[1].id(), "anyone");
        assert_eq!(acls[1].permission(), zk::Permission::READ);

        let private = authenticated(false).cluster_acls();
        assert_eq!(&*private, &*zk::Acls::creator_all());
        assert_eq!(
            &*authenticated(false).shared_acls(),
            &*zk::Acls::anyone_all()
        );
    }

    #[test]
    fn debug_hides_password() {
        let debug = format!("{:?}", authenticated(true));
        assert!(!debug.contains(PASSWORD), "{debug}");
        assert!(debug.contains("shop"), "{debug}");
    }

    #[test]
    fn denial_explained_without_password() {
        let access = authenticated(true);
        let path = "/ochopod/clusters/shop.web/pods";
        let message = access
            .explain_denial(&zk::Error::NoAuth, Some(path))
            .unwrap();
        assert!(
            message.contains(&format!("denied the request on {path}")),
            "{message}"
        );
        assert!(message.contains(&format!("`getAcl {path}`")), "{message}");
        assert!(message.contains("digest user `shop`"), "{message}");
        assert!(message.contains("same `zookeeper_auth`"), "{message}");
        assert!(!message.contains(PASSWORD), "{message}");

        let open = ZookeeperAccess::default();
        let message = open.explain_denial(&zk::Error::NoAuth, Some(path)).unwrap();
        assert!(message.contains("Set `zookeeper_auth`"), "{message}");
        let message = open.explain_denial(&zk::Error::NoAuth, None).unwrap();
        assert!(
            message.contains("denied the request to a session"),
            "{message}"
        );

        let message = access.explain_denial(&zk::Error::AuthFailed, None).unwrap();
        assert!(message.contains("authentication failed"), "{message}");
        assert!(!message.contains(PASSWORD), "{message}");

        assert_eq!(access.explain_denial(&zk::Error::NoNode, Some(path)), None);
    }

    #[test]
    fn world_permission_beyond_read_found() {
        assert_eq!(
            world_permission_beyond_read(&zk::Acls::anyone_all()),
            Some(zk::Permission::ALL)
        );
        assert_eq!(world_permission_beyond_read(&CREATOR_ALL_ANYONE_READ), None);
        assert_eq!(world_permission_beyond_read(&zk::Acls::creator_all()), None);
        let write = [zk::Acl::new(
            zk::Permission::READ | zk::Permission::WRITE,
            zk::AuthId::anyone(),
        )];
        assert_eq!(
            world_permission_beyond_read(&write),
            Some(zk::Permission::READ | zk::Permission::WRITE)
        );
    }

    #[test]
    fn denied_retry_delay_doubles_to_limit() {
        assert_eq!(denied_retry_delay(0), Duration::from_secs(1));
        assert_eq!(denied_retry_delay(1), Duration::from_secs(1));
        assert_eq!(denied_retry_delay(2), Duration::from_secs(2));
        assert_eq!(denied_retry_delay(4), Duration::from_secs(8));
        assert_eq!(denied_retry_delay(7), MAX_DENIED_RETRY_DELAY);
        assert_eq!(denied_retry_delay(u32::MAX), MAX_DENIED_RETRY_DELAY);
    }

    #[test]
    fn znode_error_names_path() {
        let result: Result<(), zk::Error> = Err(zk::Error::NoAuth);
        let error = result.at("/ochopod/clusters/shop.web").unwrap_err();
        assert_eq!(error.path, "/ochopod/clusters/shop.web");
        assert_eq!(error.error, zk::Error::NoAuth);
        assert_eq!(
            error.to_string(),
            "/ochopod/clusters/shop.web: not authorized"
        );
    }
}
