"""Run by tests/test_ppo_trainer.py under `torchrun --nproc_per_node 2`: PPO with accelerate on
2 CPU processes (gloo). Rank 0 writes what the test checks to the JSON file named in argv[2]."""
import json
import sys

import torch
from accelerate import Accelerator

from tasks import scenario
from tasks.modeling import load_policy, load_reward, load_tokenizer
from tasks.ppo.rollout import PolicyWithValue
from tasks.ppo.trainer import PPOConfig, PPOTrainer

model_dir, out = sys.argv[1], sys.argv[2]
accelerator = Accelerator(cpu=True)
torch.manual_seed(0)  # the frozen models (reference, reward head) must match on every process
tok = load_tokenizer(model_dir)
policy = PolicyWithValue(load_policy(model_dir))
ref, reward = load_policy(model_dir), load_reward(model_dir, tok.pad_token_id)
before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
prompts = [tok(p)["input_ids"] for p in scenario.feedback_prompts()]
cfg = PPOConfig(steps=3, batch_size=16, minibatches=2, epochs=2, checkpoint_every=0)
trainer = PPOTrainer(policy, ref, reward, prompts, tok.eos_token_id, tok.pad_token_id, cfg, seed=0,
                     accelerator=accelerator)
first = trainer.rollout().responses  # this process's own samples
history = trainer.train()
after = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
weights = accelerator.gather(after[None])  # (processes, n)
samples = accelerator.gather(first.flatten()[None].float())
if accelerator.is_main_process:
    json.dump({"processes": accelerator.num_processes, "backend": str(accelerator.distributed_type),
               "weights_in_sync": bool(torch.equal(weights[0], weights[1])),
               "weights_changed": bool(not torch.equal(before, after)),
               "own_samples": bool(not torch.equal(samples[0], samples[1])),
               "kl_coef": [h["objective/kl_coef"] for h in history]}, open(out, "w"))
