#!/usr/bin/env bash
# Build (once) and cache the control-plane tools used by the integration tests:
#   kube-apiserver, kube-controller-manager, kubectl  (k8s.io/kubernetes, go/kube-apiserver)
#   etcd                                              (go.etcd.io/etcd/server/v3, go/etcd)
#   helm                                              (helm.sh/helm/v3, go/helm)
# Everything comes from the Go module proxy; binaries land in
#   ${HT_CACHE:-$HOME/.cache/high-templar}/<tool>-<version>/<tool>
# with stable symlinks in $HT_CACHE/bin/. Idempotent, and silent when
# everything is cached already. Also installs the Debian packages that
# start.sh needs (openssl, curl) when they are missing.
#
# Usage: ensure-tools.sh [TOOL...]      (default: all five tools)
#        ensure-tools.sh --print-env    (print shell exports of the binary paths, build nothing)
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_TOOLS=(kube-apiserver kube-controller-manager kubectl etcd helm)

if [ "${1:-}" = "--print-env" ]; then
    printf 'export HT_KUBE_APISERVER=%q\n' "$HT_KUBE_APISERVER"
    printf 'export HT_KUBE_CONTROLLER_MANAGER=%q\n' "$HT_KUBE_CONTROLLER_MANAGER"
    printf 'export HT_KUBECTL=%q\n' "$HT_KUBECTL"
    printf 'export HT_ETCD=%q\n' "$HT_ETCD"
    printf 'export HT_HELM=%q\n' "$HT_HELM"
    printf 'export HT_BIN=%q\n' "$HT_BIN"
    exit 0
fi

if [ "$#" -gt 0 ]; then
    TOOLS=("$@")
else
    TOOLS=("${ALL_TOOLS[@]}")
fi

log() { echo "ensure-tools: $*" >&2; }

# --- Debian packages ---------------------------------------------------------
need_pkgs=()
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v flock >/dev/null 2>&1 || need_pkgs+=(util-linux)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    log "installing Debian packages: ${need_pkgs[*]}"
    SUDO=()
    [ "$(id -u)" -eq 0 ] || SUDO=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y -qq "${need_pkgs[@]}" >/dev/null 2>&1; then
        "${SUDO[@]}" apt-get update -qq
        "${SUDO[@]}" apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    fi
fi

# --- Go builds -----------------------------------------------------------------
# One build at a time, also across concurrent ensure-tools.sh invocations.
mkdir -p "$HT_CACHE"
exec 9>"$HT_CACHE/.ensure-tools.lock"
flock 9

kube_minor="${KUBE_VERSION#v1.}"; kube_minor="${kube_minor%%.*}"
helm_k8s_minor="$(ht_mod_version helm k8s.io/client-go)"; helm_k8s_minor="${helm_k8s_minor#v0.}"; helm_k8s_minor="${helm_k8s_minor%%.*}"

kube_ldflags() {
    local f="-s -w" p
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$kube_minor -X $p.gitTreeState=clean"
    done
    echo "$f"
}

# build_tool MODULE_DIR PACKAGE OUTPUT LDFLAGS
build_tool() {
    local moddir="$HT_CONTROLPLANE_DIR/go/$1" pkg="$2" out="$3" ldflags="$4"
    local start=$SECONDS
    log "building $(basename "$out") from $pkg (first run only; kube-apiserver takes ~10+ min on 2 cores)"
    mkdir -p "$(dirname "$out")"
    (
        cd "$moddir"
        # -mod=readonly: fail instead of silently editing the committed go.mod/go.sum.
        GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
            ht_go build -trimpath -ldflags "$ldflags" -o "$out.tmp.$$" "$pkg"
    )
    mv -f "$out.tmp.$$" "$out"
    log "built $out in $((SECONDS - start))s"
}

link() { mkdir -p "$HT_BIN"; ln -sfn "$1" "$HT_BIN/$(basename "$1")"; }

for tool in "${TOOLS[@]}"; do
    case "$tool" in
        kube-apiserver)
            [ -x "$HT_KUBE_APISERVER" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$HT_KUBE_APISERVER" "$(kube_ldflags)"
            link "$HT_KUBE_APISERVER" ;;
        kube-controller-manager)
            [ -x "$HT_KUBE_CONTROLLER_MANAGER" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager "$HT_KUBE_CONTROLLER_MANAGER" "$(kube_ldflags)"
            link "$HT_KUBE_CONTROLLER_MANAGER" ;;
        kubectl)
            [ -x "$HT_KUBECTL" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kubectl "$HT_KUBECTL" "$(kube_ldflags)"
            link "$HT_KUBECTL" ;;
        etcd)
            [ -x "$HT_ETCD" ] || build_tool etcd go.etcd.io/etcd/server/v3 "$HT_ETCD" "-s -w"
            link "$HT_ETCD" ;;
        helm)
            [ -x "$HT_HELM" ] || build_tool helm helm.sh/helm/v3/cmd/helm "$HT_HELM" \
                "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor"
            link "$HT_HELM" ;;
        *)
            log "unknown tool '$tool' (known: ${ALL_TOOLS[*]})"; exit 2 ;;
    esac
done
