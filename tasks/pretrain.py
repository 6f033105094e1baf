"""Stage `pretrain`: the base policy in models/base.

Built-in scenario: generate the stereotyped corpus, train a byte-level BPE tokenizer on it and
a tiny GPT-2-style model with a plain next-token loop. With `models.policy` set, no training:
the user's model is loaded with from_pretrained and saved as the base.
"""
from __future__ import annotations

import shutil
import tempfile

import mlflow
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tasks import scenario, tracking
from tasks.config import PipelineConfig, PretrainConfig
from tasks.modeling import end_of_turn, load_policy, load_tokenizer, reward_head_problem, save
from tasks.ppo.rollout import position_ids_from_mask
from tasks.stage import StageError, stage_main
from tasks.workspace import RoundState, Workspace

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=vocab_size, min_frequency=1, special_tokens=[EOS, PAD])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    tok.padding_side = "left"
    return tok


def train_model(tokenizer, lines: list[str], cfg: PretrainConfig, seed: int,
                config=None) -> tuple[GPT2LMHeadModel, list[float]]:
    """Next-token training on whole sentences, each ending in EOS. Returns the model and losses.
    `config`: another architecture's config (the tests' Qwen3), else the GPT-2 of `cfg`'s size."""
    torch.manual_seed(seed)
    enc = tokenizer([line + EOS for line in lines], padding="longest", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (N, L), left-padded
    if config is None:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=cfg.n_embd,
                                           n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    else:
        model = AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(ids), (cfg.batch_size,), generator=gen)
        batch_ids, batch_mask = ids[idx], mask[idx]
        position_ids = position_ids_from_mask(batch_mask)
        labels = batch_ids.masked_fill(batch_mask == 0, -100)
        loss = model(input_ids=batch_ids, attention_mask=batch_mask, position_ids=position_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return model.eval(), losses


def run(ws: Workspace, cfg: PipelineConfig, state: RoundState) -> None:
    with tracking.stage_run(ws, cfg.project, "pretrain", state):
        if cfg.models.policy:
            # The user's own model: no pre-training, the same from_pretrained path they use.
            tokenizer = load_tokenizer(cfg.models.policy)
            if cfg.chat_format is not None:  # a model without a usable chat template stops the round here
                end_of_turn(tokenizer, cfg.models.policy, cfg.chat_format)
            model = load_policy(cfg.models.policy)
            released = AutoConfig.from_pretrained(cfg.models.policy)
            if released.model_type != model.config.model_type:  # an image-text model: its language model alone
                print(f"models.policy {cfg.models.policy} is an image-text model ({released.model_type}): its language "
                      f"model ({type(model).__name__}) is the base, trained and registered as a text model; "
                      "the vision and audio towers are left out")
                mlflow.log_param("base_model_language_model", type(model).__name__)
            problem = None if cfg.models.reward else reward_head_problem(model.config)
            if problem:  # the reward model starts from this one: said now, before any feedback is collected
                raise StageError(f"models.policy {cfg.models.policy}: {problem}")
            mlflow.log_param("base_model", cfg.models.policy)
        else:
            lines = scenario.corpus(cfg.pretrain.n_sentences, cfg.pretrain.neutral_rate, cfg.seed)
            # Save, then reload: the tokenizer goes through the same from_pretrained path as a user's.
            with tempfile.TemporaryDirectory() as tmp:
                train_tokenizer(lines, cfg.pretrain.vocab_size).save_pretrained(tmp)
                tokenizer = load_tokenizer(tmp)
            model, losses = train_model(tokenizer, lines, cfg.pretrain, cfg.seed)
            mlflow.log_params({f"pretrain.{k}": v for k, v in cfg.pretrain.model_dump().items()})
            for step, loss in enumerate(losses):
                if step % 10 == 0 or step == len(losses) - 1:
                    mlflow.log_metric("pretrain/loss", loss, step=step)
        if ws.base_model.exists():
            shutil.rmtree(ws.base_model)
        save(model, tokenizer, ws.base_model)


if __name__ == "__main__":
    stage_main(run)
