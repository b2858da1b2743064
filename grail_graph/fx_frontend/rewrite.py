"""Rewrite a PyTorch module to the narrowed widths of a set of group plans.

Parameters are replaced by name on the module itself (not on a traced copy), and each
touched Conv / Linear / BatchNorm gets its width attributes updated from its new weight,
so the result is an ordinary module that runs in eager PyTorch and exports to ONNX.
Other layers get the size attributes that the matcher recorded in `width_attributes`
(such as `nf` and `nx` of Hugging Face's Conv1D) set to the kept width.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from grail_graph.core import absorb, bias_correction, fold_linear_chain
from grail_graph.errors import GrailError
from grail_graph.frontend import GroupPlan
from grail_graph.fx_frontend import attention
from grail_graph.groups import BIAS, BN_ROLES, KEY_VALUE, ChannelGroup, WeightRef
from grail_graph.heads import head_channels, kept_heads, kept_structure, structure_of

logger = logging.getLogger(__name__)


def get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attribute)


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name`, keeping its kind, dtype and device."""
    owner_name, _, attribute = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attribute)
    value = value.to(dtype=old.dtype, device=old.device)
    if isinstance(old, nn.Parameter):
        setattr(owner, attribute, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attribute, value, persistent=attribute not in owner._non_persistent_buffers_set)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Copy a tensor to a float64-capable numpy array (bf16 has no numpy dtype)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def _update_widths(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        module.out_channels = module.weight.shape[0]
        if module.groups > 1 and module.weight.shape[1] == 1:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        source = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = source.shape[0]


def _add_bias(model: nn.Module, weight_name: str, delta: np.ndarray) -> None:
    """Add `delta` (O,) to the bias of the module that owns `weight_name`, creating it if absent."""
    owner_name = weight_name.rpartition(".")[0]
    owner = model.get_submodule(owner_name) if owner_name else model
    weight = getattr(owner, weight_name.rpartition(".")[2])
    bias = getattr(owner, "bias", None)
    delta_tensor = torch.from_numpy(np.ascontiguousarray(delta)).to(device=weight.device, dtype=weight.dtype)
    if bias is None:
        if not isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise GrailError(
                f"affine compensation needs a bias on `{owner_name}`, which has none",
                "Use compensate{affine=false} for this model.",
            )
        owner.bias = nn.Parameter(delta_tensor.clone())
        return
    set_tensor(model, f"{owner_name}.bias", bias.detach() + delta_tensor)


def _hidden_first(model: nn.Module, ref: WeightRef) -> np.ndarray:
    return np.moveaxis(to_numpy(get_tensor(model, ref.node)), ref.axis, 0)


def _store(model: nn.Module, ref: WeightRef, hidden_first: np.ndarray) -> None:
    set_tensor(model, ref.node, torch.from_numpy(np.ascontiguousarray(np.moveaxis(hidden_first, 0, ref.axis))))


def _producer_biases(model: nn.Module, group) -> dict[str, WeightRef]:
    """Map each producer weight to its bias, including biases added after matching."""
    biases = {}
    for ref in group.producers:
        owner = ref.node.rpartition(".")[0]
        if getattr(model.get_submodule(owner), "bias", None) is not None:
            biases[ref.node] = WeightRef(f"{owner}.bias", 0, 0, BIAS)
    return biases


def _fold_producers(model: nn.Module, plan: GroupPlan) -> set[str]:
    """Merge producer rows, their biases and one BatchNorm with the averaging matrix."""
    group = plan.group
    biases = _producer_biases(model, group)
    batchnorm = [ref for role in BN_ROLES for ref in group.narrowed if ref.role == role]
    eps = getattr(model.get_submodule(batchnorm[0].node.rpartition(".")[0]), "eps", 1e-5) if batchnorm else 1e-5
    producers, new_biases, new_batchnorm = fold_linear_chain(
        plan.producer_map,
        [_hidden_first(model, ref) for ref in group.producers],
        [_hidden_first(model, biases[ref.node]) if ref.node in biases else None for ref in group.producers],
        tuple(_hidden_first(model, ref) for ref in batchnorm) if batchnorm else None,
        eps,
    )
    for ref, weight, bias in zip(group.producers, producers, new_biases):
        _store(model, ref, weight)
        if bias is not None:
            _store(model, biases[ref.node], bias)
    for ref, tensor in zip(batchnorm, new_batchnorm or ()):
        _store(model, ref, tensor)
    refs = [*group.producers, *biases.values(), *batchnorm]
    return {ref.node.rpartition(".")[0] for ref in refs}


def apply_plans(model: nn.Module, plans: list[GroupPlan]) -> None:
    """Narrow producers, absorb each plan's map into its consumers, update module widths."""
    touched: set[str] = set()
    with torch.no_grad():
        for plan in plans:
            keep = torch.as_tensor(np.asarray(plan.keep), dtype=torch.long)
            group = plan.group
            if plan.producer_map is not None:
                touched |= _fold_producers(model, plan)
            names = {ref.node for ref in (*group.producers, *group.narrowed)}
            # A bias added by affine compensation after matching is not in the record.
            late_biases = [
                WeightRef(f"{owner}.bias", 0, 0)
                for owner in (ref.node.rpartition(".")[0] for ref in group.producers)
                if getattr(model.get_submodule(owner), "bias", None) is not None and f"{owner}.bias" not in names
            ]
            narrowing = [] if plan.producer_map is not None else [*group.producers, *group.narrowed, *late_biases]
            kv_keep = _key_value_channels(group, plan.keep)
            for ref in narrowing:
                tensor = get_tensor(model, ref.node)
                indices = kv_keep if ref.role == KEY_VALUE else keep
                set_tensor(model, ref.node, tensor.index_select(ref.axis, indices.to(tensor.device)))
                touched.add(ref.node.rpartition(".")[0])
            for ref in group.consumers:
                weight = np.moveaxis(to_numpy(get_tensor(model, ref.node)), ref.axis, 1)
                if plan.consumer_bias is not None:
                    _add_bias(model, ref.node, bias_correction(weight, plan.consumer_bias))
                compensated = np.moveaxis(absorb(weight, plan.consumer_map), 1, ref.axis)
                set_tensor(model, ref.node, torch.from_numpy(np.ascontiguousarray(compensated)))
                touched.add(ref.node.rpartition(".")[0])
    for name in sorted(touched):
        if name:
            _update_widths(model.get_submodule(name))
    for plan in plans:
        kept_width = plan.consumer_map.shape[1]
        for module_name, attribute in plan.group.width_attributes:
            setattr(model.get_submodule(module_name), attribute, kept_width)
    for plan in plans:
        if plan.group.kv_heads:
            _update_head_counts(model, plan)


def _key_value_channels(group: ChannelGroup, keep: np.ndarray) -> torch.Tensor | None:
    """Return the key/value rows that an attention-head group keeps, else None."""
    if not group.kv_heads:
        return None
    try:
        _, kv_heads = kept_heads(group, keep)
    except ValueError as error:
        raise GrailError(str(error), "Select whole heads with the select pass.") from error
    return torch.as_tensor(head_channels(kv_heads, group.unit), dtype=torch.long)


def _projections(group: ChannelGroup) -> tuple[str, str, str]:
    """Return the owner of an attention group's projections and the query and key module paths under it."""
    query = group.producers[0].node.rpartition(".")[0]
    key = next(ref.node for ref in group.narrowed if ref.role == KEY_VALUE).rpartition(".")[0]
    owner = attention.owner_module(query, key)
    relative = len(owner) + 1 if owner else 0
    return owner, query[relative:], key[relative:]


def _update_head_counts(model: nn.Module, plan: GroupPlan) -> None:
    """Set the head counts on the module that owns the projections, and on a uniform config."""
    group = plan.group
    old = structure_of(group)
    new = kept_structure(group, plan.keep)
    owner_name, query, key = _projections(group)
    owner = model.get_submodule(owner_name)
    for name, value in attention.head_count_updates(owner, old, new).items():
        setattr(owner, name, value)
    _update_config(model, owner, query, key, old)


def _update_config(model: nn.Module, owner: nn.Module, query: str, key: str, old) -> None:
    """Write the head counts into a Hugging Face config when every layer of this kind has the same ones.

    Layers are the modules of the owner's class, read through the same query and key
    projection paths; their head counts come from the projection widths.
    """
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "num_attention_heads", None), int):
        return
    counts = set()
    for module in model.modules():
        if type(module) is type(owner):
            query_rows = get_tensor(module, f"{query}.weight").shape[0]
            key_rows = get_tensor(module, f"{key}.weight").shape[0]
            counts.add((query_rows // old.head_size, key_rows // old.head_size))
    if len(counts) > 1:
        # NOTE: a global config cannot hold per-layer head counts, so it keeps the old
        # ones. The module runs, but a model rebuilt from this config has other shapes.
        logger.info(
            "attention layers of %s have different head counts %s; the config keeps %d query heads",
            type(owner).__name__, sorted(counts), config.num_attention_heads,
        )  # fmt: skip
        return
    query_heads, kv_heads = counts.pop()
    # NOTE: configs without `head_dim` (BERT) derive the head size from hidden_size and
    # the head count, so a model rebuilt from them gets the wrong head size.
    if getattr(config, "head_dim", None) is None and hasattr(config, "head_dim"):
        config.head_dim = old.head_size
    config.num_attention_heads = query_heads
    if isinstance(getattr(config, "num_key_value_heads", None), int):
        config.num_key_value_heads = kv_heads
