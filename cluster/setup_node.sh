#!/usr/bin/env bash
# Sets up rayft on a CUDA node at the versions requirements/gpu.txt pins: cluster.yaml's
# setup_commands and cluster/kuberay/Dockerfile run it.
#
#     bash cluster/setup_node.sh [REPO]        (REPO: this checkout; PYTHON: python by default)
#
# The project and its runtime go first (torch among them), then each GPU extra of pyproject.toml on
# its own. One that fails to build or install stops the set-up, named: a node without it would
# still take jobs and run them without it (no vLLM, no flash-attention), and nobody would know.
set -euo pipefail

repo="$(cd "${1:-$(dirname "$0")/..}" && pwd)"
python="${PYTHON:-python}"
install=("$python" -m pip install -q -c "$repo/requirements/gpu.txt")

"${install[@]}" -e "$repo"

extras="$("$python" - "$repo/pyproject.toml" <<'EOF'
import sys
import tomllib

from packaging.requirements import Requirement

with open(sys.argv[1], "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
print(" ".join(Requirement(r).name for r in extra))
EOF
)"

for extra in $extras; do
  # flash-attn compiles against the torch installed above: no isolated build environment.
  if ! "${install[@]}" --no-build-isolation "$extra"; then
    echo "setup_node.sh: the GPU extra '$extra' failed to install (pip's error above);" \
      "this node is not set up. Fix it or change its pin in requirements/gpu.txt." >&2
    exit 1
  fi
done
echo "setup_node.sh: rayft and its GPU extras ($extras) installed"
