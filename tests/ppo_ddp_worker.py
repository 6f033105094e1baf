"""Run by tests/test_ppo_trainer.py under `torchrun --nproc_per_node 2`: PPO with accelerate on
2 CPU processes (gloo), DDP or FSDP. Rank 0 writes what the test checks to the JSON file named by
--out, and the whole final weights beside it (<out>.safetensors)."""
import argparse
import copy
import json

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, LlamaConfig
from safetensors.torch import save_file

from tasks import scenario
from tasks.modeling import load_policy, load_reward, load_tokenizer
from tasks.ppo import lora
from tasks.ppo.rollout import Critic, PolicyWithValue
from tasks.ppo.trainer import PPOConfig, PPOTrainer

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("--out", required=True)
p.add_argument("--fsdp", action="store_true")
p.add_argument("--steps", type=int, default=3)
p.add_argument("--checkpoint-dir", default=None)
p.add_argument("--micro-batch", type=int, default=0, help="ppo.micro_batch_size: gradients accumulated")
p.add_argument("--mixed-precision", default="auto", help="ppo.mixed_precision")
p.add_argument("--critic", action="store_true", help="ppo.value_model reward: a critic copied from the reward model")
p.add_argument("--cuda", action="store_true", help="on the GPUs (tests/test_gpu.py); default: CPU processes")
p.add_argument("--lora-resume", default=None, metavar="DIR",
               help="then, with --fsdp: a LoRA run checkpointing into DIR, killed after step 2 and resumed")
a = p.parse_args()

accelerator = Accelerator(cpu=not a.cuda)
torch.manual_seed(0)  # the frozen models (reference, reward head) must match on every process
tok = load_tokenizer(a.model_dir)
policy = PolicyWithValue(load_policy(a.model_dir)).to(accelerator.device)
ref = load_policy(a.model_dir).to(accelerator.device)
reward = load_reward(a.model_dir, tok.pad_token_id).to(accelerator.device)
if a.critic:  # a copy of the reward model, as the pipeline makes it, in place of the value head
    policy = PolicyWithValue(policy.lm, Critic(copy.deepcopy(reward)))
before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
critic_before = {k: v.detach().clone() for k, v in policy.state_dict().items() if k.startswith("critic.")}
prompts = [tok(p)["input_ids"] for p in scenario.feedback_prompts()]
cfg = PPOConfig(steps=a.steps, batch_size=16, minibatches=2, epochs=2, checkpoint_every=2 if a.checkpoint_dir else 0,
                micro_batch_size=a.micro_batch, mixed_precision=a.mixed_precision)
trainer = PPOTrainer(policy, ref, reward, prompts, tok.eos_token_id, tok.pad_token_id, cfg, seed=0,
                     accelerator=accelerator, fsdp=a.fsdp, checkpoint_dir=a.checkpoint_dir)
sharded = type(next(trainer.policy.parameters())).__name__ == "DTensor"
history = trainer.train()
if a.fsdp:
    from tasks.ppo import sharding

    weights = sharding.full_state_dict(trainer.policy, trainer.optimizer)[0]  # whole, on rank 0
else:
    weights = {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}
if accelerator.is_main_process:
    after = torch.cat([weights[k].flatten().to(before.device) for k, _ in trainer.unwrapped.named_parameters()])
    save_file({k: v.contiguous().cpu() for k, v in weights.items()}, a.out + ".safetensors")
    json.dump({"processes": accelerator.num_processes, "backend": str(accelerator.distributed_type),
               "sharded": sharded, "graph": trainer.decoder is not None and trainer.decoder.graph is not None, "steps": [h["step"] for h in history],
               "weights_changed": bool(not torch.equal(before, after)),
               "critic_changed": a.critic and any(not torch.equal(weights[k].cpu(), v.cpu())
                                                  for k, v in critic_before.items()),
               # the bf16 copies generation read (mixed precision): of the whole weights, not the shards
               "shadow": {k: list(v.shape) for k, v in (trainer.decoder.shadow if trainer.decoder else {}).items()},
               "shapes": {k: list(v.shape) for k, v in weights.items()},
               "kl_coef": [h["objective/kl_coef"] for h in history],
               "scores": [h["objective/scores"] for h in history]}, open(a.out, "w"))
if not a.fsdp and accelerator.num_processes > 1:  # DDP: every process holds the whole weights; they must be the same everywhere
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    everyone = accelerator.gather(flat[None])
    responses = trainer.rollout().responses  # (B, T): T the longest response, which may differ between processes
    responses = torch.nn.functional.pad(responses, (0, cfg.max_new_tokens - responses.shape[1]), value=tok.pad_token_id)
    samples = accelerator.gather(responses.flatten()[None].float())
    if accelerator.is_main_process:
        result = json.load(open(a.out))
        result.update(weights_in_sync=bool(torch.equal(everyone[0], everyone[1])),
                      own_samples=bool(not torch.equal(samples[0], samples[1])))
        json.dump(result, open(a.out, "w"))

if a.lora_resume:
    # LoRA runs of 3 steps that checkpoint at step 2, sharded and DDP, then new runs from those
    # checkpoints (what runs killed in step 3 leave): a checkpoint holds the adapters and the value
    # head only, and the resumed run ends on the same weights. The policy is a Llama (not GPT-2:
    # HF's general sampler, rotary positions, its own block class to shard).
    from safetensors.torch import load_file

    from tasks.ppo import sharding

    def lora_trainer(fsdp: bool, folder: str):
        # the general sampler (HF's cache), which calls the LM before the policy: FSDP must know its root
        cfg = PPOConfig(steps=3, batch_size=16, minibatches=2, epochs=2, checkpoint_every=2, generation="dynamic",
                        micro_batch_size=3)  # and gradients accumulated over micro-batches, synced once
        torch.manual_seed(2)  # the same random Llama on every process and in both runs
        lm = lora.add_lora(AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)), rank=4, alpha=8)
        torch.manual_seed(1)  # the reward head, the same on every process and in both runs
        lora_reward = load_reward(a.model_dir, tok.pad_token_id).to(accelerator.device)  # each trainer shards its own
        return PPOTrainer(PolicyWithValue(lm).to(accelerator.device), None, lora_reward, prompts, tok.eos_token_id,
                          tok.pad_token_id, cfg, seed=0, accelerator=accelerator, fsdp=fsdp, checkpoint_dir=folder)

    def whole_weights(trainer) -> dict:
        if trainer.fsdp:
            return sharding.full_model_state_dict(trainer.policy)
        return {k: v.detach().clone() for k, v in trainer.unwrapped.state_dict().items()}

    for kind, fsdp in (("fsdp", True), ("ddp", False)):
        folder = f"{a.lora_resume}/{kind}"
        straight = lora_trainer(fsdp, folder)
        straight.train()
        trainable = {n for n, p in straight.unwrapped.named_parameters() if p.requires_grad}
        saved = set(load_file(f"{folder}/policy.safetensors"))
        straight_weights = whole_weights(straight)
        resumed, steps_run = lora_trainer(fsdp, folder), []
        resumed.train(on_step=lambda m: steps_run.append(m["step"]))
        resumed_weights = whole_weights(resumed)
        # every process's resumed weights equal its straight ones (DDP: each holds them whole)
        equal = torch.tensor(float(all(torch.equal(v, resumed_weights[k]) for k, v in straight_weights.items())))
        equal = bool(accelerator.reduce(equal.to(accelerator.device), "min"))
        if accelerator.is_main_process:
            result = json.load(open(a.out))
            result[f"lora_{kind}"] = dict(
                checkpoint_trainable_only=saved == trainable, resumed_steps=steps_run, resumed_equal=equal,
                adapters_moved=any(".lora_B" in k and bool(v.abs().sum() > 0) for k, v in straight_weights.items()))
            json.dump(result, open(a.out, "w"))

# the process group ends before the interpreter does (accelerate: "always at the end of your script");
# left to exit, gloo aborted a process once under the suite's load ("terminate called without an active exception")
accelerator.end_training()
