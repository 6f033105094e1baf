"""FSDP for PPO: models sharded over the processes with torch's `fully_shard` (FSDP2).

For policies that do not fit whole on one device with their gradients and Adam's state: each
process keeps 1/N of every weight, gradient and optimizer moment; a transformer block's weights
are gathered just before it runs and freed after. The frozen reference and reward model are
sharded the same way. Generation reads whole weights token after token, so a rollout gathers the
policy once (`unsharded`) and shards it again after, as TRL did: the whole policy is on each
device for the length of a rollout, its gradients and optimizer state never are.

Checkpoints go through full state dicts gathered on the first process (`full_state_dict`) and
are loaded back by broadcasting from it (`load_full_state_dict`), so a sharded run writes the
same safetensors file as an unsharded one. Imports torch only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def block_types(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks, as Hugging Face models declare them (_no_split_modules)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} declares no transformer block classes (_no_split_modules); "
                         "FSDP needs them to shard block by block")
    return names


def shard(model: nn.Module, device_type: str, world_size: int, inner: tuple[nn.Module, ...] = ()) -> None:
    """Shard every transformer block, then each module of `inner`, then `model` itself, in place.

    A module of `inner` gets its own unit so that it can also be called on its own (the LoRA
    policy's LM with its adapters off, as the reference).
    """
    mesh = init_device_mesh(device_type, (world_size,))
    blocks = block_types(model)
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    for module in inner:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # FSDP takes the first unit whose forward runs for the root, and a rollout calls the policy's LM
    # (HF's sampler; the LoRA reference) before the policy itself: declare the root now. Private
    # in torch 2.13 (the step a root's first forward takes); no public call does it.
    model._get_fsdp_state()._lazy_init()


@contextlib.contextmanager
def unsharded(model: nn.Module, leave: nn.Module | None = None):
    """Whole weights in every module of `model` but those in `leave` for the duration (a rollout),
    sharded again after."""
    left = set(leave.modules()) if leave is not None else set()
    units = [m for m in model.modules() if isinstance(m, FSDPModule) and m not in left]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # no gather and free per generated token
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts, whole, on the CPU of the first process; empty on the others.

    Every process must call it (it gathers). Tensors that share storage (tied embeddings) are
    cloned apart so safetensors can write them.
    """
    model_state = full_model_state_dict(model)
    seen = set()
    for key, tensor in model_state.items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            model_state[key] = tensor.clone()
        seen.add(ptr)
    return model_state, get_optimizer_state_dict(model, optimizer, options=_FULL)


def full_model_state_dict(model: nn.Module) -> dict:
    """The model's whole state dict on the CPU of the first process (every process must call it)."""
    return get_model_state_dict(model, options=_FULL)


def load_full_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                         optimizer_state: dict, strict: bool = True) -> None:
    """The inverse: the first process passes whole state dicts, the others empty ones. strict=False:
    `model_state` may hold only some of the weights (a LoRA policy's adapters); the rest stay."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
