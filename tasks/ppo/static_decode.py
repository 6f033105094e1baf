"""Fast rollouts: a preallocated KV cache, and on CUDA a graph per step (GPT-2, Llama, Granite, Phi-3, Gemma 2,
3 and 4, OLMo 2 and 3, GPT-NeoX).

Generation is most of a PPO step, and at PPO's batch sizes one decode step of a small model is
a few hundred tiny kernels: eager PyTorch spends its time launching them. This decoder keeps
the KV cache in fixed buffers (B, kv_heads, P + T, head_dim) per layer, so every decode step has
the same shapes and addresses; on CUDA it records one step into a CUDA graph once and replays
it, one launch per token. The weights are read in place (or copied in place at each rollout),
so an optimizer step between rollouts needs no new capture.

It reuses the model's own modules (embeddings, norms, projections, MLP, LM head, with any LoRA
adapters on them), but for GPT-2's plain projections, which it reads through copies of its own
laid out for fewer kernels a token (`_Own`); only the cached attention and the layout of a block
are written here, once per family: `_GPT2` (learned positions, fused qkv), `_Llama` (rotary
positions, grouped-query attention; also Mistral, Ministral, Qwen2, Qwen3 and SmolLM3), `_Phi3` (Llama's, with fused
projections and rotary positions on part of each head), `_Granite` (Llama's, with four scalar
multipliers), `_Gemma` (Gemma 2 and 3: Llama's, with more norms and soft-capped logits),
`_Gemma4` (Gemma 3's, with head sizes per layer type, per-layer inputs and layers that read
earlier layers' keys and values), `_Olmo2` (OLMo 2 and 3: Llama's, with norms after attention
and MLP instead of before) and `_NeoX` (Pythia: Phi-3's partial rotary, LayerNorm, attention and
MLP side by side). `sample` in rollout.py is the general path (any causal LM, HF's dynamic
cache); `supports(lm)` says whether this one applies. Under mixed precision (float32 weights,
bf16 autocast) it decodes over bf16 copies of the weights made at each rollout, so the graph
casts nothing per token. Imports torch and transformers only.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from tasks.ppo.rollout import base_model, position_ids_from_mask, sample_token

# one block layout (modular copies in transformers); Ministral 3 (the language model of Mistral's 3B, 8B and 14B)
# scales its queries by position past its original length, which `_fixed_rope` keeps the rollout within
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "ministral", "ministral3")
GEMMA3 = "gemma3_text"  # Gemma 3's text models (270M, 1B; the larger ones' language model)
GEMMA2 = "gemma2"  # Gemma 2 (2B, 9B, 27B): Gemma 3's block without query/key norms, with logit soft-capping
PHI3 = "phi3"  # Phi-3 and Phi-3.5 mini and medium, Phi-4-mini: Llama's block with fused projections
GRANITE = "granite"  # IBM Granite 3 (2B, 8B): Llama's block with multipliers on embeddings, residuals and logits
NEOX = "gpt_neox"  # GPT-NeoX: Pythia (the RLHF literature's models), GPT-NeoX-20B, StableLM-alpha, Dolly
OLMO = ("olmo2", "olmo3")  # AI2's fully open OLMo 2 and 3 (Tulu 3's and OLMo's own RL): norms after, not before
GEMMA4 = "gemma4_text"  # Gemma 4's language model (E2B, E4B, 31B; the 26B-A4B's experts are not covered)
PER_LAYER_ROPE = (GEMMA3, GEMMA4, "olmo3")  # a rotary table per layer type (sliding-window layers, global layers)


def layer_windows(cfg, layers: int) -> list[int | None]:
    """Each layer's sliding window (None: it attends to every earlier token), which the decoder applies as
    HF's masks do, a band over the cache's columns: the sliding-attention layers (`layer_types`: Gemma 2, 3
    and 4, OLMo 3, Qwen2 and Qwen3 when configured), or where a config names no layer types, every layer of
    Mistral, Ministral 3 and Phi-3."""
    window, kinds = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
    if window is None:
        return [None] * layers
    if kinds is None:
        return [window if cfg.model_type in ("mistral", "ministral3", PHI3) else None] * layers
    return [window if kinds[i] == "sliding_attention" else None for i in range(layers)]


def supports(lm: nn.Module, max_len: int | None = None) -> bool:
    """A layout of the families above, with the attention and positions this file implements, their
    sliding windows applied (`layer_windows`).

    Rotary tables are computed once for the whole rollout, so scalings that change with the length
    are declined: dynamic NTK always, and LongRoPE (Phi-3.5, Phi-4-mini) where the rollout reaches
    past the model's original length, where HF switches from its short factors to its long ones
    mid-sequence; within it, the short factors hold throughout, as they do in HF's forward."""
    cfg = getattr(lm, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind == "gpt2":
        return (hasattr(base_model(lm), "transformer")
                and getattr(cfg, "scale_attn_weights", True) and not getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
                and not getattr(cfg, "reorder_and_upcast_attn", False) and not getattr(cfg, "add_cross_attention", False))
    if kind in LLAMA_LIKE or kind in (GEMMA3, GEMMA2, GEMMA4, PHI3, GRANITE, *OLMO):
        rope = getattr(cfg, "rope_parameters", None) or {}
        # one rotary table, or (Gemma 3 and 4, OLMo 3) one per layer type
        ropes = rope.values() if kind in PER_LAYER_ROPE else [rope]
        # EmbeddingGemma's, Gemma 4's "all": not a decoder (Gemma 4's "vision" is causal on text)
        bidirectional = getattr(cfg, "use_bidirectional_attention", None) in (True, "all")
        experts = getattr(cfg, "enable_moe_block", False)  # Gemma 4 26B-A4B: routing no graph can hold
        # Gemma 4's shared keys and values as this file reads them (`kv_sharing_modes`: transformers 5.23;
        # 5.17's config had no such property, and PPO samples it with HF's cache there)
        layout = kind != GEMMA4 or hasattr(type(cfg), "kv_sharing_modes")
        return (hasattr(base_model(lm), "model") and not bidirectional and not experts and layout
                and all(_fixed_rope(r, max_len) for r in ropes))
    if kind == NEOX:
        return hasattr(base_model(lm), "gpt_neox") and _fixed_rope(getattr(cfg, "rope_parameters", None) or {}, max_len)
    return False


def _fixed_rope(rope: dict, max_len: int | None) -> bool:
    """Whether a rotary scaling gives the same table at every length up to `max_len`."""
    kind = rope.get("rope_type", "default")
    # LongRoPE: short factors up to the original length, long ones past it; Ministral 3's query scale
    # (1 + beta * log(1 + floor(position / original length))): 1 up to the original length
    if kind == "longrope" or rope.get("llama_4_scaling_beta"):
        original = rope.get("original_max_position_embeddings")
        return max_len is not None and original is not None and max_len <= original
    return kind != "dynamic"


class _Arch:
    """What every layout below has unless it says otherwise."""

    parallel = False  # attention, then the MLP on its output
    attn_softcap = final_softcap = None  # Gemma 2's (Gemma 3's final one where set): tanh(x / cap) * cap

    def kv_layout(self) -> list[tuple[int, int, int]]:
        """Per layer: key/value heads, head size, and the layer whose cache it reads (itself, but in
        Gemma 4's layers that reuse an earlier layer's keys and values)."""
        return [(self.n_kv, self.head_dim, i) for i in range(len(self.blocks))]

    def q_scale(self, block: nn.Module) -> float | None:
        """What the attention scores still need multiplying by (None: 1 / sqrt(head size); 1.0 where
        `qkv` scaled q already)."""
        return self.scale

    def attention_values(self, block: nn.Module, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A decode step's attention output (B, 1, heads * head_dim) from its probabilities (B, kv_heads,
        groups, L) and the values (B, kv_heads, L, D)."""
        return (p @ values).reshape(p.shape[0], 1, -1)

    def residual_out(self, block: nn.Module, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """h plus the attention's output projection of `a`."""
        return h + self.out(block, a)

    def residual_mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """h plus the block's MLP of it."""
        return h + self.mlp(block, h)

    def block_end(self, i: int, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h  # (Gemma 4 adds its per-layer input and scales the block's output)

    def own_copies(self, dtype: torch.dtype, batch: int) -> set[int]:
        """Makes the decoder's own copies of the weights it reads in another layout (GPT-2's, `_Own`), in
        the compute dtype, for decode steps of `batch` rows; returns the ids of the parameters they
        stand for. None in the other layouts."""
        return set()

    def refresh_copies(self) -> None:
        """Copies the current weights into those copies (at every rollout: the weights train; called
        by `StaticDecoder.refresh`, under no_grad)."""


class _GPT2(_Arch):
    """GPT-2: learned positions added to the embeddings, one qkv projection, LayerNorm, GELU MLP; the
    projections read through the decoder's own copies where they are plain (`_Own`)."""

    def __init__(self, lm: nn.Module, max_len: int):
        cfg, self.tr = lm.config, base_model(lm).transformer
        self.blocks, self.embedding, self.max_positions = list(self.tr.h), self.tr.wte, cfg.n_positions
        self.n_head = self.n_kv = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = None  # SDPA's default, 1 / sqrt(head_dim)
        self.gelu_tanh = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.own: dict[int, _Own] = {}  # id(block) -> its copies

    def own_copies(self, dtype: torch.dtype, batch: int) -> set[int]:
        H, D, device = self.n_head, self.head_dim, self.embedding.weight.device
        # the qkv copies' layout, the same in every block: column (head, part, d) of a copy is column
        # (part, head, d) of c_attn's [q | k | v], and q's columns scaled by 1 / sqrt(head_dim)
        order = torch.arange(3 * H * D, device=device).view(3, H, D).transpose(0, 1).reshape(-1)
        column_scale = torch.ones(H, 3, D, dtype=dtype, device=device)
        column_scale[:, 0] = D ** -0.5
        self.own = {id(b): _Own(b, H, D, self.gelu_tanh, dtype, order, column_scale.view(-1)) for b in self.blocks}
        # a decode step's attention output, head by head with 8 columns more, the first of head 0's
        # 16 (set once: the matmul writes the rest), the others 0 (see `_Own.out_w`)
        self.values_out = torch.zeros(batch * self.n_head, 1, self.head_dim + 8, dtype=dtype,
                                      device=self.embedding.weight.device)
        self.values_out.view(batch, self.n_head, -1)[:, 0, self.head_dim] = 16.0
        return {id(p) for own in self.own.values() for p in own.stands_for()}

    def refresh_copies(self) -> None:
        for own in self.own.values():
            own.refresh()

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.tr.wte(ids) + self.tr.wpe(pos)

    def rotary(self, pos: torch.Tensor) -> None:
        return None  # learned positions, added to the embeddings

    def q_scale(self, block: nn.Module) -> float | None:
        return 1.0 if self.own[id(block)].qkv_w is not None else None

    def qkv(self, block: nn.Module, h: torch.Tensor, rope):
        """q (B, heads, S, D) and keys and values together (2, B, heads, S, D): both views of the
        one projection, so the cache takes keys and values in one copy."""
        own, x = self.own[id(block)], block.ln_1(h)
        B, S, _ = x.shape
        if own.qkv_w is None:  # the module's [q | k | v]
            x = block.attn.c_attn(x).view(B, S, 3, self.n_head, self.head_dim)
            return x[:, :, 0].transpose(1, 2), x[:, :, 1:].permute(2, 0, 3, 1, 4)
        x = torch.addmm(own.qkv_b, x.view(B * S, -1), own.qkv_w).view(B, S, self.n_head, 3, self.head_dim)
        return x[:, :, :, 0].transpose(1, 2), x[:, :, :, 1:].permute(3, 0, 2, 1, 4)

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return block.attn.c_proj(a)

    def attention_values(self, block: nn.Module, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if self.own[id(block)].out_w is None:
            return super().attention_values(block, p, values)
        B, H, D = p.shape[0], self.n_head, self.head_dim  # (GPT-2: as many key/value heads as query heads)
        torch.bmm(p.view(B * H, 1, -1), values.view(B * H, -1, D), out=self.values_out[..., :D])
        return self.values_out.view(B, 1, -1)  # (B, 1, H * (D + 8))

    def residual_out(self, block: nn.Module, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        own = self.own[id(block)]
        if own.out_w is None:
            return h + self.out(block, a)
        if a.shape[-1] == self.n_head * self.head_dim:  # the prompt's pass (SDPA's output): the 16s put in
            a = F.pad(a.view(*a.shape[:-1], self.n_head, self.head_dim), (0, 8))
            a[..., 0, self.head_dim] = 16.0
        h.view(-1, h.shape[-1]).addmm_(a.reshape(h.shape[0] * h.shape[1], -1), own.out_w)  # h + a @ W + bias
        return h

    def mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        mlp, x = block.mlp, block.ln_2(h)
        if self.gelu_tanh:  # GPT-2's gelu_new is the tanh GELU: one fused kernel instead of seven
            return mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
        return mlp(x)

    def residual_mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        own = self.own[id(block)]
        if own.fc_w is None:
            return h + self.mlp(block, h)
        x = block.ln_2(h)
        g = _addmm_gelu(own.fc_b, x.view(-1, x.shape[-1]), own.fc_w)  # (B * S, 4E + 8), column 4E is 16
        h.view(-1, h.shape[-1]).addmm_(g, own.proj_w)  # h + g @ W + 16 * bias / 16, in place
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.tr.ln_f(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the LM head's output as it is


class _Own:
    """The decoder's copies of one GPT-2 block's plain (Conv1D) projections, laid out so that a step
    runs four kernels fewer a block. None where that projection has adapters (LoRA), or where the
    MLP's GELU is not the tanh one: it then runs as the module.
      qkv:  columns grouped head by head (each head's q, k and v side by side), q's scaled by
            1 / sqrt(head_dim) (exactly, for GPT-2's heads of 64): a head's query is then a view
            the scores' matmul reads as it is, with no copy and no scaling;
      out:  the attention's output projection, with 8 rows more after each head's, the first of
            head 0's the bias / 16: a decode step's attention output has a 16 there (`values_out`),
            so the projection adds its bias and the residual in its one matmul (`addmm_`, into the
            residual stream, a tensor of this step's);
      fc:   GELU applied by the matmul itself on CUDA (`_addmm_gelu`), and 8 columns more, the
            first with weight 0 and bias 16, whose GELU is 16 exactly (tanh saturates), the rest 0
            (8: cuBLAS's fast kernels want aligned widths);
      proj: 8 rows more, the first the output bias / 16: the MLP's output projection, as `out`.
    Refreshed from the weights at each rollout; the cast comes before the scaling, so float32
    weights under mixed precision give the copies their bf16 cast gives."""

    def __init__(self, block: nn.Module, n_head: int, head_dim: int, gelu_tanh: bool, dtype: torch.dtype,
                 order: torch.Tensor, column_scale: torch.Tensor):
        self.attn, self.mlp, self.n_head, self.head_dim = block.attn, block.mlp, n_head, head_dim
        self.order, self.column_scale = order, column_scale  # the qkv layout (`_GPT2.own_copies`)
        self.qkv_w = self.qkv_b = self.out_w = self.fc_w = self.fc_b = self.proj_w = None
        E, device = self.attn.c_attn.weight.shape[0], self.attn.c_attn.weight.device
        if type(self.attn.c_attn) is Conv1D:
            self.qkv_w = torch.empty(E, 3 * E, dtype=dtype, device=device)
            self.qkv_b = torch.empty(3 * E, dtype=dtype, device=device)
        if type(self.attn.c_proj) is Conv1D:
            self.out_w = torch.zeros(n_head * (head_dim + 8), E, dtype=dtype, device=device)
        if gelu_tanh and type(self.mlp.c_fc) is Conv1D and type(self.mlp.c_proj) is Conv1D:
            inner = self.mlp.c_fc.weight.shape[1]
            self.fc_w = torch.zeros(E, inner + 8, dtype=dtype, device=device)
            self.fc_b = torch.zeros(inner + 8, dtype=dtype, device=device)
            self.fc_b[inner] = 16.0
            self.proj_w = torch.zeros(inner + 8, E, dtype=dtype, device=device)

    def stands_for(self) -> list[nn.Parameter]:
        modules = ([self.attn.c_attn] if self.qkv_w is not None else []) + \
            ([self.attn.c_proj] if self.out_w is not None else []) + \
            ([self.mlp.c_fc, self.mlp.c_proj] if self.fc_w is not None else [])
        return [p for m in modules for p in m.parameters()]

    def refresh(self) -> None:  # (under StaticDecoder.refresh's no_grad)
        if self.qkv_w is not None:
            self.qkv_w.copy_(self.attn.c_attn.weight[:, self.order]).mul_(self.column_scale)
            self.qkv_b.copy_(self.attn.c_attn.bias[self.order]).mul_(self.column_scale)
        if self.out_w is not None:
            H, D, proj = self.n_head, self.head_dim, self.attn.c_proj
            self.out_w.view(H, D + 8, -1)[:, :D].copy_(proj.weight.view(H, D, -1))
            self.out_w[D].copy_(proj.bias).div_(16.0)
        if self.fc_w is not None:
            fc, proj = self.mlp.c_fc, self.mlp.c_proj
            inner = fc.weight.shape[1]
            self.fc_w[:, :inner].copy_(fc.weight)
            self.fc_b[:inner].copy_(fc.bias)
            self.proj_w[:inner].copy_(proj.weight)
            self.proj_w[inner].copy_(proj.bias).div_(16.0)


def _plain_linear(module: nn.Module | None) -> bool:
    """A torch Linear without bias or adapters (LoRA wraps it in a class of its own)."""
    return type(module) is nn.Linear and module.bias is None


def _add_into(h: torch.Tensor, x: torch.Tensor, linear: nn.Module, alpha: float = 1.0) -> torch.Tensor:
    """h += alpha * linear(x) in place, one matmul (h: a tensor of this step's, the residual stream);
    the sum in float32 inside it, rounded once."""
    h.view(-1, h.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t(), alpha=alpha)
    return h


def _addmm_gelu(bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The tanh GELU of bias + x @ w: on CUDA one cuBLASLt kernel, the GELU in its epilogue (in
    float32, before the rounding to the output's dtype); elsewhere a matmul, then the GELU (the
    CPU's `_addmm_activation` applies the erf GELU, not GPT-2's)."""
    if x.is_cuda and hasattr(torch, "_addmm_activation"):
        return torch._addmm_activation(bias, x, w, use_gelu=True)
    return F.gelu(torch.addmm(bias, x, w), approximate="tanh")


def _masked_softmax(scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """softmax(scores with -inf where `blocked`) over the last dim, in one kernel on CUDA where
    PyTorch has the op (the one nn.MultiheadAttention uses; its fused path wants a contiguous mask
    of the scores' shape and rows of at most 1,024), else a fill, then softmax."""
    if hasattr(torch, "_masked_softmax"):
        return torch._masked_softmax(scores, blocked, scores.dim() - 1, 2)
    return torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)


class _Llama(_Arch):
    """Llama (and Mistral, Ministral, Qwen2, Qwen3, SmolLM3): rotary positions, q/k/v projections with fewer
    key/value heads than query heads (grouped-query attention), RMSNorm, gated MLP. Qwen3 adds an
    RMSNorm over each query and key head (`q_norm`, `k_norm`) before the rotation; SmolLM3 leaves
    the rotation out of every fourth layer (NoPE: its attention's `use_rope` is off there)."""

    def __init__(self, lm: nn.Module, max_len: int):
        cfg, self.m = lm.config, base_model(lm).model
        # Gemma 2 caps its attention scores; Gemma 3's config has the field, which HF's Gemma 3 never reads
        self.attn_softcap = cfg.attn_logit_softcapping if cfg.model_type == GEMMA2 else None
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.blocks, self.embedding = list(self.m.layers), self.m.embed_tokens
        self.max_positions = cfg.max_position_embeddings
        attn = self.blocks[0].self_attn
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.scale = attn.head_dim, attn.scaling
        self.head_norms = cfg.model_type in ("qwen3", GEMMA3)
        self.rotary_tables(cfg, max_len)

    def rotary_tables(self, cfg, max_len: int) -> None:
        # cos / sin of every position a rollout reaches, once, by the model's own rotary module
        # (its scaling types included), in float32 as HF computes them; Gemma 3 and OLMo 3 have a
        # table for their sliding-window layers and one for their global layers
        device = self.embedding.weight.device
        positions = torch.arange(max_len, device=device)[None]
        self.tables, self.layer_kind = {}, {}  # layer kind (None but per layer type) -> (cos, sin), block -> kind
        for i, block in enumerate(self.blocks):
            kind = cfg.layer_types[i] if cfg.model_type in PER_LAYER_ROPE else None
            if kind not in self.tables:
                cos, sin = self.m.rotary_emb(torch.zeros(1, device=device), positions, *([kind] if kind else []))
                cos, sin = cos[0], sin[0]  # (L, head_dim) each
                half = sin.shape[-1] // 2
                self.tables[kind] = (cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1))  # see _rotate
            self.layer_kind[id(block)] = kind

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.m.embed_tokens(ids)

    def rotary(self, pos: torch.Tensor) -> dict:
        """cos / sin at the positions fed in, (B, 1, S, D) float32, once per step for every layer."""
        return {kind: (cos[pos].unsqueeze(1), sin[pos].unsqueeze(1)) for kind, (cos, sin) in self.tables.items()}

    def heads(self, attn: nn.Module, x: torch.Tensor):
        """q, k and v, (B, S, heads, head_dim) each: one projection each."""
        B, S, _ = x.shape
        return (proj(x).view(B, S, -1, self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attention(self, block: nn.Module) -> nn.Module:
        return block.self_attn

    def attention_input(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.rms(block.input_layernorm, h)

    def qkv(self, block: nn.Module, h: torch.Tensor, rope: dict):
        attn, x = self.attention(block), self.attention_input(block, h)
        q, k, v = self.heads(attn, x)
        if self.head_norms:
            q, k = self.rms(attn.q_norm, q), self.rms(attn.k_norm, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if not getattr(attn, "use_rope", True):  # SmolLM3's NoPE layers: no positions at all
            return q, torch.stack((k, v))
        cos, sin = rope[self.layer_kind[id(block)]]
        # in float32 as HF's (its bf16 q and k meet float32 cos / sin), kept in the projection's dtype
        return _rotate(q, cos, sin), torch.stack((_rotate(k, cos, sin), v))

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return block.self_attn.o_proj(a)

    def mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return block.mlp(self.rms(block.post_attention_layernorm, h))

    # Llama's output projections have no bias and nothing between them and the residual sum: where
    # they are plain (no adapters), each adds into the residual stream in its one matmul (`_add_into`);
    # the layouts with norms after them (Gemma, OLMo) or another block (GPT-NeoX) say False
    fused_residual = True

    def residual_scale(self, block: nn.Module) -> float:
        return 1.0  # (Granite's residual multiplier)

    def residual_out(self, block: nn.Module, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        o_proj = block.self_attn.o_proj if self.fused_residual else None
        if _plain_linear(o_proj):
            return _add_into(h, a, o_proj, self.residual_scale(block))
        return h + self.out(block, a)

    def residual_mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        down = block.mlp.down_proj if self.fused_residual else None
        if not _plain_linear(down):
            return h + self.mlp(block, h)
        x = self.rms(block.post_attention_layernorm, h)
        return _add_into(h, self.gated(block.mlp, x), down, self.residual_scale(block))

    def gated(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The MLP's input to its down projection, as HF's MLP computes it."""
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.rms(self.m.norm, h)

    def rms(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(norm, x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The LM head's output as the model returns it: soft-capped by Gemma 2 (and a Gemma 3 that sets a cap)."""
        return _softcap(x, self.final_softcap)


class _Granite(_Llama):
    """IBM Granite 3: Llama's block with scalar multipliers: on the embeddings, on each attention and
    MLP output before the residual sum, on the attention scores (its `attention_multiplier`, the
    attention module's scaling) and a divisor of the logits."""

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.m.embed_tokens(ids) * self.m.embedding_multiplier

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return block.self_attn.o_proj(a) * block.residual_multiplier

    def mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return super().mlp(block, h) * block.residual_multiplier

    def residual_scale(self, block: nn.Module) -> float:
        return block.residual_multiplier

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.m.config.logits_scaling


class _Gemma(_Llama):
    """Gemma 2 and 3: Llama's attention with a norm after it and norms around the MLP, embeddings
    scaled by sqrt(hidden) (inside their embedding module). Gemma 3 adds Qwen3's query/key head
    norms and two rotary tables; Gemma 2 soft-caps the attention scores and the final logits
    (`attn_softcap`, `final_softcap`, which `_blocks` and `logits` apply; Gemma 3 the
    final logits where its config sets a cap). Their norms' 1 + weight is made once per rollout
    (`rms`). Not covered (declined by `supports`): bidirectional attention (EmbeddingGemma)."""

    fused_residual = False  # (a norm after each output projection)

    def own_copies(self, dtype: torch.dtype, batch: int) -> set[int]:
        # Gemma 2's and 3's norms scale by 1 + weight in float32: made once per rollout, not at every
        # norm of every token (two kernels each); the weight cast first, as the decoder reads it
        self.dtype = dtype
        self.one_plus = {id(m): (m, torch.empty(m.weight.shape, dtype=torch.float32, device=m.weight.device))
                         for m in self.m.modules() if type(m).__name__ in GEMMA_NORMS}
        return set()

    def refresh_copies(self) -> None:
        for norm, weight in self.one_plus.values():
            weight.copy_(norm.weight.to(self.dtype)).add_(1.0)

    def rms(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if id(norm) not in self.one_plus:  # (Gemma 4's)
            return _rms_norm(norm, x)
        return F.rms_norm(x.float(), x.shape[-1:], self.one_plus[id(norm)][1], norm.eps).type_as(x)

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return self.rms(block.post_attention_layernorm, block.self_attn.o_proj(a))

    def mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.rms(block.post_feedforward_layernorm, block.mlp(self.rms(block.pre_feedforward_layernorm, h)))


class _Gemma4(_Gemma):
    """Gemma 4's language model: Gemma 3's block, with per layer type its own head size and key/value
    heads (the global layers' heads are wider), q and k normed per head and v too (without a
    scale), attention unscaled (its `scaling`, 1.0), and on the global layers of the larger models
    the value the key's projection itself (`attention_k_eq_v`: no v_proj). The last layers of the
    small models (E2B, E4B) compute no keys or values: they read those of the last earlier layer of
    their type (`kv_layout`: the same cache buffer). Each block then adds a per-layer input (PLE:
    an embedding of the token per layer, mixed with a projection of the token's embedding; made
    once per step in `embed`) through a gate, and scales its output by a learned scalar."""

    def __init__(self, lm: nn.Module, max_len: int):
        cfg, self.m = lm.config, base_model(lm).model
        self.final_softcap = cfg.final_logit_softcapping
        self.blocks, self.embedding = list(self.m.layers), self.m.embed_tokens
        self.max_positions = cfg.max_position_embeddings
        self.n_head, self.scale = cfg.num_attention_heads, self.blocks[0].self_attn.scaling
        modes, kinds = cfg.kv_sharing_modes, cfg.layer_types
        stores = {kinds[i]: i for i, mode in enumerate(modes) if mode == "store"}
        self.layout = [(cfg.per_layer_config[i].num_key_value_heads, block.self_attn.head_dim,
                        stores[kinds[i]] if modes[i] == "reuse" else i) for i, block in enumerate(self.blocks)]
        self.per_layer = None  # (B, S, layers, per-layer size): this step's per-layer inputs
        self.rotary_tables(cfg, max_len)

    def kv_layout(self) -> list[tuple[int, int, int]]:
        return self.layout

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        h = self.m.embed_tokens(ids)
        if self.m.hidden_size_per_layer_input:
            self.per_layer = self.m.project_per_layer_inputs(h, self.m.get_per_layer_inputs(ids, h))
        return h

    def qkv(self, block: nn.Module, h: torch.Tensor, rope: dict):
        attn, x = block.self_attn, self.rms(block.input_layernorm, h)
        B, S, _ = x.shape
        cos, sin = rope[self.layer_kind[id(block)]]
        q = self.rms(attn.q_norm, attn.q_proj(x).view(B, S, -1, attn.head_dim)).transpose(1, 2)
        q = _rotate(q, cos, sin)
        if attn.is_kv_shared_layer:
            return q, None  # the keys and values of an earlier layer: kv_layout
        k = attn.k_proj(x).view(B, S, -1, attn.head_dim)
        v = attn.v_proj(x).view(B, S, -1, attn.head_dim) if attn.v_proj is not None else k
        k, v = (self.rms(norm, t).transpose(1, 2) for norm, t in ((attn.k_norm, k), (attn.v_norm, v)))
        return q, torch.stack((_rotate(k, cos, sin), v))

    def block_end(self, i: int, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.per_layer is not None:
            gate = block.act_fn(block.per_layer_input_gate(h)) * self.per_layer[:, :, i]
            h = h + self.rms(block.post_per_layer_input_norm, block.per_layer_projection(gate))
        return (h.float() * block.layer_scalar.float()).to(h.dtype)  # as HF's in-place multiply computes it


class _Olmo2(_Llama):
    """OLMo 2 and 3: Llama's projections and MLP, with the norms moved: none before attention or
    the MLP, one after each (on their outputs, before the residual sum), and the query and key
    norms over the whole projection (all heads at once) before the heads are split. OLMo 3 adds
    sliding-window layers with a rotary table of their own, as Gemma 3."""

    fused_residual = False  # (a norm after each output projection)

    def attention_input(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h

    def heads(self, attn: nn.Module, x: torch.Tensor):
        B, S, _ = x.shape
        q, k = self.rms(attn.q_norm, attn.q_proj(x)), self.rms(attn.k_norm, attn.k_proj(x))
        return (t.view(B, S, -1, self.head_dim) for t in (q, k, attn.v_proj(x)))

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return self.rms(block.post_attention_layernorm, block.self_attn.o_proj(a))

    def mlp(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.rms(block.post_feedforward_layernorm, block.mlp(h))


class _Phi3(_Llama):
    """Phi-3: Llama's block with q, k and v from one projection (`qkv_proj`) and the MLP's gate and
    up from one (`gate_up_proj`, `gated`); its rotary table covers the
    first `partial_rotary_factor` of each head (all of it in Phi-3, three quarters in Phi-4-mini),
    which `_rotate` reads. Its residual dropout is a no-op outside training."""

    def heads(self, attn: nn.Module, x: torch.Tensor):
        B, S, _ = x.shape
        return attn.qkv_proj(x).view(B, S, -1, self.head_dim).split((self.n_head, self.n_kv, self.n_kv), dim=2)

    def gated(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return up * mlp.activation_fn(gate)


class _NeoX(_Llama):
    """GPT-NeoX (Pythia): q, k and v from one projection laid out head by head (each head's q, k
    and v side by side), rotary positions on the first `rotary_pct` of each head (a quarter in
    Pythia), LayerNorm with biases, a GELU MLP, an LM head of its own. With
    `use_parallel_residual` (Pythia's, GPT-NeoX-20B's) attention and MLP both read the block's
    input and are added to it together. Its dropouts are no-ops outside training."""

    fused_residual = False  # (its own block: attention.dense, a GELU MLP)

    def __init__(self, lm: nn.Module, max_len: int):
        cfg, self.m = lm.config, base_model(lm).gpt_neox
        self.blocks, self.embedding = list(self.m.layers), self.m.embed_in
        self.max_positions = cfg.max_position_embeddings
        self.n_head = self.n_kv = cfg.num_attention_heads
        attn = self.blocks[0].attention
        self.head_dim, self.scale = attn.head_size, attn.scaling
        self.head_norms, self.parallel = False, cfg.use_parallel_residual
        self.rotary_tables(cfg, max_len)

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.m.embed_in(ids)

    def attention(self, block: nn.Module) -> nn.Module:
        return block.attention

    def heads(self, attn: nn.Module, x: torch.Tensor):
        B, S, _ = x.shape
        return attn.query_key_value(x).view(B, S, -1, 3 * self.head_dim).chunk(3, dim=-1)

    def out(self, block: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return block.attention.dense(a)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.m.final_layer_norm(h)


LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "SmolLM3RMSNorm",
               "GraniteRMSNorm", "MinistralRMSNorm", "Ministral3RMSNorm")
OLMO_NORMS = ("Olmo2RMSNorm", "Olmo3RMSNorm")
GEMMA_NORMS = ("Gemma2RMSNorm", "Gemma3RMSNorm")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm, computed as HF's module computes it, through F.rms_norm: one fused
    kernel on CUDA for the normalisation where HF's module launches six (cast, square, mean,
    add, rsqrt, multiply). Llama's weight multiplies after the cast back, OLMo's, Gemma 4's and
    Gemma 3's (1 + weight) before it. On CUDA, with a weight of x's dtype, Llama's, OLMo's and Gemma
    4's norms are one kernel with the weight inside, in float32 before the one rounding: OLMo's and
    Gemma 4's order; Llama's (cast, then multiply) rounds once less. Any other norm module runs as
    it is."""
    kind = type(norm).__name__
    if x.is_cuda and kind in (*LLAMA_NORMS, *OLMO_NORMS, "Gemma4RMSNorm"):
        weight = norm.weight if kind != "Gemma4RMSNorm" or norm.with_scale else None
        if weight is None or weight.dtype == x.dtype:
            return F.rms_norm(x, x.shape[-1:], weight, getattr(norm, "variance_epsilon", None) or norm.eps)
    if kind in LLAMA_NORMS:
        return F.rms_norm(x.float(), x.shape[-1:], eps=norm.variance_epsilon).to(x.dtype) * norm.weight
    if kind in OLMO_NORMS:
        return F.rms_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.variance_epsilon).to(x.dtype)
    if kind in GEMMA_NORMS:
        return F.rms_norm(x.float(), x.shape[-1:], 1.0 + norm.weight.float(), norm.eps).type_as(x)
    if kind == "Gemma4RMSNorm":  # its weight as it is; Gemma 4's value norm has none
        weight = norm.weight.float() if norm.with_scale else None
        return F.rms_norm(x.float(), x.shape[-1:], weight, norm.eps).type_as(x)
    return norm(x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, as HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, where
    rotate_half(x) = cat(-x2, x1). With the sign folded into the table (signed_sin = cat(-sin1, sin2))
    that is x * cos + roll(x) * signed_sin: three kernels where HF's form takes five, computed in
    the tables' float32 and written in x's dtype by the last (its `out`: no cast of its own). A
    table narrower than the head (partial rotary, Phi-4-mini's) rotates the head's first part and
    passes the rest through, as HF's Phi-3 and GPT-NeoX do."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((_rotate(x[..., :r], cos, signed_sin), x[..., r:]), dim=-1)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin, out=torch.empty_like(x))


# model_type -> the class that lays out its block; every other type `supports` accepts is a Llama's
ARCHS = {"gpt2": _GPT2, GEMMA3: _Gemma, GEMMA2: _Gemma, GEMMA4: _Gemma4, PHI3: _Phi3, GRANITE: _Granite, NEOX: _NeoX,
         **dict.fromkeys(OLMO, _Olmo2)}


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's logit soft-capping, tanh(x / cap) * cap, as HF computes it; x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


class _Runner(nn.Module):
    """Calls a function with the LM as its submodule, so that torch.func.functional_call can run
    the decoder with other tensors in place of the LM's weights (the shadow copies)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, fn, *args):
        return fn(*args)


class StaticDecoder:
    """Samples responses with a fixed-size KV cache; `use_graph` (CUDA only) replays a captured step.

    Shapes are fixed per instance (batch B, prompt width P, response length T): the trainer
    pads every batch's prompts to the longest prompt it has, so one instance serves a whole run.
    """

    def __init__(self, lm: nn.Module, batch: int, prompt_len: int, max_new_tokens: int,
                 use_graph: bool | None = None, autocast_dtype: torch.dtype | None = None):
        self.B, self.P, self.T = batch, prompt_len, max_new_tokens
        self.L = prompt_len + max_new_tokens
        if not supports(lm, self.L):
            raise ValueError("StaticDecoder supports GPT-2, Llama-family models (Mistral, Ministral, Qwen2, Qwen3, "
                             "SmolLM3), Granite, Phi-3, Gemma 2, 3 and 4 (without experts), OLMo 2 and 3 and GPT-NeoX "
                             f"within their rotary scaling's fixed range, not {type(lm).__name__}")
        self.lm = lm
        self.runner = _Runner(lm)
        self.arch = ARCHS.get(lm.config.model_type, _Llama)(lm, self.L)
        if self.L > self.arch.max_positions:
            raise ValueError(f"prompt {prompt_len} + response {max_new_tokens} tokens exceed the model's "
                             f"{self.arch.max_positions} positions")
        weight = self.arch.embedding.weight
        device = weight.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        dtype = autocast_dtype or weight.dtype
        self.autocast_dtype = autocast_dtype
        # Mixed precision (float32 weights, bf16 autocast): autocast would cast every weight at
        # every token (its weight cache cannot be kept across graph replays: the weights train).
        # Instead the decoder reads a bf16 copy of the weights, refreshed once per rollout, and
        # runs in bf16 throughout, as over bf16 weights; `shadow` maps names to those copies.
        self.shadow: dict[str, torch.Tensor] = {}
        # GPT-2's projections read through the decoder's own copies in the compute dtype (`_Own`):
        # the shadow leaves those weights out
        self.own = self.arch.own_copies(dtype, batch)
        # keys and values of a layer in one buffer (2, B, kv_heads, L, D): one copy writes both; a
        # layer that reads an earlier layer's (Gemma 4) holds that layer's buffer and writes nothing
        self.kv = []
        for i, (kv_heads, head_dim, source) in enumerate(self.arch.kv_layout()):
            self.kv.append(self.kv[source] if source != i else
                           torch.zeros((2, batch, kv_heads, self.L, head_dim), dtype=dtype, device=device))
        self.k, self.v = [kv[0] for kv in self.kv], [kv[1] for kv in self.kv]
        # sliding windows shorter than the rollout (wider ones change nothing): a mask of their own
        self.windows = [w if w is not None and w < self.L else None
                        for w in layer_windows(lm.config, len(self.arch.blocks))]
        self.cols = torch.arange(self.L, device=device)
        # Per-step state, all in fixed buffers so the captured graph can read and advance it.
        # True = may not attend; one row per query head, in the scores' layout (B, heads, 1, L), as the
        # one-kernel masked softmax reads it
        self.blocked = torch.ones(batch, self.arch.n_head, 1, self.L, dtype=torch.bool, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # cache column of the token fed in
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # its position id per row
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # the token fed in
        V = lm.config.vocab_size
        self.logits = torch.zeros(batch, V, dtype=torch.float32, device=device)
        # The LM head reads a copy of its weight padded to a multiple of 64 rows, refreshed once per
        # rollout: GPT-2's 50257 rows leave cuBLAS only slow unaligned bf16 kernels (measured 281 us
        # against about 15 us per step on an H100), and the copy is already in the compute dtype.
        self.head = torch.zeros(-(-V // 64) * 64, weight.shape[1], dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _autocast(self):
        device_type = self.head.device.type
        # off over the shadow copies (every weight already bf16), and off where no autocast was
        # asked for, also inside a caller's autocast; cache_enabled=False: a graph must not
        # capture autocast's weight cache (stale after an update)
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None and not self.shadow, cache_enabled=False)

    @torch.no_grad()
    def refresh_shadow(self) -> None:
        """The bf16 copies of the weights that are not bf16 (mixed precision), as they are now.
        (Re)made when a weight's shape changed (FSDP gathers whole weights for each rollout):
        then the graph is captured again over the new copies."""
        if self.autocast_dtype is None:
            return
        for name, p in self.lm.named_parameters():
            if p.dtype == self.autocast_dtype or not p.is_floating_point() or id(p) in self.own:
                continue
            copy = self.shadow.get(name)
            if copy is None or copy.shape != p.shape:
                copy = self.shadow[name] = torch.empty_like(p, dtype=self.autocast_dtype)
                self.graph = None
            copy.copy_(p)

    def _blocks(self, h: torch.Tensor, pos: torch.Tensor, write, masks: dict, decode: bool) -> torch.Tensor:
        """The transformer blocks; `write(layer, kv)` stores new keys and values (2, B, kv_heads, S, D)
        (None: the layer reads an earlier layer's) and returns the keys and values to attend;
        `masks`: by sliding window (None: none), what may be attended (True) in the prompt's pass,
        what may not (True) in a decode step."""
        arch = self.arch
        rope = arch.rotary(pos)  # every layer's positions, looked up once
        for i, block in enumerate(arch.blocks):
            attn_mask = masks[self.windows[i]]
            q, kv = arch.qkv(block, h, rope)  # (B, heads, S, D) and (2, B, kv_heads, S, D), positions applied
            B, _, S, D = q.shape
            scale = arch.q_scale(block) or D ** -0.5
            keys, values = write(i, kv)
            keys, values = keys.to(q.dtype), values.to(q.dtype)
            kv_heads = keys.shape[1]
            groups = arch.n_head // kv_heads  # query heads per key/value head
            if decode:  # one query per row: plain matmuls beat a fused attention kernel's launch cost here
                # the matmul needs q in a layout whose (batch, head) dims fold into one: where q is a
                # strided view of the projection, the scale rides on that copy (as PyTorch's own math
                # attention scales q before the product); GPT-2's own copies give q scaled and foldable
                q = q * scale if scale != 1.0 else q
                q = q.reshape(B, kv_heads, groups, D)  # a kv head's queries side by side
                scores = _softcap(q @ keys.transpose(-1, -2), arch.attn_softcap)  # (B, kv_heads, groups, L)
                # softmax reads the scores' dtype and accumulates in float32 inside the one kernel
                p = _masked_softmax(scores.view(B, arch.n_head, 1, -1), masks[self.windows[i]])
                a = arch.attention_values(block, p.view(scores.shape), values)  # (B, 1, width)
            else:
                if groups > 1:
                    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
                if arch.attn_softcap is None:
                    a = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, scale=scale)
                else:  # SDPA has no soft-capping: the prompt's attention as HF's eager attention computes it
                    scores = _softcap((q @ keys.transpose(-1, -2)) * scale, arch.attn_softcap)
                    scores = scores.masked_fill(~attn_mask, float("-inf"))
                    a = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values
                a = a.transpose(1, 2).reshape(B, S, -1)
            if arch.parallel:  # GPT-NeoX's parallel residual: the MLP reads the block's input too (HF's order of sums)
                h = arch.mlp(block, h) + arch.out(block, a) + h
            else:
                h = arch.residual_mlp(block, arch.residual_out(block, h, a))
            h = arch.block_end(i, block, h)
        return arch.norm(h)

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D) last hidden states -> (B, V) logits in the compute dtype, through the padded head copy."""
        return self.arch.logits((h.to(self.head.dtype) @ self.head.T)[:, :self.logits.shape[1]])

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current weights into the decoder's copies (at every rollout: they train): the
        padded LM head, GPT-2's projections (`_Own`) and, under mixed precision, the shadow."""
        self.head[:self.logits.shape[1]].copy_(self.lm.get_output_embeddings().weight)
        self.arch.refresh_copies()
        self.refresh_shadow()

    def _prefill(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """All prompt tokens at once; fills cache columns [0, P) and returns the next-token logits."""
        P = self.P
        real = prompt_mask.bool()
        pos = position_ids_from_mask(real)
        causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()
        attn_mask = causal[None, None] & real[:, None, None, :]  # (B, 1, P, P)
        # a left-padding row attends to nothing; let it see itself so softmax stays finite (ignored)
        attn_mask = attn_mask | torch.eye(P, dtype=torch.bool, device=real.device)[None, None]

        def write(i, kv):
            if kv is None:  # an earlier layer's, written by it in this pass
                return self.kv[i][0, :, :, :P], self.kv[i][1, :, :, :P]
            self.kv[i][:, :, :, :P] = kv
            return kv[0], kv[1]

        # a sliding window: a query column reaches back fewer than `window` columns (itself included)
        back = self.cols[:P, None] - self.cols[None, :P]
        masks = {w: attn_mask if w is None else attn_mask & (back < w) for w in set(self.windows)}
        h = self._blocks(self.arch.embed(prompt_ids, pos), pos, write, masks, decode=False)
        self.blocked.fill_(True)
        self.blocked[..., :P] = ~real[:, None, None, :]
        self.pos.copy_(real.long().sum(-1))
        self.col.fill_(P)
        return self._head_logits(h[:, -1]).float()

    def _step(self) -> None:
        """One token per row at column `col`: writes its keys/values, leaves next-token logits in `logits`."""
        self.blocked.index_fill_(3, self.col, False)

        def write(i, kv):
            if kv is not None:  # None: an earlier layer's, written by it in this step
                self.kv[i].index_copy_(3, self.col, kv.to(self.kv[i].dtype))
            return self.k[i], self.v[i]

        pos = self.pos[:, None]
        masks = {w: self.blocked if w is None else self.blocked | (self.col - self.cols >= w)
                 for w in set(self.windows)}
        h = self._blocks(self.arch.embed(self.token[:, None], pos), pos, write, masks, decode=True)
        self.logits.copy_(self._head_logits(h[:, -1]))  # cast to float32 by the copy itself
        self.col.add_(1)
        self.pos.add_(1)

    def _warm_up(self) -> None:
        """Two eager steps before a capture (cuBLAS handles, workspaces), from column 0: they write
        columns 0 and 1 of the cache, which the prefill writes again. Not from where the last
        rollout left `col`: a capture after a whole rollout (FSDP captures at every rollout, over
        the weights it gathers anew) would step past the cache's last column, an index out of range
        (on CUDA a device-side assert, raised at a later operation)."""
        self.col.zero_()
        self.pos.zero_()
        for _ in range(2):
            self._step()

    def _capture(self) -> None:
        # Warm up on a side stream, then record one step. Capture writes into the cache like a
        # real step; sample() runs the prefill again after it. Called inside run(): over the
        # shadow copies, under the decoder's autocast.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
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
        self.refresh()
        return self.run(self._sample, prompt_ids, prompt_mask, temperature, eos_id, pad_id, generator, check_every)

    def run(self, fn, *args):
        """fn(*args) with the model's modules computing over the shadow copies (if any) in place of
        their weights, and autocast as the decoder needs it."""
        def call(*args):
            with self._autocast():
                return fn(*args)
        return torch.func.functional_call(self.runner, {"lm." + k: v for k, v in self.shadow.items()}, (call, *args))

    def _sample(self, prompt_ids, prompt_mask, temperature, eos_id, pad_id, generator, check_every) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except RuntimeError as e:  # a module that cannot be captured: slower, not stopped
                warnings.warn(f"CUDA graph capture of the decode step failed for {type(self.lm).__name__} ({e}); "
                              "decoding with the static cache, step by step", stacklevel=2)
                self.use_graph, self.graph = False, None
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
                self._step()
            logits = self.logits
        return tokens
