#!/usr/bin/env bash
# The GPU half of the tests and benchmarks in one command, for a GPU machine that has torch and
# transformers but no TRL and no network (the lent H100 / H200).
#
#   bench/gpu.sh fetch       where pip works: the reference's wheels (TRL 0.29 and what it needs
#                            beyond torch + transformers + accelerate) and its script into .whl/
#   bench/gpu.sh run [OUT]   on the GPU machine, from the repository root: the GPU tests, then our
#                            PPO against the reference on the 124m and 355m shapes, in the same run;
#                            tables and JSON into OUT (default bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==0.29.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
    cp ../shared/bench/trl_ppo_reference.py .whl/
    du -sh .whl
    ;;
run)
    out=${2:-bench/results}
    mkdir -p "$out"
    [ -f .whl/trl_ppo_reference.py ] || { echo "no .whl/: run 'bench/gpu.sh fetch' where pip works" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ref-site .whl/*.whl
    printf '#!/bin/sh\nPYTHONPATH=/tmp/ref-site exec python3 "$@"\n' > /tmp/refpy && chmod +x /tmp/refpy
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
        | tee -a "$out/gpu.txt"
    python3 -m pytest -q -ra tests/test_gpu.py --noconftest -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.txt"
    for shape in 124m 355m; do
        python3 bench/ppo_throughput.py --shape "$shape" --device cuda --repeats 1 --reference-python /tmp/refpy \
            --reference-script .whl/trl_ppo_reference.py --out /tmp/bench-$shape | tee "$out/ppo_$shape.txt"
        cp /tmp/bench-$shape/ppo_throughput.json "$out/ppo_$shape.json"
    done
    # LoRA's speed and memory beside the full fine-tuning above (ours alone: the reference has no LoRA run)
    python3 bench/ppo_throughput.py --shape 355m --device cuda --repeats 1 --lora 16 --no-reference \
        --out /tmp/bench-lora | tee "$out/ppo_355m_lora16.txt"
    cp /tmp/bench-lora/ppo_throughput.json "$out/ppo_355m_lora16.json"
    ;;
*)
    echo "usage: bench/gpu.sh fetch | run [OUT]" >&2
    exit 2
    ;;
esac
