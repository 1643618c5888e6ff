#!/usr/bin/env bash
# Install what tests/s3_server.py needs for its throwaway single-node Ceph cluster (mon + memstore osd +
# radosgw) on Debian/Ubuntu. Idempotent: a quick no-op when the binaries are already there.
set -euo pipefail

PACKAGES=(ceph-mon ceph-osd radosgw ceph-common)
BINARIES=(ceph-mon ceph-osd radosgw radosgw-admin ceph-authtool monmaptool)

missing=0
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || missing=1
done
if [[ $missing -eq 0 ]]; then
    echo "s3-deps: ceph binaries already installed"
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"

for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || { echo "s3-deps: $b still missing after install" >&2; exit 1; }
done
echo "s3-deps: installed ${PACKAGES[*]}"
