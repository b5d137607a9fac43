#!/usr/bin/env bash
# The main job, end to end on a CPU (about 6 minutes on 2 cores):
#   setup → data (the Python standard library, tokenised) → train the tiny DA model with 2
#   processes (torchrun, gloo), stopped half-way → resume to the end → evaluate → MLflow.
# Environment: RUN_DIR (default runs/demo), DATA_DIR (default data/default), NPROC (default 2),
# STEPS (default: train.steps of configs/tiny-cpu.yaml). Extra arguments are config overrides
# (e.g. `bash scripts/demo.sh train.steps=100`).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)

bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

CONFIG=configs/tiny-cpu.yaml
RUN_DIR=${RUN_DIR:-runs/demo}
DATA_DIR=${DATA_DIR:-data/default}
NPROC=${NPROC:-2}
STEPS=${STEPS:-$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['train']['steps'])")}
HALF=$((STEPS / 2))
SEQ_LEN=$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['data']['seq_len'])")
VOCAB=$(python -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['model']['vocab_size'])")
# Validation every 50 steps on a fixed 32k-token slice of the held-out split (val/loss in metrics.jsonl and MLflow).
OVERRIDES=(data.dir="$DATA_DIR" train.run_dir="$RUN_DIR" train.steps="$STEPS" train.eval_every=50 train.eval_tokens=32768 "$@")

echo "== data: the standard library, tokenised (vocab $VOCAB, $SEQ_LEN-token samples) → $DATA_DIR"
fluidlm data prepare --out "$DATA_DIR" --vocab-size "$VOCAB" --seq-len "$SEQ_LEN"

# A fresh run each time (the checkpoints of an older demo would otherwise be resumed).
rm -rf "$RUN_DIR"

echo "== train, part 1: steps 1..$HALF of $STEPS on $NPROC processes (stops with a checkpoint, as a preempted job would)"
torchrun --standalone --nproc-per-node="$NPROC" -m fluidlm.train --config "$CONFIG" "${OVERRIDES[@]}" train.stop_at="$HALF"

echo "== train, part 2: --resume auto continues from the newest checkpoint (same MLflow run) to step $STEPS"
torchrun --standalone --nproc-per-node="$NPROC" -m fluidlm.train --config "$CONFIG" --resume auto "${OVERRIDES[@]}"

# ---- EVALUATION: long-context perplexity of the final checkpoint (fluidlm/eval, README "Evaluation") ----
# The held-out split's documents (the val split has few, very long ones: split into 8192-token pieces,
# at most 32k tokens) scored at 256 (the training length), 4× and 16× past it; DA streams each
# window through its recurrent state. Documents are split across the $NPROC processes.
echo "== evaluate: perplexity on $DATA_DIR/val at 256, 1024, 4096 tokens (disjoint windows, --stream) → $RUN_DIR/eval"
torchrun --standalone --nproc-per-node="$NPROC" -m fluidlm.eval --checkpoint "$RUN_DIR" \
    --data "$DATA_DIR/val/manifest.json" --context-lengths 256,1024,4096 --mode disjoint --stream \
    --max-doc-tokens 8192 --max-tokens 32768 --out "$RUN_DIR/eval/results.json"
# -------------------------------------------------------------------------------------------------

# ---- USE: export to safetensors + a transformers-loadable folder, then generate from the export ----
echo "== export: $RUN_DIR → $RUN_DIR/export (model.safetensors, config.json, tokenizer, modeling code)"
fluidlm export --checkpoint "$RUN_DIR" --out "$RUN_DIR/export" --force
# Without --threads, generate decodes on 1 thread or torch's default, whichever its first tokens measure
# faster: the tokens/s it prints is the speed bench/generate.py measures (1 thread), not OpenMP contention.
echo "== generate: one sample from the exported model (DA decodes through its recurrent state)"
fluidlm generate --checkpoint "$RUN_DIR/export" --prompt "def main(" --max-new-tokens 64 --temperature 0.8 \
    --top-k 50 --seed 0

MLFLOW_DB=$(cd "$(dirname "$RUN_DIR")" && pwd)/mlflow.db
python - "$RUN_DIR" <<'PY'
import json, math, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl")]
first, last = rows[0], rows[-1]
tail = rows[-20:]
mean = sum(r["loss"] for r in tail) / len(tail)
print(f"== loss: {first['loss']:.3f} at step {first['step']} → {last['loss']:.3f} at step {last['step']} "
      f"(mean of the last {len(tail)} steps {mean:.3f}, perplexity {math.exp(mean):.1f}); "
      f"{last['tokens']:,} tokens; {last['tokens_per_s']:,.0f} tokens/s")
val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
print("== validation curve (val/loss): " + ", ".join(f"{s}: {v:.3f}" for s, v in val))
PY
echo "== run folder: $RUN_DIR (config.yaml, metrics.jsonl, checkpoints/)"
echo "== MLflow UI:  mlflow ui --backend-store-uri sqlite:///$MLFLOW_DB   (then open http://127.0.0.1:5000)"
echo "== demo finished in $(( $(date +%s) - START )) s"
