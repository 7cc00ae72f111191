# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
# Shared settings of tests/node/*.sh. Sourced, not run. Sources
# tests/controlplane/lib.sh (tool paths, PKI/process helpers).

HT_NODE_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../controlplane/lib.sh
source "$HT_NODE_HERE/../controlplane/lib.sh"

# Fixed addresses (one node per machine at a time, guarded by a lock).
NODE_IP=10.250.0.2          # the node's end of the veth pair, inside its netns
HOST_IP=10.250.0.1          # the host's end
VETH_PREFIX=30
POD_CIDR=10.244.0.0/24      # CNI bridge cni0 (10.244.0.1) in the netns
POD_GATEWAY=10.244.0.1
SERVICE_CIDR=10.96.0.0/16
KUBERNETES_SERVICE_IP=10.96.0.1
DNS_SERVICE_IP=10.96.0.10
CLUSTER_DOMAIN=cluster.local
NODE_NAME="${HT_NODE_NAME:-ht-node}"
APISERVER_PORT=6443
CNI_NETWORK=ht-node         # name of the CNI network (also in /var/lib/cni/results file names)

# The lock that keeps two nodes from running at once (the addresses are fixed).
HT_NODE_LOCK_DIR=/run/lock
HT_NODE_LOCK="$HT_NODE_LOCK_DIR/high-templar-node.lock"    # flock, held only while claiming
HT_NODE_OWNER="$HT_NODE_LOCK_DIR/high-templar-node.owner"  # "WORKDIR NETNS HOST_VETH START_PID" of the running node

# Paths inside WORKDIR (W).
ht_node_paths() {
    CONTAINERD_DIR="$W/containerd"
    CONTAINERD_SOCK="$CONTAINERD_DIR/containerd.sock"
    KUBELET_DIR="$W/kubelet"
    RABBITMQ_DIR="$W/rabbitmq"
    VARS_FILE="$W/run/node.vars"
}

# ht_node_load_vars: NETNS, HOST_VETH, RABBITMQ_NODENAME... of the node in W,
# written by start.sh before it starts anything (so stop.sh can clean up a
# half-started node too).
ht_node_load_vars() {
    ht_node_paths
    NETNS="" HOST_VETH="" RABBITMQ_NODENAME=""
    # shellcheck disable=SC1090
    [ -s "$VARS_FILE" ] && source "$VARS_FILE"
    NSX=(nsenter "--net=/run/netns/$NETNS" --)
    ht_rabbitmq_env
}

# RABBITMQ_ENV: the `env ...` prefix for RabbitMQ's scripts (rabbitmq-server,
# rabbitmqctl) for the node's broker: own node name, cookie (HOME), config,
# data and logs under W; nothing from /etc/rabbitmq.
ht_rabbitmq_env() {
    RABBITMQ_ENV=(env HOME="$RABBITMQ_DIR"
        RABBITMQ_NODENAME="$RABBITMQ_NODENAME"
        RABBITMQ_CONF_ENV_FILE="$RABBITMQ_DIR/rabbitmq-env.conf"
        RABBITMQ_CONFIG_FILE="$RABBITMQ_DIR/rabbitmq.conf"
        RABBITMQ_ADVANCED_CONFIG_FILE="$RABBITMQ_DIR/advanced.config"
        RABBITMQ_ENABLED_PLUGINS_FILE="$RABBITMQ_DIR/enabled_plugins"
        RABBITMQ_MNESIA_BASE="$RABBITMQ_DIR/mnesia"
        RABBITMQ_LOG_BASE="$RABBITMQ_DIR/log"
        RABBITMQ_PID_FILE="$RABBITMQ_DIR/rabbitmq.pid")
}
RABBITMQ_LIB=/usr/lib/rabbitmq/bin
