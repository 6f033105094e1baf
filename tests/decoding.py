"""What the decoder tests share (CPU and GPU): a decoder's logits step by step, and a full forward's."""
import torch


@torch.no_grad()
def decoder_logits(dec, ids: torch.Tensor, mask: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """(B, T, V): the prompts' next-token logits, then each step's after feeding `fed` (B, T - 1)."""
    dec.refresh()
    logits = [dec._prefill(ids, mask)]
    for t in range(fed.shape[1]):
        dec.token.copy_(fed[:, t])
        dec._step()
        logits.append(dec.logits.clone())
    return torch.stack(logits, 1)


@torch.no_grad()
def forward_logits(model, ids: torch.Tensor, mask: torch.Tensor, fed: torch.Tensor) -> torch.Tensor:
    """(B, T, V): a forward over prompts and `fed` at once, at the columns the decoder's logits stand for."""
    full_ids, full_mask = torch.cat([ids, fed], 1), torch.cat([mask, torch.ones_like(fed)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    P, T = ids.shape[1], fed.shape[1] + 1
    return model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos).logits[:, P - 1:P - 1 + T]
