"""What only a compiled GPU run can check: 32-bit offset overflow, grid limits, every autotune
configuration compiling and computing correctly, and layers the size of an output head. Skipped
without a GPU: the interpreter forgives all of these."""
import copy
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import triton

import peft_ops
from peft_ops import kernels, reference
from peft_ops.kernels import fused_linear
from utils import ON_GPU, TOLERANCE, rel_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")]
DEV = "cuda"


def _chunked_reference(x, w, down, expand, scale, rows=1 << 16):
    """float32 reference of x Wᵀ + s (x D) Eᵀ, computed in row chunks to bound memory."""
    return torch.cat([(F.linear(c.float(), w.float()) + scale * (c.float() @ down.float()) @ expand.float().T)
                      for c in x.split(rows)])


def test_more_than_2_31_elements_in_x():
    """M·K > 2³¹: element offsets overflow int32; the tail rows must still be right, forward and dx."""
    m, k, n, r = (2**31) // 4096 + 4096, 4096, 64, 16
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 64
    down, expand = torch.randn(k, r, device=DEV) / 64, torch.randn(n, r, device=DEV)
    out, t = kernels.lowrank_linear(x, w, None, down, expand, 0.5, store_t=True)
    tail = slice(m - 70000, m)
    assert rel_error(out[tail], _chunked_reference(x[tail], w, down, expand, 0.5)) < TOLERANCE[torch.bfloat16]
    assert rel_error(t[tail], x[tail].float() @ down) < TOLERANCE[torch.bfloat16]
    g = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)
    dx, _ = kernels.lowrank_linear(g, w.T, None, expand, down, 0.5)  # the backward's roles
    assert rel_error(dx[tail], _chunked_reference(g[tail], w.T, expand, down, 0.5)) < TOLERANCE[torch.bfloat16]
    p = kernels.rank_reduce(x, t)  # xᵀ t over all M rows
    assert rel_error(p, x.float().T @ t) < 1e-2


def test_more_than_65535_row_blocks():
    """A 1-D grid: 2²³ + 1 rows is more than 65535 blocks of 128 rows on any axis-1 limit."""
    m, k, n, r = 2**23 + 1, 64, 48, 8
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 8
    down, expand = torch.randn(k, r, device=DEV) / 8, torch.randn(n, r, device=DEV)
    mask = kernels.dropout_mask(3, m, n, 0.1, DEV)
    last = slice(m - 1000, m)
    expected = F.linear(x[last].float(), w.float()) + mask[last] / 0.9 * ((x[last].float() @ down) @ expand.T)
    for in_loop in (True, False):
        out, _ = kernels.lowrank_linear(x, w, None, down, expand, 1.0, shrink_in_loop=in_loop,
                                        dropout_p=0.1, dropout_site="output", seed=3)
        assert rel_error(out[last], expected) < TOLERANCE[torch.bfloat16], in_loop


@pytest.mark.parametrize("m, n", [((2**31) // 4096 + 4096, 4096), (2**23 + 1, 64)], ids=["2^31-elements", "65535-blocks"])
def test_composition_past_2_31_elements_and_65535_row_blocks(m, n):
    """The cuBLAS composition (F.linear, then kernels.add_lowrank_ in place): an output of more than 2³¹
    elements, and more than 65535 blocks of rows, with output dropout; the tail rows checked."""
    r, k = 16, 64
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 8
    down, expand = torch.randn(k, r, device=DEV) / 8, torch.randn(n, r, device=DEV)
    out, t = peft_ops.dispatch.composed_lowrank_linear(x, w, None, down, expand, 0.5, dropout_p=0.1,
                                                       dropout_site="output", seed=5, store_t=True)
    last = slice(m - 1000, m)
    mask = kernels.dropout_mask(5, m, n, 0.1, DEV)[last]
    expected = F.linear(x[last].float(), w.float()) + mask / 0.9 * (0.5 * (x[last].float() @ down) @ expand.T)
    assert rel_error(out[last], expected) < TOLERANCE[torch.bfloat16]


def test_column_major_input_past_2_31_elements():
    """A transposed view as the input: the K offsets are multiplied by a stride of M, past 2³¹."""
    m, k, n, r = 2**19 + 16, 4200, 32, 8
    x = torch.randn(k, m, device=DEV, dtype=torch.bfloat16).T  # m×k, strides (1, m)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 64
    down, expand = torch.randn(k, r, device=DEV) / 64, torch.randn(n, r, device=DEV)
    tail = slice(m - 5000, m)
    for in_loop in (True, False):
        out, _ = kernels.lowrank_linear(x, w, None, down, expand, 0.5, shrink_in_loop=in_loop)
        assert rel_error(out[tail], _chunked_reference(x[tail], w, down.bfloat16(), expand, 0.5)) < 2e-2, in_loop


def test_output_head_sized_layer():
    """N = 128256 (Llama-3's vocabulary): forward and every gradient of a LoRA-XS layer, against the oracle
    in float32."""
    base = torch.nn.Linear(4096, 128256, bias=False).to(DEV, torch.bfloat16)
    layer = peft_ops.LoRAXSLinear(base, 16, backend="triton")
    with torch.no_grad():
        layer.loraxs_R.normal_()
    oracle = copy.deepcopy(layer).float()
    oracle.forward = types.MethodType(lambda self, x: reference.oracle(
        x, self.base_layer.weight, None, *self.factors()), oracle)
    x = torch.randn(256, 4096, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(256, 128256, device=DEV, dtype=torch.bfloat16)
    xs = x.clone().requires_grad_(), x.float().requires_grad_()
    y, y_ref = layer(xs[0]), oracle(xs[1])
    assert rel_error(y, y_ref) < TOLERANCE[torch.bfloat16]
    y.backward(g)
    y_ref.backward(g.float())
    assert rel_error(xs[0].grad, xs[1].grad) < TOLERANCE[torch.bfloat16]
    assert rel_error(layer.loraxs_R.grad, oracle.loraxs_R.grad) < TOLERANCE[torch.bfloat16]


# every config the autotuner may pick for these launches (it prunes those whose shared memory or
# registers won't fit), on the path each list belongs to; with the in-loop shrink too where it fits
_GEMM_CONFIGS = [(path, c) for path, configs in (("pointer", fused_linear.GEMM_CONFIGS),
                                                  ("tma", fused_linear.TMA_GEMM_CONFIGS),
                                                  ("pointer", fused_linear.DECODE_GEMM_CONFIGS),
                                                  ("tma", fused_linear.DECODE_GEMM_CONFIGS))
                 for c in fused_linear.fitting_configs(configs, "gemm", 16, 2, "tf32", path)]
_SHRINK_CONFIGS = fused_linear.fitting_configs(fused_linear.SHRINK_CONFIGS, "shrink", 64, 2, "tf32")


@pytest.mark.parametrize("path, config", _GEMM_CONFIGS, ids=lambda c: c if isinstance(c, str) else (
    "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs) + f"-s{c.num_stages}w{c.num_warps}"))
def test_every_gemm_config_compiles_and_is_right(path, config):
    # K and N multiples of 16, as in real models: the compiler pipelines the loads only then
    m, n, k, r = 300, 1024, 768, 16
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 28
    down, expand = torch.randn(k, r, device=DEV) / 28, torch.randn(n, r, device=DEV)
    expected = _chunked_reference(x, w, down, expand, 0.7)
    in_loop_fits = fused_linear.fitting_configs([config], "gemm_in_loop", 32, 2, "tf32", path)
    for in_loop in (True, False) if in_loop_fits else (False,):
        out, _ = kernels.lowrank_linear(x, w, None, down, expand, 0.7, shrink_in_loop=in_loop, config=config,
                                        path=path)
        assert rel_error(out, expected) < TOLERANCE[torch.bfloat16]
    assert rel_error(kernels.linear(x, w, config=config, path=path), F.linear(x.float(), w.float())) < \
        TOLERANCE[torch.bfloat16]
    g = torch.randn(m, n, device=DEV, dtype=torch.bfloat16)  # dx: the transposed weight
    dx, _ = kernels.lowrank_linear(g, w.T, None, expand, down, 0.7, config=config, path=path)
    assert rel_error(dx, _chunked_reference(g, w.T, expand, down, 0.7)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("path", kernels.GEMM_PATHS)
@pytest.mark.parametrize("n", [1024, 4096])
def test_decoding_fills_the_gpu_and_is_deterministic(path, n):
    """M = 16: programs for at least half the multiprocessors (K split in ranges only below that), the
    same bits on every call."""
    m, k, r = 16, 4096, 16
    assert 2 * fused_linear._split_k(m, n, k, torch.device(DEV)) * triton.cdiv(n, 32) >= \
        fused_linear.multiprocessors(torch.device(DEV))
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 64
    down, expand = torch.randn(k, r, device=DEV) / 64, torch.randn(n, r, device=DEV)
    out, _ = kernels.lowrank_linear(x, w, None, down, expand, 0.5, path=path)
    assert rel_error(out, _chunked_reference(x, w, down, expand, 0.5)) < TOLERANCE[torch.bfloat16]
    assert torch.equal(out, kernels.lowrank_linear(x, w, None, down, expand, 0.5, path=path)[0])


def test_the_launcher_picks_descriptors_on_hopper():
    x = torch.randn(64, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(128, 256, device=DEV, dtype=torch.bfloat16)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert fused_linear._gemm_path(None, x, w) == ("tma" if hopper else "pointer", False)
    assert fused_linear._gemm_path(None, x, w.T.contiguous().T)[1] is hopper  # dx's transposed weight
    assert fused_linear._gemm_path(None, x[:, 1:], w[:, 1:])[0] == "pointer"  # unaligned rows


@pytest.mark.parametrize("config", _SHRINK_CONFIGS,
                         ids=lambda c: "{BLOCK_M}x{BLOCK_K}".format(**c.kwargs) + f"-s{c.num_stages}w{c.num_warps}")
def test_every_shrink_config_compiles_and_is_right(config):
    x = torch.randn(300, 768, device=DEV, dtype=torch.bfloat16)
    down = torch.randn(768, 64, device=DEV)
    assert rel_error(kernels.shrink(x, down, config=config), x.float() @ down) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("method", ["loraxs", "tlora"])
def test_frozen_factors_are_the_same_on_cpu_and_gpu(method):
    """Regenerated frozen factors don't depend on the device (drawn and decomposed on the CPU)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 200)
    on_cpu = peft_ops.LAYER_CLASSES[method](base, 8, seed=4)
    on_gpu = peft_ops.LAYER_CLASSES[method](base.to(DEV), 8, seed=4)
    for name, buffer in on_cpu.named_buffers():
        if not name.startswith("base_layer"):
            assert torch.equal(buffer, dict(on_gpu.named_buffers())[name].cpu()), name


def test_svd_on_the_gpu_gives_the_cpu_factors_to_rounding(tmp_path):
    """svd_device="weight": float64 on the GPU, the same seeded sketch; the factors equal the CPU's to
    rounding, the same on every run, and a file saved from either loads into the other."""
    from utils import TinyModel, randomize_adapters

    torch.manual_seed(0)
    base = torch.nn.Linear(1024, 512).to(torch.bfloat16)  # the randomised path: a 32-column sketch < 512
    on_cpu = peft_ops.LoRAXSLinear(copy.deepcopy(base), 16, seed=4)
    on_gpu = [peft_ops.LoRAXSLinear(copy.deepcopy(base).to(DEV), 16, seed=4, svd_device="weight") for _ in range(2)]
    for name in ("loraxs_A", "loraxs_B"):
        a, b = getattr(on_cpu, name), getattr(on_gpu[0], name).cpu()
        assert torch.equal(b, getattr(on_gpu[1], name).cpu()), name
        assert (a - b).abs().max() <= 1e-6 * a.abs().max(), name
    model = TinyModel(1).to(DEV)
    peft_ops.inject(model, "loraxs", 4, target_modules="all-linear", svd_device="weight")
    randomize_adapters(model, 0.2)
    x = torch.randn(8, 32)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    cpu = TinyModel(1)
    peft_ops.load_adapter(cpu, tmp_path / "a.safetensors")  # the file says "weight": the CPU's SVD here
    assert rel_error(cpu(x), model(x.to(DEV))) < TOLERANCE[torch.float32]


def test_fsdp2_on_the_gpu(tmp_path):
    """fully_shard on one GPU (nccl) gives the unsharded model's gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from test_distributed import _batch, _grads_and_frozen, _model

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x, y = (t.to(DEV) for t in _batch())
        plain = _model().to(DEV)
        (plain(x) - y).square().mean().backward()
        expected, _ = _grads_and_frozen(plain)
        sharded = _model().to(DEV)
        for block in sharded.blocks:
            fully_shard(block, mesh=init_device_mesh("cuda", (1,)))
        fully_shard(sharded)
        (sharded(x) - y).square().mean().backward()
        for name, p in sharded.named_parameters():
            if p.requires_grad:
                assert torch.allclose(p.grad.full_tensor(), expected[name], rtol=1e-4, atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_a_cpu_saved_adapter_loads_into_a_gpu_model(tmp_path):
    from utils import TinyModel, randomize_adapters

    model = TinyModel(1)
    peft_ops.inject(model, "loraxs", 4, target_modules="all-linear")
    randomize_adapters(model, 0.2)
    x = torch.randn(8, 32)
    expected = model(x)
    peft_ops.save_adapter(model, tmp_path / "a.safetensors")
    gpu = TinyModel(1).to(DEV)
    peft_ops.load_adapter(gpu, tmp_path / "a.safetensors")
    assert rel_error(gpu(x.to(DEV)), expected) < TOLERANCE[torch.float32]


@pytest.mark.slow
def test_autotuned_launches_and_compile():
    """The suite runs with one config per kernel; this runs the autotuned launches (config pruning,
    keys) eagerly and under torch.compile. Every new key compiles and benchmarks every fitting config,
    minutes in all: run it on its own (-m slow)."""
    env = dict(os.environ, PEFT_OPS_AUTOTUNE="1")
    here = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                             os.path.join(here, "test_compile.py"), os.path.join(here, "test_fused_backward.py"),
                             "-k", "fullgraph or (test_gradients and 300 and bfloat16)"],
                            env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
