"""Shared fixtures: an isolated environment, a fast config, tiny locally built models.

Everything is real (Prefect, MLflow, DVC, Great Expectations, training); only the sizes are
small. Nothing is downloaded: the tiny model is built here and loaded back with from_pretrained.
"""
import os
import tempfile
from pathlib import Path

# Isolation first, before Prefect, MLflow or DVC are imported anywhere.
_HOME = Path(tempfile.mkdtemp(prefix="rlhf-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_HOME / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_HOME / "prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "DVC_SITE_CACHE_DIR": str(_HOME / "dvc-site"),
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_AUTHOR_NAME": "rlhf-tests", "GIT_AUTHOR_EMAIL": "tests@localhost",
    "GIT_COMMITTER_NAME": "rlhf-tests", "GIT_COMMITTER_EMAIL": "tests@localhost",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `make test` runs the files on pytest-xdist workers, one per core: each worker (and the stages it
# starts) gets its share of the cores, since two processes each with a thread per core only fight.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def _migrated_prefect_database() -> None:
    """Prefect's server builds a new database by running its migrations, 10-15 s, at its first start
    in each worker's PREFECT_HOME. Done once per Prefect version on this machine instead (its own
    `prefect server database upgrade`, under a file lock for the other workers), then copied in."""
    import shutil
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    try:
        template = Path(tempfile.gettempdir()) / f"rlhf-tests-prefect-{version('prefect')}.db"
    except PackageNotFoundError:  # the PPO core's tests on a machine with torch and transformers alone
        return
    from filelock import FileLock

    with FileLock(f"{template}.lock"):
        if not template.exists():
            home = Path(tempfile.mkdtemp(prefix="rlhf-tests-prefect-migrate-"))
            out = subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                 env={**os.environ, "PREFECT_HOME": str(home)}, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"prefect server database upgrade failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            os.replace(home / "prefect.db", template)  # whole or not at all
            shutil.rmtree(home)
    (_HOME / "prefect").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, _HOME / "prefect" / "prefect.db")


_migrated_prefect_database()

import pytest  # noqa: E402

from tasks import scenario  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.stage import quiet_libraries  # noqa: E402

quiet_libraries()

HH_RLHF = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-sample.jsonl"

# A round small enough for CI's 2 cores, large enough that every stage does real work.
FAST = {
    "collect.pairs_per_prompt": 48,
    "reward.epochs": 3,
    "ppo.steps": 30, "ppo.checkpoint_every": 5,
    "evaluate.samples_per_prompt": 16,
}

# A round that has only to run, not to learn: for tests of what goes around the stages
# (orchestration, pruning, other architectures). Most of such a round is its stages' start-up.
SMALL = {**FAST, "collect.pairs_per_prompt": 16, "reward.epochs": 2, "ppo.steps": 12, "ppo.batch_size": 32,
         "ppo.minibatches": 2, "ppo.checkpoint_every": 2, "evaluate.samples_per_prompt": 4}


# The longest files first, so that workers start on them and the short ones fill in around them
# (`make test` hands out whole files in this order: --dist loadfile --no-loadscope-reorder).
LONGEST_FIRST = ["test_refinement.py", "test_flow.py", "test_stages.py", "test_import.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: tests keep their order inside a file


def command_line(proc) -> str:
    """A process's command line; "" for one that has ended since it was listed (gone, or a zombie
    nobody has reaped yet: a short-lived `git` of the run, say)."""
    import psutil

    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def still_running(procs: list, timeout: float) -> list:
    """Those of `procs` still running after up to `timeout` s; a dead process that nobody has reaped
    (a zombie: this container's PID 1 reaps no orphans) does not count."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=timeout)
    running = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.fixture
def fast_cfg():
    return load_config(None, FAST)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 pre-trained on the scenario corpus, saved as a user's model folder would be."""
    from tasks.modeling import load_tokenizer, save
    from tasks.pretrain import train_model, train_tokenizer

    cfg = load_config(None, FAST)
    folder = tmp_path_factory.mktemp("tiny-model")
    lines = scenario.corpus(cfg.pretrain.n_sentences, cfg.pretrain.neutral_rate, seed=0)
    train_tokenizer(lines, cfg.pretrain.vocab_size).save_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    model, _ = train_model(tokenizer, lines, cfg.pretrain, seed=0)
    return save(model, tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model trained (TRL RewardTrainer) on simulated feedback about the tiny model."""
    import json

    from tasks.collect import annotate, sample_pairs
    from tasks.train_reward import train

    cfg = load_config(None, FAST)
    triples = sample_pairs(str(tiny_model_dir), scenario.feedback_prompts(), 96, 10, 1.0, seed=1)
    records = [json.loads(r.to_json()) for r in annotate(triples, 1, None, 3.0, seed=1) if r.label == "pair"]
    folder = tmp_path_factory.mktemp("tiny-reward") / "reward"
    train(str(tiny_model_dir), str(tiny_model_dir), records, cfg, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny Qwen3 of the GPT-2's tokenizer, pre-trained on the scenario corpus as it is (a random
    model's gibberish would be set aside by validation, rightly)."""
    from transformers import Qwen3Config

    from tasks.modeling import load_tokenizer, save
    from tasks.pretrain import train_model

    tok, pretrain = load_tokenizer(tiny_model_dir), load_config(None, FAST).pretrain
    lines = scenario.corpus(pretrain.n_sentences, pretrain.neutral_rate, seed=0)
    qwen3 = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    return save(train_model(tok, lines, pretrain, seed=0, config=qwen3)[0], tok, tmp_path_factory.mktemp("tiny-qwen3"))


def another_tokenizer(model_dir: Path, folder: Path) -> Path:
    """A tokenizer folder with one token more than `model_dir`'s: another vocabulary, nothing else changed."""
    from tasks.modeling import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|new|>"]})
    tok.save_pretrained(folder)
    return folder


# A chat template as Llama 3's and Gemma's are built: it writes its own BOS (which this tokenizer
# also adds to any text it encodes), and ends the assistant's turn with a token that is not the EOS.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_turns(lines: list[str]) -> list[str]:
    """'the nurse said she was late .' as a user turn (up to 'said') and the assistant's reply."""
    cut = [line.index(" said") + len(" said") for line in lines]
    return [f"<|user|>{line[:i]}<|end|><|assistant|>{line[i:]}<|end|>" for line, i in zip(lines, cut)]


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny chat model: the scenario's sentences pre-trained as turns of CHAT_TEMPLATE, its
    tokenizer adding a BOS of its own, its EOS <|endoftext|> and its end of turn <|end|>."""
    from tokenizers import processors

    from tasks.modeling import load_tokenizer, save
    from tasks.pretrain import train_model, train_tokenizer

    cfg = load_config(None, FAST)
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    lines = scenario.corpus(cfg.pretrain.n_sentences, cfg.pretrain.neutral_rate, seed=0)
    tokenizer = train_tokenizer(lines, cfg.pretrain.vocab_size)
    tokenizer.add_special_tokens({"bos_token": "<|bos|>",
                                  "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", tokenizer.bos_token_id)])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    model, _ = train_model(tokenizer, chat_turns(lines), cfg.pretrain, seed=0)
    return save(model, tokenizer, folder)
