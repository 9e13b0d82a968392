#!/usr/bin/env bash
# Builds the real components the test suite runs against, from the Go module proxy, into
# ~/.cache/kontext-lora/bin (override with KONTEXT_LORA_CACHE). Each component is built from a small
# throw-away wrapper module outside the repo, because `go install module@version` refuses modules whose
# go.mod carries `replace` lines (k8s.io/kubernetes and etcd's server both do). A component whose stamp
# file matches the pinned version is skipped, so warm runs cost nothing.
#
# Usage: build_binaries.sh [component ...]   (default: all)
set -euo pipefail

KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
MINIO_VERSION="${MINIO_VERSION:-v0.0.0-20260212201848-7aac2a2c5b7c}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"

CACHE="${KONTEXT_LORA_CACHE:-$HOME/.cache/kontext-lora}"
BIN="$CACHE/bin"
WORK="$CACHE/build"
GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
export GOPROXY GOFLAGS="-buildvcs=false -trimpath" CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$HOME/.cache/go-build}" GOMODCACHE="${GOMODCACHE:-$HOME/.cache/go-mod}"
mkdir -p "$BIN" "$WORK"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

command -v go >/dev/null || { log "Go is required (https://go.dev/dl or the distribution's golang package)"; exit 1; }

# up_to_date NAME VERSION BINARY...: true when every binary exists and NAME's stamp names VERSION.
up_to_date() {
  local name=$1 version=$2; shift 2
  [[ "$(cat "$BIN/.$name.version" 2>/dev/null)" == "$version" ]] || return 1
  local b; for b in "$@"; do [[ -x "$BIN/$b" ]] || return 1; done
}
stamp() { echo "$2" > "$BIN/.$1.version"; }

# new_module NAME: a fresh wrapper module directory; prints its path.
new_module() {
  local dir="$WORK/$1"
  rm -rf "$dir"; mkdir -p "$dir"
  (cd "$dir" && go mod init "kontext-lora.local/build/$1" >/dev/null 2>&1)
  echo "$dir"
}

build_kubernetes() {
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  up_to_date kubernetes "$KUBERNETES_VERSION" "${bins[@]}" && { log "kubernetes $KUBERNETES_VERSION: cached"; return; }
  log "kubernetes $KUBERNETES_VERSION: building ${bins[*]}"
  local dir staging_version minor
  dir=$(new_module kubernetes)
  minor=${KUBERNETES_VERSION#v1.}
  staging_version="v0.${minor}"
  # Map every staging module that k8s.io/kubernetes replaces with ./staging/... to its published v0.x.y.
  local mod
  mod=$(curl -fsSL "${GOPROXY%%,*}/k8s.io/kubernetes/@v/$KUBERNETES_VERSION.mod")
  (
    cd "$dir"
    go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
    grep -oE 'k8s\.io/[a-z0-9-]+ => \./staging' <<<"$mod" | awk '{print $1}' | while read -r m; do
      go mod edit -replace="$m=$m@$staging_version"
    done
    cat > tools.go <<GO
//go:build tools
package tools
import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    go mod tidy -e >/dev/null 2>&1 || true
    local pkg=k8s.io/component-base/version
    local ld="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=${minor%%.*} -X $pkg.gitTreeState=clean"
    ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=${minor%%.*}"
    go build -ldflags "$ld" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
  )
  stamp kubernetes "$KUBERNETES_VERSION"
}

build_etcd() {
  up_to_date etcd "$ETCD_VERSION" etcd && { log "etcd $ETCD_VERSION: cached"; return; }
  log "etcd $ETCD_VERSION: building"
  local dir; dir=$(new_module etcd)
  (
    cd "$dir"
    # The server module replaces its siblings with ../ paths; pin them to the same release instead.
    for m in server/v3 api/v3 client/pkg/v3 client/v3 pkg/v3; do
      go mod edit -require="go.etcd.io/etcd/$m@$ETCD_VERSION"
    done
    printf '//go:build tools\npackage tools\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    go mod tidy -e >/dev/null 2>&1 || true
    go build -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3
  )
  stamp etcd "$ETCD_VERSION"
}

build_simple() {  # NAME VERSION MODULE PACKAGE BINARY [LDFLAGS]
  local name=$1 version=$2 module=$3 package=$4 binary=$5 ldflags=${6:-}
  up_to_date "$name" "$version" "$binary" && { log "$name $version: cached"; return; }
  log "$name $version: building"
  local dir; dir=$(new_module "$name")
  (
    cd "$dir"
    go mod edit -require="$module@$version"
    printf '//go:build tools\npackage tools\nimport _ "%s"\n' "$package" > tools.go
    go mod tidy -e >/dev/null 2>&1 || true
    go build -ldflags "-s -w $ldflags" -o "$BIN/$binary" "$package"
  )
  stamp "$name" "$version"
}

# The Prometheus operator's ServiceMonitor/PodMonitor/PrometheusRule CRDs (the chart's monitoring objects are dry-run
# applied against them): YAML files of the github.com/prometheus-operator/prometheus-operator Go module.
fetch_monitoring_crds() {
  local kinds=(servicemonitors podmonitors prometheusrules) crds="$CACHE/crds"
  local want="$PROMETHEUS_OPERATOR_VERSION ${kinds[*]}"
  [[ "$(cat "$crds/.monitoring.version" 2>/dev/null)" == "$want" ]] && { log "monitoring-crds $want: cached"; return; }
  log "monitoring-crds $PROMETHEUS_OPERATOR_VERSION: downloading the prometheus-operator module"
  local dir; dir=$(new_module monitoring-crds)
  local src; src=$(cd "$dir" && go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  mkdir -p "$crds"
  local kind; for kind in "${kinds[@]}"; do
    cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$crds/"
  done
  chmod u+w "$crds"/*.yaml
  echo "$want" > "$crds/.monitoring.version"
}

components=("$@")
[[ ${#components[@]} -gt 0 ]] || components=(etcd kubernetes kwok minio helm monitoring-crds)
for c in "${components[@]}"; do
  start=$SECONDS
  case "$c" in
    kubernetes) build_kubernetes ;;
    etcd) build_etcd ;;
    kwok) build_simple kwok "$KWOK_VERSION" sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok kwok ;;
    helm) build_simple helm "$HELM_VERSION" helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm helm \
            "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean" ;;
    monitoring-crds) fetch_monitoring_crds ;;
    minio) build_simple minio "$MINIO_VERSION" github.com/minio/minio github.com/minio/minio minio ;;
    *) log "unknown component: $c"; exit 2 ;;
  esac
  log "$c: $((SECONDS - start))s"
done
