"""prefill_kv_write (SPEC 2.4): the prompt's K, V into the paged KV cache, natively in CUDA C++.

Both variants take the prefill's K and V packed over the batch and write them, optionally
quantized to int8 / fp8-e4m3 (kv_quant's formats, a float32 scale per token and KV head), into
[pages, page_size, Hkv, D] through the block table. The kernels are in kernels/cuda/kv_write.cu.
- native_cp_async: 16-byte cp.async staging through shared memory, 3 tiles in flight per CTA;
- native_tma: cp.async.bulk.tensor loads and stores on tensor maps from cuTensorMapEncodeTiled,
  mbarrier completion, a 4-stage (quantized: 3-stage) pipeline.
A launch writes the prompts as bound: the kernels read copies of cu_seqlens and block_table taken
after the checks, so a table or offsets changed afterwards cannot send a write outside the cache or
onto a page given twice (bind again for new ones).
"""

import torch

from kernels import cuda_build, hw, kv_quant, tensor_maps
from kernels.checks import ATTENTION_DTYPES, check_head_dim, check_shape, check_tensor, check_unit_stride_last

HEAD_DIMS = (64, 128, 256)
FORMAT_CODES = {"none": 0, "int8": 1, "fp8": 2}  # CACHE_FMT of kv_write.cu
TILE_BYTES = 16 * 1024  # the largest tile of input a pipeline stage holds
MAX_TILE_TOKENS = 256  # a TMA box side
# by quantized: the quantizing kernels need more threads resident to hide their arithmetic
CP_THREADS, CP_STAGES = 256, 3
CP_CTAS_PER_SM = {False: 2, True: 4}
TMA_THREADS = {False: 32, True: 256}  # a lone issuing thread, or a CTA that quantizes
TMA_STAGES = {False: 4, True: 3}
TMA_CTAS_PER_SM = {False: 3, True: 3}
TMA_ALIGN = 128


def tile_tokens(page_size, token_bytes):
    """Tokens per tile: the largest power of two dividing page_size (tiles never cross a page)
    that keeps a tile within TILE_BYTES; at least 1."""
    tokens = 1
    while page_size % (2 * tokens) == 0 and 2 * tokens * token_bytes <= TILE_BYTES and 2 * tokens <= MAX_TILE_TOKENS:
        tokens *= 2
    return tokens


def check_write_args(k, v, cu_seqlens, block_table, k_cache, v_cache, k_scale, v_scale):
    """Validate a KV write (SPEC 7); returns (batch, kv_heads, head_dim, page_size, fmt). Syncs once."""
    check_tensor("k", k, dtypes=ATTENTION_DTYPES, ndim=3)
    tokens, kv_heads, head_dim = k.shape
    if tokens < 1 or kv_heads < 1:
        raise ValueError(f"k has shape {tuple(k.shape)}: a write needs at least one token and one KV head")
    check_head_dim("k", head_dim, HEAD_DIMS)
    check_tensor("v", v, dtypes=(k.dtype,), device=k.device, device_of="k")
    check_shape("v", v, k.shape)
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"{name} must hold each token's [Hkv, D] contiguously, got strides {t.stride()}")
        if t.data_ptr() % 16 or t.stride(0) * t.element_size() % 16:
            raise ValueError(f"{name}: address and token stride must be 16-byte aligned (cp.async, TMA), "
                             f"got {t.data_ptr():#x} and stride {t.stride(0)}")
    if v.stride() != k.stride():
        raise ValueError(f"v strides {v.stride()} must equal k strides {k.stride()}")
    fmt = kv_quant.check_caches(k.dtype, k.device, k_cache, v_cache, k_scale, v_scale, device_of="k")
    if fmt not in FORMAT_CODES:
        raise ValueError(f"k_cache: format {fmt} is not written by prefill_kv_write; supported: {tuple(FORMAT_CODES)}")
    num_pages, page_size, cache_heads, cache_dim = k_cache.shape
    check_shape("k_cache", k_cache, (num_pages, page_size, kv_heads, head_dim))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16:  # 16-byte stores (8-byte quantized), TMA stores
            raise ValueError(f"{name}: address must be 16-byte aligned (cp.async, TMA), got {t.data_ptr():#x}")
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1, device=k.device, device_of="k")
    check_unit_stride_last("cu_seqlens", cu_seqlens)
    batch = cu_seqlens.shape[0] - 1
    if batch < 1:
        raise ValueError(f"cu_seqlens must hold batch + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, device=k.device, device_of="k")
    check_shape("block_table", block_table, (batch, block_table.shape[1]))
    check_unit_stride_last("block_table", block_table)
    if not block_table.is_contiguous():
        raise ValueError(f"block_table must be contiguous, got strides {block_table.stride()}")

    # One sync for every value check.
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    pages = torch.arange(block_table.shape[1], device=k.device)[None, :]
    used = pages < (lens[:, None] + page_size - 1) // page_size
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    flat = torch.arange(bad.numel(), device=k.device)
    used_pages = torch.where(used, block_table, -1 - flat.view_as(block_table)).flatten().sort().values
    first, last, min_len, max_len, first_bad, repeats = torch.stack([
        cu_seqlens[0], cu_seqlens[-1], lens.min(), lens.max(), torch.where(bad.flatten(), flat, bad.numel()).min(),
        (used_pages[1:] == used_pages[:-1]).sum()]).tolist()
    if first != 0 or min_len < 0:
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu_seqlens.tolist()}")
    if last != tokens:  # a token past the last prompt would silently not be written
        raise ValueError(f"cu_seqlens ends at {last}, not at k's {tokens} tokens (every token is in a prompt)")
    if max_len > block_table.shape[1] * page_size:
        raise ValueError(f"a prompt of {max_len} tokens exceeds the block table's capacity "
                         f"{block_table.shape[1]} pages x {page_size}")
    if first_bad < bad.numel():
        row, col = divmod(first_bad, block_table.shape[1])
        raise ValueError(f"block_table[{row}, {col}] = {int(block_table[row, col])} is outside [0, {num_pages})")
    if repeats:
        raise ValueError("block_table gives one page to two prompt positions: writes would race")
    if k.device.type != "cuda":
        raise ValueError(f"k is on {k.device}: the native CUDA kernels need a CUDA tensor")
    return batch, kv_heads, head_dim, page_size, fmt


def _as_checked(cu_seqlens, block_table):
    # what the kernels read: copies of the checked values (a launch() runs long after the checks)
    return cu_seqlens.clone(), block_table.clone()


def _defines(dtype, head_dim, fmt):
    return (("CACHE_FMT", FORMAT_CODES[fmt]), ("ELEM_BF16", int(dtype == torch.bfloat16)), ("HEAD_DIM", head_dim))


def builds():
    """Every set of -D defines the launchers compile kv_write.cu with (the compile check's list)."""
    return [dict(_defines(dtype, d, fmt)) for dtype in ATTENTION_DTYPES for d in HEAD_DIMS for fmt in FORMAT_CODES]


def _kernel(function, k, head_dim, fmt):
    return cuda_build.kernel("kv_write", function, k.device.index, _defines(k.dtype, head_dim, fmt))


def _scales(k_cache, k_scale, v_scale):
    # the kernel reads no scale pointer for an unquantized cache; any valid address will do
    return (k_scale, v_scale) if k_scale is not None else (k_cache, k_cache)


def native_cp_async(k, v, cu_seqlens, block_table, k_cache, v_cache, *, k_scale=None, v_scale=None):
    # k, v: [tokens, Hkv, D]; cu_seqlens: [B + 1] int32; block_table: [B, max_pages] int32;
    # k/v_cache: [pages, page_size, Hkv, D] (k/v_scale: [pages, page_size, Hkv] when quantized)
    batch, kv_heads, head_dim, page_size, fmt = check_write_args(
        k, v, cu_seqlens, block_table, k_cache, v_cache, k_scale, v_scale)
    cu_seqlens, block_table = _as_checked(cu_seqlens, block_table)
    kernel = _kernel("kv_write_cp_async", k, head_dim, fmt)
    tokens = tile_tokens(page_size, kv_heads * head_dim * k.element_size())
    smem = CP_STAGES * tokens * kv_heads * head_dim * k.element_size()
    kernel.check_shared(smem, k.device)
    grid = hw.num_sms(k.device) * min(CP_CTAS_PER_SM[fmt != "none"], kernel.blocks_per_sm(CP_THREADS, smem))
    scales = _scales(k_cache, k_scale, v_scale)
    p, i = cuda_build.pointer, cuda_build.int32
    args = (p(k), p(v), cuda_build.int64(k.stride(0)), p(cu_seqlens), p(block_table), i(batch),
            i(block_table.shape[1]), i(page_size), i(kv_heads), i(tokens), p(k_cache), p(v_cache),
            p(scales[0]), p(scales[1]))

    def launch():
        kernel((grid,), (CP_THREADS,), smem, *args)
        return k_cache, v_cache

    launch.tensors = (k, v, cu_seqlens, block_table, k_cache, v_cache, *scales)  # behind args' raw pointers
    return launch


def native_tma(k, v, cu_seqlens, block_table, k_cache, v_cache, *, k_scale=None, v_scale=None):
    # shapes as native_cp_async
    batch, kv_heads, head_dim, page_size, fmt = check_write_args(
        k, v, cu_seqlens, block_table, k_cache, v_cache, k_scale, v_scale)
    cu_seqlens, block_table = _as_checked(cu_seqlens, block_table)
    quantized = fmt != "none"
    if kv_heads > tensor_maps.MAX_BOX:  # a box holds every KV head of a token
        raise ValueError(f"k: {kv_heads} KV heads exceed native_tma's {tensor_maps.MAX_BOX} (a TMA box side)")
    kernel = _kernel("kv_write_tma", k, head_dim, fmt)
    tokens = tile_tokens(page_size, kv_heads * head_dim * k.element_size())
    slots = k_cache.shape[0] * page_size
    src_maps = [tensor_maps.tiled(t, (head_dim, kv_heads, t.shape[0]), (head_dim, t.stride(0)),
                                  (head_dim, kv_heads, tokens)) for t in (k, v)]
    dst_maps = [tensor_maps.tiled(c, (head_dim, kv_heads, slots), (head_dim, kv_heads * head_dim),
                                  (head_dim, kv_heads, n)) for n in (tokens, 1) for c in (k_cache, v_cache)]
    smem = TMA_STAGES[quantized] * tokens * kv_heads * head_dim * k.element_size()
    if quantized:  # two output buffers, each token's row padded to TMA_ALIGN bytes
        smem += 2 * tokens * -(-kv_heads * head_dim // TMA_ALIGN) * TMA_ALIGN
    threads = TMA_THREADS[quantized]
    kernel.check_shared(smem, k.device)
    grid = hw.num_sms(k.device) * min(TMA_CTAS_PER_SM[quantized], kernel.blocks_per_sm(threads, smem))
    scales = _scales(k_cache, k_scale, v_scale)
    p, i, s = cuda_build.pointer, cuda_build.int32, cuda_build.struct
    args = (*map(s, src_maps + dst_maps), p(cu_seqlens), p(block_table), i(batch), i(block_table.shape[1]),
            i(page_size), i(kv_heads), i(tokens), p(scales[0]), p(scales[1]))

    def launch():
        kernel((grid,), (threads,), smem, *args)
        return k_cache, v_cache

    launch.tensors = (k, v, cu_seqlens, block_table, k_cache, v_cache, *scales)  # behind the maps' addresses
    return launch


VARIANTS = {"native_cp_async": native_cp_async, "native_tma": native_tma}
