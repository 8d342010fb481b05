#!/usr/bin/env bash
# Serve one checkpoint with `lmport launch` and load it with `lmport bench`: batch-1 decode
# (8 requests, one at a time) and the load test (256 requests of 512 in / 128 out, 256 at once).
# The graph buckets go up to 256 (the default decode batch sizes of the CUDA backend).
#   bash benchmarks/serve_and_bench.sh CHECKPOINT NAME OUT_DIR [PORT]
# Writes OUT_DIR/lmport-NAME-{server.log,b1.json,load.json}; the server is stopped on the way
# out, and its PID is left in OUT_DIR/lmport-NAME.pid so a caller can make sure.
set -u
CKPT=$1; NAME=$2; OUT=$3; PORT=${4:-3000}
# the workload (override only to try the script on a CPU with a tiny model)
IN=${BENCH_INPUT_LEN:-512}; GEN=${BENCH_OUTPUT_LEN:-128}; N=${BENCH_NUM_PROMPTS:-256}; CONC=${BENCH_CONCURRENCY:-256}
DTYPE=${LAUNCH_DTYPE:-bfloat16}; MAX_TOTAL=${LAUNCH_MAX_TOTAL_TOKENS:-2048}
PREFILL=${LAUNCH_PREFILL_TOKENS:-8192}  # 16 prompts of 512 per prefill step
URL="http://127.0.0.1:$PORT"
PIDFILE="$OUT/lmport-$NAME.pid"
SERVER_LOG="$OUT/lmport-$NAME-server.log"

stop_server() {
  if [ -f "$PIDFILE" ]; then
    local pid; pid=$(cat "$PIDFILE")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$PIDFILE"
  fi
}
trap stop_server EXIT

echo "[$(date +%T)] launching $NAME from $CKPT on port $PORT"
# shellcheck disable=SC2086  # LMPORT_LAUNCH_ARGS is a list of extra flags
python3 -m lmport.cli launch --model-id "$CKPT" --dtype "$DTYPE" --hostname 127.0.0.1 --port "$PORT" \
  --max-concurrent-requests 1024 --max-batch-size "$CONC" --cuda-graphs 1,2,4,8,16,32,64,128,256 \
  --max-input-tokens $(( MAX_TOTAL / 2 )) --max-total-tokens "$MAX_TOTAL" --max-batch-prefill-tokens "$PREFILL" \
  ${LMPORT_LAUNCH_ARGS:-} > "$SERVER_LOG" 2>&1 &
echo $! > "$PIDFILE"

healthy() { python3 -c "import httpx, sys; sys.exit(0 if httpx.get('$URL/health', timeout=2).status_code == 200 else 1)" 2>/dev/null; }
t0=$(date +%s)
until healthy; do
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "server exited during start-up; its log ends with:"; tail -n 40 "$SERVER_LOG"; exit 3
  fi
  sleep 2
done
echo "[$(date +%T)] server healthy after $(( $(date +%s) - t0 )) s"
python3 -c "import httpx, json; print(json.dumps(httpx.get('$URL/info', timeout=10).json()))" > "$OUT/lmport-$NAME-info.json" 2>/dev/null

rc=0
echo "[$(date +%T)] batch-1 decode: 8 requests of $IN in / $GEN out, one at a time"
python3 -m lmport.cli bench --base-url "$URL" --max-concurrency 1 --num-prompts 8 --input-len "$IN" --output-len "$GEN" \
  --tokenizer "$CKPT" --no-progress --result-json "$OUT/lmport-$NAME-b1.json" || rc=$?
echo "[$(date +%T)] load: $N requests of $IN in / $GEN out, concurrency $CONC"
# the client's own CPU time: a load generator that saturates its core would understate the server
TIMEFORMAT="load generator: %U s user + %S s system CPU over %R s wall"
time python3 -m lmport.cli bench --base-url "$URL" --max-concurrency "$CONC" --num-prompts "$N" --input-len "$IN" --output-len "$GEN" \
  --tokenizer "$CKPT" --no-progress --result-json "$OUT/lmport-$NAME-load.json" || rc=$?
# which processes hold GPU memory (the engine process; the HTTP parent should hold none)
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$OUT/lmport-$NAME-gpu-apps.txt" 2>&1
echo "server pid $(cat "$PIDFILE")" >> "$OUT/lmport-$NAME-gpu-apps.txt"
echo "[$(date +%T)] done (bench exit status $rc); server log tail:"
tail -n 15 "$SERVER_LOG"
exit $rc
