"""peft-ops: fused Triton kernels and swap-in modules for extreme-low-parameter adapters.

    layer = peft_ops.LoRAXSLinear(base_linear, rank=16)
    names = peft_ops.inject(model, "loraxs", rank=16, target_modules=["q_proj", "v_proj"])
    peft_ops.save_adapter(model, "adapter.safetensors"); peft_ops.load_adapter(model, "adapter.safetensors")
"""
from . import hf
from .bank import AdapterBank, adapter_banks, bank_adapters, load_adapter_bank, remove_adapters, use_adapters
from .dispatch import BACKENDS, IMPLEMENTATIONS, clear_decisions, decisions
from .errors import AdapterFileError, PeftFormatError
from .inject import inject, layer_seed
from .layers import LAYER_CLASSES, LoRALinear, LoRAXSLinear, LowRankLinear, SymLoRALinear, TLoRALinear
from .load import load_adapter
from .methods import METHODS, RECOMMENDED, Method, get_method
from .model import adapter_layers, disable_adapters, merge, modules_to_save, unload, unmerge
from .ops import adapted_linear
from .peft_format import export_peft, import_peft, import_tlora
from .save import AdapterFileInfo, save_adapter
from .summary import AdapterDescription, TrainableSummary, read_adapter_info, trainable_summary

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "SymLoRALinear", "LoRAXSLinear", "TLoRALinear", "LowRankLinear", "LAYER_CLASSES",
    "inject", "unload", "merge", "unmerge", "adapter_layers", "layer_seed",
    "save_adapter", "load_adapter", "AdapterFileError", "AdapterFileInfo",
    "load_adapter_bank", "use_adapters", "remove_adapters", "bank_adapters", "adapter_banks", "AdapterBank",
    "adapted_linear", "BACKENDS", "IMPLEMENTATIONS", "decisions", "clear_decisions", "METHODS", "RECOMMENDED",
    "Method", "get_method",
    "modules_to_save", "export_peft", "import_peft", "import_tlora", "PeftFormatError", "disable_adapters", "hf",
    "trainable_summary", "TrainableSummary", "read_adapter_info", "AdapterDescription",
]
