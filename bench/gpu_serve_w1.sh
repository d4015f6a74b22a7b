#!/usr/bin/env bash
# W1 through the Ray Serve service on one GPU machine that has no internet (docs/benchmarks.md).
# Ray and the paths: bench/gpu_ray_env.sh (wheels it expects, and where).
#
#   bash bench/gpu_serve_w1.sh [VARIANT ...]
#
# Offline W1 first (gpu_bench.py, no baseline), then for each VARIANT the service is started, W1 is sent
# streamed and then with one response per request, and the service is stopped. A VARIANT is a Serve
# config, optionally followed by environment settings for its `serve run` (Ray reads them when it
# starts), separated by colons:
#   bench/serve_w1_gpu.yaml                                   (the default, when no VARIANT is given)
#   bench/serve_w1_gpu.yaml:RAY_SERVE_THROUGHPUT_OPTIMIZED=1
# Writes the offline result, each variant's service log and benchmark tables to $OUT; prints one table,
# then bench/request_log.py's account of when the requests reached the engine.
set -u
source bench/gpu_ray_env.sh
[ $# -eq 0 ] && set -- bench/serve_w1_gpu.yaml
python3 bench/gpu_bench.py --write-model-dir /tmp/w1-model
# Offline W1 on this machine first, for the served / offline ratio (same engine settings, no baseline).
python3 bench/gpu_bench.py --skip-baseline --check-requests 0 --single-tokens 0 --out "$OUT/w1_offline.json" \
    2>&1 | tail -3
W1="--num-requests 512 --concurrency 512 --prompt-lens 64 1024 --vocab-size 128000 --max-tokens 256"
n=0
for variant in "$@"; do
    n=$((n + 1))
    IFS=: read -r -a parts <<< "$variant"
    config=${parts[0]}
    settings=("${parts[@]:1}")
    echo "$variant" > "$OUT/variant$n.txt"
    echo "=== variant $n: $config ${settings[*]:-}"
    # The settings reach Ray's processes through serve run's environment (it starts the local Ray).
    (
        [ ${#settings[@]} -gt 0 ] && export "${settings[@]}"
        serve_run "$config"  # execs: $! is serve run; stops on the SIGINT below (gpu_ray_env.sh)
    ) > "$OUT/serve$n.log" 2>&1 &
    SERVE_PID=$!
    started=$(date +%s)
    until curl -sf -m 2 http://127.0.0.1:8000/v1/models > /dev/null; do
        sleep 2
        if ! kill -0 $SERVE_PID 2>/dev/null || [ $(( $(date +%s) - started )) -gt 400 ]; then
            echo "service did not come up"; tail -30 "$OUT/serve$n.log"; kill -INT $SERVE_PID 2>/dev/null; exit 1
        fi
    done
    echo "service up after $(( $(date +%s) - started )) s"
    python3 bench/serve_bench.py $W1 2>&1 | tee "$OUT/serve_w1_stream$n.md" | tail -12
    python3 bench/serve_bench.py $W1 --no-stream 2>&1 | tee "$OUT/serve_w1_nostream$n.md" | tail -12
    stop_serve_run $SERVE_PID  # gpu_ray_env.sh
    grep -E "memory plan|compiled|captured|serving|engine core|Throughput optimized" "$OUT/serve$n.log" | tail -8
done
python3 - "$OUT" "$n" <<'PY'
import json, re, sys
out, count = sys.argv[1], int(sys.argv[2])
offline = json.load(open(f"{out}/w1_offline.json"))["results"][0]["output_tokens_per_s"]
print("| W1 | output tok/s | served / offline |\n|---|---|---|")
print(f"| offline (gpu_bench.py) | {offline:.1f} | 1 |")
for n in range(1, count + 1):
    variant = open(f"{out}/variant{n}.txt").read().strip()
    for name in ("stream", "nostream"):
        match = re.search(r"\| output tokens/s \| ([\d.]+) \|", open(f"{out}/serve_w1_{name}{n}.md").read())
        served = float(match.group(1)) if match else float("nan")
        print(f"| {variant}, {name} | {served:.1f} | {served / offline:.2f} |")
PY
# When the requests reached the engine replica, per variant and burst (streamed, then one response each).
python3 bench/request_log.py "$OUT"/serve[0-9]*.log
