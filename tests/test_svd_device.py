"""LoRA-XS's svd_device option, and adapter files staying interchangeable between devices: factors
regenerated with float64 rounding of another device or BLAS still pass the file's signature check."""
import pytest
import torch

import peft_ops
from peft_ops import AdapterFileError, methods
from test_adapter_file import _adapted, craft
from utils import TinyModel


def test_svd_device_weight_on_a_cpu_weight_is_the_cpu_computation():
    base = TinyModel(1).blocks[0].mlp[0]  # 64×32
    on_cpu = peft_ops.LoRAXSLinear(base, 8, seed=3)
    on_weight = peft_ops.LoRAXSLinear(base, 8, seed=3, svd_device="weight")
    assert on_cpu.options["svd_device"] == "cpu" and on_weight.options["svd_device"] == "weight"
    for name in ("loraxs_A", "loraxs_B", "loraxs_R"):
        assert torch.equal(getattr(on_cpu, name), getattr(on_weight, name)), name


def test_the_option_is_saved_and_a_file_without_it_loads_as_cpu(tmp_path):
    """Files written before svd_device existed carry no such option: they computed on the CPU."""
    model = _adapted("loraxs", svd_device="weight")
    x = torch.randn(4, 32)
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    fresh = TinyModel(1)
    peft_ops.load_adapter(fresh, path)
    assert {layer.options["svd_device"] for _, layer in peft_ops.adapter_layers(fresh)} == {"weight"}
    craft(path, lambda groups: [g["options"].pop("svd_device") for g in groups])
    old = TinyModel(1)
    peft_ops.load_adapter(old, path)
    assert {layer.options["svd_device"] for _, layer in peft_ops.adapter_layers(old)} == {"cpu"}
    assert torch.equal(old(x), model(x))


def _perturbed_svd(relative, moved):
    """top_singular_triplets of the weight times (1 + relative·noise): a backward-stable float64 SVD on
    another device or BLAS is the exact one of a weight perturbed by a few float64 roundings (~1e-16·√K)."""
    exact = methods.top_singular_triplets

    def svd(weight, rank, **kw):
        w = weight.double()
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        perturbed = exact(w * (1 + relative * noise), rank, **kw)
        moved.append(any(not torch.equal(a, b) for a, b in zip(perturbed, exact(weight, rank, **kw))))
        return perturbed
    return svd


@pytest.mark.parametrize("relative, accepted", [(1e-13, True), (1e-8, True), (1e-2, False)])
def test_factors_regenerated_with_other_rounding_pass_the_signature(tmp_path, monkeypatch, relative, accepted):
    model = _adapted("loraxs")
    path = tmp_path / "a.safetensors"
    peft_ops.save_adapter(model, path)
    moved = []
    monkeypatch.setattr(methods, "top_singular_triplets", _perturbed_svd(relative, moved))
    fresh = TinyModel(1)
    if accepted:
        peft_ops.load_adapter(fresh, path)
        x = torch.randn(4, 32)
        assert torch.allclose(fresh(x), model(x), rtol=1e-5, atol=1e-6)
    else:  # the check can fail: a perturbation far beyond rounding is refused
        with pytest.raises(AdapterFileError, match=r"regenerated frozen loraxs factors differ"):
            peft_ops.load_adapter(fresh, path)
    assert moved and all(moved)  # the perturbation moved every layer's float64 factors
