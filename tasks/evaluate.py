"""Stage `evaluate`: the candidate policy against the round's champion, on the same prompts.

Both policies answer every held-out prompt (at most `max_prompts` of them) `samples_per_prompt`
times (same seeds). Reported:
reward-model score, win-rate of the candidate (by the reward model: its preference probability,
see preference_rate; by the gold judge: wins, ties half; each with a Wilson interval), KL to the reference, perplexity of the responses under the reference,
response length; on the built-in scenario's prompts also its gold judge's fluent and degenerate
rates and the gold metric (neutral-pronoun rate on held-out professions), which mean nothing on
your own prompts (`prompts.heldout` or `prompts.from_feedback`) and are left out there. With
`evaluate.judge`, a reward model PPO never saw scores both sides too (tasks.judge): its win-rate,
how often it sides with the round's reward model, its accuracy on the held-out feedback.
Responses side by side go to MLflow as a table.
"""
from __future__ import annotations

import functools
import io
import json
import math
import time
from collections.abc import Callable

import mlflow
import torch

from tasks import judge as judging
from tasks import prompts as prompts_, scenario, tracking
from tasks.config import ChatConfig, PipelineConfig
from tasks.intervals import interval_over_prompts, wilson_interval
from tasks.modeling import (compute_device, encode_prompt, generate_texts, load_policy, load_reward, load_tokenizer,
                            score_texts, sequence_logprobs)
from tasks.prompts import check_lengths, evaluation_prompts
from tasks.stage import stage_main
from tasks.workspace import RoundState, Workspace


def win_rate(a: list[float], b: list[float]) -> dict[str, float]:
    """Share of paired samples where a beats b; ties count half."""
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    low, high = wilson_interval(wins, len(a))
    return {"rate": wins / max(len(a), 1), "low": low, "high": high}


def preference_rate(a: list[float], b: list[float], prompts: list[str] | None = None,
                    over_prompts: bool = False) -> dict[str, float]:
    """How often a reward model prefers a's response to b's, read as the model itself reads a score
    difference: its Bradley-Terry probability sigmoid(score_a - score_b), averaged over the pairs.
    Counting each higher score as a whole win (`hard`, ties half) turns a difference of 0.01, which
    the model itself holds for a coin toss, into a certain win: two policies the gold judge holds
    equal measured 0.61 counted so, 0.51 as probabilities.

    Two intervals. Over pairs (`low_pairs`): Wilson's on the summed probabilities, every pair
    independent: right when the held-out prompts are all there is to measure. Over prompts
    (`low_prompts`, with `prompts`, each pair's): the samples of one prompt are alike (a prompt
    the candidate answers better it answers better 32 times), so when the held-out prompts are a
    sample of what will be asked, the prompts are what counts: interval_over_prompts, never
    narrower than Wilson's (a copy of the champion, 0.5 on every prompt, has no spread over
    prompts; over pairs it still may lose). `low`/`high` are the gated interval: over pairs, or
    with `over_prompts` over prompts."""
    n = len(a)
    probs = [0.5 * (1.0 + math.tanh((x - y) / 2.0)) for x, y in zip(a, b)]  # sigmoid, without overflow
    low, high = wilson_interval(sum(probs), n)
    out = {"rate": sum(probs) / max(n, 1), "low": low, "high": high, "hard": win_rate(a, b)["rate"],
           "low_pairs": low, "high_pairs": high}
    if prompts is not None:
        low_p, high_p = interval_over_prompts(probs, prompts)
        out |= {"prompts": len(set(prompts)), "low_prompts": low_p, "high_prompts": high_p,
                "over_prompts": float(over_prompts)}
        if over_prompts:
            out |= {"low": low_p, "high": high_p}
    return out


def describe(responses: list[str], scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor,
             counts: torch.Tensor, gold_judge: bool = True) -> dict[str, float]:
    out = {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl_to_reference": float((logp - ref_logp).mean()),  # k1 estimate, nats per sequence
        "perplexity_under_reference": float(torch.exp(-ref_logp.sum() / counts.sum())),
        "length_tokens": float(counts.float().mean()),
    }
    if gold_judge:  # the built-in scenario's judge: meaningful on its prompts only
        judged = [scenario.judge(r) for r in responses]
        out |= {"neutral_rate": sum(j.neutral for j in judged) / len(judged),
                "fluent_rate": sum(j.fluent for j in judged) / len(judged),
                "degenerate_rate": sum(j.degenerate for j in judged) / len(judged)}
    return out


def evaluate(candidate_ref: str, champion_ref: str, reference_ref: str, reward_ref: str,
             prompts: list[str], samples_per_prompt: int, temperature: float, max_new_tokens: int,
             seed: int, gold_judge: bool = True, where: str = "", chat: ChatConfig | None = None,
             over_prompts: bool = True, judge: str | None = None, judge_name: str | None = None,
             feedback_pairs: list[dict] | None = None,
             say: Callable[[str], None] = lambda line: None) -> tuple[dict, list[dict]]:
    """Both policies sample the same held-out prompts; the reference and the reward model then read
    every response. One model is on the device at a time (a GPU holds the largest of the four, not
    all of them): each policy samples and scores its own log-probs, then the reference reads both
    sides' responses, then the reward model scores them, then the `judge` if any (tasks.judge),
    which also scores `feedback_pairs` (held-out feedback: how often it agrees with your annotators);
    `judge_name`: how the report names it (as configured: a models:/ URI rather than its download).
    `say` is told each step as it ends, with its time (the stage prints them; a round's log relays them)."""
    tokenizer = load_tokenizer(reference_ref, chat)
    device = compute_device()  # the GPU if there is one
    batch = [p for p in prompts for _ in range(samples_per_prompt)]
    sides = {"candidate": candidate_ref, "champion": champion_ref}
    texts, logp, counts = {}, {}, {}
    started = time.monotonic()
    for name, ref in sides.items():
        model = load_policy(ref).to(device).eval()
        if name == "candidate":  # before any sampling: a prompt too long for the model stops here
            check_lengths([encode_prompt(tokenizer, p, chat) for p in prompts], max_new_tokens, model.config, where)
        texts[name] = generate_texts(model, tokenizer, batch, max_new_tokens, temperature, seed, chat=chat)
        logp[name], counts[name] = sequence_logprobs(model, tokenizer, batch, texts[name], chat=chat)
        del model
        _release(device)
        say(f"{name}: {len(batch)} responses to {len(prompts)} prompts in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
    reference = load_policy(reference_ref).to(device).eval()
    ref_logp = {name: sequence_logprobs(reference, tokenizer, batch, texts[name], chat=chat)[0] for name in sides}
    del reference
    _release(device)
    say(f"reference: read both sides in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    reward = load_reward(reward_ref, tokenizer.pad_token_id).to(device).eval()
    scores = {name: score_texts(reward, tokenizer, batch, texts[name], chat=chat) for name in sides}
    del reward
    _release(device)
    say(f"reward model: scored both sides in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    judged = judge_both(judge, device, batch, texts, chat, feedback_pairs) if judge is not None else {}
    if judged:
        say(f"judge: scored both sides{' and the held-out feedback' if feedback_pairs else ''} "
            f"in {time.monotonic() - started:.1f}s")
    results = {name: describe(texts[name], scores[name], logp[name], ref_logp[name], counts[name], gold_judge)
               for name in sides}
    responses = {name: (texts[name], scores[name].tolist()) for name in sides}
    gold = {name: [scenario.gold_score(t) for t in texts[name]] for name in sides}
    report = {
        **{f"{side}/{k}": v for side in results for k, v in results[side].items()},
        **{f"win_rate/{k}": v for k, v in preference_rate(responses["candidate"][1], responses["champion"][1],
                                                          batch, over_prompts).items()},
        "n_prompts": len(prompts),
        "n_samples": len(batch),
    }
    if gold_judge:
        report |= {f"gold_win_rate/{k}": v for k, v in win_rate(gold["candidate"], gold["champion"]).items()}
    table = [{"prompt": p, "champion": c, "champion_reward": cs, "candidate": n, "candidate_reward": ns}
             for p, c, cs, n, ns in zip(batch, *responses["champion"], *responses["candidate"])]
    if judged:
        a, b = judged["candidate"], judged["champion"]
        report |= {"judge": judge_name or judge, "candidate/judge_score": sum(a) / len(a), "champion/judge_score": sum(b) / len(b),
                   **{f"judge_win_rate/{k}": v for k, v in preference_rate(a, b, batch, over_prompts).items()},
                   **{f"judge/{k}": v for k, v in judged["figures"].items()}}
        differ = [i for i, (x, y) in enumerate(zip(texts["candidate"], texts["champion"])) if x != y]
        if differ:  # how often the judge sides with the reward model, where the two responses differ
            pick = lambda values: [values[i] for i in differ]  # noqa: E731
            report["judge/agreement"] = judging.agreement(pick(scores["candidate"].tolist()),
                                                          pick(scores["champion"].tolist()), pick(a), pick(b))
        for row, cs, ns in zip(table, b, a):
            row |= {"champion_judge": cs, "candidate_judge": ns}
    return report, table


def judge_both(ref: str, device: torch.device, prompts: list[str], texts: dict[str, list[str]],
               chat: ChatConfig | None, feedback_pairs: list[dict] | None) -> dict:
    """The judge's scores of each side's responses, and its figures: texts cut to fit it, its
    accuracy on held-out feedback pairs (with their count and interval)."""
    model, tokenizer = judging.load_judge(ref, device)
    system = chat.system_prompt if chat is not None else None
    out, cut = {}, 0
    for name, responses in texts.items():
        scored, n_cut = judging.scores(model, tokenizer, prompts, responses, system)
        out[name], cut = scored.tolist(), cut + n_cut
    figures = {}
    if feedback_pairs:
        held_out = judging.accuracy(model, tokenizer, feedback_pairs, system)
        low, high = wilson_interval(held_out["accuracy"] * held_out["n"], held_out["n"])
        figures = {"accuracy": held_out["accuracy"], "pairs": held_out["n"], "accuracy_low": low,
                   "accuracy_high": high}
        cut += held_out["truncated"]
    figures["truncated"] = cut
    if cut:
        print(f"judge {ref}: {cut} texts were longer than its {judging.positions(model, tokenizer)} "
              "positions and lost the start of their prompt", flush=True)
    del model
    _release(device)
    return out | {"figures": figures}


def reward_model_figures(metrics: dict, over_prompts: bool) -> dict:
    """The round's reward model as the report and its gate read it (metrics.json of train_reward):
    its held-out accuracy, how many pairs that rests on, and its 95% interval over pairs, or with
    `over_prompts` (evaluate.interval, as the win-rate's) over their prompts (which is never the
    narrower: intervals.interval_over_prompts); how many held-out pairs have a prompt it trained
    on, and its accuracy on those that have not; its accuracy on reward.eval_file where one is set."""
    held_out = metrics["held_out"]
    figures = {"reward_model/accuracy": held_out["accuracy"], "reward_model/pairs": held_out["n"]}
    low, high = wilson_interval(held_out["accuracy"] * held_out["n"], held_out["n"])
    if "interval_prompts" in held_out:  # (a reward model trained before 2026-11-25 has the accuracy alone)
        figures |= {"reward_model/prompts": held_out["prompts"],
                    "reward_model/seen_prompt_pairs": held_out["seen_prompt_pairs"],
                    "reward_model/accuracy_low_prompts": held_out["interval_prompts"][0],
                    "reward_model/accuracy_high_prompts": held_out["interval_prompts"][1],
                    "reward_model/over_prompts": float(over_prompts)}
        if over_prompts:
            low, high = held_out["interval_prompts"]
    if "held_out_unseen_prompts" in metrics:
        figures |= {"reward_model/accuracy_unseen_prompts": metrics["held_out_unseen_prompts"]["accuracy"],
                    "reward_model/pairs_unseen_prompts": metrics["held_out_unseen_prompts"]["n"]}
    # reward.eval_file: the same pairs round after round, so versions compare on it; a file with no pair
    # it could score (all too long, say) has no accuracy, and a NaN here would fail the no_nan gate
    if metrics.get("eval_file", {}).get("n"):
        figures |= {"reward_model/eval_file_accuracy": metrics["eval_file"]["accuracy"],
                    "reward_model/eval_file_pairs": metrics["eval_file"]["n"]}
    return figures | {"reward_model/accuracy_low": low, "reward_model/accuracy_high": high}


def held_out_feedback(ws: Workspace, cfg: PipelineConfig) -> list[dict]:
    """The validated pairs the round's reward model held out and was measured on (those it could
    read whole: train_reward.fits), at most 1,024: where a judge's agreement with your annotators
    is measured, on the pairs of the reward model's accuracy beside it."""
    from transformers import AutoConfig

    from tasks.train_reward import fits, reward_max_length, split

    lines = ws.accepted.read_text(encoding="utf-8").splitlines() if ws.accepted.exists() else []
    records = [json.loads(line) for line in lines if line.strip()]
    tokenizer = load_tokenizer(ws.reward_model, cfg.chat_format)
    max_length = reward_max_length(cfg, AutoConfig.from_pretrained(ws.reward_model))
    kept = [r for r in records if fits(tokenizer, r, max_length, cfg.chat_format)]
    return judging.sample_pairs(split(kept, cfg.reward.eval_fraction, cfg.reward.split)[1])


def _release(device: torch.device) -> None:
    """Hand a dropped model's memory back, for the next model (the caching allocator keeps it)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log_report(report: dict, table: list[dict]) -> None:
    """Into the active MLflow run: the report's finite figures as metrics, the responses side by side as a table."""
    mlflow.log_metrics({k: v for k, v in report.items() if isinstance(v, (int, float)) and math.isfinite(v)})
    mlflow.log_table({k: [row[k] for row in table] for k in table[0]}, "samples_side_by_side.json")


def figures(report: dict, table: list[dict], past_rounds: list[dict]):
    """Reward distributions of both policies, and reward / gold against sqrt(KL) over the rounds
    (the over-optimisation view of Gao et al., 2022). Returns {name: matplotlib figure}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dist, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([row["champion_reward"] for row in table], bins=30, alpha=0.6, label="champion")
    ax.hist([row["candidate_reward"] for row in table], bins=30, alpha=0.6, label="candidate")
    ax.set_xlabel("reward-model score")
    ax.set_ylabel("responses")
    ax.legend()
    dist.tight_layout()

    points = [(r["kl"], r["reward"], r["gold_after"]) for r in past_rounds if "reward" in r]
    points.append((report["candidate/kl_to_reference"], report["candidate/reward_mean"],
                   report.get("candidate/neutral_rate")))  # None on your own prompts: no gold metric
    over, ax = plt.subplots(figsize=(5, 3.2))
    xs = [math.sqrt(max(kl, 0.0)) for kl, _, _ in points]
    ax.plot(xs, [p[1] for p in points], "o-", label="reward model score")
    ax.set_xlabel("sqrt(KL to reference)")
    ax.set_ylabel("reward-model score")
    gold = [(x, p[2]) for x, p in zip(xs, points) if p[2] is not None]
    if gold:
        gold_ax = ax.twinx()
        gold_ax.plot(*zip(*gold), "s--", color="tab:green", label="gold: held-out neutral rate")
        gold_ax.set_ylabel("gold metric")
    for i, x in enumerate(xs):
        ax.annotate(f"r{i + 1}", (x, points[i][1]))
    over.legend(loc="lower right", fontsize=8)
    over.tight_layout()
    return {"reward_distribution.png": dist, "reward_vs_sqrt_kl.png": over}


def html_report(report: dict, table: list[dict], images: dict[str, bytes], n_rows: int = 40) -> str:
    """One self-contained page: metrics, plots, responses side by side."""
    import base64
    import html

    metrics = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                      else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                      for k, v in report.items())
    pictures = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                       for name, png in images.items())
    judged = bool(table) and "candidate_judge" in table[0]  # with evaluate.judge: its score beside the reward
    def scored(r: dict, side: str) -> str:
        judge = f"<td>{r[f'{side}_judge']:.3f}</td>" if judged else ""
        return f"<td>{html.escape(r[side])}</td><td>{r[f'{side}_reward']:.3f}</td>{judge}"
    rows = "".join(f"<tr><td>{html.escape(r['prompt'])}</td>{scored(r, 'champion')}{scored(r, 'candidate')}</tr>"
                   for r in table[:n_rows])
    heads = "<th>reward</th><th>judge</th>" if judged else "<th>reward</th>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation, round {report.get('round')}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:3px 8px}"
            "td{white-space:pre-wrap;vertical-align:top}"  # a dialogue's lines and a response's spacing as written
            "table{border-collapse:collapse;margin-bottom:2em}</style></head><body>"
            f"<h1>Candidate against champion, round {report.get('round')}</h1>"
            f"<h2>Metrics</h2><table>{metrics}</table><h2>Plots</h2>{pictures}"
            f"<h2>Responses side by side (first {n_rows})</h2><table><tr><th>prompt</th><th>champion</th>"
            f"{heads}<th>candidate</th>{heads}</tr>{rows}</table></body></html>")


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> dict:
    with tracking.stage_run(ws, cfg.project, "evaluate", state):
        champion_ref = tracking.resolve_model(ws, state.policy)
        heldout, total = evaluation_prompts(ws, cfg)
        if len(heldout) < total:
            print(f"evaluating {len(heldout)} of the {total} held-out prompts (evaluate.max_prompts)", flush=True)
        mlflow.log_params({"prompts.heldout": prompts_.source(cfg, "heldout"), "prompts.heldout_count": total,
                           "prompts.evaluated": len(heldout), **cfg.chat.params()})
        judge = None
        if cfg.evaluate.judge is not None:
            judge = tracking.resolve_model(ws, cfg.evaluate.judge)
            mlflow.log_param("judge.resolved", judge)
        report, table = evaluate(str(ws.policy_model), champion_ref, str(ws.base_model), str(ws.reward_model),
                                 heldout, cfg.evaluate.samples_for(len(heldout)), cfg.evaluate.temperature,
                                 cfg.ppo.max_new_tokens, cfg.seed * 1000 + state.round,
                                 gold_judge=cfg.scenario_prompts,
                                 where=prompts_.where(cfg, "heldout"),
                                 chat=cfg.chat_format, over_prompts=cfg.evaluate.over_prompts(cfg.scenario_prompts),
                                 judge=judge, judge_name=cfg.evaluate.judge,
                                 feedback_pairs=held_out_feedback(ws, cfg) if judge else None,
                                 say=functools.partial(print, flush=True))
        reward_metrics = json.loads((ws.reward_model / "metrics.json").read_text())
        report |= reward_model_figures(reward_metrics, cfg.evaluate.over_prompts(cfg.scenario_prompts))
        report["round"] = state.round
        ws.evaluation_report.parent.mkdir(parents=True, exist_ok=True)
        ws.evaluation_report.write_text(json.dumps(report, indent=2))
        log_report(report, table)
        from tasks.rounds import completed_rounds

        images = {}
        for name, fig in figures(report, table, [r for r in completed_rounds(ws) if r["round"] < state.round]).items():
            mlflow.log_figure(fig, f"plots/{name}")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            images[name] = buf.getvalue()
        page = html_report(report, table, images)
        (ws.reports / "evaluation.html").write_text(page, encoding="utf-8")
        mlflow.log_text(page, "evaluation_report.html")
    return report


if __name__ == "__main__":
    stage_main(run)
