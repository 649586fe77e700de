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

The authors' checkpoints:

* LoRA-XS (github.com/MohammadrezaBanaei/LoRA-XS) trains inside PEFT's LoRA layers: its
  ``adapter_model`` holds ``lora_A.weight`` = Σ_r V_rᵀ (r×K) and ``lora_B.weight`` = U_r (N×r) — the
  frozen SVD factors — and ``default_lora_latent_mapping.weight`` = R (r×r), with
  ``ΔW = (lora_alpha/r)·B R A``. :func:`import_peft` recognises the latent mapping and builds
  ``LoRAXSLinear`` layers holding exactly those factors (save them with ``include_frozen=True``:
  our own SVD would not reproduce the authors' factors bit for bit).
* TLoRA: state dicts holding, per module, ``random_A`` (K×r), ``random_C`` (r×N), ``lora_B`` (r×r)
  and ``lora_scaling`` (α), with ``Δy = α·x A B C`` — the layout the TLoRA paper describes. We could
  not read the authors' released code to confirm the key names and orientations; :func:`import_tlora`
  takes this layout and refuses any other shape with an error naming what it expected.
"""
from __future__ import annotations

import json
import math
import os
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

__all__ = ["export_peft", "import_peft", "import_tlora", "PeftFormatError", "read_peft", "LATENT_KEYS"]

CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
_PREFIX = "base_model.model."
# LoRA-XS's r×r matrix, as its authors' code names the attribute it adds to PEFT's LoRA layer
LATENT_KEYS = ("default_lora_latent_mapping.weight", "lora_latent_mapping.weight")
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
        tensors = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return config, {k.removeprefix(_PREFIX): v for k, v in tensors.items()}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: a key matches a module name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


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
    ``LoRAXSLinear`` layers holding its factors exactly. ``modules_to_save`` tensors are copied into
    the model and registered (``save_adapter`` carries them). Refused, with the model untouched: other
    PEFT methods, DoRA, trained biases, embedding or convolution targets, any option or tensor a
    peft-ops layer cannot represent, and modules missing from the model or of another shape."""
    where = os.fspath(directory)
    config, tensors = read_peft(directory)
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
    view = ModelView.of(model)
    saved_modules = list(config.get("modules_to_save") or [])
    saved_modules = [n for n in view.modules if any(n == s or n.endswith("." + s) for s in saved_modules)]
    extra = {k: v for k, v in tensors.items() if any(k.startswith(m + ".") for m in saved_modules)}
    modules = sorted({k.rpartition(".lora_A.weight")[0] for k in tensors if k.endswith(".lora_A.weight")})
    understood = set(extra)
    for name in modules:
        understood |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight", *(f"{name}.{k}" for k in LATENT_KEYS)}
    unknown = sorted(set(tensors) - understood)
    if unknown:
        raise PeftFormatError(f"{where}: tensors {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not LoRA "
                              f"factors peft-ops can represent (DoRA magnitudes, biases, another method?)")
    if not modules:
        raise PeftFormatError(f"{where}: the file holds no lora_A/lora_B tensors")
    plan = Plan(where, error=PeftFormatError, module_tensors=extra)
    plan.saved_whole = view.check_saved_whole(saved_modules, modules, PeftFormatError, where)
    check_module_tensors(model, {k: (v.dtype, tuple(v.shape)) for k, v in extra.items()}, plan.saved_whole,
                         PeftFormatError, where)
    with preserved_on_error(model):
        for name in modules:
            base = _plain_target(view, name, where)
            n, k = base_shape(base)
            a, b = tensors[f"{name}.lora_A.weight"], tensors.get(f"{name}.lora_B.weight")
            if b is None:
                raise PeftFormatError(f"{where}: {name}.lora_B.weight is missing")
            r = a.shape[0]
            if a.dim() != 2 or tuple(a.shape) != (r, k) or tuple(b.shape) != (n, r):
                raise PeftFormatError(f"{where}: module {name!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                                      f"expected (r, {k}) and ({n}, r) for the model's {n}×{k} layer")
            expected_r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", r))
            if expected_r != r:
                raise PeftFormatError(f"{where}: module {name!r}: the tensors have rank {r}, the config says {expected_r}")
            lora_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8)))
            # our scale is alpha / r: rsLoRA's lora_alpha / √r is alpha = lora_alpha·√r
            alpha = lora_alpha * math.sqrt(r) if config.get("use_rslora") else lora_alpha
            dropout = float(config.get("lora_dropout", 0.0))
            latent = next((tensors[f"{name}.{key}"] for key in LATENT_KEYS if f"{name}.{key}" in tensors), None)
            try:
                if latent is None:
                    layer = LoRALinear(base, r, alpha=alpha, dropout=dropout, backend=backend)
                    trained = {"lora_A": a, "lora_B": b}
                else:
                    _check_latent(where, name, latent, r)
                    layer = LoRAXSLinear(base, r, alpha=alpha, dropout=dropout, backend=backend,
                                         frozen_factors={"loraxs_B": b, "loraxs_A": a})
                    trained = {"loraxs_R": latent}
            except (TypeError, ValueError) as e:
                raise PeftFormatError(f"{where}: module {name!r}: {e}") from None
            with torch.no_grad():
                for tensor_name, value in trained.items():
                    getattr(layer, tensor_name).copy_(value)
            plan.new[name] = layer
        apply(model, plan)
    return modules


def _check_latent(where: str, name: str, latent: torch.Tensor, r: int) -> None:
    if tuple(latent.shape) != (r, r):
        raise PeftFormatError(f"{where}: module {name!r}: the LoRA-XS latent mapping has shape {tuple(latent.shape)}; "
                              f"expected ({r}, {r})")


_TLORA_KEYS = ("random_A", "random_C", "lora_B", "lora_scaling")


def import_tlora(model: nn.Module, checkpoint, *, dropout: float = 0.0, backend: str = "auto") -> list[str]:
    """Load a TLoRA checkpoint in its authors' layout into ``model`` as ``TLoRALinear`` layers, exactly;
    returns the module names.

    ``checkpoint``: a state dict, or the path of a ``.safetensors`` file or a ``torch.save`` file (read
    with ``weights_only=True``). Per module ``<name>``: ``<name>.random_A`` (K×r), ``<name>.random_C``
    (r×N), ``<name>.lora_B`` (r×r) and ``<name>.lora_scaling`` (α, one value), with
    ``Δy = α·x A B C``; a ``base_model.model.`` prefix is ignored. The frozen A and C are kept as given
    (save with ``include_frozen=True``: our seeded generator would not redraw them). On any error the
    model is left untouched."""
    where = "checkpoint" if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    if not isinstance(checkpoint, dict):
        path = Path(checkpoint)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(path)
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix(_PREFIX): v for k, v in checkpoint.items()}
    modules = sorted({k.rpartition(".")[0] for k in state if k.rpartition(".")[2] in _TLORA_KEYS})
    if not modules:
        raise PeftFormatError(f"{where}: no TLoRA tensors (keys ending in {', '.join(_TLORA_KEYS)})")
    view = ModelView.of(model)
    plan = Plan(where, error=PeftFormatError)
    with preserved_on_error(model):
        for name in modules:
            missing = [t for t in _TLORA_KEYS if f"{name}.{t}" not in state]
            if missing:
                raise PeftFormatError(f"{where}: module {name!r} lacks {missing}")
            base = _plain_target(view, name, where)
            n, k = base_shape(base)
            random_a, random_c, core, scaling = (state[f"{name}.{t}"] for t in _TLORA_KEYS)
            r = core.shape[0] if core.dim() == 2 else -1  # the r×r core tells the rank
            for what, tensor, expected in (("random_A", random_a, (k, r)), ("random_C", random_c, (r, n)),
                                           ("lora_B", core, (r, r))):
                if tuple(tensor.shape) != expected:
                    raise PeftFormatError(f"{where}: {name}.{what} has shape {tuple(tensor.shape)}; expected {expected} "
                                          f"(A: K×r, C: r×N, B: r×r) for the model's {n}×{k} layer")
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
