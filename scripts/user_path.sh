#!/usr/bin/env bash
# End-to-end user path through the command line, on whatever device `auto` picks (a GPU when
# there is one): train the tiny model, resume it, convert to the released format, generate,
# evaluate and analyse. Used to check the GPU paths of every command in one call:
#   bash scripts/user_path.sh [OUT_DIR]     (OUT_DIR defaults to a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R=${1:-$(mktemp -d)}
STEPS=${STEPS:-60}
dsm() { echo "+ deepseekmoe $*"; python3 -m deepseekmoe "$@"; }
dsm train --out "$R/run" --train.steps="$STEPS" --eval.every=$((STEPS / 2)) --checkpoint.every=$((STEPS / 2)) --log.every=10
# kill-free resume: a second invocation continues from the last checkpoint to more steps
dsm train --resume "$R/run" --train.steps=$((STEPS + 20)) --eval.every=$((STEPS / 2)) --checkpoint.every=$((STEPS / 2))
dsm convert "$R/run" "$R/hf"
dsm generate --model "$R/hf" --prompt "The old man" --prompt "It was" --max-new-tokens 24 --temperature 0
dsm eval --model "$R/run" --tasks lm --limit 32 --max-length 256
dsm analyze --model "$R/run" --seq-len 256 --limit 16 --out "$R/analyze"
ls "$R/run" "$R/hf" "$R/analyze"
echo "user path OK ($R)"
