"""Fast rollouts for GPT-2-family policies: a preallocated KV cache, and on CUDA a graph per step.

Generation is most of a PPO step, and at PPO's batch sizes one decode step of a small model is
a few hundred tiny kernels: eager PyTorch spends its time launching them. This decoder keeps
the KV cache in fixed buffers (B, heads, P + T, head_dim) per layer, so every decode step has
the same shapes and addresses; on CUDA it records one step into a CUDA graph once and replays
it, one launch per token. The weights are read in place, so an optimizer step between
rollouts needs no new capture.

It reuses the model's own modules (embeddings, layer norms, projections, MLP, LM head); only
the cached attention is written here. `sample` in rollout.py is the general path (any causal
LM, HF's dynamic cache); `supports(lm)` says whether this one applies. Imports torch and
transformers only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tasks.ppo.rollout import position_ids_from_mask, sample_token


def supports(lm: nn.Module) -> bool:
    """GPT-2 layout with the attention this file implements (scaled by 1/sqrt(head_dim) only)."""
    cfg = getattr(lm, "config", None)
    return (getattr(cfg, "model_type", None) == "gpt2" and hasattr(lm, "transformer")
            and getattr(cfg, "scale_attn_weights", True) and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
            and not getattr(cfg, "reorder_and_upcast_attn", False) and not getattr(cfg, "add_cross_attention", False))


class StaticDecoder:
    """Samples responses with a fixed-size KV cache; `use_graph` (CUDA only) replays a captured step.

    Shapes are fixed per instance (batch B, prompt width P, response length T): the trainer
    pads every batch's prompts to the longest prompt it has, so one instance serves a whole run.
    """

    def __init__(self, lm: nn.Module, batch: int, prompt_len: int, max_new_tokens: int,
                 use_graph: bool | None = None, autocast_dtype: torch.dtype | None = None):
        if not supports(lm):
            raise ValueError(f"StaticDecoder supports GPT-2-family models, not {type(lm).__name__}")
        self.lm, self.tr = lm, lm.transformer
        self.B, self.P, self.T = batch, prompt_len, max_new_tokens
        self.L = prompt_len + max_new_tokens
        if self.L > lm.config.n_positions:
            raise ValueError(f"prompt {prompt_len} + response {max_new_tokens} tokens exceed the model's "
                             f"{lm.config.n_positions} positions")
        device = self.tr.wte.weight.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.autocast_dtype = autocast_dtype
        n_head = lm.config.n_head
        head_dim = lm.config.n_embd // n_head
        dtype = autocast_dtype or self.tr.wte.weight.dtype
        shape = (batch, n_head, self.L, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.tr.h]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.tr.h]
        # Per-step state, all in fixed buffers so the captured graph can read and advance it.
        self.mask = torch.zeros(batch, 1, 1, self.L, dtype=torch.bool, device=device)  # True = may attend
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # cache column of the token fed in
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # its position id per row
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # the token fed in
        self.logits = torch.zeros(batch, lm.config.vocab_size, dtype=torch.float32, device=device)
        # The LM head reads a copy of its weight padded to a multiple of 64 rows, refreshed once per
        # rollout: GPT-2's 50257 rows leave cuBLAS only slow unaligned bf16 kernels (measured 281 us
        # against about 15 us per step on an H100), and the copy is already in the compute dtype.
        V = lm.config.vocab_size
        self.head = torch.zeros(-(-V // 64) * 64, lm.config.n_embd, dtype=dtype, device=device)
        self.gelu_tanh = lm.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.graph: torch.cuda.CUDAGraph | None = None

    def _autocast(self):
        device_type = self.tr.wte.weight.device.type
        # cache_enabled=False: a graph must not capture autocast's weight cache (stale after an update)
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_tanh:  # GPT-2's gelu_new is the tanh GELU: one fused kernel instead of seven
            return mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
        return mlp(x)

    def _blocks(self, h: torch.Tensor, write, attn_mask: torch.Tensor, decode: bool) -> torch.Tensor:
        """The transformer blocks; `write(layer, k, v)` stores new keys/values and returns the cache to attend."""
        for i, block in enumerate(self.tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
            B, S, _ = q.shape
            q, k, v = (x.view(B, S, attn.num_heads, attn.head_dim).transpose(1, 2) for x in (q, k, v))
            keys, values = write(i, k, v)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            if decode:  # one query per row: plain matmuls beat a fused attention kernel's launch cost here
                scores = (q @ keys.transpose(-1, -2)) * attn.head_dim ** -0.5  # (B, H, 1, L)
                scores = scores.float().masked_fill(~attn_mask, float("-inf"))
                a = torch.softmax(scores, dim=-1).to(values.dtype) @ values
            else:
                a = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask)
            h = h + attn.c_proj(a.transpose(1, 2).reshape(B, S, -1))
            h = h + self._mlp(block.mlp, block.ln_2(h))
        return self.tr.ln_f(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden states -> (B, V) float32 logits, through the padded head copy."""
        return (h.to(self.head.dtype) @ self.head.T)[:, :self.logits.shape[1]].float()

    @torch.no_grad()
    def refresh_head(self) -> None:
        """Copy the LM head's current weights into the padded copy (every rollout: they train)."""
        self.head[:self.logits.shape[1]].copy_(self.lm.lm_head.weight)

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """All prompt tokens at once; fills cache columns [0, P) and returns the next-token logits."""
        P = self.P
        real = prompt_mask.bool()
        pos = position_ids_from_mask(real)
        causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()
        attn_mask = causal[None, None] & real[:, None, None, :]  # (B, 1, P, P)
        # a left-padding row attends to nothing; let it see itself so softmax stays finite (ignored)
        attn_mask = attn_mask | torch.eye(P, dtype=torch.bool, device=real.device)[None, None]

        def write(i, k, v):
            self.k[i][:, :, :P] = k
            self.v[i][:, :, :P] = v
            return k, v

        h = self.tr.wte(prompt_ids) + self.tr.wpe(pos)
        h = self._blocks(h, write, attn_mask, decode=False)
        self.mask.zero_()
        self.mask[:, 0, 0, :P] = real
        self.pos.copy_(real.long().sum(-1))
        self.col.fill_(P)
        return self._logits(h[:, -1])

    def _step(self) -> None:
        """One token per row at column `col`: writes its keys/values, leaves next-token logits in `logits`."""
        self.mask.index_fill_(3, self.col, True)

        def write(i, k, v):
            self.k[i].index_copy_(2, self.col, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, self.col, v.to(self.v[i].dtype))
            return self.k[i], self.v[i]

        h = self.tr.wte(self.token[:, None]) + self.tr.wpe(self.pos[:, None])
        h = self._blocks(h, write, self.mask, decode=True)
        self.logits.copy_(self._logits(h[:, -1]))
        self.col.add_(1)
        self.pos.add_(1)

    def _capture(self) -> None:
        # Warm up on a side stream (cuBLAS handles, workspaces), then record one step. Capture
        # writes into the cache like a real step; sample() runs the prefill again after it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast():
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self._autocast():
            self._step()

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, temperature: float, eos_id: int,
               pad_id: int, generator: torch.Generator | None = None, check_every: int | None = None) -> torch.Tensor:
        """(B, P) left-padded prompts -> (B, T' <= T) responses, pad after EOS; same contract as rollout.sample.

        Stops once every row has ended, checked every `check_every` tokens: on a GPU a check waits
        for the device, so by default every 8 tokens there and every token on a CPU.
        """
        if check_every is None:
            check_every = 8 if prompt_ids.device.type == "cuda" else 1
        if tuple(prompt_ids.shape) != (self.B, self.P):
            raise ValueError(f"this decoder was built for prompts of shape {(self.B, self.P)}, "
                             f"got {tuple(prompt_ids.shape)}")
        self.refresh_head()
        if self.use_graph and self.graph is None:
            self._capture()
        with self._autocast():
            logits = self._prefill(prompt_ids, prompt_mask)
        done = torch.zeros(self.B, dtype=torch.bool, device=prompt_ids.device)
        tokens = torch.full((self.B, self.T), pad_id, dtype=torch.long, device=prompt_ids.device)
        for t in range(self.T):
            next_token = sample_token(logits, temperature, generator)
            next_token = next_token.masked_fill(done, pad_id)
            tokens[:, t] = next_token
            done |= next_token == eos_id
            if t + 1 == self.T or ((t + 1) % check_every == 0 and bool(done.all())):
                return tokens[:, :t + 1]
            self.token.copy_(next_token)
            if self.graph is not None:
                self.graph.replay()
            else:
                with self._autocast():
                    self._step()
            logits = self.logits
        return tokens
