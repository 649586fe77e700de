"""Compact adapter files: safetensors holding only the trainable tensors, plus the metadata needed to
rebuild the adapter and to refuse a file that doesn't belong to the model.

Metadata (all strings, as safetensors requires):

* ``format`` / ``format_version``: ``peft-ops-adapter`` / ``1``;
* ``adapter``: JSON, one entry per module: method, rank, alpha, dropout, seed, options, shapes, the
  adapter dtype, a fingerprint of the base weight, and for methods with frozen factors (LoRA-XS,
  TLoRA) a signature of the factors that loading regenerates (column norms — LoRA-XS's singular
  values — and projections on a fixed probe, sensitive to sign and subspace);
* ``checksum``: SHA-256 over the ``adapter`` JSON and every tensor's bytes, so a damaged or edited file
  is refused.

Frozen factors are regenerated at load (seeded generator or the base weight's SVD) unless saved with
``include_frozen=True``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from .inject import _swap_in, adapter_layers, preserved_on_error
from .layers import LAYER_CLASSES, LowRankLinear, _base_weight, is_adaptable, is_conv1d
from .dispatch import check_backend
from .methods import get_method
from .modules_to_save import check_module_tensors, load_module_tensors, module_tensors, modules_to_save, \
    register_modules_to_save, unsaved_trainable
from .svd import probe

__all__ = ["save_adapter", "load_adapter", "AdapterFileError", "AdapterFileInfo"]

FORMAT, FORMAT_VERSION = "peft-ops-adapter", "1"
_FINGERPRINT_SAMPLES = 16
_FINGERPRINT_RTOL = 1e-2  # a bf16 copy of the same weights passes; another model's weights don't
# Regenerated factors match the saved ones to rounding when the base weight is the same; a base cast to
# another dtype (the fingerprint allows bf16 copies) moves its SVD by about that dtype's precision.
_SIGNATURE_RTOL = 1e-4
_SIGNATURE_EPS_FACTOR = 8


class AdapterFileError(ValueError):
    """An adapter file that is damaged, or that does not belong to the model it is loaded into."""


@dataclass(frozen=True)
class AdapterFileInfo:
    path: str
    modules: int
    trainable_parameters: int
    tensor_bytes: int  # bytes of the tensors stored (the trainable ones, unless include_frozen)
    file_bytes: int

    def __str__(self) -> str:
        return (f"{self.path}: {self.modules} modules, {self.trainable_parameters} trainable parameters, "
                f"{self.tensor_bytes} tensor bytes in a {self.file_bytes}-byte file")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2/DTensor shard (a collective: every rank must call), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _floats(t: torch.Tensor) -> list[float]:
    return [float(f"{v:.7g}") for v in t.detach().double().cpu().tolist()]


def _unmerged_base_weight(module: nn.Module) -> torch.Tensor:
    """The logical N×K weight of a base layer, or of an adapter layer's base as it was before merging."""
    if isinstance(module, LowRankLinear):
        if module.merged:
            original = module._original_weight
            return original.T if is_conv1d(module.base_layer) else original
        module = module.base_layer
    return _base_weight(module)


def _fingerprint(module: nn.Module) -> list[float]:
    """Values of the logical N×K base weight at fixed pseudo-random positions (device-independent)."""
    w = _full(_unmerged_base_weight(module))
    idx = torch.randint(w.numel(), (_FINGERPRINT_SAMPLES,), generator=torch.Generator().manual_seed(0))
    k = w.shape[1]
    return _floats(w.detach()[(idx // k).to(w.device), (idx % k).to(w.device)])


def _signature(layer: LowRankLinear) -> dict[str, list[float]]:
    """Column norms and probe projections of U and D: what a regeneration must reproduce."""
    up, _, down, _ = layer.factors()
    sig = {}
    for role, f in (("up", up), ("down", down)):
        f = _full(f).detach().double().cpu()
        sig[role] = _floats(torch.cat([f.norm(dim=0), probe(f.shape[0]) @ f]))
    return sig


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _checksum(adapter_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(adapter_json.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(str(tuple(tensors[name].shape)).encode() + str(tensors[name].dtype).encode())
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


def save_adapter(model: nn.Module, path: str | os.PathLike, *, include_frozen: bool = False) -> AdapterFileInfo:
    """Write the adapters of ``model`` to a safetensors file at ``path``.

    Only trainable tensors are stored; frozen factors are regenerated at load unless
    ``include_frozen=True``. The modules registered with ``modules_to_save`` are stored whole. Any
    other trainable parameter is refused, naming it: the file would silently lose it. Returns sizes:
    the file against the tensor bytes. On a model sharded with FSDP2, call it on every rank (it
    gathers the shards); give rank 0 the real path."""
    import safetensors.torch

    from .files import write_atomically

    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no peft-ops adapter layers to save (inject or load one first)")
    path = _checked_path(path, writing=True)
    lost = unsaved_trainable(model)
    if lost:
        listed = ", ".join(f"{n} ({count:,} values)" for n, count in lost[:6]) + (" ..." if len(lost) > 6 else "")
        raise ValueError(
            f"save_adapter: {len(lost)} trainable parameters outside the adapters would not be saved "
            f"({sum(c for _, c in lost):,} values: {listed}). Register their modules with "
            f"inject(..., modules_to_save=[...]) to save them too, or freeze them (requires_grad_(False))")
    modules, tensors = {}, {}
    for name, layer in layers:
        stored = [n for n, _ in layer.named_parameters(recurse=False)]
        frozen = list(layer.method.frozen)
        if include_frozen:
            stored += frozen
        for tensor_name in stored:
            tensors[f"{name}.{tensor_name}"] = _full(getattr(layer, tensor_name)).detach().cpu().contiguous()
        modules[name] = {
            "method": layer.method.name, "rank": layer.rank, "alpha": layer.alpha, "dropout": layer.dropout,
            "seed": layer.seed, "options": layer.options,
            "in_features": layer.in_features, "out_features": layer.out_features,
            "dtype": str(next(iter(layer.parameters(recurse=False))).dtype).removeprefix("torch."),
            "base": {"bias": layer.base_layer.bias is not None, "fingerprint": _fingerprint(layer),
                     "dtype": str(layer.base_layer.weight.dtype).removeprefix("torch.")},
            "tensors": stored,
            **({"frozen_signature": _signature(layer)} if frozen else {}),
        }
    saved_modules = {}
    for name in modules_to_save(model):
        states = module_tensors(model, name)
        tensors.update({k: _full(v).detach().cpu().contiguous() for k, v in states.items()})
        saved_modules[name] = sorted(k.removeprefix(name + ".") for k in states)
    adapter_json = json.dumps({"modules": modules, **({"modules_to_save": saved_modules} if saved_modules else {})},
                              sort_keys=True)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter": adapter_json,
                "checksum": _checksum(adapter_json, tensors)}
    write_atomically(path, safetensors.torch.save(tensors, metadata=metadata))
    trainable = sum(p.numel() for _, layer in layers for p in layer.parameters(recurse=False)) + \
        sum(p.numel() for n in saved_modules for p in model.get_submodule(n).parameters())
    return AdapterFileInfo(os.fspath(path), len(layers), trainable,
                           sum(t.numel() * t.element_size() for t in tensors.values()), os.path.getsize(path))


def _checked_path(path, *, writing: bool) -> str:
    """``path`` as a string, refused with an error that names it when it can't be the adapter file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}; expected a file path (str or os.PathLike)")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path={path!r} is a directory; expected the path of an adapter file "
                                f"(e.g. {os.path.join(path, 'adapter.safetensors')!r})")
    if writing:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path={path!r}: the directory {folder!r} does not exist; create it first")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r}: no such adapter file")
    return path


def _read(path) -> tuple[dict, dict[str, torch.Tensor], dict[str, list[str]]]:
    from safetensors import safe_open

    path = _checked_path(path, writing=False)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise AdapterFileError(f"{os.fspath(path)}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{os.fspath(path)}: not a peft-ops adapter file (metadata format="
                               f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise AdapterFileError(f"{os.fspath(path)}: format_version={metadata.get('format_version')!r}; "
                               f"this peft-ops reads version {FORMAT_VERSION}")
    adapter_json = metadata.get("adapter", "")
    if metadata.get("checksum") != _checksum(adapter_json, tensors):
        raise AdapterFileError(f"{os.fspath(path)}: checksum mismatch: the file is damaged or was edited")
    try:
        adapter = json.loads(adapter_json)
        modules, saved_modules = adapter["modules"], adapter.get("modules_to_save", {})
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterFileError(f"{os.fspath(path)}: adapter metadata is unreadable ({e})") from None
    if not isinstance(modules, dict) or not all(isinstance(e, dict) for e in modules.values()):
        raise AdapterFileError(f"{os.fspath(path)}: adapter metadata is malformed (modules must map names to entries)")
    if not isinstance(saved_modules, dict) or not all(isinstance(v, list) for v in saved_modules.values()):
        raise AdapterFileError(f"{os.fspath(path)}: adapter metadata is malformed (modules_to_save must map names "
                               f"to tensor lists)")
    return modules, tensors, saved_modules


def _close(a: list[float], b: list[float], rtol: float) -> bool:
    """Equal lengths, every value within ``rtol`` of the largest magnitude in ``a``."""
    if len(a) != len(b):
        return False
    ref = max(max(map(abs, a), default=0.0), 1e-12)
    return all(abs(x - y) <= rtol * ref for x, y in zip(a, b))


def _signature_rtol(saved_dtype: str, dtype: torch.dtype) -> float:
    """The signature tolerance for a base saved in ``saved_dtype`` and loaded in ``dtype``: the coarser
    dtype's precision bounds how far the regenerated factors can move."""
    eps = max(torch.finfo(_ADAPTER_DTYPES.get(saved_dtype, torch.float32)).eps, torch.finfo(dtype).eps)
    return max(_SIGNATURE_RTOL, _SIGNATURE_EPS_FACTOR * eps)


def _signature_mismatch(saved: dict, now: dict, rank: int, rtol: float) -> str | None:
    """The first signature value that differs beyond ``rtol`` times its column's norm, described; or None.
    A signature is [column norms (rank values), probe projections (rank values)] per factor."""
    quantities = ("column norm", "probe projection")
    for role in ("up", "down"):
        a, b = saved.get(role, []), now[role]
        if len(a) != len(b):
            return f"the {role} factor's signature has {len(a)} values, the regenerated one {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            scale = max(abs(a[i % rank]), 1e-12)  # the column's norm
            if abs(x - y) > rtol * scale:
                return (f"{quantities[i // rank]} {i % rank} of the {role} factor is {y:.7g}, the file says "
                        f"{x:.7g} (difference {abs(x - y) / scale:.2g} of the column's norm, tolerance {rtol:.2g})")
    return None


def _base_for(path, name: str, entry: dict, module: nn.Module | None) -> nn.Module:
    """The base linear layer the entry applies to, checked: ``module`` itself, or the base of an adapter
    layer of the same method and rank (whose weights the file then replaces)."""
    where = f"{os.fspath(path)}: module {name!r}"
    if module is None:
        raise AdapterFileError(f"{where} is not in the model (this file is for another model)")
    base = module
    if isinstance(module, LowRankLinear):
        if (module.method.name, module.rank) != (entry["method"], entry["rank"]):
            raise AdapterFileError(f"{where}: the file holds a {entry['method']} adapter of rank {entry['rank']}, the "
                                   f"model has a {module.method.name} adapter of rank {module.rank} there")
        if module.merged:
            raise AdapterFileError(f"{where}: the model's adapter is merged; unmerge it before loading")
        base = module.base_layer
    elif not is_adaptable(module):
        raise AdapterFileError(f"{where} is a {type(module).__name__}, not a linear layer")
    shape = tuple(_base_weight(base).shape)
    if shape != (entry["out_features"], entry["in_features"]):
        raise AdapterFileError(f"{where}: the model's weight is {shape[0]}×{shape[1]}, the adapter was made for "
                               f"{entry['out_features']}×{entry['in_features']} (another base model)")
    if entry["base"]["bias"] != (base.bias is not None):
        raise AdapterFileError(f"{where}: the adapter was made for a layer {'with' if entry['base']['bias'] else 'without'}"
                               f" a bias; the model's layer {'has' if base.bias is not None else 'has none'}")
    if not _close(entry["base"]["fingerprint"], _fingerprint(module), _FINGERPRINT_RTOL):
        raise AdapterFileError(f"{where}: the base weight differs from the one the adapter was saved with "
                               f"(fingerprint mismatch: another base model, or modified weights)")
    return base


_ADAPTER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float64": torch.float64}


def _build(path, name: str, entry: dict, base: nn.Module, tensors: dict, backend: str, *,
           frozen: dict[str, torch.Tensor] | None = None) -> LowRankLinear:
    """A layer holding the entry's adapter: its frozen factors from the file, else ``frozen`` (factors
    already made for this base layer, e.g. an adapter bank's shared ones), else regenerated — and then
    checked against the file's signature — and its trainable tensors from the file."""
    where = f"{os.fspath(path)}: module {name!r}"
    dtype = _ADAPTER_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise AdapterFileError(f"{where}: dtype {entry['dtype']!r}; expected one of {', '.join(_ADAPTER_DTYPES)}")
    missing = [t for t in entry["tensors"] if f"{name}.{t}" not in tensors]
    if missing:
        raise AdapterFileError(f"{where}: tensors {missing} are missing from the file")
    method = get_method(entry["method"])
    stored_frozen = {t: tensors[f"{name}.{t}"] for t in entry["tensors"] if t in method.frozen}
    layer = LAYER_CLASSES[method.name](base, entry["rank"], alpha=entry["alpha"], dropout=entry["dropout"],
                                       seed=entry["seed"], backend=backend,
                                       frozen_factors=stored_frozen or frozen or None, **entry["options"])
    trainable = {n for n, _ in layer.named_parameters(recurse=False)}
    if set(entry["tensors"]) not in (trainable, trainable | set(method.frozen)):
        raise AdapterFileError(f"{where}: the file lists tensors {sorted(entry['tensors'])}; a {method.name} "
                               f"layer has {sorted(trainable)} (and frozen {sorted(method.frozen)})")
    for t in [*layer.parameters(recurse=False), *(getattr(layer, n) for n in method.frozen)]:
        t.data = t.data.to(dtype)
    for tensor_name in entry["tensors"]:
        value, target = tensors[f"{name}.{tensor_name}"], getattr(layer, tensor_name)
        if target.shape != value.shape:
            raise AdapterFileError(f"{where}: tensor {tensor_name!r} has shape {tuple(value.shape)}, the "
                                   f"{entry['method']} layer expects {tuple(target.shape)}")
        target.data.copy_(value)
    saved = entry.get("frozen_signature")
    if saved:
        mismatch = _signature_mismatch(saved, _signature(layer), layer.rank,
                                       _signature_rtol(entry["base"].get("dtype", "float32"), base.weight.dtype))
        if mismatch:
            raise AdapterFileError(
                f"{where}: the regenerated frozen {entry['method']} factors differ from the ones the adapter was "
                f"trained with: {mismatch}. The base weight or the code that generates the factors changed; save "
                f"with include_frozen=True to carry the factors in the file")
    return layer


@contextlib.contextmanager
def _metadata_errors(path, name: str):
    """Report what reading an entry's metadata raised as an AdapterFileError naming file and module."""
    try:
        yield
    except AdapterFileError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise AdapterFileError(f"{os.fspath(path)}: module {name!r}: metadata is incomplete or "
                               f"inconsistent ({type(e).__name__}: {e})") from None


def _check_every_tensor_used(path, entries: dict, tensors: dict, also_used: set[str] = frozenset()) -> None:
    """Refuse a file with tensors that no module entry (nor ``also_used``: modules_to_save) accounts for."""
    extra = set(tensors) - {f"{n}.{t}" for n, e in entries.items() for t in e["tensors"]} - also_used
    if extra:
        raise AdapterFileError(f"{os.fspath(path)}: tensors {sorted(extra)} belong to no module in the metadata")
    if not entries:
        raise AdapterFileError(f"{os.fspath(path)}: the file holds no modules")


@torch.no_grad()
def _load_into(existing: LowRankLinear, built: LowRankLinear) -> None:
    """Give an existing adapter layer the built one's values, keeping its tensors (and so any optimizer
    that holds them)."""
    for tensor_name, value in [*built.named_parameters(recurse=False), *built.named_buffers(recurse=False)]:
        if value is not None:
            getattr(existing, tensor_name).copy_(value)
    existing.alpha, existing.dropout, existing.seed, existing.options = (
        built.alpha, built.dropout, built.seed, built.options)


def load_adapter(model: nn.Module, path: str | os.PathLike, *, backend: str = "auto") -> list[str]:
    """Load the adapters stored at ``path`` into ``model``; returns the module names.

    A module that is a plain linear layer gets a new adapter layer (with ``backend``), and the model is
    frozen around the adapters as ``inject`` does; one that already has an adapter of the same method
    and rank (after ``inject``, say) gets the file's values in place, its backend and every
    ``requires_grad`` flag left as they were. Everything is
    checked first — file integrity, module names and shapes, base-weight fingerprints, regenerated
    frozen factors, and that the model has no adapter the file lacks — and on any error the model is
    left untouched. Modules saved whole (``modules_to_save``) get the file's tensors in place and
    are registered and made trainable."""
    check_backend(backend)
    entries, tensors, saved_modules = _read(path)
    module_states = {f"{m}.{t}": tensors.get(f"{m}.{t}") for m, names in saved_modules.items() for t in names}
    named = dict(model.named_modules())
    existing = dict(adapter_layers(model))
    built: dict[str, LowRankLinear] = {}
    with preserved_on_error(model):
        lacking = sorted(set(existing) - set(entries))
        if lacking:
            raise AdapterFileError(f"{os.fspath(path)}: the model has adapters on {lacking}, which the file lacks")
        for name, entry in entries.items():
            with _metadata_errors(path, name):
                base = _base_for(path, name, entry, named.get(name) if name else None)
                built[name] = _build(path, name, entry, base, tensors, backend)
        missing = sorted(k for k, v in module_states.items() if v is None)
        if missing:
            raise AdapterFileError(f"{os.fspath(path)}: modules_to_save tensors {missing} are missing from the file")
        check_module_tensors(model, module_states, os.fspath(path))
        _check_every_tensor_used(path, entries, tensors, also_used=set(module_states))
    for name in built.keys() & existing.keys():
        _load_into(existing[name], built.pop(name))
    if built:  # new adapter layers: freeze the model around them, as inject does
        _swap_in(model, built)
    load_module_tensors(model, module_states)
    register_modules_to_save(model, list(saved_modules))
    return list(entries)
