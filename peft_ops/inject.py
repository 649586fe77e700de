"""Put adapters into an existing model by module name, and take them out again."""
from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence

from torch import nn

from .hf import guard_save_pretrained
from .layers import LAYER_CLASSES, LowRankLinear, is_adaptable
from .methods import check_seed, get_method
from .modules_to_save import match_modules_to_save, modules_to_save as registered_modules_to_save, \
    register_modules_to_save

__all__ = ["inject", "adapter_layers", "merge", "unmerge", "unload", "disable_adapters", "layer_seed",
           "preserved_on_error",
           "DEFAULT_TARGET_MODULES", "HEAD_NAMES"]

# What PEFT adapts when target_modules is not given, by transformers' config.model_type
DEFAULT_TARGET_MODULES = {
    **dict.fromkeys(["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2"], ["q_proj", "v_proj"]),
    "gpt2": ["c_attn"],
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["query", "value"]),
}
# Task heads that "all-linear" leaves out (a name component of the module's name): they are trained
# whole, with modules_to_save, not adapted
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "cls", "qa_outputs"})


def layer_seed(seed: int, module_name: str) -> int:
    """The seed of one layer: a stable hash of the model-level seed and the module's name, so layers
    get independent random factors and the same name gets the same factors in every run."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LowRankLinear]]:
    """``(name, layer)`` for every peft-ops layer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            yield name, module


def _is_bank(module: nn.Module) -> bool:
    from .bank import AdapterBank  # imported here: bank.py imports this module

    return isinstance(module, AdapterBank)


def _visible_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every name of every module (a shared module under each of its names), not descending into
    peft-ops layers or adapter banks (their ``base_layer`` is not a target)."""
    adapted: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix + ".") for prefix in adapted):
            continue
        if isinstance(module, LowRankLinear) or _is_bank(module):
            adapted.append(name)
        if name:
            yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _read_directly(model: nn.Module) -> set[str]:
    """Linear layers whose parent reads their weight itself instead of calling them: a wrapper would
    never run (nn.MultiheadAttention's out_proj)."""
    return {f"{n}.out_proj".lstrip(".") for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}


def _match(target_modules, model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = list(_visible_modules(model))
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head, skipped = _output_head(model), _read_directly(model)
        return [(n, m) for n, m in modules
                if (is_adaptable(m) or isinstance(m, LowRankLinear)) and m is not head and n not in skipped
                and not HEAD_NAMES.intersection(n.split("."))]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        return [(n, m) for n, m in modules if pattern.fullmatch(n)]
    if (not isinstance(target_modules, Sequence | set | frozenset) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise TypeError(f"target_modules={target_modules!r}; expected a non-empty list of module-name "
                        f"suffixes, a regular expression string, or 'all-linear'")
    return [(n, m) for n, m in modules if any(n == t or n.endswith("." + t) for t in target_modules)]


@contextlib.contextmanager
def preserved_on_error(model: nn.Module):
    """Undo the ``requires_grad`` changes that building layers makes if anything below fails."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _swap_in(model: nn.Module, layers: dict[str, LowRankLinear]) -> None:
    """Put built layers in place. A model without adapters yet is frozen around them (as PEFT does);
    once it has some, the ``requires_grad`` flags the user set are theirs: only the new adapters'
    tensors are made trainable (and their base layers frozen)."""
    first = next(adapter_layers(model), None) is None
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    if first:
        model.requires_grad_(False)
        register_modules_to_save(model, registered_modules_to_save(model))
    guard_save_pretrained(model)
    for layer in layers.values():
        layer.train(layer.base_layer.training)  # an adapter in a model in eval mode is in eval mode (no dropout)
        layer.requires_grad_(False)
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)


def _default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"target_modules not given and there is no default for this model (config.model_type="
                         f"{model_type!r}; defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}); pass "
                         f"target_modules, e.g. 'all-linear' or a list of module-name suffixes")
    return DEFAULT_TARGET_MODULES[model_type]


def inject(model: nn.Module, method: str, rank: int, target_modules=None, *, alpha: float | None = None,
           dropout: float = 0.0, seed: int = 0, backend: str = "auto", modules_to_save=None,
           **method_options) -> list[str]:
    """Replace the linear layers of ``model`` named by ``target_modules`` with ``method`` adapters, in
    place. Returns the replaced module names.

    ``target_modules``: a list of name suffixes (``["q_proj", "v_proj"]``), a regular expression
    matched against whole names, ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output
    head and task heads: any module under a name in :data:`HEAD_NAMES`), or None: PEFT's default
    for the transformers architecture (:data:`DEFAULT_TARGET_MODULES`). ``modules_to_save``: name
    suffixes of whole modules (a classification head) trained beside the adapters and saved with
    them by ``save_adapter``. A model without adapters is frozen but for the adapters and
    ``modules_to_save``; injecting into a model that has adapters changes no flag the user set.
    Every target is checked and every layer built before the model is changed; on any error the
    model is left as it was. Each layer's seed is :func:`layer_seed` of ``seed`` and its name.
    """
    layer_cls = LAYER_CLASSES[get_method(method).name]
    seed = check_seed(seed)
    if target_modules is None:
        target_modules = _default_targets(model)
    saved = match_modules_to_save(model, modules_to_save) if modules_to_save is not None else []
    matched = _match(target_modules, model)
    if not matched:
        candidates = [n for n, m in _visible_modules(model) if is_adaptable(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module; the linear layers of this "
                         f"model are: {', '.join(candidates) or '(none)'}")
    names = {}
    for name, module in _visible_modules(model):
        names.setdefault(id(module), []).append(name)
    read_directly = _read_directly(model)
    for name, module in matched:
        if isinstance(module, LowRankLinear):
            raise ValueError(f"module {name!r} already has a {module.method.name} adapter; "
                             f"peft_ops.unload(model) first to replace it")
        if _is_bank(module):
            raise ValueError(f"module {name!r} holds an adapter bank; peft_ops.remove_adapters(model, "
                             f"peft_ops.bank_adapters(model)) first to adapt it otherwise")
        if not is_adaptable(module):
            raise TypeError(f"target_modules={target_modules!r} matched {name!r}, a {type(module).__name__}; "
                            f"only nn.Linear and Conv1D layers can be adapted")
        if name in read_directly:
            raise TypeError(f"module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                            f"directly: an adapter there would never run")
        if len(names[id(module)]) > 1:
            raise ValueError(f"module {name!r} is shared: the model also reaches it as "
                             f"{[n for n in names[id(module)] if n != name]}; an adapter would apply on one path only")
        inside = [s for s in saved if name.startswith(s + ".")]
        if inside:
            raise ValueError(f"module {name!r} is inside modules_to_save {inside[0]!r}: it is saved whole, "
                             f"don't adapt it too")
    layers = {}
    with preserved_on_error(model):
        for name, module in matched:
            try:
                layers[name] = layer_cls(module, rank, alpha=alpha, dropout=dropout, seed=layer_seed(seed, name),
                                         backend=backend, **method_options)
            except (TypeError, ValueError, RuntimeError) as e:  # name the module whose layer failed
                raise type(e)(f"module {name!r}: {e}") from e
    _swap_in(model, layers)
    register_modules_to_save(model, saved)
    return list(layers)


def merge(model: nn.Module) -> None:
    """Merge every adapter of ``model`` into its base weight (see :meth:`LowRankLinear.merge`)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def unload(model: nn.Module, *, merge: bool = False) -> list[str]:
    """Put the base layers back in place of the adapters. With ``merge=True`` the adapters are folded
    into the base weights first (for serving without peft-ops); otherwise the original weights return.
    Returns the names of the layers restored."""
    names = []
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
            layer._original_weight = None
        else:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
        names.append(name)
    return names


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with disable_adapters(model):`` the model computes as its base model (every method, TLoRA's
    learned α included); merged adapters are unmerged for the block and merged again after it."""
    layers = [layer for _, layer in adapter_layers(model) if not layer.disabled]
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()
