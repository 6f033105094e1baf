"""The PPO loop on a tiny model: it learns, stays near the reference, and resumes exactly."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tasks import scenario
from tasks.config import load_config
from tasks.modeling import generate_texts, load_policy, load_reward, load_tokenizer
from tasks.ppo import core, lora, static_decode
from tasks.ppo.rollout import (Critic, PaddedHead, PolicyWithValue, cat_responses, pad_lm_head, position_ids_from_mask,
                               response_forward, reward_scores, sample)
from tasks.ppo.trainer import PPOConfig, PPOTrainer
from tasks.train_policy import build_trainer

from conftest import FAST, another_tokenizer
from decoding import decoder_logits, forward_logits


def make_trainer(tiny_model_dir, tiny_reward_dir, checkpoint_dir=None, **overrides):
    cfg = load_config(None, {**FAST, **{f"ppo.{k}": v for k, v in overrides.items()}})
    trainer, tokenizer = build_trainer(str(tiny_model_dir), str(tiny_model_dir), str(tiny_reward_dir),
                                       scenario.feedback_prompts(), cfg, seed=0, checkpoint_dir=checkpoint_dir)
    return trainer, tokenizer


class Killed(Exception):
    pass


def train_killed_after(trainer, step: int) -> None:
    """Train as a run killed in iteration `step + 1` would have: its checkpoints up to `step`
    written, nothing after (a shorter run would not do: the learning rate decays over the steps)."""
    def kill(metrics):
        if metrics["step"] > step:
            raise Killed
    with pytest.raises(Killed):
        trainer.train(on_step=kill)


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


def test_normalized_scores_make_ppo_blind_to_the_reward_models_scale(tiny_model_dir, tiny_reward_dir):
    """ppo.normalize_scores: the first rollout's scores set the mean and std every score is taken
    by, so a reward model scoring ten times as wide trains the same policy; without, another one."""
    runs = {}
    for normalize in (True, False):
        for scale in (1.0, 10.0):
            trainer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=2, batch_size=16, minibatches=2,
                                      epochs=1, normalize_scores=normalize)
            with torch.no_grad():
                trainer.reward_model.score.weight.mul_(scale)
            trainer.train()
            runs[normalize, scale] = trainer
    one, ten = runs[True, 1.0], runs[True, 10.0]
    assert ten.score_norm == pytest.approx((10 * one.score_norm[0], 10 * one.score_norm[1]), rel=1e-5)
    assert ten.history[0]["objective/raw_scores"] == pytest.approx(ten.score_norm[0], rel=1e-5)
    # the first rollout's normalized scores have mean 0, less the missing-EOS penalty (1) where no EOS came
    first = one.history[0]
    assert first["objective/scores"] == pytest.approx(-(1 - first["response/eos_rate"]), abs=1e-5)
    assert [h["objective/scores"] for h in ten.history] == pytest.approx([h["objective/scores"] for h in one.history],
                                                                         abs=1e-4)
    for k, v in one.policy.state_dict().items():
        assert torch.allclose(v, ten.policy.state_dict()[k], atol=1e-5), k
    raw_one, raw_ten = runs[False, 1.0], runs[False, 10.0]
    assert raw_one.score_norm is None
    assert any(not torch.allclose(v, raw_ten.policy.state_dict()[k], atol=1e-5) for k, v in raw_one.policy.state_dict().items())


def test_a_policy_or_reward_model_of_another_tokenizer_is_refused_before_any_model_loads(tiny_model_dir, tmp_path):
    """The policy a round trains must share the tokenizer of its reference (the base model), and so
    must the reward model: a champion trained from another base model is said to be one."""
    from tasks.stage import StageError

    other = another_tokenizer(tiny_model_dir, tmp_path / "other-tokenizer")
    cfg, prompts = load_config(None, FAST), scenario.feedback_prompts()
    with pytest.raises(StageError, match="uses another tokenizer than its reference, the base model .*trained from "
                                         "another base model"):
        build_trainer(str(other), str(tiny_model_dir), str(tiny_model_dir), prompts, cfg, seed=0)
    with pytest.raises(StageError, match="the reward model .*other-tokenizer uses another tokenizer than the policy"):
        build_trainer(str(tiny_model_dir), str(tiny_model_dir), str(other), prompts, cfg, seed=0)


def test_killed_run_resumes_with_identical_results(tiny_model_dir, tiny_reward_dir, tmp_path):
    straight, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=6, checkpoint_every=3, batch_size=32)
    straight.train()
    # killed after 3 iterations: only the checkpoint survives
    first, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=6, checkpoint_every=3, batch_size=32)
    train_killed_after(first, 3)
    resumed, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=6, checkpoint_every=3, batch_size=32)
    resumed.train()
    assert resumed.step == 6 and resumed.resumed_from == 3 and straight.resumed_from is None
    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert resumed.score_norm == straight.score_norm  # the first rollout's, read back, not the resumed one's
    assert [h["objective/scores"] for h in resumed.history] == [h["objective/scores"] for h in straight.history]
    # the checkpoint is that run's: other settings, another seed or other prompts are refused by name...
    other_lr, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=9, batch_size=32, lr=5e-5)
    with pytest.raises(ValueError, match=r"another run's \(ppo\.lr differ\)"):
        other_lr.train()
    other_seed, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=9, batch_size=32)
    other_seed.seed = 7
    with pytest.raises(ValueError, match=r"\(seed differ\)"):
        other_seed.load_checkpoint(tmp_path / "ckpt")
    other_seed.seed, other_seed.prompts = 0, other_seed.prompts[:-1]
    with pytest.raises(ValueError, match=r"\(prompts differ\)"):
        other_seed.load_checkpoint(tmp_path / "ckpt")
    # ...while going longer, in micro-batches, with the other decoder continues it
    longer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=7, checkpoint_every=3,
                             batch_size=32, micro_batch_size=3, generation="dynamic")
    longer.train()
    assert longer.resumed_from == 6 and longer.step == 7
    # the learning rate decays linearly over the steps (ppo.lr_schedule), the resumed run's as the straight one's
    lr = load_config(None, FAST).ppo.lr
    assert [h["optimizer/lr"] for h in straight.history] == pytest.approx([lr * (1 - i / 6) for i in range(6)])
    assert [h["optimizer/lr"] for h in resumed.history] == [h["optimizer/lr"] for h in straight.history]
    assert longer.history[-1]["optimizer/lr"] == pytest.approx(lr / 7)  # decays over the new length from there
    # a checkpoint written before schedules and score normalization (a constant rate, raw scores)
    # resumes only as such a run
    constant, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=7, batch_size=32,
                               lr_schedule="constant", normalize_scores=False)
    with pytest.raises(ValueError, match=r"\(ppo\.lr_schedule, ppo\.normalize_scores differ\)"):
        constant.load_checkpoint(tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "trainer.pt", weights_only=True)
    del state["run"]["ppo"]["lr_schedule"], state["run"]["ppo"]["normalize_scores"], state["score_norm"]
    torch.save(state, tmp_path / "ckpt" / "trainer.pt")
    constant.load_checkpoint(tmp_path / "ckpt")
    assert constant.step == 6 and constant.score_norm is None
    with pytest.raises(ValueError, match=r"\(ppo\.lr_schedule, ppo\.normalize_scores differ\)"):
        longer.load_checkpoint(tmp_path / "ckpt")
    constant.cfg.steps = 8
    constant.train()
    assert [h["optimizer/lr"] for h in constant.history[-2:]] == pytest.approx([lr, lr])


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


def test_temperature_zero_is_greedy(tiny_model_dir):
    """A served policy's params={"temperature": 0}: each token is the argmax of a full forward
    pass, whatever the seed."""
    tok = load_tokenizer(tiny_model_dir)
    lm = load_policy(tiny_model_dir).eval()
    enc = tok(["the doctor said", "the ceo said"], return_tensors="pt", padding=True)
    a, b = (sample(lm, enc["input_ids"], enc["attention_mask"], 6, 0.0, tok.eos_token_id, tok.pad_token_id,
                   torch.Generator().manual_seed(seed)) for seed in (0, 1))
    assert torch.equal(a, b)
    for i in range(2):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        for token in a[i]:
            assert int(token) == int(lm(input_ids=ids[None]).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            ids = torch.cat([ids, token[None]])


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_disable_dropout_covers_functional_dropout_rates(family):
    """PPO trains with dropout off (the update's log-probs must be the rollout's). GPT-2 drops out
    through nn.Dropout modules; OPT and Llama keep their rates as floats and call functional dropout
    in training mode, which an nn.Dropout sweep alone missed (logits 0.1-0.2 apart)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig

    from tasks.ppo.trainer import disable_dropout

    small = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2, hidden_size=32, bos_token_id=1,
                 eos_token_id=1, pad_token_id=0)
    config = {
        "gpt2": lambda: GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1, attn_pdrop=0.1,
                                   embd_pdrop=0.1, bos_token_id=1, eos_token_id=1),
        "opt": lambda: OPTConfig(**small, ffn_dim=64, word_embed_proj_dim=32, dropout=0.1, attention_dropout=0.1),
        "llama": lambda: LlamaConfig(**small, intermediate_size=64, attention_dropout=0.1),
    }[family]()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    x = torch.randint(2, 100, (2, 10))

    def train_minus_eval() -> float:
        with torch.no_grad():
            return float((lm.train()(x).logits - lm.eval()(x).logits).abs().max())

    assert train_minus_eval() > 1e-3  # dropout is on in training mode to begin with
    disable_dropout(lm)
    assert train_minus_eval() == 0.0
    assert lm.config.to_dict() == config.to_dict()  # the saved config keeps the user's rates


def test_ppo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(batch_size=10, minibatches=3)
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="ppo.lr must be > 0"):
        PPOConfig(lr=0)
    with pytest.raises(ValueError, match="ppo.value_model must be 'shared' or 'reward', got 'critic'"):
        PPOConfig(value_model="critic")
    with pytest.raises(ValueError, match="ppo.lr_schedule must be 'linear' or 'constant', got 'cosine'"):
        PPOConfig(lr_schedule="cosine")


def _two_processes(model_dir, out, *args):
    """The worker under torchrun: 2 CPU processes over gloo. Returns its JSON and final weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("ppo_ddp_worker.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(model_dir), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(worker.parents[1]), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), load_file(f"{out}.safetensors")


def test_ppo_on_two_processes_ddp_and_fsdp(tiny_model_dir, tmp_path):
    """accelerate on 2 CPU processes (gloo). DDP, with gradients accumulated over micro-batches:
    each process rolls out its own batch, the weights stay identical on both and do change. FSDP:
    the models are sharded, and the run ends where the DDP run ends (the same batches, the same
    averaged gradients, here without micro-batches); a sharded run killed in step 3
    resumes from step 2's checkpoint to the same weights as the straight one, and so does a LoRA
    Llama, sharded and DDP, from its adapters-only checkpoint. Sharded with a critic, both train."""
    ddp, ddp_weights = _two_processes(tiny_model_dir, tmp_path / "ddp.json", "--micro-batch", "3")
    assert ddp["processes"] == 2 and ddp["backend"] == "DistributedType.MULTI_CPU" and not ddp["sharded"]
    assert ddp["weights_in_sync"] and ddp["weights_changed"] and ddp["own_samples"]
    assert len(ddp["kl_coef"]) == 3
    # checkpoints every 2 steps: after 3 its folder holds step 2's, what a run killed in step 3 leaves
    fsdp, fsdp_weights = _two_processes(tiny_model_dir, tmp_path / "fsdp.json", "--fsdp",
                                        "--checkpoint-dir", str(tmp_path / "ckpt"))
    assert fsdp["sharded"] and fsdp["weights_changed"]
    assert fsdp["scores"] == pytest.approx(ddp["scores"], abs=1e-4)
    assert fsdp_weights.keys() >= {k for k in ddp_weights if k != "lm.lm_head.weight"}
    for k, v in ddp_weights.items():
        assert torch.allclose(fsdp_weights[k], v, atol=1e-5), k
    resumed, resumed_weights = _two_processes(tiny_model_dir, tmp_path / "resumed.json", "--fsdp", "--steps", "3",
                                              "--checkpoint-dir", str(tmp_path / "ckpt"),
                                              "--lora-resume", str(tmp_path / "lora-ckpt"))
    assert resumed["steps"] == [1, 2, 3] and resumed["scores"] == pytest.approx(fsdp["scores"], abs=1e-6)
    for k, v in fsdp_weights.items():
        assert torch.equal(resumed_weights[k], v), k
    # a LoRA Llama (HF's sampler), sharded and DDP: its checkpoint holds the adapters and value head only
    for kind in ("lora_fsdp", "lora_ddp"):
        assert resumed[kind] == dict(checkpoint_trainable_only=True, resumed_steps=[3], resumed_equal=True,
                                     adapters_moved=True), kind
    assert not fsdp["shadow"]  # float32 on CPUs: no bf16 copies
    # sharded under bf16 autocast: each rollout's decoder reads bf16 copies of the gathered whole weights;
    # with a critic (ppo.value_model reward), sharded as a unit of its own and trained beside the policy
    mixed, _ = _two_processes(tiny_model_dir, tmp_path / "mixed.json", "--fsdp", "--steps", "2",
                              "--mixed-precision", "bf16", "--critic")
    assert mixed["sharded"] and mixed["weights_changed"] and torch.isfinite(torch.tensor(mixed["scores"])).all()
    assert mixed["shadow"] and all(mixed["shapes"]["lm." + k] == shape for k, shape in mixed["shadow"].items())
    assert mixed["critic_changed"] and "critic.score.weight" in mixed["shapes"]
    assert "value_head.weight" not in mixed["shapes"]
    assert not mixed["shadow"].keys() & {k.removeprefix("lm.") for k in mixed["shapes"] if k.startswith("critic.")}


def _two_prompts(tok):
    enc = tok(["the doctor said", "the ceo said that"], return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_llama_dir"])
def test_static_decoder_samples_what_the_dynamic_sampler_samples(model, request):
    """Same model, same generator: the static-cache decoder draws the same tokens as HF's cache path
    (GPT-2, and a Llama: rotary positions, grouped-query attention)."""
    tiny_model_dir = request.getfixturevalue(model)
    tok = load_tokenizer(tiny_model_dir)
    lm = load_policy(tiny_model_dir).eval()
    ids, mask = _two_prompts(tok)
    assert static_decode.supports(lm)
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=12)
    assert not dec.use_graph  # CPU: no graphs, the same step code runs eagerly
    for seed in range(3):
        fast = dec.sample(ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed))
        slow = sample(lm, ids, mask, 12, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed))
        assert torch.equal(fast, slow)
    checked_late = dec.sample(ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(0),
                              check_every=8)  # as on a GPU: may run past the end, with pads only
    assert torch.equal(checked_late[:, :slow.shape[1]], sample(lm, ids, mask, 12, 1.0, tok.eos_token_id,
                       tok.pad_token_id, torch.Generator().manual_seed(0)))
    assert (checked_late[:, slow.shape[1]:] == tok.pad_token_id).all()
    with pytest.raises(ValueError, match="built for prompts of shape"):
        dec.sample(ids[:1], mask[:1], 1.0, tok.eos_token_id, tok.pad_token_id)
    # a step CUDA cannot capture (here: told it failed) costs speed, with a warning, not the run
    def capture_fails():
        raise RuntimeError("operation not permitted when stream is capturing")
    dec.use_graph, dec._capture = True, capture_fails
    with pytest.warns(UserWarning, match="CUDA graph capture of the decode step failed"):
        again = dec.sample(ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(2))
    assert not dec.use_graph and torch.equal(again, sample(lm, ids, mask, 12, 1.0, tok.eos_token_id,
                                                           tok.pad_token_id, torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="exceed the model's"):
        static_decode.StaticDecoder(lm, 2, dec.arch.max_positions, 1)


def test_a_capture_after_a_whole_rollout_stays_inside_the_cache(tiny_model_dir):
    """Under FSDP the graph is captured again at every rollout (over newly gathered weights), after a
    rollout that ran to the last column. The steps a capture first runs eagerly start from column 0:
    from where the rollout left off they wrote past the cache (an index error on the CPU, a
    device-side assert on CUDA, where this failed on an H200). Runs those steps on the CPU."""
    tok = load_tokenizer(tiny_model_dir)
    lm = load_policy(tiny_model_dir).eval()
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=8)
    args = (ids, mask, 1.0, -1, tok.pad_token_id)  # no EOS: every row runs to the last column
    first = dec.sample(*args, torch.Generator().manual_seed(0))
    assert first.shape[1] == 8 and int(dec.col) == dec.L - 1
    with torch.no_grad():
        dec.run(dec._warm_up)  # what _capture runs before recording
    assert torch.equal(dec.sample(*args, torch.Generator().manual_seed(0)), first)  # the prefill writes again


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_llama_dir"])
def test_generate_texts_through_either_decoder_gives_the_same_texts(model, request):
    """collect, evaluate and serving sample through generate_texts, which takes the static decoder
    on a GPU: on the same seed it gives what HF's cache gives, batch by batch, greedy or not."""
    model_dir = request.getfixturevalue(model)
    tok, lm = load_tokenizer(model_dir), load_policy(model_dir)
    prompts = scenario.heldout_prompts() * 3  # batches of 4: the last one short, widths vary
    for temperature in (1.0, 0.0):
        static = generate_texts(lm, tok, prompts, 10, temperature, seed=5, batch_size=4, static=True)
        assert static == generate_texts(lm, tok, prompts, 10, temperature, seed=5, batch_size=4, static=False)
        assert static == generate_texts(lm, tok, prompts, 10, temperature, seed=5, batch_size=4)  # CPU: HF's


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_llama_dir"])
def test_static_decoder_logits_match_the_model_at_every_step(model, request):
    """Greedy-free check of the cache itself: each step's logits equal a full forward's, padded rows included."""
    tiny_model_dir = request.getfixturevalue(model)
    _assert_decoder_logits_match(load_policy(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir))


def _assert_decoder_logits_match(lm, tok, T=6):
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=T)
    fed = torch.randint(3, lm.config.vocab_size, (2, T - 1), generator=torch.Generator().manual_seed(0))
    logits, ref = decoder_logits(dec, ids, mask, fed), forward_logits(lm, ids, mask, fed)
    for t in range(T):
        assert torch.allclose(logits[:, t], ref[:, t], atol=1e-5), t


@pytest.mark.parametrize("variant", ["plain", "erf-gelu", "lora-on-qkv"])
def test_gpt2_decoder_reads_its_own_copies_of_plain_projections_and_the_modules_of_the_rest(variant, tiny_model_dir):
    """GPT-2's decoder reads plain projections through its own copies (`_Own`: q, k and v head by
    head with q scaled; a column of 16s carrying each output projection's bias) and any other
    through its module: an MLP whose GELU is erf's, a q/k/v projection with LoRA adapters. Every
    step's logits are the model's; the copies stand for exactly the weights they copy, and follow
    them; the 16s the output projections read stay where they were put."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    tok = load_tokenizer(tiny_model_dir)
    lm = load_policy(tiny_model_dir).eval()
    if variant == "erf-gelu":
        lm = GPT2LMHeadModel(lm.config.__class__(**{**lm.config.to_dict(), "activation_function": "gelu"})).eval()
    if variant == "lora-on-qkv":
        lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)).eval()
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if ".lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.1)  # adapters that change the output
    _assert_decoder_logits_match(lm, tok)
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=6)
    dec.sample(ids, mask, 1.0, -1, tok.pad_token_id, torch.Generator().manual_seed(0))  # six steps
    copied = {n.split("transformer.")[-1] for n, p in lm.named_parameters() if id(p) in dec.own}
    blocks = range(lm.config.n_layer)
    qkv = {f"h.{i}.attn.{m}.{w}" for i in blocks for m in ("c_attn", "c_proj") for w in ("weight", "bias")}
    mlp = {f"h.{i}.mlp.{m}.{w}" for i in blocks for m in ("c_fc", "c_proj") for w in ("weight", "bias")}
    out = {f"h.{i}.attn.c_proj.{w}" for i in blocks for w in ("weight", "bias")}
    assert copied == {"plain": qkv | mlp, "erf-gelu": qkv, "lora-on-qkv": mlp | out}[variant]
    own = dec.arch.own[id(dec.arch.blocks[0])]
    if own.fc_w is not None:  # the column whose GELU is 16, and the row that turns it into the output bias
        inner = own.fc_w.shape[0] * 4
        dec.refresh()
        assert own.fc_b[inner] == 16 and not own.fc_w[:, inner:].any() and not own.fc_b[inner + 1:].any()
        assert torch.equal(own.proj_w[inner] * 16, dec.arch.blocks[0].mlp.c_proj.bias)
        assert not own.proj_w[inner + 1:].any()
        with torch.no_grad():
            dec.arch.blocks[0].mlp.c_proj.bias.add_(1.0)  # an update, in place: the next rollout reads it
        dec.refresh()
        assert torch.equal(own.proj_w[inner] * 16, dec.arch.blocks[0].mlp.c_proj.bias)
    if own.out_w is not None:  # after the steps above: the attention output's 16s, and the bias row
        D, H = dec.arch.head_dim, dec.arch.n_head
        values_out = dec.arch.values_out.view(2, H, D + 8)
        assert (values_out[:, 0, D] == 16).all() and not values_out[:, 0, D + 1:].any()
        assert not values_out[:, 1:, D:].any() and values_out[..., :D].any()
        assert torch.equal(own.out_w[D] * 16, dec.arch.blocks[0].attn.c_proj.bias)


def test_ppo_uses_the_static_decoder_for_gpt2_and_can_be_told_not_to(tiny_model_dir, tiny_reward_dir):
    fast, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=2, batch_size=16)
    slow, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=2, batch_size=16, generation="dynamic")
    assert fast.decoder is not None and slow.decoder is None
    # the same seed gives the same rollouts, so the same training
    hf, hs = fast.train(), slow.train()
    assert [h["objective/scores"] for h in hf] == pytest.approx([h["objective/scores"] for h in hs], abs=1e-5)
    with pytest.raises(ValueError, match="ppo.generation"):
        PPOConfig(generation="fast")


# ---- LoRA: adapters train, the base stays, the reference is the base with adapters off ---------
def _lora_trainer(tiny_model_dir, tiny_reward_dir, rank=4, **overrides):
    tok = load_tokenizer(tiny_model_dir)
    policy = PolicyWithValue(lora.add_lora(load_policy(tiny_model_dir), rank=rank, alpha=8))
    cfg = PPOConfig(**{**dict(steps=3, batch_size=16, minibatches=2, epochs=2, checkpoint_every=0), **overrides})
    prompts = [tok(p)["input_ids"] for p in scenario.feedback_prompts()]
    return PPOTrainer(policy, None, load_reward(tiny_reward_dir, tok.pad_token_id), prompts, tok.eos_token_id,
                      tok.pad_token_id, cfg, seed=0)


def test_lora_policy_trains_its_adapters_against_itself_with_adapters_off(tiny_model_dir, tiny_reward_dir):
    trainer = _lora_trainer(tiny_model_dir, tiny_reward_dir)
    policy = trainer.policy
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n or n.startswith("value_head.") for n in trained)
    assert sum(p.numel() for p in trained.values()) < 0.2 * sum(p.numel() for p in frozen.values())
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trained)  # Adam state: adapters only
    assert trainer.decoder is not None  # the static decoder runs the adapters too
    history = trainer.train()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the base weights never move
    assert sum(not torch.equal(p, trained[n]) for n, p in policy.named_parameters() if n in trained) > len(trained) / 2
    # the reference is exactly the base model, and the policy has moved away from it
    ro = trainer.rollout()
    base = load_policy(tiny_model_dir).eval()
    expected = response_forward(base, ro.prompt_ids, ro.prompt_mask, ro.responses, ro.mask, 1.0, False,
                                with_entropy=False)["logprobs"]
    assert torch.allclose(ro.ref_logprobs, expected, atol=1e-6)
    assert (ro.logprobs - expected).abs().max() > 1e-3
    # and the static decoder samples what HF's path samples through the adapters
    tok = load_tokenizer(tiny_model_dir)
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(policy.lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=10)
    fast = dec.sample(ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(1))
    slow = sample(policy.lm, ids, mask, 10, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(1))
    assert torch.equal(fast, slow)


def test_lora_over_a_bf16_base_without_autocast_trains(tiny_model_dir, tiny_reward_dir):
    """LoRA's adapters and the value head are float32 over a bf16 base (as bench/ppo_throughput.py
    --lora builds it, the reference's bf16 weights, no autocast): the head reads the base's bf16
    hidden states in its own dtype. Before, the first rollout stopped on "mat1 and mat2 must have the
    same dtype" (the H200 run of 2026-12-04)."""
    tok = load_tokenizer(tiny_model_dir)
    policy = PolicyWithValue(lora.add_lora(load_policy(tiny_model_dir).to(torch.bfloat16), rank=4, alpha=8))
    assert policy.value_head.weight.dtype == torch.float32
    cfg = PPOConfig(steps=2, batch_size=16, minibatches=2, epochs=1, checkpoint_every=0, mixed_precision="no")
    prompts = [tok(p)["input_ids"] for p in scenario.feedback_prompts()]
    reward = load_reward(tiny_reward_dir, tok.pad_token_id, torch.bfloat16)
    trainer = PPOTrainer(policy, None, reward, prompts, tok.eos_token_id, tok.pad_token_id, cfg, seed=0)
    head = policy.value_head.weight.detach().clone()
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    assert trainer.rollout().values.dtype == torch.float32 and not torch.equal(policy.value_head.weight, head)


def test_lora_run_resumes_with_identical_results(tiny_model_dir, tiny_reward_dir, tmp_path):
    """A LoRA checkpoint holds the adapters and the value head only (the base is read from its own
    folder again), and resumes to the straight run's weights."""
    straight = _lora_trainer(tiny_model_dir, tiny_reward_dir, steps=4)
    straight.train()
    first = _lora_trainer(tiny_model_dir, tiny_reward_dir, steps=4, checkpoint_every=2)
    first.checkpoint_dir = tmp_path
    train_killed_after(first, 2)
    saved = load_file(str(tmp_path / "policy.safetensors"))
    trainable = {n for n, p in first.policy.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    assert sum(t.numel() for t in saved.values()) < 0.2 * sum(p.numel() for p in first.policy.parameters())
    resumed = _lora_trainer(tiny_model_dir, tiny_reward_dir, steps=4, checkpoint_every=2)
    resumed.checkpoint_dir = tmp_path
    resumed.train()
    assert resumed.step == 4
    for a, b in zip(straight.policy.state_dict().values(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b)
    # adapters of another rank do not fit this policy: a clear error, not a silent partial load
    other = _lora_trainer(tiny_model_dir, tiny_reward_dir, rank=2, steps=4, checkpoint_every=2)
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not hold"):
        other.load_checkpoint(tmp_path)
    # nor do a full policy's weights (a checkpoint of a run without LoRA in the same folder, same settings)
    full, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "full", steps=1, checkpoint_every=1,
                           batch_size=16, minibatches=2, epochs=2)
    full.train()
    with pytest.raises(ValueError, match="does not hold this LoRA policy's trainable weights"):
        _lora_trainer(tiny_model_dir, tiny_reward_dir, steps=2).load_checkpoint(tmp_path / "full")


def test_a_lora_run_with_a_critic_gives_the_critic_adapters_too_and_resumes(tiny_model_dir, tiny_reward_dir,
                                                                              tmp_path):
    """ppo.lora_rank with ppo.value_model reward (through the stage's build_trainer): the critic's
    trunk gets adapters as the policy's does, its weights stay frozen and its score head trains,
    all trainable weights in float32; the checkpoint holds the trainable weights alone and a killed
    run resumes to the straight one's weights."""
    common = dict(lora_rank=4, value_model="reward", batch_size=16, minibatches=2, epochs=2, checkpoint_every=2)
    straight, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=4, **common)
    critic = straight.policy.critic
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n == "score.weight" for n in trainable), sorted(trainable)[:5]
    assert all(p.dtype == torch.float32 for p in critic.parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in critic.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in critic.named_parameters() if ".lora_B" in n}
    straight.train()
    assert all(torch.equal(v, dict(critic.named_parameters())[n]) for n, v in frozen.items())
    assert any(not torch.equal(v, dict(critic.named_parameters())[n]) for n, v in adapters.items())
    train_killed_after(make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path, steps=4, **common)[0], 2)
    saved = load_file(str(tmp_path / "policy.safetensors"))
    assert set(saved) == {n for n, p in straight.policy.named_parameters() if p.requires_grad}
    critic_saved = {k.removeprefix("critic.") for k in saved if k.startswith("critic.")}
    assert critic_saved == trainable and not critic_saved & frozen.keys()
    resumed, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path, steps=4, **common)
    resumed.train()
    assert resumed.resumed_from == 2
    for k, v in straight.policy.state_dict().items():
        assert torch.equal(v, resumed.policy.state_dict()[k]), k


def test_no_reference_model_needs_a_lora_policy(tiny_model_dir, tiny_reward_dir):
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="ref_lm=None needs a LoRA policy"):
        PPOTrainer(PolicyWithValue(load_policy(tiny_model_dir)), None, load_reward(tiny_reward_dir, tok.pad_token_id),
                   [[5, 6]], tok.eos_token_id, tok.pad_token_id, PPOConfig(batch_size=4, minibatches=1))


def test_padded_head_gives_the_same_logits_and_gradients(tiny_model_dir):
    """The aligned LM head the trainer installs on a GPU: same logits, same gradients, same checkpoint keys."""
    lm = load_policy(tiny_model_dir).eval()
    plain = load_policy(tiny_model_dir).eval()
    assert lm.config.vocab_size % 64  # else nothing to pad
    keys = list(lm.state_dict())
    assert pad_lm_head(lm) and isinstance(lm.get_output_embeddings(), PaddedHead)
    assert not pad_lm_head(lm)  # once only
    assert list(lm.state_dict()) == keys
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # still tied
    ids = torch.randint(0, lm.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    out, ref = lm(input_ids=ids, logits_to_keep=3).logits, plain(input_ids=ids, logits_to_keep=3).logits
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
    out.logsumexp(-1).sum().backward()
    ref.logsumexp(-1).sum().backward()
    for a, b in zip(lm.parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_pipeline_lora_saves_merged_weights_and_continues_its_adapters(tiny_model_dir, tmp_path):
    import shutil

    from tasks.train_policy import build_policy, save_policy

    base, champion = tmp_path / "base", tmp_path / "champion"
    shutil.copytree(tiny_model_dir, base)
    shutil.copytree(tiny_model_dir, champion)  # round 1: the champion is the base, as MLflow hands it back
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    base_logits = load_policy(base).eval()(input_ids=ids).logits
    lm, ref = build_policy(str(champion), str(base), 4, 8.0)
    assert ref is None and lora.is_lora(lm)  # no second copy: the reference is the adapters off
    with torch.no_grad():  # stands for training: the adapters move
        for name, p in lm.named_parameters():
            if ".lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    lm.eval()
    trained = lm(input_ids=ids).logits
    assert (trained - base_logits).abs().max() > 1e-3
    save_policy(lm, load_tokenizer(base), tmp_path / "round1", str(base))
    # every other stage, and a user, loads the merged model: the same logits
    assert torch.allclose(load_policy(tmp_path / "round1").eval()(input_ids=ids).logits, trained, atol=1e-5)
    assert (tmp_path / "round1" / "lora" / "adapter_config.json").is_file()
    # the next round continues these adapters on the base
    lm2, ref2 = build_policy(str(tmp_path / "round1"), str(base), 4, 8.0)
    assert ref2 is None and torch.allclose(lm2.eval()(input_ids=ids).logits, trained, atol=1e-5)
    with lm2.disable_adapter():
        assert torch.allclose(lm2(input_ids=ids).logits, base_logits, atol=1e-6)
    # another rank cannot continue them: new adapters on the merged weights, the base beside them
    lm3, ref3 = build_policy(str(tmp_path / "round1"), str(base), 8, 16.0)
    assert ref3 is not None and torch.allclose(lm3.eval()(input_ids=ids).logits, trained, atol=1e-5)
    assert torch.allclose(ref3.eval()(input_ids=ids).logits, base_logits, atol=1e-6)
    # nor can adapters saved on another base
    (tmp_path / "round1" / "lora" / "base.sha256").write_text("0" * 64)
    assert build_policy(str(tmp_path / "round1"), str(base), 4, 8.0)[1] is not None
    # and without LoRA nothing changes: the round's policy, the base beside it
    lm4, ref4 = build_policy(str(tmp_path / "round1"), str(base), 0, 8.0)
    assert not lora.is_lora(lm4) and ref4 is not None
    # the shape a sharded run's gathered weights are loaded into, to save them: no reference loaded
    for rank in (0, 8):
        lm5, ref5 = build_policy(str(tmp_path / "round1"), str(base), rank, 16.0, reference=False)
        assert ref5 is None and lora.is_lora(lm5) == bool(rank)
    # mixed precision: the frozen base in bf16 (half the memory), the adapters and value head float32,
    # and the saved merge done in float32, so the adapters' update is not rounded to bf16
    lm6, _ = build_policy(str(champion), str(base), 4, 8.0, frozen_dtype=torch.bfloat16)
    assert {p.dtype for n, p in lm6.named_parameters() if ".lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in lm6.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    assert PolicyWithValue(lm6).value_head.weight.dtype == torch.float32
    with torch.no_grad():
        for name, p in lm6.named_parameters():
            if ".lora_" in name:
                p.add_(0.2 * torch.randn_like(p))
    layer = lm6.base_model.model.transformer.h[0].mlp.c_fc
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).T * layer.scaling["default"]
    expected = layer.base_layer.weight.float() + delta  # GPT-2's Conv1D keeps its weight transposed
    save_policy(lm6, load_tokenizer(base), tmp_path / "round1-bf16", str(base))
    merged = load_file(tmp_path / "round1-bf16" / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    assert merged.dtype == torch.float32 and torch.allclose(merged, expected, atol=1e-6)
    assert not torch.equal(merged, merged.to(torch.bfloat16).float())  # not rounded to bf16


def test_reward_scores_do_not_depend_on_the_texts_beside_them(tiny_model_dir, tiny_reward_dir):
    """Evaluation, reward accuracy and serving score left-padded batches: a text's score must be
    its own, whatever else is in the batch (positions from the attention mask)."""
    from tasks.modeling import score_texts

    tok = load_tokenizer(tiny_model_dir)
    rm = load_reward(tiny_reward_dir, tok.pad_token_id)
    alone = score_texts(rm, tok, ["the ceo said"], [" they were ready ."])
    beside = score_texts(rm, tok, ["the ceo said", "the nurse said"],
                         [" they were ready .", " she was late because the bus was late and the weather was bad ."])
    assert torch.allclose(alone, beside[:1], atol=1e-5)
    # and the score is the one the PPO reward pass reads (its own left padding and positions)
    enc = tok(["the ceo said"], return_tensors="pt")
    resp = tok([" they were ready ."], return_tensors="pt", add_special_tokens=False)["input_ids"]
    resp = torch.cat([resp, torch.tensor([[tok.eos_token_id]])], 1)
    rollout_score = reward_scores(rm, enc["input_ids"], enc["attention_mask"], resp, torch.ones_like(resp))
    assert torch.allclose(alone, rollout_score, atol=1e-5)


def test_a_critic_from_the_reward_model_values_a_whole_response_as_its_score_and_leaves_the_policy_alone(
        tiny_model_dir, tiny_reward_dir):
    """ppo.value_model reward: the critic starts as the reward model (its value at a sequence's last
    token is that model's score, whatever the padding beside it), and the value loss reaches the
    critic alone, where with a shared trunk it moves the policy's weights too."""

    tok = load_tokenizer(tiny_model_dir)
    rm = load_reward(tiny_reward_dir, tok.pad_token_id)
    policy = PolicyWithValue(load_policy(tiny_model_dir), Critic(load_reward(tiny_reward_dir, tok.pad_token_id)))
    enc = tok(["the doctor said", "the ceo said that"], return_tensors="pt", padding=True)  # left-padded
    responses = torch.tensor([[10, 11, tok.eos_token_id, tok.pad_token_id], [12, 13, 14, tok.eos_token_id]])
    mask = core.response_mask(responses, tok.eos_token_id)
    ids = torch.cat([enc["input_ids"], responses], 1)
    attention = torch.cat([enc["attention_mask"], mask.long()], 1)
    _, values = policy(ids, attention, position_ids_from_mask(attention))  # (B, L)
    last = attention.shape[1] - 1 - attention.flip(1).argmax(1)  # each row's last real token
    scores = reward_scores(rm, enc["input_ids"], enc["attention_mask"], responses, mask)
    assert torch.allclose(values[torch.arange(2), last], scores, atol=1e-5)
    assert not torch.allclose(values[:, -3], values[torch.arange(2), last])  # a value per position, not one

    def gradients(model) -> tuple[bool, bool]:  # (the LM got any, the value function got any)
        model.zero_grad(set_to_none=True)
        out = response_forward(model, enc["input_ids"], enc["attention_mask"], responses, mask, 1.0, True)
        (out["values"] * mask).sum().backward()  # a value loss alone
        value_params = (model.critic or model.value_head).parameters()
        return (any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lm.parameters()),
                any(p.grad is not None and p.grad.abs().sum() > 0 for p in value_params))

    assert gradients(policy) == (False, True)
    shared = PolicyWithValue(load_policy(tiny_model_dir))
    torch.nn.init.normal_(shared.value_head.weight)  # (zero at the start: no gradient into the trunk yet)
    assert gradients(shared) == (True, True)
    # the critic is a copy: the reward model itself stays frozen, so sharing it is refused
    with pytest.raises(ValueError, match="shares weights with the reward model"):
        PPOTrainer(PolicyWithValue(load_policy(tiny_model_dir), Critic(rm)), load_policy(tiny_model_dir), rm,
                   [[5, 6]], tok.eos_token_id, tok.pad_token_id, PPOConfig())
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a reward model a critic can start from"):
        Critic(load_policy(tiny_model_dir))


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma3", "gemma2", "phi3", "pythia", "olmo2", "opt",
                                    "qwen3_5"])
def test_a_critic_is_made_of_each_familys_reward_model_and_starts_at_its_score(family):
    """Critic(classifier) finds the trunk and score head of every family the pipeline's reward models
    come in; its value at each row's last token is exactly the classifier's score (left padding; also
    through Qwen3.5's linear-attention layers, whose recurrence the padding must not reach)."""
    import transformers as T

    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, pad_token_id=0, num_labels=1)
    gqa_free = {k: v for k, v in small.items() if k != "num_key_value_heads"}
    config = {"gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, pad_token_id=0,
                                           num_labels=1),
              "llama": lambda: T.LlamaConfig(**small), "qwen3": lambda: T.Qwen3Config(**small, head_dim=8),
              "gemma3": lambda: T.Gemma3TextConfig(**small, head_dim=8),
              "gemma2": lambda: T.Gemma2Config(**small, head_dim=8),
              "phi3": lambda: T.Phi3Config(**small), "pythia": lambda: T.GPTNeoXConfig(**gqa_free),
              "olmo2": lambda: T.Olmo2Config(**small),
              "opt": lambda: T.OPTConfig(**{k: v for k, v in gqa_free.items() if k != "intermediate_size"}, ffn_dim=64,
                                         word_embed_proj_dim=32),
              "qwen3_5": lambda: T.Qwen3_5TextConfig(**small, head_dim=8, linear_num_key_heads=2,
                                                     linear_num_value_heads=4, linear_key_head_dim=8,
                                                     linear_value_head_dim=8,
                                                     layer_types=["linear_attention", "full_attention"])}[family]()
    torch.manual_seed(0)
    classifier = T.AutoModelForSequenceClassification.from_config(config).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        values = Critic(classifier)(ids, mask, position_ids_from_mask(mask))  # (2, 6)
        scores = classifier(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert values.shape == (2, 6) and torch.allclose(values[:, -1], scores[:, 0], atol=1e-6)
    with torch.no_grad():  # the padded row scores as it does alone
        alone = classifier(input_ids=ids[:1, 2:]).logits
    assert torch.allclose(alone[0], scores[0], atol=1e-5)


def test_a_reward_model_no_critic_can_start_from_stops_the_stage_saying_what_to_set(tiny_model_dir, tmp_path):
    """A reward model of the policy's tokenizer whose head is not a `score` (a BERT classifier's
    `classifier`): with ppo.value_model reward the stage stops with what to set, not a traceback."""
    from transformers import BertConfig, BertForSequenceClassification

    from tasks.stage import StageError

    tok = load_tokenizer(tiny_model_dir)
    folder = tmp_path / "bert-reward"
    bert = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, num_labels=1)
    BertForSequenceClassification(bert).save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = load_config(None, {**FAST, "ppo.value_model": "reward"})
    with pytest.raises(StageError, match="ppo.value_model is reward, but BertForSequenceClassification is not a reward "
                                         "model a critic can start from.*; set ppo.value_model to shared"):
        build_trainer(str(tiny_model_dir), str(tiny_model_dir), str(folder), scenario.feedback_prompts(), cfg, seed=0)


def test_ppo_with_a_critic_learns_trains_the_critic_and_resumes_exactly(tiny_model_dir, tiny_reward_dir, tmp_path):
    """The whole loop with ppo.value_model reward: the score rises with KL bounded, the critic
    moves while the reward model does not, and a run killed after a checkpoint resumes to the same
    weights (the critic's and its Adam state included)."""
    trainer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, value_model="reward")
    critic = trainer.policy.critic
    assert critic is not None and not hasattr(trainer.policy, "value_head")
    before = {k: v.clone() for k, v in critic.state_dict().items()}
    reward_before = {k: v.clone() for k, v in trainer.reward_model.state_dict().items()}
    history = trainer.train()
    first = sum(h["objective/scores"] for h in history[:3]) / 3
    last = sum(h["objective/scores"] for h in history[-5:]) / 5
    assert last > first + 0.1, (first, last)
    assert all(h["objective/kl"] < 4 * trainer.cfg.target_kl for h in history)
    assert history[-1]["policy/entropy"] > 0.05
    assert history[-1]["val/explained_var"] > 0  # the critic predicts the returns better than their mean
    assert any(not torch.equal(v, critic.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(v, trainer.reward_model.state_dict()[k]) for k, v in reward_before.items())

    runs = {}
    ckpt = tmp_path / "ckpt"
    for name, folder in (("straight", None), ("killed", ckpt), ("resumed", ckpt)):
        runs[name], _ = make_trainer(tiny_model_dir, tiny_reward_dir, folder, steps=4, checkpoint_every=2,
                                     batch_size=16, value_model="reward")
        if name == "killed":
            train_killed_after(runs[name], 2)
        else:
            runs[name].train()
    assert runs["resumed"].resumed_from == 2
    for k, v in runs["straight"].policy.state_dict().items():
        assert torch.equal(v, runs["resumed"].policy.state_dict()[k]), k
    # a checkpoint of the shared value head is another run's
    shared, _ = make_trainer(tiny_model_dir, tiny_reward_dir, tmp_path / "ckpt", steps=6, batch_size=16)
    with pytest.raises(ValueError, match=r"another run's \(ppo\.value_model differ\)"):
        shared.train()


# ---- other architectures: the general paths (HF's sampler and cache), Llama as the example ----
@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir, tmp_path_factory):
    """A random tiny Llama (rotary positions, grouped-query attention, no biases) saved as a user's
    folder, with the test tokenizer: the same from_pretrained path as any Hugging Face model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = load_tokenizer(tiny_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_ppo_on_a_llama_policy_full_and_lora(tiny_llama_dir):
    """Not GPT-2: the scoring pass matches a row-by-row forward, the reward model's score is its
    own whatever the batch, and PPO trains whole or with LoRA, with the static decoder (through
    the adapters) giving the same run as HF's sampler (a sharded LoRA Llama is in the two-process
    test)."""
    from tasks.modeling import score_texts

    tok = load_tokenizer(tiny_llama_dir)
    lm = load_policy(tiny_llama_dir).eval()
    enc = tok(["the doctor said", "the ceo said that"], return_tensors="pt", padding=True)
    responses = sample(lm, enc["input_ids"], enc["attention_mask"], 8, 1.0, tok.eos_token_id, tok.pad_token_id,
                       torch.Generator().manual_seed(0))
    mask = core.response_mask(core.truncate_after_eos(responses, tok.eos_token_id, tok.pad_token_id), tok.eos_token_id)
    out = response_forward(PolicyWithValue(lm), enc["input_ids"], enc["attention_mask"], responses, mask, 1.0, True)
    for i in range(2):
        prompt = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        n = int(mask[i].sum())
        logits = lm(input_ids=torch.cat([prompt, responses[i, :n]])[None]).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, responses[i, :n, None]).squeeze(-1)
        assert torch.allclose(out["logprobs"][i, :n], ref, atol=1e-5)
    rm = load_reward(tiny_llama_dir, tok.pad_token_id).eval()
    alone = score_texts(rm, tok, ["the ceo said"], [" they were ready ."])
    beside = score_texts(rm, tok, ["the ceo said", "the nurse said"], [" they were ready .", " she was late " * 5])
    assert torch.allclose(alone, beside[:1], atol=1e-5)
    prompts = [tok(p)["input_ids"] for p in scenario.feedback_prompts()]
    for rank in (0, 4):
        runs = {}
        for generation in ("static", "dynamic"):
            cfg = PPOConfig(steps=2, batch_size=16, minibatches=2, epochs=2, checkpoint_every=0, generation=generation)
            policy = load_policy(tiny_llama_dir)
            ref_lm = load_policy(tiny_llama_dir) if rank == 0 else None
            policy = PolicyWithValue(lora.add_lora(policy, rank, 8) if rank else policy)
            trainer = PPOTrainer(policy, ref_lm, rm, prompts, tok.eos_token_id, tok.pad_token_id, cfg, seed=0)
            before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
            runs[generation] = history = trainer.train()
            assert (trainer.decoder is not None) == (generation == "static") and len(history) == 2
            assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
            assert history[0]["objective/kl"] == pytest.approx(0, abs=1e-5)  # the first rollout: policy = reference
            assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if n in before)
        assert [h["objective/scores"] for h in runs["static"]] == pytest.approx(
            [h["objective/scores"] for h in runs["dynamic"]], abs=1e-5)


def test_pipeline_resumes_only_the_checkpoints_of_the_same_run(tmp_path, capsys):
    """The train_policy stage's checkpoints: kept for the same run retried after a kill (also with
    more steps), deleted with the reason when a setting or a starting model changed since, as
    resuming them would continue the old run under the new name."""
    from tasks.train_policy import keep_matching_checkpoints, resume_key
    from tasks.workspace import RoundState, Workspace

    ws = Workspace(tmp_path / "ws")
    for folder in (ws.base_model, ws.reward_model):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
    state, ckpt = RoundState(round=1), tmp_path / "ckpt"

    def start(cfg=load_config(None, FAST), policy=str(ws.base_model)):
        keep_matching_checkpoints(ckpt, resume_key(ws, cfg, state, policy))
        return capsys.readouterr().out

    assert start() == ""
    (ckpt / "trainer.pt").write_bytes(b"state")  # what a killed run leaves
    assert start() == "" and (ckpt / "trainer.pt").exists()
    assert start(load_config(None, {**FAST, "ppo.steps": 60, "ppo.checkpoint_every": 3})) == ""
    assert start(load_config(None, {**FAST, "ppo.micro_batch_size": 8, "ppo.generation": "dynamic"})) == ""
    assert (ckpt / "trainer.pt").exists()
    out = start(load_config(None, {**FAST, "ppo.lr": 5e-5}))
    assert "ppo.lr changed" in out and "deleted" in out and not (ckpt / "trainer.pt").exists()
    (ckpt / "trainer.pt").write_bytes(b"state")
    (ws.reward_model / "model.safetensors").write_bytes(b"retrained weights")
    assert "models.reward changed" in start(load_config(None, {**FAST, "ppo.lr": 5e-5}))
    assert not (ckpt / "trainer.pt").exists()
    (ckpt / "trainer.pt").write_bytes(b"state")
    assert "models.policy changed" in start(load_config(None, {**FAST, "ppo.lr": 5e-5}), policy="gpt2")
    (ckpt / "run.json").write_text("{cut off")
    (ckpt / "trainer.pt").write_bytes(b"state")
    assert "no readable run.json" in start() and not (ckpt / "trainer.pt").exists()
    assert json.loads((ckpt / "run.json").read_text())["ppo"]["lr"] == load_config(None, FAST).ppo.lr


def test_generation_in_chunks_samples_each_chunk_alone(tiny_model_dir, tiny_reward_dir):
    """ppo.generation_batch_size bounds the KV cache: the batch is sampled 4 episodes at a time, each
    chunk as the sampler draws it alone (from the generator where the last chunk left it), the
    shorter ones right-padded; the static decoder holds one chunk. Both decoders agree."""
    rollouts = {}
    for generation in ("static", "dynamic"):
        trainer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=2, batch_size=16, minibatches=2,
                                  generation_batch_size=4, generation=generation)
        if generation == "static":
            assert trainer.decoder.B == 4 and trainer.decoder.k[0].shape[0] == 4  # the cache holds one chunk
        else:
            assert trainer.decoder is None
        prompt_order, draws = trainer.rng.getstate(), trainer.generator.get_state()
        rollouts[generation] = trainer.rollout().responses
        trainer.rng.setstate(prompt_order)
        ids, mask = trainer._prompt_batch()
        cfg, eos, pad = trainer.cfg, trainer.eos_id, trainer.pad_id
        by_hand = torch.Generator().set_state(draws)
        chunks = [sample(trainer.policy.lm, ids[i:i + 4], mask[i:i + 4], cfg.max_new_tokens, cfg.temperature, eos, pad,
                         by_hand) for i in range(0, 16, 4)]
        assert len({c.shape[1] for c in chunks}) > 1  # chunks of different lengths: the padding is exercised
        assert torch.equal(rollouts[generation], core.truncate_after_eos(cat_responses(chunks, pad), eos, pad))
        whole = sample(trainer.policy.lm, ids, mask, cfg.max_new_tokens, cfg.temperature, eos, pad,
                       torch.Generator().set_state(draws))
        assert whole.shape != rollouts[generation].shape or not torch.equal(whole, rollouts[generation])
        assert len(trainer.train()) == 2
    assert torch.equal(rollouts["static"], rollouts["dynamic"])


def test_micro_batches_give_the_whole_batch_results(tiny_model_dir, tiny_reward_dir):
    """ppo.micro_batch_size bounds memory, not results: scoring passes in chunks and gradients
    accumulated over uneven micro-batches (3 + 3 + 2 of a minibatch of 8) give the same rollout,
    the same losses and the same weights as whole minibatches."""
    whole, _ = make_trainer(tiny_model_dir, tiny_reward_dir, batch_size=16, minibatches=2, epochs=2)
    micro, _ = make_trainer(tiny_model_dir, tiny_reward_dir, batch_size=16, minibatches=2, epochs=2,
                            micro_batch_size=3)
    calls = {"whole": 0, "micro": 0}
    for name, trainer in (("whole", whole), ("micro", micro)):
        trainer.policy.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    a, b = whole.train_step(), micro.train_step()
    # policy passes: scoring 1 vs 6 (16 = 5 x 3 + 1), updates 2 epochs x 2 minibatches x 1 vs 3 each
    assert calls == {"whole": 1 + 4, "micro": 6 + 4 * 3}
    for k in ("objective/scores", "objective/kl", "policy/entropy", "loss/policy", "loss/value", "policy/clipfrac",
              "policy/approxkl", "val/explained_var"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for (name, p), q in zip(whole.policy.named_parameters(), micro.policy.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def test_gemma_norms_read_one_plus_weight_made_at_each_rollout(tiny_model_dir):
    """Gemma 3's norms scale by 1 + weight, which the decoder makes once per rollout (`_Gemma.rms`):
    its logits are the model's, and after the norm weights change in place (an optimizer step) the
    next rollout's are the changed model's."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(Gemma3TextConfig(**_LLAMA_LIKE, head_dim=16, vocab_size=len(tok),
                                                           pad_token_id=tok.pad_token_id)).eval()
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=4)
    assert len(dec.arch.one_plus) == 2 * (4 + 2) + 1  # a layer: 4 around attention and MLP, q's and k's; the last
    fed = torch.randint(3, len(tok), (2, 3), generator=torch.Generator().manual_seed(0))
    for update in range(2):
        ours, hf = decoder_logits(dec, ids, mask, fed), forward_logits(lm, ids, mask, fed)
        assert torch.allclose(ours, hf, atol=1e-5), update
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if "norm" in name:
                    p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("variant", ["llama3-rope", "llama-bias-mqa", "qwen2", "mistral", "qwen3", "gemma3",
                                     "phi3", "phi3-partial-rotary", "phi3-longrope", "pythia", "neox-sequential",
                                     "olmo2", "olmo3", "gemma2", "gemma3-softcap", "smollm3", "granite",
                                     "mistral-window-8", "qwen2-window-8",
                                     "qwen3-window-8", "gemma3-window-8", "gemma2-window-8", "phi3-window-8",
                                     "phi3-longrope-past", "neox-dynamic-rope", "olmo3-window-8", "smollm3-window-8",
                                     "gemma4", "gemma4-k-eq-v", "gemma4-window-8", "gemma4-experts",
                                     "ministral", "ministral3", "ministral3-past-original", "ministral3-window-8"])
def test_static_decoder_covers_the_llama_family_and_declines_the_rest(variant, tiny_model_dir):
    """Qwen2, Qwen3 (per-head query/key norms), Gemma 3 (those norms, norms around attention and
    MLP, scaled embeddings, a rotary table per layer type, its own attention scale), Mistral
    (within its sliding window), Llama 3's scaled rotary, biased projections with one key/value
    head, Phi-3 (fused q/k/v and gate/up projections; rotary on part of each head as Phi-4-mini;
    LongRoPE within its original length, as Phi-3.5), GPT-NeoX (Pythia's: q/k/v interleaved head
    by head in one projection, rotary on a quarter of each head, LayerNorm, attention and MLP in
    parallel; and with the residual in sequence), OLMo 2 (norms after attention and MLP, query and
    key norms over all heads at once) and OLMo 3 (those, with a sliding-window layer and a global
    one, a rotary table each), Gemma 2 (Gemma 3's norms but those on query and key heads,
    attention scores and final logits soft-capped, caps small enough here to bite; and Gemma 3
    with both caps set, of which HF's Gemma 3 applies the final one), SmolLM3 (a layer without
    rotary positions), Granite (multipliers on embeddings, residual branches, attention scores
    and logits), Gemma 4's language model (as its E2B: per-layer inputs, global layers with wider
    heads and a rotary table of their own, norms on q, k and v, learned layer scalars, the last
    layers reading the keys and values of the last earlier layer of their type; and as its 31B:
    the global layers' value the key's projection, one key/value head, capped logits), each also
    with LoRA: the static decoder's
    logits are the model's at every step, and it samples what HF's sampler samples; also with a
    sliding window shorter than the rollout (Mistral's, Ministral 3's and Phi-3's on every layer,
    Gemma 2's, 3's and 4's, OLMo 3's, Qwen2's and Qwen3's on their local layers), masked as HF
    masks it (SmolLM3's, which HF's SmolLM3 leaves unapplied, likewise). LongRoPE past the original
    length (HF switches factors mid-rollout) and rotary scaling that changes with the length
    (dynamic NTK) are left to HF's sampler, as are Gemma 4's experts (26B-A4B).
    Ministral (sliding-window layers) and Ministral 3 (YaRN, its query scale by position, which is 1
    within the original length: past it, HF's sampler) are Llama's block."""
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Gemma4TextConfig, GPTNeoXConfig,
                              GraniteConfig, Ministral3Config, MinistralConfig,
                              LlamaConfig, MistralConfig, Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config, Qwen3Config,
                              SmolLM3Config)

    tok = load_tokenizer(tiny_model_dir)
    common = dict(_LLAMA_LIKE, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    neox = {k: v for k, v in common.items() if k != "num_key_value_heads"}
    ids, mask = _two_prompts(tok)

    def ministral3(original: int) -> dict:
        return {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": original,
                "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}

    gemma4 = dict(common, head_dim=16, global_head_dim=32, sliding_window=64, vocab_size_per_layer_input=len(tok),
                  hidden_size_per_layer_input=8, layer_types=["sliding_attention", "full_attention"])

    def longrope(original: int) -> dict:  # Phi-3.5's scaling: per-frequency factors, short and long
        half = 64 // 4 // 2
        return {"original_max_position_embeddings": original, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + i / half for i in range(half)], "long_factor": [4.0 + i for i in range(half)]}}

    config = {
        "llama3-rope": lambda: LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "llama-bias-mqa": lambda: LlamaConfig(**{**common, "num_key_value_heads": 1}, attention_bias=True,
                                              mlp_bias=True),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=4096),
        "qwen3": lambda: Qwen3Config(**common),
        "mistral-window-8": lambda: MistralConfig(**common, sliding_window=8),
        "qwen3-window-8": lambda: Qwen3Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "qwen2-window-8": lambda: Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        # one sliding-window layer, then one global layer: both rotary tables in use
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64, sliding_window_pattern=2),
        "gemma3-window-8": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=8, sliding_window_pattern=2),
        "gemma3-softcap": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64, sliding_window_pattern=2,
                                                   attn_logit_softcapping=0.5, final_logit_softcapping=0.2),
        # Gemma 2's caps are 50 and 30, too wide to show at this size: these change what is sampled
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, sliding_window=64, attn_logit_softcapping=0.5,
                                       final_logit_softcapping=0.2),
        "gemma2-window-8": lambda: Gemma2Config(**common, head_dim=16, sliding_window=8),
        "smollm3": lambda: SmolLM3Config(**common, no_rope_layers=[1, 0]),  # the second layer NoPE, as every 4th
        # Granite 3's own multipliers (granite-3.1-2b's: 12, 0.22, 1/64, 8)
        "granite": lambda: GraniteConfig(**common, embedding_multiplier=12.0, residual_multiplier=0.22,
                                         attention_multiplier=0.015625, logits_scaling=8.0),
        "smollm3-window-8": lambda: SmolLM3Config(**common, no_rope_layers=[1, 0], use_sliding_window=True,
                                                  sliding_window=8),
        "phi3": lambda: Phi3Config(**common),
        "phi3-partial-rotary": lambda: Phi3Config(**common, partial_rotary_factor=0.5),
        "phi3-longrope": lambda: Phi3Config(**common, **longrope(64)),
        "phi3-window-8": lambda: Phi3Config(**common, sliding_window=8),
        "phi3-longrope-past": lambda: Phi3Config(**common, **longrope(12)),
        # Pythia's layout at this size (rotary_pct 0.25 and use_parallel_residual are its settings)
        "pythia": lambda: GPTNeoXConfig(**neox, rotary_pct=0.25, use_parallel_residual=True),
        "neox-sequential": lambda: GPTNeoXConfig(**neox, rotary_pct=1.0, use_parallel_residual=False),
        "neox-dynamic-rope": lambda: GPTNeoXConfig(**neox, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        "olmo2": lambda: Olmo2Config(**common),
        # one sliding-window layer, then one global layer: both rotary tables in use (the global one scaled)
        "olmo3": lambda: Olmo3Config(**common, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                                     rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                      "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 5e5}}),
        "olmo3-window-8": lambda: Olmo3Config(**common, sliding_window=8,
                                              layer_types=["sliding_attention", "full_attention"]),
        # 4 layers, the last two reading the keys and values of the first two (E2B's last 20 of 35 do)
        "gemma4": lambda: Gemma4TextConfig(**{**gemma4, "num_hidden_layers": 4,
                                              "layer_types": gemma4["layer_types"] * 2}, num_kv_shared_layers=2),
        "gemma4-k-eq-v": lambda: Gemma4TextConfig(**{**gemma4, "hidden_size_per_layer_input": 0}, attention_k_eq_v=True,
                                                  num_global_key_value_heads=1, final_logit_softcapping=0.5),
        "gemma4-window-8": lambda: Gemma4TextConfig(**{**gemma4, "sliding_window": 8}),
        "gemma4-experts": lambda: Gemma4TextConfig(**gemma4, enable_moe_block=True, num_experts=4, top_k_experts=2,
                                                   moe_intermediate_size=32),
        "ministral": lambda: MinistralConfig(**common, head_dim=16, sliding_window=64,
                                             layer_types=["sliding_attention", "full_attention"]),
        # Ministral 3's YaRN and query scale as released, its original length shrunk to the rollout's and past it
        "ministral3": lambda: Ministral3Config(**common, rope_parameters=ministral3(ids.shape[1] + 12)),
        "ministral3-past-original": lambda: Ministral3Config(**common, rope_parameters=ministral3(8)),
        "ministral3-window-8": lambda: Ministral3Config(**common, sliding_window=8, rope_parameters=ministral3(64)),
    }[variant]()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    if variant == "qwen3":
        assert all(hasattr(layer.self_attn, "q_norm") for layer in lm.model.layers)  # what sets Qwen3 apart
    if variant == "gemma3":
        assert lm.config.layer_types == ["sliding_attention", "full_attention"]
        assert lm.config.query_pre_attn_scalar != lm.config.head_dim  # its own attention scale
    if variant.startswith("phi3-longrope"):
        assert lm.config.rope_parameters["original_max_position_embeddings"] == (64 if variant == "phi3-longrope" else 12)
    if variant == "phi3-partial-rotary":
        assert lm.model.rotary_emb(ids.float(), ids)[0].shape[-1] == 8  # of the head's 16
    if variant in ("olmo2", "olmo3"):
        assert not hasattr(lm.model.layers[0], "input_layernorm")  # its norms come after attention and MLP
        assert lm.model.layers[0].self_attn.q_norm.weight.shape == (64,)  # over all 4 heads at once
    if variant == "olmo3":
        a, b = (lm.model.rotary_emb(ids.float(), ids, kind)[0] for kind in ("sliding_attention", "full_attention"))
        assert not torch.allclose(a, b)  # two tables
    if variant == "pythia":
        assert lm.gpt_neox.rotary_emb(ids.float(), ids)[0].shape[-1] == 4 and lm.config.use_parallel_residual
        assert lm.lm_head.weight.data_ptr() != lm.gpt_neox.embed_in.weight.data_ptr()  # a head of its own
    if variant == "smollm3":
        assert [layer.self_attn.use_rope for layer in lm.model.layers] == [1, 0]
    if variant in ("gemma2", "gemma3-softcap"):  # the caps bite: HF's logits without them differ
        capped = lm(input_ids=ids, attention_mask=mask).logits
        assert capped.abs().max() < 0.2 and lm.model.layers[0].self_attn.attn_logit_softcapping == 0.5
    if variant.startswith("gemma4"):
        with torch.no_grad():  # scalars and norm weights that are not 1, so that where each applies shows
            for name, t in [*lm.named_buffers(), *lm.named_parameters()]:
                if name.endswith("layer_scalar") or "norm" in name:
                    t.add_(torch.randn_like(t) * 0.3)
    if variant == "gemma4":
        layers = lm.model.layers
        assert [layer.self_attn.is_kv_shared_layer for layer in layers] == [False, False, True, True]
        assert [layer.self_attn.head_dim for layer in layers] == [16, 32, 16, 32] and layers[0].per_layer_input_gate
        # a transformers whose Gemma 4 config has no kv_sharing_modes (5.17, the lent H200's): declined,
        # so PPO samples it with HF's cache, where the decoder stopped on an AttributeError
        with pytest.MonkeyPatch.context() as mp:
            mp.delattr(type(lm.config), "kv_sharing_modes")
            assert not static_decode.supports(lm, ids.shape[1] + 12)
            with pytest.raises(ValueError, match="StaticDecoder supports"):
                static_decode.StaticDecoder(lm, 2, ids.shape[1], 12)
    if variant == "gemma4-k-eq-v":
        assert lm.model.layers[1].self_attn.v_proj is None and lm.model.layers[1].self_attn.k_proj.out_features == 32
    if variant == "ministral3":  # past its original length the queries would be scaled: the table's reach
        assert static_decode.supports(lm, ids.shape[1] + 12) and not static_decode.supports(lm, ids.shape[1] + 13)
    if variant.endswith(("-past", "dynamic-rope", "experts", "-past-original")):
        assert not static_decode.supports(lm, ids.shape[1] + 12)
        with pytest.raises(ValueError, match="StaticDecoder supports"):
            static_decode.StaticDecoder(lm, 2, ids.shape[1], 12)
        return
    for with_lora in (False, True):
        if with_lora:
            lm = lora.add_lora(lm, rank=4, alpha=8)
            with torch.no_grad():
                for name, p in lm.named_parameters():
                    if ".lora_B" in name:
                        p.normal_(std=0.2)  # adapters that change the output
        assert static_decode.supports(lm, ids.shape[1] + 12)
        _assert_decoder_logits_match(lm, tok)
        dec = static_decode.StaticDecoder(lm, 2, ids.shape[1], 12)
        for seed in range(3):
            fast = dec.sample(ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(seed))
            slow = sample(lm, ids, mask, 12, 1.0, tok.eos_token_id, tok.pad_token_id,
                          torch.Generator().manual_seed(seed))
            assert torch.equal(fast, slow), (with_lora, seed)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma3", "gemma2", "phi3", "pythia", "olmo3", "gemma4"])
def test_static_decoder_in_bf16_is_as_close_to_the_truth_as_the_model_itself(family, tiny_model_dir):
    """In bf16 the decoder computes its own way (q scaled before the product, softmax read in bf16,
    F.rms_norm, rotary as one addcmul): at every step its logits are as close to a float64 forward
    of the same weights as HF's own bf16 forward is. Norm weights are random, so where each norm
    applies its weight (Llama after the cast back, Gemma 3 before) shows."""
    from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, Gemma4TextConfig, GPT2Config,
                              GPTNeoXConfig, LlamaConfig, Olmo3Config, Phi3Config, Qwen3Config)

    tok = load_tokenizer(tiny_model_dir)
    common = dict(_LLAMA_LIKE, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = {"gpt2": lambda: GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tok), n_positions=128),
              "llama": lambda: LlamaConfig(**common),
              "qwen3": lambda: Qwen3Config(**common),
              "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64,
                                                 sliding_window_pattern=2),
              "gemma2": lambda: Gemma2Config(**common, head_dim=16, sliding_window=64, attn_logit_softcapping=1.0,
                                             final_logit_softcapping=1.0),
              "phi3": lambda: Phi3Config(**common, partial_rotary_factor=0.5),
              "pythia": lambda: GPTNeoXConfig(**{k: v for k, v in common.items() if k != "num_key_value_heads"},
                                              rotary_pct=0.25, use_parallel_residual=True),
              "olmo3": lambda: Olmo3Config(**common, sliding_window=64,
                                           layer_types=["sliding_attention", "full_attention"]),
              "gemma4": lambda: Gemma4TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32,
                                                 sliding_window=64, vocab_size_per_layer_input=len(tok),
                                                 hidden_size_per_layer_input=8, num_kv_shared_layers=2,
                                                 layer_types=["sliding_attention", "full_attention"] * 2)}[family]()
    torch.manual_seed(0)
    # (HF's Gemma 2 in float64 returns NaN on a left-padded row; in float32 it does not, and float32
    # is as good as exact at bf16's scale)
    truth = AutoModelForCausalLM.from_config(config).to(torch.float32 if family == "gemma2" else torch.float64).eval()
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in truth.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4's learned scalars, loaded with the weights
                b.add_(torch.randn_like(b) * 0.3)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    lm.load_state_dict(truth.state_dict())
    ids, mask = _two_prompts(tok)
    T = 6
    dec = static_decode.StaticDecoder(lm, batch=2, prompt_len=ids.shape[1], max_new_tokens=T)
    assert mask.bool().any(-1).all()  # both prompts have a real token
    fed = torch.randint(3, len(tok), (2, T - 1), generator=torch.Generator().manual_seed(0))
    ours = decoder_logits(dec, ids, mask, fed).double()  # (B, T, V)
    exact, hf = forward_logits(truth, ids, mask, fed), forward_logits(lm, ids, mask, fed).double()
    ours_err, hf_err = (ours - exact).abs().max().item(), (hf - exact).abs().max().item()
    assert 0 < hf_err < 0.5  # bf16 rounding is there, and small
    assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)


@pytest.mark.parametrize("model", ["tiny_model_dir", "tiny_llama_dir"])
def test_mixed_precision_decoder_samples_over_bf16_copies_refreshed_each_rollout(model, request):
    """bf16 autocast over float32 weights (ppo.mixed_precision): the decoder samples exactly what a
    decoder over the bf16 cast of the weights samples, also inside the trainer's autocast; the
    model keeps its own float32 weights; after the weights change (an optimizer step, in place)
    the next rollout reads the new ones."""
    import copy

    model_dir = request.getfixturevalue(model)
    tok, lm = load_tokenizer(model_dir), load_policy(model_dir).eval()
    ids, mask = _two_prompts(tok)
    dec = static_decode.StaticDecoder(lm, 2, ids.shape[1], 12, autocast_dtype=torch.bfloat16)
    weights = dict(lm.named_parameters())
    drawn = []
    for update in range(2):
        bf16 = copy.deepcopy(lm)
        for p in bf16.parameters():  # the weights cast, the buffers as they are (rotary inv_freq in float32)
            p.data = p.data.to(torch.bfloat16)
        cast = static_decode.StaticDecoder(bf16, 2, ids.shape[1], 12)
        for seed in range(3):
            args = (ids, mask, 1.0, tok.eos_token_id, tok.pad_token_id)
            ours = dec.sample(*args, torch.Generator().manual_seed(seed))
            assert torch.equal(ours, cast.sample(*args, torch.Generator().manual_seed(seed))), (update, seed)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal(ours, dec.sample(*args, torch.Generator().manual_seed(seed)))
            drawn.append(ours)
        # every float32 weight read in bf16: in the shadow, or (GPT-2's projections) in the decoder's own copies
        own = {n for n, p in weights.items() if id(p) in dec.own}
        assert set(dec.shadow) == set(weights) - own and bool(own) == (lm.config.model_type == "gpt2")
        assert all(p is weights[n] and p.dtype == torch.float32 for n, p in lm.named_parameters())
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    assert any(not torch.equal(a, b) for a, b in zip(drawn[:3], drawn[3:]))  # the update was read


def test_mixed_precision_bf16_trains_on_the_cpu_too(tiny_model_dir, tiny_reward_dir):
    """ppo.mixed_precision: auto is float32 on a CPU; bf16 asked for runs there too (autocast on the
    CPU): the KL starts at zero (policy and reference computed alike), the weights train, the
    decoder reads bf16 copies of them, and a checkpoint records the precision it ran at."""
    from tasks.ppo.trainer import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None and autocast_dtype("no", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    trainer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=3, mixed_precision="bf16")
    assert trainer.autocast_dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.policy.lm.parameters()]
    history = trainer.train()
    assert abs(history[0]["objective/kl"]) < 1e-6
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.lm.parameters()))
    assert trainer.decoder.shadow and all(t.dtype == torch.bfloat16 for t in trainer.decoder.shadow.values())
    assert trainer.run_key()["autocast"] == "torch.bfloat16"
    plain, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=3)
    assert plain.autocast_dtype is None and not plain.decoder.shadow and plain.run_key()["autocast"] == "None"
    # with LoRA the frozen base is held in bf16: the decoder copies only the float32 adapters
    lora_trainer, _ = make_trainer(tiny_model_dir, tiny_reward_dir, steps=2, mixed_precision="bf16", lora_rank=4)
    history = lora_trainer.train()
    assert abs(history[0]["objective/kl"]) < 1e-6 and all(math.isfinite(h["loss/policy"]) for h in history)
    lm = lora_trainer.policy.lm
    assert set(lora_trainer.decoder.shadow) == {n for n, p in lm.named_parameters() if p.dtype == torch.float32}
    assert lora_trainer.decoder.shadow and all(".lora_" in n for n in lora_trainer.decoder.shadow)


def test_the_ppo_core_imports_with_torch_and_transformers_alone():
    """The GPU machine has torch and transformers but no Prefect, MLflow, TRL or pydantic: the PPO
    core and its benchmark must import without any part of the pipeline (peft only when LoRA is used),
    and the benchmark's Gemma 4 must get its generic reward classifier there (tasks.modeling)."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys
PIPELINE = {"prefect", "mlflow", "trl", "pydantic", "great_expectations", "dvc", "datasets", "peft"}
for name in PIPELINE:  # as if not installed: importing fails, find_spec says None
    sys.modules[name] = None
import tasks.ppo.trainer, tasks.ppo.sharding, tasks.ppo.static_decode, tasks.ppo.lora, tasks.ppo.core
sys.path.insert(0, "bench"); sys.argv = ["ppo_throughput.py"]
import ppo_throughput
from tasks.modeling import ensure_classifier
assert ensure_classifier(ppo_throughput.policy_config(ppo_throughput.SHAPES["tiny"], "gemma4"))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
