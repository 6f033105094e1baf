"""The PPO loop on a tiny model: it learns, stays near the reference, and resumes exactly."""
import pytest
import torch

from tasks import scenario
from tasks.config import load_config
from tasks.modeling import generate_texts, load_policy, load_tokenizer
from tasks.ppo import core
from tasks.ppo.rollout import PolicyWithValue, response_forward, sample
from tasks.ppo.trainer import PPOConfig
from tasks.train_policy import build_trainer

from conftest import FAST


def make_trainer(tiny_model_dir, tiny_reward_dir, checkpoint_dir=None, **overrides):
    cfg = load_config(None, {**FAST, **{f"ppo.{k}": v for k, v in overrides.items()}})
    trainer, tokenizer = build_trainer(str(tiny_model_dir), str(tiny_model_dir), str(tiny_reward_dir),
                                       scenario.feedback_prompts(), cfg, seed=0, checkpoint_dir=checkpoint_dir)
    return trainer, tokenizer


def test_ppo_raises_the_reward_and_keeps_kl_bounded(tiny_model_dir, tiny_reward_dir):
    trainer, tokenizer = make_trainer(tiny_model_dir, tiny_reward_dir)
    before = [p.detach().clone() for p in trainer.policy.lm.parameters()]
    history = trainer.train()
    first = sum(h["objective/scores"] for h in history[:3]) / 3
    last = sum(h["objective/scores"] for h in history[-5:]) / 5
    assert last > first + 0.1, (first, last)
    assert all(h["objective/kl"] < 4 * trainer.cfg.target_kl for h in history)  # bounded, no blow-up
    assert history[-1]["policy/entropy"] > 0.05  # no collapse to one response
    assert 3 <= history[-1]["response/length"] <= 10
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.lm.parameters()))
    expected = {"objective/kl", "objective/scores", "policy/clipfrac", "policy/approxkl", "loss/policy",
                "loss/value", "val/explained_var", "policy/entropy", "response/length", "perf/episodes_per_s",
                "perf/gen_fraction"}
    assert expected <= set(history[-1])
    # the learned behaviour carries to professions that got no feedback
    texts = generate_texts(trainer.policy.lm, tokenizer, scenario.heldout_prompts() * 16, 10, 1.0, seed=3)
    base = generate_texts(load_policy(tiny_model_dir), tokenizer, scenario.heldout_prompts() * 16, 10, 1.0, seed=3)
    assert scenario.neutral_rate(texts) > scenario.neutral_rate(base) + 0.2


def test_killed_run_resumes_with_identical_results(tiny_model_dir, tiny_reward_dir, tmp_path):
    straight, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=6, checkpoint_every=3, batch_size=32)
    straight.train()
    # "killed" after 3 iterations: only the checkpoint survives
    first, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=3, checkpoint_every=3, batch_size=32)
    first.train()
    resumed, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=6, checkpoint_every=3, batch_size=32)
    resumed.train()
    assert resumed.step == 6
    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert [h["objective/scores"] for h in resumed.history] == [h["objective/scores"] for h in straight.history]


def test_rollout_logprobs_match_a_full_forward(tiny_model_dir):
    """The KV-cached sampler and the batched scoring pass see the same distribution."""
    tok = load_tokenizer(tiny_model_dir)
    lm = load_policy(tiny_model_dir).eval()
    enc = tok(["the doctor said", "the ceo said"], return_tensors="pt", padding=True)  # different lengths
    responses = sample(lm, enc["input_ids"], enc["attention_mask"], 8, 1.0, tok.eos_token_id, tok.pad_token_id,
                       torch.Generator().manual_seed(0))
    responses = core.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id)
    mask = core.response_mask(responses, tok.eos_token_id)
    out = response_forward(PolicyWithValue(lm), enc["input_ids"], enc["attention_mask"], responses, mask, 1.0, True)
    # reference: each row alone, unpadded, one full forward
    for i in range(2):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        n = int(mask[i].sum())
        ids = torch.cat([prompt, responses[i, :n]])[None]
        logits = lm(input_ids=ids).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, responses[i, :n, None]).squeeze(-1)
        assert torch.allclose(out["logprobs"][i, :n], ref, atol=1e-5)


def test_ppo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(batch_size=10, minibatches=3)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="ppo.lr must be > 0"):
        PPOConfig(lr=0)


def test_ppo_on_two_processes_with_accelerate(tiny_model_dir, tmp_path):
    """DDP through accelerate on 2 CPU processes (gloo): each rolls out its own batch, the
    weights stay identical on both, and they do change."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ppo_ddp_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tiny_model_dir), str(out)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 2 and result["backend"] == "DistributedType.MULTI_CPU"
    assert result["weights_in_sync"] and result["weights_changed"] and result["own_samples"]
    assert len(result["kl_coef"]) == 3
