"""Prompts: what PPO trains on and what evaluation measures. The built-in scenario's by default,
your own files (params.yaml `prompts.train` and `prompts.heldout`), or the prompts of the
validated feedback (`prompts.from_feedback`): each distinct prompt goes to training or to the
held-out side by a hash of its text, so it stays on its side as feedback grows round by round.

A prompts file lives under data/prompts/ (a dependency of the stages that read it, so a changed
file reruns them) and holds one prompt a line: `.txt` as plain text, `.jsonl` as JSON objects
with a "prompt" string (other fields are ignored, so preference records serve as they are; use
it for prompts that span lines, such as HH-RLHF dialogues) or a "prompt" list of messages (TRL's
prompt-only conversational format: one user message becomes its text, earlier turns or a system
message a dialogue that `chat.hh_dialogue` renders as those turns, as imports write conversations).
A prompt is used as written,
leading and trailing spaces included. An empty line, a line that is not a prompt or a file
without any stops the stage with the file and line named: no prompt is skipped unsaid.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tasks import scenario
from tasks.config import PipelineConfig
from tasks.importers import Problem, as_prompt, messages_of
from tasks.stage import StageError
from tasks.workspace import Workspace

PROMPTS_DIR = Path("data") / "prompts"  # relative to the workspace
SUFFIXES = (".txt", ".jsonl")


class PromptsError(StageError):
    """A prompts file that cannot be used; the message names the file, the line and the fix."""


def load_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise PromptsError(f"{path}: a prompts file ends in .txt (one prompt a line) or .jsonl "
                           f"(one {{\"prompt\": ...}} a line), not {path.suffix or 'nothing'!r}")
    if not path.is_file():
        raise PromptsError(f"prompts file {path} does not exist (put it under {PROMPTS_DIR}/ of the workspace)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    prompts = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        where = f"{path}, line {number}"
        if not line.strip():
            raise PromptsError(f"{where} is empty: one prompt a line, no blank lines")
        if path.suffix == ".txt":
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptsError(f"{where} is not JSON ({e.msg}): each line must be an object with a \"prompt\"") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if isinstance(prompt, (list, dict)):  # messages
            turns = messages_of("prompt", prompt)
            text = turns if isinstance(turns, Problem) else as_prompt(turns)
            if isinstance(text, Problem):
                raise PromptsError(f"{where}: its \"prompt\" messages are not a prompt: {text.reason}")
            prompt = text
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptsError(f"{where} has no \"prompt\" string or messages (got {str(row)[:80]!r})")
        prompts.append(prompt)
    if not prompts:
        raise PromptsError(f"{path} holds no prompts")
    return prompts


def training_prompts(ws: Workspace, cfg: PipelineConfig) -> list[str]:
    """PPO's prompts (and the label flow's): your file, the feedback's, or the scenario's feedback professions."""
    if cfg.prompts.from_feedback:
        return feedback_prompts(ws.accepted, cfg.prompts.heldout_fraction)[0]
    if cfg.prompts.train is None:
        return scenario.feedback_prompts()
    return load_prompts(ws.root / cfg.prompts.train)


def heldout_prompts(ws: Workspace, cfg: PipelineConfig) -> list[str]:
    """Evaluation's prompts, never trained on: your file, the feedback's, or the scenario's held-out professions."""
    if cfg.prompts.from_feedback:
        return feedback_prompts(ws.accepted, cfg.prompts.heldout_fraction)[1]
    if cfg.prompts.heldout is None:
        return scenario.heldout_prompts()
    return load_prompts(ws.root / cfg.prompts.heldout)


def evaluation_prompts(ws: Workspace, cfg: PipelineConfig) -> tuple[list[str], int]:
    """The held-out prompts evaluation answers, and how many there are in all: at most
    `evaluate.max_prompts` of them (see sample_prompts)."""
    prompts = heldout_prompts(ws, cfg)
    return sample_prompts(prompts, cfg.evaluate.max_prompts), len(prompts)


def sample_prompts(prompts: list[str], n: int | None) -> list[str]:
    """`n` of the prompts, in their order: those first by a hash of their text. The same sample on
    every machine and in every round while the prompts stay the same; as held-out prompts from
    feedback grow, a new prompt enters it only by displacing one (the rest stay)."""
    if n is None or len(prompts) <= n:
        return prompts
    rank = sorted(range(len(prompts)), key=lambda i: (hashlib.sha256(b"evaluate\0" + prompts[i].encode("utf-8"))
                                                      .digest(), i))
    return [prompts[i] for i in sorted(rank[:n])]


def source(cfg: PipelineConfig, side: str) -> str:
    """Where a side's prompts come from, as MLflow records it."""
    if cfg.prompts.from_feedback:
        return f"validated feedback ({side}, heldout_fraction {cfg.prompts.heldout_fraction:g})"
    return getattr(cfg.prompts, side) or "built-in scenario"


def held_out(prompt: str, fraction: float) -> bool:
    """A prompt's side, from a hash of its text: the same in every round and on every machine."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 1000 < fraction * 1000


def feedback_prompts(accepted: Path, fraction: float) -> tuple[list[str], list[str]]:
    """The distinct prompts of the validated pairs in their first order: (training, held out)."""
    if not accepted.exists():
        raise PromptsError(f"prompts.from_feedback: no validated feedback yet ({accepted}); run a round's "
                           "validate stage first")
    return split_prompts((json.loads(line)["prompt"] for line in accepted.read_text(encoding="utf-8").splitlines()
                          if line.strip()), fraction)


def split_prompts(prompts: Iterable[str], fraction: float) -> tuple[list[str], list[str]]:
    """The distinct prompts in their first order: (training, held out), by held_out."""
    prompts = dict.fromkeys(prompts)
    train = [p for p in prompts if not held_out(p, fraction)]
    heldout = [p for p in prompts if held_out(p, fraction)]
    if not train or not heldout:
        raise PromptsError(f"prompts.from_feedback: the validated feedback holds {len(prompts)} distinct prompts, "
                           f"{len(heldout)} of them held out (prompts.heldout_fraction {fraction:g}): PPO and "
                           "evaluation need at least one each; give feedback on more prompts or change the fraction")
    return train, heldout


FROM_FEEDBACK = " of the validated feedback's "  # how `where` begins for prompts.from_feedback


def where(cfg: PipelineConfig, side: str) -> str:
    """How `check_lengths` names a side's prompts."""
    if cfg.prompts.from_feedback:
        return FROM_FEEDBACK + ("training" if side == "train" else "held-out") + " prompts"
    return f" of {getattr(cfg.prompts, side)}" if getattr(cfg.prompts, side) else ""


def check_lengths(prompt_ids: list[list[int]], max_new_tokens: int, config, where: str = "") -> None:
    """Every prompt and its response must fit the model's positions: say which prompt does not
    (`where`: " of data/prompts/x.txt", say), how many do not, and the fix."""
    from tasks.modeling import max_positions  # (torch: imported by the stages that check, not by this module)

    limit = max_positions(config)
    if limit is None or not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if len(prompt_ids[longest]) + max_new_tokens > limit:
        over = sum(len(ids) + max_new_tokens > limit for ids in prompt_ids)
        fix = (f"set validate.max_tokens to {limit - max_new_tokens} to set aside longer pairs"
               if where.startswith(FROM_FEEDBACK) else "shorten the prompts")  # (a file's name may hold "feedback")
        raise PromptsError(f"prompt {longest + 1}{where} is {len(prompt_ids[longest])} tokens"
                           + (f" ({over} of the {len(prompt_ids)} are too long)" if over > 1 else "")
                           + f": with ppo.max_new_tokens {max_new_tokens} that exceeds the model's {limit} "
                           f"positions; {fix} or lower ppo.max_new_tokens")
