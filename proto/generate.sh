#!/usr/bin/env sh
# Regenerates the Python gRPC/protobuf modules beside the .proto files.
# Usage: proto/generate.sh [OUT_DIR]   (run from the repository root; OUT_DIR defaults to proto)
set -eu
out="${1:-proto}"
python="${PYTHON:-python}"
"$python" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/trieflow/v1/*.proto
