#!/usr/bin/env bash
# Programs the tests take from Debian's packages rather than building: Prometheus (evaluates the Grafana
# dashboard's PromQL against a real training run). Installs only what is missing.
set -euo pipefail
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
[[ ${#missing[@]} -eq 0 ]] && exit 0
echo "[system-tools] installing ${missing[*]} from Debian's packages" >&2
SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# --no-install-recommends keeps out the exporters; policy-rc.d stops the package from starting a service.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
