"""The promotion gates and the statistics they read: pure functions, checked against hand-computed values."""
import math

import pytest

from tasks.config import GatesConfig
from tasks.evaluate import preference_rate, reward_model_figures, win_rate
from tasks.intervals import interval_over_prompts, prompt_interval, wilson_interval
from tasks.promote import check_gates


def test_wilson_interval_by_hand():
    # 13 of 19, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n) = 0.65322, half-width
    # z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.19313
    low, high = wilson_interval(13, 19)
    assert low == pytest.approx(0.46009, abs=1e-4) and high == pytest.approx(0.84635, abs=1e-4)
    low, high = wilson_interval(19, 19)  # all won: the interval still admits losses
    assert low == pytest.approx(0.83182, abs=1e-4) and high == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 1.0, 1.0])  # win, tie, win, loss
    assert result["rate"] == 2.5 / 4
    assert (result["low"], result["high"]) == wilson_interval(2.5, 4)


def test_the_reward_models_win_rate_is_its_preference_probability():
    # sigmoid(2) = 0.880797, sigmoid(0) = 0.5, sigmoid(-1) = 0.268941: mean 0.549913
    result = preference_rate([2.0, 1.0, 0.0], [0.0, 1.0, 1.0])
    assert result["rate"] == pytest.approx((0.880797 + 0.5 + 0.268941) / 3, abs=1e-6)
    assert (result["low"], result["high"]) == pytest.approx(wilson_interval(0.880797 + 0.5 + 0.268941, 3), abs=1e-5)
    assert result["hard"] == 1.5 / 3  # win, tie, loss counted whole
    # scores a hair apart (two responses the model holds equal) are near a coin toss, not 100 wins
    hair = preference_rate([0.01] * 100, [0.0] * 100)
    assert hair["hard"] == 1.0 and hair["rate"] == pytest.approx(0.5025, abs=1e-4) and hair["low"] < 0.5
    # far apart: a certain preference, and no overflow
    assert preference_rate([1000.0], [-1000.0])["rate"] == 1.0 and preference_rate([-1000.0], [1000.0])["rate"] == 0.0


def test_the_win_rate_interval_counts_prompts_not_only_pairs():
    # prompts a, b, c, two samples each: means 0.8, 0.5, 0.7, mean 2/3; their sample variance
    # 0.0233333 over k = 3 gives a standard error 0.0881917; t(0.975, 2) = 4.302653: half 0.379466
    values, prompts = [0.9, 0.7, 0.4, 0.6, 0.6, 0.8], ["a", "a", "b", "b", "c", "c"]
    low, high = prompt_interval(values, prompts)
    assert low == pytest.approx(2 / 3 - 0.379466, abs=1e-5) and high == 1.0  # clipped
    # the same by the cluster-robust sum: deviations summed per prompt, squared, k/(k-1), over n
    assert prompt_interval(values[::-1], prompts[::-1]) == pytest.approx((low, high), abs=1e-12)
    assert prompt_interval([0.9, 0.8], ["a", "a"]) == (0.0, 1.0)  # one prompt says nothing of others
    # 6 prompts x 32 samples, the candidate better on 4 (0.7) and worse on 2 (0.45): pairs alone
    # (Wilson) clear 0.5, prompts do not; the gate reads the wider
    scores = [math.log(0.7 / 0.3) if i < 4 else math.log(0.45 / 0.55) for i in range(6)]  # sigmoid: 0.7, 0.45
    a = [s for s in scores for _ in range(32)]
    prompts = [f"p{i}" for i in range(6) for _ in range(32)]
    pairs_only, both = preference_rate(a, [0.0] * 192, prompts), preference_rate(a, [0.0] * 192, prompts, True)
    assert pairs_only["rate"] == pytest.approx((4 * 0.7 + 2 * 0.45) / 6) == both["rate"]
    assert pairs_only["low"] > 0.5 > both["low"] and both["prompts"] == pairs_only["prompts"] == 6
    by_prompt = prompt_interval([0.5 * (1 + math.tanh(x / 2)) for x in a], prompts)
    assert (both["low"], both["high"]) == pytest.approx(by_prompt)  # here the wider on both sides
    assert (pairs_only["low_prompts"], pairs_only["low_pairs"]) == (both["low_prompts"], both["low_pairs"])
    assert pairs_only["low"] == pairs_only["low_pairs"] and (pairs_only["over_prompts"], both["over_prompts"]) == (0, 1)
    # a candidate that is the champion: every probability 0.5, no spread over prompts; Wilson's
    # interval still admits a loss, so the gate is not passed by a copy
    same = preference_rate([1.0] * 192, [1.0] * 192, prompts, True)
    assert same["rate"] == 0.5 and same["low"] < 0.5 < same["high"]
    # and the interval over prompts reported beside it is that one, not the point 0.5-0.5
    assert (same["low_prompts"], same["high_prompts"]) == (same["low"], same["high"]) == (same["low_pairs"],
                                                                                          same["high_pairs"])


GOOD = {"win_rate/low": 0.7, "candidate/kl_to_reference": 3.0, "champion/fluent_rate": 0.9,
        "candidate/fluent_rate": 0.88, "reward_model/accuracy": 13 / 19, "reward_model/pairs": 19,
        "reward_model/accuracy_low": 0.46009, "reward_model/accuracy_high": 0.84635}


@pytest.mark.parametrize("change,failed", [
    ({"win_rate/low": 0.45}, {"win_rate_lower_bound"}),
    ({"candidate/kl_to_reference": 8.5}, {"kl_to_reference"}),
    ({"candidate/fluent_rate": 0.8}, {"fluency_drop"}),
    ({"reward_model/accuracy": 0.55}, {"reward_accuracy"}),
    ({"candidate/kl_to_reference": float("nan")}, {"kl_to_reference", "no_nan"}),
])
def test_each_gate_fails_on_its_own_value(change, failed):
    gates = GatesConfig()
    assert all(g.passed for g in check_gates(GOOD, gates))
    assert {g.name for g in check_gates({**GOOD, **change}, gates) if not g.passed} == failed


def test_reward_accuracy_says_how_many_pairs_it_rests_on():
    reasons = {g.name: g.reason() for g in check_gates(GOOD, GatesConfig())}
    assert reasons["reward_accuracy"] == ("reward_accuracy passed: 0.6842 (threshold 0.6; "
                                          "19 held-out pairs, 95% interval 0.46-0.85)")
    assert reasons["kl_to_reference"] == "kl_to_reference passed: 3 (threshold 8)"
    assert reasons["win_rate_lower_bound"] == "win_rate_lower_bound passed: 0.7 (threshold 0.5)"  # an older report
    now = {**GOOD, "win_rate/rate": 0.75, "win_rate/prompts": 6, "n_samples": 192, "win_rate/over_prompts": 1.0}
    assert check_gates(now, GatesConfig())[0].reason() == (
        "win_rate_lower_bound passed: 0.7 (threshold 0.5; win-rate 0.750, 6 held-out prompts, 192 pairs, interval "
        "over prompts (the wider of the two))")
    assert check_gates({**now, "win_rate/over_prompts": 0.0}, GatesConfig())[0].reason().endswith("interval over pairs)")
    earlier = {k: v for k, v in GOOD.items() if not k.startswith("reward_model/") or k == "reward_model/accuracy"}
    assert check_gates(earlier, GatesConfig())[-1].reason() == "reward_accuracy passed: 0.6842 (threshold 0.6)"


def test_the_reward_models_accuracy_interval_is_read_as_the_win_rates():
    """Over pairs (the scenario), or over prompts on your own data (the wider of the two): 13 of 19
    pairs right, over 4 prompts; with how many held-out pairs have a prompt it trained on."""

    prompts = ["a"] * 5 + ["b"] * 5 + ["c"] * 5 + ["d"] * 4
    right = [1.0] * 5 + [1.0] * 4 + [0.0] + [1.0] * 2 + [0.0] * 3 + [1.0] * 2 + [0.0] * 2
    metrics = {"held_out": {"accuracy": 13 / 19, "n": 19, "prompts": 4, "seen_prompt_pairs": 15,
                            "interval_pairs": list(wilson_interval(13, 19)),
                            "interval_prompts": list(interval_over_prompts(right, prompts))},
               "held_out_unseen_prompts": {"accuracy": 0.5, "n": 4}}
    by_pairs, by_prompts = reward_model_figures(metrics, False), reward_model_figures(metrics, True)
    assert (by_pairs["reward_model/accuracy_low"], by_pairs["reward_model/accuracy_high"]) == wilson_interval(13, 19)
    assert by_prompts["reward_model/accuracy_low"] == prompt_interval(right, prompts)[0] < wilson_interval(13, 19)[0]
    assert by_prompts["reward_model/accuracy_high"] == prompt_interval(right, prompts)[1] == 1.0  # clipped to 1
    report = {**GOOD, "reward_model/accuracy": 13 / 19, **by_prompts}
    assert check_gates(report, GatesConfig())[-1].reason() == (
        f"reward_accuracy passed: 0.6842 (threshold 0.6; 19 held-out pairs of 4 prompts, 15 of them with a prompt "
        f"also trained on, 95% interval {by_prompts['reward_model/accuracy_low']:.2f}-1.00 over prompts (the wider "
        "of the two); 0.50 on the 4 pairs of unseen prompts)")
    every = {**metrics, "held_out": {**metrics["held_out"], "seen_prompt_pairs": 19}}
    del every["held_out_unseen_prompts"]
    assert check_gates({**GOOD, **reward_model_figures(every, False)}, GatesConfig())[-1].reason() == (
        "reward_accuracy passed: 0.6842 (threshold 0.6; 19 held-out pairs of 4 prompts, each prompt also trained "
        "on, 95% interval 0.46-0.85 over pairs)")
    # reward.eval_file's accuracy beside it; an eval file with no pair it could score is no NaN to fail no_nan
    on_file = reward_model_figures({**every, "eval_file": {"accuracy": 0.75, "n": 8}}, False)
    assert (on_file["reward_model/eval_file_accuracy"], on_file["reward_model/eval_file_pairs"]) == (0.75, 8)
    assert check_gates({**GOOD, **on_file}, GatesConfig())[-1].reason().endswith(
        "over pairs; 0.75 on the 8 pairs of reward.eval_file)")
    unscored = reward_model_figures({**every, "eval_file": {"accuracy": float("nan"), "n": 0}}, False)
    assert not [k for k in unscored if "eval_file" in k] and all(g.passed for g in check_gates({**GOOD, **unscored},
                                                                                                GatesConfig()))
    # a reward model trained before these figures: its accuracy and the interval over pairs alone
    old = reward_model_figures({"held_out": {"accuracy": 13 / 19, "n": 19}}, True)
    assert old == {"reward_model/accuracy": 13 / 19, "reward_model/pairs": 19,
                   "reward_model/accuracy_low": wilson_interval(13, 19)[0],
                   "reward_model/accuracy_high": wilson_interval(13, 19)[1]}


def test_an_interval_over_prompts_is_never_narrower_than_over_pairs():
    """A reward model right on all 24 held-out pairs of 8 prompts: no spread over prompts, so the
    cluster-robust interval alone is (1, 1); Wilson's over the 24 pairs still admits mistakes."""
    from tasks.intervals import interval_over_prompts

    prompts = [f"p{i // 3}" for i in range(24)]
    assert prompt_interval([1.0] * 24, prompts) == (1.0, 1.0)
    assert interval_over_prompts([1.0] * 24, prompts) == wilson_interval(24, 24) == pytest.approx((0.862, 1.0), abs=1e-3)
    spread = [1.0, 1.0, 1.0] * 4 + [0.0, 0.0, 1.0] * 4  # prompts alike inside: wider than Wilson's
    assert interval_over_prompts(spread, prompts) == prompt_interval(spread, prompts)
    assert prompt_interval(spread, prompts)[0] < wilson_interval(16, 24)[0]


def test_without_the_scenarios_judge_the_fluency_gate_is_left_out_and_the_rest_still_gate():
    """On your own held-out prompts the report has no fluent rate: no fluency gate, the others as before."""
    own = {k: v for k, v in GOOD.items() if not k.endswith("/fluent_rate")}
    gates = check_gates(own, GatesConfig())
    assert [g.name for g in gates] == ["win_rate_lower_bound", "kl_to_reference", "no_nan", "reward_accuracy"]
    assert all(g.passed for g in gates)
    assert {g.name for g in check_gates({**own, "win_rate/low": 0.3}, GatesConfig()) if not g.passed} == {
        "win_rate_lower_bound"}


def test_a_rounds_headline_is_the_gold_metric_or_else_the_reward():
    from tasks.rounds import headline

    assert headline({"gold_before": 0.0625, "gold_after": 0.797, "reward": 1.0}) == "held-out neutral rate 0.062 -> 0.797"
    assert headline({"gold_before": None, "gold_after": None, "reward_before": -0.25, "reward": 0.5}) == (
        "held-out reward -0.250 -> +0.500")
    assert headline({"gold_after": None, "reward": 0.5}) == "held-out reward +0.500"  # a line of an older version


def test_a_base_model_is_named_by_the_settings_it_is_made_from():
    from tasks.config import load_config
    from tasks.promote import base_differences, base_identity

    builtin = base_identity(load_config(None, {}))
    assert builtin["models.policy"] is None and builtin["seed"] == 0 and builtin["pretrain.vocab_size"] == 512
    # your model is named by itself: the scenario's seed and pre-training settings do not make it
    assert base_identity(load_config(None, {"models.policy": "Qwen/Qwen3-0.6B", "seed": 3})) == {
        "models.policy": "Qwen/Qwen3-0.6B"}
    assert base_differences(builtin, {"models.policy": "Qwen/Qwen3-0.6B"}) == ["models.policy: None -> 'Qwen/Qwen3-0.6B'"]
    assert base_differences(builtin, base_identity(load_config(None, {"seed": 7, "pretrain.vocab_size": 300}))) == [
        "seed: 0 -> 7", "pretrain.vocab_size: 512 -> 300"]
    # a setting only one side has came or went with an upgrade (at its default): not a change
    assert base_differences({**builtin, "pretrain.gone": 1}, {**builtin, "pretrain.new": 2}) == []
    assert base_differences({}, builtin) == []


def test_a_judge_gates_the_round_beside_the_reward_model():
    """evaluate.judge: its win-rate's lower end is a gate of its own, whose reason names the judge and
    how far to trust it; 0 reports it without gating; without a judge there is no such gate."""
    judged = {**GOOD, "judge": "OpenAssistant/reward-model-deberta-v3-large-v2", "judge_win_rate/rate": 0.48,
              "judge_win_rate/low": 0.41, "judge/agreement": 0.55, "judge/accuracy": 0.7, "judge/pairs": 40}
    gates = {g.name: g for g in check_gates(judged, GatesConfig())}
    assert not gates["judge_win_rate_lower_bound"].passed and all(g.passed for n, g in gates.items()
                                                                     if n != "judge_win_rate_lower_bound")
    assert gates["judge_win_rate_lower_bound"].reason() == (
        "judge_win_rate_lower_bound FAILED: 0.41 (threshold 0.5; judge OpenAssistant/reward-model-deberta-v3-large-v2, "
        "win-rate 0.480, sides with the reward model on 55% of pairs, with your annotators on 70% of 40 held-out "
        "feedback pairs)")
    assert all(g.passed for g in check_gates(judged, GatesConfig(min_judge_win_rate=0.0)))
    assert all(g.passed for g in check_gates({**judged, "judge_win_rate/low": 0.52}, GatesConfig()))
    no_feedback = {k: v for k, v in judged.items() if k not in ("judge/accuracy", "judge/pairs")}
    assert check_gates(no_feedback, GatesConfig())[1].reason().endswith("sides with the reward model on 55% of pairs)")
    same_responses = {k: v for k, v in no_feedback.items() if k != "judge/agreement"}
    assert check_gates(same_responses, GatesConfig())[1].reason().endswith("win-rate 0.480)")
    assert "judge_win_rate_lower_bound" not in {g.name for g in check_gates(GOOD, GatesConfig())}


def test_agreement_of_the_reward_model_and_the_judge_by_hand():
    from tasks.judge import agreement

    # pair 1 both prefer a, pair 2 they differ, pair 3 the judge ties (half), pair 4 both prefer b,
    # pair 5 both tie
    assert agreement([2.0, 1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 1.0], [0.3, -1.0, 0.2, 0.1, 0.4],
                     [0.1, 0.0, 0.2, 0.9, 0.4]) == 3.5 / 5
    assert math.isnan(agreement([], [], [], []))


def test_a_judge_measures_its_accuracy_on_the_same_held_out_pairs_every_round():
    from tasks.judge import sample_pairs

    pairs = [{"id": f"{i:016x}"[::-1]} for i in range(3000)]
    first = sample_pairs(pairs)
    assert len(first) == 1024 and first == sample_pairs(pairs[::-1])  # the same, whatever the order
    more = sample_pairs(pairs + [{"id": "f" * 16}])  # a pair with a high id changes nothing
    assert more == first and len(sample_pairs(pairs[:10])) == 10
