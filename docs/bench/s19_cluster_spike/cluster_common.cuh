// Helpers shared by the nineteenth session's cluster kernels (cluster_allreduce2.cu,
// cluster_mlp_fwd.cu): distributed shared memory and mbarriers, TF32
// mma.sync on shared-memory operands, GELU. NVRTC finds it with -I this folder
// (bench_cluster_fwd.py and cluster_spike2.py pass it; so does ../s18_cluster_spike/compile_offline.py).
#pragma once

__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
// Two mbarriers (reduce-scatter, all-gather), each completed by one local arrival plus the bytes
// the other CTAs send; a cluster barrier must follow before anyone sends.
__device__ __forceinline__ void init_exchange_barriers(unsigned long long* bars) {
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"((unsigned)__cvta_generic_to_shared(&bars[0])));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"((unsigned)__cvta_generic_to_shared(&bars[1])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
}
// float32 bits as a TF32 operand: the MMA ignores the low 13 mantissa bits (truncation), as
// Triton's tf32 dots do. Rounding first (cvt.rna.tf32.f32) was 3.5x closer to a float64 reference
// after one chunk (2e-5 against 7e-5) but 10 % slower for the whole chain (H100).
__device__ __forceinline__ unsigned tf32(float x) { return __float_as_uint(x); }
__device__ __forceinline__ void mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ unsigned remote(const void* p, unsigned rank) {
  unsigned r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(smem(p)), "r"(rank));
  return r;
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "r"(smem(src)), "r"(bytes), "r"(bar) : "memory");
}
__device__ __forceinline__ void expect_bytes(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void wait_phase(unsigned bar, unsigned parity) {
  asm volatile("{\n\t.reg .pred p;\n\tWAIT_%=:\n\t"
               "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n\t"
               "@!p bra WAIT_%=;\n\t}" :: "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ float gelu(float h) { return 0.5f * h * (1.f + erff(h * 0.7071067811865476f)); }
__device__ __forceinline__ float gelu_grad(float h) {
  return 0.5f * (1.f + erff(h * 0.7071067811865476f)) + h * 0.3989422804014327f * __expf(-0.5f * h * h);
}

// Fragments: PTX ISA, mma m16n8k8 .tf32. The k-slots of two consecutive k-steps are mapped to
// memory so that each thread's four k's sit together: over a 16-wide k block kb, thread t's slot t
// of step s holds k = kb + 4t + 2s and slot t + 4 holds k = kb + 4t + 2s + 1 (any mapping that A
// and B share gives the same sum). Where k is an operand's contiguous index (stride 1), that is
// one 16-byte load per row instead of four 4-byte ones.
template <int STRIDE>
__device__ __forceinline__ float4 load_k4(const float* p) {
  if (STRIDE == 1) return *reinterpret_cast<const float4*>(p);
  return make_float4(p[0], p[STRIDE], p[2 * STRIDE], p[3 * STRIDE]);
}
// One warp's 16 x (8 NT) block of A (M x K) times B (K x N), A(m, k) = A[m AM + k AK],
// B(k, n) = B[k BK + n BN] (shared memory), K = 16 KPAIRS.
template <int KPAIRS, int NT, int AM, int AK, int BK, int BN>
__device__ __forceinline__ void gemm(float (&acc)[NT][4], const float* A, const float* B, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kp = 0; kp < KPAIRS; ++kp) {
    const int kb = kp * 16 + 4 * t;
    const float4 r0 = load_k4<AK>(A + (m0 + g) * AM + kb * AK), r1 = load_k4<AK>(A + (m0 + g + 8) * AM + kb * AK);
    const unsigned a0[4] = {tf32(r0.x), tf32(r1.x), tf32(r0.y), tf32(r1.y)};
    const unsigned a1[4] = {tf32(r0.z), tf32(r1.z), tf32(r0.w), tf32(r1.w)};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float4 b = load_k4<BK>(B + (n0 + 8 * j + g) * BN + kb * BK);
      mma(acc[j], a0, tf32(b.x), tf32(b.y));
      mma(acc[j], a1, tf32(b.z), tf32(b.w));
    }
  }
}
// The same with two copies of A scaled along k (by wa and by ws): both update sums share B.
template <int KPAIRS, int NT, int AM, int AK, int BK, int BN>
__device__ __forceinline__ void gemm2(float (&pa)[NT][4], float (&ps)[NT][4], const float* A, const float* B,
                                      const float* wa, const float* ws, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int kp = 0; kp < KPAIRS; ++kp) {
    const int kb = kp * 16 + 4 * t;
    const float4 r0 = load_k4<AK>(A + (m0 + g) * AM + kb * AK), r1 = load_k4<AK>(A + (m0 + g + 8) * AM + kb * AK);
    const float4 xa = load_k4<1>(wa + kb), xs = load_k4<1>(ws + kb);
    const unsigned a0[4] = {tf32(r0.x * xa.x), tf32(r1.x * xa.x), tf32(r0.y * xa.y), tf32(r1.y * xa.y)};
    const unsigned a1[4] = {tf32(r0.z * xa.z), tf32(r1.z * xa.z), tf32(r0.w * xa.w), tf32(r1.w * xa.w)};
    const unsigned s0[4] = {tf32(r0.x * xs.x), tf32(r1.x * xs.x), tf32(r0.y * xs.y), tf32(r1.y * xs.y)};
    const unsigned s1[4] = {tf32(r0.z * xs.z), tf32(r1.z * xs.z), tf32(r0.w * xs.w), tf32(r1.w * xs.w)};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const float4 b = load_k4<BK>(B + (n0 + 8 * j + g) * BN + kb * BK);
      const unsigned b0 = tf32(b.x), b1 = tf32(b.y), b2 = tf32(b.z), b3 = tf32(b.w);
      mma(pa[j], a0, b0, b1);
      mma(pa[j], a1, b2, b3);
      mma(ps[j], s0, b0, b1);
      mma(ps[j], s1, b2, b3);
    }
  }
}
