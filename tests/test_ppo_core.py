"""PPO math against hand-computed tensors and plain-loop float64 references."""
import math

import pytest
import torch

from tasks.ppo import core



@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ---- plain-loop references: one element at a time, float64, no vectorisation -------------------
def loop_gae(rewards, values, mask, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(sum(mask[b]))  # valid tokens form a prefix
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + (values[b][t] if mask[b][t] else 0.0) for t in range(T)] for b in range(B)]
    return adv, ret


def loop_whiten(x, mask):
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[0])) if mask[b][t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    return [[(x[b][t] - mean) / math.sqrt(var + 1e-8) for t in range(len(x[0]))] for b in range(len(x))]


def loop_policy_loss(new, old, adv, mask, clip):
    total, n = 0.0, 0
    for b in range(len(new)):
        for t in range(len(new[0])):
            if mask[b][t]:
                r = math.exp(new[b][t] - old[b][t])
                total += max(-adv[b][t] * r, -adv[b][t] * min(max(r, 1 - clip), 1 + clip))
                n += 1
    return total / n


def loop_value_loss(v, old_v, ret, mask, clip):
    total, n = 0.0, 0
    for b in range(len(v)):
        for t in range(len(v[0])):
            if mask[b][t]:
                vc = old_v[b][t] + min(max(v[b][t] - old_v[b][t], -clip), clip)
                total += max((v[b][t] - ret[b][t]) ** 2, (vc - ret[b][t]) ** 2)
                n += 1
    return 0.5 * total / n


def random_batch(B=5, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    return {
        "rewards": torch.randn(B, T, generator=g), "values": torch.randn(B, T, generator=g),
        "new": torch.randn(B, T, generator=g) * 0.3 - 2, "old": torch.randn(B, T, generator=g) * 0.3 - 2,
        "adv": torch.randn(B, T, generator=g), "mask": mask,
    }


# ---- hand-computed cases --------------------------------------------------------------------
def test_gae_by_hand():
    # one episode, 3 tokens, gamma=1, lam=0.5
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 0.4]])
    mask = torch.ones(1, 3)
    adv, ret = core.compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta2 = 1 - 0.4 = 0.6 ; delta1 = 0 + 0.4 - 0.2 = 0.2 ; delta0 = 0 + 0.2 - 0.5 = -0.3
    # A2 = 0.6 ; A1 = 0.2 + 0.5*0.6 = 0.5 ; A0 = -0.3 + 0.5*0.5 = -0.05
    assert torch.allclose(adv, torch.tensor([[-0.05, 0.5, 0.6]]))
    assert torch.allclose(ret, torch.tensor([[0.45, 0.7, 1.0]]))


def test_gae_ignores_everything_after_the_mask():
    rewards = torch.tensor([[0.0, 1.0, 99.0]])
    values = torch.tensor([[0.5, 0.2, 42.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = core.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # the episode ends at t=1: A1 = 1 - 0.2 = 0.8 ; A0 = 0 + 0.2 - 0.5 + 0.8 = 0.5
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 0.0]]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert core.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # k3 = (q/p - 1) - log(q/p) = (0.5 - 1) - log 0.5
    assert core.kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        core.kl_penalty(logp, ref, "k2")


def test_k1_and_k3_are_unbiased_estimates_of_the_true_kl():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for est in ("k1", "k3"):
        values = core.kl_penalty(p.log()[samples], q.log()[samples], est)
        assert values.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (core.kl_penalty(p.log()[samples], q.log()[samples], "k3") >= 0).all()


def test_rewards_put_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = core.compute_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1 + 2.0, 0.0], [-0.25, -0.25, -0.25 - 1.0]]))


def test_masked_mean_var_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert core.masked_mean(x, mask).item() == pytest.approx(2.5)
    assert core.masked_var(x, mask).item() == pytest.approx(5.0 / 3.0)  # unbiased: 5/(4-1)
    assert core.masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    w = core.masked_whiten(x, mask)
    assert core.masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert core.masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    w_keep = core.masked_whiten(x, mask, shift_mean=False)
    assert core.masked_mean(w_keep, mask).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="at least 2"):
        core.masked_var(x, torch.tensor([[1.0, 0, 0], [0, 0, 0]]))


def test_policy_loss_by_hand():
    # ratio = e^0.5 = 1.6487 > 1.2: with A = +1 the clipped term wins (-1.2 > -1.6487)
    loss, stats = core.ppo_policy_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                       torch.ones(1, 1), cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["policy/clipfrac"].item() == 1.0
    assert stats["policy/approxkl"].item() == pytest.approx(0.125)
    # with A = -1 the unclipped term is the max: loss = +1.6487, nothing clipped
    loss, stats = core.ppo_policy_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]),
                                       torch.ones(1, 1), cliprange=0.2)
    assert loss.item() == pytest.approx(math.exp(0.5))
    assert stats["policy/clipfrac"].item() == 0.0


def test_value_loss_by_hand():
    # V moved from 0 to 1, clip 0.2 -> V_clipped = 0.2; R = 2: max((1-2)^2, (0.2-2)^2) = 3.24
    loss, stats = core.ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]),
                                      torch.ones(1, 1), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 3.24)
    assert stats["value/clipfrac"].item() == 1.0


def test_eos_truncation_mask_and_missing_eos_penalty():
    eos, pad = 9, 0
    responses = torch.tensor([[5, 9, 7, 7], [5, 6, 7, 8], [9, 1, 2, 3]])
    assert torch.equal(core.first_true_index(responses == eos), torch.tensor([1, 4, 0]))
    mask = core.response_mask(responses, eos)
    assert torch.equal(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(core.truncate_after_eos(responses, eos, pad),
                       torch.tensor([[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]))
    scores = core.apply_missing_eos_penalty(torch.tensor([1.0, 1.0, 1.0]), responses, eos, 2.5)
    assert torch.equal(scores, torch.tensor([1.0, -1.5, 1.0]))
    assert torch.equal(core.apply_missing_eos_penalty(scores, responses, eos, None), scores)


def test_entropy_and_logprobs_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert core.entropy_from_logits(logits).item() == pytest.approx(1.5 * math.log(2))
    assert core.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy_match_a_float64_log_softmax(dtype):
    # GPT-2-like logits: large and negative, some rows nearly one-hot (entropy ~0)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 4000, generator=g) * 4 - 100)
    logits[0, 0, 7] += 60
    logits = logits.to(dtype)
    tokens = torch.randint(0, 4000, (3, 5), generator=g)
    logprobs, entropy = core.logprobs_and_entropy(logits, tokens)
    log_p = torch.log_softmax(logits.double(), dim=-1)
    assert torch.allclose(logprobs.double(), log_p.gather(-1, tokens[..., None])[..., 0], atol=1e-4, rtol=0)
    assert torch.allclose(entropy.double(), -(log_p.exp() * log_p).sum(-1), atol=1e-4, rtol=0)
    assert entropy[0, 0] >= 0 and entropy[0, 0] < 1e-3
    assert core.logprobs_and_entropy(logits, None)[0] is None
    masked = torch.tensor([[0.0, float("-inf"), 0.0]])  # a token masked out: no NaN, H = log 2
    assert core.logprobs_and_entropy(masked, None)[1].item() == pytest.approx(math.log(2))
    assert core.logprobs_and_entropy(logits, tokens, with_entropy=False)[1] is None


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert core.explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert core.explained_variance(torch.full_like(returns, 2.5), returns, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_controller_by_hand():
    ctl = core.AdaptiveKLController(0.1, target=2.0, horizon=100)
    ctl.update(current_kl=4.0, n_steps=10)  # error clipped to +0.2 -> x(1 + 0.2 * 10/100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=1.8, n_steps=10)  # error -0.1 -> x(1 - 0.01)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)
    fixed = core.AdaptiveKLController(0.1, target=None, horizon=100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_score_normalizer_by_hand():
    mean, std = core.score_normalizer(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert (mean, std) == pytest.approx((2.5, math.sqrt(1.25)))
    assert core.score_normalizer(torch.tensor([0.7, 0.7, 0.7])) == pytest.approx((0.7, 1.0))  # all alike: scale kept


def test_linear_lr_by_hand_and_as_trls_schedule():
    """lr at the first iteration, lr / steps at the last; the rates TRL's PPOTrainer takes from
    transformers' linear schedule (no warm-up), stepped once per iteration."""
    from transformers import get_linear_schedule_with_warmup

    assert [core.linear_lr(1e-3, i, 4) for i in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4], abs=1e-15)
    assert core.linear_lr(3e-5, 0, 1) == 3e-5
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=7)
    trl = []
    for _ in range(7):
        trl.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert [core.linear_lr(1e-4, i, 7) for i in range(7)] == pytest.approx(trl, rel=1e-12)


# ---- against the loop references, 1e-6 -----------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_loop_reference(seed, gamma, lam):
    b = random_batch(seed=seed)
    adv, ret = core.compute_gae(b["rewards"], b["values"], b["mask"], gamma, lam)
    ref_adv, ref_ret = loop_gae(b["rewards"].tolist(), b["values"].tolist(), b["mask"].tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv), atol=1e-6)
    assert torch.allclose(ret, torch.tensor(ref_ret), atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_whiten_and_losses_match_loop_reference(seed):
    b = random_batch(seed=seed)
    mask = b["mask"]
    w = core.masked_whiten(b["adv"], mask)
    ref_w = torch.tensor(loop_whiten(b["adv"].tolist(), mask.tolist()))
    assert torch.allclose(w * mask, ref_w * mask, atol=1e-6)
    loss, _ = core.ppo_policy_loss(b["new"], b["old"], b["adv"], mask, 0.2)
    assert loss.item() == pytest.approx(loop_policy_loss(b["new"].tolist(), b["old"].tolist(), b["adv"].tolist(),
                                                         mask.tolist(), 0.2), abs=1e-6)
    vloss, _ = core.ppo_value_loss(b["new"], b["old"], b["rewards"], mask, 0.2)
    assert vloss.item() == pytest.approx(loop_value_loss(b["new"].tolist(), b["old"].tolist(),
                                                         b["rewards"].tolist(), mask.tolist(), 0.2), abs=1e-6)


def test_policy_gradient_pushes_up_tokens_with_positive_advantage():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    loss, _ = core.ppo_policy_loss(logp, logp.detach(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descending the loss raises token 0, lowers token 1


def test_core_imports_nothing_but_torch():
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(core.__file__).read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"torch", "__future__"}
