#!/usr/bin/env bash
# Stage the raw Gutenberg shards and the 8K BPE for a Table 1 / 2 GPU round (docs/reproduction.md,
# "GPU plan"): copies train shards SHARDS (default all 61) + val_000 of RAW and TOKENIZER into
# .gpu/table1-raw (git-ignored; name it in the device call's `carry`), then prints what will travel
# against the device's 64 MiB (tracked + untracked-not-ignored files + the carried folder).
#   bash scripts/repro_table1_stage.sh [SHARDS] [RAW] [TOKENIZER]
#   SHARDS: all | 0-30 | 0,1,2 ; RAW default ../shared/data/pretrain/gutenberg ;
#   TOKENIZER default .devdata/gutenberg-8k/tokenizer.json (deepseekmoe prepare ... --vocab-size 8192)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${1:-all}
RAW=${2:-../shared/data/pretrain/gutenberg}
TOK=${3:-.devdata/gutenberg-8k/tokenizer.json}
DEST=.gpu/table1-raw
[ -f "$TOK" ] || { echo "no tokenizer at $TOK: run deepseekmoe tokenizer train $RAW --vocab-size 8192 --out $TOK" >&2; exit 2; }
rm -rf "$DEST" && mkdir -p "$DEST"
python3 - "$SHARDS" "$RAW" "$DEST" <<'PY'
import shutil, sys
from pathlib import Path
spec, raw, dest = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
have = sorted(raw.glob("train_*.jsonl.xz"))
if spec != "all":
    ids = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        ids.update(range(int(a), int(b or a) + 1))
    have = [p for p in have if int(p.name[6:9]) in ids]
for p in [*have, raw / "val_000.jsonl.xz"]:
    shutil.copy(p, dest / p.name)
print(f"staged {len(have)} train shards + val_000 in {dest}")
PY
cp "$TOK" "$DEST/tokenizer.json"
tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -sb "$DEST" | cut -f1)
total=$((tree + carry))
echo "travels: tree $((tree / 1048576)) MiB + $DEST $((carry / 1048576)) MiB = $((total / 1048576)) MiB of 64 MiB"
[ "$total" -lt $((64 * 1048576)) ] || { echo "over 64 MiB: stage fewer shards (e.g. 0-50)" >&2; exit 1; }
