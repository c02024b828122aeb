#!/usr/bin/env bash
# The whole recipe: data -> training -> ONNX export + model.json -> test clips -> evaluation.
#
#   bash model_store/recipes/run.sh
#
# Needs: apt packages espeak-ng and sox; in the venv: torch==2.13.0 onnx onnxscript
# scikit-learn (pip install -e '.[train]'), and onnxruntime, soundfile (Lookback's own).
# Writes data/ and runs/ here (gitignored), ../lookback-vad/1/{model.onnx,sequence.onnx,
# model.json}, tests/fixtures/audio/lookback_*, and RESULTS.md.
# Environment: PYTHON (default: the repository's .venv), TRAIN_STEPS, TRAIN_CLIPS.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../../.venv/bin/python}"
TRAIN_STEPS="${TRAIN_STEPS:-2400}"
TRAIN_CLIPS="${TRAIN_CLIPS:-1600}"
RUN=runs/lookback-vad
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1

for tool in espeak-ng sox; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (apt-get install -y espeak-ng sox)" >&2; exit 1; }
done
"$PY" -c "import torch, onnx, sklearn, onnxruntime, soundfile" || {
  echo "run.sh: install the train extra: $PY -m pip install torch==2.13.0 onnxscript scikit-learn" >&2; exit 1; }

mkdir -p "$RUN"
declare -A T
stage() { local name=$1; shift; local t0=$SECONDS; echo "== $name: $*"; "$@"; T[$name]=$((SECONDS - t0)); }

rm -rf data/train data/val data/test
stage datagen "$PY" datagen.py --out data --train-clips "$TRAIN_CLIPS" --val-clips 80 --test-clips 160
stage train "$PY" train.py --data data --out "$RUN" --steps "$TRAIN_STEPS"
stage export "$PY" export.py --run "$RUN" --out ../lookback-vad/1 --data data
stage fixtures "$PY" fixtures.py
printf '{"datagen": %d, "train": %d, "export": %d, "fixtures": %d}\n' \
  "${T[datagen]}" "${T[train]}" "${T[export]}" "${T[fixtures]}" > "$RUN/timings.json"
stage evaluate "$PY" evaluate.py --model ../lookback-vad/1 --data data --run "$RUN" --results RESULTS.md
echo "run.sh: done; datagen ${T[datagen]} s, train ${T[train]} s, export ${T[export]} s, evaluate ${T[evaluate]} s"
