#!/usr/bin/env bash
# Issue 10, runs 2 and 3: W1 through the Ray Serve service on two engine replicas, one GPU each, on a 2-GPU
# machine that has no internet; one device call:  bash bench/gpu_serve_2replicas.sh
#   run 2:    W1 (512 requests at once, streamed) while bench/serve_watch.py samples each replica's KV usage,
#             running and finished requests (Ray's metrics agent) and Serve's replica states; then twice W1
#             (1024 at once: the capacity of two replicas; RUN_DOUBLE=0 drops it, and it is skipped when
#             start-up left too little of BUDGET_S).
#   run 3:    W1 again; KILL_AFTER_S into it the watcher SIGKILLs the busiest engine replica and records when
#             Serve runs its replacement and when that finishes its first request (serve_bench counts the
#             failed streams).
# Ray: installed as bench/gpu_serve_w1.sh does (bench/gpu_ray_env.sh), started here with `ray start` (metrics
# agent on METRICS_PORT, dashboard for Serve's replica list), `serve run` attached to it. At the end serve run
# gets SIGINT (killed past 60 s), then `ray stop`, then whatever process of this run is left gets killed.
# $OUT (8 files): serve.log (a digest), run2.md/.json, run2x2.md/.json, run3.md/.json, summary.md; the summary
# prints last.
# CPU check of the same steps: CPU=1 bash bench/gpu_serve_2replicas.sh (the Ray of .venv, the demo model on
# two CPU replicas, bench/serve_cpu_2replicas.yaml, a small load; Ray's own processes stopped by PID).
# Every knob below is an environment variable; the defaults are the GPU run's.
set -u
if [ "${CPU:-0}" = 1 ]; then
    : "${RAY_INSTALL:=0}" "${YAML:=bench/serve_cpu_2replicas.yaml}" "${MODEL_DIR:=}" "${RAY_CPUS:=8}"
    : "${HTTP_PORT:=8100}" "${RAY_PORT:=6390}" "${DASHBOARD_PORT:=8275}" "${METRICS_PORT:=8190}"
    : "${NUM_REQUESTS:=64}" "${MAX_TOKENS:=160}" "${PROMPT_LENS:=16 64}" "${VOCAB_SIZE:=3000}"
    : "${RAY_STOP:=own}" "${STARTUP_TIMEOUT_S:=240}"
    export PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
YAML=${YAML:-bench/serve_w1_gpu_2replicas.yaml}   # the service: two replicas of EngineReplica
MODEL_DIR=${MODEL_DIR-/tmp/w1-model}              # written by gpu_bench.py --write-model-dir; empty: skipped
RAY_CPUS=${RAY_CPUS:-}                            # ray start --num-cpus; empty: Ray counts them
HTTP_PORT=${HTTP_PORT:-8000}                      # must be the YAML's http_options.port
RAY_PORT=${RAY_PORT:-6379}; DASHBOARD_PORT=${DASHBOARD_PORT:-8265}; METRICS_PORT=${METRICS_PORT:-8090}
NUM_REQUESTS=${NUM_REQUESTS:-512}                 # W1: all at once (concurrency = requests)
MAX_TOKENS=${MAX_TOKENS:-256}; PROMPT_LENS=${PROMPT_LENS:-64 1024}; VOCAB_SIZE=${VOCAB_SIZE:-128000}
RUN_DOUBLE=${RUN_DOUBLE:-1}                       # 1: also run 2 with twice NUM_REQUESTS
KILL_AFTER_S=${KILL_AFTER_S:-auto}                # run 3's kill, whole seconds into the load; auto: 40% of run 2's
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-300}       # both replicas RUNNING (8B: compile + CUDA graphs on each GPU)
REQUEST_TIMEOUT_S=${REQUEST_TIMEOUT_S:-180}       # serve_bench: longest one request may take
RECOVERY_TIMEOUT_S=${RECOVERY_TIMEOUT_S:-240}     # run 3: longest wait for the replacement's first finished request
BUDGET_S=${BUDGET_S:-540}                         # the whole script; the double run is skipped to stay inside it
RAY_STOP=${RAY_STOP:-all}                         # all: `ray stop` (every Ray of this machine); own: this run's only

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
source bench/gpu_ray_env.sh   # sets OUT, PATH, PYTHONPATH
LOGS=$(mktemp -d /tmp/pagedserve-2rep.XXXXXX)
URL=http://127.0.0.1:$HTTP_PORT
WATCH="--url $URL --dashboard-url http://127.0.0.1:$DASHBOARD_PORT --metrics-url http://127.0.0.1:$METRICS_PORT/metrics"
STOP_RESERVE_S=80   # serve run's stop (up to 60 s) and ray stop
SERVE_PID=""; RAY_SID=""; STARTUP_S=""; STOP_NOTE=""

ray_pids() {  # live processes of this run's Ray: ray start ran in a session of its own, which they all keep
    [ -n "$RAY_SID" ] || return 0  # (workers get process groups of their own, not sessions)
    local stat line p
    for stat in /proc/[0-9]*/stat; do
        # Fields 3 and 6 are the state and the session; the command name (field 2) may hold spaces: split after ')'.
        read -r line < "$stat" 2>/dev/null || continue
        set -- ${line##*)}
        [ "${4:-}" = "$RAY_SID" ] && [ "$1" != Z ] && { p=${stat#/proc/}; echo "${p%/stat}"; }
    done
}

log_digest() {  # the service log without its per-request lines, a message repeated (with its traceback) kept
    # thrice (run 3's failed requests give the ingress one warning each), then its first and last 150 lines
    awk '/request_finished|CALL generate|(POST|GET) \/v1\// { next }
         / -- / && / (DEBUG|INFO|WARNING|ERROR|SUCC) / {  # a record; lines without " -- " continue it
             key = $0; sub(/^.* -- /, "", key); gsub(/[0-9]+/, "#", key); key = substr(key, 1, 80)
             actor = ""; if (match($0, /\([A-Za-z_:]+ pid=/)) actor = substr($0, RSTART + 1, RLENGTH - 6)
             key = actor ": " key; skip = ++seen[key] > 3; if (skip) skipped[key]++
         }
         skip { next }
         { print }
         END { for (key in skipped) print "(" skipped[key] " more records like \"" key "\" left out)" }' \
        "$1" 2>/dev/null > "$LOGS/serve_digest.log"
    if [ "$(wc -l < "$LOGS/serve_digest.log")" -le 300 ]; then cat "$LOGS/serve_digest.log"
    else head -150 "$LOGS/serve_digest.log"; echo "..."; tail -150 "$LOGS/serve_digest.log"; fi
}

finish() {  # stop everything this run started, then write and print the summary (last)
    trap - EXIT INT TERM
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
        STOP_NOTE=$(stop_serve_run "$SERVE_PID")  # gpu_ray_env.sh
        echo "$STOP_NOTE"
    fi
    if [ "$RAY_STOP" = all ]; then ray stop > "$LOGS/ray_stop.log" 2>&1; fi
    local pids left
    pids=$(ray_pids)
    if [ -n "$pids" ]; then
        kill -TERM $pids 2>/dev/null
        for _ in $(seq 15); do sleep 1; pids=$(ray_pids); [ -z "$pids" ] && break; done
    fi
    if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; sleep 2; fi
    # `ray stop` also forgets the cluster; stopped by PID, its record would send the next ray.init() or
    # `serve` command on this machine to a dead address (they hang there).
    if grep -qs ":$RAY_PORT\$" /tmp/ray/ray_current_cluster; then rm -f /tmp/ray/ray_current_cluster; fi
    left=$(ray_pids | wc -l)
    { cat "$LOGS/ray_start.log" 2>/dev/null; echo "..."; log_digest "$LOGS/serve.log"; } > "$OUT/serve.log"
    local runs=""
    for name in run2 run2x2 run3; do [ -f "$OUT/$name.json" ] && runs="$runs $OUT/$name.json"; done
    {
        [ -n "$runs" ] && python3 bench/serve_watch.py summary $runs
        echo
        echo "Start-up: ${STARTUP_S:-?} s to both replicas RUNNING ($YAML)." \
             "${STOP_NOTE:-serve run not running at the end}." \
             "Processes of this run left after the stop: $left. Whole script: $(elapsed) s."
    } > "$OUT/summary.md"
    echo; cat "$OUT/summary.md"
}
trap finish EXIT
trap 'exit 130' INT TERM

if [ -n "$MODEL_DIR" ]; then python3 bench/gpu_bench.py --write-model-dir "$MODEL_DIR" || exit 1; fi

# In a session of its own (its id written to ray.sid), so that the clean-up finds every process of this Ray.
setsid bash -c 'echo $$ > "$0"; exec "$@"' "$LOGS/ray.sid" \
    ray start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" --disable-usage-stats \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --metrics-export-port "$METRICS_PORT" \
    ${RAY_CPUS:+--num-cpus "$RAY_CPUS"} --system-config '{"metrics_report_interval_ms": 1000}' \
    > "$LOGS/ray_start.log" 2>&1 || { echo "ray start failed"; tail -20 "$LOGS/ray_start.log"; exit 1; }
RAY_SID=$(cat "$LOGS/ray.sid")
echo "ray started after $(elapsed) s"
# serve_run (gpu_ray_env.sh): a background serve run that the SIGINT at the end stops as Ctrl-C would.
serve_run --address "127.0.0.1:$RAY_PORT" "$YAML" > "$LOGS/serve.log" 2>&1 &
SERVE_PID=$!
up_started=$(date +%s)
if ! python3 bench/serve_watch.py wait $WATCH --replicas 2 --timeout-s "$STARTUP_TIMEOUT_S" --serve-pid $SERVE_PID; then
    grep -v "request_finished" "$LOGS/serve.log" | tail -30; exit 1
fi
STARTUP_S=$(( $(date +%s) - up_started ))

load() {  # load N: serve_bench's W1 command with N requests at once
    echo python3 bench/serve_bench.py --url "$URL" --num-requests "$1" --concurrency "$1" --prompt-lens $PROMPT_LENS \
        --vocab-size "$VOCAB_SIZE" --max-tokens "$MAX_TOKENS" --request-timeout-s "$REQUEST_TIMEOUT_S"
}
json_field() {  # json_field FILE KEY: a headline number of serve_bench's table, from a watch file
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['load'].get(sys.argv[2], ''))" "$@" 2>/dev/null
}
remaining() { echo $(( BUDGET_S - $(elapsed) - STOP_RESERVE_S )); }

echo "== run 2: W1, $NUM_REQUESTS requests on two replicas ($(elapsed) s)"
python3 bench/serve_watch.py watch $WATCH --out "$OUT/run2.json" --load-out "$OUT/run2.md" \
    --name "run 2: W1 ($NUM_REQUESTS)" --max-s $(( REQUEST_TIMEOUT_S + 30 )) -- $(load "$NUM_REQUESTS")
tail -12 "$OUT/run2.md"
RUN2_WALL_S=$(json_field "$OUT/run2.json" wall_s); RUN2_WALL_S=${RUN2_WALL_S%.*}; RUN2_WALL_S=${RUN2_WALL_S:-30}

# Run 3 needs about a run 2, a replica start-up and the tail; the double run about two run 2s.
RUN3_NEED_S=$(( RUN2_WALL_S + STARTUP_S + 30 )); DOUBLE_NEED_S=$(( 2 * RUN2_WALL_S + 20 ))
if [ "$RUN_DOUBLE" = 1 ] && [ $(remaining) -ge $(( RUN3_NEED_S + DOUBLE_NEED_S )) ]; then
    echo "== run 2, twice W1: $(( 2 * NUM_REQUESTS )) requests ($(elapsed) s)"
    python3 bench/serve_watch.py watch $WATCH --out "$OUT/run2x2.json" --load-out "$OUT/run2x2.md" \
        --name "run 2: twice W1 ($(( 2 * NUM_REQUESTS )))" --max-s $(( REQUEST_TIMEOUT_S + 30 )) \
        -- $(load $(( 2 * NUM_REQUESTS )))
    tail -12 "$OUT/run2x2.md"
elif [ "$RUN_DOUBLE" = 1 ]; then
    echo "== twice W1 skipped: $(remaining) s left of BUDGET_S for runs, run 3 needs about $RUN3_NEED_S"
fi

if [ "$KILL_AFTER_S" = auto ]; then
    KILL_AFTER_S=$(( RUN2_WALL_S * 2 / 5 )); [ "$KILL_AFTER_S" -lt 2 ] && KILL_AFTER_S=2
fi
LEFT_S=$(remaining)
RECOVERY_S=$(( LEFT_S - KILL_AFTER_S - 10 ))
[ "$RECOVERY_S" -gt "$RECOVERY_TIMEOUT_S" ] && RECOVERY_S=$RECOVERY_TIMEOUT_S
[ "$RECOVERY_S" -lt 30 ] && RECOVERY_S=30
echo "== run 3: W1, one replica SIGKILLed ${KILL_AFTER_S} s in; recovery watched for up to $RECOVERY_S s ($(elapsed) s)"
python3 bench/serve_watch.py watch $WATCH --out "$OUT/run3.json" --load-out "$OUT/run3.md" \
    --name "run 3: W1 ($NUM_REQUESTS), a replica killed" --kill-replica-after "$KILL_AFTER_S" \
    --recovery-timeout-s "$RECOVERY_S" --max-s $(( LEFT_S > 60 ? LEFT_S : 60 )) -- $(load "$NUM_REQUESTS")
tail -12 "$OUT/run3.md"
