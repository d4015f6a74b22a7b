#!/usr/bin/env bash
# W1 through the Ray Serve service on one GPU machine that has no internet (docs/benchmarks.md).
# Ray and the paths: bench/gpu_ray_env.sh (wheels it expects, and where).
# Writes the service log and both benchmark tables to $OUT.
set -u
source bench/gpu_ray_env.sh
python3 bench/gpu_bench.py --write-model-dir /tmp/w1-model
# Offline W1 on this machine first, for the served / offline ratio (same engine settings, no baseline).
python3 bench/gpu_bench.py --skip-baseline --check-requests 0 --single-tokens 0 --out "$OUT/w1_offline.json" \
    2>&1 | tail -3
serve_run bench/serve_w1_gpu.yaml > "$OUT/serve.log" 2>&1 &  # stops on the SIGINT below (gpu_ray_env.sh)
SERVE_PID=$!
started=$(date +%s)
until curl -sf -m 2 http://127.0.0.1:8000/v1/models > /dev/null; do
    sleep 2
    if ! kill -0 $SERVE_PID 2>/dev/null || [ $(( $(date +%s) - started )) -gt 400 ]; then
        echo "service did not come up"; tail -30 "$OUT/serve.log"; kill -INT $SERVE_PID 2>/dev/null; exit 1
    fi
done
echo "service up after $(( $(date +%s) - started )) s"
W1="--num-requests 512 --concurrency 512 --prompt-lens 64 1024 --vocab-size 128000 --max-tokens 256"
python3 bench/serve_bench.py $W1 2>&1 | tee "$OUT/serve_w1_stream.md" | tail -14
python3 bench/serve_bench.py $W1 --no-stream 2>&1 | tee "$OUT/serve_w1_nostream.md" | tail -14
stop_serve_run $SERVE_PID  # gpu_ray_env.sh
grep -E "memory plan|compiled|captured|serving|engine core" "$OUT/serve.log" | tail -8
python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
offline = json.load(open(f"{out}/w1_offline.json"))["results"][0]["output_tokens_per_s"]
print("| W1 | output tok/s | served / offline |\n|---|---|---|")
print(f"| offline (gpu_bench.py) | {offline:.1f} | 1 |")
for name in ("stream", "nostream"):
    match = re.search(r"\| output tokens/s \| ([\d.]+) \|", open(f"{out}/serve_w1_{name}.md").read())
    served = float(match.group(1)) if match else float("nan")
    print(f"| served, {name} | {served:.1f} | {served / offline:.2f} |")
PY
