"""A bare read of a paged KV cache: every K and V row a decode step attends, fetched through the
block table as a paged decode kernel fetches it, with no attention math. Its time is the floor
for a paged kernel whose pages lie where they lie. Random pages read slower than consecutive ones:
on an H100, bf16, 16-position pages, the same bare read took 92.9 vs 89.4 us at B16-L4096 and
355.5 vs 344.1 us at B16-L16384 (notes/decode_attention.md, eighth session)."""

import torch
import triton
import triton.language as tl

from kernels.checks import check_power_of_two, output
from kernels.decode_attention import check_decode_args

CHUNKS = (64, 256, 1024, 4096, 16384)  # positions per program: the floor is the fastest tiling
BLOCK_N = 64  # positions per step
NUM_STAGES = 3


@triton.jit
def _read_step(k_ptr, v_ptr, block_table_ptr, b, kvh, stride_page, stride_pos, stride_head, stride_bt, step, end,
               PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    # [BLOCK_N, HEAD_DIM] fp32 k * v of positions step.. (only those < end when MASKED)
    pos = step + tl.arange(0, BLOCK_N)
    valid = pos < end
    table = block_table_ptr + b * stride_bt + pos // PAGE_SIZE
    page = (tl.load(table, mask=valid, other=0) if MASKED else tl.load(table)).to(tl.int64)
    rows = page * stride_page + pos % PAGE_SIZE * stride_pos + kvh * stride_head
    offs = rows[:, None] + tl.arange(0, HEAD_DIM)[None, :]  # K and V share strides: one address
    if MASKED:
        k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + offs)
        v = tl.load(v_ptr + offs)
    return k.to(tl.float32) * v.to(tl.float32)


@triton.jit
def _paged_read(k_ptr, v_ptr, seq_lens_ptr, block_table_ptr, partial_ptr, stride_page, stride_pos, stride_head,
                stride_bt, num_kv_heads, chunk, n_chunks,
                PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr):
    # grid (B * Hkv * n_chunks,): program -> (sequence b, KV head, chunk), as partial[b, kvh, chunk].
    # Constants where it pays (H100, bf16, 16-position pages): a runtime page size cost 11% at B16-L1024
    # (30.0 vs 27.1 us); masking every step's loads, not only the last one's, 1-2%.
    pid = tl.program_id(0)
    b = pid // (num_kv_heads * n_chunks)
    kvh = pid // n_chunks % num_kv_heads
    start = pid % n_chunks * chunk
    end = tl.minimum(start + chunk, tl.load(seq_lens_ptr + b))
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for step in tl.range(start, full_end, BLOCK_N, num_stages=NUM_STAGES):
        acc += _read_step(k_ptr, v_ptr, block_table_ptr, b, kvh, stride_page, stride_pos, stride_head, stride_bt,
                          step, end, PAGE_SIZE, HEAD_DIM, BLOCK_N, False)
    if full_end < end:
        acc += _read_step(k_ptr, v_ptr, block_table_ptr, b, kvh, stride_page, stride_pos, stride_head, stride_bt,
                          full_end, end, PAGE_SIZE, HEAD_DIM, BLOCK_N, True)
    tl.store(partial_ptr + pid, tl.sum(acc))


def paged_read(q, k_cache, v_cache, seq_lens, block_table, *, chunk, k_scale=None, v_scale=None, out=None):
    # the paged decode kernels' arguments (q only sets the checks' batch and device); k/v: [pages,
    # page_size, Hkv, D] fp16/bf16; returns launch() -> [B, Hkv, n_chunks] float32 (out when given),
    # each program's sum over its positions of k * v (so no load is dead code, and a test can check
    # the rows read)
    if block_table is None:
        raise ValueError("block_table is None: paged_read reads a paged cache")
    # also: unit stride in D, and v_cache strided as k_cache (the kernel reads both at one offset)
    dims = check_decode_args(q, k_cache, v_cache, seq_lens, block_table, None, k_scale, v_scale)
    if dims.quant != "none":
        raise ValueError(f"k_cache: an {dims.quant} cache; paged_read reads fp16/bf16 caches")
    check_power_of_two("chunk", chunk)
    # The lengths and pages as checked: a copy, so the read stays the bound one (n_chunks is the
    # bound lengths') and inside the cache whatever the caller's tensors become.
    seq_lens, block_table = seq_lens.clone(), block_table.clone()
    n_chunks = triton.cdiv(dims.max_len, chunk)
    partial = output(out, (dims.batch, dims.num_kv_heads, n_chunks), torch.float32, q.device)
    grid = (partial.numel(),)

    def launch():
        _paged_read[grid](k_cache, v_cache, seq_lens, block_table, partial,
                          *k_cache.stride()[:3], block_table.stride(0),
                          dims.num_kv_heads, chunk, n_chunks,
                          PAGE_SIZE=k_cache.shape[1], HEAD_DIM=dims.head_dim, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES)
        return partial

    return launch
