"""Chat models (params.yaml `chat`): a prompt is a user turn of the tokenizer's chat template, a
response the assistant's reply ended by the template's end-of-turn token; the reward model is
trained on, and PPO and evaluation score, the same tokens."""
import json
import shutil

import mlflow
import pytest
import torch

from tasks import scenario
from tasks.collect import annotate, sample_pairs
from tasks.config import HH_TURN, ChatConfig, load_config
from tasks.errors import ModelLoadError
from tasks.evaluate import evaluate
from tasks.modeling import (encode_prompt, encode_sequence, generate_texts, load_policy, load_reward, load_tokenizer,
                            score_texts)
from tasks.train_policy import build_trainer
from tasks.train_reward import pairwise_accuracy, train

from conftest import CHAT_TEMPLATE, FAST, HH_RLHF

CHAT = ChatConfig(template=True)


def chat_cfg(model_dir, **overrides):
    return load_config(None, {**FAST, "models.policy": str(model_dir), "chat.template": True, **overrides})


def test_a_chat_prompt_is_one_user_turn_with_one_bos(tiny_chat_model_dir):
    plain, chat = load_tokenizer(tiny_chat_model_dir), load_tokenizer(tiny_chat_model_dir, chat=CHAT)
    assert plain.eos_token == "<|endoftext|>" and chat.eos_token == "<|end|>"  # the end of the assistant's turn
    ids = encode_prompt(chat, "the doctor said", chat=CHAT)
    assert chat.convert_ids_to_tokens(ids) == ["<|bos|>", "<|user|>", *chat.tokenize("the doctor said"), "<|end|>",
                                               "<|assistant|>"]
    # the pitfall: the rendered template encoded as text gets the tokenizer's BOS on top of its own
    rendered = chat.apply_chat_template([{"role": "user", "content": "the doctor said"}], add_generation_prompt=True,
                                        tokenize=False)
    assert chat(rendered)["input_ids"][:2] == [chat.bos_token_id] * 2
    # the reward model reads the prompt as the policy gets it, the reply, and the end of the turn
    reply = chat(" he was late .", add_special_tokens=False)["input_ids"]
    assert encode_sequence(chat, "the doctor said", " he was late .", chat=CHAT) == ids + reply + [chat.eos_token_id]
    # without the option, text is encoded as written (the tokenizer's BOS, no turns)
    assert encode_prompt(plain, "the doctor said") == plain("the doctor said")["input_ids"]
    assert encode_sequence(plain, "the doctor said", " he", chat=None) == plain("the doctor said he<|endoftext|>")[
        "input_ids"]


# The turn layouts of real chat templates (Qwen2.5's without its tools branch, Llama 3's, Gemma's),
# with the special tokens they need added to the tiny tokenizer.
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
         "else message['role'] %}<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize("template,specials,turn_end,opened", [
    (QWEN, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_start|>assistant\n"),
    (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", "<start_of_turn>model\n"),
], ids=["qwen2.5", "llama3", "gemma"])
def test_real_templates_end_the_turn_with_their_token(tiny_chat_model_dir, tmp_path, template, specials, turn_end,
                                                      opened):
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path)
    chat = load_tokenizer(tmp_path, chat=CHAT)
    assert chat.eos_token == turn_end
    ids = encode_prompt(chat, "the doctor said", chat=CHAT)
    text = chat.decode(ids)
    assert f"the doctor said{turn_end}" in text and text.endswith(opened)  # the user's turn, then the assistant's
    assert ids.count(chat.bos_token_id) == (0 if template is QWEN else 1)
    reply = encode_sequence(chat, "the doctor said", " he was late .", chat=CHAT)
    assert chat.decode(reply[len(ids):]) == " he was late ." + turn_end


def test_hh_rlhf_dialogues_become_their_turns(tiny_chat_model_dir, tmp_path):
    from tasks.importers import READERS
    from tasks.modeling import render
    from tasks.records import PreferenceRecord

    records = [r for r in READERS["hh-rlhf"](HH_RLHF, {}, 0) if isinstance(r, PreferenceRecord)]
    chat = ChatConfig(template=True, hh_dialogue=True)
    for r in records:  # every imported HH-RLHF prompt is a dialogue of alternating turns, the user's last
        turns = chat.messages(r.prompt)
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"]
        words = " ".join(t["content"] for t in turns).split()  # every word kept, the markers gone
        assert words == " ".join(HH_TURN.split(r.prompt)[2::2]).split()
        assert not any("\n\nHuman:" in t["content"] or "\n\nAssistant:" in t["content"] for t in turns)
    dialogue = next(r.prompt for r in records if r.prompt.count("\n\nHuman:") == 3)
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN
    tokenizer.save_pretrained(tmp_path)
    text = render(load_tokenizer(tmp_path, chat), chat, dialogue)
    assert text.count("<|im_start|>user\n") == 3 and text.count("<|im_start|>assistant\n") == 3  # 2 + the open one
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "Human:" not in text
    # other prompts stay one user turn; without the option a dialogue is one user message as written
    assert chat.messages("the doctor said") == [{"role": "user", "content": "the doctor said"}]
    assert chat.messages("\n\nHuman: a\n\nHuman: b\n\nAssistant:") == [{"role": "user", "content": "a\n\nb"}]
    assert chat.messages("Human: a\n\nAssistant:") == [{"role": "user", "content": "Human: a\n\nAssistant:"}]
    assert CHAT.messages(dialogue) == [{"role": "user", "content": dialogue}]


@pytest.mark.parametrize("template,specials", [
    (QWEN, ["<|im_start|>", "<|im_end|>"]),
    (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
], ids=["qwen2.5", "llama3"])
def test_an_imported_conversation_is_encoded_as_the_template_renders_it(tiny_chat_model_dir, tmp_path, template,
                                                                        specials):
    """A conversation imported from TRL's conversational format (system turn, earlier turns) reaches the
    reward model as the tokens the template gives the original conversation."""
    from tasks.importers import from_conversation

    tokenizer = load_tokenizer(tiny_chat_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path)
    conversation = [{"role": "system", "content": "Answer in one sentence."},
                    {"role": "user", "content": "the doctor said"}, {"role": "assistant", "content": "he was late ."},
                    {"role": "user", "content": "the pilot said"}]
    chosen, rejected = {"role": "assistant", "content": "they were late ."}, {"role": "assistant", "content": "no ."}
    texts = from_conversation(None, conversation + [chosen], conversation + [rejected])
    chat = ChatConfig(template=True, hh_dialogue=True)
    tok = load_tokenizer(tmp_path, chat)
    ids = encode_sequence(tok, texts["prompt"], texts["chosen"], chat=chat)
    assert tok.decode(ids) == tok.apply_chat_template(conversation + [chosen], tokenize=False).removesuffix("\n")
    assert tok.decode(encode_prompt(tok, texts["prompt"], chat=chat)) == tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)


BAD_TEMPLATES = [
    (None, "has no chat template"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}",
     "does not end an assistant's turn with a special token"),
    ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
     "does not end an assistant's turn with a special token"),
    ("{{ raise_exception('only one user turn') }}", "cannot render a user turn and an assistant turn"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "cannot render"),
]


@pytest.mark.parametrize("template,expected", BAD_TEMPLATES)
def test_a_tokenizer_without_a_usable_chat_template_is_named(tiny_chat_model_dir, tmp_path, template, expected):
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(tiny_chat_model_dir / "config.json", tmp_path)
    with pytest.raises(ModelLoadError, match=expected) as e:
        load_tokenizer(tmp_path, chat=CHAT)
    assert str(tmp_path) in str(e.value)
    load_tokenizer(tmp_path)  # without the option the tokenizer is fine


def test_a_system_prompt_and_template_variables_reach_every_prompt(tiny_chat_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_chat_model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "<|assistant|>{% endif %}", "<|assistant|>{% if short is defined and short %} briefly :{% endif %}{% endif %}")
    tokenizer.save_pretrained(tmp_path / "a")
    chat = ChatConfig(template=True, system_prompt="be kind", template_kwargs={"short": True})
    tok = load_tokenizer(tmp_path / "a", chat)
    ids = encode_prompt(tok, "the doctor said", chat)
    assert tok.decode(ids) == "<|bos|><|system|>be kind<|end|><|user|>the doctor said<|end|><|assistant|> briefly :"
    assert encode_sequence(tok, "the doctor said", " he", chat)[:len(ids)] == ids
    assert tok.decode(encode_prompt(tok, "the doctor said", CHAT)) == "<|bos|><|user|>the doctor said<|end|><|assistant|>"
    # a template that refuses a system turn says so, naming the model
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                               "{% endif %}" + CHAT_TEMPLATE)
    tokenizer.save_pretrained(tmp_path / "b")
    with pytest.raises(ModelLoadError, match="cannot render a system, a user and an assistant turn .*System role not "
                                             "supported"):
        load_tokenizer(tmp_path / "b", chat)
    assert load_tokenizer(tmp_path / "b", CHAT).eos_token == "<|end|>"


@pytest.fixture(scope="module")
def chat_records(tiny_chat_model_dir) -> list[dict]:
    triples = sample_pairs(str(tiny_chat_model_dir), scenario.feedback_prompts(), 96, 10, 1.0, seed=1, chat=CHAT)
    return [json.loads(r.to_json()) for r in annotate(triples, 1, None, 3.0, seed=1) if r.label == "pair"]


def test_chat_samples_end_at_the_end_of_the_turn(tiny_chat_model_dir, chat_records):
    assert len(chat_records) > 100
    replies = [r[k] for r in chat_records for k in ("chosen", "rejected")]
    assert all("<|" not in r for r in replies)  # no template token leaks into a reply
    # the model ends its turn within 10 tokens; read as plain text it rarely writes a clean sentence
    tokenizer = load_tokenizer(tiny_chat_model_dir, chat=CHAT)
    chat_ids = [encode_prompt(tokenizer, p, chat=CHAT) for p in scenario.heldout_prompts()]
    out = generate_texts(load_policy(tiny_chat_model_dir), tokenizer, scenario.heldout_prompts() * 8, 10, 1.0, seed=0,
                         chat=CHAT)
    assert len({len(i) for i in chat_ids}) == 1
    fluent = sum(scenario.judge(t).fluent for t in out) / len(out)
    plain = generate_texts(load_policy(tiny_chat_model_dir), load_tokenizer(tiny_chat_model_dir),
                           scenario.heldout_prompts() * 8, 10, 1.0, seed=0)
    assert fluent > 0.8 and fluent > sum(scenario.judge(t).fluent for t in plain) / len(plain) + 0.3


def test_reward_model_ppo_and_evaluation_read_a_chat_pair_alike(tiny_chat_model_dir, chat_records, tmp_path):
    cfg = chat_cfg(tiny_chat_model_dir)
    reward_dir = tmp_path / "reward"
    metrics = train(str(tiny_chat_model_dir), str(tiny_chat_model_dir), chat_records, cfg, reward_dir)
    assert metrics["too_long"] == 0 and metrics["held_out"]["n"] > 10
    assert metrics["held_out"]["accuracy"] > 0.6, metrics["held_out"]
    # it was trained on the pairs in the template: it fits them better so than as plain text
    plain = load_tokenizer(reward_dir)
    reward = load_reward(reward_dir, plain.pad_token_id)
    as_chat = pairwise_accuracy(reward, load_tokenizer(reward_dir, chat=CHAT), chat_records, chat=CHAT)["loss"]
    as_plain = pairwise_accuracy(reward, plain, chat_records, chat=None)["loss"]
    assert as_chat < as_plain - 0.02, (as_chat, as_plain)
    trainer, tokenizer = build_trainer(str(tiny_chat_model_dir), str(tiny_chat_model_dir), str(reward_dir),
                                       scenario.feedback_prompts(), cfg, seed=0)
    assert trainer.eos_id == tokenizer.convert_tokens_to_ids("<|end|>")
    assert trainer.prompts == [encode_prompt(tokenizer, p, chat=CHAT) for p in scenario.feedback_prompts()]
    # PPO's score of a rollout (the reward model's, before normalization) is evaluation's score of its decoded
    # reply: the same tokens, the same number
    ro = trainer.rollout()
    prompts, replies, expected = [], [], []
    for ids, mask, response, score in zip(ro.prompt_ids, ro.prompt_mask, ro.responses, ro.raw_scores):
        prompt = scenario.feedback_prompts()[trainer.prompts.index(ids[mask.bool()].tolist())]
        reply = tokenizer.decode(response, skip_special_tokens=True)
        ended = response.tolist().index(tokenizer.eos_token_id) if tokenizer.eos_token_id in response else None
        if ended is not None and encode_sequence(tokenizer, prompt, reply, chat=CHAT) == (
                ids[mask.bool()].tolist() + response[:ended + 1].tolist()):
            prompts.append(prompt), replies.append(reply), expected.append(float(score))
    assert len(prompts) >= 0.9 * len(ro.raw_scores)
    reward = load_reward(reward_dir, tokenizer.pad_token_id)
    assert torch.allclose(score_texts(reward, tokenizer, prompts, replies, chat=CHAT), torch.tensor(expected),
                          atol=1e-4)
    # a few PPO steps raise that score, and replies keep ending their turn
    history = trainer.train()
    assert sum(h["objective/scores"] for h in history[-5:]) / 5 > sum(h["objective/scores"] for h in history[:3]) / 3
    assert history[-1]["response/length"] < cfg.ppo.max_new_tokens
    policy_dir = tmp_path / "policy"
    trainer.policy.lm.save_pretrained(policy_dir), tokenizer.save_pretrained(policy_dir)
    report, table = evaluate(str(policy_dir), str(tiny_chat_model_dir), str(tiny_chat_model_dir), str(reward_dir),
                             scenario.heldout_prompts(), 8, 1.0, cfg.ppo.max_new_tokens, seed=0, chat=CHAT)
    assert report["candidate/length_tokens"] < cfg.ppo.max_new_tokens and report["win_rate/rate"] > 0.5
    assert all("<|" not in row["candidate"] for row in table)


def test_a_served_chat_model_answers_with_its_reply(tiny_chat_model_dir, tmp_path):
    from tasks import tracking

    served = ChatConfig(template=True, system_prompt="be brief", template_kwargs={"short": True})
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("chat", (tmp_path / "artifacts").as_uri()))
        with mlflow.start_run():
            version = tracking.log_model(tiny_chat_model_dir, "policy", "chat-policy", chat=served).version
        replies = mlflow.pyfunc.load_model(f"models:/chat-policy/{version}").predict(["the ceo said", "the nurse said"])
    finally:
        mlflow.set_tracking_uri(before)
    tokenizer = load_tokenizer(tiny_chat_model_dir, chat=served)
    assert replies == generate_texts(load_policy(tiny_chat_model_dir), tokenizer, ["the ceo said", "the nurse said"],
                                     32, 1.0, seed=0, chat=served)  # the served defaults, the system turn
    assert replies != generate_texts(load_policy(tiny_chat_model_dir), tokenizer, ["the ceo said", "the nurse said"],
                                     32, 1.0, seed=0, chat=CHAT)
    assert all(not r.startswith("the ") and len(r) > 3 for r in replies)  # the reply alone, not the prompt continued


def test_the_token_bound_of_validation_counts_the_template(tiny_chat_model_dir, tmp_path):
    from tasks.config import ValidateConfig
    from tasks.modeling import pair_token_length
    from tasks.validate import validate_files

    from test_validate import clean_records, write

    records = clean_records(30)
    plain, chat = load_tokenizer(tiny_chat_model_dir), load_tokenizer(tiny_chat_model_dir, chat=CHAT)
    lengths = [pair_token_length(plain, r.prompt, r.chosen, r.rejected) for r in records]
    chat_lengths = [pair_token_length(chat, r.prompt, r.chosen, r.rejected, chat=CHAT) for r in records]
    assert [c - n for c, n in zip(chat_lengths, lengths)] == [3] * 30  # <|user|>, <|end|>, <|assistant|>
    bound = sorted(lengths)[-3]  # the longest 2 pairs as text, and a few more in the template, exceed it
    files = [write(tmp_path / "a.jsonl", records)]
    cfg = ValidateConfig(max_tokens=bound, min_rows=1)
    as_text = validate_files(files, cfg, tmp_path / "gx", tokenizer=plain)
    in_template = validate_files(files, cfg, tmp_path / "gx2", tokenizer=chat, chat=CHAT)
    assert len(as_text.quarantined) == sum(n > bound for n in lengths) < len(in_template.quarantined)
    assert len(in_template.quarantined) == sum(n > bound for n in chat_lengths)
    assert {tuple(q["reasons"]) for q in in_template.quarantined} == {("longer than max_tokens",)}
