#!/usr/bin/env bash
# lmport's GPU suite, in one call on the GPU machine, from the checkout's root:
#   bash benchmarks/gpu_suite.sh                 # every stage, in order, within the budget
#   bash benchmarks/gpu_suite.sh ckpt-1b lmport-1b hf-1b    # only these (a second call)
# Stages: roofline tests ckpt-8b lmport-8b lmport-8b-fp8 ckpt-8b-int4 lmport-8b-int4 quant-kernels t5 profile-8b
# profile-8b-fp8 hf-8b attention layer-ops ckpt-1b lmport-1b soak-1b ckpt-gemma3 structured structured-tiny speculative hf-1b, then the summary (and the quantized formats' table).
# Each stage logs to $OUT/<stage>.log, runs under `timeout`, and a failed stage never stops
# the next. A stage is skipped when less than its minimum is left of SUITE_BUDGET_S (default
# 500 s). The table printed last is also in $OUT/summary.txt; JSON results are in $OUT.
set -u
OUT=${OUT:-$PWD/suite-out}
mkdir -p "$OUT"
BUDGET=${SUITE_BUDGET_S:-500}
CKPT_ROOT=${CKPT_ROOT:-/tmp/lmport-ckpt}
PORT=${PORT:-3000}
START=$(date +%s)
STAGES_FILE="$OUT/stages.tsv"
WANTED=" $* "

log() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/suite.log"; }
want() { [ "$WANTED" = "  " ] || [[ "$WANTED" == *" $1 "* ]]; }

run_stage() {  # run_stage NAME MIN_S MAX_S COMMAND...
  local name=$1 min=$2 max=$3; shift 3
  want "$name" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < min )); then
    log "skip $name: ${left}s of the budget left, it needs ${min}s"
    printf '%s\tskipped\t0\n' "$name" >> "$STAGES_FILE"
    return 0
  fi
  local limit=$(( left < max ? left : max ))
  log "== $name (up to ${limit}s)"
  local t0 rc status
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$STAGES_FILE"
  log "   $name: $status in $(( $(date +%s) - t0 ))s; log tail:"
  tail -n 8 "$OUT/$name.log" | sed 's/^/      /' | tee -a "$OUT/suite.log"
  # a server left behind by a killed stage would hold the GPU's memory
  for pidfile in "$OUT"/lmport-*.pid; do
    [ -f "$pidfile" ] || continue
    kill -KILL "$(cat "$pidfile")" 2>/dev/null && log "   stopped a leftover server"
    rm -f "$pidfile"
  done
}

log "lmport GPU suite -> $OUT (budget ${BUDGET}s)"
if [ -f .whl/install.sh ]; then
  # shellcheck disable=SC1091
  source .whl/install.sh plugins/cuda > "$OUT/install.log" 2>&1 || log "install reported errors (see install.log)"
else
  log "no .whl/install.sh here: using the environment as it is"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m lmport.cli backends > "$OUT/backends.txt" 2>&1 || log "lmport backends failed (see backends.txt)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/suite.log"

run_stage roofline 20 60 python3 benchmarks/roofline.py --json "$OUT/roofline.json"
# every test runs (no -x): one GPU call should say all that is wrong
run_stage tests 60 540 python3 -m pytest plugins/cuda/tests -v -p no:cacheprovider --durations=15
# stage rocm-forced: the ROCm backend's code path forced on this NVIDIA GPU (LMPORT_ROCM_FORCE=1; plugins/rocm/README.md)
run_stage rocm-forced 30 150 bash -c 'python3 -m pip install --quiet --no-deps --no-build-isolation -e plugins/rocm && python3 -m pytest plugins/rocm/tests -q -p no:cacheprovider'
run_stage ckpt-8b 60 180 python3 benchmarks/make_checkpoint.py llama3-8b "$CKPT_ROOT/llama3-8b"
run_stage lmport-8b 120 300 bash benchmarks/serve_and_bench.sh "$CKPT_ROOT/llama3-8b" llama3-8b "$OUT" "$PORT"
# stage lmport-8b-tp1: the same run through the tensor-parallel worker path at world size 1 (NCCL, sharded executor); compare with lmport-8b
run_stage lmport-8b-tp1 120 300 env LMPORT_LAUNCH_ARGS="--sharded true --num-shard 1" bash benchmarks/serve_and_bench.sh "$CKPT_ROOT/llama3-8b" llama3-8b-tp1 "$OUT" "$PORT"
# quantized formats beside that bf16 run: fp8 quantized at load, GPTQ int4 g128 (batch 1 only; a 16-request load)
run_stage lmport-8b-fp8 120 300 env LMPORT_LAUNCH_ARGS="--quantize fp8" bash benchmarks/serve_and_bench.sh "$CKPT_ROOT/llama3-8b" llama3-8b-fp8 "$OUT" "$PORT"
run_stage ckpt-8b-int4 40 150 python3 benchmarks/quant_bench.py checkpoint "$CKPT_ROOT/llama3-8b" "$CKPT_ROOT/llama3-8b-gptq-int4"
run_stage lmport-8b-int4 90 240 env BENCH_NUM_PROMPTS=16 BENCH_CONCURRENCY=16 bash benchmarks/serve_and_bench.sh "$CKPT_ROOT/llama3-8b-gptq-int4" llama3-8b-int4 "$OUT" "$PORT"
run_stage quant-kernels 40 150 python3 benchmarks/quant_bench.py kernels --rows 1 2 4 8 16 256 4096 --json "$OUT/quant_kernels.json"
# T5 natively (paged, batched, CUDA graphs) vs the transformers one-at-a-time executor, 32 requests at once
run_stage t5 40 200 python3 benchmarks/t5_bench.py --device cuda --shape flan-t5-base --requests 32 --input-len 128 --output-len 64 --json "$OUT/t5.json"
run_stage profile-8b 60 150 python3 benchmarks/profile_decode.py --model "$CKPT_ROOT/llama3-8b" --batch-sizes 1,256 --output-len 128 --async-scheduling on --kernel-profile --segments --json "$OUT/profile-8b.json"
# where an fp8 batch-1 step's time goes (kernels by GPU time), beside profile-8b's bf16 one
run_stage profile-8b-fp8 60 150 python3 benchmarks/profile_decode.py --model "$CKPT_ROOT/llama3-8b" --quantize fp8 --batch-sizes 1 --output-len 64 --async-scheduling on --kernel-profile --json "$OUT/profile-8b-fp8.json"
run_stage hf-8b 100 240 python3 benchmarks/hf_baseline.py --model "$CKPT_ROOT/llama3-8b" --json "$OUT/hf-llama3-8b.json"
run_stage attention 40 120 python3 benchmarks/attention_bench.py --roofline "$OUT/roofline.json" --json "$OUT/attention.json"
run_stage layer-ops 20 60 python3 benchmarks/layer_ops_bench.py --json "$OUT/layer_ops.json"
run_stage ckpt-1b 30 90 python3 benchmarks/make_checkpoint.py llama3.2-1b "$CKPT_ROOT/llama3.2-1b"
run_stage lmport-1b 90 200 bash benchmarks/serve_and_bench.sh "$CKPT_ROOT/llama3.2-1b" llama3.2-1b "$OUT" "$PORT"
# a soak on the 1B: steady mixed load (streams, plain, disconnects, bad requests) with RSS and GPU memory sampled
run_stage soak-1b 100 240 python3 benchmarks/soak.py --model-id "$CKPT_ROOT/llama3.2-1b" --duration "${SOAK_DURATION_S:-120}" --concurrency 64 \
  --sample-every 15 --mix stream=0.45,plain=0.3,disconnect=0.15,bad=0.1 --max-new-tokens 16 128 \
  --json "$OUT/soak-1b.json" --server-log "$OUT/lmport-soak-1b-server.log" --pid-file "$OUT/lmport-soak-1b.pid" \
  -- --dtype bfloat16 --max-total-tokens 2048 --max-concurrent-requests 1024
# structured output (issue 13): 64 concurrent JSON-schema requests vs 64 free ones, then the same with a tiny 2-layer
# model (worst case). Grammars need a real tokenizer: the default model's (Gemma-3 270M, 262k tokens) over random
# weights of its shape, built from a folder of its config and tokenizer files carried to the machine:
#   on a machine where `lmport launch` has run once, from ~/.cache/lmport/gguf/gemma-3-270m-*/, copy config.json,
#   tokenizer_config.json, chat_template.jinja, generation_config.json and `gzip -c tokenizer.json > tokenizer.json.gz`
#   into .gpu-assets/gemma3-270m/ (git-ignored; carry it). Without it the stages read the installed default model.
GEMMA_LIKE_SRC=${GEMMA_LIKE_SRC:-.gpu-assets/gemma3-270m}
if [ -d "$GEMMA_LIKE_SRC" ]; then
  run_stage ckpt-gemma3 20 120 python3 benchmarks/make_checkpoint.py --like "$GEMMA_LIKE_SRC" "$CKPT_ROOT/gemma3-270m"
fi
STRUCTURED_MODEL=()
[ -f "$CKPT_ROOT/gemma3-270m/config.json" ] && STRUCTURED_MODEL=(--model-id "$CKPT_ROOT/gemma3-270m")
run_stage structured 60 200 python3 benchmarks/structured_bench.py "${STRUCTURED_MODEL[@]}" --dtype bfloat16 --concurrency 64 --requests 256 --output-len 128 --json "$OUT/structured.json"
run_stage structured-tiny 40 120 python3 benchmarks/structured_bench.py "${STRUCTURED_MODEL[@]}" --tiny 256 --dtype bfloat16 --concurrency 64 --requests 256 --output-len 128 --compile-repeats 5 --json "$OUT/structured-tiny.json"
# speculative decoding, batch 1 on the 8B shape: plain, a draft identical to the target (the overhead
# ceiling: every draft accepted), n-gram lookup on a repetitive and a random prompt (needs ckpt-8b; roofline for the ratio;
# SPEC_MODEL=$CKPT_ROOT/llama3.2-1b measures the 1B shape instead)
SPEC_MODEL=${SPEC_MODEL:-$CKPT_ROOT/llama3-8b}
run_stage speculative 60 300 python3 benchmarks/speculative_bench.py --model "$SPEC_MODEL" --speculate 4 \
  --roofline "$OUT/roofline.json" --json "$OUT/speculative-$(basename "$SPEC_MODEL").json"
run_stage hf-1b 60 150 python3 benchmarks/hf_baseline.py --model "$CKPT_ROOT/llama3.2-1b" --json "$OUT/hf-llama3.2-1b.json"

log "suite done in $(( $(date +%s) - START ))s"
echo
python3 benchmarks/summarize.py "$OUT" || cat "$STAGES_FILE"
if ls "$OUT"/lmport-llama3-8b-*-b1.json > /dev/null 2>&1; then
  echo
  python3 benchmarks/quant_bench.py report "$OUT"
fi
