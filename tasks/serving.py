"""The MLflow pyfunc wrapper of our models (MLflow "models from code": nothing is pickled).

    policy = mlflow.pyfunc.load_model("models:/rlhf-policy@champion")
    policy.predict(["the ceo said"])  # -> ["the ceo said they were late ."]

A reward model's predict takes a DataFrame with `prompt` and `response` and returns scores.
A model trained with chat.template reads each prompt as a user turn of its chat template,
and the policy returns the assistant's reply alone.
"""
from __future__ import annotations

import mlflow
import pandas as pd


class HFModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from tasks.config import ChatConfig
        from tasks.modeling import load_policy, load_reward, load_tokenizer

        folder = context.artifacts["hf_model"]
        self.kind = (context.model_config or {}).get("kind", "policy")
        chat = (context.model_config or {}).get("chat")
        self.chat = ChatConfig(**chat) if chat else None
        self.tokenizer = load_tokenizer(folder, self.chat)
        if self.kind == "policy":
            self.model = load_policy(folder).eval()
        else:
            self.model = load_reward(folder, self.tokenizer.pad_token_id).eval()

    def predict(self, context, model_input, params=None):
        params = params or {}
        if self.kind == "policy":
            from tasks.modeling import generate_texts

            prompts = _column(model_input, "prompt")
            responses = generate_texts(self.model, self.tokenizer, prompts,
                                       int(params.get("max_new_tokens", 32)),
                                       float(params.get("temperature", 1.0)), int(params.get("seed", 0)),
                                       chat=self.chat)
            return responses if self.chat is not None else [p + r for p, r in zip(prompts, responses)]
        from tasks.modeling import score_texts  # left-padded batch, positions from the mask

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return score_texts(self.model, self.tokenizer, [str(p) for p in frame["prompt"]],
                           [str(r) for r in frame["response"]], chat=self.chat).tolist()


def _column(model_input, name: str) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        return [str(x) for x in (model_input[name] if name in model_input else model_input.iloc[:, 0])]
    if isinstance(model_input, str):
        return [model_input]
    return [str(x) for x in model_input]


mlflow.models.set_model(HFModel())
