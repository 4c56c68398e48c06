#!/usr/bin/env bash
# Every notebook's t4 preset on a bare GPU machine (torch, transformers, peft, accelerate and
# nothing else of ours), capped to a T4's memory, in one go (~5-8 min). Writes $OUT/gpu_check.json.
#
# Prepare once, where the course is set up (writes .gpu/: SmolLM2's config and tokenizer, the
# data's token lengths, the pinned bitsandbytes wheel; ~44 MiB, git-ignored):
#     .venv/bin/python benchmarks/gpu_check.py --prepare
# then carry .gpu to the GPU machine and run this script there (see benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! ls .gpu/wheels/bitsandbytes-*.whl >/dev/null 2>&1 || [ ! -f .gpu/model-shape/token_lengths.json ]; then
    echo ".gpu/ is incomplete: run 'python benchmarks/gpu_check.py --prepare' where the course is set up, and carry .gpu" >&2
    exit 2
fi
# Unpack the carried wheel (a zip) beside the machine's packages, not into them: no pip, no network.
SITE=$(mktemp -d)
"$PYTHON" -m zipfile -e .gpu/wheels/bitsandbytes-*.whl "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PYTHON" -c "import torch, transformers, peft, accelerate, bitsandbytes; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
exec "$PYTHON" benchmarks/gpu_check.py "$@"
