#!/usr/bin/env bash
# The lookback-wake recipe: pools -> training + export (parity-checked) -> test clip -> RESULTS.md
#
#   bash model_store/recipes/wake/run.sh
#
# Needs espeak-ng and sox (apt), torch in the venv (the train extra). Writes ../data/wake and
# ../runs/lookback-wake (gitignored), ../../lookback-wake/1/{model.onnx,sequence.onnx,model.json},
# lookback-wake-1.weights.npz, tests/fixtures/wake/ and RESULTS.md.
# Environment: PYTHON (default: the repository's .venv), STEPS (2500).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-../../../.venv/bin/python}"
STEPS="${STEPS:-2500}"
RUN=../runs/lookback-wake
export PYTHONHASHSEED=0 OMP_NUM_THREADS=1
mkdir -p "$RUN"
declare -A T
stage() { local name=$1; shift; local t0=$SECONDS; echo "== $name: $*"; "$@"; T[$name]=$((SECONDS - t0)); }
stage datagen nice "$PY" wakedata.py --out ../data/wake --scale 2
stage train nice "$PY" train.py --data ../data/wake --run "$RUN" --out ../../lookback-wake/1 --steps "$STEPS"
stage fixtures "$PY" fixtures.py
printf '{"datagen": %d, "train": %d, "fixtures": %d}\n' "${T[datagen]}" "${T[train]}" "${T[fixtures]}" > "$RUN/timings.json"
"$PY" results.py --run "$RUN" --out RESULTS.md
echo "run.sh: done; datagen ${T[datagen]} s, train+export+evaluation ${T[train]} s"
