"""The Triton device functions of one decode-attention tile (SPEC 2.1), shared by the decode-attention
kernels (kernels/decode_attention.py), the decode loops (kernels/decode_loop.py) and paged offload
(kernels/paged_offload.py): attend the query heads of one KV head over a range of one sequence's
positions with an online softmax (_attend_chunk; quantized caches read as 16-bit units go through
kernels/kv_planes.py), store the heads, and store and merge log-sum-exp partials.
"""

import triton
import triton.language as tl

from kernels.kv_planes import _attend_chunk_planes, _int8_to_f16, _nibble_to_f16


@triton.jit
def _attend_chunk(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh, start, end, qk_scale,
                  stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy, stride_sh,
                  stride_bt, page_size, page_shift,
                  GROUP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_POW2: tl.constexpr,
                  TABLE_PAGES: tl.constexpr = 0,  # 0 for the loops of kernels/decode_loop.py, paged_offload.py
                  WIDTH_BOUND: tl.constexpr = False, table_width=0):
    # The GROUP query heads of KV head `kvh` over positions [start, end) of sequence b:
    # returns the unnormalized output [BLOCK_H, D], row max and row sum (log2 units).
    # TABLE_PAGES > 0 (paged): the tile's block-table entries, at most TABLE_PAGES, are loaded once
    # before the loop and each step picks its rows' pages from registers (tl.gather), so the loop's
    # only global loads are the K and V tiles; 0: each step loads its rows' entries. WIDTH_BOUND: those
    # entries are bounded by the row's table_width, not by `end`, a load that does not wait for seq_lens
    # (entries past the sequence's pages are loaded, never used).
    # Quantized caches (kernels/kv_quant.py): the dots run in fp16, which holds int8, int4 and e4m3
    # values exactly and converts from them cheaply (q, |q| < 65504, is converted once per chunk);
    # the K scale multiplies the scores' columns and the V scale folds into P.
    offs_h = tl.arange(0, BLOCK_H)
    q_rows = q_ptr + b * stride_qb + (kvh * GROUP + offs_h)[:, None] * stride_qh
    h_mask = (offs_h < GROUP)[:, None]
    if QUANT == "int4":  # two nibble planes: elements [0, D/2) and [D/2, D)
        offs_d = tl.arange(0, HEAD_DIM // 2)
        q = tl.load(q_rows + offs_d[None, :], mask=h_mask, other=0.0)
        q_hi = tl.load(q_rows + HEAD_DIM // 2 + offs_d[None, :], mask=h_mask, other=0.0)
        acc_hi = tl.zeros([BLOCK_H, HEAD_DIM // 2], tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM // 2], tl.float32)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_rows + offs_d[None, :], mask=h_mask, other=0.0)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    if QUANT != "none":
        q = q.to(tl.float16)
    if QUANT == "int4":
        q_hi = q_hi.to(tl.float16)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if PAGED and TABLE_PAGES > 0:
        if PAGE_POW2:
            first_page = start >> page_shift
            n_pages = ((end - 1) >> page_shift) - first_page + 1
        else:
            first_page = start // page_size
            n_pages = (end - 1) // page_size - first_page + 1
        offs_t = tl.arange(0, TABLE_PAGES)
        table = tl.load(block_table_ptr + b * stride_bt + first_page + offs_t,
                        mask=offs_t < (table_width - first_page if WIDTH_BOUND else n_pages), other=0)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        # Past the end, read the last valid row again: every load stays in bounds unmasked, and
        # those columns get zero weight below. It also keeps tl.gather's index inside the hoisted
        # table: in a pipelined loop, an unmasked load through an index past the table faulted on
        # the H100 though no step reached it (notes/decode_attention.md, ninth session).
        pos = tl.minimum(pos, end - 1)
        if PAGED:
            if PAGE_POW2:  # page_size == 2 ** page_shift: a shift and a mask, not a division by a runtime value
                if TABLE_PAGES > 0:
                    page = tl.gather(table, (pos >> page_shift) - first_page, 0).to(tl.int64)
                else:
                    page = tl.load(block_table_ptr + b * stride_bt + (pos >> page_shift)).to(tl.int64)
                slot = (pos & (page_size - 1)).to(tl.int64)
            else:
                if TABLE_PAGES > 0:
                    page = tl.gather(table, pos // page_size - first_page, 0).to(tl.int64)
                else:
                    page = tl.load(block_table_ptr + b * stride_bt + pos // page_size).to(tl.int64)
                slot = (pos % page_size).to(tl.int64)
            rows = page * stride_kx + slot * stride_ky
            scale_rows = page * stride_sx + slot * stride_sy
        else:
            rows = b.to(tl.int64) * stride_kx + pos.to(tl.int64) * stride_ky
            scale_rows = b.to(tl.int64) * stride_sx + pos.to(tl.int64) * stride_sy
        head = tl.cast(kvh, tl.int64)  # 64-bit: (Hkv - 1) * stride_kh may pass 2**31
        rows += head * stride_kh
        scale_rows += head * stride_sh
        k = tl.load(k_ptr + rows[:, None] + offs_d[None, :])
        if QUANT == "int4":
            k = k.to(tl.uint16)
            s = tl.dot(q, tl.trans(_nibble_to_f16(k & 15))) + tl.dot(q_hi, tl.trans(_nibble_to_f16(k >> 4)))
        elif QUANT == "int8":
            s = tl.dot(q, tl.trans(_int8_to_f16(k)))
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))  # [BLOCK_H, BLOCK_N]
        if QUANT != "none":
            s *= tl.load(k_scale_ptr + scale_rows)[None, :]
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if QUANT != "none":
            p *= tl.load(v_scale_ptr + scale_rows)[None, :]
        v = tl.load(v_ptr + rows[:, None] + offs_d[None, :])
        if QUANT == "int4":
            v = v.to(tl.uint16)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), _nibble_to_f16(v & 15))
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(q.dtype), _nibble_to_f16(v >> 4))
        elif QUANT == "int8":
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), _int8_to_f16(v))
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    if QUANT == "int4":  # [BLOCK_H, 2, D/2] -> [BLOCK_H, D]: the halves side by side
        acc = tl.reshape(tl.permute(tl.join(acc, acc_hi), (0, 2, 1)), [BLOCK_H, HEAD_DIM])
    return acc, m_i, l_i


@triton.jit
def _attend_tile(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh, start, end, qk_scale,
                 stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy, stride_sh,
                 stride_bt, page_size, page_shift,
                 GROUP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, K_UNIT: tl.constexpr, V_UNIT: tl.constexpr,
                 PAGE_POW2: tl.constexpr, TABLE_PAGES: tl.constexpr, WIDTH_BOUND: tl.constexpr = False,
                 table_width=0):
    # A tile of either kernel: quantized caches read as 16-bit units go through kernels/kv_planes.py,
    # everything else (fp16/bf16, caches that do not view as units) through _attend_chunk.
    if K_UNIT == 1 and V_UNIT == 1:
        return _attend_chunk(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh, start, end,
                             qk_scale, stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy,
                             stride_sh, stride_bt, page_size, page_shift, GROUP, PAGED, QUANT, HEAD_DIM, BLOCK_H,
                             BLOCK_N, PAGE_POW2, TABLE_PAGES, WIDTH_BOUND, table_width)
    else:
        return _attend_chunk_planes(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh, start,
                                    end, qk_scale, stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_sx,
                                    stride_sy, stride_sh, stride_bt, page_size, page_shift, GROUP, PAGED, QUANT,
                                    HEAD_DIM, BLOCK_H, BLOCK_N, K_UNIT, V_UNIT, PAGE_POW2)


@triton.jit
def _store_heads(out_ptr, stride_ob, stride_oh, b, kvh, o,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(out_ptr + b * stride_ob + (kvh * GROUP + offs_h)[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(offs_h < GROUP)[:, None])


@triton.jit
def _store_partial(part_o_ptr, part_lse_ptr, b, kvh, chunk, acc, m_i, l_i, num_q_heads, max_chunks,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    # part_o: [B, Hq, max_chunks, D] fp32 normalized; part_lse: [B, Hq, max_chunks] fp32 (log2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    part = (b * num_q_heads + kvh * GROUP + offs_h).to(tl.int64) * max_chunks + chunk
    tl.store(part_lse_ptr + part, m_i + tl.math.log2(l_i), mask=h_mask)
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_i[:, None],
             mask=h_mask[:, None])


@triton.jit
def _merge_heads(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, b, kvh, n_chunks,
                 num_q_heads, max_chunks,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_C: tl.constexpr):
    # out[h] = sum_c 2^lse_c * o_c / sum_c 2^lse_c over the n_chunks partials, for the GROUP heads
    # of KV head kvh at once, MERGE_C chunks per step. .cg loads: partials written by other SMs
    # during this launch must not be served from this SM's L1.
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, MERGE_C)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    part = (b * num_q_heads + kvh * GROUP + offs_g).to(tl.int64) * max_chunks
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for c0 in range(0, n_chunks, MERGE_C):
        c = c0 + offs_c
        idx = part[:, None] + c[None, :]  # [G, C]
        mask = g_mask[:, None] & (c < n_chunks)[None, :]
        lse = tl.load(part_lse_ptr + idx, mask=mask, other=float("-inf"), cache_modifier=".cg")
        lse = tl.where(g_mask[:, None], lse, 0.0)  # padding heads stay finite
        o = tl.load(part_o_ptr + idx[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=mask[:, :, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_i, tl.max(lse, 1))
        alpha = tl.math.exp2(m_i - m_new)
        w = tl.math.exp2(lse - m_new[:, None])
        l_i = l_i * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        m_i = m_new
    _store_heads(out_ptr, stride_ob, stride_oh, b, kvh, acc / l_i[:, None], GROUP, HEAD_DIM, BLOCK_G)


@triton.jit
def _finish_tile(part_o_ptr, part_lse_ptr, counters_ptr, out_ptr, stride_ob, stride_oh, b, kvh, chunk, nc,
                 acc, m_i, l_i, num_q_heads, num_kv_heads, max_chunks,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr,
                 MERGE_C: tl.constexpr):
    # A persistent tile, chunk `chunk` of the nc of (b, kvh): the output itself when nc == 1, else a
    # partial, and the last of the nc tiles to finish merges them.
    if nc == 1:
        _store_heads(out_ptr, stride_ob, stride_oh, b, kvh, acc / l_i[:, None], GROUP, HEAD_DIM, BLOCK_H)
    else:
        _store_partial(part_o_ptr, part_lse_ptr, b, kvh, chunk, acc, m_i, l_i, num_q_heads, max_chunks,
                       GROUP, HEAD_DIM, BLOCK_H)
        # The barrier orders this program's partial stores before its release; the acq_rel counter
        # makes every other tile's visible.
        tl.debug_barrier()
        counter = counters_ptr + b * num_kv_heads + kvh
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == nc - 1:
            _merge_heads(part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, b, kvh, nc,
                         num_q_heads, max_chunks, GROUP, HEAD_DIM, BLOCK_G, MERGE_C)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
