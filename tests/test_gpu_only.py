"""What only a compiled GPU run can check: 32-bit offset overflow, grid limits, every autotune
configuration compiling and computing correctly, and layers the size of an output head. Skipped
without a GPU: the interpreter forgives all of these."""
import pytest
import torch
import torch.nn.functional as F

import peft_ops
from peft_ops import kernels
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
    for in_loop in (True, False):
        out, _ = kernels.lowrank_linear(x, w, None, down, expand, 1.0, shrink_in_loop=in_loop,
                                        dropout_p=0.1, dropout_site="output", seed=3)
        assert torch.isfinite(out).all()
    mask = kernels.dropout_mask(3, m, n, 0.1, DEV)
    last = slice(m - 1000, m)
    expected = F.linear(x[last].float(), w.float()) + mask[last] / 0.9 * ((x[last].float() @ down) @ expand.T)
    assert rel_error(out[last], expected) < TOLERANCE[torch.bfloat16]


def test_output_head_sized_layer():
    """N = 128256 (Llama-3's vocabulary): forward and every gradient of a LoRA-XS layer."""
    base = torch.nn.Linear(4096, 128256, bias=False).to(DEV, torch.bfloat16)
    layer = peft_ops.LoRAXSLinear(base, 16, backend="triton")
    with torch.no_grad():
        layer.loraxs_R.normal_()
    x = torch.randn(256, 4096, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = layer.base_layer(x.detach().float().to(torch.bfloat16)).float() + x.detach().float() @ layer.delta_weight().T
    assert rel_error(y, ref) < TOLERANCE[torch.bfloat16]
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.loraxs_R.grad).all()


@pytest.mark.parametrize("config", fused_linear.GEMM_CONFIGS + fused_linear.DECODE_GEMM_CONFIGS,
                         ids=lambda c: "{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c.kwargs) + f"-s{c.num_stages}w{c.num_warps}")
def test_every_gemm_config_compiles_and_is_right(config):
    m, n, k, r = 300, 1000, 777, 16
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 28
    down, expand = torch.randn(k, r, device=DEV) / 28, torch.randn(n, r, device=DEV)
    expected = _chunked_reference(x, w, down, expand, 0.7)
    for in_loop in (True, False):
        out, _ = kernels.lowrank_linear(x, w, None, down, expand, 0.7, shrink_in_loop=in_loop, config=config)
        assert rel_error(out, expected) < TOLERANCE[torch.bfloat16]
    assert rel_error(kernels.linear(x, w, config=config), F.linear(x.float(), w.float())) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("config", fused_linear.SHRINK_CONFIGS,
                         ids=lambda c: "{BLOCK_M}x{BLOCK_K}".format(**c.kwargs) + f"-s{c.num_stages}w{c.num_warps}")
def test_every_shrink_config_compiles_and_is_right(config):
    x = torch.randn(300, 777, device=DEV, dtype=torch.bfloat16)
    down = torch.randn(777, 64, device=DEV)
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
