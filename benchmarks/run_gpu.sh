#!/usr/bin/env bash
# Every GPU benchmark of this folder on the machine it runs on, one table per GPU kind.
#
#   bash benchmarks/run_gpu.sh OUT [DATA] [quant|eval|all]
#
# OUT   folder for the results (quant_<gpu>.{json,md}, eval_<gpu>.{json,md}, logs); the files
#       carry the GPU's name, so runs on different GPU kinds sit side by side.
# DATA  folder with eval/ (the original task files) and tokenizers/gpt-neox-20b/, as in
#       ../shared/data (default: ../shared/data); only the eval part reads it.
# part  quant: the kernels (GPU self-check first, then every codebook of <= 8 bits at every block
#       size, 2^28 fp16 values, against the device copy); eval: evaluation throughput against the
#       lm_eval CLI with the CUDA-graph policy deciding by measurement (mode auto) beside eager,
#       and the batch-size search's probes. Default: all (about 15 minutes on an H200).
#
# lm-eval and its dependencies come from wheels in .carry/whl when the machine has no lm_eval
# (an offline GPU machine); README.md in this folder has the numbers each run gave.
set -euo pipefail
out=${1:?usage: run_gpu.sh OUT [DATA] [quant|eval|all]}
data=${2:-../shared/data}
part=${3:-all}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
read -r -a QUANT_ARGS <<< "${QUANT_ARGS:-}"  # e.g. QUANT_ARGS="--families nf,dynamic --no-bnb"

case "$part" in quant|eval|all) ;; *) echo "part must be quant, eval or all, not $part" >&2; exit 2;; esac

if [[ $part == quant || $part == all ]]; then
    # the self-check (its reduced form: every family at k = 2, 3, 4, 8, every MX format, every
    # reachable division pair) stops the run on the first mismatch: no speed without bit-exact
    # outputs; then the full grid (k = 3, 4, 8; B = 32 .. 4096; MX at their blocks)
    "$py" "$here/bench_quant.py" --out "$out" --check-only --quick 2>&1 | tee "$out/quant.log"
    "$py" "$here/bench_quant.py" --out "$out" "${QUANT_ARGS[@]}" 2>&1 | tee -a "$out/quant.log"
fi

if [[ $part == eval || $part == all ]]; then
    if ! "$py" -c "import lm_eval" 2>/dev/null; then
        site=$(mktemp -d)
        "$py" -m pip install -q --no-deps --no-index --target "$site" "$root"/.carry/whl/*.whl
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    # six specs: 0 warms up, 1 is the eager reference, 2 captures, 3 measures the saving, 4-5 follow
    "$py" "$here/bench_eval.py" --data "$data" --out "$out" --models 1.4b \
        --specs fp16,int4-b64,float4-e3-b64,nf4-b64,int8-b64,nf3-b64 \
        --modes auto,eager --limit "${EVAL_LIMIT:-1000}" --timeout 240 2>&1 | tee "$out/eval.log"
fi
