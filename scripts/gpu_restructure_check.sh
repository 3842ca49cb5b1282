#!/usr/bin/env bash
# GPU figures named in issue 11's acceptance, for one source tree, in one device call (~7-9 min on an H200):
#   1. benchmarks/moe_layer.py         16B layer at 16K tokens (balanced + skewed): grouped / triton fwd+bwd
#                                      TFLOP/s, with the dense cuBLAS ceiling of the same FLOPs;
#   2. benchmarks/train_throughput.py  --backend triton --compile yes: deepseekmoe-2b and the 16B cut to 4
#                                      layers, tokens/s and MFU (per optimizer step and per fwd+bwd);
#   3. benchmarks/inference.py         --no-disk: prefill 2K, decode batch 1 and 8 (CUDA graph, and
#                                      torch.compile + CUDA graph), with the copy bandwidth of the same run.
# Every benchmark runs from SRC with PYTHONPATH=SRC, so that tree's package is measured, never an installed
# one or the checkout the command was started in. Each one's log and JSON go to OUT_DIR; one that fails or
# runs past its time limit does not stop the others (the exit status says so). The end: OUT_DIR/
# restructure_check.json (the three raw JSONs, the command lines, device, versions, date and one figure per
# summary line) and a summary table, with before / after / ratio columns when BEFORE_JSON is given.
#
#   bash scripts/gpu_restructure_check.sh [SRC (default .)] [OUT_DIR (default $OUT or ./gpu-check)] [BEFORE_JSON]
#
# SRC may be a `git archive` export; its commit is read from SRC/SOURCE_COMMIT, else from git.
set -uo pipefail

SRC=$(cd "${1:-.}" && pwd) || { echo "no source tree at ${1:-.}" >&2; exit 2; }
OUT_DIR=${2:-${OUT:-./gpu-check}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
BEFORE_JSON=${3:-}
if [[ -n "$BEFORE_JSON" ]]; then
  BEFORE_JSON=$(cd "$(dirname "$BEFORE_JSON")" && pwd)/$(basename "$BEFORE_JSON")
  [[ -f "$BEFORE_JSON" ]] || { echo "no before JSON at $BEFORE_JSON" >&2; exit 2; }
fi
for f in moe_layer train_throughput inference; do
  [[ -f "$SRC/benchmarks/$f.py" ]] || { echo "$SRC has no benchmarks/$f.py" >&2; exit 2; }
done

export PYTHONPATH="$SRC" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
cd "$SRC" || exit 2

# The commands; their time budgets keep the whole run near 7 minutes on an H200 (limits: 2, 4, 6 min).
MOE_CMD=(benchmarks/moe_layer.py --shapes 16b --tokens 16384 --routing balanced,skewed --skewed-tokens 16384
         --backends grouped,triton,dense --graph triton --out "$OUT_DIR")
TRAIN_CMD=(benchmarks/train_throughput.py --backend triton --compile yes --cases deepseekmoe-2b,deepseekmoe-16b-4l
           --no-profile --time-budget 170 --json "$OUT_DIR/train_throughput.json")
INFER_CMD=(benchmarks/inference.py --no-disk --batches 1 8 --compile-batches 1 8 --modes cuda_graph
           --time-budget 280 --compile-reserve 100 --json "$OUT_DIR/inference.json")

echo "source tree: $SRC"
ENV_TXT=$("$PY" -c 'import deepseekmoe, torch, triton; print("measuring", deepseekmoe.__file__, "| torch",
torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name() if torch.cuda.is_available()
else "no GPU")' 2>&1; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1)
echo "$ENV_TXT"

declare -A RC WALL
run_bench() {  # name, time limit (s), command...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name: $PY $* (limit ${limit}s)"
  timeout -k 10 "$limit" "$PY" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  RC[$name]=$?
  WALL[$name]=$((SECONDS - t0))
  echo "=== $name: exit ${RC[$name]} after ${WALL[$name]}s"
}
run_bench moe_layer 120 "${MOE_CMD[@]}"
run_bench train_throughput 240 "${TRAIN_CMD[@]}"
run_bench inference 360 "${INFER_CMD[@]}"

export SRC OUT_DIR BEFORE_JSON ENV_TXT
export MOE_LINE="$PY ${MOE_CMD[*]}" TRAIN_LINE="$PY ${TRAIN_CMD[*]}" INFER_LINE="$PY ${INFER_CMD[*]}"
export RC_LINE="moe_layer=${RC[moe_layer]} train_throughput=${RC[train_throughput]} inference=${RC[inference]}"
export WALL_LINE="moe_layer=${WALL[moe_layer]} train_throughput=${WALL[train_throughput]} inference=${WALL[inference]}"
"$PY" - <<'EOF'
"""Merge the three benchmarks' JSON into restructure_check.json and print one line per figure."""
import json
import os
import subprocess
import time
from pathlib import Path

out = Path(os.environ["OUT_DIR"])
src = Path(os.environ["SRC"])


def load(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def source_commit():
    f = src / "SOURCE_COMMIT"
    if f.exists():
        return f.read_text().strip()
    r = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def figures(moe, train, infer):
    """(figure, value, unit) for each line of the summary; a figure the run did not produce is left out."""
    rows = []

    def add(figure, value, unit, scale=1.0):
        if value is not None:
            rows.append(dict(figure=figure, value=scale * value, unit=unit))

    for r in (moe or {}).get("rows", []):
        if r["shape"] == "16b" and r["tokens"] == 16384:
            add(f"moe 16b T=16384 {r['routing']} {r['backend']} fwd+bwd", r["fb_tflops"], "TFLOP/s")
            if r["backend"] == "triton":
                add(f"moe 16b T=16384 {r['routing']} triton fwd+bwd graph", r["graph_fb_tflops"], "TFLOP/s")
    for c in (train or {}).get("cases", []):
        tag = f"train {c['case']} {c['backend']}{' compiled' if c['compile'] else ''}"
        add(f"{tag} step tokens/s", c["tokens_per_s"], "tok/s")
        add(f"{tag} step MFU", c["mfu"], "%", 100)
        add(f"{tag} fwd+bwd tokens/s", c["fwd_bwd_tokens_per_s"], "tok/s")
        add(f"{tag} fwd+bwd MFU", c["fwd_bwd_mfu"], "%", 100)
        add(f"{tag} peak memory", c["peak_mem_gib"], "GiB")
    infer = infer or {}
    for backend, p in infer.get("prefill", {}).items():
        add(f"inference prefill {p['prompt']} ({backend})", p["tok_s"], "tok/s")
    for d in infer.get("decode", []):
        add(f"inference decode b{d['batch']} {d['mode']}/{d['backend']}", d["tok_s"], "tok/s")
    add("inference copy bandwidth (read+write)", infer.get("copy_bandwidth_GB_s"), "GB/s")
    return rows


moe, train, infer = load("moe_layer"), load("train_throughput"), load("inference")
env = (train or {}).get("env", {})
meta = dict(source=str(src), source_commit=source_commit(), device=env.get("device") or (moe or {}).get("meta", {})
            .get("device"), torch=env.get("torch"), triton=env.get("triton"), date=time.strftime("%Y-%m-%d %H:%M"),
            environment=os.environ["ENV_TXT"],
            commands=dict(moe_layer=os.environ["MOE_LINE"], train_throughput=os.environ["TRAIN_LINE"],
                          inference=os.environ["INFER_LINE"]),
            exit_status=dict(kv.split("=") for kv in os.environ["RC_LINE"].split()),
            wall_s=dict(kv.split("=") for kv in os.environ["WALL_LINE"].split()))
summary = figures(moe, train, infer)
merged = dict(meta=meta, summary=summary, moe_layer=moe, train_throughput=train, inference=infer)
(out / "restructure_check.json").write_text(json.dumps(merged, indent=1, default=str))

before = {}
if os.environ.get("BEFORE_JSON"):
    b = json.loads(Path(os.environ["BEFORE_JSON"]).read_text())
    before = {r["figure"]: r["value"] for r in b["summary"]}
    print(f"\nbefore: {b['meta']['source_commit']} on {b['meta']['device']}, {b['meta']['date']}")
print(f"this run: {meta['source_commit']} on {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
      f"{meta['date']}; exit {meta['exit_status']}; wall s {meta['wall_s']}")
head = f"{'figure':58} {'unit':>8} {'value':>12}"
print(head + (f" {'before':>12} {'ratio':>7}" if before else ""))
for r in summary:
    line = f"{r['figure']:58} {r['unit']:>8} {r['value']:12,.1f}"
    if before:
        b = before.get(r["figure"])
        line += f" {b:12,.1f} {r['value'] / b:7.3f}" if b else f" {'-':>12} {'-':>7}"
    print(line)
missing = sorted(set(before) - {r["figure"] for r in summary})
for f in missing:
    print(f"{f:58} {'':>8} {'MISSING':>12} {before[f]:12,.1f}")
EOF
merge_rc=$?
for n in moe_layer train_throughput inference; do
  [[ ${RC[$n]} -eq 0 ]] || { echo "FAILED: $n exit ${RC[$n]} (log: $OUT_DIR/$n.log)"; exit 1; }
done
exit $merge_rc
