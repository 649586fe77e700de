"""Quantized base weights as the fused GEMM reads them: plain tensors (no bitsandbytes here), and the jit
helper that decodes a tile of W inside the GEMM's K-loop.

Formats (bitsandbytes' layouts, checked against ``bitsandbytes.functional.dequantize_4bit`` and
``Linear8bitLt``'s int8 weight in tests/test_dequant.py):

* ``"nf4"`` / ``"fp4"`` (``Linear4bit``): W (N×K, row-major) flattened, two 4-bit codes per uint8, the
  even element in the high nibble (``byte = code[2i] << 4 | code[2i + 1]``); value = ``table[code] ·
  absmax[i // blocksize]`` in float32, ``table`` the 16-value ``quant_state.code``. With double
  quantization ``absmax`` is itself uint8 codes: ``absmax[b] = code2[q[b]] · absmax2[b // 256] + offset``
  (``quant_state.state2.code``, ``state2.absmax`` per ``state2.blocksize`` (256) blocks, ``quant_state.offset``).
* ``"int8"`` (``Linear8bitLt``, LLM.int8): ``W = CB · SCB[row] / 127``, CB the N×K int8 weight, SCB a
  float32 scale per row.

The GEMM takes a :class:`QuantizedWeight` where it takes a dense weight, on the pointer path only: its
W tile is decoded in registers from the packed bytes (a quarter of bf16's bytes for 4-bit) and cast to
the activations' dtype for the dot. ``QuantizedWeight.T`` is the transposed view the backward's
``dx = g W`` needs: the same bytes, decoded along the other axis. Nothing dequantized is kept.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ._config import INTERPRET, LAUNCH_OPTIONS, wrap_triton

__all__ = ["QuantizedWeight", "FORMATS", "decoded_tile", "dequantize", "kernel_format", "decodable_configs",
           "decode_shared_bytes"]

FORMATS = ("nf4", "fp4", "int8")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized N×K weight (``rows`` × ``cols`` as stored), seen as ``shape`` (K×N when ``transposed``).

    ``data``: 4-bit: the packed uint8 codes (``rows · cols / 2`` bytes, contiguous, any shape); int8: the
    ``rows × cols`` int8 weight (contiguous). ``scale``: 4-bit: float32 absmax per ``blocksize`` values,
    or uint8 codes of it when ``code2`` is given (double quantization: ``scale2`` per ``nested_blocksize``
    absmax values, ``offset`` a 1-element float32 tensor); int8: float32 per row. ``code``: the 16
    float32 values of the 4-bit codes. ``dense``: a callable returning the dequantized ``rows × cols``
    weight (bitsandbytes' own, for the composed implementation); None: :func:`dequantize`. ``product``: a
    callable computing ``a Wᵀ`` for the stored (untransposed) weight as its quantizer does (bitsandbytes'
    ``matmul_4bit``: QLoRA's base), for the composed forward; None: dequantize, then a matmul."""

    format: str
    data: torch.Tensor
    scale: torch.Tensor
    rows: int
    cols: int
    code: Optional[torch.Tensor] = None
    blocksize: int = 64
    scale2: Optional[torch.Tensor] = None
    code2: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None
    nested_blocksize: int = 256
    transposed: bool = False
    dense: Optional[Callable[[], torch.Tensor]] = None
    product: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}: expected one of {FORMATS}")
        if self.format == "int8":
            if self.data.dtype != torch.int8 or tuple(self.data.shape) != (self.rows, self.cols):
                raise ValueError(f"int8 weight: expected int8 of shape {(self.rows, self.cols)}, got {self.data.dtype} "
                                 f"{tuple(self.data.shape)}")
            return
        if self.cols % 2 or self.cols % self.blocksize or self.blocksize & (self.blocksize - 1):
            raise ValueError(f"4-bit weight: the kernels take rows of whole blocks (cols={self.cols}, a multiple of "
                             f"blocksize={self.blocksize}, a power of two)")
        if self.data.dtype != torch.uint8 or self.data.numel() * 2 != self.rows * self.cols:
            raise ValueError(f"4-bit weight: expected {self.rows * self.cols // 2} uint8 bytes, got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        if self.code is None or self.code.numel() != 16:
            raise ValueError("4-bit weight: expected a 16-value code table")
        if (self.code2 is None) != (self.scale2 is None) or (self.code2 is None) != (self.offset is None):
            raise ValueError("4-bit weight: double quantization needs code2, scale2 and offset together")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.cols, self.rows) if self.transposed else (self.rows, self.cols)

    @property
    def T(self) -> "QuantizedWeight":
        return dataclasses.replace(self, transposed=not self.transposed)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nested(self) -> bool:
        return self.code2 is not None

    def dequantized(self) -> torch.Tensor:
        """The dense weight as this view sees it (``shape``), made now; the caller drops it after use."""
        weight = self.dense() if self.dense is not None else dequantize(self)
        return weight.reshape(self.rows, self.cols).T if self.transposed else weight.reshape(self.rows, self.cols)

    def kernel_arguments(self) -> dict:
        """The GEMM's quantized-W arguments (``w_ptr`` and the ``q_*`` ones)."""
        unused = self.scale
        return dict(w_ptr=self.data.reshape(-1) if self.format != "int8" else self.data, q_scale_ptr=self.scale,
                    q_code_ptr=self.code if self.code is not None else unused,
                    q_scale2_ptr=self.scale2 if self.nested else unused,
                    q_code2_ptr=self.code2 if self.nested else unused,
                    q_offset_ptr=self.offset if self.nested else unused,
                    W_FORMAT=kernel_format(self.format), QUANT_BLOCK=self.blocksize if self.format != "int8" else 1,
                    NESTED=self.nested, NESTED_BLOCK=self.nested_blocksize,
                    PTX_LOOKUP=not INTERPRET and self.data.is_cuda and torch.version.hip is None)


def kernel_format(fmt: str) -> str:
    """The kernels' ``W_FORMAT`` constexpr: NF4 and FP4 differ only in their code table, a tensor."""
    return "int8" if fmt == "int8" else "4bit"


def decodable_configs(configs, w_format: str, transposed: bool, quant_block: int) -> list:
    """The GEMM configs for a quantized W (``w_format`` the kernels' "4bit" or "int8"): for 4-bit, tiles
    spanning at most one absmax block along the stored weight's rows (BLOCK_K, or BLOCK_N for dx), which
    decode with one absmax per row. The per-element branch, compiled for sm_90 (bf16, 16×32×128, w4s4,
    forward, double quantization), took 255 registers, spilled (128 B of stack) and ran 1093 instructions
    per K-step (tests/sm90_compile.py's quantized counterexample). Either format: tiles of at most 32 rows
    (mma.sync): on 64-row tiles (wgmma) the decoded tile, wgmma's B operand from shared memory, is
    rewritten every K-step, so each wgmma waited for the one before (wait_group 0 against tutorial 03's
    1, compiled for sm_90); 32×64×32 passes the gate with cp.async groups as deep as tutorial 03's."""
    rows = [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    if w_format != "4bit":
        return rows
    return [c for c in rows if c.kwargs["BLOCK_N" if transposed else "BLOCK_K"] <= quant_block]


def decode_shared_bytes(config) -> int:
    """Shared memory that decoding adds to a config's (``fused_linear.shared_memory_bytes``), bounded: the
    decoded W tile staged for the dot in 16 bits and a float32 scratch of its layout conversions, 6 B an
    element. A margin more than a measure: compiled for sm_90 the quantized variants stay within the dense
    bound (10–29 KiB against 21–52 KiB); tests/test_sm90_compile.py checks this sum bounds them."""
    return config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] * 6


@triton.jit
def _block_scale(block, inside, scale_ptr, scale2_ptr, code2_ptr, offset_ptr, NESTED: tl.constexpr,
                 NESTED_BLOCK: tl.constexpr):
    """absmax of 4-bit block ``block`` (float32; double quantization decoded as bitsandbytes does:
    ``code2[q] · absmax2[block // NESTED_BLOCK] + offset``, in that order)."""
    if NESTED:
        q = tl.load(scale_ptr + block, mask=inside, other=0).to(tl.int32)
        second = tl.load(scale2_ptr + block // NESTED_BLOCK, mask=inside, other=0.0)
        return tl.load(code2_ptr + q) * second + tl.load(offset_ptr)
    return tl.load(scale_ptr + block, mask=inside, other=0.0).to(tl.float32)


@triton.jit
def decoded_tile(data_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, rows, in_rows, col0, W_COLS,
                 COLS: tl.constexpr, W_FORMAT: tl.constexpr, QUANT_BLOCK: tl.constexpr, NESTED: tl.constexpr,
                 NESTED_BLOCK: tl.constexpr, PTX_LOOKUP: tl.constexpr):
    """The stored weight's rows ``rows`` (1-D, int64; ``in_rows`` inside) by columns ``col0 ...
    col0 + COLS`` (``col0`` a multiple of COLS, of W_COLS columns), float32, zero outside.

    4-bit: COLS / 2 bytes a row, split into high (even column) and low (odd) nibbles and interleaved,
    each looked up in the 16-value table and scaled by its block's absmax: one absmax per row where the
    tile's columns lie in one block (COLS ≤ QUANT_BLOCK), else one per element. int8: CB · SCB / 127.

    The table lookup, compiled for sm_90 (bf16, NF4, tests/sm90_compile.py): as ``tl.load`` of the table
    indexed by the bytes just loaded, Triton's pipeliner staged it through cp.async and shared memory
    (2 instructions an element) and kept one cp.async group in flight where tutorial 03 keeps two; as
    ``tl.gather`` from the table in registers, 4 cp.async groups in flight but 4 shuffles and 2 selects
    an element (398 instructions per K-step at 16×32×64, forward); as one PTX ``ld.global.nc`` an element
    (``PTX_LOOKUP``: NVIDIA targets compiled, not the interpreter), the loads stay 4 groups deep and the
    K-step takes 234. With ``PTX_LOOKUP`` False (the interpreter) a plain ``tl.load``."""
    cols = col0 + tl.arange(0, COLS)
    in_cols = cols < W_COLS
    if W_FORMAT == "int8":
        q = tl.load(data_ptr + rows[:, None] * W_COLS + cols[None, :], mask=in_rows[:, None] & in_cols[None, :],
                    other=0)
        row_scale = tl.load(scale_ptr + rows, mask=in_rows, other=0.0) / 127.0
        return q.to(tl.float32) * row_scale[:, None]
    else:
        byte_cols = col0 // 2 + tl.arange(0, COLS // 2)
        packed = tl.load(data_ptr + rows[:, None] * (W_COLS // 2) + byte_cols[None, :],
                         mask=in_rows[:, None] & (byte_cols < W_COLS // 2)[None, :], other=0)
        codes = tl.reshape(tl.join((packed >> 4).to(tl.int32), (packed & 0xF).to(tl.int32)), (rows.shape[0], COLS))
        if PTX_LOOKUP:  # one ld.global.nc per element from the 64-byte table (L1), outside the pipeliner
            values = tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [code_ptr + codes],
                                               dtype=tl.float32, is_pure=True, pack=1)
        else:
            values = tl.load(code_ptr + codes)
        blocks_per_row = W_COLS // QUANT_BLOCK
        if COLS <= QUANT_BLOCK:
            absmax = _block_scale(rows * blocks_per_row + col0 // QUANT_BLOCK, in_rows, scale_ptr, scale2_ptr,
                                  code2_ptr, offset_ptr, NESTED, NESTED_BLOCK)
            return values * absmax[:, None]
        else:
            absmax = _block_scale(rows[:, None] * blocks_per_row + (cols // QUANT_BLOCK)[None, :],
                                  in_rows[:, None] & in_cols[None, :], scale_ptr, scale2_ptr, code2_ptr, offset_ptr,
                                  NESTED, NESTED_BLOCK)
            return values * absmax


@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, out_ptr, ROWS, W_COLS,
                       W_FORMAT: tl.constexpr, QUANT_BLOCK: tl.constexpr, NESTED: tl.constexpr,
                       NESTED_BLOCK: tl.constexpr, PTX_LOOKUP: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                       BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col0 = tl.program_id(1) * BLOCK_COLS
    in_rows = rows < ROWS
    tile = decoded_tile(data_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset_ptr, rows, in_rows, col0, W_COLS,
                        BLOCK_COLS, W_FORMAT, QUANT_BLOCK, NESTED, NESTED_BLOCK, PTX_LOOKUP)
    cols = col0 + tl.arange(0, BLOCK_COLS)
    tl.store(out_ptr + rows[:, None] * W_COLS + cols[None, :], tile.to(out_ptr.dtype.element_ty),
             mask=in_rows[:, None] & (cols < W_COLS)[None, :])


def dequantize(weight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A new ``rows × cols`` tensor: the stored weight decoded by :func:`decoded_tile` (the fused GEMM's
    decoding, on its own)."""
    out = torch.empty(weight.rows, weight.cols, device=weight.device, dtype=dtype)
    if out.numel() == 0:
        return out
    args = weight.kernel_arguments()
    block_rows, block_cols = 32, 64
    grid = (triton.cdiv(weight.rows, block_rows), triton.cdiv(weight.cols, block_cols))
    wrap_triton(_dequantize_kernel)[grid](
        args["w_ptr"], args["q_scale_ptr"], args["q_code_ptr"], args["q_scale2_ptr"], args["q_code2_ptr"],
        args["q_offset_ptr"], out, weight.rows, weight.cols, W_FORMAT=args["W_FORMAT"], QUANT_BLOCK=args["QUANT_BLOCK"],
        NESTED=args["NESTED"], NESTED_BLOCK=args["NESTED_BLOCK"], PTX_LOOKUP=args["PTX_LOOKUP"],
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
        **LAUNCH_OPTIONS)
    return out
