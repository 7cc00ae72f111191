#!/usr/bin/env bash
# Builds OCI image archives of the gateway and the operator without a
# container engine: the release binary, the shared libraries `ldd` lists for
# it, CA certificates, passwd/group with root and nonroot (65532), /tmp and
# /home/nonroot, in one uncompressed layer. The same inputs (binaries, host
# libraries and CA bundle, version, repository, revision, SOURCE_DATE_EPOCH)
# give byte-identical archives, hence the same digests. See images/README.md.
#
#   images/build.sh [--build] [--out DIR] [--version V] [--repository PREFIX]
#                   [--revision REV] [--bin-dir DIR] [gateway|operator ...]
set -euo pipefail

usage() {
  cat <<'EOF'
usage: images/build.sh [options] [gateway|operator ...]   (default: both)

  --out DIR            where to write the archives (default: target/images)
  --version V          image tag (default: the workspace version in Cargo.toml)
  --repository PREFIX  name prefix, e.g. registry.example/ (default: docker.io/library/)
  --revision REV       org.opencontainers.image.revision label (default: git HEAD, if any)
  --bin-dir DIR        directory of the release binaries (default: target/release)
  --build              run `cargo build --release --locked` for the images first
  -h, --help           this text

Writes DIR/high-templar-<image>-<version>.oci.tar (an OCI image layout) and
prints the image name and manifest digest of each. Timestamps come from
SOURCE_DATE_EPOCH (default 0).
EOF
}

die() {
  echo "images/build.sh: $*" >&2
  exit 1
}

repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/target/images"
bin_dir="$repo/target/release"
version=""
prefix="docker.io/library/"
revision=""
revision_set=0
build=0
images=()

while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
    --version) [ $# -ge 2 ] || die "--version needs a value"; version=$2; shift 2 ;;
    --repository) [ $# -ge 2 ] || die "--repository needs a value"; prefix=$2; shift 2 ;;
    --revision) [ $# -ge 2 ] || die "--revision needs a value"; revision=$2; revision_set=1; shift 2 ;;
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_dir=$2; shift 2 ;;
    --build) build=1; shift ;;
    -h | --help) usage; exit 0 ;;
    gateway | operator) images+=("$1"); shift ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[ ${#images[@]} -gt 0 ] || images=(gateway operator)

for tool in tar sha256sum ldd find sort stat; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required but not installed"
done
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is required (apt-get install tar)"

epoch=${SOURCE_DATE_EPOCH:-0}
[[ "$epoch" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be a number of seconds, not '$epoch'"
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

# `key = "value"` of a TOML file, optionally only inside [section].
toml_value() { # file key [section]
  awk -v key="$2" -v section="${3:-}" '
    /^\[/ { current = $0; gsub(/^\[|\]$/, "", current); next }
    (section == "" || current == section) && $1 == key && $2 == "=" {
      value = $0; sub(/^[^=]*=[ \t]*"/, "", value); sub(/".*$/, "", value); print value; exit
    }' "$1"
}

workspace_version=$(toml_value "$repo/Cargo.toml" version workspace.package)
[ -n "$version" ] || version=$workspace_version
[ -n "$version" ] || die "no version: pass --version or set [workspace.package] version in Cargo.toml"
[[ "$version" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$ ]] || die "'$version' is not a valid image tag"
source_url=$(toml_value "$repo/Cargo.toml" repository workspace.package)
licenses=$(toml_value "$repo/Cargo.toml" license workspace.package)
if [ "$revision_set" = 0 ] && git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  revision=$(git -C "$repo" rev-parse HEAD)
fi
prefix=${prefix%/}
[ -z "$prefix" ] || prefix="$prefix/"

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) die "unsupported machine $(uname -m)" ;;
esac

if [ "$build" = 1 ]; then
  packages=()
  for image in "${images[@]}"; do packages+=(-p "high-templar-$image"); done
  (cd "$repo" && cargo build --release --locked "${packages[@]}")
fi
for image in "${images[@]}"; do
  name="high-templar-$image"
  [ -x "$bin_dir/$name" ] || die "$bin_dir/$name not found: build it with
  cargo build --release --locked -p $name
(or run images/build.sh --build)"
done

ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || die "$ca_bundle not found: install Debian's CA certificates (apt-get install ca-certificates)"

work=$(mktemp -d "${TMPDIR:-/tmp}/ht-images.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd)

# A JSON string (the values here have no control characters).
json_str() {
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# Deterministic tar: the given entries in the given order, no recursion, fixed
# mtime, numeric owner, ustar headers (no pax records with times).
tar_entries() { # mode(create|append) archive dir uid list
  tar "--$1" --file "$2" -C "$3" --no-recursion --verbatim-files-from --files-from "$5" \
    --format=ustar --numeric-owner --owner="$4" --group="$4" --mtime="@$epoch"
}

# The sorted entries of DIR into ARCHIVE, owned by 0:0 except /home/nonroot.
tar_tree() { # dir archive
  local list="$work/entries" chunk="$work/chunk" mode=create owner="" path entry_owner
  (cd "$1" && find . -mindepth 1 -printf '%P\n') | LC_ALL=C sort >"$list"
  : >"$chunk"
  while IFS= read -r path; do
    case "$path" in
      home/nonroot | home/nonroot/*) entry_owner=65532 ;;
      *) entry_owner=0 ;;
    esac
    if [ -n "$owner" ] && [ "$entry_owner" != "$owner" ]; then
      tar_entries "$mode" "$2" "$1" "$owner" "$chunk"
      mode=append
      : >"$chunk"
    fi
    owner=$entry_owner
    printf '%s\n' "$path" >>"$chunk"
  done <"$list"
  [ ! -s "$chunk" ] || tar_entries "$mode" "$2" "$1" "$owner" "$chunk"
}

# Writes FILE into the layout's blobs; prints "sha256:<hex> <size>".
add_blob() { # layout file
  local hex size
  hex=$(sha256sum "$2" | cut -d' ' -f1)
  size=$(stat -c %s "$2")
  install -m 0644 "$2" "$1/blobs/sha256/$hex"
  printf 'sha256:%s %s\n' "$hex" "$size"
}

# The shared objects the binary needs, as `ldd` resolves them on this host.
shared_objects() { # binary
  local listing
  if ! listing=$(ldd "$1" 2>&1); then
    case "$listing" in
      *"not a dynamic executable"* | *"statically linked"*) return 0 ;;
      *) die "ldd $1 failed: $listing" ;;
    esac
  fi
  if grep -q 'not found' <<<"$listing"; then
    die "ldd $1: missing libraries:
$(grep 'not found' <<<"$listing")"
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$listing" | LC_ALL=C sort -u
}

build_image() { # gateway|operator
  local image=$1 name="high-templar-$1" cmd description ref archive
  case "$image" in
    gateway) cmd=serve ;;
    operator) cmd=run ;;
  esac
  description=$(toml_value "$repo/$image/Cargo.toml" description)
  ref="$prefix$name:$version"
  archive="$out/$name-$version.oci.tar"

  local root="$work/$image/rootfs" layout="$work/$image/layout"
  mkdir -p "$work/$image"
  install -d -m 0755 "$root" "$root/etc" "$root/etc/ssl" "$root/etc/ssl/certs" "$root/home" \
    "$root/usr" "$root/usr/local" "$root/usr/local/bin"
  install -d -m 0755 "$root/home/nonroot"
  install -d -m 1777 "$root/tmp"
  chmod 1777 "$root/tmp"
  install -m 0755 "$bin_dir/$name" "$root/usr/local/bin/$name"
  install -m 0644 "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
  printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
    'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$root/etc/group"
  # Without it glibc asks DNS before /etc/hosts (distroless ships the same line).
  printf '%s\n' 'hosts: files dns' >"$root/etc/nsswitch.conf"
  chmod 0644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"

  local libs lib dir
  libs=$(shared_objects "$bin_dir/$name")
  while IFS= read -r lib; do
    [ -n "$lib" ] || continue
    dir=$(dirname "$lib")
    # Each missing parent directory as 0755, then the library's content
    # (symlinks followed) at the path the loader resolved it to.
    local parent="" part
    IFS=/ read -r -a parts <<<"${dir#/}"
    for part in "${parts[@]}"; do
      parent="$parent/$part"
      [ -d "$root$parent" ] || install -d -m 0755 "$root$parent"
    done
    install -m 0755 "$lib" "$root$lib"
  done <<<"$libs"

  local layer="$work/$image/layer.tar"
  tar_tree "$root" "$layer"

  install -d -m 0755 "$layout" "$layout/blobs" "$layout/blobs/sha256"
  local blob layer_digest layer_size
  blob=$(add_blob "$layout" "$layer")
  read -r layer_digest layer_size <<<"$blob"

  local labels
  labels="\"org.opencontainers.image.description\":$(json_str "$description"),"
  labels+="\"org.opencontainers.image.licenses\":$(json_str "$licenses"),"
  if [ -n "$revision" ]; then
    labels+="\"org.opencontainers.image.revision\":$(json_str "$revision"),"
  fi
  labels+="\"org.opencontainers.image.source\":$(json_str "$source_url"),"
  labels+="\"org.opencontainers.image.title\":$(json_str "$name"),"
  labels+="\"org.opencontainers.image.version\":$(json_str "$version")"

  local config="$work/$image/config.json"
  {
    printf '{"created":"%s","architecture":"%s","os":"linux",' "$created" "$arch"
    printf '"config":{"User":"65532:65532","ExposedPorts":{"8080/tcp":{}},'
    printf '"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],'
    printf '"Entrypoint":["/usr/local/bin/%s"],"Cmd":["%s"],"WorkingDir":"/home/nonroot",' "$name" "$cmd"
    printf '"Labels":{%s}},' "$labels"
    printf '"rootfs":{"type":"layers","diff_ids":["%s"]},' "$layer_digest"
    printf '"history":[{"created":"%s","created_by":"images/build.sh %s"}]}' "$created" "$image"
  } >"$config"
  local config_digest config_size
  blob=$(add_blob "$layout" "$config")
  read -r config_digest config_size <<<"$blob"

  local manifest="$work/$image/manifest.json"
  {
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    printf '"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},' \
      "$config_digest" "$config_size"
    printf '"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
      "$layer_digest" "$layer_size"
  } >"$manifest"
  local manifest_digest manifest_size
  blob=$(add_blob "$layout" "$manifest")
  read -r manifest_digest manifest_size <<<"$blob"

  printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
  {
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json",'
    printf '"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,' \
      "$manifest_digest" "$manifest_size"
    printf '"platform":{"architecture":"%s","os":"linux"},' "$arch"
    printf '"annotations":{"io.containerd.image.name":%s,"org.opencontainers.image.ref.name":%s}}]}' \
      "$(json_str "$ref")" "$(json_str "$version")"
  } >"$layout/index.json"
  chmod 0644 "$layout/oci-layout" "$layout/index.json"

  local tmp_archive="$work/$image/image.tar"
  tar_tree "$layout" "$tmp_archive"
  mv -f "$tmp_archive" "$archive"

  printf '%s %s %s (%s bytes)\n' "$ref" "$manifest_digest" "$archive" "$(stat -c %s "$archive")"
}

for image in "${images[@]}"; do
  build_image "$image"
done
