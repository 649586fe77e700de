"""Every bad input, one row each: the error names the argument, what it got and what it expected, and
nothing is changed (the model's modules, values and requires_grad flags are as before).
Adapter files that don't fit are in test_adapter_file.py."""
import tempfile

import pytest
import torch
from torch import nn

import peft_ops
from peft_ops import kernels
from test_inject import _assert_unchanged, _snapshot
from utils import TinyModel


def _linear(n=48, k=40, dtype=torch.float32):
    return nn.Linear(k, n, dtype=dtype)


def _share_q_as_alias(model):
    model.alias = model.blocks[0].q_proj  # one module, two names


def _with_mha(model):
    model.attn = nn.MultiheadAttention(32, 4)


def _adapted_q(model):
    peft_ops.inject(model, "lora", 4, target_modules=["q_proj"])
    return model


# (id, setup(model) -> model or None, action(model), exception, message)
def _k(m):
    return m.blocks[0].k_proj  # a 16×32 (out×in) layer of the snapshotted model


CASES = [
    # constructor arguments, on the model's own layer: a refused adapter must leave it as it was
    ("rank-zero", None, lambda m: peft_ops.LoRALinear(_k(m), 0), ValueError,
     r"lora: rank=0; expected an integer from 1 to min\(in_features, out_features\) = 16 for this 16×32 weight"),
    ("rank-negative", None, lambda m: peft_ops.TLoRALinear(_k(m), -2), ValueError, r"tlora: rank=-2; expected an integer"),
    ("rank-float", None, lambda m: peft_ops.LoRAXSLinear(_k(m), 2.5), ValueError, r"loraxs: rank=2.5; expected an integer"),
    ("rank-bool", None, lambda m: peft_ops.LoRALinear(_k(m), True), ValueError, r"rank=True; expected an integer"),
    ("rank-above-weight", None, lambda m: peft_ops.LoRALinear(_k(m), 17), ValueError,
     r"rank=17; expected an integer from 1 to min\(in_features, out_features\) = 16"),
    ("alpha-nan", None, lambda m: peft_ops.LoRALinear(_k(m), 4, alpha=float("nan")), ValueError,
     r"alpha=nan; expected a finite number or None"),
    ("alpha-string", None, lambda m: peft_ops.LoRALinear(_k(m), 4, alpha="16"), ValueError, r"alpha='16'; expected"),
    ("dropout-one", None, lambda m: peft_ops.LoRALinear(_k(m), 4, dropout=1.0), ValueError,
     r"dropout=1.0; expected a rate in \[0, 1\)"),
    ("dropout-negative", None, lambda m: peft_ops.LoRALinear(_k(m), 4, dropout=-0.1), ValueError, r"dropout=-0.1; expected"),
    ("seed-negative", None, lambda m: peft_ops.LoRALinear(_k(m), 4, seed=-1), ValueError,
     r"seed=-1; expected an integer in \[0, 2\*\*63\)"),
    ("backend-unknown", None, lambda m: peft_ops.LoRALinear(_k(m), 4, backend="cuda"), ValueError,
     r"backend='cuda' is not known; expected one of 'auto', 'triton', 'fused', 'composed', 'reference'"),
    ("base-not-linear", None, lambda m: peft_ops.LoRAXSLinear(m.blocks[0].mlp, 1), TypeError,
     r"base_layer: expected a torch.nn.Linear or a transformers Conv1D, got Sequential"),
    ("symlora-non-square", None, lambda m: peft_ops.SymLoRALinear(_k(m), 4), ValueError,
     r"symlora: the target weight is 16×32 \(out_features×in_features\), but SymLoRA's Q·diag\(λ\)·Qᵀ is defined "
     r"for square weights. Pass allow_non_square=True"),
    ("option-unknown", None, lambda m: peft_ops.LoRAXSLinear(_k(m), 4, rnak=3), TypeError,
     r"loraxs: unknown option\(s\) 'rnak'; options this method takes: svd, svd_device, svd_seed"),
    ("option-for-another-method", None, lambda m: peft_ops.LoRALinear(_k(m), 4, svd="exact"), TypeError,
     r"lora: unknown option\(s\) 'svd'; options this method takes: none"),
    ("option-value", None, lambda m: peft_ops.LoRAXSLinear(_k(m), 4, svd="fast"), ValueError,
     r"loraxs: option svd='fast'; expected 'randomized' or 'exact'"),
    ("option-seed", None, lambda m: peft_ops.LoRAXSLinear(_k(m), 4, svd_seed="abc"), ValueError,
     r"loraxs: option svd_seed='abc'; expected an integer in \[0, 2\*\*63\)"),
    ("option-svd-device", None, lambda m: peft_ops.LoRAXSLinear(_k(m), 4, svd_device="cuda"), ValueError,
     r"loraxs: option svd_device='cuda'; expected 'cpu' or 'weight' \(the weight's own device\)"),
    ("frozen-factors-wrong", None,
     lambda m: peft_ops.TLoRALinear(_k(m), 4, frozen_factors={"tlora_A": torch.zeros(32, 4)}), ValueError,
     r"tlora: frozen_factors lacks 'tlora_C'"),
    ("frozen-factors-shape", None,
     lambda m: peft_ops.TLoRALinear(_k(m), 4, frozen_factors={"tlora_A": torch.zeros(31, 4),
                                                              "tlora_C": torch.zeros(4, 16)}), ValueError,
     r"tlora: frozen_factors give factors of shapes \(16, 4\) and \(31, 4\); expected \(16, 4\) and \(32, 4\)"),
    ("triton-rank-limit", None,
     lambda m: peft_ops.LoRAXSLinear(_linear(300, 270), 257, backend="triton")(torch.randn(2, 270)), ValueError,
     r"backend='triton': rank=257; the Triton kernels take ranks up to 256 \(backend='auto' or 'reference' runs "
     r"any rank\)"),
    ("method-unknown", None, lambda m: peft_ops.get_method("dora"), ValueError,
     r"method='dora' is not known; expected one of 'lora', 'symlora', 'loraxs', 'tlora'"),
    # inputs
    ("input-last-dim", None, lambda m: peft_ops.TLoRALinear(_linear(), 4)(torch.randn(3, 41)), ValueError,
     r"input: shape \(3, 41\); expected a last dimension of in_features=40"),
    ("input-dtype", None, lambda m: peft_ops.TLoRALinear(_linear(), 4)(torch.randn(3, 40, dtype=torch.float64)), TypeError,
     r"input dtype torch.float64 differs from the base weight's torch.float32; cast one of them"),
    ("input-device", None, lambda m: peft_ops.TLoRALinear(_linear(), 4)(torch.randn(3, 40, device="meta")), RuntimeError,
     r"input is on meta but the layer's weights are on cpu"),
    ("triton-float64", None,
     lambda m: peft_ops.LoRALinear(_linear(dtype=torch.float64), 2, backend="triton")(torch.randn(2, 40, dtype=torch.float64)),
     TypeError, r"backend='triton': input dtype is torch.float64; the Triton kernels take float32, float16 or bfloat16"),
    ("kernel-rank-limit", None,
     lambda m: kernels.lowrank_linear(torch.randn(2, 270), torch.randn(300, 270), None, torch.randn(270, 257),
                                      torch.randn(300, 257)), ValueError,
     r"rank=257: the fused kernels take ranks from 1 to 256; use backend='reference'"),
    ("factor-shape", None,
     lambda m: peft_ops.adapted_linear(torch.randn(2, 40), torch.randn(48, 40), None, torch.randn(48, 3), None,
                                       torch.randn(40, 2), 1.0), ValueError,
     r"up: shape \(48, 3\); expected \(48, 2\) for a 48×40 weight at rank 2"),
    ("core-shape", None,
     lambda m: peft_ops.adapted_linear(torch.randn(2, 40), torch.randn(48, 40), None, torch.randn(48, 2),
                                       torch.randn(3, 3), torch.randn(40, 2), 1.0), ValueError,
     r"core: shape \(3, 3\); expected \(2, 2\)"),
    ("trainable-base-weight", None, lambda m: _forward_with_trainable_base(), RuntimeError,
     r"do not compute the base weight's gradient; freeze it"),
    # inject
    ("inject-method-unknown", None, lambda m: peft_ops.inject(m, "xs", 4, target_modules=["q_proj"]), ValueError,
     r"method='xs' is not known"),
    ("inject-option-unknown", None, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules=["q_proj"], svd_mode="exact"),
     TypeError, r"loraxs: unknown option\(s\) 'svd_mode'"),
    ("inject-nothing-matched", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules=["query"]), ValueError,
     r"target_modules=\['query'\] matched no module; the linear layers of this model are: blocks.0.q_proj, .*lm_head"),
    ("inject-twice", _adapted_q, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules=["q_proj"]), ValueError,
     r"module 'blocks.0.q_proj' already has a lora adapter; peft_ops.unload\(model\) first"),
    ("inject-twice-all-linear", _adapted_q, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules="all-linear"),
     ValueError, r"module 'blocks.0.q_proj' already has a lora adapter"),
    ("inject-targets-empty", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules=[]), TypeError,
     r"target_modules=\[\]; expected a non-empty list of module-name suffixes, a regular expression string, or 'all-linear'"),
    ("inject-targets-none", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules=None), ValueError,
     r"target_modules not given and there is no default for this model \(config.model_type=None"),
    ("inject-targets-not-str", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules=[3]), TypeError, r"target_modules=\[3\]; expected"),
    ("inject-bad-regex", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules="blocks.("), ValueError,
     r"target_modules='blocks.\(' is not a valid regular expression"),
    ("inject-non-linear", None, lambda m: peft_ops.inject(m, "lora", 4, target_modules=["mlp"]), TypeError,
     r"module 'blocks.0.mlp' is a Sequential; peft-ops adapts only nn.Linear and Conv1D layers"),
    ("inject-rank-too-big-midway", None, lambda m: peft_ops.inject(m, "lora", 20, target_modules=["q_proj", "k_proj"]),
     ValueError, r"module 'blocks.0.k_proj': lora: rank=20; expected an integer from 1 to .* = 16"),
    ("inject-symlora-non-square-midway", None, lambda m: peft_ops.inject(m, "symlora", 4, target_modules=["q_proj", "k_proj"]),
     ValueError, r"module 'blocks.0.k_proj': symlora: the target weight is 16×32"),
    ("inject-seed", None, lambda m: peft_ops.inject(m, "tlora", 4, target_modules=["q_proj"], seed=-1), ValueError,
     r"seed=-1; expected an integer in \[0, 2\*\*63\)"),
    ("inject-shared-module", _share_q_as_alias, lambda m: peft_ops.inject(m, "lora", 4, target_modules=["q_proj"]),
     ValueError, r"module 'blocks.0.q_proj' is shared: the model also reaches it as \['alias'\]"),
    ("inject-mha-out-proj", _with_mha, lambda m: peft_ops.inject(m, "lora", 4, target_modules=["attn.out_proj"]),
     TypeError, r"module 'attn.out_proj' is the out_proj of an nn.MultiheadAttention, which reads its weight directly"),
    ("save-without-adapters", None, lambda m: peft_ops.save_adapter(m, "/nonexistent/a.safetensors"), ValueError,
     r"model has no peft-ops adapter layers to save"),
]


def _nan_q(model):
    with torch.no_grad():
        model.blocks[0].q_proj.weight[0, 0] = float("nan")


def _zero_q(model):
    with torch.no_grad():
        model.blocks[0].q_proj.weight.zero_()


def _on_meta(model):
    model.to_empty(device="meta")


def _integer_input_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return peft_ops.LoRALinear(_linear(), 4)(torch.ones(2, 40, dtype=torch.long))


CASES += [
    # found by a new user (each fixed with its test)
    ("load-backend-unknown", _adapted_q, lambda m: peft_ops.load_adapter(m, "/nonexistent.safetensors", backend="gpu"),
     ValueError, r"backend='gpu' is not known; expected one of"),  # the argument, before the file is read
    ("save-to-directory", _adapted_q, lambda m: peft_ops.save_adapter(m, tempfile.gettempdir()), IsADirectoryError,
     r"path='.*' is a directory; expected the path of an adapter file \(e.g. '.*adapter.safetensors'\)"),
    ("save-into-missing-directory", _adapted_q, lambda m: peft_ops.save_adapter(m, "/nonexistent/a.safetensors"),
     FileNotFoundError, r"path='/nonexistent/a.safetensors': the directory '/nonexistent' does not exist"),
    ("load-from-directory", None, lambda m: peft_ops.load_adapter(m, tempfile.gettempdir()), IsADirectoryError,
     r"path='.*' is a directory; expected the path of an adapter file"),
    ("load-missing-file", None, lambda m: peft_ops.load_adapter(m, "/nonexistent/a.safetensors"), FileNotFoundError,
     r"path='/nonexistent/a.safetensors': no such adapter file"),
    ("autocast-integer-input", None, lambda m: _integer_input_under_autocast(), TypeError,
     r"input dtype torch.int64: expected a floating-point tensor"),
    ("loraxs-nan-weight", _nan_q, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules=["q_proj"]), ValueError,
     r"module 'blocks.0.q_proj': loraxs: the base weight has non-finite values \(NaN or inf\)"),
    ("loraxs-zero-weight", _zero_q, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules=["q_proj"]), ValueError,
     r"module 'blocks.0.q_proj': loraxs: the base weight is all zero; .* would stay zero forever"),
    ("tlora-alpha-zero", None, lambda m: peft_ops.inject(m, "tlora", 4, target_modules=["q_proj"], alpha=0), ValueError,
     r"module 'blocks.0.q_proj': tlora: alpha=0; expected a non-zero number: with alpha = 0 .* could never train"),
    ("lora-alpha-zero", None, lambda m: peft_ops.LoRALinear(_k(m), 4, alpha=0.0), ValueError, r"lora: alpha=0.0; expected"),
    ("loraxs-meta-device", _on_meta, lambda m: peft_ops.inject(m, "loraxs", 4, target_modules=["q_proj"]), ValueError,
     r"module 'blocks.0.q_proj': loraxs: the base weight is on the meta device \(no values\); materialise the model first"),
    ("lora-meta-device", _on_meta, lambda m: peft_ops.inject(m, "lora", 4, target_modules=["q_proj"]), ValueError,
     r"module 'blocks.0.q_proj': lora: the base weight is on the meta device"),
]


def _forward_with_trainable_base():
    layer = peft_ops.LoRALinear(_linear(), 4)
    layer.base_layer.weight.requires_grad_(True)
    return layer(torch.randn(2, 40))


@pytest.mark.parametrize("setup, action, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(setup, action, error, message):
    model = TinyModel(1)
    if setup:
        setup(model)
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        action(model)
    _assert_unchanged(model, before)
