#!/usr/bin/env bash
# One-call GPU check of jaxgpt: versions, the GPU test files, then benchmarks/bench_gpu.py.
#
# Run from the repository root on a machine with jax[cuda] and torch (CUDA), no internet needed:
#
#     bash benchmarks/gpu_check.sh [--recipe]
#
# Everything is printed and teed to $OUT/log.txt (OUT defaults to /tmp/gpu_check); bench_gpu.py writes
# $OUT/bench_gpu.json and a profiler trace of shakespeare_char steps under $OUT/trace (flattened to one
# folder, the .xplane.pb gzipped). With --recipe, and when at least RECIPE_NEED_S seconds of the
# BUDGET_S budget are left after the benchmark, whole train.py runs follow ($OUT/recipe.json): the modern
# recipe (shakespeare_char_speedrun_gpu, 2500 steps), then nanoGPT's (shakespeare_char, 5000 steps), each with
# the step at which val first reached 1.47. Each phase prints a timestamp. Budget knobs (seconds, environment):
# BUDGET_S=540, PYTEST_TIMEOUT_S=150, BENCH_TIMEOUT_S=330, RECIPE_NEED_S=150; BENCH_ARGS adds options to
# bench_gpu.py (BENCH_ARGS=--tiny: a quick smoke run of this script).
#
# Prepare on a machine with PyPI access, in the repository root (both folders are git-ignored):
#   .whl/  wheels of what the GPU machine lacks, installed with --no-deps into /tmp/site; for a machine
#          without ml_collections (needed by the tests and --recipe, not by bench_gpu.py itself):
#              python3 -m pip download --no-deps ml_collections==1.1.0 -d .whl
#          (a pure-Python wheel; add any other missing package the same way, one version of each)
#   .data/input.txt  the tiny Shakespeare corpus, e.g.
#              mkdir -p .data && cp ../shared/data/tinyshakespeare/input.txt .data/
set -u -o pipefail

PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-540}
PYTEST_TIMEOUT_S=${PYTEST_TIMEOUT_S:-150}
BENCH_TIMEOUT_S=${BENCH_TIMEOUT_S:-330}
RECIPE_NEED_S=${RECIPE_NEED_S:-150}
BENCH_ARGS=${BENCH_ARGS:-}
RECIPE=0
for arg in "$@"; do
  case "$arg" in
    --recipe) RECIPE=1 ;;
    *) echo "error: unknown argument $arg: the only option is --recipe" >&2; exit 2 ;;
  esac
done
if [ ! -f train.py ] || [ ! -f benchmarks/bench_gpu.py ]; then
  echo "error: run from the jaxgpt repository root (train.py and benchmarks/bench_gpu.py not found here)" >&2
  exit 2
fi
mkdir -p "$OUT"
LOG="$OUT/log.txt"
START=$(date +%s)
export PYTHONUNBUFFERED=1

phase() { echo "=== [$(date -u +%H:%M:%S)] +$(( $(date +%s) - START ))s $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

phase "setup"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
DATA="$PWD/.data/input.txt"
[ -f "$DATA" ] || DATA="${JAXGPT_SHAKESPEARE:-$PWD/../shared/data/tinyshakespeare/input.txt}"
export JAXGPT_SHAKESPEARE="$DATA"
{
  nvidia-smi -L 2>&1 || echo "nvidia-smi not available"
  "$PYTHON" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "chex", "torch", "triton", "ml_collections", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "missing:", type(e).__name__, e)
try:
    import jax
    print("jax devices", jax.devices())
except Exception as e:  # noqa: BLE001
    print("jax devices: failed:", e)
EOF
  echo "corpus: $DATA ($( [ -f "$DATA" ] && wc -c < "$DATA" || echo missing) bytes)"
} 2>&1 | tee -a "$LOG"

phase "pytest on the GPU (timeout ${PYTEST_TIMEOUT_S}s)"
JAX_PLATFORMS=cuda timeout "$PYTEST_TIMEOUT_S" "$PYTHON" -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_attention.py tests/test_flash_dropout.py tests/test_sampling.py tests/test_training.py \
  2>&1 | tail -n 60 \
  | tee -a "$LOG"
echo | tee -a "$LOG"
echo "pytest exit status: ${PIPESTATUS[0]} (124: timed out)" | tee -a "$LOG"

BENCH_T=$(( $(left) < BENCH_TIMEOUT_S ? $(left) : BENCH_TIMEOUT_S ))
phase "bench_gpu.py (timeout ${BENCH_T}s)"
rm -rf "$OUT/trace.raw"
# --budget: parts that would start in the last minute are skipped (marked so) rather than cut off
# shellcheck disable=SC2086
timeout "$BENCH_T" "$PYTHON" benchmarks/bench_gpu.py --data "$DATA" --json "$OUT/bench_gpu.json" \
  --profile "$OUT/trace.raw" --budget $(( BENCH_T > 120 ? BENCH_T - 60 : BENCH_T / 2 )) $BENCH_ARGS 2>&1 \
  | tee -a "$LOG"
echo "bench_gpu exit status: ${PIPESTATUS[0]} (124: timed out)" | tee -a "$LOG"

phase "trace files"
if [ -d "$OUT/trace.raw" ]; then  # the tool's nested plugins/profile/<run>/ folders, flattened and compressed
  mkdir -p "$OUT/trace"
  find "$OUT/trace.raw" -type f | while read -r f; do
    case "$f" in *.gz) cp "$f" "$OUT/trace/" ;; *) gzip -c "$f" > "$OUT/trace/$(basename "$f").gz" ;; esac
  done
  rm -rf "$OUT/trace.raw"
  ls -l "$OUT/trace" | tee -a "$LOG"
fi

if [ "$RECIPE" = 1 ]; then
  if [ "$(left)" -ge "$RECIPE_NEED_S" ]; then
    phase "recipes: train.py --config configs/shakespeare_char_speedrun_gpu.py, then shakespeare_char.py (timeout $(left)s)"
    # shellcheck disable=SC2086
    timeout "$(left)" "$PYTHON" benchmarks/bench_gpu.py --data "$DATA" --only recipe \
      --recipe-timeout $(( $(left) - 10 )) --json "$OUT/recipe.json" $BENCH_ARGS 2>&1 | tee -a "$LOG"
    echo "recipe exit status: ${PIPESTATUS[0]} (124: timed out)" | tee -a "$LOG"
  else
    phase "recipe skipped: $(left)s left of ${BUDGET_S}s, needs ${RECIPE_NEED_S}s"
  fi
fi
phase "done"
