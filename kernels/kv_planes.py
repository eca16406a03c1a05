"""Quantized K/V tiles read as 16-bit units (kernels/kv_quant.py's int8, fp8 and int4 formats) for
decode attention's Triton kernels.

Read byte by byte, a quantized tile costs far more than its bytes: V's dot reduces over positions,
so each 8-bit value is its own shared-memory load, every value converts alone, and 8-bit operands
make Triton shuffle Q and P (sm_90 compile, B64-L4096 int8: 1527 instructions per 128 positions
against bf16's 345 per 64). Viewed as int16, a tile splits into fp16 planes (byte 0 and byte 1
of every unit; int4: four nibble planes); S is the sum of one dot per plane with q's matching
columns, each V plane accumulates its own output columns (16-bit operands: ldmatrix.trans), and
the conversion runs on whole registers in PTX (H100, B64-L4096: int8 236 -> 204 us, fp8 222 ->
200 us, int4 204 -> 121 us). The interpreter, which runs no PTX, computes the same planes in Triton.
"""

import torch
import triton
import triton.language as tl

from kernels import hw, kv_quant

UNIT_BYTES = 2  # a tile is read as int16


@triton.jit
def _int8_to_f16(x):
    # Exact, on the integer ALUs instead of the conversion pipe: the fp16 with bits
    # 0x6400 | (x + 128) is 1024 + x + 128.
    bits = (x.to(tl.uint8, bitcast=True).to(tl.uint16) ^ 0x80) | 0x6400
    return bits.to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _nibble_to_f16(n):
    # n: uint16 in [0, 16), an int4 value + 8 -> that value, exactly (as _int8_to_f16)
    return (n | 0x6400).to(tl.float16, bitcast=True) - 1032.0


@triton.jit
def _plane_f16(u, P: tl.constexpr, UNIT: tl.constexpr, QUANT: tl.constexpr):
    # Plane P of a tile of UNIT-byte units as fp16: byte j = P % UNIT of every unit, and for int4 its
    # low (P < UNIT) or high nibble. UNIT 1: u is the cache's own dtype (int8, uint8, fp8).
    SHIFT: tl.constexpr = 8 * (P % UNIT) + 4 * (P // UNIT)
    if UNIT == 1:
        if QUANT == "int4":
            return _nibble_to_f16((u.to(tl.uint16) >> SHIFT) & 15)
        elif QUANT == "int8":
            return _int8_to_f16(u)
        else:
            return u.to(tl.float16)
    elif QUANT == "int4":
        return _nibble_to_f16(((u >> SHIFT) & 15).to(tl.uint16))
    elif QUANT == "int8":
        return _int8_to_f16(((u >> SHIFT) & 0xFF).to(tl.uint8))
    else:
        return ((u >> SHIFT) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)


# PTX on the device; the interpreter (no PTX) computes the same planes with _plane_f16.
ASM_PLANES = tl.constexpr(not hw.interpreting())

_INT8_PLANES = tl.constexpr("""{
.reg .b32 t, c;
mov.b32 c, 0x64806480;
lop3.b32 t, $2, 0x00ff00ff, c, 0x6a;
sub.f16x2 $0, t, c;
shr.b32 t, $2, 8;
lop3.b32 t, t, 0x00ff00ff, c, 0x6a;
sub.f16x2 $1, t, c;
}""")
_INT4_PLANES = tl.constexpr("""{
.reg .b32 t, s, c, k, m, n;
mov.b32 c, 0x64006400;
mov.b32 k, 0x64086408;
mov.b32 m, 0x2c002c00;
mov.b32 n, 0xd480d480;
lop3.b32 t, $4, 0x000f000f, c, 0xea;
sub.f16x2 $0, t, k;
lop3.b32 t, $4, 0x00f000f0, c, 0xea;
fma.rn.f16x2 $2, t, m, n;
shr.b32 s, $4, 8;
lop3.b32 t, s, 0x000f000f, c, 0xea;
sub.f16x2 $1, t, k;
lop3.b32 t, s, 0x00f000f0, c, 0xea;
fma.rn.f16x2 $3, t, m, n;
}""")
_FP8_PLANES = tl.constexpr("""{
.reg .b32 t;
.reg .b16 lo, hi;
prmt.b32 t, $2, 0, 0x3120;
mov.b32 {lo, hi}, t;
cvt.rn.f16x2.e4m3x2 $0, lo;
cvt.rn.f16x2.e4m3x2 $1, hi;
}""")


@triton.jit
def _planes2(u, QUANT: tl.constexpr):
    # The fp16 planes of a tile of int16 units, as _plane_f16(u, P, 2, QUANT) for every P; each
    # 32-bit register (two units) converts with a few whole-register instructions:
    # int8: (u & 0x00ff00ff) ^ 0x64806480 is 0x6400 | (x + 128) per half, minus 1152 in f16x2;
    # int4: nibble n | 0x6400 is 1024 + n, (n << 4) | 0x6400 is 1024 + 16 n: a sub / an fma in f16x2;
    # fp8: the two units' bytes regrouped (prmt), then the e4m3x2 conversion.
    if ASM_PLANES:
        if QUANT == "int4":
            p0, p1, p2, p3 = tl.inline_asm_elementwise(
                _INT4_PLANES, "=r,=r,=r,=r,r", [u],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2)
            return p0, p1, p2, p3
        else:
            p0, p1 = tl.inline_asm_elementwise(_INT8_PLANES if QUANT == "int8" else _FP8_PLANES, "=r,=r,r", [u],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=2)
            return p0, p1, p0, p1
    else:
        if QUANT == "int4":
            return (_plane_f16(u, 0, 2, QUANT), _plane_f16(u, 1, 2, QUANT), _plane_f16(u, 2, 2, QUANT),
                    _plane_f16(u, 3, 2, QUANT))
        else:
            p0 = _plane_f16(u, 0, 2, QUANT)
            p1 = _plane_f16(u, 1, 2, QUANT)
            return p0, p1, p0, p1


@triton.jit
def _tile_planes(u, UNIT: tl.constexpr, NP: tl.constexpr, QUANT: tl.constexpr):
    # The NP fp16 planes of a tile of UNIT-byte units, as four (planes past NP repeat earlier ones
    # and are not read)
    if UNIT == 2:
        return _planes2(u, QUANT)
    p0 = _plane_f16(u, 0, UNIT, QUANT)
    p1 = p0
    p2 = p0
    p3 = p0
    if NP >= 2:
        p1 = _plane_f16(u, 1, UNIT, QUANT)
    if NP == 4:
        p2 = _plane_f16(u, 2, UNIT, QUANT)
        p3 = _plane_f16(u, 3, UNIT, QUANT)
    return p0, p1, p2, p3


@triton.jit
def _plane_cols(P: tl.constexpr, UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, UNITS: tl.constexpr):
    # The head-dim index of plane P's columns: (D/2) * hi + UNIT * c + j (kernels/kv_quant.py's int4
    # keeps element i + D/2 in the high nibble of byte i)
    return (HEAD_DIM // 2) * (P // UNIT) + UNIT * tl.arange(0, UNITS) + P % UNIT


@triton.jit
def _q_plane(q_rows, h_mask, P: tl.constexpr, UNIT: tl.constexpr, HEAD_DIM: tl.constexpr, UNITS: tl.constexpr):
    return tl.load(q_rows + _plane_cols(P, UNIT, HEAD_DIM, UNITS)[None, :], mask=h_mask, other=0.0).to(tl.float16)


@triton.jit
def _attend_chunk_planes(q_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, block_table_ptr, b, kvh, start, end,
                         qk_scale, stride_qb, stride_qh, stride_kx, stride_ky, stride_kh, stride_sx, stride_sy,
                         stride_sh, stride_bt, page_size, page_shift,
                         GROUP: tl.constexpr, PAGED: tl.constexpr, QUANT: tl.constexpr,
                         HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         K_UNIT: tl.constexpr, V_UNIT: tl.constexpr, PAGE_POW2: tl.constexpr):
    # As _attend_chunk, for a quantized cache whose K and V rows are read as K_UNIT- and V_UNIT-byte
    # units (k_ptr/v_ptr: int16 views for 2; the strides are in K units). A tile [BLOCK_N, UNITS]
    # of units splits into NP planes of fp16 [BLOCK_N, UNITS] (plane P: byte P % UNIT of each unit,
    # int4: its nibble P // UNIT): S sums NP dots of q's matching columns with the K planes, and each
    # V plane accumulates its own columns of the output. V's dot reduces over positions: read as
    # 16-bit units, its operand comes from shared memory through ldmatrix.trans (bytes would need a
    # load per value), and it converts on packed registers.
    BYTES: tl.constexpr = HEAD_DIM // 2 if QUANT == "int4" else HEAD_DIM  # stored per row
    NPK: tl.constexpr = K_UNIT * 2 if QUANT == "int4" else K_UNIT
    NPV: tl.constexpr = V_UNIT * 2 if QUANT == "int4" else V_UNIT
    KU: tl.constexpr = BYTES // K_UNIT
    VU: tl.constexpr = BYTES // V_UNIT
    offs_h = tl.arange(0, BLOCK_H)
    q_rows = q_ptr + b * stride_qb + (kvh * GROUP + offs_h)[:, None] * stride_qh
    h_mask = (offs_h < GROUP)[:, None]
    q0 = _q_plane(q_rows, h_mask, 0, K_UNIT, HEAD_DIM, KU)
    if NPK >= 2:
        q1 = _q_plane(q_rows, h_mask, 1, K_UNIT, HEAD_DIM, KU)
    if NPK == 4:
        q2 = _q_plane(q_rows, h_mask, 2, K_UNIT, HEAD_DIM, KU)
        q3 = _q_plane(q_rows, h_mask, 3, K_UNIT, HEAD_DIM, KU)
    acc0 = tl.zeros([BLOCK_H, VU], tl.float32)
    acc1 = tl.zeros([BLOCK_H, VU], tl.float32)
    acc2 = tl.zeros([BLOCK_H, VU], tl.float32)
    acc3 = tl.zeros([BLOCK_H, VU], tl.float32)
    offs_k = tl.arange(0, KU)
    offs_v = tl.arange(0, VU)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    # Row sums are kept per column and reduced once per chunk: no cross-warp sum per step.
    l_cols = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    if not PAGED:  # a contiguous tile is a 64-bit base and 32-bit row offsets (quant_units checks they fit)
        head = tl.cast(kvh, tl.int64)  # 64-bit: (Hkv - 1) * stride_kh may pass 2**31
        k_base = k_ptr + (b.to(tl.int64) * stride_kx + head * stride_kh)
        v_base = v_ptr + (b.to(tl.int64) * stride_kx + head * stride_kh) * K_UNIT // V_UNIT
        s_base = b.to(tl.int64) * stride_sx + head * stride_sh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        pos = tl.minimum(pos, end - 1)
        if PAGED:
            if PAGE_POW2:  # a shift and a mask, not a division by a runtime value
                page = tl.load(block_table_ptr + b * stride_bt + (pos >> page_shift)).to(tl.int64)
                slot = (pos & (page_size - 1)).to(tl.int64)
            else:
                page = tl.load(block_table_ptr + b * stride_bt + pos // page_size).to(tl.int64)
                slot = (pos % page_size).to(tl.int64)
            rows = page * stride_kx + slot * stride_ky + kvh * stride_kh
            scale_rows = page * stride_sx + slot * stride_sy + kvh * stride_sh
            k_tile = k_ptr + rows[:, None] + offs_k[None, :]
            if V_UNIT == K_UNIT:
                v_tile = v_ptr + rows[:, None] + offs_v[None, :]
            else:
                v_tile = v_ptr + (rows * K_UNIT // V_UNIT)[:, None] + offs_v[None, :]
        else:
            rows = pos * stride_ky
            scale_rows = s_base + pos * stride_sy
            k_tile = k_base + rows[:, None] + offs_k[None, :]
            if V_UNIT == K_UNIT:
                v_tile = v_base + rows[:, None] + offs_v[None, :]
            else:
                v_tile = v_base + (rows * K_UNIT // V_UNIT)[:, None] + offs_v[None, :]
        k0, k1, k2, k3 = _tile_planes(tl.load(k_tile), K_UNIT, NPK, QUANT)
        s = tl.dot(q0, tl.trans(k0))
        if NPK >= 2:
            s = tl.dot(q1, tl.trans(k1), s)
        if NPK == 4:
            s = tl.dot(q2, tl.trans(k2), s)
            s = tl.dot(q3, tl.trans(k3), s)
        # one FFMA per score: the K scale with qk_scale folded in, and -inf past the end as a bias
        s = s * (tl.load(k_scale_ptr + scale_rows) * qk_scale)[None, :] + tl.where(valid, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_cols = l_cols * alpha[:, None] + p
        p *= tl.load(v_scale_ptr + scale_rows)[None, :]
        p16 = p.to(tl.float16)
        v0, v1, v2, v3 = _tile_planes(tl.load(v_tile), V_UNIT, NPV, QUANT)
        acc0 = acc0 * alpha[:, None] + tl.dot(p16, v0)
        if NPV >= 2:
            acc1 = acc1 * alpha[:, None] + tl.dot(p16, v1)
        if NPV == 4:
            acc2 = acc2 * alpha[:, None] + tl.dot(p16, v2)
            acc3 = acc3 * alpha[:, None] + tl.dot(p16, v3)
        m_i = m_new
    l_i = tl.sum(l_cols, 1)
    # planes back to head-dim order (_plane_cols)
    if QUANT == "int4":  # V_UNIT 2: planes (j, hi) = 0: (0, lo), 1: (1, lo), 2: (0, hi), 3: (1, hi)
        if V_UNIT == 2:
            lo = tl.reshape(tl.join(acc0, acc1), [BLOCK_H, HEAD_DIM // 2])
            hi = tl.reshape(tl.join(acc2, acc3), [BLOCK_H, HEAD_DIM // 2])
        else:
            lo = acc0
            hi = acc1
        acc = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), [BLOCK_H, HEAD_DIM])
    elif NPV == 4:  # [H, C, 2, 2]: element (c, i1, i2) is plane 2 * i1 + i2 of column c
        acc = tl.reshape(tl.join(tl.join(acc0, acc2), tl.join(acc1, acc3)), [BLOCK_H, HEAD_DIM])
    elif NPV == 2:
        acc = tl.reshape(tl.join(acc0, acc1), [BLOCK_H, HEAD_DIM])
    else:
        acc = acc0
    return acc, m_i, l_i


def quant_units(fmt, k_cache, v_cache, head_dim, num_warps, paged):
    """(K_UNIT, V_UNIT): bytes per unit in which _attend_chunk_planes reads fmt's K and V tiles, UNIT_BYTES
    each; 1 (the cache's own dtype) where a plane would be too narrow (K: < 16 columns, a dot's least
    K; V: < 8 per warp, which several warps would compute at once: int4 at D=64) or where the caches
    do not view as units (a stride or the storage offset odd). (1, 1), for fp16/bf16 caches, caches
    that do not view as units and contiguous caches whose row offsets pass 32 bits (the planes
    kernel's), means decode_tiles' _attend_chunk. k_cache: [B, Hkv, L_max, D'] or paged."""
    if fmt == "none" or (not paged and k_cache.stride(2) * k_cache.shape[2] >= 2 ** 31):
        return 1, 1
    k_unit = v_unit = UNIT_BYTES
    row_bytes = kv_quant.values_per_byte_row(fmt, head_dim)
    if row_bytes // k_unit < 16:
        k_unit = 1
    if row_bytes // v_unit < 8 * num_warps:
        v_unit = 1
    unit = max(k_unit, v_unit)
    for cache in (k_cache, v_cache):
        if any(s % unit for s in cache.stride()[:-1]) or cache.storage_offset() % unit or cache.data_ptr() % unit:
            return 1, 1
    return k_unit, v_unit


def unit_view(cache, unit):
    return cache if unit == 1 else cache.view(torch.int16)
