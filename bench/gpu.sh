#!/usr/bin/env bash
# Training throughput on one GPU (H100/H200, < 5 minutes): prepares a data directory from data/sample, then
# measures tokens/s, MFU and peak memory of the 124m, 350m and 1b presets in bf16 with torch.compile
# (grad_accum 1, micro-batches sized to fit 80 GB, no checkpoint), plus a short FSDP run of 124m under
# torchrun --nproc-per-node 1, and prints a table; then time to a target val loss on the 124m shape for the GPT-2
# baseline, Myna's 124m recipe (AdamW + cosine) and Muon + WSD (bench/speedrun.py: same shards, same windows, bf16,
# eager, 200 steps of 32 x 1024 tokens each); then the inference engine's decode speed (1, 8 and 64 streams, cached
# vs uncached, time to first token) on the 124m shape. Each throughput number is the median over the second half
# of the steps (the first ones include compilation).
#
#   bash bench/gpu.sh               # on the GPU machine
#   bash bench/gpu.sh --cpu-smoke   # same code paths on CPU with the tiny preset, to check the script itself
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    # preset:steps:micro-batch:compile
    RUNS=("tiny:6:8:1")
    FSDP="tiny:4:8"
    VOCAB=512
    export GLOO_SOCKET_IFNAME=lo OMP_NUM_THREADS=1
else
    RUNS=("124m:30:16:1" "350m:20:8:1" "1b:16:4:1")
    FSDP="124m:12:16"
    VOCAB=8192
fi

echo "== data: myna data prepare on data/sample/posts (vocab $VOCAB)"
python -m myna data prepare data/sample/posts --out "$WORK/data" --vocab-size "$VOCAB" --no-lang-id \
    --no-near-dedup >/dev/null 2>&1

cat >"$WORK/one.py" <<'EOF'
import json, os, statistics, sys
from pathlib import Path
import torch
from myna.train.pretrain import pretrain

data, out, preset, steps, batch, compile, parallel, results = sys.argv[1:9]
steps = int(steps)
pretrain(data, out, preset=preset, steps=steps, compile=compile == "1", parallel=parallel,
         batch_size=int(batch), grad_accum=1, warmup_steps=2, eval_every=steps, eval_batches=2,
         final_checkpoint=False)
if int(os.environ.get("RANK", "0")) == 0:
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tail = rows[len(rows) // 2:]
    mfu = [r["mfu"] for r in tail if "mfu" in r]
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    with open(results, "a") as f:
        f.write(json.dumps({
            "preset": preset, "mode": parallel + (" + compile" if compile == "1" else ""), "batch": int(batch),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in tail),
            "mfu": statistics.median(mfu) if mfu else None, "peak_gib": peak,
            "loss": rows[-1]["loss"], "val_loss": rows[-1].get("val_loss"),
        }) + "\n")
EOF

RESULTS="$WORK/results.jsonl"
for spec in "${RUNS[@]}"; do
    IFS=: read -r preset steps batch compile <<<"$spec"
    echo "== $preset: $steps steps, micro-batch $batch, compile=$compile"
    python "$WORK/one.py" "$WORK/data" "$WORK/run_$preset" "$preset" "$steps" "$batch" "$compile" none "$RESULTS"
done

IFS=: read -r preset steps batch <<<"$FSDP"
echo "== $preset under FSDP (torchrun, 1 process): $steps steps, micro-batch $batch"
torchrun --nproc-per-node 1 --master-addr 127.0.0.1 --master-port 29577 "$WORK/one.py" \
    "$WORK/data" "$WORK/run_fsdp" "$preset" "$steps" "$batch" 0 fsdp "$RESULTS"

python - "$RESULTS" <<'EOF'
import json, sys
import torch
rows = [json.loads(l) for l in open(sys.argv[1])]
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
print(f"\ntraining throughput on {device}, bf16 autocast on CUDA")
print(f"{'preset':<8} {'mode':<16} {'batch':>5} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9} {'loss':>7} {'val':>7}")
for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    val = f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-"
    print(f"{r['preset']:<8} {r['mode']:<16} {r['batch']:>5} {r['tokens_per_s']:>12,.0f} {mfu:>7} "
          f"{r['peak_gib']:>9.1f} {r['loss']:>7.3f} {val:>7}")
EOF

echo "== time to a target loss (bench/speedrun.py)"
RECIPES=(gpt2 myna "myna:optimizer=muon,schedule=wsd")
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    python bench/speedrun.py --data "$WORK/data" --preset tiny --device cpu --batch 4 --seq 128 --steps 8 \
        --eval-every 4 --repeats 1 --recipes "${RECIPES[@]}"
else
    python bench/speedrun.py --data "$WORK/data" --preset 124m --device cuda --steps 200 --eval-every 25 \
        --repeats 1 --recipes "${RECIPES[@]}" 2>/dev/null
fi

echo "== inference engine (bench/infer.py)"
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    python bench/infer.py --preset tiny --streams 1,2 --max-tokens 8 --runs 1
else
    python bench/infer.py --preset 124m --device cuda --streams 1,8,64 --prompt-tokens 128 --max-tokens 128 --runs 3
fi
