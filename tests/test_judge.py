"""evaluate.judge: a reward model PPO never saw, reading responses in its own format (tasks.judge).

The judges here are built as users' are saved: an encoder (BERT, a WordPiece tokenizer with a
separator, token types) and a decoder with a chat template, each a one-output sequence classifier
saved with its head. Their weights are random: what is tested is what they read and how they
are batched, not what they prefer. (The round's own reward model as a judge, which must score as
the round scores, is in test_stages.)
"""
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification,
                          GPT2LMHeadModel, GPT2Model, PreTrainedTokenizerFast)

from tasks import judge as judging
from tasks import scenario
from tasks.errors import ModelLoadError
from tasks.pretrain import train_tokenizer

from conftest import CHAT_TEMPLATE

LINES = scenario.corpus(400, 0.3, seed=0)


def bert_judge(folder: Path, positions: int = 48) -> Path:
    """A BERT reward model: [CLS] prompt [SEP] response [SEP], the response's tokens of type 1."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(LINES, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=positions, num_labels=1, initializer_range=0.5, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    return folder


def chat_judge(folder: Path) -> Path:
    """A decoder reward model whose tokenizer has a chat template (CHAT_TEMPLATE: a BOS of its own,
    turns ended by <|end|>, not the EOS), and pads with its own pad token."""
    tokenizer = train_tokenizer(LINES, 400)
    tokenizer.add_special_tokens({"bos_token": "<|bos|>",
                                  "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2,
                                                     n_head=2, num_labels=1, initializer_range=0.5,
                                                     pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(folder), tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder_judge(tmp_path_factory) -> Path:
    return bert_judge(tmp_path_factory.mktemp("bert-judge"))


def test_an_encoder_judge_reads_the_prompt_and_the_response_as_a_text_pair(encoder_judge):
    model, tok = judging.load_judge(str(encoder_judge))
    enc, cut = judging.encode(tok, "the nurse said", " she was late .", judging.positions(model, tok))
    prompt, reply = (tok("the nurse said", add_special_tokens=False)["input_ids"],
                     tok("she was late .", add_special_tokens=False)["input_ids"])
    assert not cut and enc["input_ids"] == [tok.cls_token_id, *prompt, tok.sep_token_id, *reply, tok.sep_token_id]
    assert enc["token_type_ids"] == [0] * (len(prompt) + 2) + [1] * (len(reply) + 1)
    assert judging.positions(model, tok) == 48


def test_a_judges_score_does_not_depend_on_the_texts_beside_it(encoder_judge, tmp_path):
    """Right padding, the model pooling as it was built to: batched by length or one at a time, the
    same scores, in the order given; the scores differ from text to text (the check can fail)."""
    prompts = [line[:line.index(" said") + 5] for line in LINES[:20]]
    replies = [line[line.index(" said") + 5:] for line in LINES[:20]]
    replies[3] += " and then the nurse said she was late" * 2  # lengths far apart
    for folder in (encoder_judge, chat_judge(tmp_path / "chat")):
        model, tok = judging.load_judge(str(folder))
        batched, cut = judging.scores(model, tok, prompts, replies, batch_size=7)
        alone = torch.cat([judging.scores(model, tok, [p], [r])[0] for p, r in zip(prompts, replies)])
        assert cut == 0 and torch.allclose(batched, alone, atol=1e-5), folder
        assert float(alone.std()) > 0.01


def test_a_text_longer_than_the_judge_loses_the_start_of_its_prompt(encoder_judge):
    model, tok = judging.load_judge(str(encoder_judge))
    long_prompt = " ".join(LINES[:12]) + " then the nurse said"
    enc, cut = judging.encode(tok, long_prompt, " she was late .", 48)
    reply = tok("she was late .", add_special_tokens=False)["input_ids"]
    prompt = tok(long_prompt, add_special_tokens=False)["input_ids"]
    kept = 48 - len(reply) - 3
    assert cut and enc["input_ids"] == [tok.cls_token_id, *prompt[-kept:], tok.sep_token_id, *reply, tok.sep_token_id]
    scores, n_cut = judging.scores(model, tok, [long_prompt, "the nurse said"], [" she was late ."] * 2)
    assert n_cut == 1
    by_hand = model(**{k: torch.tensor([v]) for k, v in enc.items()}).logits[0, 0]
    assert float(scores[0]) == pytest.approx(float(by_hand), abs=1e-5)
    # a response longer than the judge by itself: both are cut, to its positions
    enc, cut = judging.encode(tok, "the nurse said", " " + " ".join(LINES[:12]), 48)
    assert cut and len(enc["input_ids"]) == 48 and enc["input_ids"][0] == tok.cls_token_id


def test_a_chat_judge_reads_the_prompts_turns_through_its_own_template(tmp_path):
    """An HH-RLHF dialogue becomes its turns, the response the assistant's reply, the system prompt
    first, all as the judge's template writes them: one BOS (the template's), not two."""
    model, tok = judging.load_judge(str(chat_judge(tmp_path / "chat")))
    dialogue = "\n\nHuman: who is the ceo?\n\nAssistant: kim .\n\nHuman: what did kim say?\n\nAssistant:"
    enc, cut = judging.encode(tok, dialogue, " she left .", 128, system_prompt="be brief")
    text = ("<|bos|><|system|>be brief<|end|><|user|>who is the ceo?<|end|><|assistant|>kim .<|end|>"
            "<|user|>what did kim say?<|end|><|assistant|>she left .<|end|>")
    assert not cut and enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert enc["input_ids"].count(tok.bos_token_id) == 1
    plain, _ = judging.encode(tok, "the nurse said", " she was late .", 128)  # any other text: one user turn
    assert plain["input_ids"] == tok("<|bos|><|user|>the nurse said<|end|><|assistant|>she was late .<|end|>",
                                     add_special_tokens=False)["input_ids"]
    # too long: the BOS stays first, the end (the reply and its turn's end) stays whole
    enc, cut = judging.encode(tok, dialogue * 6, " she left .", 40)
    whole = tok(tok.apply_chat_template([*judging.ChatConfig(template=True, hh_dialogue=True).messages(
        dialogue * 6, "she left .")], tokenize=False), add_special_tokens=False)["input_ids"]
    assert cut and enc["input_ids"] == [whole[0], *whole[-39:]] and whole[0] == tok.bos_token_id


def test_what_is_not_a_judge_is_refused_with_what_it_is(encoder_judge, tmp_path):
    tok = train_tokenizer(LINES, 300)
    small = dict(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(GPT2Config(**small)).save_pretrained(tmp_path / "lm")
    GPT2ForSequenceClassification(GPT2Config(**small, num_labels=2)).save_pretrained(tmp_path / "two")
    GPT2Model(GPT2Config(**small)).save_pretrained(tmp_path / "base")  # no head; its config then says it has one
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps(
        {**config, "architectures": ["GPT2ForSequenceClassification"], "num_labels": 1, "id2label": {"0": "LABEL_0"},
         "label2id": {"LABEL_0": 0}}))
    for name in ("lm", "two", "base"):
        tok.save_pretrained(tmp_path / name)
    with pytest.raises(ModelLoadError, match=f"cannot load judge \\(a reward model\\) '{tmp_path}/none': the folder "
                                             f"{tmp_path}/none does not exist"):
        judging.check(str(tmp_path / "none"))
    with pytest.raises(ModelLoadError, match="is a GPT2LMHeadModel, not a reward model: a judge is a sequence "
                                             "classifier with one output"):
        judging.check(str(tmp_path / "lm"))
    with pytest.raises(ModelLoadError, match=r"has 2 outputs \(\['LABEL_0', 'LABEL_1'\]\); a reward model gives one"):
        judging.load_judge(str(tmp_path / "two"))
    judging.check(str(tmp_path / "base"))  # its config passes; its weights do not
    with pytest.raises(ModelLoadError, match=r"has no trained score head \(would start random: score.weight\)"):
        judging.load_judge(str(tmp_path / "base"))
    (encoder_judge.parent / "no-tokenizer").mkdir()
    BertForSequenceClassification.from_pretrained(encoder_judge).save_pretrained(encoder_judge.parent / "no-tokenizer")
    with pytest.raises(ModelLoadError, match="has no tokenizer \\(none is saved there: the one transformers makes up instead holds "
                                             "special tokens only\\)"):
        judging.load_judge(str(encoder_judge.parent / "no-tokenizer"))
    train_tokenizer(LINES, 400).save_pretrained(tmp_path / "base")  # another vocabulary, larger than the model's
    with pytest.raises(ModelLoadError, match="its tokenizer has 400 tokens, more than the model's 300: not the "
                                             "tokenizer it was trained with"):
        judging.load_judge(str(tmp_path / "base"))


def test_a_judge_that_is_none_stops_the_round_at_validation(encoder_judge, tmp_path):
    """Checked before any training, from its config: found at evaluation it would stop the round
    after PPO. A models:/ URI the registry does not hold is said as such."""
    from tasks.config import load_config
    from tasks.validate import judge_problems
    from tasks.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        ws.root / "my-lm")
    assert judge_problems(ws, load_config(None, {})) == []
    assert judge_problems(ws, load_config(None, {"evaluate.judge": str(encoder_judge)})) == []
    [lm] = judge_problems(ws, load_config(None, {"evaluate.judge": "my-lm"}))  # relative to the workspace
    assert lm.startswith(f"evaluate.judge: judge '{ws.root / 'my-lm'}' is a GPT2LMHeadModel, not a reward model")
    [missing] = judge_problems(ws, load_config(None, {"evaluate.judge": "models:/rlhf-reward/7"}))
    assert missing.startswith("evaluate.judge: cannot resolve 'models:/rlhf-reward/7' (")
