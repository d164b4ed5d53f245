#!/usr/bin/env bash
# vmitrace set-up on Debian 12: installs everything, then runs what was asked.
#   ./setup.sh demo   install, then boot a lab guest, trace it, write Parquet, print a summary
#   ./setup.sh test   install, then run the whole test suite
#   ./setup.sh        install only
# Downloads are cached under ~/.cache/vmitrace (override with VMITRACE_CACHE).
set -euo pipefail
cd "$(dirname "$0")"
REPO=$PWD
export VMITRACE_CACHE=${VMITRACE_CACHE:-$HOME/.cache/vmitrace}
mkdir -p "$VMITRACE_CACHE"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages (QEMU 10 from bookworm-backports; never trixie) -----------------------
DEBS="gcc gcc-multilib make pkg-config libglib2.0-dev busybox-static cpio xz-utils zstd lz4 python3-venv
      python3-dev openjdk-17-jre-headless maven strace file bpftool jq linux-libc-dev"
BACKPORTS_LIST=/etc/apt/sources.list.d/vmitrace-bookworm-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding bookworm-backports"
  echo "deb http://deb.debian.org/debian bookworm-backports main" | $SUDO tee "$BACKPORTS_LIST" >/dev/null
  rm -f "$VMITRACE_CACHE/apt-updated"
fi
missing=""
for p in $DEBS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
qemu_ok=0
if command -v qemu-system-x86_64 >/dev/null; then
  qemu-system-x86_64 --version | grep -q 'version 1[0-9]\.' && qemu_ok=1
fi
if [ -n "$missing" ] || [ $qemu_ok -eq 0 ]; then
  if [ ! -f "$VMITRACE_CACHE/apt-updated" ] || [ -n "$(find "$VMITRACE_CACHE/apt-updated" -mmin +1440)" ]; then
    log "apt-get update"; $SUDO apt-get update -q >&2 && touch "$VMITRACE_CACHE/apt-updated"
  fi
  [ -z "$missing" ] || { log "installing:$missing"; $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >&2; }
  [ $qemu_ok -eq 1 ] || { log "installing qemu-system-x86 from bookworm-backports"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86 >&2; }
fi

# --- Python environment (PyPI) --------------------------------------------------------------
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then log "creating .venv"; "$PY" -m venv .venv; fi
export PIP_CACHE_DIR="$VMITRACE_CACHE/pip"
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  log "installing Python packages"
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -e '.[test]' >&2
  rm -f .venv/.installed-*; touch "$stamp"
fi

# --- component steps (guest lab, Kafka jars, ...): each file in scripts/setup.d runs in order
for step in scripts/setup.d/*.sh; do [ -e "$step" ] && { log "step $(basename "$step")"; . "$step"; }; done

# --- the QEMU KVMI host plugin (C) ----------------------------------------------------------
if [ -f qemu-kvmi-plugin/Makefile ]; then
  log "building the QEMU KVMI plugin"; make -s -C qemu-kvmi-plugin >&2
fi

export PATH="$REPO/.venv/bin:$PATH"
case "${1:-}" in
  demo) shift; exec vmitrace demo "$@" ;;
  test) shift; exec python -m pytest "$@" ;;
  "") log "installed; run: .venv/bin/vmitrace --help" ;;
  *) echo "usage: $0 [demo|test] [args...]" >&2; exit 2 ;;
esac
