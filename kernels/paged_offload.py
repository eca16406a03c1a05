"""Decode over a context larger than the GPU's budget (SPEC 2.10): the KV cache lives in host
memory, chunk by chunk, and streams through two device buffers; each chunk's attention is merged
into a running (output, log-sum-exp) per query head, so the result is attention over the whole
context, exactly as if it were resident.

Host layout, chunk-major so each chunk is one contiguous copy: k, v [chunks, B, C, Hkv, D] (fp16 /
bf16, or fp8-e4m3 with float32 scales [chunks, B, C, Hkv], kernels/kv_quant.py's format); every
sequence holds the same `length` tokens, the last chunk possibly partial.
- baseline: pageable host tensors, synchronous copies, one stream; an fp8 chunk is dequantized by
  a separate torch pass before a bf16/fp16 attention kernel (no fusion);
- optimized: the chunks in a memory-mapped page file, filled by the CPU into pinned staging (two
  buffers), copied asynchronously on a copy stream: chunk i+1 is filled and copied while chunk i
  is attended. fp8 is dequantized inside the attention kernel.
Without a GPU both run in order on the CPU (Triton's interpreter): the math is checked, not the overlap.
"""

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from kernels import kv_quant
from kernels.checks import check_head_dim, check_tensor, check_unit_stride_last
from kernels.decode_tiles import _attend_chunk

VARIANTS = ("baseline", "optimized")
FORMATS = ("fp16", "fp8")  # fp16: the model dtype (fp16 or bf16), as SPEC 2.10 names it
BLOCK_N = 64
NUM_WARPS = 4


@triton.jit
def _attend_merge(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, o_run_ptr, lse_run_ptr, out_ptr, n_valid, qk_scale,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_sb, stride_st, stride_sh,
                  stride_ob, stride_oh, num_q_heads,
                  GROUP: tl.constexpr, QUANT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, LAST: tl.constexpr):
    # grid (B, Hkv): the chunk's first n_valid tokens for KV head kvh of sequence b, merged into
    # o_run [B, Hq, D] (normalized, fp32) and lse_run [B, Hq] (log2 units); LAST: the merged
    # output goes to out [B, Hq, D] instead.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    acc, m_i, l_i = _attend_chunk(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, q_ptr, b, kvh, 0, n_valid, qk_scale,
                                  stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_sb, stride_st,
                                  stride_sh, 0, 1, 0, GROUP, False, QUANT, HEAD_DIM, BLOCK_H, BLOCK_N, False)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    h_mask = offs_h < GROUP
    row = b * num_q_heads + kvh * GROUP + offs_h
    lse_c = m_i + tl.math.log2(l_i)
    lse_r = tl.load(lse_run_ptr + row, mask=h_mask, other=float("-inf"))
    o_r = tl.load(o_run_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=h_mask[:, None], other=0.0)
    m = tl.maximum(lse_r, lse_c)
    w_r = tl.math.exp2(lse_r - m)
    w_c = tl.math.exp2(lse_c - m)
    total = w_r + w_c
    o = (o_r * w_r[:, None] + acc * (w_c / l_i)[:, None]) / total[:, None]
    if LAST:
        tl.store(out_ptr + b * stride_ob + (kvh * GROUP + offs_h)[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        tl.store(o_run_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=h_mask[:, None])
        tl.store(lse_run_ptr + row, m + tl.math.log2(total), mask=h_mask)


@dataclass
class HostKV:
    """The whole context in host memory, chunk-major (module docstring)."""
    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor  # None unless fp8
    v_scale: torch.Tensor
    length: int
    page_file: object = None  # PageFile backing the tensors, if any

    @property
    def fmt(self):
        return "fp8" if self.k.dtype == torch.float8_e4m3fn else "fp16"

    def tensors(self):
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def bytes(self):
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def close(self):
        """Drop the tensors, then the page file (an mmap cannot close while a view of it lives)."""
        self.k = self.v = self.k_scale = self.v_scale = None
        if self.page_file is not None:
            self.page_file.close()
            self.page_file = None


class PageFile:
    """A file of `size` bytes memory-mapped into host memory, deleted on close()."""

    def __init__(self, path, size):
        self.path = Path(path)
        with open(self.path, "wb") as f:
            f.truncate(size)
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), size)
        self.bytes = torch.frombuffer(self._map, dtype=torch.uint8)

    def tensor(self, offset, shape, dtype):
        n = math.prod(shape) * dtype.itemsize
        return self.bytes[offset:offset + n].view(dtype).view(shape)

    def drop_from_page_cache(self):
        """Write back and evict the file's pages from the OS page cache: the next read comes from disk."""
        self._map.flush()
        os.fsync(self._file.fileno())
        os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._map.madvise(mmap.MADV_DONTNEED)

    def close(self):
        del self.bytes
        self._map.close()
        self._file.close()
        self.path.unlink(missing_ok=True)


def store(k, v, chunk, fmt, *, page_file_path=None):
    """k, v: [B, L, Hkv, D] (any device) -> HostKV with chunks of `chunk` tokens, quantized to fp8
    when fmt is fp8; in a memory-mapped page file at page_file_path, else in ordinary (pageable)
    host memory."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must be [B, L, Hkv, D] alike, got {tuple(k.shape)} and {tuple(v.shape)}")
    check_tensor("k", k, dtypes=(torch.float16, torch.bfloat16))  # fp16: the 16-bit format as given
    check_tensor("v", v, dtypes=(k.dtype,))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 token, got {chunk}")
    batch, length, kv_heads, head_dim = k.shape
    n = -(-length // chunk)

    def chunked(x):  # [B, L, ...] -> [chunks, B, C, ...], the tail zero-padded
        pad = torch.zeros((batch, n * chunk - length, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return torch.cat([x, pad], 1).unflatten(1, (n, chunk)).transpose(0, 1).contiguous()

    parts = [chunked(k), chunked(v)]
    if fmt == "fp8":  # quantized where k, v are, then moved: the same bytes, sooner on a GPU
        (kq, ks), (vq, vs) = kv_quant.quantize(parts[0], "fp8"), kv_quant.quantize(parts[1], "fp8")
        parts = [kq, vq, ks, vs]
    parts = [p.cpu() for p in parts]
    page_file = None
    if page_file_path is not None:
        page_file = PageFile(page_file_path, sum(p.numel() * p.element_size() for p in parts))
        offset, mapped = 0, []
        for p in parts:
            t = page_file.tensor(offset, p.shape, p.dtype)
            t.copy_(p)
            mapped.append(t)
            offset += p.numel() * p.element_size()
        parts = mapped
    scales = parts[2:] if fmt == "fp8" else [None, None]
    return HostKV(parts[0], parts[1], *scales, length, page_file)


def _chunk_len(host, i):
    chunk = host.k.shape[2]
    return min(chunk, host.length - i * chunk)


class Decoder:
    """One decode step's attention for q [B, Hq, D] over a HostKV, as `variant`. Call it -> out
    [B, Hq, D]; call(copy=False) attends device-resident chunks only, call(compute=False) only
    streams the chunks in; call(trace=True) (optimized, on a GPU) also records per-chunk events
    for hidden_attention()."""

    def __init__(self, variant, q, host):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"q must be [B, Hq, D] fp16/bf16, got {tuple(q.shape)} {q.dtype}")
        check_unit_stride_last("q", q)
        chunks, batch, chunk, kv_heads, head_dim = host.k.shape
        if q.shape[0] != batch or q.shape[2] != head_dim or q.shape[1] % kv_heads:
            raise ValueError(f"q {tuple(q.shape)} does not fit the host KV [B {batch}, Hkv {kv_heads}, D {head_dim}]")
        check_head_dim("q", head_dim)
        if host.fmt != "fp8" and host.k.dtype != q.dtype:  # attended as stored: no silent conversion
            raise TypeError(f"q has dtype {q.dtype} but the host KV holds {host.k.dtype}: they must match")
        if host.length < 1:
            raise ValueError(f"host holds {host.length} tokens: attention needs a context of at least one")
        self.q, self.host = q, host
        self.fused = variant == "optimized" and host.fmt == "fp8"
        pinned = variant == "optimized" and q.device.type == "cuda"
        chunk_tensors = [t[0] for t in host.tensors()]
        self.staging = [[torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in chunk_tensors]
                        for _ in range(2)] if variant == "optimized" else None
        self.buffers = [[torch.empty_like(t, device=q.device) for t in chunk_tensors]
                        for _ in range(2 if variant == "optimized" else 1)]
        if host.fmt == "fp8" and not self.fused:  # the baseline's separate dequantization pass
            self.dequantized = [torch.empty(host.k.shape[1:], dtype=q.dtype, device=q.device) for _ in "kv"]
        self.o_run = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        self.lse_run = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        self.out = torch.empty_like(q)
        self.variant = variant
        self.copy_stream = torch.cuda.Stream() if pinned else None
        self.copied = [torch.cuda.Event() for _ in range(2)] if pinned else None
        self.consumed = [torch.cuda.Event() for _ in range(2)] if pinned else None
        # trace: the step's start, each chunk's copy end, attention start and end (GPU clock)
        self.trace = [torch.cuda.Event(enable_timing=True) for _ in range(1 + 3 * host.k.shape[0])] \
            if pinned else None
        self.traced = False

    def _attend(self, i, buffer):
        q, host = self.q, self.host
        kv_heads, head_dim = host.k.shape[3:]
        k, v, *scales = buffer
        quant = "fp8" if self.fused else "none"
        if host.fmt == "fp8" and not self.fused:
            for dst, values, scale in zip(self.dequantized, (k, v), scales):
                torch.mul(values.float(), scale[..., None], out=dst)
            (k, v), scales = self.dequantized, []
        ks, vs = scales if scales else (k, v)
        group = q.shape[1] // kv_heads
        _attend_merge[(q.shape[0], kv_heads)](
            q, k, v, ks, vs, self.o_run, self.lse_run, self.out, _chunk_len(host, i),
            math.log2(math.e) / math.sqrt(head_dim), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2) if ks.dim() > 2 else 0, self.out.stride(0), self.out.stride(1),
            q.shape[1], GROUP=group, QUANT=quant, HEAD_DIM=head_dim,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N,
            LAST=i == host.k.shape[0] - 1, num_warps=NUM_WARPS)

    def __call__(self, copy=True, compute=True, trace=False):
        if trace and not (copy and compute and self.trace):
            raise ValueError("trace needs the optimized variant on a GPU, streaming and attending")
        self.traced = trace
        self.lse_run.fill_(float("-inf"))
        self.o_run.zero_()
        chunks = self.host.k.shape[0]
        if trace:
            self.trace[0].record()
            self.copy_stream.wait_event(self.trace[0])  # every traced copy comes after the start
        if self.variant == "baseline":
            for i in range(chunks):
                if copy:
                    for dst, src in zip(self.buffers[0], self.host.tensors()):
                        dst.copy_(src[i])  # pageable host memory: synchronous
                if compute:
                    self._attend(i, self.buffers[0])
            return self.out
        if copy:
            if self.copied is not None:
                self.copied[0].synchronize()  # the last call's copy out of staging 0 is done
            self._fill(0)
        for i in range(chunks):
            s = i % 2
            if copy:
                self._copy_in(i, s)
            if compute:
                self._compute(i, s)
            if copy and i + 1 < chunks:
                if self.copied is not None:
                    self.copied[(i + 1) % 2].synchronize()  # chunk i-1's copy out of that staging is done
                self._fill(i + 1)  # the CPU fills chunk i+1 while chunk i is copied and attended
        if self.copy_stream is not None:
            torch.cuda.current_stream().wait_stream(self.copy_stream)
        return self.out

    def _fill(self, i):
        """Chunk i from the host KV (the page file) into staging buffer i % 2, by the CPU."""
        for staged, whole in zip(self.staging[i % 2], self.host.tensors()):
            staged.copy_(whole[i])

    def _copy_in(self, i, s):
        if self.copy_stream is None:
            for dst, src in zip(self.buffers[s], self.staging[s]):
                dst.copy_(src)
            return
        self.copy_stream.wait_event(self.consumed[s])  # chunk i-2's attention is done with buffer s
        with torch.cuda.stream(self.copy_stream):
            for dst, src in zip(self.buffers[s], self.staging[s]):
                dst.copy_(src, non_blocking=True)
            self.copied[s].record()
            if self.traced:
                self.trace[1 + 3 * i].record()

    def _compute(self, i, s):
        if self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied[s])
        if self.traced:
            self.trace[2 + 3 * i].record()
        self._attend(i, self.buffers[s])
        if self.traced:
            self.trace[3 + 3 * i].record()
        if self.consumed is not None:
            self.consumed[s].record()

    def hidden_attention(self):
        """From the last traced call: the share of attention hidden under streaming, over every
        chunk but the last (whose attention nothing can hide). Chunk i's attention is exposed
        from when chunk i+1 is on the GPU (its copy done) until it ends: only then does the step
        wait for it. Synchronizes."""
        if not self.traced:
            raise RuntimeError("hidden_attention() needs a call with trace=True first")
        if self.host.k.shape[0] < 2:
            raise ValueError("hidden_attention() needs at least two chunks: a last chunk's attention is never hidden")
        self.trace[-1].synchronize()
        t = [self.trace[0].elapsed_time(e) for e in self.trace[1:]]  # ms since the step's start
        return hidden_share(copied=t[0::3], start=t[1::3], end=t[2::3])


def hidden_share(copied, start, end):
    """Per chunk i: its copy's end, its attention's start and end (one clock). The share of the
    attention of chunks 0..n-2 that ran before chunk i+1 was on the GPU (hidden_attention)."""
    hideable = range(len(end) - 1)
    attend = sum(end[i] - start[i] for i in hideable)
    exposed = sum(min(end[i] - start[i], max(0.0, end[i] - copied[i + 1])) for i in hideable)
    return 1.0 - exposed / attend
