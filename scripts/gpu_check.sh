#!/usr/bin/env bash
# One-call GPU check (run on the GPU box from anywhere):  bash scripts/gpu_check.sh
#
# 1. every CUDA test:  python -m pytest tests -m cuda -q       -> $OUT/cuda_tests.log
# 2. the benchmark:    python -m moe_offload bench --preset medium
#                      --json $OUT/bench.json --plot $OUT/bench.png  -> $OUT/bench.log
# 3. layer speed:      scripts/bench_grouped_mlp.py, scripts/bench_fp8.py  -> $OUT/layers.log
# 4. FP8 kernel paths: scripts/bench_fp8.py --probe and --profile         -> $OUT/fp8_profile.log
# Each step has a time cap (the whole script stays under ~8 minutes on an H100) and a
# failure does not stop the next step.  A short summary table is printed last.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
TEST_CAP=${TEST_CAP:-200}     # seconds
BENCH_CAP=${BENCH_CAP:-260}   # seconds (medium: save_on_cpu alone is ~0.3 s/step)

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
 $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)") \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run_step cuda_tests "$TEST_CAP" "$OUT/cuda_tests.log" $PY -m pytest tests -m cuda -q -p no:cacheprovider
run_step bench "$BENCH_CAP" "$OUT/bench.log" $PY -m moe_offload bench --preset medium \
  --iters 8 --warmup 3 --json "$OUT/bench.json" --plot "$OUT/bench.png"

# 3. layer speed: fused GroupedMLP vs the unfused _grouped_mm composition, and FP8 vs
#    bf16, at the issue's shape and one larger shape  -> $OUT/layers.log
LAYERS_CMD='for shape in "16384 4096 2048 8" "32768 4096 4096 8"; do set -- $shape;
  echo "--- T=$1 H=$2 F=$3 E=$4";
  $PY scripts/bench_grouped_mlp.py --tokens $1 --hidden $2 --ffn $3 --experts $4 --iters 20;
  $PY scripts/bench_fp8.py --T $1 --H $2 --F $3 --E $4 --iters 20; done'
run_step layers "${LAYERS_CAP:-150}" "$OUT/layers.log" env PY="$PY" bash -c "$LAYERS_CMD"

# 4. every other documented path of scripts/bench_fp8.py: the kernel probe and the
#    per-piece profile (cast-kernel configs, breakdown, host issue time, kernel table)
FP8_CMD='$PY scripts/bench_fp8.py --probe; $PY scripts/bench_fp8.py --profile --iters 10'
run_step fp8_profile "${FP8_CAP:-150}" "$OUT/fp8_profile.log" env PY="$PY" bash -c "$FP8_CMD"

echo
echo "=== benchmark table and checks ($OUT/bench.log)"
sed -n '/^torch /,$p' "$OUT/bench.log" | grep -v '^bench:' || tail -n 40 "$OUT/bench.log"
echo
echo "=== summary"
printf '%-12s %-6s %-8s %s\n' step rc seconds result
while IFS='|' read -r name rc secs; do
  case $name in
    layers) res=$(grep -ciE 'speedup|x bf16|ms' "$OUT/layers.log" | sed 's/$/ timing lines/') ;;
    fp8_profile) res="$(grep -c '\[probe\].*OK' "$OUT/fp8_profile.log") probes OK, $(grep -c '\[probe\].*FAIL' "$OUT/fp8_profile.log") FAIL; $(grep -E '^  sum ' "$OUT/fp8_profile.log" | head -n 1)" ;;
    cuda_tests) res=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/cuda_tests.log" | tail -n 1) ;;
    bench) res=$(grep -cE "PASS" "$OUT/bench.log" | sed "s/$/ PASS lines/"); res="$res, $(grep -cE "IMPOSSIBLE" "$OUT/bench.log") IMPOSSIBLE lines"; \
           res="$res, $(grep -cE 'FAIL' "$OUT/bench.log") FAIL lines, $(grep -cE '\[error\]' "$OUT/bench.log") error rows" ;;
  esac
  [ "$rc" = 124 ] && res="TIMED OUT after ${secs}s; $res"
  printf '%-12s %-6s %-8s %s\n' "$name" "$rc" "$secs" "$res"
done < "$OUT/steps.txt"
ls -l "$OUT"/bench.json "$OUT"/bench.png 2>/dev/null || echo "bench.json/bench.png missing"
