#!/usr/bin/env bash
# Build (once) and cache the control-plane tools used by the integration tests:
#   kube-apiserver, kube-controller-manager, kubectl  (k8s.io/kubernetes, go/kube-apiserver)
#   etcd                                              (go.etcd.io/etcd/server/v3, go/etcd)
#   helm                                              (helm.sh/helm/v3, go/helm)
#   promtool                                          (github.com/prometheus/prometheus, go/prometheus)
# and, for the single-node cluster of tests/node/ (not built by default):
#   kubelet, kube-proxy, kube-scheduler               (k8s.io/kubernetes, go/kube-apiserver)
#   coredns                                           (github.com/coredns/coredns, go/coredns)
#   prometheus                                        (github.com/prometheus/prometheus, go/prometheus)
#   pause         the sandbox image, an OCI archive   (../node/pause)
# Everything comes from the Go module proxy; binaries land in
#   ${HT_CACHE:-$HOME/.cache/high-templar}/<tool>-<version>/<tool>
# with stable symlinks in $HT_CACHE/bin/. Idempotent, and silent when
# everything is cached already. Also installs the Debian packages that
# start.sh needs (openssl, curl) when they are missing.
#
# Usage: ensure-tools.sh [TOOL...]      (default: the six control-plane tools;
#                                       `node` = everything tests/node/start.sh runs)
#        ensure-tools.sh --print-env    (print shell exports of the binary paths, build nothing)
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ALL_TOOLS=(kube-apiserver kube-controller-manager kubectl etcd helm promtool)
NODE_TOOLS=(kube-apiserver kube-controller-manager kubectl etcd helm promtool kubelet kube-proxy kube-scheduler coredns pause prometheus)

if [ "${1:-}" = "--print-env" ]; then
    printf 'export HT_KUBE_APISERVER=%q\n' "$HT_KUBE_APISERVER"
    printf 'export HT_KUBE_CONTROLLER_MANAGER=%q\n' "$HT_KUBE_CONTROLLER_MANAGER"
    printf 'export HT_KUBECTL=%q\n' "$HT_KUBECTL"
    printf 'export HT_ETCD=%q\n' "$HT_ETCD"
    printf 'export HT_HELM=%q\n' "$HT_HELM"
    printf 'export HT_PROMTOOL=%q\n' "$HT_PROMTOOL"
    printf 'export HT_PROMETHEUS=%q\n' "$HT_PROMETHEUS"
    printf 'export HT_KUBELET=%q\n' "$HT_KUBELET"
    printf 'export HT_KUBE_PROXY=%q\n' "$HT_KUBE_PROXY"
    printf 'export HT_KUBE_SCHEDULER=%q\n' "$HT_KUBE_SCHEDULER"
    printf 'export HT_COREDNS=%q\n' "$HT_COREDNS"
    printf 'export HT_PAUSE_IMAGE=%q\n' "$HT_PAUSE_IMAGE"
    printf 'export HT_PAUSE_IMAGE_NAME=%q\n' "$HT_PAUSE_IMAGE_NAME"
    printf 'export HT_BIN=%q\n' "$HT_BIN"
    exit 0
fi

TOOLS=()
[ "$#" -gt 0 ] || set -- "${ALL_TOOLS[@]}"
for t in "$@"; do
    if [ "$t" = node ]; then TOOLS+=("${NODE_TOOLS[@]}"); else TOOLS+=("$t"); fi
done

log() { echo "ensure-tools: $*" >&2; }

# --- Debian packages ---------------------------------------------------------
need_pkgs=()
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v flock >/dev/null 2>&1 || need_pkgs+=(util-linux)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    ht_apt_install "${need_pkgs[@]}"
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

# Prometheus and promtool without the cloud service discoveries (AWS,
# Azure, GCE, Kubernetes, ...): the tests use static and file targets, and
# those SDs' SDKs would be most of the build. Version from the module's
# v0.3XX.Y = Prometheus 3.XX.Y.
PROMETHEUS_TAGS=remove_all_sd
prometheus_ldflags() {
    local v="${PROMETHEUS_VERSION#v0.}" minor
    minor="${v%%.*}"; minor="$((10#${minor#3}))"
    echo "-s -w -X github.com/prometheus/common/version.Version=3.$minor.${v#*.} -X github.com/prometheus/common/version.Branch=release"
}

# build_tool MODULE_DIR PACKAGE OUTPUT LDFLAGS [TAGS]   (MODULE_DIR relative to go/, or absolute)
build_tool() {
    local moddir="$HT_CONTROLPLANE_DIR/go/$1" pkg="$2" out="$3" ldflags="$4" tags="${5:-}"
    case "$1" in /*) moddir="$1" ;; esac
    local start=$SECONDS
    log "building $(basename "$out") from $pkg (first run only; kube-apiserver takes ~10+ min on 2 cores)"
    mkdir -p "$(dirname "$out")"
    (
        cd "$moddir"
        # -mod=readonly: fail instead of silently editing the committed go.mod/go.sum.
        GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0 \
            ht_go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out.tmp.$$" "$pkg"
    )
    mv -f "$out.tmp.$$" "$out"
    log "built $out in $((SECONDS - start))s"
}

link() { mkdir -p "$HT_BIN"; ln -sfn "$1" "$HT_BIN/$(basename "$1")"; }

# build_pause_image: the pause program as a one-layer OCI image archive
# ($HT_PAUSE_IMAGE, named $HT_PAUSE_IMAGE_NAME), laid out like the project's
# images: blobs/sha256/{layer,config,manifest}, index.json with the
# io.containerd.image.name annotation, oci-layout. Reproducible (mtime 0).
build_pause_image() {
    local tmp out="$HT_PAUSE_IMAGE" ld cd md ls cs ms
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/rootfs" "$tmp/oci/blobs/sha256"
    build_tool "$HT_NODE_DIR/pause" . "$tmp/rootfs/pause" "-s -w"
    chmod 755 "$tmp/rootfs/pause"
    blob() { # blob FILE: move FILE into blobs/, print "DIGEST SIZE"
        local d s
        d="$(sha256sum "$1" | cut -d' ' -f1)"; s="$(stat -c %s "$1")"
        mv "$1" "$tmp/oci/blobs/sha256/$d"
        echo "$d $s"
    }
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$tmp/rootfs" -cf "$tmp/layer.tar" .
    read -r ld ls < <(blob "$tmp/layer.tar")
    printf '{"architecture":"amd64","os":"linux","config":{"User":"65535:65535","Entrypoint":["/pause"],"WorkingDir":"/","Labels":{"org.opencontainers.image.title":"high-templar test pause"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"tests/controlplane/ensure-tools.sh pause"}]}' \
        "$ld" >"$tmp/config.json"
    read -r cd cs < <(blob "$tmp/config.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$cd" "$cs" "$ld" "$ls" >"$tmp/manifest.json"
    read -r md ms < <(blob "$tmp/manifest.json")
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
        "$md" "$ms" "$HT_PAUSE_IMAGE_NAME" "$PAUSE_VERSION" >"$tmp/oci/index.json"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$tmp/oci/oci-layout"
    mkdir -p "$(dirname "$out")"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$tmp/oci" -cf "$out.tmp.$$" oci-layout index.json blobs
    mv -f "$out.tmp.$$" "$out"
    rm -rf "$tmp"
    log "built $out ($HT_PAUSE_IMAGE_NAME)"
}

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
        kubelet)
            [ -x "$HT_KUBELET" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kubelet "$HT_KUBELET" "$(kube_ldflags)"
            link "$HT_KUBELET" ;;
        kube-proxy)
            [ -x "$HT_KUBE_PROXY" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kube-proxy "$HT_KUBE_PROXY" "$(kube_ldflags)"
            link "$HT_KUBE_PROXY" ;;
        kube-scheduler)
            [ -x "$HT_KUBE_SCHEDULER" ] || build_tool kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler "$HT_KUBE_SCHEDULER" "$(kube_ldflags)"
            link "$HT_KUBE_SCHEDULER" ;;
        coredns)
            [ -x "$HT_COREDNS" ] || build_tool coredns . "$HT_COREDNS" "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
            link "$HT_COREDNS" ;;
        pause)
            [ -s "$HT_PAUSE_IMAGE" ] || build_pause_image ;;
        helm)
            [ -x "$HT_HELM" ] || build_tool helm helm.sh/helm/v3/cmd/helm "$HT_HELM" \
                "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor"
            link "$HT_HELM" ;;
        promtool)
            [ -x "$HT_PROMTOOL" ] || build_tool prometheus github.com/prometheus/prometheus/cmd/promtool "$HT_PROMTOOL" \
                "$(prometheus_ldflags)" "$PROMETHEUS_TAGS"
            link "$HT_PROMTOOL" ;;
        prometheus)
            [ -x "$HT_PROMETHEUS" ] || build_tool prometheus github.com/prometheus/prometheus/cmd/prometheus "$HT_PROMETHEUS" \
                "$(prometheus_ldflags)" "$PROMETHEUS_TAGS"
            link "$HT_PROMETHEUS" ;;
        *)
            log "unknown tool '$tool' (known: ${NODE_TOOLS[*]}, or node)"; exit 2 ;;
    esac
done
