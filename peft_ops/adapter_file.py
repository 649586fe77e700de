"""The adapter file format, read and written without a model: safetensors files whose metadata says how
to rebuild each adapter and how to recognise the base model it belongs to.

Every file is untrusted input. The header is parsed first (bounded in size and nesting, no non-finite
number, every tensor's dtype and shape checked against what the metadata says it must be), so a file
with tensors nobody asked for is refused before any of its data is read; the data is read only when the
caller asks, and a SHA-256 checksum over the metadata and every tensor then detects damage (not forgery:
anyone can recompute it; load files only from sources you trust).

Version 2 (written now), metadata ``adapter`` (JSON, keys sorted, no spaces)::

    {"groups": [{"method", "rank", "alpha", "dropout", "options", "in_features", "out_features",
                 "dtype", "base_dtype", "bias", "tensors": {name: shape}, "modules": [names]}, ...],
     "modules_to_save": {module: [tensor names]}}

Modules alike share one group. Tensors: ``adapter.<dtype>`` holds every module's stored tensors
flattened, in group order, module order, then the group's tensor order; ``peft_ops.seeds`` (int64, one per
module), ``peft_ops.fingerprints`` (float32, :data:`FINGERPRINT_SAMPLES` per module) and, where a method has
frozen factors, ``peft_ops.signatures`` (float32, one (2, 2·SKETCH) row per such module, in module order);
whole modules' tensors under their own names. Version 1 (one JSON entry per module, its tensors under
``<module>.<tensor>``) is still read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from .errors import AdapterFileError
from .files import open_regular
from .methods import METHODS

__all__ = ["FORMAT", "FORMAT_VERSION", "FINGERPRINT_SAMPLES", "SKETCH", "ADAPTER_DTYPES", "AdapterEntry", "checksum",
           "AdapterFile", "read_adapter_file", "adapter_file_bytes", "dtype_name"]

FORMAT, FORMAT_VERSION = "peft-ops-adapter", "2"
FINGERPRINT_SAMPLES = 8  # version 1 stored 16
SKETCH = 8  # signature values per statistic (column norms, probe projections) and factor
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
ADAPTER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
SEEDS, FINGERPRINTS, SIGNATURES = "peft_ops.seeds", "peft_ops.fingerprints", "peft_ops.signatures"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AdapterEntry:
    """One module's adapter as the file describes it (both format versions)."""

    name: str
    method: str
    rank: int
    alpha: float
    dropout: float
    seed: int
    options: dict
    in_features: int
    out_features: int
    dtype: torch.dtype  # of the stored adapter tensors
    base_dtype: str
    bias: bool
    shapes: dict[str, tuple[int, ...]]  # the stored tensors: trainable ones, and frozen ones if included
    fingerprint: torch.Tensor  # float64
    signature: torch.Tensor | dict | None  # version 2: (2, 2·SKETCH) float64; version 1: per-column lists


@dataclass
class AdapterFile:
    """A checked header; :meth:`tensors` reads the data and verifies the checksum."""

    path: str
    version: int
    entries: dict[str, AdapterEntry]
    saved_modules: dict[str, list[str]]  # module -> its tensor names (full key: module.name)
    header: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]  # key -> dtype, shape, start, end
    adapter_json: str = field(repr=False)
    _expected_checksum: str = field(repr=False)
    _data_start: int = field(repr=False)
    _cache: dict | None = field(default=None, repr=False)

    @property
    def tensor_bytes(self) -> int:
        return sum(end - start for _, _, start, end in self.header.values())

    def module_tensors(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """``modules_to_save`` tensors by full key: dtype and shape, from the header."""
        return {f"{m}.{t}": self.header[f"{m}.{t}"][:2] for m, names in self.saved_modules.items() for t in names}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, read and checked against the checksum: each module's stored tensors as
        ``<module>.<tensor>``, and the ``modules_to_save`` tensors."""
        if self._cache is None:
            raw = _read_data(self.path, self.header, self._data_start)
            if checksum(self.adapter_json, raw, legacy=self.version == 1) != self._expected_checksum:
                raise AdapterFileError(f"{self.path}: checksum mismatch: the file is damaged or was edited")
            if self.version == 1:
                self._cache = raw
            else:
                self._cache = _unpack(self, raw)
        return self._cache


def checksum(adapter_json: str, tensors: dict[str, torch.Tensor], *, legacy: bool = False) -> str:
    h = hashlib.sha256(adapter_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        shape = str(tuple(t.shape)) if legacy else json.dumps(list(t.shape))
        h.update(shape.encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# -- writing


def adapter_file_bytes(groups: list[dict], seeds: list[int], fingerprints: torch.Tensor,
                       signatures: torch.Tensor | None, stored: dict[str, torch.Tensor],
                       saved_modules: dict[str, dict[str, torch.Tensor]]) -> bytes:
    """The bytes of a version-2 file: ``groups`` as in the module docstring (without tensors), ``stored``
    each module's stored tensors by ``<module>.<tensor>``, ``saved_modules`` whole modules' state. The same
    adapter gives the same bytes in every process."""
    packed: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in groups:
        for module in group["modules"]:
            for tensor_name in sorted(group["tensors"]):
                t = stored[f"{module}.{tensor_name}"]
                packed.setdefault(t.dtype, []).append(t.detach().cpu().reshape(-1))
    tensors = {f"adapter.{dtype_name(d)}": torch.cat(ts) for d, ts in packed.items()}
    tensors[SEEDS] = torch.tensor(seeds, dtype=torch.int64)
    tensors[FINGERPRINTS] = fingerprints.to(torch.float32)
    if signatures is not None:
        tensors[SIGNATURES] = signatures.to(torch.float32)
    modules_to_save = {}
    for module, state in saved_modules.items():
        modules_to_save[module] = sorted(state)
        tensors.update({f"{module}.{k}": v.detach().cpu() for k, v in state.items()})
    adapter_json = json.dumps({"groups": groups, "modules_to_save": modules_to_save}, sort_keys=True,
                              separators=(",", ":"), allow_nan=False)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "adapter": adapter_json,
                "checksum": checksum(adapter_json, tensors)}
    return _safetensors_bytes(tensors, metadata)


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte for byte the same for the same input: keys sorted, tensors laid out by
    decreasing element size (so each starts aligned), then by name."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header, chunks, offset = {"__metadata__": metadata}, [], 0
    for key in order:
        t = tensors[key].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


# -- reading


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def _json(text: str, what: str, path: str):
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise AdapterFileError(f"{path}: {what} is nested too deeply to parse") from None
    except ValueError as e:
        raise AdapterFileError(f"{path}: {what} is not valid JSON ({e})") from None


def _open_regular(path: str):
    """A file object for ``path``, refusing anything but a regular file (a FIFO would block, a device
    would never end)."""
    directory = IsADirectoryError(f"path={path!r} is a directory; expected the path of an adapter file (e.g. "
                                  f"{os.path.join(path, 'adapter.safetensors')!r})")
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"path={path!r}: no such adapter file") from None
    except IsADirectoryError:
        raise directory from None
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot be opened ({e.strerror})") from None
    if f is None:
        if os.path.isdir(path):
            raise directory
        raise AdapterFileError(f"{path}: not a regular file (a device, pipe or socket); expected an adapter file")
    return f


def _read_header(path: str) -> tuple[dict, dict, int]:
    """The safetensors header, checked: metadata (str → str) and per key (dtype, shape, start, end), the
    data contiguous and exactly filling the file."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise AdapterFileError(f"{path}: not a readable safetensors file (header length {n} in a {size}-byte file)")
        try:
            text = f.read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise AdapterFileError(f"{path}: not a readable safetensors file (its header is not UTF-8)") from None
    raw = _json(text, "the safetensors header", path)
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
    metadata = raw.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{path}: the safetensors metadata must map strings to strings")
    header, spans = {}, []
    for key, info in raw.items():
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            start, end = info["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, start, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AdapterFileError(f"{path}: tensor {key!r}: malformed header entry {str(info)[:200]}") from None
        if end - start != math.prod(shape) * dtype.itemsize:
            raise AdapterFileError(f"{path}: tensor {key!r}: {end - start} bytes for shape {shape} of {dtype}")
        header[key] = (dtype, shape, start, end)
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise AdapterFileError(f"{path}: tensor data overlaps or leaves holes (at byte {start})")
        position = end
    if 8 + n + position != size:
        raise AdapterFileError(f"{path}: not a readable safetensors file: the tensors take {position} bytes, the file has {size - 8 - n} "
                               f"(truncated or padded)")
    return metadata, header, 8 + n


def _read_data(path: str, header: dict, data_start: int) -> dict[str, torch.Tensor]:
    tensors = {}
    with _open_regular(path) as f:
        for key, (dtype, shape, start, end) in header.items():
            f.seek(data_start + start)
            data = bytearray(f.read(end - start))
            if len(data) != end - start:
                raise AdapterFileError(f"{path}: tensor {key!r} is truncated (the file changed while reading)")
            tensors[key] = (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(shape)
    return tensors


def read_adapter_file(path) -> AdapterFile:
    """Read and check the header of the adapter file at ``path`` (no tensor data)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path={path!r}; expected a file path (str or os.PathLike)")
    path = os.fspath(path)
    metadata, header, data_start = _read_header(path)
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: not a peft-ops adapter file (metadata format={metadata.get('format')!r}, "
                               f"expected {FORMAT!r})")
    version = {"1": 1, "2": 2}.get(metadata.get("format_version"))
    if version is None:
        raise AdapterFileError(f"{path}: format_version={metadata.get('format_version')!r}; this peft-ops reads "
                               f"versions 1 and 2")
    adapter_json, expected_checksum = metadata.get("adapter", ""), metadata.get("checksum", "")
    adapter = _json(adapter_json, "the adapter metadata", path)
    reader = _entries_v1 if version == 1 else _entries_v2
    try:
        entries, saved_modules, expected = reader(path, adapter, header)
    except AdapterFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterFileError(f"{path}: the adapter metadata is malformed ({type(e).__name__}: {e})") from None
    for key, (dtype, shape) in expected.items():
        if key not in header:
            raise AdapterFileError(f"{path}: tensor {key!r} is missing from the file")
        if header[key][:2] != (dtype, shape):
            raise AdapterFileError(f"{path}: tensor {key!r} is {dtype_name(header[key][0])} of shape "
                                   f"{header[key][1]}; the metadata makes it {dtype_name(dtype)} of shape {shape}")
    extra = sorted(set(header) - set(expected) - {f"{m}.{t}" for m, ts in saved_modules.items() for t in ts})
    if extra:
        raise AdapterFileError(f"{path}: tensors {extra[:4]}{' ...' if len(extra) > 4 else ''} belong to no module "
                               f"in the metadata")
    missing = sorted(f"{m}.{t}" for m, ts in saved_modules.items() for t in ts if f"{m}.{t}" not in header)
    if missing:
        raise AdapterFileError(f"{path}: modules_to_save tensors {missing[:4]} are missing from the file")
    if not entries:
        raise AdapterFileError(f"{path}: the file holds no modules")
    return AdapterFile(path, version, entries, saved_modules, header, adapter_json, expected_checksum, data_start)


def _check(condition: bool, path: str, name: str, what: str) -> None:
    if not condition:
        raise AdapterFileError(f"{path}: module {name!r}: {what}")


def _fields(path: str, name: str, method: str, rank, alpha, dropout, options, in_features, out_features,
            dtype: str, base_dtype: str, bias) -> torch.dtype:
    """Check one module's described fields; returns its adapter dtype."""
    def integer(v):
        return type(v) is int and v >= 1

    _check(method in METHODS, path, name, f"method {method!r}; expected one of {', '.join(METHODS)}")
    _check(integer(rank) and integer(in_features) and integer(out_features), path, name,
           f"rank {rank!r}, in_features {in_features!r}, out_features {out_features!r}; expected positive integers")
    _check(type(alpha) in (int, float) and math.isfinite(alpha) and type(dropout) in (int, float)
           and 0 <= dropout < 1, path, name, f"alpha {alpha!r}, dropout {dropout!r}; expected finite numbers, "
           f"dropout in [0, 1)")
    _check(isinstance(options, dict), path, name, f"options {options!r}; expected an object")
    _check(dtype in ADAPTER_DTYPES and base_dtype in ADAPTER_DTYPES, path, name,
           f"dtype {dtype!r}, base dtype {base_dtype!r}; expected one of {', '.join(ADAPTER_DTYPES)}")
    _check(type(bias) is bool, path, name, f"bias {bias!r}; expected true or false")
    return ADAPTER_DTYPES[dtype]


def _tensor_list(path: str, name: str, names) -> list[str]:
    _check(isinstance(names, list) and all(isinstance(t, str) and t for t in names) and len(set(names)) == len(names),
           path, name, f"tensor names {names!r}; expected a list of distinct names")
    return names


def _saved_modules(path: str, saved) -> dict[str, list[str]]:
    if not isinstance(saved, dict):
        raise AdapterFileError(f"{path}: modules_to_save {saved!r}; expected an object")
    for module, names in saved.items():
        _tensor_list(path, module, names)
    return saved


def _floats(values, path: str, name: str, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    _check(bool(torch.isfinite(t).all()), path, name, f"its {what} holds non-finite values")
    return t


def _entries_v2(path: str, adapter: dict, header: dict):
    groups, saved = adapter["groups"], _saved_modules(path, adapter.get("modules_to_save", {}))
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise AdapterFileError(f"{path}: groups must be a list of objects")
    order, fields, packed = [], {}, {}
    for group in groups:
        modules = _tensor_list(path, "(group)", group["modules"])
        shapes = group["tensors"]
        if not isinstance(shapes, dict):
            raise AdapterFileError(f"{path}: a group's tensors must map names to shapes")
        for module in modules:
            if module in fields:
                raise AdapterFileError(f"{path}: module {module!r} appears twice")
            dtype = _fields(path, module, group["method"], group["rank"], group["alpha"], group["dropout"],
                            group["options"], group["in_features"], group["out_features"], group["dtype"],
                            group["base_dtype"], group["bias"])
            for tensor_name, shape in shapes.items():
                _check(isinstance(shape, list) and all(type(d) is int and 0 < d <= 2**31 for d in shape), path,
                       module, f"tensor {tensor_name!r} has shape {shape!r}")
            fields[module] = (group, dtype, {t: tuple(shapes[t]) for t in sorted(shapes)})
            order.append(module)
            packed[dtype] = packed.get(dtype, 0) + sum(math.prod(s) for s in shapes.values())
    frozen_rows = [m for m in order if METHODS[fields[m][0]["method"]].frozen]
    expected = {f"adapter.{dtype_name(d)}": (d, (count,)) for d, count in packed.items()}
    expected[SEEDS] = (torch.int64, (len(order),))
    expected[FINGERPRINTS] = (torch.float32, (len(order), FINGERPRINT_SAMPLES))
    if frozen_rows:
        expected[SIGNATURES] = (torch.float32, (len(frozen_rows), 2, 2 * SKETCH))
    entries = {}
    for module in order:
        group, dtype, shapes = fields[module]
        # seeds, fingerprints and signatures are data: _unpack fills them once the checksum holds
        entries[module] = AdapterEntry(module, group["method"], group["rank"], float(group["alpha"]),
                                       float(group["dropout"]), -1, group["options"], group["in_features"],
                                       group["out_features"], dtype, group["base_dtype"], group["bias"], shapes,
                                       torch.empty(0), None)
    return entries, saved, expected


def _unpack(file: AdapterFile, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split version 2's packed tensors per module and put seeds, fingerprints and signatures into the
    entries (checked: seeds in range, numbers finite)."""
    offsets = {key: 0 for key in raw if key.startswith("adapter.")}
    tensors = {key: raw[key] for key in file.module_tensors()}
    seeds, fingerprints, signatures = raw[SEEDS], raw[FINGERPRINTS], raw.get(SIGNATURES)
    row = 0
    for i, (name, entry) in enumerate(file.entries.items()):
        key = f"adapter.{dtype_name(entry.dtype)}"
        for tensor_name, shape in entry.shapes.items():
            count = math.prod(shape)
            tensors[f"{name}.{tensor_name}"] = raw[key][offsets[key]:offsets[key] + count].reshape(shape)
            offsets[key] += count
        seed = int(seeds[i])
        _check(0 <= seed, file.path, name, f"seed {seed}; expected an integer in [0, 2**63)")
        signature = None
        if METHODS[entry.method].frozen:
            signature = _floats(signatures[row], file.path, name, "frozen-factor signature")
            row += 1
        file.entries[name] = AdapterEntry(**{**entry.__dict__, "seed": seed, "signature": signature,
                                             "fingerprint": _floats(fingerprints[i], file.path, name,
                                                                    "base-weight fingerprint")})
    return tensors


def _entries_v1(path: str, adapter: dict, header: dict):
    modules, saved = adapter["modules"], _saved_modules(path, adapter.get("modules_to_save", {}))
    if not isinstance(modules, dict) or not all(isinstance(e, dict) for e in modules.values()):
        raise AdapterFileError(f"{path}: adapter metadata is malformed (modules must map names to entries)")
    entries, expected = {}, {}
    for name, e in modules.items():
        base = e["base"]
        dtype = _fields(path, name, e["method"], e["rank"], e["alpha"], e["dropout"], e["options"],
                        e["in_features"], e["out_features"], e["dtype"], base.get("dtype", "float32"), base["bias"])
        seed = e["seed"]
        _check(type(seed) is int and 0 <= seed < 2**63, path, name, f"seed {seed!r}; expected an integer in [0, 2**63)")
        shapes = {}
        for tensor_name in _tensor_list(path, name, e["tensors"]):
            key = f"{name}.{tensor_name}"
            shapes[tensor_name] = header[key][1] if key in header else ()
            expected[key] = (dtype, shapes[tensor_name])
        signature = e.get("frozen_signature")
        if signature is not None:
            _check(isinstance(signature, dict) and set(signature) == {"up", "down"}, path, name,
                   "its frozen-factor signature is malformed")
            signature = {role: _floats(v, path, name, "frozen-factor signature").tolist()
                         for role, v in signature.items()}
        entries[name] = AdapterEntry(name, e["method"], e["rank"], float(e["alpha"]), float(e["dropout"]), seed,
                                     e["options"], e["in_features"], e["out_features"], dtype,
                                     base.get("dtype", "float32"), base["bias"], shapes,
                                     _floats(base["fingerprint"], path, name, "base-weight fingerprint"), signature)
    return entries, saved, expected
