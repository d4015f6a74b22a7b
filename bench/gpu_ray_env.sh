# Sourced by bench/gpu_serve_*.sh: Ray 2.60 with Serve and this checkout's pagedserve on the paths of a GPU
# machine that has no internet (wheels: bench/gpu_serve_wheels.txt lists them and how to fetch them).
# Expects: the ray wheel's first part in /tmp/ray1 (copied there by the previous call on the same machine),
# the second part and ray[serve]'s other wheels in .ray2/, pydantic's wheels in .whl/.
# RAY_INSTALL=0 installs nothing and uses the ray already on PATH (a CPU machine: PATH=.venv/bin:$PATH).
# Sets OUT (default /tmp/out, created), PYTHONPATH, PATH, RAY_AUTH_MODE=disabled, PYTHONUNBUFFERED=1;
# defines serve_run and stop_serve_run (below).
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ "${RAY_INSTALL:-1}" = 1 ]; then
    W=ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
    mkdir -p /tmp/raywhl
    cat /tmp/ray1/ray-*.part-* .ray2/ray-*.part-* > /tmp/raywhl/$W
    echo "b951b40965947a63615830916be04f26440d234de1e9a29dbf2155d03fa9ad2a  /tmp/raywhl/$W" | sha256sum -c - || exit 1
    # One pip call: --target --upgrade replaces whole top-level folders, so a second call would drop some. A wheel
    # in both folders (jsonschema, referencing, rpds-py) is passed once: pip refuses the same requirement twice.
    wheels=(.ray2/*.whl)
    for f in .whl/*.whl; do [ -e ".ray2/$(basename "$f")" ] || wheels+=("$f"); done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        /tmp/raywhl/$W "${wheels[@]}" || exit 1
    export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
# pagedserve from this checkout, without installing it: its pagedserve/ finds the layers beside it.
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

# `serve_run ARGS... &`: serve run as a background job that still stops on Ctrl-C. A non-interactive shell
# starts background jobs with SIGINT ignored, and a Python started so never raises KeyboardInterrupt (serve
# run then ignored the SIGINT these scripts end it with and was killed at 60 s): give SIGINT its default.
# It execs, so that $! is serve run itself: call it only as a background job (with &).
serve_run() {
    exec python3 -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp("serve", sys.argv[1:])' \
        serve run "$@"
}

# `stop_serve_run PID`: Ctrl-C, as a user stops it, and a line saying how long the stop took (part of the
# record); killed only if still running 60 s later.
stop_serve_run() {
    kill -INT "$1"; local stop_started=$(date +%s)
    while kill -0 "$1" 2>/dev/null && [ $(( $(date +%s) - stop_started )) -lt 60 ]; do sleep 1; done
    if kill -0 "$1" 2>/dev/null; then echo "serve run still running 60 s after SIGINT: killed"; kill -9 "$1"
    else echo "serve run stopped $(( $(date +%s) - stop_started )) s after SIGINT"; fi
}
