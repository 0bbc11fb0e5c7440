#!/usr/bin/env bash
# Regenerates gen/ from proto/: Python (messages, gRPC stubs, .pyi) with the pinned
# grpcio-tools, TypeScript (protobuf-es) with buf. Usage: scripts/gen.sh [OUT_DIR]
# OUT_DIR defaults to gen/; check-gen passes a temporary folder named gen and compares.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/gen}
py=${PYTHON:-$root/.venv/bin/python}
cd "$root"

rm -rf "$out/python" "$out/ts"
mkdir -p "$out/python"
mapfile -t protos < <(cd proto && find copilot -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out/python" --pyi_out="$out/python" \
  --grpc_python_out="$out/python" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$py")/protoc-gen-mypy_grpc" \
  --mypy_grpc_out="$out/python" \
  "${protos[@]}" 2> >(grep -v "^Writing mypy" >&2)
# Packages, so the stubs import as copilot.v1.*_pb2.
find "$out/python/copilot" -type d -exec sh -c 'for d; do : > "$d/__init__.py"; done' _ {} +
: > "$out/python/copilot/py.typed"

# buf.gen.yaml writes to gen/ts below --output.
[ "$(basename "$out")" = gen ] || { echo "OUT_DIR must be named gen" >&2; exit 2; }
npx --no-install buf generate --output "$(dirname "$out")"
