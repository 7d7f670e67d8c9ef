"""Which parameters of a model a quantizer touches, and which are stored transposed (Conv1D).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from torch import nn

from workbench.core.errors import WorkbenchError
from workbench.quant.config import QuantConfig, _check_config


def conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the rest works without it
        return None
    return Conv1D


def _output_embedding_module(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Module):
            return out
    # plain nn.Modules: recognise the usual head names
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
            return m
    return None


def quantizable_parameters(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """HF parameter names of the weights ``cfg`` quantizes, in ``named_parameters()`` order.

    Rule (that of transformers' bnb loader): the ``weight`` of every ``nn.Linear`` and
    transformers ``Conv1D`` (in practice the decoder blocks: ``transformer.h.*``,
    ``gpt_neox.layers.*``, ``model.layers.*``) except the output embedding; plus every
    ``nn.Embedding`` weight if ``cfg.include_embeddings``, plus the output embedding
    (``get_output_embeddings()``, else a module named ``lm_head``/``embed_out``) if
    ``cfg.include_lm_head``. Biases and norms are never quantized.

    Tied tensors are listed once, under the name ``named_parameters()`` gives them (for
    tied GPT-2/SmolLM2 heads that is the token embedding's name), and are selected if
    either of their roles is.
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(cfg)
    conv1d = conv1d_class()
    head = _output_embedding_module(model)
    selected: set[int] = set()
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if m is head:
            take = cfg.include_lm_head
        elif isinstance(m, nn.Embedding):
            take = cfg.include_embeddings
        else:
            take = isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))
        if take:
            selected.add(id(w))
    return [name for name, p in model.named_parameters() if id(p) in selected]


def transposed_parameters(model: nn.Module) -> frozenset[str]:
    """Names of the transformers ``Conv1D`` weights, which bnb's loader quantizes transposed."""
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    conv1d = conv1d_class()
    if conv1d is None:
        return frozenset()
    ids = {id(m.weight) for m in model.modules() if isinstance(m, conv1d)}
    return frozenset(name for name, p in model.named_parameters() if id(p) in ids)


def _check_names(state: object, names: Iterable[str], what: str = "state") -> list[str]:
    if not isinstance(state, Mapping):
        raise WorkbenchError(
            f"{what}: expected a dict of parameter name -> tensor, got {type(state).__name__}"
        )
    if isinstance(names, str):
        raise WorkbenchError(f"names: expected a list of parameter names, got the string {names!r}")
    out = list(names)
    seen: set[str] = set()
    for name in out:
        if not isinstance(name, str):
            raise WorkbenchError(f"names: expected parameter names (str), got {name!r}")
        if name in seen:
            raise WorkbenchError(f"names: {name!r} is listed twice")
        seen.add(name)
        if name not in state:
            raise WorkbenchError(f"names: parameter {name!r} is not in the {what}")
    return out


def _check_transposed(transposed: Collection[str]) -> frozenset[str]:
    if (
        isinstance(transposed, str)
        or not isinstance(transposed, Iterable)
        or not all(isinstance(t, str) for t in transposed)
    ):
        raise WorkbenchError("transposed: expected a collection of parameter names")
    return frozenset(transposed)


def single_use_linear_owners(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """``name → module`` for the named weights owned by a Linear/Conv1D and shared with no other
    module (a weight read by one forward alone: the batched Fisher and the compact quantized copy
    rely on it)."""
    conv1d = conv1d_class()
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    modules = dict(model.named_modules())
    owners = {}
    for n in names:
        owner, _, attr = n.rpartition(".")
        module = modules.get(owner)
        if attr != "weight" or module is None or uses.get(id(module.weight), 0) != 1:
            continue
        if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            owners[n] = module
    return owners
