"""Which modules of a model may take an adapter or be saved whole, checked the same way for every entry
point (``inject``, ``load_adapter``, ``import_peft``, ``import_tlora``, ``load_adapter_bank`` and
``modules_to_save``): matching names, and refusing what an adapter could not serve."""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from .bank_layer import AdapterBank
from .layers import LowRankLinear, is_adaptable
from .model import modules_to_save

__all__ = ["DEFAULT_TARGET_MODULES", "HEAD_NAMES", "ModelView", "match_targets", "default_targets",
           "match_modules_to_save"]

# What PEFT adapts when target_modules is not given, by transformers' config.model_type: a copy, as data,
# of peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (PEFT 0.22; peft is not
# imported at run time; tests/test_modules_to_save.py compares the two). A list holds name suffixes, a
# string is a regular expression matched against whole module names (as target_modules).
_DEFAULT_TARGET_GROUPS = (
    (["q", "v"], ["t5", "mt5"]),
    (["q_proj", "v_proj"], ["bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm",
                            "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"]),
    (["c_attn"], ["gpt2", "gpt_bigcode"]),
    (["query_key_value"], ["bloom", "gpt_neox", "chatglm", "RefinedWebModel", "RefinedWeb", "falcon"]),
    (["q", "v", "q_proj", "v_proj"], ["blip-2"]),
    (["query", "value"], ["bert", "roberta", "xlm-roberta", "electra", "layoutlm"]),
    (["query_proj", "value_proj"], ["deberta-v2"]),
    (["in_proj"], ["deberta"]),
    (["Wqkv"], ["mpt"]),
    (["c_proj", "c_attn"], ["btlm"]),
    (["qkv_proj"], ["codegen"]),
    (["q_proj", "v_proj", "fc1", "fc2"], ["phi"]),
    (r".*language_model\..*\.(q_proj|v_proj)", ["gemma4"]),
    (["q_proj", "k_proj", "v_proj", "o_proj"], ["nemotron_h"]),
    (["key", "value", "receptance", "output"], ["rwkv"]),
    (["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"], ["rwkv7"]),
)
DEFAULT_TARGET_MODULES: dict[str, list[str] | str] = {
    model_type: list(targets) if isinstance(targets, list) else targets  # a list of its own per model type
    for targets, model_types in _DEFAULT_TARGET_GROUPS for model_type in model_types}

# Task heads that "all-linear" leaves out (a name component of the module's name): they are trained
# whole, with modules_to_save, not adapted
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "cls", "qa_outputs"})


def _is_adapter(module: nn.Module) -> bool:
    return isinstance(module, (LowRankLinear, AdapterBank))


def _peft_class(module: nn.Module) -> str:
    """The name of the PEFT class ``module`` is or derives from (PeftModel, LoraModel, a LoRA layer), else ''.
    Recognised by the defining module, so that peft need not be imported."""
    return next((c.__name__ for c in type(module).__mro__ if c.__module__.split(".")[0] == "peft"), "")


@dataclass
class ModelView:
    """A model as the loading path sees it, computed once: every module name that is not inside an adapter
    layer or bank (whose ``base_layer`` is never a target), each module's names, and the registered
    ``modules_to_save``."""

    modules: dict[str, nn.Module]  # name -> module, a shared module under each of its names
    hidden: dict[str, str]  # name inside an adapter layer or bank -> that adapter's name
    names: dict[int, list[str]]  # id(module) -> its names
    read_directly: set[str]
    saved_whole: list[str]
    peft_wrapper: str = ""  # the class of PEFT's wrapper when the model is one (PeftModel, LoraModel)

    @classmethod
    def of(cls, model: nn.Module) -> "ModelView":
        modules, hidden, adapters = {}, {}, []
        for name, module in model.named_modules(remove_duplicate=False):
            owner = next((a for a in adapters if name.startswith(a + ".")), None)
            if owner is not None:
                hidden[name] = owner
                continue
            if _is_adapter(module):
                adapters.append(name)
            if name:
                modules[name] = module
        names: dict[int, list[str]] = {}
        for name, module in modules.items():
            names.setdefault(id(module), []).append(name)
        read_directly = {f"{n}.out_proj".lstrip(".") for n, m in model.named_modules()
                         if isinstance(m, nn.MultiheadAttention)}
        return cls(modules, hidden, names, read_directly, modules_to_save(model), _peft_class(model))

    def refuse_peft_wrapper(self, error: type[Exception], where: str) -> None:
        """Refuse PEFT's wrapper of a model: every module name inside it carries PEFT's prefix, so nothing
        would be found where a file or a call says."""
        if self.peft_wrapper:
            raise error(f"{where}: the model is PEFT's {self.peft_wrapper}, whose module names carry PEFT's prefix "
                        f"('base_model.model.'); pass the model it wraps: peft_model.get_base_model(), or "
                        f"peft_model.unload(), which also takes PEFT's own adapter layers out")

    def adapters(self) -> dict[str, nn.Module]:
        """The adapter layers and banks, by name."""
        return {n: m for n, m in self.modules.items() if _is_adapter(m)}

    def target(self, name, error: type[Exception], where: str) -> nn.Module:
        """The module an adapter at ``name`` would wrap or replace: a linear layer, or an existing adapter
        layer or bank there (the caller decides whether that one may take it). ``error`` is raised with
        ``where`` (the file or the call) and the module named."""
        if not isinstance(name, str) or not name:
            raise error(f"{where}: module name {name!r}; expected a non-empty module name")
        at = f"{where}: module {name!r}"
        if name in self.hidden:
            raise error(f"{at} is inside the adapter at {self.hidden[name]!r}: adapters go on the model's own "
                        f"modules, never on an adapter's base layer")
        module = self.modules.get(name)
        if module is None:
            self.refuse_peft_wrapper(error, where)
            raise error(f"{at} is not in the model (an adapter for another model?)")
        if _is_adapter(module):
            return module
        if _peft_class(module):
            raise error(f"{at} is PEFT's own adapter layer ({_peft_class(module)}); take PEFT's adapters out "
                        f"first: peft_model.unload(), or merge_and_unload() to keep their effect in the weights")
        wrong_kind = TypeError if error is ValueError else error  # a call's argument of the wrong kind: TypeError
        if not is_adaptable(module):
            raise wrong_kind(f"{at} is a {type(module).__name__}; peft-ops adapts only nn.Linear and Conv1D layers")
        if name in self.read_directly:
            raise wrong_kind(f"{at} is the out_proj of an nn.MultiheadAttention, which reads its weight directly: an "
                        f"adapter there would never run")
        others = [n for n in self.names[id(module)] if n != name]
        if others:
            raise error(f"{at} is shared: the model also reaches it as {others}; an adapter would apply on one "
                        f"path only")
        inside = [s for s in self.saved_whole if name == s or name.startswith(s + ".")]
        if inside:
            raise error(f"{at} is inside modules_to_save {inside[0]!r}: it is saved whole, don't adapt it too")
        return module

    def check_saved_whole(self, names: Iterable[str], adapted: Iterable[str], error: type[Exception],
                          where: str) -> list[str]:
        """Check module names to be saved whole beside the adapters at ``adapted`` (existing and new):
        each is a module of the model, neither an adapter nor inside or around one, nor an adapter's base
        layer. Returns the names, outermost only."""
        adapted = set(adapted) | set(self.adapters())
        names = list(names)
        for name in names:
            if not isinstance(name, str) or not name:
                raise error(f"{where}: modules_to_save entry {name!r}; expected a non-empty module name")
            at = f"{where}: modules_to_save {name!r}"
            if name in self.hidden:
                raise error(f"{at} is inside the adapter at {self.hidden[name]!r}; a base layer stays frozen")
            if name not in self.modules:
                self.refuse_peft_wrapper(error, where)
                raise error(f"{at} is not a module of the model")
            clash = sorted(a for a in adapted if a == name or a.startswith(name + ".") or name.startswith(a + "."))
            if clash:
                raise error(f"{at} is, holds or is inside the adapter at {clash[0]!r}; save the adapter as an "
                            f"adapter, and whole modules that have none")
        return sorted({n for n in names if not any(n.startswith(o + ".") for o in names)})


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if head is not None else getattr(model, "lm_head", None)


def _suffix_match(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def match_targets(target_modules, model: nn.Module, view: ModelView) -> list[str]:
    """The module names ``target_modules`` selects: name suffixes, a regular expression matched against
    whole names, or ``"all-linear"``."""
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = _output_head(model)
        return [n for n, m in view.modules.items()
                if (is_adaptable(m) or isinstance(m, LowRankLinear)) and m is not head and n not in view.read_directly
                and not HEAD_NAMES.intersection(n.split("."))]
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        return [n for n in view.modules if pattern.fullmatch(n)]
    if (not isinstance(target_modules, Sequence | set | frozenset) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise TypeError(f"target_modules={target_modules!r}; expected a non-empty list of module-name "
                        f"suffixes, a regular expression string, or 'all-linear'")
    return [n for n in view.modules if _suffix_match(n, target_modules)]


def default_targets(model: nn.Module) -> list[str] | str:
    """PEFT's default target modules for a transformers model's architecture (a copy: the table stays as
    it is)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"target_modules not given and there is no default for this model (config.model_type="
                         f"{model_type!r}; PEFT's defaults for {len(DEFAULT_TARGET_MODULES)} architectures are in "
                         f"peft_ops.targets.DEFAULT_TARGET_MODULES); pass target_modules, e.g. 'all-linear' or a "
                         f"list of module-name suffixes")
    targets = DEFAULT_TARGET_MODULES[model_type]
    return list(targets) if isinstance(targets, list) else targets


def match_modules_to_save(patterns, view: ModelView) -> list[str]:
    """Module names for ``patterns`` (name suffixes, as ``target_modules``); each pattern must match."""
    if isinstance(patterns, str) or not isinstance(patterns, Sequence | set | frozenset) or \
            not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(f"modules_to_save={patterns!r}; expected a list of module-name suffixes such as ['classifier']")
    names = []
    for pattern in patterns:
        found = [n for n in view.modules if _suffix_match(n, [pattern])]
        if not found:
            raise ValueError(f"modules_to_save: {pattern!r} matched no module of the model")
        names += found
    return names
