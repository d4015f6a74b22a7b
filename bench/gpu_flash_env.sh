# Sourced on a GPU machine that has no internet: FlashAttention 4 (attention_backend="flash_paged") and this
# checkout's pagedserve on the paths, from wheels carried in git-ignored folders (listed in .git/info/exclude).
#
# The wheels (CPython 3.12, x86-64; the image's torch is a CUDA 13 build, so the DSL's cu13 flavour):
#   .flash/   nvidia_cutlass_dsl_libs_cu13-4.8.1-...whl.part-aa   (the first 50 MiB of the 92 MB wheel)
#   .flash2/  the same wheel's .part-ab, flash_attn_4-4.0.0b40, nvidia_cutlass_dsl-4.8.1,
#             nvidia_cutlass_dsl_libs_base-4.8.1, nvidia_cutlass_dsl_libs_core-4.8.1, quack_kernels-0.6.5,
#             torch_c_dlpack_ext-0.1.5
#   .whl/     pagedserve's own needs beyond the image (pydantic, xgrammar, apache-tvm-ffi 0.1.15.post2, which
#             FlashAttention 4 needs too: bench/gpu_serve_wheels.txt)
# The image already has einops, protobuf, typing-extensions and cuda-bindings, which they need besides.
# Fetched with (a CPU host with pip; NAME==VERSION for each of the above):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d DIR NAME==VERSION
#   split -b 50M nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl \
#     nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl.part-
#
# A call carries at most 64 MiB, so it takes two calls on the same (warm) machine, the second within its
# idle window (30 s): the first carries .flash and copies the part to /tmp/flash1:
#   mkdir -p /tmp/flash1 && cp .flash/*.part-aa /tmp/flash1/
# the second carries .flash2 and .whl and sources this file, which reassembles the wheel (checked against
# its sha256), installs everything with `pip install --no-index --no-deps` into /tmp/site, and exports:
# PYTHONPATH (this checkout, /tmp/site, and the DSL's package folder, which its .pth file adds in a real
# install but which a --target folder's .pth does not), FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 (compiled
# kernels kept on disk, so pytest, the benchmarks and the engine compile each kernel once per machine),
# OUT (default /tmp/out, created) and PYTHONUNBUFFERED=1. FLASH_INSTALL=0 installs nothing (a second
# sourcing on the same machine). Returns non-zero, saying why, if anything fails.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
flash_cu13_wheel=nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
flash_cu13_sha256=50191a381d8cc1393373ae0bc879b0aefa9a256c23c22d4fa1c2fe3dfe57bc90
if [ "${FLASH_INSTALL:-1}" = 1 ]; then
    flash_part1=/tmp/flash1/$flash_cu13_wheel.part-aa
    [ -f "$flash_part1" ] || flash_part1=.flash/$flash_cu13_wheel.part-aa  # both parts here (a larger carry)
    if [ ! -f "$flash_part1" ] || [ ! -f ".flash2/$flash_cu13_wheel.part-ab" ]; then
        echo "gpu_flash_env.sh: missing a part of $flash_cu13_wheel (first: /tmp/flash1 or .flash, second: .flash2)"
        return 1 2>/dev/null || exit 1
    fi
    mkdir -p /tmp/flashwhl
    cat "$flash_part1" ".flash2/$flash_cu13_wheel.part-ab" > "/tmp/flashwhl/$flash_cu13_wheel"
    echo "$flash_cu13_sha256  /tmp/flashwhl/$flash_cu13_wheel" | sha256sum -c - || { return 1 2>/dev/null || exit 1; }
    # One pip call: --target --upgrade replaces whole top-level folders, so a second call would drop some.
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "/tmp/flashwhl/$flash_cu13_wheel" .flash2/*.whl .whl/*.whl || { return 1 2>/dev/null || exit 1; }
fi
export PYTHONPATH=$PWD:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 PYTHONUNBUFFERED=1
python3 -c "
import importlib.metadata as m, torch
import flash_attn.cute, cutlass
print('flash-attn-4', m.version('flash-attn-4'), '| nvidia-cutlass-dsl', m.version('nvidia-cutlass-dsl'),
      '| cuda-bindings', m.version('cuda-bindings'), '| torch', torch.__version__, torch.version.cuda,
      '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability())
" || { echo "gpu_flash_env.sh: flash_attn.cute does not import"; return 1 2>/dev/null || exit 1; }
