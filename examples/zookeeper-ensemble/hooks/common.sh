# Shared by the hooks of the ZooKeeper example; sourced, not run.
#
# Reads the cluster view (JSON on stdin) and works out this server's identity and the
# addresses it listens on. Everything below has a production default and can be changed
# through the environment of the agent, which every hook and the server inherit.
#
# ZK_DATA_DIR     directory of zoo.cfg and data/ [default: ./zookeeper under the pod's cwd]
# ZK_TICK_TIME    ZooKeeper tickTime in ms [default: 2000]
# ZK_INIT_LIMIT   ticks a follower may take to connect and sync to the leader [default: 10]
# ZK_SYNC_LIMIT   ticks a follower may lag behind the leader [default: 5]
# ZK_HEAP         maximum Java heap (-Xmx) [default: 128m]
# ZK_JVM_FLAGS    extra JVM flags, split on spaces [default: -XX:+UseSerialGC]
# ZK_LOG_LEVEL    server log level: trace, debug, info, warn or error [default: info]
# ZK_CLASSPATH    server classpath [default: the jars of Debian's zookeeper package]
# ZK_START_GRACE  seconds after its start during which a server that does not reply yet
#                 passes the sanity check [default: 60]

set -euo pipefail

if ! command -v jq >/dev/null 2>&1; then
    echo "jq not found in PATH; install it (Debian package jq)" >&2
    exit 1
fi

zk_view=$(cat)

# One jq run reads every fact of this pod, because each run costs tens of milliseconds. The
# ZooKeeper server id must be unique and stay the same while a server keeps its data. The seq
# that ZooKeeper gave the pod's registration is both, for the life of the agent.
facts=$(jq -r '
    .key as $key | .pods[$key] as $me
    | if $me == null then
          "echo \("this pod (key \($key)) is not part of the cluster view" | @sh) >&2; exit 1"
      else
          @sh "zk_key=\($key) zk_myid=\($me.seq + 1) zk_ip=\($me.ip) zk_local=\($me.local)",
          @sh "zk_remapped_client_port=\($me.ports["2181"] // 2181)"
      end' <<<"$zk_view") || {
    echo "the cluster view on stdin is not valid JSON" >&2
    exit 1
}
eval "$facts"

zk_dir=${ZK_DATA_DIR:-$PWD/zookeeper}
zk_config=$zk_dir/zoo.cfg

# With the local binding every pod shares one host, so the server listens on the remapped
# ports (PORT_2181 and so on) of its own address. In a container it listens on the container
# ports on every interface, and the platform forwards the remapped host ports to them.
if [[ $zk_local == true ]]; then
    zk_shared_host=true
    zk_client_host=$zk_ip
    zk_client_port=$zk_remapped_client_port
else
    zk_shared_host=false
    zk_client_host=127.0.0.1
    zk_client_port=2181
fi
