#!/usr/bin/env bash
# The GPU half of the tests and benchmarks in one command, for a GPU machine that has torch and
# transformers but no TRL and no network (the lent H100 / H200).
#
#   bench/gpu.sh fetch       where pip works: the reference's wheels (TRL 0.29 and what it needs
#                            beyond torch + transformers + accelerate, and pydantic for the GPU
#                            tests of the pipeline's sampling) and its script into .whl/
#   bench/gpu.sh run [OUT] [tests|bench|reference|all]
#                            on the GPU machine, from the repository root: our PPO against the
#                            reference on the 124m and 355m shapes, in the same run (124m with a
#                            kernel profile of one more step), then the GPU tests, then ours alone:
#                            124m under mixed precision (the pipeline's setting), 124m with a
#                            separate critic (the reference's design), a Llama (either
#                            decoder) and a Qwen3 of the 124m shape, LoRA on 355m, 124m sampled
#                            16 episodes at a time, a Phi-3, a Pythia (GPT-NeoX), an OLMo 2, a
#                            Gemma 2 and a Gemma 4 (either decoder) of the 124m shape ('reference': the
#                            runs against the reference alone; GPU_SHAPES="355m" runs one shape
#                            against it, GPU_RUN_TIMEOUT the seconds each run may take); the device and tests in OUT/gpu.txt,
#                            the tables in OUT/bench.txt, each run's JSON a line of OUT/runs.jsonl
#                            (OUT defaults to bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl trl==0.29.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
        pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    cp ../shared/bench/trl_ppo_reference.py .whl/
    du -sh .whl
    ;;
run)
    out=${2:-bench/results}
    part=${3:-all}  # tests | bench | reference | all
    case "$part" in tests|bench|reference|all) ;;
    *) echo "bench/gpu.sh run [OUT] [tests|bench|reference|all], not '$part'" >&2; exit 2;; esac
    for shape in ${GPU_SHAPES:-124m 355m}; do
        case "$shape" in 124m|355m) ;; *) echo "GPU_SHAPES: 124m and/or 355m, not '$shape'" >&2; exit 2;; esac
    done
    mkdir -p "$out"
    [ -f .whl/trl_ppo_reference.py ] || { echo "no .whl/: run 'bench/gpu.sh fetch' where pip works" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/ref-site .whl/*.whl
    printf '#!/bin/sh\nPYTHONPATH=/tmp/ref-site exec python3 "$@"\n' > /tmp/refpy && chmod +x /tmp/refpy
    # what comes back from a lent machine is at most 8 files: two logs and one file of JSON lines
    log="$out/bench.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
        | tee -a "$out/gpu.txt"
    # a failing test or run is reported in the logs and the rest still runs; each run is cut off after
    # GPU_RUN_TIMEOUT seconds (default 420) so that one that hangs leaves the device time to the rest;
    # GPU_SHAPES="355m" (say) runs one shape against the reference where the other is already measured.
    # On an H200 (2026-12-04) 124m against the reference took 145 s in all (the reference's process,
    # by difference, about 105 s of it, 31 s of them training), the GPU tests 68 s, each run of ours
    # alone 31 to 42 s; 355m against the reference did not end within 240 s
    limit=${GPU_RUN_TIMEOUT:-420}
    gpu_tests() {
        echo "== tests/test_gpu.py (started $(date -u +%T))" | tee -a "$out/gpu.txt"
        # (pydantic from the same wheels: the pipeline's sampling and scoring read its config types)
        PYTHONPATH=/tmp/ref-site timeout "$limit" python3 -m pytest -q -ra tests/test_gpu.py --noconftest \
            -p no:cacheprovider 2>&1 | tee -a "$out/gpu.txt" || echo "== tests FAILED or cut off" | tee -a "$out/gpu.txt"
    }
    bench() {  # NAME ARGS...: one benchmark run, its table into the log, its JSON a line of runs.jsonl
        local name=$1; shift
        echo "== $name (started $(date -u +%T)): bench/ppo_throughput.py $*" | tee -a "$log"
        if timeout "$limit" python3 bench/ppo_throughput.py --device cuda --repeats 1 --out "/tmp/bench-$name" "$@" \
            2>&1 | tee -a "$log"
        then python3 -c "import json, sys; print(json.dumps({'name': sys.argv[1], **json.load(open(sys.argv[2]))}))" \
                 "$name" "/tmp/bench-$name/ppo_throughput.json" >> "$out/runs.jsonl"
        else echo "== $name FAILED or cut off" | tee -a "$log"
        fi
    }
    against_reference() {  # the issue's measure: the GPU shapes (GPU_SHAPES, default both), the reference in the same run
        for shape in ${GPU_SHAPES:-124m 355m}; do
            case "$shape" in
            124m) # 124m then profiles one more step of ours (its kernel table)
                bench ppo_124m --shape 124m --reference-python /tmp/refpy --reference-script .whl/trl_ppo_reference.py --profile ;;
            355m) bench ppo_355m --shape 355m --reference-python /tmp/refpy --reference-script .whl/trl_ppo_reference.py ;;
            esac
        done
    }
    ours_alone() {
        # the pipeline's setting: float32 weights under bf16 autocast, generation over bf16 copies
        bench ppo_124m_mixed --shape 124m --mixed --no-reference
        # a separate critic as the reference's value model (ppo.value_model: reward): the same work as the reference
        bench ppo_124m_critic --shape 124m --value-model reward --no-reference
        # a Llama of the 124m shape: the graph decoder against HF's cache (the reference runs GPT-2 only)
        bench ppo_124m_llama_static --shape 124m --family llama --generation static --no-reference
        bench ppo_124m_llama_dynamic --shape 124m --family llama --generation dynamic --no-reference
        bench ppo_124m_qwen3 --shape 124m --family qwen3 --no-reference
        # LoRA's speed and memory beside full fine-tuning (ours alone: the reference has no LoRA run)
        bench ppo_355m_lora16 --shape 355m --lora 16 --no-reference
        bench ppo_124m_gen16 --shape 124m --generation-batch 16 --no-reference  # the cost of a bounded KV cache
        bench ppo_124m_phi3 --shape 124m --family phi3 --no-reference  # fused projections (not yet on a GPU)
        bench ppo_124m_pythia --shape 124m --family pythia --no-reference  # GPT-NeoX as Pythia-160M (not yet on a GPU)
        bench ppo_124m_olmo2 --shape 124m --family olmo2 --no-reference  # norms after, not before (not yet on a GPU)
        bench ppo_124m_gemma2 --shape 124m --family gemma2 --no-reference  # logit soft-capping (not yet on a GPU)
        # Gemma 4's language model as E2B is laid out: the graph decoder against HF's cache (not yet on a GPU)
        bench ppo_124m_gemma4_static --shape 124m --family gemma4 --generation static --no-reference
        bench ppo_124m_gemma4_dynamic --shape 124m --family gemma4 --generation dynamic --no-reference
    }
    # most wanted first, so that a device call cut short still brings back the issue's figures
    if [ "$part" != tests ]; then : > "$out/runs.jsonl"; fi
    case "$part" in
    tests) gpu_tests ;;
    bench) against_reference; ours_alone ;;
    reference) against_reference ;;
    all) against_reference; gpu_tests; ours_alone ;;
    esac
    ;;
*)
    echo "usage: bench/gpu.sh fetch | run [OUT] [tests|bench|reference|all]" >&2
    exit 2
    ;;
esac
