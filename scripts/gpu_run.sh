#!/usr/bin/env bash
# Run the GPU test suite and the benchmarks on a CUDA machine, from the repository root.
#   OUT=/path bash scripts/gpu_run.sh [tests] [bench] [sweep] [cli]     (default: tests bench)
# Wheels of peers (liger-kernel) found in .whl/ are installed to /tmp/site first. Results (JSON + MD per
# benchmark) and logs go to $OUT; BENCHES selects benchmarks (default: the four kernel benchmarks; also
# e2e_train, e2e_decode, cross_entropy, embedding), BENCH_ARGS adds options to every benchmark and ARGS_<name>
# (e.g. ARGS_e2e_decode="--layers 8") to one. TEST_PATHS / TEST_ARGS narrow the test run. `cli` runs
# `rotalabs-accel info` and `rotalabs-accel bench --plot` as a user would.
set -u
OUT=${OUT:-$PWD/.gpu_out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1
# a copy of the tree without .git: results name the commit the snapshot was taken from (COMMIT file)
[ -f COMMIT ] && export ROTALABS_ACCEL_COMMIT=$(cat COMMIT)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
steps=${*:-tests bench}
BENCHES=${BENCHES:-rmsnorm swiglu rope int8_linear}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 - <<'PY'
import torch, triton, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
try:
    import liger_kernel, importlib.metadata as m; print("liger-kernel", m.version("liger-kernel"))
except Exception as e:
    print("liger-kernel unavailable:", e)
try:
    import transformers; print("transformers", transformers.__version__)
except Exception as e:
    print("transformers unavailable:", e)
PY
} 2>&1 | tee "$OUT/env.txt"

status=0
for step in $steps; do
  case $step in
    tests)
      # -v names every result as it happens, so a run stopped by its time limit still says what failed
      timeout ${TEST_TIMEOUT:-480} python3 -m pytest -v -n ${TEST_WORKERS:-8} -rfE --tb=short -p no:cacheprovider \
        --timeout=200 ${TEST_PATHS:-tests} -m "not slow" ${TEST_ARGS:-} >"$OUT/gpu_tests.log" 2>&1 || status=1
      grep -E "FAILED|ERROR" "$OUT/gpu_tests.log" | head -n 40
      tail -n 3 "$OUT/gpu_tests.log";;
    bench|sweep)
      for b in $BENCHES; do
        extra=""; [ "$step" = sweep ] && extra="--sweep"
        own="ARGS_$b"
        echo "== bench_$b $extra ${!own:-}"
        timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_$b.py --out "$OUT/results" $extra ${BENCH_ARGS:-} ${!own:-} \
          >"$OUT/results/bench_${b}${extra:+_sweep}.log" 2>&1 || { status=1; echo "bench_$b failed"; }
        tail -n 40 "$OUT/results/bench_${b}${extra:+_sweep}.log"
      done;;
    cli)
      python3 -m rotalabs_accel info >"$OUT/results/cli_info.txt" 2>&1 || status=1
      timeout ${BENCH_TIMEOUT:-300} python3 -m rotalabs_accel bench --no-progress --plot "$OUT/results/cli_bench.png" \
        >"$OUT/results/cli_bench.txt" 2>&1 || { status=1; echo "rotalabs-accel bench failed"; }
      cat "$OUT/results/cli_info.txt"; tail -n 60 "$OUT/results/cli_bench.txt";;
  esac
done
# one archive per invocation, so a second call in the same command does not overwrite the first's results
archive="$OUT/results.tgz"; [ -e "$archive" ] && archive="$OUT/results-$(date -u +%H%M%S).tgz"
tar -C "$OUT" -czf "$archive" results && rm -rf "$OUT/results"
exit $status
