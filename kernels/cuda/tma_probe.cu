// requires_tma's probe (SPEC 3): one tile of a 2-D tensor in through cp.async.bulk.tensor with
// mbarrier completion, and out again through a tensor-map store. The host checks the copy.
#include "common.cuh"

// src, dst: 2-D tensor maps of one box each way; grid: one CTA per box row; block: 32 threads.
extern "C" __global__ void tma_probe(const __grid_constant__ TensorMap src, const __grid_constant__ TensorMap dst,
                                     int box_rows, int box_bytes) {
    extern __shared__ __align__(1024) u8 smem[];
    __shared__ u64 full;
    if (threadIdx.x != 0) return;
    mbarrier_init(&full, 1);
    fence_barrier_init();
    int row = blockIdx.x * box_rows;
    mbarrier_expect_tx(&full, box_bytes);
    tma_load_2d(smem, &src, 0, row, &full);
    mbarrier_wait(&full, 0);
    tma_store_2d(&dst, 0, row, smem);
    bulk_commit();
    bulk_wait_all();
}
