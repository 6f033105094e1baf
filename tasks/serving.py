"""The MLflow pyfunc wrapper of our models (MLflow "models from code": nothing is pickled).

    policy = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    policy.predict(["the ceo said"])  # -> ["the ceo said they were late ."]
    policy.predict(["the ceo said"], params={"max_new_tokens": 20, "temperature": 0})  # greedy

A reward model's predict takes `prompt` and `response` (a DataFrame, records or a dict of lists)
and returns scores. Both are logged with their signature, so `mlflow models serve` takes
{"inputs": [...], "params": {...}} and the MLflow UI shows what goes in and out.
A model trained with chat.template reads each prompt as a user turn of its chat template,
and the policy returns the assistant's reply alone.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException


class HFModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from tasks.config import ChatConfig
        from tasks.modeling import compute_device, load_policy, load_reward, load_tokenizer

        folder = context.artifacts["hf_model"]
        settings = json.loads(Path(context.artifacts["serving"]).read_text())  # tracking.log_model wrote it
        self.kind, chat = settings["kind"], settings["chat"]
        self.chat = ChatConfig(**chat) if chat else None
        self.tokenizer = load_tokenizer(folder, self.chat)
        if self.kind == "policy":
            self.model = load_policy(folder)
        else:
            self.model = load_reward(folder, self.tokenizer.pad_token_id)
        self.model = self.model.to(compute_device()).eval()  # served from the GPU where there is one

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list:
        """MLflow has checked the input against the logged signature (tracking.signature) and filled
        in the params' defaults; what it cannot check is refused here, as an MlflowException, whose
        message the REST server answers with (any other error becomes a generic one)."""
        if self.kind == "policy":
            from tasks.modeling import encode_prompt, generate_texts, max_positions

            prompts = _texts(model_input, model_input.columns[0])
            max_new_tokens, temperature = int(params["max_new_tokens"]), float(params["temperature"])
            if max_new_tokens < 1:
                raise _refused(f"max_new_tokens must be at least 1, got {max_new_tokens}")
            limit = max_positions(self.model.config)
            longest = max((len(encode_prompt(self.tokenizer, p, self.chat)) for p in prompts), default=0)
            if limit is not None and longest + max_new_tokens > limit:
                raise _refused(f"a prompt of {longest} tokens and max_new_tokens {max_new_tokens} exceed the "
                               f"model's {limit} positions: shorten the prompt or lower max_new_tokens")
            if not (math.isfinite(temperature) and temperature >= 0):
                raise _refused(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
            responses = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens, temperature,
                                       int(params["seed"]), chat=self.chat)
            return responses if self.chat is not None else [p + r for p, r in zip(prompts, responses)]
        from tasks.modeling import score_texts  # left-padded batch, positions from the mask

        prompts, responses = _texts(model_input, "prompt"), _texts(model_input, "response")
        if len(prompts) != len(responses):
            raise _refused(f"{len(prompts)} prompts but {len(responses)} responses: give one response per prompt")
        return score_texts(self.model, self.tokenizer, prompts, responses, chat=self.chat).tolist()


def _refused(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)  # a 400 with this message over REST


def _texts(frame: pd.DataFrame, column) -> list[str]:
    """One text per row, or per item where a row holds a list: MLflow reads {"prompt": ["a", "b"]}
    as one row of lists. A missing text is an error, not the string "None"."""
    texts = []
    for row, cell in enumerate(frame[column]):
        for text in (list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]):
            if not isinstance(text, str):
                raise _refused(f"{column!r} in row {row} is {text!r}, not a text")
            texts.append(text)
    return texts


mlflow.models.set_model(HFModel())
