#!/bin/sh
# Regenerate task_job/bridges/taskscheduler_pb2*.py from taskscheduler.proto (checked in, so an
# install needs only grpcio and protobuf). Needs grpcio-tools: pip install -e '.[dev]'.
set -eu
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \
    task_job/bridges/taskscheduler.proto
