# shellcheck shell=bash
# Sourced by deploy/check and examples/run-all: a Python venv with deploy/requirements.txt, kept
# under a cache directory and rebuilt only when the requirements change (sets $VENV), and apt_install.
# SIGRUN_TOOLS_CACHE picks the cache directory (default ~/.cache/sigrun-tools).
sigrun_venv() {
  local repo=$1
  local cache=${SIGRUN_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sigrun-tools}
  local requirements=$repo/deploy/requirements.txt
  local stamp
  stamp=$(sha256sum "$requirements" | cut -c1-16)
  VENV=$cache/venv-$stamp
  if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
    echo "deploy: creating $VENV" >&2
    rm -rf "$VENV"
    mkdir -p "$cache"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    touch "$VENV/.complete"
  fi
}

# Installs Debian packages that are missing (apt lists refreshed first: a new machine may have none).
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
