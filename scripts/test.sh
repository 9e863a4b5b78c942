#!/usr/bin/env bash
# Set everything up, then run the whole test suite (real sshd, uvicorn and runtimes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
