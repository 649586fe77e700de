"""DDP and FSDP2 with two CPU processes (gloo): after the reduction each rank's adapter gradients equal
a single process's on the whole batch, every rank regenerates the same frozen factors, and a sharded
model saves the same adapter file as an unsharded one."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import peft_ops
from utils import TinyModel

WORLD = 2


def _model():
    model = TinyModel(5)
    peft_ops.inject(model, "loraxs", 4, target_modules=["q_proj", "mlp.0"], seed=9)
    peft_ops.inject(model, "tlora", 4, target_modules=["k_proj", "o_proj"], seed=9, dropout=0.0)
    peft_ops.inject(model, "lora", 4, target_modules=["v_proj"], seed=9)
    with torch.no_grad():  # the same non-zero adapter values everywhere
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _batch():
    g = torch.Generator().manual_seed(4)
    return torch.randn(16, 32, generator=g), torch.randn(16, 24, generator=g)


def _frozen(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.rsplit(".", 1)[-1].startswith(("loraxs_", "tlora_"))}


def _grads_and_frozen(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, _frozen(model)


def _grads_and_frozen_before_backward(model):
    return None, _frozen(model)


def _leave():
    """End a worker once every rank has written its results, without running the destructors of the
    process group and of DDP's reducer: destroying them while gloo's worker thread still drops a
    finished work object deadlocked on the GIL (ProcessGroupGloo's destructor joining its run loop,
    which waited for the GIL the joining thread held; seen once in about ten runs of the suite)."""
    dist.barrier()
    os._exit(0)


def _worker(rank, store, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model = _model()
    _, regenerated = _grads_and_frozen_before_backward(model)  # DDP broadcasts rank 0's buffers when built
    ddp = DistributedDataParallel(model)
    x, y = _batch()
    shard = slice(rank * 8, (rank + 1) * 8)
    (ddp(x[shard]) - y[shard]).square().mean().backward()  # DDP averages over ranks: the full-batch mean
    grads, _ = _grads_and_frozen(model)
    torch.save((grads, regenerated), os.path.join(out_dir, f"rank{rank}.pt"))
    _leave()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    x, y = _batch()
    (model(x) - y).square().mean().backward()
    expected_grads, expected_frozen = _grads_and_frozen(model)
    assert len(expected_grads) == 16 and len(expected_frozen) == 16  # two blocks of 8 each
    for rank in range(WORLD):
        grads, frozen = torch.load(tmp_path / f"rank{rank}.pt")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], rtol=1e-5, atol=1e-7), (rank, name)
        for name, buffer in frozen.items():
            assert torch.equal(buffer, expected_frozen[name]), (rank, name)  # regenerated bit for bit


def _fsdp_worker(rank, store, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _model()  # inject first, then shard: each block, then the root
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _batch()
    shard = slice(rank * 8, (rank + 1) * 8)
    (model(x[shard]) - y[shard]).square().mean().backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    peft_ops.save_adapter(model, os.path.join(out_dir, f"adapter{rank}.safetensors"))  # every rank gathers
    torch.save(grads, os.path.join(out_dir, f"fsdp{rank}.pt"))
    _leave()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
def test_fsdp2_matches_single_process(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(_fsdp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    peft_ops.save_adapter(model, tmp_path / "unsharded.safetensors")
    x, y = _batch()
    (model(x) - y).square().mean().backward()
    expected, _ = _grads_and_frozen(model)
    unsharded = load_file(tmp_path / "unsharded.safetensors")
    for rank in range(WORLD):
        grads = torch.load(tmp_path / f"fsdp{rank}.pt")
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected[name], rtol=1e-5, atol=1e-7), (rank, name)
        saved = load_file(tmp_path / f"adapter{rank}.safetensors")
        assert saved.keys() == unsharded.keys() and all(torch.equal(saved[k], unsharded[k]) for k in saved)
