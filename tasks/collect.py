"""Stage `collect`: sample response pairs from the round's policy and label them.

The simulated annotator of the built-in scenario labels each pair (a Bradley-Terry draw on the
gold score). The round's records land in data/collected/round.jsonl; the flow then versions
them as a new immutable file under data/feedback/raw/ (DVC add, git commit, push).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable

import mlflow

from tasks import scenario, tracking
from tasks.config import ChatConfig, PipelineConfig
from tasks.modeling import compute_device, generate_texts, load_policy, load_tokenizer
from tasks.records import PreferenceRecord, write_jsonl_atomic
from tasks.stage import stage_main
from tasks.workspace import RoundState, Workspace


Sampler = Callable[[list[str], int], list[tuple[str, str, str]]]


def pair_sampler(policy_ref: str, max_new_tokens: int, temperature: float, chat: ChatConfig | None = None) -> Sampler:
    """The policy, loaded once, as a function (prompts, seed) -> one (prompt, response A, response B)
    triple per prompt: two independent samples, drawn with seeds `seed` and `seed + 1`."""
    tokenizer, model = load_tokenizer(policy_ref, chat), load_policy(policy_ref).to(compute_device())

    def sample(prompts: list[str], seed: int) -> list[tuple[str, str, str]]:
        a = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, seed, chat=chat)
        b = generate_texts(model, tokenizer, prompts, max_new_tokens, temperature, seed + 1, chat=chat)
        return list(zip(prompts, a, b))
    return sample


def sample_pairs(policy_ref: str, prompts: list[str], pairs_per_prompt: int, max_new_tokens: int,
                 temperature: float, seed: int, chat: ChatConfig | None = None) -> list[tuple[str, str, str]]:
    """(prompt, response A, response B) triples: `pairs_per_prompt` pairs of two independent samples each."""
    batch = [p for p in prompts for _ in range(pairs_per_prompt)]
    return pair_sampler(policy_ref, max_new_tokens, temperature, chat)(batch, seed)


def annotate(triples: list[tuple[str, str, str]], round_: int, policy_version: str | None, beta: float,
             seed: int) -> list[PreferenceRecord]:
    rng = random.Random(seed)
    records = []
    for prompt, a, b in triples:
        choice = scenario.simulated_preference(a, b, rng, beta)
        chosen, rejected = (b, a) if choice == "b" else (a, b)
        records.append(PreferenceRecord(
            prompt=prompt, chosen=chosen, rejected=rejected, source="simulated",
            annotator=f"simulated-bt-{beta:g}", round=round_, policy_version=policy_version,
            label="tie" if choice == "tie" else "pair"))
    return records


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> list[PreferenceRecord]:
    c = cfg.collect
    if not c.simulate:  # people's feedback arrives by the label flow, imports and the inbox
        write_jsonl_atomic(ws.collected, iter(()))
        print("collect.simulate is false: no simulated feedback this round")
        return []
    with tracking.stage_run(ws, cfg.project, "collect", state):
        policy_ref = tracking.resolve_model(ws, state.policy)
        seed = cfg.seed * 1000 + state.round
        started = time.monotonic()
        triples = sample_pairs(policy_ref, scenario.feedback_prompts(), c.pairs_per_prompt, c.max_new_tokens,
                               c.temperature, seed, cfg.chat_format)
        records = annotate(triples, state.round, state.champion_policy_version, c.annotator_beta, seed)
        write_jsonl_atomic(ws.collected, (r.to_json() for r in records))
        pairs = [r for r in records if r.label == "pair"]
        print(f"sampled {len(triples)} pairs of responses in {time.monotonic() - started:.1f}s; the simulated "
              f"annotator preferred one in {len(pairs)}, called {len(records) - len(pairs)} ties", flush=True)
        mlflow.log_metrics({
            "collect/records": len(records),
            "collect/pairs": len(pairs),
            "collect/ties": len(records) - len(pairs),
            "collect/chosen_neutral_rate": scenario.neutral_rate([r.chosen for r in pairs]),
            "collect/policy_neutral_rate": scenario.neutral_rate([t[1] for t in triples]),
        })
    return records


if __name__ == "__main__":
    stage_main(run)
