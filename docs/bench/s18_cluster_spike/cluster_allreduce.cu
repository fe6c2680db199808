// Per-chunk sum of a (64 x 128) float32 tile over the 8 CTAs of a cluster (one cluster per head),
// through distributed shared memory: reduce-scatter (each CTA sums its 8 rows from all 8 CTAs),
// then all-gather (each CTA reads every CTA's summed rows). What the split kernels do today with
// float32 atomics in L2 and a launch boundary.
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256)
cluster_allreduce(float* out, int chunks, int mode) {  // mode 1: the barriers and writes only
  __shared__ float part[64 * 128];  // this CTA's partial, 32 KB
  __shared__ float slice[8 * 128];  // this CTA's rows of the sum
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) {
    for (int i = threadIdx.x; i < 64 * 128; i += 256) part[i] = (float)((i + c + rank) & 7);
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    for (int i = threadIdx.x; i < 8 * 128 && mode == 0; i += 256) {
      unsigned local = (unsigned)__cvta_generic_to_shared(&part[rank * 1024 + i]);
      float s = 0.f;
#pragma unroll
      for (unsigned r = 0; r < 8; ++r) {
        unsigned remote;
        float v;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(r));
        asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
        s += v;
      }
      slice[i] = s;
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
    for (int i = threadIdx.x; i < 64 * 128 && mode == 0; i += 256) {  // all-gather: row block i / 1024 lives in CTA i / 1024
      unsigned local = (unsigned)__cvta_generic_to_shared(&slice[i % 1024]);
      unsigned remote;
      float v;
      asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(i / 1024));
      asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
      acc += v;
    }
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
  }
  out[blockIdx.x * 256 + threadIdx.x] = acc;
}
