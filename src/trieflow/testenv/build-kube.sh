#!/usr/bin/env bash
# Build the Kubernetes 1.20.2 control plane (apiserver, controller-manager, scheduler,
# kubectl) from Debian's `kubernetes` source package, once, into the user's cache.
#
# Why from source: Debian 12 ships the full 1.20.2 tree (with vendor/) but no server
# binaries, and no other registry is reachable. The vendored reflect2 1.0.1 makes the
# apiserver panic on custom-resource creates under Go 1.19, so Debian's 1.0.2 replaces it,
# together with Debian's json-iterator 1.1.12 made for it. Under Go >= 1.16 the vendored
# go-openapi/validate takes "" for null and rejects empty strings in custom resources;
# the same one-line fix as upstream's (kube-openapi#230, shipped in 1.21) is applied to both
# vendored copies.
#
# Usage: build-kube.sh DEST  (binaries land in DEST/bin). Idempotent: exits at once when
# the binaries are already there.
set -euo pipefail

KUBE_VERSION=1.20.2
DEST="${1:?usage: build-kube.sh DEST}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

have_all() {
  for b in "${BINARIES[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
}
if have_all; then
  echo "kubernetes $KUBE_VERSION: cached in $DEST/bin"
  exit 0
fi
# One build at a time per destination: a second caller waits, then finds the binaries.
mkdir -p "$(dirname "$DEST")"
exec 9>"$DEST.lock"
flock 9
if have_all; then
  echo "kubernetes $KUBE_VERSION: built meanwhile into $DEST/bin"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

ensure_apt() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

ensure_deb_src() {
  if ! grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' \
      'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' |
      $SUDO tee /etc/apt/sources.list.d/trieflow-src.sources >/dev/null
    $SUDO apt-get update -qq
  fi
}

ensure_apt golang-go make rsync golang-github-modern-go-reflect2-dev \
  golang-github-json-iterator-go-dev dpkg-dev ca-certificates
ensure_deb_src

WORK="$DEST.build"
rm -rf "$WORK"
mkdir -p "$WORK"
cd "$WORK"
apt-get source --download-only "kubernetes=$KUBE_VERSION*" >/dev/null 2>&1 || apt-get source --download-only kubernetes
dpkg-source --no-check -x kubernetes_*.dsc src >/dev/null
cd src

# Debian's reflect2 1.0.2 and json-iterator 1.1.12 instead of the vendored pair.
for module in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  rm -rf "vendor/$module"
  rsync -a --exclude '*_test.go' --exclude 'go.mod' --exclude 'go.sum' \
    "/usr/share/gocode/src/$module/" "vendor/$module/"
done

# go-openapi/validate and kube-openapi's copy of it: an empty string is a string, not null
# (kubernetes#99804).
for validate_go in vendor/github.com/go-openapi/validate/type.go \
  vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go; do
  perl -pi -e 's/\Qif data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data)) {\E/if data == nil {/' "$validate_go"
  if grep -q 'reflect.DeepEqual(reflect.Zero' "$validate_go"; then
    echo "build-kube.sh: could not patch the zero-value check in $validate_go" >&2
    exit 1
  fi
done

export GOFLAGS=-mod=vendor GOCACHE="$WORK/gocache" GOPATH="$WORK/gopath"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubectl" \
  KUBE_BUILD_PLATFORMS=linux/amd64 CGO_ENABLED=0

mkdir -p "$DEST/bin.tmp"
for b in "${BINARIES[@]}"; do
  cp "$(find _output -type f -name "$b" -perm -u+x | head -n 1)" "$DEST/bin.tmp/$b"
done
rm -rf "$DEST/bin"
mv "$DEST/bin.tmp" "$DEST/bin"
cd /
rm -rf "$WORK"
echo "kubernetes $KUBE_VERSION: built into $DEST/bin"
