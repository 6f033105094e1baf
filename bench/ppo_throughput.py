"""PPO throughput: ours against TRL 0.29's PPOTrainer (../shared/bench/), same shapes, same run.

    python bench/ppo_throughput.py --shape tiny --device cpu
    python bench/ppo_throughput.py --shape 124m --device cuda --reference-python /tmp/ref/bin/python --json
    python bench/ppo_throughput.py --shape 355m --device cuda --lora 16 --no-reference
    python bench/ppo_throughput.py --shape 124m --device cuda --family llama --generation dynamic --no-reference

Both sides get random-init GPT-2-shaped models, the same random prompts, a fixed response
length (no early stop) and the same PPO shape (batch, minibatches, epochs), so the figure does
not depend on weights. Ours: policy with value head, frozen reference, reward model. The
reference: TRL 0.29 with a separate value model (its only design); --value-model reward gives ours
one too (a critic of the reward model's shape, trained whole): the same work. With --lora R our policy
trains rank-R adapters instead (the reference is the policy with its adapters off): less memory,
not the same work as the reference's full fine-tuning, so its ratio is reported apart. With
--family llama ours runs a Llama of the shape's size (rotary positions, 4 query heads per
key/value head, SwiGLU; qwen3 and gemma3 the same with their norms, phi3 with its fused
projections, olmo2 with its norms after attention and MLP, gemma2 with Gemma 2's logit
soft-capping and 4096-token window; pythia a GPT-NeoX with Pythia's settings, which at 124m is
Pythia-160M's shape; gemma4 Gemma 4's language model as its E2B is laid out: per-layer inputs,
wider global heads, the second half of the layers reading earlier layers' keys and values, its
reward model transformers' generic classifier) and the reference, GPT-2 only, does not run; --generation picks our
decoder (static: KV cache + CUDA graphs; dynamic: HF's cache). Prints a table, and with --json
one JSON object; writes ppo_throughput.json into --out (bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # before torch: the progress lines count the imports too

import torch  # noqa: E402
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config,  # noqa: E402
                          Gemma3TextConfig, Gemma4TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Olmo2Config,
                          Phi3Config, Qwen3Config)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.ppo import lora, static_decode  # noqa: E402
from tasks.ppo.rollout import Critic, PolicyWithValue, base_model, sample_token  # noqa: E402
from tasks.ppo.trainer import PPOConfig, PPOTrainer  # noqa: E402

SHAPES = {  # the reference README's shapes
    "tiny": dict(layers=2, dim=64, heads=2, vocab=1000, prompts=32, prompt_len=16, response_len=16, batch=8),
    "124m": dict(layers=12, dim=768, heads=12, vocab=50257, prompts=512, prompt_len=64, response_len=128, batch=64),
    "355m": dict(layers=24, dim=1024, heads=16, vocab=50257, prompts=256, prompt_len=64, response_len=128, batch=32),
}
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "bench" / "trl_ppo_reference.py"


def progress(what: str) -> None:
    """A line on stderr with the seconds since this script began: a run cut off on a lent machine
    says how far it got and where the time went (model building, training, the reference)."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {what}", file=sys.stderr, flush=True)


FAMILIES = {"llama": LlamaConfig, "qwen3": Qwen3Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config,
            "olmo2": Olmo2Config, "gemma2": Gemma2Config, "pythia": GPTNeoXConfig,
            "gemma4": Gemma4TextConfig}  # besides GPT-2


def policy_config(s: dict, family: str):
    positions = s["prompt_len"] + s["response_len"] + 8
    if family == "pythia":  # GPT-NeoX as Pythia sets it: rotary on a quarter of each head, parallel residual
        return GPTNeoXConfig(num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
                             intermediate_size=4 * s["dim"], vocab_size=s["vocab"], max_position_embeddings=positions,
                             rotary_pct=0.25, use_parallel_residual=True, pad_token_id=0, eos_token_id=1,
                             bos_token_id=1)
    if family in FAMILIES:
        # the shape's size: 4 query heads per key/value head where the count allows, SwiGLU-sized MLP;
        # Qwen3 and Gemma 3 add their norms, Gemma 3 alternates 5 sliding-window layers (512 tokens,
        # as its 270M and 1B) with a global one; Phi-3 fuses q/k/v and gate/up into one projection each
        head_dim = s["dim"] // s["heads"]
        extra = {"head_dim": head_dim} if family in ("qwen3", "gemma3", "gemma2", "gemma4") else {}
        if family == "gemma2":  # its caps (attention 50, final logits 30) and window (4096) as released
            extra |= {"query_pre_attn_scalar": head_dim}
        if family == "gemma3":
            extra |= {"query_pre_attn_scalar": head_dim, "sliding_window": 512}
        if family == "gemma4":  # as its E2B: global layers (every 6th) with heads twice as wide, per-layer
            # inputs a sixth of the width, the second half of the layers reading earlier layers' keys and
            # values (where the first half has a global layer), final logits capped at 30
            extra |= {"global_head_dim": 2 * head_dim, "sliding_window": 512, "vocab_size_per_layer_input": s["vocab"],
                      "hidden_size_per_layer_input": s["dim"] // 6, "final_logit_softcapping": 30.0,
                      "num_kv_shared_layers": s["layers"] // 2 if s["layers"] >= 12 else 0}
        return FAMILIES[family](
            num_hidden_layers=s["layers"], hidden_size=s["dim"], num_attention_heads=s["heads"],
            num_key_value_heads=s["heads"] // 4 if s["heads"] % 4 == 0 else s["heads"],
            intermediate_size=-(-8 * s["dim"] // 3 // 64) * 64, vocab_size=s["vocab"],
            max_position_embeddings=positions, pad_token_id=0, eos_token_id=1, bos_token_id=1, **extra)
    return GPT2Config(n_layer=s["layers"], n_embd=s["dim"], n_head=s["heads"], vocab_size=s["vocab"],
                      n_positions=positions, pad_token_id=0, eos_token_id=1, bos_token_id=1)


def decode_ops(lm, device: str, autocast_dtype: torch.dtype | None = None) -> dict | None:
    """Operations one token costs our static decoder on this device in this dtype, counted at
    PyTorch's dispatcher (views excluded): each is a GPU kernel, so this is the count a CUDA graph
    replays per token, comparable on any machine. None where the static decoder does not apply."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    if not static_decode.supports(lm, 6):
        return None

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aliases = any(r.alias_info is not None for r in func._schema.returns) and not func._schema.is_mutable
            if not aliases and func not in (torch.ops.aten.detach.default, torch.ops.aten._unsafe_view.default,
                                            torch.ops.aten.empty_like.default):  # (an allocation, no kernel)
                self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    dec = static_decode.StaticDecoder(lm, batch=1, prompt_len=4, max_new_tokens=2, use_graph=False,
                                      autocast_dtype=autocast_dtype)
    ids = torch.full((1, 4), 2, dtype=torch.long, device=device)
    step, sampling = Count(), Count()

    def prefill_and_step():
        dec._prefill(ids, torch.ones_like(ids))
        with step:
            dec._step()

    with torch.no_grad():
        dec.refresh()
        dec.run(prefill_and_step)  # as sample() runs it: over the bf16 copies under mixed precision
        with sampling:
            sample_token(dec.logits, 1.0, None)
    return {"step": sum(step.ops.values()), "sampling": sum(sampling.ops.values())}


def build_models(cfg, dtype: torch.dtype, family: str, lora_rank: int, value_model: str):
    """(policy with its value head or critic, reference LM or None under LoRA, reward model), random-init."""
    lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    score_cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("id2label", "label2id")}
    if family == "gemma4":  # transformers has no classifier for it: the generic one, as the pipeline makes it
        from tasks.modeling import ensure_classifier

        ensure_classifier(cfg)

    def classifier():  # the reward model of the policy's family and size (a scalar head), as the pipeline makes it
        return AutoModelForSequenceClassification.from_config(type(cfg)(**score_cfg, num_labels=1), dtype=dtype)

    # --value-model reward: a critic of the reward model's shape (the reference's value model), trained
    # whole, or with --lora adapters on its trunk as the pipeline gives it
    critic = None
    if value_model == "reward":
        critic = Critic(lora.add_critic_lora(classifier(), lora_rank, 2.0 * lora_rank) if lora_rank else classifier())
    if lora_rank:  # adapters in float32 over the bf16 base, as PEFT makes them; no reference copy
        policy, ref = PolicyWithValue(lora.add_lora(lm, lora_rank, 2.0 * lora_rank), critic), None
    else:
        policy = PolicyWithValue(lm, critic)
        ref = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    reward = classifier()
    return policy, ref, reward


def run_ours(s: dict, device: str, bf16: bool, profile: bool = False, lora_rank: int = 0, family: str = "gpt2",
             generation: str = "auto", generation_batch: int = 0, mixed: bool = False,
             value_model: str = "shared") -> dict:
    torch.manual_seed(0)
    cfg = policy_config(s, family)
    # bf16 weights computed as they are (the reference's setting), or with `mixed` float32 weights
    # under bf16 autocast, as the pipeline runs PPO on a GPU
    dtype = torch.bfloat16 if bf16 and not mixed else torch.float32
    with torch.device(device):  # made on the device: 355m's models took 68 s of a GPU call made on its CPU
        policy, ref, reward = build_models(cfg, dtype, family, lora_rank, value_model)
    lm, critic = base_model(policy.lm), policy.critic  # (the HF model, with any adapters in it)
    progress(f"ours: models built ({type(lm).__name__}, {s['layers']} layers, {s['dim']} dim) on {device}")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, s["vocab"], (s["prompts"], s["prompt_len"]), generator=g).tolist()
    ppo = PPOConfig(steps=s["prompts"] // s["batch"], batch_size=s["batch"], minibatches=1, epochs=1,
                    max_new_tokens=s["response_len"], missing_eos_penalty=None, checkpoint_every=0,
                    generation=generation, generation_batch_size=generation_batch,
                    mixed_precision="bf16" if mixed else "no")
    # eos_id=-1: no token ends a response, so every one has the fixed length, as in the reference
    trainer = PPOTrainer(policy, ref, reward, prompts, eos_id=-1, pad_id=0, cfg=ppo, seed=0, device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    progress(f"ours: training {ppo.steps} steps of {s['batch']} episodes")
    t0 = time.perf_counter()
    history = trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    progress(f"ours: trained in {dt:.2f} s")
    # the timed run's peak, before the profiled step and the operation count below allocate anything
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    if profile:  # one more step under the profiler: where the time goes, kernel by kernel
        from torch.profiler import ProfilerActivity, profile as torch_profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        trainer.cfg.steps += 1
        with torch_profile(activities=activities) as prof:
            trainer.train_step()
        sort = "cuda_time_total" if device == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)
        progress("ours: one more step profiled")
    # after the timed run, so that its kernels warm nothing up for it (the count's decoder has a cache of its own)
    ops = decode_ops(lm, device, torch.bfloat16 if mixed else None)
    gen_fraction = sum(h["perf/gen_fraction"] for h in history) / len(history)
    later = history[1:] or history  # after the first step (CUDA graph capture, allocator warm-up)
    label = ", ".join(x for x in (family if family != "gpt2" else "", f"LoRA {lora_rank}" if lora_rank else "",
                                   "HF cache" if trainer.decoder is None else "", "mixed" if mixed else "",
                                   "critic" if critic is not None else "") if x)
    return {"system": f"rlhf-pipeline-ppo{f' ({label})' if label else ''}", "seconds": round(dt, 3),
            "models": {"policy": type(lm).__name__, "reward": type(reward).__name__,
                       "value": f"critic: {type(critic.trunk).__name__}" if critic is not None else "policy's trunk"},
            "episodes_per_s": round(s["prompts"] / dt, 2),
            "gen_tokens_per_s": round(s["prompts"] * s["response_len"] / dt, 1),
            "gen_fraction": round(gen_fraction, 3),
            "steady_episodes_per_s": round(len(later) / sum(1 / h["perf/episodes_per_s"] for h in later), 2),
            "first_step_s": round(history[0]["perf/step_s"], 3),
            "decode_ops_per_token": ops if trainer.decoder is not None else None,
            **{f"steady_{k}": round(sum(h[f"perf/{k}"] for h in later) / len(later), 4)
               for k in ("generate_s", "score_s", "train_s")},
            "peak_gpu_gib": peak_gib,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def run_reference(s: dict, python: str, script: Path, bf16: bool) -> dict:
    args = [python, str(script), "--layers", str(s["layers"]), "--dim", str(s["dim"]), "--heads", str(s["heads"]),
            "--vocab", str(s["vocab"]), "--prompts", str(s["prompts"]), "--prompt-len", str(s["prompt_len"]),
            "--response-len", str(s["response_len"]), "--batch", str(s["batch"])] + (["--bf16"] if bf16 else [])
    progress(f"reference: started ({python} {script.name})")
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    progress(f"reference: ended after {time.perf_counter() - t0:.1f} s (exit status {proc.returncode})")
    if proc.returncode != 0:
        raise SystemExit(f"the reference failed ({python} {script}):\n{proc.stderr[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"the reference ({python} {script}) printed no JSON line; its output ended:\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    result = json.loads(lines[-1])
    result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--reference-python", default=None,
                   help="interpreter with trl==0.29 (TRL 0.29 cannot share an environment with TRL 1.x)")
    p.add_argument("--reference-script", type=Path, default=REFERENCE)
    p.add_argument("--no-reference", action="store_true", help="time ours alone")
    p.add_argument("--repeats", type=int, default=3, help="runs of each side; the best is reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", action="store_true", help="profile one extra step of ours (stderr)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="our policy trains LoRA adapters of this rank (0 = full fine-tuning, as the reference)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for the JSON file")
    p.add_argument("--family", choices=["gpt2", *FAMILIES], default="gpt2",
                   help="our policy's architecture at the shape's size (the reference runs GPT-2 only)")
    p.add_argument("--generation", choices=["auto", "static", "dynamic"], default="auto",
                   help="our rollout decoder: static KV cache (+ CUDA graphs) or HF's dynamic cache")
    p.add_argument("--generation-batch", type=int, default=0, metavar="N",
                   help="sample N episodes at a time (ppo.generation_batch_size; 0 = the whole batch)")
    p.add_argument("--mixed", action="store_true",
                   help="ours with float32 weights under bf16 autocast (ppo.mixed_precision: bf16), as the "
                        "pipeline runs PPO on a GPU; without it ours, like the reference, computes in the "
                        "weights' dtype (bf16 on cuda)")
    p.add_argument("--value-model", choices=["shared", "reward"], default="shared",
                   help="ours: a value head on the policy's trunk (ppo.value_model: shared), or a separate critic "
                        "of the reward model's shape (reward: the reference's design, the same work)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if a.repeats < 1:
        p.error(f"--repeats must be at least 1, got {a.repeats}")
    if a.lora < 0:
        p.error(f"--lora must be a rank >= 0, got {a.lora}")
    if a.generation_batch < 0 or (a.generation_batch and SHAPES[a.shape]["batch"] % a.generation_batch):
        p.error(f"--generation-batch must divide the {a.shape} shape's batch of {SHAPES[a.shape]['batch']} "
                f"(or be 0), got {a.generation_batch}")
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} is a file, not a folder")
    if a.family != "gpt2" and not a.no_reference:
        p.error(f"--family {a.family}: the reference harness builds GPT-2 only; add --no-reference")
    if not a.no_reference:  # checked before anything runs
        if a.reference_python is None:
            p.error("pass --reference-python PATH (a venv with trl==0.29.0, see ../shared/bench/README.md) "
                    "or --no-reference")
        if shutil.which(a.reference_python) is None:
            p.error(f"--reference-python {a.reference_python}: no such interpreter")
        if not a.reference_script.exists():
            p.error(f"reference script {a.reference_script} not found; pass --reference-script")
    progress(f"torch {torch.__version__} and transformers imported; {a.shape} on {a.device}")
    bf16 = a.device == "cuda"  # the reference README's GPU figures are bf16
    shape = SHAPES[a.shape]
    ours = max((run_ours(shape, a.device, bf16, a.profile, a.lora, a.family, a.generation, a.generation_batch,
                         a.mixed, a.value_model)
                for _ in range(a.repeats)),
               key=lambda r: r["episodes_per_s"])
    reference = None
    if not a.no_reference:
        reference = max((run_reference(shape, a.reference_python, a.reference_script, bf16)
                         for _ in range(a.repeats)), key=lambda r: r["episodes_per_s"])
    device = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    ratio = round(ours["episodes_per_s"] / reference["episodes_per_s"], 2) if reference else None
    result = {"shape": a.shape, **shape, "device": device, "bf16": bf16, "repeats": a.repeats, "lora_rank": a.lora,
              "family": a.family, "generation": a.generation, "generation_batch": a.generation_batch,
              "mixed_precision": a.mixed, "value_model": a.value_model,
              "ours": ours, "reference": reference,
              # the measure compares the same work: full fine-tuning on both sides
              "ratio": None if a.lora else ratio, "ratio_lora_vs_full": ratio if a.lora else None}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ppo_throughput.json").write_text(json.dumps(result, indent=2))
    if a.json:
        print(json.dumps(result))
        return
    print(f"PPO throughput, shape {a.shape} on {device} (best of {a.repeats})")
    print(f"{'system':<36}{'episodes/s':>12}{'gen tok/s':>12}{'gen share':>11}{'peak GPU GiB':>14}{'peak RSS GiB':>14}")
    for r in (ours, reference):
        if r:
            print(f"{r['system']:<36}{r['episodes_per_s']:>12}{r['gen_tokens_per_s']:>12}"
                  f"{str(r.get('gen_fraction', '-')):>11}{str(r['peak_gpu_gib']):>14}{str(r['peak_rss_gib']):>14}")
    if ours["decode_ops_per_token"]:
        n = ours["decode_ops_per_token"]
        print(f"our decoder: {n['step']} operations per token in its graph, {n['sampling']} to sample")
    if reference:
        what = f"ours with LoRA {a.lora} / reference's full fine-tuning" if a.lora else "ours / reference"
        print(f"ratio ({what}): {ratio}x")


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
