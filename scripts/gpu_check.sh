#!/usr/bin/env bash
# GPU check, run on the GPU box from anywhere:  bash scripts/gpu_check.sh [STEP ...]
#
# Steps (each with a time cap; a failure does not stop the next step; logs under $OUT):
#   cuda_tests   every CUDA test: python -m pytest tests -m cuda -q         -> cuda_tests.log
#   main         the main job: python -m moe_offload --model full (Qwen3-30B-A3B at full depth and
#                vocabulary, LoRA + AdamW: each strategy's longest sequence and tokens/s, ours
#                through moe_offload.fit) --json main.json                   -> main.log
#                Its --time-budget is what is left of TOTAL_S (default 560 s) since this script
#                started, less 60 s of start-up (MAIN_BUDGET=seconds overrides); alone it gets
#                about 475 s (wheels and env.txt take the rest).
#   slice        the 8-layer slice at 8192 tokens: peers, and our plans budgeted at each peer's
#                measured step peak: --model slice --json slice.json --plot slice.png -> slice.log
#   experts      our experts vs HF grouped_mm on the slice, with and without HF checkpointing:
#                --model slice --strategies experts,checkpoint --json experts.json -> experts.log
#   bench        the synthetic stacks: python -m moe_offload bench --preset medium     -> bench.log
#   layers       scripts/bench_grouped_mlp.py and scripts/bench_fp8.py at two shapes   -> layers.log
#   fp8_profile  scripts/bench_fp8.py --probe and --profile                              -> fp8_profile.log
# No argument runs "cuda_tests main" (the main job then gets what the tests left of TOTAL_S);
# for the main job's full budget use two device calls: "cuda_tests slice" then "main".
# "all" runs every step (three calls' worth: split it).
# Wheels: packages the GPU image lacks travel in .whl/ (carry it): .whl/main/*.whl (Liger
# Kernel) go to /tmp/site on PYTHONPATH; .whl/torchtune/*.whl (torchtune 0.6.1, torchao 0.15,
# omegaconf, antlr4) go to /tmp/site_tt, which joins sys.path only when a torchtune row runs
# ($MOE_OFFLOAD_TORCHTUNE_PATH): torchtune needs a torchao that recent peft refuses beside LoRA.
# A short summary table is printed last.
set -u
T_START=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
PY=${PYTHON:-python}
PIP_WHEELS="-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
if ls .whl/main/*.whl >/dev/null 2>&1; then
  $PY $PIP_WHEELS --target /tmp/site .whl/main/*.whl > "$OUT/wheels.log" 2>&1 \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || echo "wheels .whl/main failed: see $OUT/wheels.log"
fi
if ls .whl/torchtune/*.whl >/dev/null 2>&1; then
  $PY $PIP_WHEELS --target /tmp/site_tt .whl/torchtune/*.whl >> "$OUT/wheels.log" 2>&1 \
    && export MOE_OFFLOAD_TORCHTUNE_PATH=/tmp/site_tt || echo "wheels .whl/torchtune failed: see $OUT/wheels.log"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STEPS=${*:-cuda_tests main}
[ "$STEPS" = all ] && STEPS="cuda_tests main slice experts bench layers fp8_profile"
TOTAL_S=${TOTAL_S:-560}

run_step() {  # name cap log cmd...
  local name=$1 cap=$2 log=$3; shift 3
  local t0=$(date +%s)
  echo "=== $name: $*" | tee "$log"
  timeout --signal=INT --kill-after=20 "$cap" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name|$rc|$(( $(date +%s) - t0 ))" >> "$OUT/steps.txt"
  tail -n 5 "$log"
}

: > "$OUT/steps.txt"
(nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv; \
 $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; \
 $PY -c "import peft; print('peft', peft.__version__)" 2>&1 | tail -n 1; \
 $PY -c "import liger_kernel, importlib.metadata as m; print('liger_kernel', m.version('liger_kernel'))" 2>&1 | tail -n 1) \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

LAYERS_CMD='for shape in "16384 4096 2048 8" "32768 4096 4096 8"; do set -- $shape;
  echo "--- T=$1 H=$2 F=$3 E=$4";
  $PY scripts/bench_grouped_mlp.py --tokens $1 --hidden $2 --ffn $3 --experts $4 --iters 20;
  $PY scripts/bench_fp8.py --T $1 --H $2 --F $3 --E $4 --iters 20; done'
FP8_CMD='$PY scripts/bench_fp8.py --probe; $PY scripts/bench_fp8.py --profile --iters 10'

for step in $STEPS; do
  case $step in
    cuda_tests) run_step cuda_tests "${TEST_CAP:-240}" "$OUT/cuda_tests.log" \
                  $PY -m pytest tests -m cuda -q -p no:cacheprovider ;;
    main)       left=$(( TOTAL_S - ($(date +%s) - T_START) - 60 ))
                budget=${MAIN_BUDGET:-$(( left < 120 ? 120 : left ))}
                run_step main "${MAIN_CAP:-$(( budget + 120 ))}" "$OUT/main.log" $PY -m moe_offload \
                  --model full --time-budget "$budget" --json "$OUT/main.json" ;;
    slice)      run_step slice "${SLICE_CAP:-300}" "$OUT/slice.log" $PY -m moe_offload --model slice \
                  --no-progress --json "$OUT/slice.json" --plot "$OUT/slice.png" ;;
    experts)    run_step experts "${HF_CAP:-150}" "$OUT/experts.log" $PY -m moe_offload --model slice \
                  --strategies experts,checkpoint --no-progress --json "$OUT/experts.json" ;;
    bench)      run_step bench "${BENCH_CAP:-260}" "$OUT/bench.log" $PY -m moe_offload bench --preset medium \
                  --iters 8 --warmup 3 --no-progress --json "$OUT/bench.json" --plot "$OUT/bench.png" ;;
    layers)     run_step layers "${LAYERS_CAP:-150}" "$OUT/layers.log" env PY="$PY" bash -c "$LAYERS_CMD" ;;
    fp8_profile) run_step fp8_profile "${FP8_CAP:-150}" "$OUT/fp8_profile.log" env PY="$PY" bash -c "$FP8_CMD" ;;
    *) echo "unknown step $step" >&2 ;;
  esac
done

for log in main slice experts bench; do
  [ -f "$OUT/$log.log" ] || continue
  echo
  echo "=== $log: table and checks ($OUT/$log.log)"
  sed -n '/^torch /,$p' "$OUT/$log.log" | grep -vE '^(bench:|MemoryPlan|layer |    [0-9] )' || tail -n 40 "$OUT/$log.log"
done
echo
echo "=== summary"
printf '%-12s %-6s %-8s %s\n' step rc seconds result
while IFS='|' read -r name rc secs; do
  res=""
  case $name in
    layers) res=$(grep -ciE 'speedup|x bf16|ms' "$OUT/layers.log" | sed 's/$/ timing lines/') ;;
    fp8_profile) res="$(grep -c '\[probe\].*OK' "$OUT/fp8_profile.log") probes OK, $(grep -c '\[probe\].*FAIL' "$OUT/fp8_profile.log") FAIL; $(grep -E '^  sum ' "$OUT/fp8_profile.log" | head -n 1)" ;;
    cuda_tests) res=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/cuda_tests.log" | tail -n 1) ;;
    main|slice|experts) res="$(grep -cE '^  PASS' "$OUT/$name.log") PASS, $(grep -cE '^  FAIL' "$OUT/$name.log") FAIL, $(grep -cE '^[^ ].*\[(error|skipped)\]' "$OUT/$name.log") error/skipped rows" ;;
    bench) res="$(grep -cE 'PASS' "$OUT/$name.log") PASS, $(grep -cE 'FAIL' "$OUT/$name.log") FAIL, $(grep -cE '\[error\]' "$OUT/$name.log") error rows" ;;
  esac
  [ "$rc" = 124 ] && res="TIMED OUT after ${secs}s; $res"
  printf '%-12s %-6s %-8s %s\n' "$name" "$rc" "$secs" "$res"
done < "$OUT/steps.txt"
