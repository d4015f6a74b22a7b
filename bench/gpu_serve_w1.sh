#!/usr/bin/env bash
# W1 through the Ray Serve service on one GPU machine that has no internet (docs/benchmarks.md).
# Wheels: bench/gpu_serve_wheels.txt lists them and how to fetch them.
# Expects: the ray wheel's first part in /tmp/ray1 (copied there by the previous call on the same
# machine), the second part and ray[serve]'s other wheels in .ray2/, pydantic's wheels in .whl/.
# Writes the service log and both benchmark tables to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
W=ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
mkdir -p /tmp/raywhl
cat /tmp/ray1/ray-*.part-* .ray2/ray-*.part-* > /tmp/raywhl/$W
echo "b951b40965947a63615830916be04f26440d234de1e9a29dbf2155d03fa9ad2a  /tmp/raywhl/$W" | sha256sum -c - || exit 1
# One pip call: --target --upgrade replaces whole top-level folders, so a second call would drop some.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/raywhl/$W .ray2/*.whl .whl/*.whl || exit 1
mkdir -p /tmp/pp/pagedserve && for d in config cache engine serve_app; do ln -sfn "$PWD/$d" /tmp/pp/pagedserve/$d; done
export PYTHONPATH=/tmp/pp:/tmp/site PATH=/tmp/site/bin:$PATH RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
python3 bench/gpu_bench.py --write-model-dir /tmp/w1-model
# Offline W1 on this machine first, for the served / offline ratio (same engine settings, no baseline).
python3 bench/gpu_bench.py --skip-baseline --check-requests 0 --single-tokens 0 --out "$OUT/w1_offline.json" \
    2>&1 | tail -3
serve run bench/serve_w1_gpu.yaml > "$OUT/serve.log" 2>&1 &
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
# Ctrl-C, as a user stops it; how long the stop takes is part of the record (killed only past 60 s).
kill -INT $SERVE_PID; stop_started=$(date +%s)
while kill -0 $SERVE_PID 2>/dev/null && [ $(( $(date +%s) - stop_started )) -lt 60 ]; do sleep 1; done
if kill -0 $SERVE_PID 2>/dev/null; then echo "serve run still running 60 s after SIGINT: killed"; kill -9 $SERVE_PID
else echo "serve run stopped $(( $(date +%s) - stop_started )) s after SIGINT"; fi
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
