"""The once-per-session roofline calibration (SPEC 4): what this GPU does today, measured."""

from dataclasses import asdict, dataclass

import torch

from kernels.stream_read import TILINGS, stream_read
from suite.kv_locality import gpu_node, pinned_on_node
from suite.timing import measure

# Far beyond any L2, and long enough that launch and tail weigh little: with 1 GiB the H100's read
# roofline came out 1-2% below what decode kernels reading 4 GiB achieved (and an H200's 4.6% below).
STREAM_BYTES = 4 << 30
MATMUL_N = 8192
H2D_BYTES = 256 << 20  # host -> device: the link's peak (pinned), and the host-bound paths
ROUNDS = 20


@dataclass(frozen=True)
class Roofline:
    copy_gbps: float  # device-to-device copy, bytes read + written
    read_gbps: float  # streaming read: the fastest of kernels/stream_read.py's TILINGS
    matmul_tflops: float  # bf16 [N, N] @ [N, N] on random data
    h2d_gbps: float  # pinned host memory on the GPU's NUMA node to device
    h2d_pageable_gbps: float  # pageable host to device (the driver stages it): host-bound
    host_copy_gbps: float  # pageable host memory to pinned host memory, by the CPU as torch copies

    def as_dict(self):
        return {k: round(v, 1) for k, v in asdict(self).items()}

    def ceiling(self, kind):
        # staged_h2d: host memory streamed to the GPU through pinned staging, the CPU filling one
        # buffer while the other is copied: the slower of the two stages
        return {"read": self.read_gbps, "copy": self.copy_gbps, "matmul": self.matmul_tflops,
                "h2d": self.h2d_gbps, "h2d_pageable": self.h2d_pageable_gbps,
                "staged_h2d": min(self.h2d_gbps, self.host_copy_gbps)}[kind]


def calibrate(device) -> Roofline:
    src = torch.randn(STREAM_BYTES // 4, device=device)
    dst = torch.empty_like(src)
    copy_s = measure(lambda: dst.copy_(src), device=device, rounds=ROUNDS)
    read_s = min(measure(stream_read(src, *tiling), device=device, rounds=ROUNDS) for tiling in TILINGS)
    del src, dst
    a = torch.randn(MATMUL_N, MATMUL_N, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    mm_s = measure(lambda: a @ b, device=device, rounds=ROUNDS, cold=False)
    del a, b
    pinned = pinned_on_node((H2D_BYTES // 4,), torch.float32, gpu_node(torch.device(device).index or 0)[0])
    pageable = torch.empty(H2D_BYTES // 4).normal_()
    dst = torch.empty(H2D_BYTES // 4, device=device)
    h2d_s = measure(lambda: dst.copy_(pinned, non_blocking=True), device=device, rounds=ROUNDS, cold=False)
    # host-bound: the clock covers the host's work (the GPU waits on it)
    pageable_s = measure(lambda: dst.copy_(pageable), device=device, rounds=ROUNDS, cold=False, host_bound=True)
    host_s = measure(lambda: pinned.copy_(pageable), device=device, rounds=ROUNDS, cold=False, host_bound=True)
    return Roofline(copy_gbps=2 * STREAM_BYTES / copy_s / 1e9, read_gbps=STREAM_BYTES / read_s / 1e9,
                    matmul_tflops=2 * MATMUL_N**3 / mm_s / 1e12, h2d_gbps=H2D_BYTES / h2d_s / 1e9,
                    h2d_pageable_gbps=H2D_BYTES / pageable_s / 1e9, host_copy_gbps=H2D_BYTES / host_s / 1e9)
