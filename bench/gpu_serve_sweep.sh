#!/usr/bin/env bash
# Issue 24: goodput of the service on one H200, the highest Poisson rate at which TTFT p99 <= 1 s, TPOT p99
# <= 50 ms and ITL p99 <= 100 ms all hold (bench/serve_bench.py --sweep-rates), for two workloads, streamed:
#   uniform:  W1's prompts (random token ids, lengths uniform in 64..1024), 128 new tokens each
#   sharegpt: random token ids, lognormal lengths of mean 200 in / 180 out (serve_bench.py's docstring)
# One device call on a machine that has no internet:  bash bench/gpu_serve_sweep.sh
# Behind Ray's HAProxy ingress instead of Serve's Python proxy (each ingress replica then writes up to 3,000
# events/s, serve_app/event_pacer.py):  RAY_SERVE_ENABLE_HA_PROXY=1 bash bench/gpu_serve_sweep.sh
# Ray as bench/gpu_serve_w1.sh installs it (bench/gpu_ray_env.sh: the wheels it expects, and where). The service
# (bench/serve_w1_gpu.yaml) starts once, serves both sweeps, and gets SIGINT at the end (killed past 60 s).
# Each sweep runs its rates upwards and stops after STOP_AFTER_MISS missed passes in a row, or before a pass
# that would end past its share of the budget; the rates left out are listed under its table.
# $OUT: serve.log (without its per-request lines), sweep_uniform.md/.json, sweep_sharegpt.md/.json; both
# goodput lines print last.
# CPU check of the same steps: CPU=1 bash bench/gpu_serve_sweep.sh (the Ray of .venv with 8 logical CPUs, the
# demo model on one CPU replica, small rates and short passes, every rate run).
#
# Budget of the GPU call (600 s at most; BUDGET_S=560 leaves the rest for the last prints and $OUT's copy):
#   wheels and the model's config (gpu_bench.py --write-model-dir)               ~40 s
#   service start: weights, torch.compile, CUDA graphs                           60-120 s (at most STARTUP_TIMEOUT_S)
#   serve run's stop                                                             up to 60 s (STOP_RESERVE_S)
#   left for the sweeps: 560 - 40 - 120 - 60 = about 340 s, of which
#   uniform, 45% (<= 160 s): a pass is 20 s of arrivals + its drain (the last requests' 128 tokens, 3-15 s)
#       + a 2 s gap, about 30 s: 10, 20, 25, 30 and 35 req/s fit; the earlier single-rate runs had ITL p99
#       past 100 ms from 30 req/s on, so the first miss is expected inside them.
#   sharegpt, the rest (~180 s and what uniform left): a pass is 15 s + its drain (its longest outputs,
#       ~1,500 tokens at 20-30 ms, up to ~45 s) + 2 s, about 40-60 s: 3-4 passes of 20, 40, 60, 80, 100 req/s.
# Every knob below is an environment variable; the defaults are the GPU run's. YAML_SET="PATH=VALUE ..." serves a
# copy of the YAML with values set (dotted paths, list items by index), e.g. an A/B of the stream channel's
# transport or the prefill rule:
#   YAML_SET="applications.0.args.stream_channel_transport=ray applications.0.args.engine.prefill_step_time_ratio=1.25"
set -u
if [ "${CPU:-0}" = 1 ]; then
    : "${RAY_INSTALL:=0}" "${YAML:=}" "${MODEL_DIR:=}" "${OUT:=/tmp/pagedserve-sweep-cpu}"
    : "${UNIFORM_RATES:=1 2 4}" "${SHAREGPT_RATES:=1 2 4}" "${UNIFORM_DURATION_S:=10}" "${SHAREGPT_DURATION_S:=10}"
    : "${PROMPT_LENS:=16 128}" "${VOCAB_SIZE:=3000}" "${MAX_TOKENS:=16}" "${SHAREGPT_MEANS:=48 24}"
    : "${STOP_AFTER_MISS:=0}" "${WARMUP_REQUESTS:=4}" "${STARTUP_TIMEOUT_S:=300}" "${BUDGET_S:=900}"
    export PATH=$PWD/.venv/bin:$PATH OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    export RAY_OVERRIDE_RESOURCES='{"CPU": 8}'  # logical CPUs for serve run's local Ray: replicas never wait
fi
YAML=${YAML-bench/serve_w1_gpu.yaml}             # the service; empty: a one-replica demo-model YAML written here
MODEL_DIR=${MODEL_DIR-/tmp/w1-model}             # written by gpu_bench.py --write-model-dir; empty: skipped
UNIFORM_RATES=${UNIFORM_RATES:-10 20 25 30 35 40 50}
SHAREGPT_RATES=${SHAREGPT_RATES:-20 40 60 80 100}
UNIFORM_DURATION_S=${UNIFORM_DURATION_S:-20}; SHAREGPT_DURATION_S=${SHAREGPT_DURATION_S:-15}
PROMPT_LENS=${PROMPT_LENS:-64 1024}; VOCAB_SIZE=${VOCAB_SIZE:-128000}; MAX_TOKENS=${MAX_TOKENS:-128}
SHAREGPT_MEANS=${SHAREGPT_MEANS:-200 180}        # mean prompt and output lengths of the sharegpt workload
STOP_AFTER_MISS=${STOP_AFTER_MISS:-1}            # 0: run every rate
WARMUP_REQUESTS=${WARMUP_REQUESTS:-16}           # sent at once before each sweep, unmeasured
REQUEST_TIMEOUT_S=${REQUEST_TIMEOUT_S:-120}      # a stalled stream fails its pass instead of holding the sweep
STARTUP_TIMEOUT_S=${STARTUP_TIMEOUT_S:-300}
BUDGET_S=${BUDGET_S:-560}                        # the whole script
UNIFORM_SHARE_PERCENT=${UNIFORM_SHARE_PERCENT:-45}; UNIFORM_MAX_S=${UNIFORM_MAX_S:-160}

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
source bench/gpu_ray_env.sh   # sets OUT, PATH, PYTHONPATH; defines serve_run, stop_serve_run
LOGS=$(mktemp -d /tmp/pagedserve-sweep.XXXXXX)
STOP_RESERVE_S=70   # serve run's stop (up to 60 s) and the summary
SERVE_PID=""

if [ -z "$YAML" ]; then  # CPU: the demo model on one replica, HTTP on a free port
    HTTP_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    YAML=$LOGS/serve_cpu_sweep.yaml
    cat > "$YAML" <<EOF
proxy_location: HeadOnly
http_options: {host: 127.0.0.1, port: $HTTP_PORT, request_timeout_s: 300}
applications:
  - name: pagedserve
    route_prefix: /
    import_path: pagedserve.serve_app:app
    args:
      num_replicas: 1
      max_ongoing_requests: 256
      router: {max_queued_requests: 256, queue_timeout_s: 120}
      engine: {model: null, enable_prefix_caching: false, engine_process: false}
EOF
fi
if [ -n "${YAML_SET:-}" ]; then  # "PATH=VALUE ...": a copy of the YAML with those values set (YAML_SET below)
    python3 - "$YAML" "$LOGS/serve_set.yaml" $YAML_SET <<'PY' || exit 1
import sys, yaml
source, target, *items = sys.argv[1:]
document = yaml.safe_load(open(source))
for item in items:
    path, value = item.split("=", 1)
    node, keys = document, path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[keys[-1]] = yaml.safe_load(value)
    print(f"YAML_SET: {path} = {node[keys[-1]]!r}")
yaml.safe_dump(document, open(target, "w"), sort_keys=False)
PY
    YAML=$LOGS/serve_set.yaml
fi
HTTP_PORT=$(python3 -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["http_options"]["port"])' "$YAML")
URL=http://127.0.0.1:$HTTP_PORT

finish() {  # stop the service, keep its log without the per-request lines, print both goodput lines last
    trap - EXIT INT TERM
    if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then stop_serve_run "$SERVE_PID"; fi  # gpu_ray_env.sh
    grep -v -E "request_finished|CALL submit|(POST|GET) /v1/" "$LOGS/serve.log" > "$OUT/serve.log" 2>/dev/null
    echo
    echo "Whole script: $(elapsed) s; service: $YAML"
    for workload in uniform sharegpt; do
        echo "$workload: $(grep -h '^goodput' "$OUT/sweep_$workload.md" 2>/dev/null || echo 'no goodput line (sweep not finished)')"
    done
}
trap finish EXIT
trap 'exit 130' INT TERM

if [ -n "$MODEL_DIR" ]; then python3 bench/gpu_bench.py --write-model-dir "$MODEL_DIR" || exit 1; fi
echo "== starting the service ($YAML) after $(elapsed) s"
# --address local: a Ray of its own, never one that `ray start` left on this machine. Its metrics agents export
# every second (Ray's default is slower), so that each pass's delays inside the service can be read after it.
export RAY_metrics_report_interval_ms=${RAY_metrics_report_interval_ms:-1000}
serve_run --address local "$YAML" > "$LOGS/serve.log" 2>&1 &
SERVE_PID=$!
up_started=$(date +%s)
until curl -sf -m 2 "$URL/v1/models" > /dev/null; do
    sleep 2
    if ! kill -0 "$SERVE_PID" 2>/dev/null || [ $(( $(date +%s) - up_started )) -gt "$STARTUP_TIMEOUT_S" ]; then
        echo "service did not come up"; grep -v "request_finished" "$LOGS/serve.log" | tail -30; exit 1
    fi
done
echo "service up after $(( $(date +%s) - up_started )) s"
grep -E "memory plan|compiled|captured|serving" "$LOGS/serve.log" | tail -4
# The cluster's metrics agents (its session folder says where), for serve_bench's "inside the service" lines:
# the stream channel's transit and the replicas' event loop lag per pass (bench/service_delays.py).
METRICS_ARGS=$(python3 -c 'import pathlib, sys; sys.path.insert(0, "bench"); import service_delays
print(" ".join("--metrics-url " + url for url in service_delays.discover_urls(pathlib.Path(sys.argv[1]))))' \
    "${RAY_SESSION_DIR:-/tmp/ray/session_latest}" 2>/dev/null)
echo "metrics: ${METRICS_ARGS:-none found}"

remaining() { echo $(( BUDGET_S - $(elapsed) - STOP_RESERVE_S )); }
sweep() {  # sweep NAME BUDGET_S DURATION_S RATES ARGS...: one serve_bench sweep, its table to $OUT/sweep_NAME.md
    local name=$1 budget_s=$2 duration_s=$3 rates=$4; shift 4
    echo "== $name sweep: rates $rates, passes of $duration_s s, budget $budget_s s ($(elapsed) s in)"
    python3 bench/serve_bench.py --url "$URL" --sweep-rates $rates --duration-s "$duration_s" \
        --stop-after-miss "$STOP_AFTER_MISS" --sweep-budget-s "$budget_s" --warmup-requests "$WARMUP_REQUESTS" \
        --request-timeout-s "$REQUEST_TIMEOUT_S" --vocab-size "$VOCAB_SIZE" --json-out "$OUT/sweep_$name.json" \
        $METRICS_ARGS "$@" \
        2>&1 | tee "$OUT/sweep_$name.md"
}

UNIFORM_BUDGET_S=$(( $(remaining) * UNIFORM_SHARE_PERCENT / 100 ))
[ "$UNIFORM_BUDGET_S" -gt "$UNIFORM_MAX_S" ] && UNIFORM_BUDGET_S=$UNIFORM_MAX_S
sweep uniform "$UNIFORM_BUDGET_S" "$UNIFORM_DURATION_S" "$UNIFORM_RATES" --prompt-lens $PROMPT_LENS \
    --max-tokens "$MAX_TOKENS"
# The sharegpt sweep's budget leaves time for its own start (imports, warm-up) out of what is left.
SHAREGPT_BUDGET_S=$(( $(remaining) - 15 ))
if [ "$SHAREGPT_BUDGET_S" -ge "$SHAREGPT_DURATION_S" ]; then
    sweep sharegpt "$SHAREGPT_BUDGET_S" "$SHAREGPT_DURATION_S" "$SHAREGPT_RATES" --workload sharegpt \
        --sharegpt-means $SHAREGPT_MEANS
else
    echo "== sharegpt sweep skipped: $SHAREGPT_BUDGET_S s left of BUDGET_S, a pass needs more than $SHAREGPT_DURATION_S"
fi
