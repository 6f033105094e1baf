"""GPU-only checks of the rollout engine (skipped without CUDA; run them on a GPU machine).

    python -m pytest tests/test_gpu.py --noconftest

Needs torch and transformers only, like the PPO core.
"""
import copy

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Gemma2Config, Gemma3TextConfig,
                          Gemma4TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Olmo3Config, Phi3Config, Qwen3Config)

from decoding import decoder_logits, forward_logits
from tasks.ppo import static_decode
from tasks.ppo.rollout import Critic, PolicyWithValue, sample
from tasks.ppo.trainer import PPOConfig, PPOTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CFG = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=2000, n_positions=96, pad_token_id=0,
                 eos_token_id=1, bos_token_id=1)
# the other family the graph decoder runs: rotary positions, grouped-query attention, RMSNorm, SwiGLU
LLAMA = LlamaConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2000, max_position_embeddings=96, pad_token_id=0,
                    eos_token_id=1, bos_token_id=1)
# Llama's layout plus an RMSNorm on each query and key head, and head_dim (128) set apart from hidden / heads
QWEN3 = Qwen3Config(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=128, vocab_size=2000, max_position_embeddings=96,
                    pad_token_id=0, eos_token_id=1, bos_token_id=1)
# Gemma 3: those norms and more, scaled embeddings, a sliding-window layer and a global one (two rotary tables)
GEMMA3 = Gemma3TextConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, vocab_size=2000, max_position_embeddings=96,
                          sliding_window=96, sliding_window_pattern=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
# Phi-3: Llama's block with fused q/k/v and gate/up projections; rotary on half of each head (as Phi-4-mini's 3/4)
PHI3 = Phi3Config(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, partial_rotary_factor=0.5, vocab_size=2000, max_position_embeddings=96,
                  pad_token_id=0, eos_token_id=1, bos_token_id=1)
# GPT-NeoX as Pythia: q/k/v interleaved head by head, rotary on a quarter of each head, attention and MLP in parallel
PYTHIA = GPTNeoXConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                       rotary_pct=0.25, use_parallel_residual=True, vocab_size=2000, max_position_embeddings=96,
                       pad_token_id=0, eos_token_id=1, bos_token_id=1)
# OLMo 3: norms after attention and MLP, query/key norms over all heads, a sliding-window layer and a global one
OLMO3 = Olmo3Config(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=2000, max_position_embeddings=96, sliding_window=96,
                    layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=0, eos_token_id=1,
                    bos_token_id=1)
# Gemma 2: Gemma 3's norms but those on query and key heads, attention scores and final logits soft-capped
GEMMA2 = Gemma2Config(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=2000, max_position_embeddings=96,
                      sliding_window=96, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
# Gemma 4 as its E2B: per-layer inputs, wider global heads, the last two layers reading earlier layers' keys/values;
# its sliding window (32) shorter than the rollouts (64): the graph's step masks by it
GEMMA4 = Gemma4TextConfig(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, global_head_dim=128, vocab_size=2000,
                          vocab_size_per_layer_input=2000, hidden_size_per_layer_input=32, max_position_embeddings=96,
                          sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2,
                          num_kv_shared_layers=2, final_logit_softcapping=30.0, pad_token_id=0, eos_token_id=1,
                          bos_token_id=1)
CONFIGS = {"gpt2": CFG, "llama": LLAMA, "qwen3": QWEN3, "gemma3": GEMMA3, "phi3": PHI3, "pythia": PYTHIA,
           "olmo3": OLMO3, "gemma2": GEMMA2, "gemma4": GEMMA4}


def needs_graph_decoder(lm) -> None:
    """Skips a graph-decoder test where this transformers' config lacks what the decoder reads:
    Gemma 4's `kv_sharing_modes` (transformers 5.23, pinned; not in 5.17, the lent H200's), where
    PPO samples with HF's cache (tests/test_ppo_trainer.py checks that fallback on the CPU)."""
    import transformers

    if not static_decode.supports(lm) and lm.config.model_type == static_decode.GEMMA4:
        pytest.skip(f"transformers {transformers.__version__}'s Gemma 4 config has no kv_sharing_modes")


def prompts(B, P, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, CFG.vocab_size, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    for i in range(B):  # left padding of varied width
        mask[i, : i % 5] = 0
        ids[i, : i % 5] = 0
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("arch", CONFIGS)
def test_graph_replay_samples_exactly_what_eager_steps_sample(arch):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(CONFIGS[arch]).cuda().eval()
    needs_graph_decoder(lm)
    ids, mask = prompts(16, 24)
    graph = static_decode.StaticDecoder(lm, 16, 24, 40, use_graph=True)
    eager = static_decode.StaticDecoder(lm, 16, 24, 40, use_graph=False)
    for seed in range(2):
        a = graph.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(seed))
        b = eager.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(seed))
        assert graph.graph is not None and torch.equal(a, b)
    # and the HF dynamic-cache sampler agrees on most tokens (float32 on the GPU: rare flips allowed)
    c = sample(lm, ids, mask, 40, 1.0, -1, 0, torch.Generator("cuda").manual_seed(1))
    assert (c == b).float().mean() > 0.95


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_steps_on_the_gpu_give_the_models_logits_in_float32(arch):
    """The decode step's own kernels on CUDA (the masked softmax; GPT-2's GELU in cuBLASLt's epilogue,
    the MLP's bias and residual in its output matmul) compute the model's function: in float32 every
    step's logits are a full forward's (the erf GELU in place of GPT-2's tanh one is ~1e-3 off)."""
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(CONFIGS[arch]).cuda().eval()
    ids, mask = prompts(8, 16)
    T = 6
    dec = static_decode.StaticDecoder(lm, 8, 16, T, use_graph=False)
    fed = torch.randint(2, CFG.vocab_size, (8, T - 1), device="cuda")
    err = (decoder_logits(dec, ids, mask, fed) - forward_logits(lm, ids, mask, fed)).abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("arch", CONFIGS)
def test_decoder_steps_on_the_gpu_in_bf16_are_as_close_to_the_truth_as_the_model(arch):
    """The CUDA-only forms of the decode step in bf16 (Llama's, OLMo's and Gemma 4's RMSNorms as one
    kernel with the weight inside; GPT-2's GELU in cuBLASLt's epilogue and biases and residuals in
    one matmul): at every step the logits are as close to a float64 forward of the same weights as
    the model's own bf16 forward is. Norm weights random, so where each applies its weight shows."""
    torch.manual_seed(0)
    truth_dtype = torch.float32 if arch == "gemma2" else torch.float64  # (HF's Gemma 2 in float64: NaN on padding)
    truth = AutoModelForCausalLM.from_config(CONFIGS[arch]).to(truth_dtype).cuda().eval()
    needs_graph_decoder(truth)
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
        for name, b in truth.named_buffers():
            if name.endswith("layer_scalar"):
                b.add_(torch.randn_like(b) * 0.3)
    lm = AutoModelForCausalLM.from_config(CONFIGS[arch], dtype=torch.bfloat16).cuda().eval()
    lm.load_state_dict(truth.state_dict())
    ids, mask = prompts(8, 16)
    T = 6
    dec = static_decode.StaticDecoder(lm, 8, 16, T, use_graph=False)
    fed = torch.randint(2, CFG.vocab_size, (8, T - 1), device="cuda")
    exact = forward_logits(truth, ids, mask, fed).double()
    ours_err = (decoder_logits(dec, ids, mask, fed).double() - exact).abs().max().item()
    hf_err = (forward_logits(lm, ids, mask, fed).double() - exact).abs().max().item()
    assert 0 < hf_err < 0.5 and ours_err <= 1.5 * hf_err, (ours_err, hf_err)


def test_graph_sees_weights_updated_in_place_after_capture():
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(CFG).cuda().eval()
    ids, mask = prompts(8, 16)
    graph = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=True)
    graph.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(0))  # captured
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # what an optimizer step does: same storage, new values
    eager = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=False)
    a = graph.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(3))
    b = eager.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", CONFIGS)
@pytest.mark.parametrize("mode", ["bf16-weights", "bf16-autocast"])
def test_ppo_on_the_gpu_trains_and_stays_finite(mode, arch):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    lm = AutoModelForCausalLM.from_config(CONFIGS[arch], dtype=dtype)
    needs_graph_decoder(lm)
    ref = AutoModelForCausalLM.from_config(CONFIGS[arch], dtype=dtype).cuda()
    reward = AutoModelForSequenceClassification.from_config(GPT2Config(**{**CFG.to_dict(), "num_labels": 1}),
                                                            dtype=dtype).cuda()
    # the Llama trains with a critic copied from the reward model (ppo.value_model: reward), the rest a value head
    critic = Critic(copy.deepcopy(reward)) if arch == "llama" else None
    policy = PolicyWithValue(lm, critic).cuda()
    g = torch.Generator().manual_seed(1)
    prompt_ids = [torch.randint(2, CFG.vocab_size, (n,), generator=g).tolist() for n in (8, 12, 16) * 8]
    # bf16 weights computed as they are, or float32 weights under bf16 autocast (the pipeline's GPU default)
    cfg = PPOConfig(steps=3, batch_size=16, minibatches=2, epochs=2, max_new_tokens=24, checkpoint_every=0,
                    mixed_precision="no" if mode == "bf16-weights" else "auto")
    trainer = PPOTrainer(policy, ref, reward, prompt_ids, eos_id=1, pad_id=0, cfg=cfg, device="cuda")
    assert trainer.decoder is not None and trainer.decoder.use_graph
    assert trainer.autocast_dtype == (None if mode == "bf16-weights" else torch.bfloat16)
    before = [p.detach().clone() for p in policy.parameters()]
    history = trainer.train()
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    if critic is not None:
        assert any(not torch.equal(a, b) for a, b in zip(before[-len(list(critic.parameters())):], critic.parameters()))
    # under autocast the graph decodes over bf16 copies of the float32 weights, refreshed each rollout
    trainer.rollout()
    shadow, own = trainer.decoder.shadow, trainer.decoder.own  # (own: GPT-2's projections, copied apart)
    everything = {n for n, p in policy.lm.named_parameters() if id(p) not in own}
    assert set(shadow) == (set() if mode == "bf16-weights" else everything)
    for name, p in policy.lm.named_parameters():
        if name in shadow:
            assert torch.equal(shadow[name], p.detach().to(torch.bfloat16)), name


def test_fsdp_on_the_gpu_gathers_for_the_graph_decoder_and_trains(tmp_path):
    """FSDP on one GPU (a process group of one, NCCL): sharded parameters, fused Adam on them,
    the CUDA-graph decoder captured again over the gathered weights each rollout."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from tasks import scenario

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(scenario.corpus(2000, 0.1, seed=0), vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=64,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    worker = Path(__file__).with_name("ppo_ddp_worker.py")
    out = tmp_path / "fsdp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           str(worker), str(tmp_path / "model"), "--out", str(out), "--fsdp", "--cuda"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(worker.parents[1]), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sharded"] and result["graph"] and result["weights_changed"]
    assert all(torch.isfinite(torch.tensor(result["scores"])))


def test_padded_head_on_the_gpu_matches_the_plain_head_in_bf16():
    """The aligned LM head of the scoring and update passes: same logits and gradients as cuBLAS's
    unaligned path, to bf16's rounding."""
    from tasks.ppo.rollout import pad_lm_head

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(CFG, dtype=torch.bfloat16).cuda().eval()
    padded = AutoModelForCausalLM.from_config(CFG, dtype=torch.bfloat16).cuda().eval()
    padded.load_state_dict(plain.state_dict())
    assert pad_lm_head(padded)
    ids, mask = prompts(16, 40)
    a = padded(input_ids=ids, attention_mask=mask, logits_to_keep=20).logits
    b = plain(input_ids=ids, attention_mask=mask, logits_to_keep=20).logits
    assert a.shape == b.shape == (16, 20, CFG.vocab_size)
    assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    a.float().logsumexp(-1).sum().backward()
    b.float().logsumexp(-1).sum().backward()
    ga, gb = padded.lm_head.weight.grad.float(), plain.lm_head.weight.grad.float()
    assert (ga - gb).norm() / gb.norm() < 2e-2


@pytest.mark.parametrize("arch", CONFIGS)
def test_graph_decoder_runs_a_lora_policy_as_eager_steps_do(arch):
    """LoRA layers inside the captured decode step: the same samples as eager steps."""
    from tasks.ppo.lora import add_lora

    torch.manual_seed(0)
    lm = add_lora(AutoModelForCausalLM.from_config(CONFIGS[arch]), rank=4, alpha=8).cuda().eval()
    needs_graph_decoder(lm)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)  # adapters that change the output
    ids, mask = prompts(8, 16)
    graph = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=True)
    eager = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=False)
    a = graph.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(0))
    b = eager.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(0))
    assert graph.graph is not None and torch.equal(a, b)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lora_base", [False, True])
def test_graph_decoder_under_mixed_precision_reads_fresh_bf16_copies(arch, lora_base):
    """float32 weights (or LoRA's float32 adapters over a bf16 base) under bf16 autocast: the graph
    replays over bf16 copies of them, made again at each sample(), so after an in-place update the
    captured graph samples what eager steps over the new weights sample."""
    from tasks.ppo.lora import add_lora

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(CONFIGS[arch], dtype=torch.bfloat16 if lora_base else torch.float32)
    lm = (add_lora(lm, rank=4, alpha=8) if lora_base else lm).cuda().eval()
    ids, mask = prompts(8, 16)
    graph = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=True, autocast_dtype=torch.bfloat16)
    eager = static_decode.StaticDecoder(lm, 8, 16, 20, use_graph=False, autocast_dtype=torch.bfloat16)
    for update in range(2):
        a = graph.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(update))
        b = eager.sample(ids, mask, 1.0, -1, 0, torch.Generator("cuda").manual_seed(update))
        assert graph.graph is not None and torch.equal(a, b), update
        assert graph.shadow and all(t.dtype == torch.bfloat16 for t in graph.shadow.values())
        with torch.no_grad():  # an optimizer step: same storage, new values
            for p in lm.parameters():
                if p.dtype == torch.float32:
                    p.add_(torch.randn_like(p) * 0.05)


def test_sampling_and_scoring_outside_ppo_run_on_the_gpu(tmp_path):
    """collect, evaluate and serving sample and score on the model's device (tasks.modeling): on the
    GPU the same seed gives the same texts, and scores and log-probs come back on the CPU, equal to
    the CPU's for the same texts to float rounding."""
    pytest.importorskip("pydantic")  # tasks.modeling reads the pipeline's config types (bench/gpu.sh carries it)
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    from tasks import scenario
    from tasks.modeling import (generate_texts, load_policy, load_reward, load_tokenizer, save, score_texts,
                                sequence_logprobs)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(scenario.corpus(2000, 0.1, seed=0), vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tok), n_positions=64,
                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = save(GPT2LMHeadModel(cfg), tok, tmp_path / "model")
    tok = load_tokenizer(folder)
    prompts = ["the doctor said", "the ceo said that"] * 4
    policy, reward = load_policy(folder).cuda(), load_reward(folder, tok.pad_token_id).cuda()
    texts = generate_texts(policy, tok, prompts, 12, 1.0, seed=3)  # the static decoder's graph, on a GPU
    assert texts == generate_texts(policy, tok, prompts, 12, 1.0, seed=3) and any(texts)
    hf = generate_texts(policy, tok, prompts, 12, 1.0, seed=3, static=False)  # HF's cache: float32, rare flips
    assert sum(a == b for a, b in zip(texts, hf)) >= len(texts) - 2
    scores, (logp, counts) = score_texts(reward, tok, prompts, texts), sequence_logprobs(policy, tok, prompts, texts)
    assert scores.device.type == logp.device.type == counts.device.type == "cpu"
    assert torch.allclose(scores, score_texts(reward.cpu(), tok, prompts, texts), atol=1e-4)
    cpu_logp, cpu_counts = sequence_logprobs(policy.cpu(), tok, prompts, texts)
    assert torch.allclose(logp, cpu_logp, atol=1e-3) and torch.equal(counts, cpu_counts)
    # evaluate.judge on the GPU (in the checkpoint's dtype, here float32): the CPU's scores, and the
    # round's own scoring of the same model
    from tasks import judge as judging

    save(reward.cpu(), tok, tmp_path / "judge")
    on_gpu = judging.load_judge(str(tmp_path / "judge"), torch.device("cuda"))
    assert next(on_gpu[0].parameters()).device.type == "cuda"
    judged, cut = judging.scores(*on_gpu, prompts, texts)
    assert cut == 0 and judged.device.type == "cpu"
    assert torch.allclose(judged, judging.scores(*judging.load_judge(str(tmp_path / "judge")), prompts, texts)[0],
                          atol=1e-4)
    assert torch.allclose(judged, scores, atol=1e-4)
