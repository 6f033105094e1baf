"""The `rlhf-label` flow: a person labels response pairs in the Prefect UI.

The flow samples pairs from the champion policy (before any, the base model), then pauses once
per batch with a typed form (a RunInput): the batch's prompts and responses are shown above it,
in a random order that is recorded, and the form takes A / B / tie / skip and an optional comment
per pair, one field each (`pair_N`, `comment_N`, N the pair's number). Resuming the run (the UI's
Resume button, or `resume_flow_run(id, run_input={"pair_1": "A", "comment_1": "..."})`) hands the
answers back. A batch left unanswered past the timeout ends the session; every answer given
before it, or before the session is stopped, is kept. The labels become a new raw feedback file,
versioned with DVC like any other round.
"""
from __future__ import annotations

import logging
import random
import re
import secrets
import sys
import tempfile
from pathlib import Path
from typing import Literal

import pydantic
from prefect import flow, get_run_logger
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput

from tasks import tracking, versioning
from tasks.collect import Sampler, pair_sampler
from tasks.config import PipelineConfig, load_config
from tasks.prompts import training_prompts
from tasks.records import PreferenceRecord
from tasks.workspace import Workspace, init_workspace


class NothingToLabel(ValueError):
    """No policy to sample pairs from yet."""


Choice = Literal["A", "B", "tie", "skip"]


def batch_form(batch: list[dict], first: int, ask_name: bool = False) -> type[RunInput]:
    """The form of one batch, its pairs shown above it: per pair a choice (a drop-down of A, B, tie,
    skip: required, nothing is recorded for a pair by default) and an optional comment. One field
    per pair, named by the pair's number (`pair_3`, `comment_3`), so an answer can only land on the
    pair it names; Prefect's server checks a Resume against this schema and refuses a key or value
    it does not have."""
    fields = {}
    if ask_name:  # a session started without an annotator: the person answering says who they are
        fields["annotator"] = (str, pydantic.Field(pattern=r"\S", title="Your name (kept on every label you give)"))
    for i in range(first, first + len(batch)):
        fields[f"pair_{i}"] = (Choice, pydantic.Field(title=f"Pair {i}: the better response"))
        fields[f"comment_{i}"] = (str, pydantic.Field(default="", title=f"Pair {i}: comment"))
    form = pydantic.create_model("PairLabels", __base__=RunInput, **fields)
    form._description = batch_markdown(batch, first)  # what RunInput.with_initial_data(description=...) sets
    return form


def code_block(text: str) -> str:
    """`text` shown verbatim in Markdown: a fenced block, its fence longer than any run of
    backticks in the text (a dialogue's lines, Markdown or code in a response stay as written)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def batch_markdown(batch: list[dict], first: int) -> str:
    parts = ["Pick the better response of each pair below: **A**, **B**, **tie** or **skip**.\n"]
    for i, pair in enumerate(batch, start=first):
        parts.append(f"### Pair {i}\n**Prompt:**\n{code_block(pair['prompt'])}\n\n**A:**\n{code_block(pair['A'])}\n\n"
                     f"**B:**\n{code_block(pair['B'])}\n")
    return "\n".join(parts)


def to_records(batch: list[dict], first: int, answer: RunInput, annotator: str, round_: int,
               policy_version: str | None) -> list[PreferenceRecord]:
    """A batch's answers (`batch_form`'s fields) -> records. A tie or skip keeps A / B as chosen /
    rejected with its label."""
    out = []
    for i, pair in enumerate(batch, start=first):
        choice, comment = getattr(answer, f"pair_{i}"), getattr(answer, f"comment_{i}").strip() or None
        chosen, rejected = (pair["B"], pair["A"]) if choice == "B" else (pair["A"], pair["B"])
        out.append(PreferenceRecord(
            prompt=pair["prompt"], chosen=chosen, rejected=rejected, source="prefect-ui", annotator=annotator,
            round=round_, policy_version=policy_version, label={"tie": "tie", "skip": "skip"}.get(choice, "pair"),
            comment=comment, shown_as_a="chosen" if chosen == pair["A"] else "rejected"))
    return out


def run_url() -> str:
    """This flow run's page in Prefect's UI."""
    from prefect.runtime import flow_run
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run.id) or f"the paused rlhf-label run {flow_run.id} in Prefect's UI"


def running_again() -> None:
    """After a pause times out, Prefect's server refuses the run every state but Failed, so a
    session that ends on an unanswered batch would be recorded as failed, answers given before it
    and saved notwithstanding. Forced back to Running, it ends as it went: Completed."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run
    from prefect.states import Running

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Running(), force=True)


def say(message: str) -> None:
    """What the person labelling must read (how many pairs, where to answer, what was saved): a log
    line of the run, which the UI shows, and on stdout all the same where Prefect's logging level
    hides INFO (PREFECT_LOGGING_LEVEL=WARNING left `rlhf label` waiting without saying where)."""
    logger = get_run_logger()
    logger.info(message)
    if not logger.isEnabledFor(logging.INFO):
        sys.stdout.write(message + "\n")
        sys.stdout.flush()


def save_labels(ws: Workspace, records: list[PreferenceRecord], round_: int) -> Path:
    """The labels as a new raw feedback file, versioned (DVC, git) like any round's."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "labels.jsonl"
        path.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
        saved = versioning.add_raw_feedback(ws, path, round_, "prefect-ui", len(records))
    say(f"{len(records)} labels saved ({sum(r.label == 'pair' for r in records)} pairs): {saved}")
    problem = versioning.push(ws, saved)
    if problem:
        get_run_logger().warning("%s: %s", saved.name, problem)
    return saved


def policy_to_label(ws: Workspace, cfg: PipelineConfig) -> tuple[str, str | None]:
    """Whose pairs are shown, and its registry version: the champion policy; before any, the base
    model (models/base, or models.policy itself before a first round has made models/base: people's
    labels can come before the first round). NothingToLabel before any of them exists."""
    champion = tracking.alias_version(tracking.setup(ws, cfg.project), cfg.policy_name, tracking.CHAMPION)
    if champion is not None:
        return f"models:/{cfg.policy_name}/{champion}", champion
    if (ws.base_model / "config.json").exists():
        return str(ws.base_model), None
    if cfg.models.policy:
        return cfg.models.policy, None
    raise NothingToLabel(f"no model to sample pairs from in {ws.root}: set models.policy to yours (params.yaml), "
                         f"or run `rlhf run --workspace {ws.root}` first (the built-in scenario)")


TRIES = 3  # samplings of the pairs to show, at most


def draw_pairs(pool: list[str], pairs: int, sample: Sampler, seed: int) -> tuple[list[dict], list[str]]:
    """`pairs` pairs to show, {"prompt", "A", "B"}, sampled for the pool's first `pairs` prompts
    (the two responses of each already in random order), and the prompts left out.

    A pair of two equal responses has nothing to judge (validation would set it aside): its prompt
    gives way to the pool's next unused one, or, once the pool is used up, is sampled again; TRIES
    samplings at most. A policy that answers some prompt the same way every time (a sharp policy,
    a low temperature) still fills the session from other prompts."""
    shown, todo, unused = [], pool[:pairs], pool[pairs:]
    for attempt in range(TRIES):
        triples = sample(todo, seed + 2 * attempt)
        shown += [{"prompt": p, "A": a, "B": b} for p, a, b in triples if a != b]
        equal = [p for p, a, b in triples if a == b]
        fresh, unused = unused[:len(equal)], unused[len(equal):]
        todo = fresh + equal[len(fresh):]
        if not todo:
            break
    return shown, todo


@flow(name="rlhf-label")
def label(workspace: str = ".", pairs: int = 8, batch_size: int = 4, timeout_seconds: int = 3600,
          annotator: str | None = None, seed: int | None = None) -> dict:
    """Sample `pairs` response pairs from the champion and ask a person to label them, a batch at a time.

    `annotator`: the name kept on every label; None asks for it on the first form (two people under
    one name read as one annotator). `seed`: of the prompts drawn and the responses sampled; None
    draws one for this session (a fixed
    seed shows the same pairs every session of the same champion, and repeats of a labelled pair are
    set aside by validation: the second session's work would be lost)."""
    if pairs < 1 or batch_size < 1 or timeout_seconds < 1:
        raise ValueError("pairs, batch_size and timeout_seconds must each be at least 1")
    if seed is None:
        seed = secrets.randbelow(2**31)
    ws = init_workspace(workspace)
    cfg = load_config(ws.params)
    policy_ref, champion = policy_to_label(ws, cfg)
    if champion is not None:
        policy_ref = tracking.resolve_model(ws, policy_ref)
    # the training prompts in a random order (each once while there are enough), one pair each
    prompts = training_prompts(ws, cfg)
    pool = prompts * -(-pairs // len(prompts))
    random.Random(seed).shuffle(pool)
    sampler = pair_sampler(policy_ref, cfg.collect.max_new_tokens, cfg.collect.temperature, cfg.chat_format)
    shown, todo = draw_pairs(pool, pairs, sampler, seed)
    if todo:
        get_run_logger().warning("%d pairs fewer than asked: after %d samplings, every prompt left still gave "
                                 "two equal responses", len(todo), TRIES)
    say(f"{len(shown)} pairs sampled with seed {seed} (the same seed shows the same pairs of this policy again); "
          + (f"labels are recorded as annotator {annotator!r}" if annotator else "the first form asks for your name"))
    round_ = ws.read_state().round
    records: list[PreferenceRecord] = []
    raw_file = None
    try:
        for start in range(0, len(shown), batch_size):
            batch = shown[start:start + batch_size]
            # where a person answers: the run's page in the UI (its Resume button opens the form)
            say(f"batch {start // batch_size + 1} of {-(-len(shown) // batch_size)} waits for your labels "
                  f"(for up to {timeout_seconds} s): open {run_url()} and press Resume")
            try:
                answer = pause_flow_run(wait_for_input=batch_form(batch, start + 1, ask_name=not annotator),
                                        timeout=timeout_seconds, poll_interval=1)
            except FlowPauseTimeout:
                get_run_logger().warning("batch %d unanswered after %ds: ending the session, keeping %d labels",
                                         start // batch_size + 1, timeout_seconds, len(records))
                running_again()
                break
            annotator = annotator or answer.annotator.strip()
            records += to_records(batch, start + 1, answer, annotator, round_, champion)
    finally:  # also when the session is stopped (Ctrl-C, SIGTERM, cancelled): what a person gave is never lost
        if records:
            raw_file = str(save_labels(ws, records, round_))
    summary = {"shown": len(shown), "not_shown": len(todo), "labelled": len(records),
               "pairs": sum(r.label == "pair" for r in records), "raw_file": raw_file, "seed": seed}
    if raw_file is None:
        say("no labels given: nothing saved")
    return summary
