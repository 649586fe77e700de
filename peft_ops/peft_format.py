"""The standard LoRA adapter format (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``),
both ways, and the checkpoints of the LoRA-XS and TLoRA authors.

Every method's update is a rank-r product ``ΔW = s·U·C·Dᵀ``, so every adapter can be written as a
LoRA adapter, whose update is ``ΔW = (lora_alpha / r)·B·A`` (B: N×r ``lora_B.weight``, A: r×K
``lora_A.weight``; ``lora_alpha / √r`` with rsLoRA):

============  ======================  ==========  ==========================================
method        B                       A           lora_alpha
============  ======================  ==========  ==========================================
LoRA          B                       A           α (the tensors are copied unchanged)
SymLoRA       Q[:N]·diag(λ)           Q[:K]ᵀ      α
LoRA-XS       U_r·R                   Σ_r V_rᵀ    α
TLoRA         α·Cᵀ·Bᵀ                 Aᵀ          r (PEFT's scale is 1: TLoRA's learned α is in B)
============  ======================  ==========  ==========================================

(TLoRA in its paper's notation, ``Δy = α·x A B C``.) The products are computed in float64 and stored
in the adapter's dtype. An exported LoRA-XS or TLoRA adapter is a plain LoRA adapter of the same
rank: any LoRA server runs it, but it no longer trains as LoRA-XS/TLoRA (import it back with
:func:`import_peft` to get a ``LoRALinear``; keep the peft-ops file to go on training).

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; GPT-2's ``Conv1D``
layers set ``fan_in_fan_out`` (the LoRA factors keep the same orientation; only the base weight is
stored transposed).

The authors' checkpoints, in the layouts their released code writes:

* LoRA-XS (github.com/MohammadrezaBanaei/LoRA-XS, ``utils/initialization_utils.py``) trains inside PEFT's
  LoRA layers: it puts the frozen SVD factors of W into PEFT's ``lora_A.weight`` = Σ_r V_rᵀ (r×K) and
  ``lora_B.weight`` = U_r (N×r) and adds the r×r R as the layer's ``default_lora_latent_mapping``, with
  ``ΔW = (lora_alpha/r)·B R A``. Its pinned PEFT 0.10 removes ``.default`` from every saved key, so the
  file holds ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` and
  ``<module>_lora_latent_mapping.weight`` (their loaders put ``.default`` back with
  ``.replace("_lora_latent", ".default_lora_latent")``); ``<module>.default_lora_latent_mapping.weight``
  (a state dict saved by hand) is read too. Their GLUE scripts use ``task_type="SEQ_CLS"`` and save the
  ``classifier`` tensors with ``"modules_to_save": null``, as PEFT does: PEFT adds the task's head
  (``classifier``, ``score``, ``pre_classifier``; ``qa_outputs`` for question answering) to
  ``modules_to_save`` by itself. :func:`import_peft` does the same and builds ``LoRAXSLinear`` layers
  holding exactly the file's factors (``save_adapter`` stores them: our own SVD would not reproduce the
  authors' factors bit for bit).
* TLoRA (github.com/itanvir/tlora, ``tlora.py``): ``TLoRALayer`` keeps the base layer as ``.linear`` and
  holds ``random_A`` (K×r, frozen), ``lora_B`` (r×r, trains, starts at 0), ``random_C`` (r×N, frozen)
  and ``lora_scaling`` (shape (1,), trains, starts at 1), with ``Δy = dropout(lora_scaling·x A B C)``,
  dropout 0.5 on the output after the scaling. ``experiments.py`` saves the whole model with
  ``torch.save(model)``, a pickle: :func:`import_tlora` takes that model object (or its
  ``state_dict()``), maps their module ``M`` (``M.linear.weight``, ``M.random_A``, ...) to the model's
  module ``M``, and refuses to unpickle the file itself.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .bank_layer import AdapterBank
from .errors import PeftFormatError
from .files import write_atomically
from .layers import LoRALinear, LoRAXSLinear, LowRankLinear, TLoRALinear, base_shape, is_conv1d
from .load import Plan, apply, check_module_tensors
from .model import adapter_layers, module_tensors, modules_to_save, preserved_on_error
from .targets import ModelView

__all__ = ["export_peft", "import_peft", "import_tlora", "PeftFormatError", "read_peft", "LATENT_SUFFIXES", "latent_key",
           "TASK_HEADS", "task_heads"]

CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_PREFIX = "base_model.model."
# LoRA-XS's r×r matrix R after a module's name: the attribute its authors add to PEFT's LoRA layer, and
# the key PEFT 0.10 saves it under (it deletes ".default" from every key)
LATENT_SUFFIXES = (".default_lora_latent_mapping.weight", "_lora_latent_mapping.weight")
# The heads PEFT adds to modules_to_save by itself for a task_type (PeftModelForSequenceClassification
# and ...ForTokenClassification, ...ForQuestionAnswering); the config may still say null (PEFT ≤ 0.10)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score", "pre_classifier"),
              "TOKEN_CLS": ("classifier", "score", "pre_classifier"),
              "QUESTION_ANS": ("qa_outputs",)}
# adapter_config.json options a LoRALinear cannot represent: what each one is
_UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude vector)",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "adapters on parameters (not on linear layers)",
    "use_qalora": "QALoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
}


def _exported_factors(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, lora_alpha)`` with ``(lora_alpha / r)·B·A`` equal to the layer's ΔW."""
    if layer.method.name == "lora":  # PEFT's own parametrisation: copy, bit for bit
        return layer.lora_B.detach(), layer.lora_A.detach(), layer.alpha
    up, core, down, scale = layer.factors()
    b = up.detach().double()
    if core is not None:
        b = b * core.detach().double() if core.dim() == 1 else b @ core.detach().double()
    lora_alpha = layer.alpha
    if isinstance(scale, torch.Tensor):  # a learned scale (TLoRA's α): fold it into B, PEFT's scale is 1
        b, lora_alpha = b * scale.detach().double(), float(layer.rank)
    return b.to(up.dtype), down.detach().T.to(up.dtype), lora_alpha


def export_peft(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> list[str]:
    """Write the adapters of ``model`` as a standard LoRA adapter that ``peft.PeftModel.from_pretrained``
    (and LoRA servers) load: ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors``.

    Every method is exported exactly (see the module's table); modules registered with
    ``modules_to_save`` are written too, as PEFT writes them. A merged adapter is refused (its base
    weight already holds ΔW: the exported adapter would apply it twice). Returns the module names.
    Each file is replaced whole or not at all; the weights are written first, so an interrupted export
    may leave new weights beside the previous config, never a damaged file."""
    import safetensors.torch

    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no peft-ops adapter layers to export (inject or load one first)")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"adapters on {merged} are merged into their base weights; an exported adapter would apply "
                         f"ΔW a second time on the base model. peft_ops.unmerge(model) before export_peft")
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in layers:
        b, a, lora_alpha = _exported_factors(layer)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = b.cpu().contiguous()
        ranks[name], alphas[name] = layer.rank, lora_alpha
    saved_modules = modules_to_save(model)
    for name in saved_modules:
        for key, value in module_tensors(model, name).items():
            tensors[f"{_PREFIX}{key}"] = value.detach().cpu().contiguous()
    rank = max(set(ranks.values()), key=list(ranks.values()).count)  # the commonest; others in rank_pattern
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    input_dropouts = {layer.dropout for _, layer in layers if layer.method.dropout_site == "input"}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": any(is_conv1d(layer.base_layer) for _, layer in layers),
        # PEFT's dropout is on the adapter's input; TLoRA's (on its output) has no equivalent
        "lora_dropout": input_dropouts.pop() if len(input_dropouts) == 1 else 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return [name for name, _ in layers]


def read_peft(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (expected a PEFT adapter directory)")
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except RecursionError:
        raise PeftFormatError(f"{directory / CONFIG_NAME}: nested too deeply to parse") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{directory / CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PeftFormatError(f"{directory / CONFIG_NAME}: expected a JSON object")
    if (directory / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        try:
            tensors = load_file(directory / WEIGHTS_NAME)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise PeftFormatError(f"{directory / WEIGHTS_NAME}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from None
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors = _torch_load(directory / LEGACY_WEIGHTS_NAME)
        bad = next((k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise PeftFormatError(f"{directory / LEGACY_WEIGHTS_NAME}: entry {bad!r} is not a named tensor; expected "
                                  f"a state dict of tensors")
    else:
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return config, {k.removeprefix(_PREFIX): v for k, v in tensors.items()}


def _torch_load(path: Path) -> dict:
    """A ``torch.save`` file of a state dict, read without running code from it."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses objects other than tensors and containers
        found = re.search(r"GLOBAL (\S+)", str(e))  # the first class it refused, if torch says
        raise PeftFormatError(
            f"{path}: holds Python objects other than tensors (a pickled model, as torch.save(model) writes"
            f"{'; here ' + found.group(1) if found else ''}), which loading would run as code, so it is refused. "
            f"Only for a file you trust: torch.load(path, weights_only=False).state_dict() gives its state "
            f"dict") from None
    except Exception as e:  # a truncated or garbled file: torch raises several kinds of error
        raise PeftFormatError(f"{path}: not a readable torch.save file ({type(e).__name__}: {e})") from None
    if not isinstance(loaded, dict):
        raise PeftFormatError(f"{path}: holds a {type(loaded).__name__}; expected a state dict")
    return loaded


def latent_key(tensors, name: str) -> str | None:
    """The key of module ``name``'s LoRA-XS latent r×r mapping among ``tensors``' keys, or None."""
    return next((name + suffix for suffix in LATENT_SUFFIXES if name + suffix in tensors), None)


def task_heads(config: dict) -> tuple[str, ...]:
    """The heads PEFT saves whole for the config's ``task_type`` although ``modules_to_save`` omits them."""
    return TASK_HEADS.get(config.get("task_type"), ()) if isinstance(config.get("task_type"), str) else ()


def _number(value, where: str, what: str, *, integer: bool = False):
    """``value`` from adapter_config.json if it is a number (an integer if ``integer``), else an error
    naming the file and the entry ``what``."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise PeftFormatError(f"{where}: {what}={value!r}; expected {'an integer' if integer else 'a finite number'}")
    return value


def _pattern_value(config: dict, field: str, name: str, where: str):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: a key matches a module name's tail; ``(key,
    value)`` of the first that matches, else None."""
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise PeftFormatError(f"{where}: {field}={patterns!r}; expected an object of module-name patterns")
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return key, value
        except re.error as e:
            raise PeftFormatError(f"{where}: {field} key {key!r} is not a valid regular expression ({e}); matched "
                                  f"against module {name!r}") from None
    return None


def _module_config(config: dict, name: str, where: str, r: int) -> tuple[int, float]:
    """Module ``name``'s rank and lora_alpha: the config's, or its ``rank_pattern``/``alpha_pattern``'s,
    checked to be numbers (``r``: the tensors' rank, the default when the config has none)."""
    found = _pattern_value(config, "rank_pattern", name, where)
    rank = _number(found[1], where, f"rank_pattern[{found[0]!r}] (module {name!r})", integer=True) if found else \
        _number(config.get("r", r), where, "r", integer=True)
    found = _pattern_value(config, "alpha_pattern", name, where)
    alpha = _number(found[1], where, f"alpha_pattern[{found[0]!r}] (module {name!r})") if found else \
        _number(config.get("lora_alpha", 8), where, "lora_alpha")
    return rank, float(alpha)


def _plain_target(view: ModelView, name: str, where: str) -> nn.Module:
    module = view.target(name, PeftFormatError, where)
    if isinstance(module, (LowRankLinear, AdapterBank)):
        raise PeftFormatError(f"{where}: module {name!r} already has an adapter; peft_ops.unload(model) first")
    return module


def import_peft(model: nn.Module, directory: str | os.PathLike, *, backend: str = "auto") -> list[str]:
    """Load a PEFT LoRA adapter (a directory with ``adapter_config.json`` and ``adapter_model.safetensors``)
    into ``model`` as peft-ops layers, in place; returns the adapted module names.

    Each adapted module becomes a ``LoRALinear`` with the file's A, B and scaling (``lora_alpha / r``,
    or ``lora_alpha / √r`` with rsLoRA; ``rank_pattern``/``alpha_pattern`` per module), so it runs on
    the fused kernels; a file written by the LoRA-XS authors' code (with a latent r×r mapping) becomes
    ``LoRAXSLinear`` layers holding its factors exactly. ``modules_to_save`` tensors — and, as PEFT does,
    those of the task's head for ``task_type`` ``SEQ_CLS``, ``TOKEN_CLS`` or ``QUESTION_ANS`` — are copied
    into the model and registered (``save_adapter`` carries them). The copy of a base weight PEFT saves
    beside an adapter on the output head (``lm_head.base_layer.weight``) is accepted if it equals the
    model's. Refused, with the model untouched: other PEFT methods, DoRA, trained biases, embedding or
    convolution targets, any option or tensor a peft-ops layer cannot represent, modules missing from
    the model or of another shape, and PEFT's ``PeftModel`` in place of the model it wraps."""
    where = os.fspath(directory)
    config_where = os.path.join(where, CONFIG_NAME)
    config, tensors = read_peft(directory)
    view = ModelView.of(model)
    view.refuse_peft_wrapper(PeftFormatError, where)
    if config.get("peft_type") != "LORA":
        raise PeftFormatError(f"{where}: peft_type={config.get('peft_type')!r}; only LoRA adapters (peft_type='LORA') "
                              f"can be imported")
    refused = [f"{key} ({what})" for key, what in _UNSUPPORTED.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r} (trained biases)")
    if refused:
        raise PeftFormatError(f"{where}: the adapter uses {', '.join(refused)}, which peft-ops layers cannot represent")
    embedding = sorted(k for k in tensors if ".lora_embedding_" in k)
    if embedding:
        raise PeftFormatError(f"{where}: the adapter targets embedding layers ({embedding[0]}, ...); peft-ops adapts "
                              f"only nn.Linear and Conv1D layers")
    factors = (".lora_A.weight", ".lora_B.weight")
    modules = sorted({k.removesuffix(f) for k in tensors for f in factors if k.endswith(f)})
    adapter_keys = {f"{name}{suffix}" for name in modules for suffix in (*factors, *LATENT_SUFFIXES)} & set(tensors)
    # the base weight (and bias) PEFT saves beside an adapter on an output head or an embedding
    base_copies = {k for k in set(tensors) - adapter_keys
                   if k.partition(".base_layer.")[0] in modules and k.partition(".base_layer.")[2] in ("weight", "bias")}
    saved_modules = _saved_modules(config, config_where, set(tensors) - adapter_keys - base_copies, view)
    extra = {k: v for k, v in tensors.items() if any(k.startswith(m + ".") for m in saved_modules)}
    unknown = sorted(set(tensors) - adapter_keys - base_copies - set(extra))
    if unknown:
        raise PeftFormatError(_not_understood(where, unknown, config))
    if not modules:
        raise PeftFormatError(f"{where}: the file holds no lora_A/lora_B tensors")
    plan = Plan(where, error=PeftFormatError, module_tensors=extra)
    plan.saved_whole = view.check_saved_whole(saved_modules, modules, PeftFormatError, where)
    check_module_tensors(model, {k: (v.dtype, tuple(v.shape)) for k, v in extra.items()}, plan.saved_whole,
                         PeftFormatError, where)
    dropout = _number(config.get("lora_dropout", 0.0), config_where, "lora_dropout")
    with preserved_on_error(model):
        for name in modules:
            a, b = (tensors.get(name + f) for f in factors)
            if a is None or b is None:
                missing, present = ("lora_A", "lora_B") if a is None else ("lora_B", "lora_A")
                raise PeftFormatError(f"{where}: module {name!r}: {name}.{missing}.weight is missing (the file has "
                                      f"{name}.{present}.weight)")
            base = _plain_target(view, name, where)
            n, k = base_shape(base)
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or tuple(a.shape) != (r, k) or tuple(b.shape) != (n, r):
                raise PeftFormatError(f"{where}: module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                      f"expected (r, {k}) and ({n}, r) for the model's {n}×{k} layer")
            expected_r, lora_alpha = _module_config(config, name, config_where, r)
            if expected_r != r:
                raise PeftFormatError(f"{where}: module {name!r}: the tensors have rank {r}, the config says {expected_r}")
            # our scale is alpha / r: rsLoRA's lora_alpha / √r is alpha = lora_alpha·√r
            alpha = lora_alpha * math.sqrt(r) if config.get("use_rslora") else lora_alpha
            key = latent_key(tensors, name)
            try:
                if key is None:
                    layer = LoRALinear(base, r, alpha=alpha, dropout=dropout, backend=backend)
                    trained = {"lora_A": a, "lora_B": b}
                else:
                    _check_latent(where, key, tensors[key], r)
                    layer = LoRAXSLinear(base, r, alpha=alpha, dropout=dropout, backend=backend,
                                         frozen_factors={"loraxs_B": b, "loraxs_A": a})
                    trained = {"loraxs_R": tensors[key]}
            except (TypeError, ValueError) as e:
                raise PeftFormatError(f"{where}: module {name!r}: {e}") from None
            _check_base_copies(where, name, base, {k: tensors[k] for k in base_copies
                                                  if k.partition(".base_layer.")[0] == name})
            with torch.no_grad():
                for tensor_name, value in trained.items():
                    getattr(layer, tensor_name).copy_(value)
            plan.new[name] = layer
        apply(model, plan)
    return modules


def _saved_modules(config: dict, config_where: str, keys: set[str], view: ModelView) -> list[str]:
    """The model's modules the file saves whole: those ``modules_to_save`` names, and — as PEFT adds them
    for the task whatever the config says — the task's heads among ``keys`` (the tensors outside the
    adapters)."""
    declared = config.get("modules_to_save") or []
    if not isinstance(declared, list) or not all(isinstance(s, str) and s for s in declared):
        raise PeftFormatError(f"{config_where}: modules_to_save={declared!r}; expected a list of module names")

    def matching(patterns):
        return [n for n in view.modules if any(n == p or n.endswith("." + p) for p in patterns)]

    heads = [n for n in matching(task_heads(config)) if any(k.startswith(n + ".") for k in keys)]
    return list(dict.fromkeys(matching(declared) + heads))


def _not_understood(where: str, unknown: list[str], config: dict) -> str:
    """What each kind of tensor a LoRALinear or LoRAXSLinear has no place for is."""
    groups: dict[str, list[str]] = {}
    for key in unknown:
        if "lora_magnitude_vector" in key:
            why = "a DoRA magnitude vector"
        elif ".base_layer." in key:
            why = "a copy of a base layer's weights, of a module without LoRA factors in the file"
        elif "lora_" in key:
            why = "a LoRA tensor of a kind peft-ops cannot represent (another method or option?)"
        else:
            why = (f"a tensor of no adapted module, and of no module saved whole: modules_to_save is "
                   f"{config.get('modules_to_save')!r} and task_type {config.get('task_type')!r}, which names no "
                   f"head PEFT saves whole")
        groups.setdefault(why, []).append(key)
    return f"{where}: tensors peft-ops has no place for: " + "; ".join(
        f"{keys[0]!r}{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''} is {why}" for why, keys in groups.items())


def _check_base_copies(where: str, name: str, base: nn.Module, copies: dict[str, torch.Tensor]) -> None:
    """PEFT saves an output head's (or embedding's) base weight beside its adapter, in case the vocabulary
    was resized: accepted when it is the model's own, else refused (an adapter never replaces a weight)."""
    for key, stored in copies.items():
        own = getattr(base, key.rpartition(".")[2], None)
        if own is None or tuple(own.shape) != tuple(stored.shape):
            detail = f"it is {tuple(stored.shape)}, the model's is {None if own is None else tuple(own.shape)}"
        elif not torch.equal(stored.to(own.dtype), own.detach().cpu()):
            detail = "same shape, other values"
        else:
            continue
        raise PeftFormatError(
            f"{where}: module {name!r}: {key} is the copy of the base layer's {key.rpartition('.')[2]} that PEFT saves "
            f"beside an adapter on an output head or embedding (in case the vocabulary was resized), and it differs "
            f"from the model's ({detail}): the adapter was trained on another base model. peft-ops adapters never "
            f"replace a base weight; load it into the base model it was trained with")


def _check_latent(where: str, key: str, latent: torch.Tensor, r: int) -> None:
    if tuple(latent.shape) != (r, r):
        raise PeftFormatError(f"{where}: {key} (the LoRA-XS latent mapping) has shape {tuple(latent.shape)}; "
                              f"expected ({r}, {r})")


_TLORA_KEYS = ("random_A", "random_C", "lora_B", "lora_scaling")


def _tlora_state(checkpoint) -> tuple[str, dict]:
    """``(where, state dict)`` of what :func:`import_tlora` is given."""
    if isinstance(checkpoint, nn.Module):  # the authors' model object, as their experiments.py saves it
        return f"the {type(checkpoint).__name__} given as checkpoint", checkpoint.state_dict()
    if isinstance(checkpoint, dict):
        return "checkpoint", checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint={type(checkpoint).__name__}; expected a state dict, a model (nn.Module) or the "
                        f"path of a .safetensors or torch.save file")
    path = Path(checkpoint)
    where = os.fspath(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such checkpoint file")
    if not path.is_file():
        raise PeftFormatError(f"{where}: not a regular file (a directory, device or pipe); expected a checkpoint file")
    if path.suffix != ".safetensors":
        return where, _torch_load(path)
    from safetensors.torch import load_file

    try:
        return where, load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise PeftFormatError(f"{where}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _tlora_rank(k: int, n: int, random_a, random_c, core) -> int:
    """The rank most of the three tensors agree on (A: K×r, C: r×N, B: r×r), so that the odd one out is
    the one blamed; -1 if none tells."""
    votes = [t.shape[i] for t, i, j, size in ((random_a, 1, 0, k), (random_c, 0, 1, n))
             if t.dim() == 2 and t.shape[j] == size]
    votes += [core.shape[0]] if core.dim() == 2 and core.shape[0] == core.shape[1] else []
    return max(votes, key=votes.count) if votes else -1


def import_tlora(model: nn.Module, checkpoint, *, dropout: float = 0.0, backend: str = "auto") -> list[str]:
    """Load a TLoRA checkpoint in its authors' layout into ``model`` as ``TLoRALinear`` layers, exactly;
    returns the module names.

    ``checkpoint``: the authors' model object (an ``nn.Module``: its ``state_dict()`` is read), a state
    dict, or the path of a ``.safetensors`` file or of a ``torch.save`` file of a state dict (read with
    ``weights_only=True``). Their ``experiments.py`` saves the whole model, ``torch.save(model)``: a
    pickle, which is refused, since unpickling runs code; for a file you trust,
    ``torch.load(path, weights_only=False)`` gives the model to pass here. Per module ``<name>``:
    ``<name>.random_A`` (K×r), ``<name>.random_C`` (r×N), ``<name>.lora_B`` (r×r) and
    ``<name>.lora_scaling`` (α: a tensor of one value, or a number), with ``Δy = α·x A B C``; their
    ``<name>.linear.*`` (the wrapped base layer) and every other tensor are ignored, and a
    ``base_model.model.`` prefix too. The authors apply dropout 0.5 to the adapter's output: pass
    ``dropout=0.5`` to go on training as they do. The frozen A and C are kept as given (``save_adapter``
    stores them: our seeded generator would not redraw them). On any error the model is left
    untouched."""
    where, checkpoint = _tlora_state(checkpoint)
    state = {k.removeprefix(_PREFIX): v for k, v in checkpoint.items() if isinstance(k, str)}
    modules = sorted({k.rpartition(".")[0] for k in state if k.rpartition(".")[2] in _TLORA_KEYS})
    if not modules:
        raise PeftFormatError(f"{where}: no TLoRA tensors (keys ending in {', '.join(_TLORA_KEYS)})")
    view = ModelView.of(model)
    view.refuse_peft_wrapper(PeftFormatError, where)
    plan = Plan(where, error=PeftFormatError)
    with preserved_on_error(model):
        for name in modules:
            missing = [t for t in _TLORA_KEYS if f"{name}.{t}" not in state]
            if missing:
                raise PeftFormatError(f"{where}: module {name!r} lacks {missing}")
            values = {}
            for t in _TLORA_KEYS:
                value = state[f"{name}.{t}"]
                if t == "lora_scaling" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    value = torch.tensor([float(value)])  # α given as a plain number
                if not isinstance(value, torch.Tensor):
                    raise PeftFormatError(f"{where}: {name}.{t} is a {type(value).__name__}; expected a tensor")
                values[t] = value
            base = _plain_target(view, name, where)
            n, k = base_shape(base)
            random_a, random_c, core, scaling = (values[t] for t in _TLORA_KEYS)
            r = _tlora_rank(k, n, random_a, random_c, core)
            if r < 1:
                raise PeftFormatError(f"{where}: module {name!r}: random_A {tuple(random_a.shape)}, random_C "
                                      f"{tuple(random_c.shape)} and lora_B {tuple(core.shape)} fit no rank; expected "
                                      f"({k}, r), (r, {n}) and (r, r) for the model's {n}×{k} layer")
            wrong = [f"{name}.{what} has shape {tuple(tensor.shape)}; expected {expected}"
                     for what, tensor, expected in (("random_A", random_a, (k, r)), ("random_C", random_c, (r, n)),
                                                    ("lora_B", core, (r, r)))
                     if tuple(tensor.shape) != expected]
            if wrong:
                raise PeftFormatError(f"{where}: {'; '.join(wrong)} (A: K×r, C: r×N, B: r×r, at rank {r}) for the "
                                      f"model's {n}×{k} layer")
            if scaling.numel() != 1:
                raise PeftFormatError(f"{where}: {name}.lora_scaling has {scaling.numel()} values; expected one (α)")
            try:
                layer = TLoRALinear(base, r, alpha=float(scaling), dropout=dropout, backend=backend,
                                    frozen_factors={"tlora_A": random_a, "tlora_C": random_c})
            except (TypeError, ValueError) as e:
                raise PeftFormatError(f"{where}: module {name!r}: {e}") from None
            with torch.no_grad():
                layer.tlora_B.copy_(core)
                layer.tlora_alpha.copy_(scaling.reshape(1))
            plan.new[name] = layer
        apply(model, plan)
    return modules
