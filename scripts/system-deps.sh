#!/usr/bin/env bash
# Installs the system packages the tests use, from Debian's archive, when they are missing:
# chromium (the browser tests drive it through Playwright) and postgresql (the storage tests start a
# throw-away cluster on loopback). Idempotent; needs root or sudo the first time only.
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "system-deps: need root or sudo to install: ${need[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "system-deps: installing ${need[*]} from Debian's archive"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
