"""Typed configuration: one pydantic model per stage, defaults in params.yaml.

Prefect renders these models as the run form in its UI; `load_config` is the one place a
params file is read, and it names the bad key and the fix when a value is wrong.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.ppo.config import PPOConfig  # a plain dataclass: the PPO core imports no pydantic


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, never ignored


class ModelsConfig(_Strict):
    policy: str | None = Field(None, description="Hugging Face id or folder of the starting policy; "
                                                 "empty = pre-train the built-in scenario's tiny model")
    reward: str | None = Field(None, description="Hugging Face id or folder to start the reward model "
                                                 "from; empty = the base policy with a score head")


class ChatConfig(_Strict):
    template: bool = Field(False, description="chat or instruct models: every prompt (feedback's, prompt files', "
                                              "the label flow's) is a user turn of the policy tokenizer's chat "
                                              "template, every response the assistant's reply, ended by the "
                                              "template's end-of-turn token")
    system_prompt: str | None = Field(None, description="with template: a system turn before every prompt")
    template_kwargs: dict[str, str | int | float | bool] = Field(
        {}, description="with template: variables the template reads, e.g. {enable_thinking: false} for Qwen3")
    hh_dialogue: bool = Field(False, description="with template: a prompt written as an HH-RLHF dialogue "
                                                 "('\\n\\nHuman: ...\\n\\nAssistant: ...', ending in "
                                                 "'\\n\\nAssistant:', optionally opened by '\\n\\nSystem: "
                                                 "...', as imports write conversations) becomes its turns; "
                                                 "other prompts stay one user turn")

    @model_validator(mode="after")
    def _only_with_a_template(self) -> "ChatConfig":
        if not self.template and (self.system_prompt is not None or self.template_kwargs or self.hh_dialogue):
            raise ValueError("chat.system_prompt, chat.template_kwargs and chat.hh_dialogue apply to a chat template: "
                             "set chat.template to true, or leave them out")
        return self

    def params(self) -> dict[str, str]:
        """As MLflow params: chat.template, chat.system_prompt, chat.template_kwargs, chat.hh_dialogue."""
        return {f"chat.{k}": str(v) for k, v in self.model_dump().items()}

    def messages(self, prompt: str, reply: str | None = None) -> list[dict[str, str]]:
        """The turns a prompt (and a reply) make: the system turn if any, the user's (with
        hh_dialogue, an HH-RLHF dialogue's turns; a dialogue's own system turn replaces
        system_prompt), the assistant's."""
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        dialogue = hh_turns(prompt) if self.hh_dialogue else None
        if dialogue and dialogue[0]["role"] == "system":
            turns = []
        turns += dialogue or [{"role": "user", "content": prompt}]
        if reply is not None:
            turns.append({"role": "assistant", "content": reply})
        return turns


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_SYSTEM = "\n\nSystem:"


def hh_turns(prompt: str) -> list[dict[str, str]] | None:
    """An HH-RLHF dialogue ('\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:') as turns
    [user a, assistant b, user c], the last Assistant turn left open, a speaker's turns in a row
    joined; a dialogue opened by '\n\nSystem: s' (imported conversations) starts with system s.
    None for any other text."""
    system = []
    if prompt.startswith(HH_SYSTEM):
        cut = prompt.find("\n\nHuman:")
        if cut < 0:
            return None
        system = [{"role": "system", "content": prompt[len(HH_SYSTEM):cut].strip()}]
        prompt = prompt[cut:]
    parts = HH_TURN.split(prompt)  # ['', 'Human', ' a', 'Assistant', ' b', ..., 'Assistant', '']
    if len(parts) < 5 or parts[0].strip() or parts[1] != "Human" or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    speakers = zip(parts[1:-2:2], parts[2:-2:2])
    return system + joined_turns(("user" if speaker == "Human" else "assistant", text) for speaker, text in speakers)


def joined_turns(turns: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """(role, text) pairs as chat messages, each text stripped and a speaker's turns in a row joined
    into one (one speaker twice in a row: 3 of HH-RLHF's 1812 dialogues)."""
    out: list[dict[str, str]] = []
    for role, text in turns:
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text.strip()
        else:
            out.append({"role": role, "content": text.strip()})
    return out


class PretrainConfig(_Strict):
    n_sentences: int = Field(6000, gt=0, description="sentences in the generated corpus")
    neutral_rate: float = Field(0.08, ge=0, le=1, description="share of corpus sentences that say 'they'")
    vocab_size: int = Field(512, ge=64, description="byte-level BPE vocabulary size")
    n_layer: int = Field(2, gt=0, description="transformer blocks")
    n_head: int = Field(2, gt=0, description="attention heads")
    n_embd: int = Field(64, gt=0, description="hidden size")
    steps: int = Field(300, gt=0, description="optimizer steps")
    batch_size: int = Field(64, gt=0, description="sentences per step")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate")


class CollectConfig(_Strict):
    pairs_per_prompt: int = Field(48, gt=0, description="response pairs sampled per feedback prompt")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    max_new_tokens: int = Field(10, gt=0, description="longest response, in tokens")
    annotator_beta: float = Field(3.0, gt=0, description="simulated annotator's Bradley-Terry sharpness")
    simulate: bool = Field(True, description="the simulated annotator labels pairs from the round's policy; "
                                             "false: the round trains on feedback people gave (the label "
                                             "flow, `rlhf import`, the refinement inbox)")


class PromptsConfig(_Strict):
    train: str | None = Field(None, description="your prompts for PPO and the label flow: a .txt (one a line) or "
                                                "a .jsonl (\"prompt\" field) file under data/prompts/; empty = "
                                                "the built-in scenario's")
    heldout: str | None = Field(None, description="your prompts for evaluation, never trained on (same form); "
                                                  "set with train")
    from_feedback: bool = Field(False, description="instead of files: the validated feedback's prompts, each distinct "
                                                   "prompt trained on or held out by a hash of its text")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="with from_feedback: the share of distinct prompts "
                                                                 "held out for evaluation")

    @field_validator("train", "heldout")
    @classmethod
    def _under_prompts_dir(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        if path.is_absolute() or path.parts[:2] != ("data", "prompts") or ".." in path.parts or len(path.parts) < 3:
            raise ValueError(f"{value!r} is not a file under data/prompts/ of the workspace: put it there (the "
                             f"stages that read it depend on that folder, so a changed file reruns them), e.g. "
                             f"'data/prompts/{path.name or 'train.jsonl'}'")
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{value!r}: a prompts file ends in .txt (one prompt a line) or .jsonl (a \"prompt\" "
                             f"field a line)")
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> "PromptsConfig":
        if (self.train is None) != (self.heldout is None):
            raise ValueError("set prompts.train and prompts.heldout together (your training prompts with the "
                             "scenario's held-out professions, or the reverse, would measure nothing)")
        if self.train is not None and Path(self.train) == Path(self.heldout):
            raise ValueError(f"prompts.heldout is prompts.train ({self.train}): evaluation must use prompts PPO "
                             "never trained on; give it a file of its own")
        if self.from_feedback and self.train is not None:
            raise ValueError("prompts.from_feedback takes the prompts from the feedback, prompts.train and "
                             "prompts.heldout from files: set one or the other")
        return self


class ValidateSeverity(_Strict):
    label_balance: Literal["blocking", "warning"] = Field("warning", description="chosen-longer share out of bounds")
    annotator_agreement: Literal["blocking", "warning"] = Field("warning", description="an annotator disagrees "
                                                                                       "with the majority too often")
    drift: Literal["blocking", "warning"] = Field("warning", description="this round's data unlike the previous version")


class ValidateConfig(_Strict):
    min_rows: int = Field(20, ge=1, description="fewer accepted pairs than this stops the round (blocking)")
    max_rows: int = Field(10_000_000, ge=1, description="more accepted pairs than this stops the round (blocking)")
    max_chars: int = Field(4000, gt=0, description="longest prompt or response, in characters (row set aside)")
    max_tokens: int | None = Field(None, gt=0, description="longest prompt + response in tokens of the policy's "
                                                           "tokenizer (row set aside); empty = no token bound")
    max_quarantine_fraction: float = Field(0.5, ge=0, le=1,
                                           description="more rows set aside than this stops the round (blocking); "
                                                       "repeats of earlier pairs are set aside but not counted")
    chosen_longer_min: float = Field(0.1, ge=0, le=1, description="label balance: least share of pairs whose "
                                                                  "chosen response is the longer one")
    chosen_longer_max: float = Field(0.9, ge=0, le=1, description="label balance: largest such share (length "
                                                                  "bias is the classic reward-hacking seed)")
    min_annotator_agreement: float = Field(0.6, ge=0, le=1, description="each annotator's agreement with the "
                                                                        "majority, where pairs were labelled twice")
    max_length_drift: float = Field(0.5, ge=0, description="relative change of the mean response length of this "
                                                           "round's data against the previous version")
    min_vocab_overlap: float = Field(0.5, ge=0, le=1, description="share of this round's words seen in the "
                                                                  "previous version")
    severity: ValidateSeverity = ValidateSeverity()


class RewardConfig(_Strict):
    epochs: int = Field(3, gt=0, description="passes over the accepted pairs")
    lr: float = Field(1e-3, gt=0, description="learning rate")
    batch_size: int = Field(32, gt=0, description="pairs per step")
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="pairs held out for pairwise accuracy")
    split: Literal["pair", "prompt"] = Field(
        "pair", description="what is held out: pairs (by a hash of each pair's id), or prompts (every pair of a "
        "held-out prompt, by a hash of its text, as prompts.from_feedback splits them): with several pairs a "
        "prompt, pairs held out share their prompt, often a response too, with pairs trained on, and their "
        "accuracy says less of prompts the model has not seen")
    max_length: int | None = Field(None, gt=0, description="longest prompt+response+EOS, in tokens, the reward "
                                   "model trains on and scores; null = as many as the reward model has positions "
                                   "(64 for the built-in tiny model). Longer pairs are neither trained on nor scored, "
                                   "and the stage's log counts them")
    eval_file: str | None = Field(None, description="a preference file (any format `rlhf import` reads) to report "
                                                    "the reward model's pairwise accuracy on as well; read before "
                                                    "training, its unreadable rows counted by reason")
    eval_map: str | None = Field(None, description="eval_file's columns, as `rlhf import --map` takes them; null: "
                                                   "prompt, chosen, rejected")
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="bf16: train under bf16 autocast over float32 weights; no: float32; auto: bf16 on a GPU "
                            "that has it, no on a CPU (as ppo.mixed_precision)")

    @field_validator("eval_map")
    @classmethod
    def _eval_map(cls, value: str | None) -> str | None:
        return valid_map(value)

    @model_validator(mode="after")
    def _map_needs_file(self) -> "RewardConfig":
        if self.eval_map and not self.eval_file:
            raise ValueError("reward.eval_map names the columns of reward.eval_file: set the file too")
        return self


def valid_map(value: str | None) -> str | None:
    """A column map as `rlhf import --map` takes it, or the reason it is not one."""
    from tasks.importers import ImportError_, parse_mapping  # importers reads this module: imported here
    try:
        parse_mapping(value)
    except ImportError_ as e:
        raise ValueError(str(e)) from None
    return value


class EvaluateConfig(_Strict):
    samples_per_prompt: int | None = Field(None, gt=0, description="responses sampled per held-out prompt, by "
                                           "both policies; null: as many as make about 1,024 pairs, at most 32 "
                                           "(32 on the scenario's 6 prompts, 4 on 256): prompts, not samples, "
                                           "narrow the win-rate's interval")
    max_prompts: int | None = Field(256, gt=0, description="at most this many held-out prompts are answered: a "
                                    "fixed sample, by a hash of each prompt's text (held-out prompts from "
                                    "feedback grow round after round); null = every one")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    interval: Literal["auto", "prompts", "pairs"] = Field(
        "auto", description="the win-rate interval the gate reads: prompts (your held-out prompts are a sample of "
        "what will be asked: the wider of the interval over prompts and over pairs), pairs (the prompts are all "
        "there is to measure); auto: pairs for the built-in scenario's held-out professions, prompts otherwise")
    judge: str | None = Field(None, min_length=1, description="a reward model that did not train the candidate "
                              "(folder, Hugging Face id or models:/ URI; its own tokenizer and input format): it "
                              "scores both policies' responses beside the round's reward model, which PPO may have "
                              "learnt to please more than your annotators; gated by gates.min_judge_win_rate")

    def samples_for(self, prompts: int) -> int:
        """Responses a held-out prompt gets from each policy when `prompts` are answered."""
        if self.samples_per_prompt is not None:
            return self.samples_per_prompt
        return max(1, min(32, -(-1024 // max(prompts, 1))))

    def over_prompts(self, scenario_prompts: bool) -> bool:
        return self.interval == "prompts" or (self.interval == "auto" and not scenario_prompts)


class GatesConfig(_Strict):
    min_win_rate: float = Field(0.5, ge=0, le=1, description="the lower end of the 95% Wilson interval of the "
                                "candidate's win-rate against the champion must reach this (the reward "
                                "model's preference probability, sigmoid of the score difference, averaged)")
    max_kl: float = Field(8.0, gt=0, description="KL budget to the reference, nats per sequence")
    max_fluency_drop: float = Field(0.05, ge=0, description="how much the fluent-response rate may fall")
    min_reward_accuracy: float = Field(0.6, ge=0, le=1, description="reward model's held-out pairwise accuracy floor")
    min_judge_win_rate: float = Field(0.5, ge=0, le=1, description="with evaluate.judge: the lower end of the "
                                      "judge's win-rate interval (as min_win_rate's) must reach this too; 0: the "
                                      "judge is reported, not gated on")


def valid_cron(value: str) -> bool:
    """Whether Prefect, which `rlhf serve` schedules with, takes `value` as a cron schedule."""
    global _cron_check
    if _cron_check is None:
        _cron_check = cron_check(Path(importlib.util.find_spec("prefect").submodule_search_locations[0]))
    return _cron_check(value)


_cron_check = None


def cron_check(prefect_dir: Path) -> Callable[[str], bool]:
    """Prefect's own cron rule (its vendored croniter, no random or hashed fields), with the parser
    loaded from Prefect's folder without importing Prefect, which would cost every stage 1.3 s at
    start. A Prefect laid out otherwise is asked itself."""
    path = prefect_dir / "_vendor" / "croniter" / "croniter.py"
    if not path.is_file():
        def ask_prefect(value: str) -> bool:
            from prefect.client.schemas.schedules import CronSchedule
            try:
                CronSchedule(cron=value)
            except ValidationError:
                return False
            return True
        return ask_prefect
    spec = importlib.util.spec_from_file_location("_rlhf_prefect_croniter", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda value: (module.croniter.is_valid(value)
                          and not any(field.casefold() in ("r", "h") for field in value.split()))


class RefinementConfig(_Strict):
    cron: str = Field("0 3 * * *", description="when `rlhf serve` schedules a refinement round (cron)")
    timezone: str = Field("UTC", description="time zone of the cron schedule (IANA name)")
    inbox: str = Field("inbox", description="folder (relative to the workspace) whose preference files each "
                                            "refinement round imports first; done/ and failed/ keep them after")
    inbox_map: str | None = Field(None, description="the inbox files' columns, as `rlhf import --map` takes them "
                                  "(e.g. 'prompt=question,a=left,b=right,choice=better' for a labelling sheet's "
                                  "nightly export); null: prompt, chosen, rejected")
    skip_without_new_feedback: bool = Field(True, description="when collect.simulate is false, skip a round "
                                                              "that has no feedback newer than the last round")
    keep_versions: int | None = Field(None, ge=1, description="after each round (scheduled or `rlhf run`), delete "
                                      "the weights of registry versions with no alias beyond each model's newest "
                                      "N, and unused DVC cache (`rlhf gc --keep N`); null = keep everything")
    gc_remote: bool = Field(False, description="with keep_versions: prune the DVC remote too (`rlhf gc --remote`)")

    @model_validator(mode="after")
    def _remote_needs_keep(self) -> "RefinementConfig":
        if self.gc_remote and self.keep_versions is None:
            raise ValueError("refinement.gc_remote prunes only with refinement.keep_versions set (e.g. 2)")
        return self

    @field_validator("inbox_map")
    @classmethod
    def _inbox_map(cls, value: str | None) -> str | None:
        return valid_map(value)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not valid_cron(value):
            raise ValueError(f"not a cron expression: {value!r} (five fields, e.g. '0 3 * * *')")
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Paris')") from None
        return value


class PipelineConfig(_Strict):
    """One round of the RLHF loop. Every field has a default (see params.yaml)."""

    project: str = Field("rlhf", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                         description="registry names: PROJECT-reward and PROJECT-policy")
    seed: int = Field(0, description="seed of every random draw")
    models: ModelsConfig = ModelsConfig()
    chat: ChatConfig = ChatConfig()
    prompts: PromptsConfig = PromptsConfig()
    pretrain: PretrainConfig = PretrainConfig()
    collect: CollectConfig = CollectConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    gates: GatesConfig = GatesConfig()
    refinement: RefinementConfig = RefinementConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @property
    def reward_name(self) -> str:
        return f"{self.project}-reward"

    @property
    def policy_name(self) -> str:
        return f"{self.project}-policy"

    @model_validator(mode="after")
    def _simulated_feedback_needs_the_scenario(self) -> "PipelineConfig":
        if self.collect.simulate and not self.scenario_prompts:
            which = "prompts.train" if self.prompts.train is not None else "prompts.from_feedback"
            raise ValueError(f"collect.simulate: the simulated annotator judges the built-in scenario's sentences, "
                             f"not your prompts; with {which} set, set collect.simulate to false and give "
                             "feedback by the label flow, `rlhf import` or the refinement inbox")
        return self

    @model_validator(mode="after")
    def _chat_needs_a_model(self) -> "PipelineConfig":
        if self.chat.template and self.models.policy is None:
            raise ValueError("chat.template needs models.policy: the built-in scenario's tiny model has no chat "
                             "template; set models.policy to a chat or instruct model")
        return self

    @property
    def chat_format(self) -> ChatConfig | None:
        """How prompts become tokens: None as plain text, else in the chat template (tasks.modeling)."""
        return self.chat if self.chat.template else None

    @property
    def scenario_prompts(self) -> bool:
        """True when PPO and evaluation use the built-in scenario's prompts (and its gold judge applies)."""
        return self.prompts.train is None and not self.prompts.from_feedback

    def to_params(self) -> dict:
        return self.model_dump(by_alias=True)


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key and the fix."""


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """Read a params.yaml (or none: the defaults) and apply dotted-key overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a params.yaml")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return _build(data, overrides, f" in {path}" if path else "")


def with_overrides(cfg: PipelineConfig, overrides: dict | None) -> PipelineConfig:
    """`cfg` with dotted-key overrides applied, validated as a params file would be."""
    return _build(cfg.to_params(), overrides, "")


def _build(data: dict, overrides: dict | None, where: str) -> PipelineConfig:
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
                 if err["loc"] else f"  {err['msg']}"  # a check across sections: its message names the keys
                 for err in e.errors()]
        raise ConfigError(f"invalid config{where}:\n" + "\n".join(lines)) from None
