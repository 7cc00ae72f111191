# shellcheck shell=bash
# shellcheck disable=SC2034  # variables are used by the scripts that source this
# Shared settings for ensure-tools.sh / start.sh / stop.sh. Sourced, not run.
#
# Versions are read from the pinned Go modules under go/, so go.mod is the
# single source of truth (bump a version there, run `go mod tidy`, done).

HT_CONTROLPLANE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HT_CACHE="${HT_CACHE:-$HOME/.cache/high-templar}"

# Version of module $2 required by go/$1/go.mod.
ht_mod_version() {
    awk -v m="$2" '($1 == "require" && $2 == m) { print $3; exit } ($1 == m && $2 ~ /^v/) { print $2; exit }' \
        "$HT_CONTROLPLANE_DIR/go/$1/go.mod"
}

KUBE_VERSION="$(ht_mod_version kube-apiserver k8s.io/kubernetes)"
ETCD_VERSION="$(ht_mod_version etcd go.etcd.io/etcd/server/v3)"
HELM_VERSION="$(ht_mod_version helm helm.sh/helm/v3)"

# Cached binaries: $HT_CACHE/<tool>-<version>/<tool>
HT_KUBE_APISERVER="$HT_CACHE/kube-apiserver-$KUBE_VERSION/kube-apiserver"
HT_KUBE_CONTROLLER_MANAGER="$HT_CACHE/kube-controller-manager-$KUBE_VERSION/kube-controller-manager"
HT_KUBECTL="$HT_CACHE/kubectl-$KUBE_VERSION/kubectl"
HT_ETCD="$HT_CACHE/etcd-$ETCD_VERSION/etcd"
HT_HELM="$HT_CACHE/helm-$HELM_VERSION/helm"
# Stable symlinks to the versions above, handy for PATH.
HT_BIN="$HT_CACHE/bin"

ht_go() {
    if command -v go >/dev/null 2>&1; then
        command go "$@"
    elif [ -x /usr/local/go/bin/go ]; then
        /usr/local/go/bin/go "$@"
    else
        echo "ht: no Go toolchain found (need go >= 1.26 on PATH or in /usr/local/go)" >&2
        return 1
    fi
}
