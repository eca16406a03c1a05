// stream_priority's probe of CTA fit: one CTA holding `smem` bytes of dynamic shared memory (chosen
// by the launcher, e.g. as much as a cuBLAS GEMV CTA) adds 1 to each of n floats through it.
extern "C" __global__ void smem_probe(float* x, int n) {
    extern __shared__ float stage[];
    for (int i = threadIdx.x; i < n; i += blockDim.x) stage[i] = x[i] + 1.0f;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = stage[i];
}
