"""Put adapters into an existing model by module name."""
from __future__ import annotations

import hashlib

from torch import nn

from .bank_layer import AdapterBank
from .layers import LAYER_CLASSES, LowRankLinear, is_adaptable
from .load import Plan, apply
from .methods import check_seed, get_method
from .model import preserved_on_error
from .progress import Progress
from .targets import ModelView, default_targets, match_modules_to_save, match_targets

__all__ = ["inject", "layer_seed"]


def layer_seed(seed: int, module_name: str) -> int:
    """The seed of one layer: a stable hash of the model-level seed and the module's name, so layers
    get independent random factors and the same name gets the same factors in every run."""
    digest = hashlib.sha256(f"{seed}/{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def inject(model: nn.Module, method: str, rank: int, target_modules=None, *, alpha: float | None = None,
           dropout: float = 0.0, seed: int = 0, backend: str = "auto", modules_to_save=None, progress: bool = True,
           **method_options) -> list[str]:
    """Replace the linear layers of ``model`` named by ``target_modules`` with ``method`` adapters, in
    place. Returns the replaced module names.

    ``target_modules``: a list of name suffixes (``["q_proj", "v_proj"]``), a regular expression
    matched against whole names, ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output
    head and task heads: any module under a name in :data:`peft_ops.targets.HEAD_NAMES`), or None: PEFT's
    default for the transformers architecture (:data:`peft_ops.targets.DEFAULT_TARGET_MODULES`).
    ``modules_to_save``: name suffixes of whole modules (a classification head) trained beside the
    adapters and saved with them by ``save_adapter``. A model without adapters is frozen but for the
    adapters and ``modules_to_save``; injecting into a model that has adapters changes no flag the user
    set. Every target is checked and every layer built before the model is changed; on any error the
    model is left as it was. Each layer's seed is :func:`layer_seed` of ``seed`` and its name.
    ``progress``: when building the layers takes over 2 s (LoRA-XS's SVD of a large model), report on
    stderr how many are done, on one line; ``progress=False`` never prints.
    """
    layer_cls = LAYER_CLASSES[get_method(method).name]
    seed = check_seed(seed)
    if target_modules is None:
        target_modules = default_targets(model)
    view = ModelView.of(model)
    saved = match_modules_to_save(modules_to_save, view) if modules_to_save is not None else []
    matched = match_targets(target_modules, model, view)
    if not matched:
        candidates = [n for n, m in view.modules.items() if is_adaptable(m)]
        raise ValueError(f"target_modules={target_modules!r} matched no module; the linear layers of this "
                         f"model are: {', '.join(candidates) or '(none)'}")
    where = f"inject(target_modules={target_modules!r})"
    plan = Plan(where, error=ValueError)
    view.saved_whole = view.saved_whole + saved  # no adapter inside a module saved whole
    modules = {name: view.target(name, ValueError, where) for name in matched}
    plan.saved_whole = view.check_saved_whole(saved, matched, ValueError, where)
    for name, module in modules.items():
        if isinstance(module, AdapterBank):
            raise ValueError(f"module {name!r} holds an adapter bank; peft_ops.remove_adapters(model, "
                             f"peft_ops.bank_adapters(model)) first to adapt it otherwise")
        if isinstance(module, LowRankLinear):
            raise ValueError(f"module {name!r} already has a {module.method.name} adapter; "
                             f"peft_ops.unload(model) first to replace it")
    with preserved_on_error(model), Progress("peft_ops.inject", len(modules), enabled=progress) as report:
        for name, module in modules.items():
            try:
                plan.new[name] = layer_cls(module, rank, alpha=alpha, dropout=dropout, seed=layer_seed(seed, name),
                                           backend=backend, **method_options)
            except (TypeError, ValueError, RuntimeError) as e:  # name the module whose layer failed
                raise type(e)(f"module {name!r}: {e}") from e
            report.step()
        apply(model, plan)
    return list(plan.new)
