#!/usr/bin/env bash
# Installs, only when missing, the third-party tools the deploy tests drive for real: Debian's Prometheus
# (prometheus + promtool), and into the project's venv PyYAML, TorchServe + torch-model-archiver and the Triton
# gRPC client. None of them is a ConceptLens dependency, so they stay out of requirements*.txt.
# Idempotent: a second run installs nothing. tests/deploy/conftest.py runs it once per test session; CI may also
# run it ahead of `make test`. Every step is tried; the exit code says whether any failed (the tests that need a
# tool that is still missing skip and quote this script's output).
# Usage: tests/deploy/install_tools.sh [path/to/venv/python]   (default .venv/bin/python)
set -uo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-.venv/bin/python}"
failed=0

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  export DEBIAN_FRONTEND=noninteractive
  # Try the cached package lists first; refresh them only if that fails.
  { $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }; } \
    || { echo "install_tools: could not apt-get install prometheus" >&2; failed=1; }
fi

pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check "$@" || { echo "install_tools: pip install $* failed" >&2; failed=1; }
}
"$PY" -c "import yaml" 2>/dev/null || pip_install pyyaml
"$PY" -c "import ts, model_archiver" 2>/dev/null || pip_install torchserve torch-model-archiver
# tritonclient pins protobuf<7 and would downgrade the project's protobuf; its gRPC client runs on ours, so it
# is installed without dependencies (plus the one it imports that we lack).
"$PY" -c "import rapidjson" 2>/dev/null || pip_install python-rapidjson
"$PY" -c "import tritonclient.grpc" 2>/dev/null || pip_install --no-deps "tritonclient[grpc]"
command -v java >/dev/null || { echo "install_tools: TorchServe needs Java 17+ (apt-get install openjdk-17-jre-headless)" >&2; failed=1; }
exit $failed
