// Prototype (nineteenth session): the depth-2 MLP memory's forward chain, no clip, with momentum,
// GELU, as ONE launch: a thread-block cluster of 8 CTAs per (batch, head), each CTA holding a
// 32-unit slice of the hidden layer (W1, S1: 32 x 128; W2, S2: 128 x 32, float32) in shared
// memory for the whole sequence. The sums over hidden units (the keys' prediction) go through
// distributed shared memory (reduce-scatter and all-gather by bulk copies, counted on mbarriers)
// instead of float32 atomics in L2 and a launch boundary. Same rule and outputs as the split
// kernels' forward chain without the clip (olmo_miras_plugin/memory/triton_mlp_split.py):
//
//   Hk = K W1^T;  Ak = gelu(Hk);  P = Ak W2^T (summed over the cluster);  E = P - V
//   D  = (E W2) o gelu'(Hk)
//   W1' = a_keep W1 + a_mom S1 - D^T diag(wA) K;   S1' = s_keep S1 - D^T diag(wS) K
//   W2' = a_keep W2 + a_mom S2 - E^T diag(wA) Ak;  S2' = s_keep S2 - E^T diag(wS) Ak
//
// writing every chunk-start state (slots 1..N; slot 0 is the input; stored from registers by the
// update's epilogue: 320 bulk copies of its rows from shared memory per chunk measured slower)
// and P (the "keys' prediction" the backward reads). Dots: mma.sync m16n8k8 TF32 (inputs rounded with cvt.rna),
// float32 accumulation. Fixed shapes: head size 128, hidden 256, chunk 64, 256 threads.
// flags (timing only, wrong results): bit 0 skips the cluster exchange (each CTA uses its own
// partial as P), bit 1 the state stores to global memory, bit 2 the update dots (G1, G2), bit 3
// the chunk-start dots (Hk, P, D).

#define D_ 128
#define F_ 256
#define C_ 64
#define BF_ 32
#define LDR 132  // row stride of 128-wide tiles (floats): +4 keeps the fragment loads' banks apart
#define LDS 36   // row stride of 32-wide tiles

__device__ __forceinline__ unsigned tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
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

// One warp's 16 x (8 NT) block of A (M x K) times B (K x N), A(m, k) = A[m AM + k AK],
// B(k, n) = B[k BK + n BN] (shared memory), K = 8 KSTEPS. Fragment layouts: PTX ISA, m16n8k8 .tf32.
template <int KSTEPS, int NT, int AM, int AK, int BK, int BN>
__device__ __forceinline__ void gemm(float (&acc)[NT][4], const float* A, const float* B, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    const int k0 = ks * 8;
    unsigned a[4];
    a[0] = tf32(A[(m0 + g) * AM + (k0 + t) * AK]);
    a[1] = tf32(A[(m0 + g + 8) * AM + (k0 + t) * AK]);
    a[2] = tf32(A[(m0 + g) * AM + (k0 + t + 4) * AK]);
    a[3] = tf32(A[(m0 + g + 8) * AM + (k0 + t + 4) * AK]);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = n0 + 8 * j + g;
      mma(acc[j], a, tf32(B[(k0 + t) * BK + n * BN]), tf32(B[(k0 + t + 4) * BK + n * BN]));
    }
  }
}
// The same with two copies of A scaled along k (by wa and by ws): both update sums share B.
template <int KSTEPS, int NT, int AM, int AK, int BK, int BN>
__device__ __forceinline__ void gemm2(float (&pa)[NT][4], float (&ps)[NT][4], const float* A, const float* B,
                                      const float* wa, const float* ws, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    const int k0 = ks * 8;
    const float x0 = A[(m0 + g) * AM + (k0 + t) * AK], x1 = A[(m0 + g + 8) * AM + (k0 + t) * AK];
    const float x2 = A[(m0 + g) * AM + (k0 + t + 4) * AK], x3 = A[(m0 + g + 8) * AM + (k0 + t + 4) * AK];
    const float wa0 = wa[k0 + t], wa1 = wa[k0 + t + 4], ws0 = ws[k0 + t], ws1 = ws[k0 + t + 4];
    const unsigned a[4] = {tf32(x0 * wa0), tf32(x1 * wa0), tf32(x2 * wa1), tf32(x3 * wa1)};
    const unsigned s[4] = {tf32(x0 * ws0), tf32(x1 * ws0), tf32(x2 * ws1), tf32(x3 * ws1)};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int n = n0 + 8 * j + g;
      const unsigned b0 = tf32(B[(k0 + t) * BK + n * BN]), b1 = tf32(B[(k0 + t + 4) * BK + n * BN]);
      mma(pa[j], a, b0, b1);
      mma(ps[j], s, b0, b1);
    }
  }
}

extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256, 1)
cluster_mlp_fwd(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ pk,
                float* __restrict__ w1, float* __restrict__ w2, float* __restrict__ s1, float* __restrict__ s2,
                const float* __restrict__ akeep, const float* __restrict__ amom, const float* __restrict__ skeep,
                const float* __restrict__ wa_g, const float* __restrict__ ws_g, int T, int N, int NS, int flags) {
  extern __shared__ __align__(128) float sm[];
  float* W1 = sm;                   // [32][LDR]  (hidden unit, d)
  float* S1 = W1 + 32 * LDR;        // [32][LDR]
  float* W2 = S1 + 32 * LDR;        // [128][LDS] (d, hidden unit)
  float* S2 = W2 + 128 * LDS;       // [128][LDS]
  float* Kb = S2 + 128 * LDS;       // [64][LDR]  the chunk's keys
  float* Ak = Kb + 64 * LDR;        // [64][LDS]  gelu(Hk)
  float* Gp = Ak + 64 * LDS;        // [64][LDS]  gelu'(Hk), then D
  float* part = Gp + 64 * LDS;      // [64][LDR]  this CTA's share of P
  float* slots = part + 64 * LDR;   // [8 senders][8 rows][128]: shares of this CTA's 8 rows of P
  float* Eg = slots + 8 * 1024;     // [64][LDR]  E, gathered
  __shared__ float wa[C_], ws[C_];
  __shared__ __align__(8) unsigned long long bars[2];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int bh = blockIdx.x >> 3, f0 = rank * BF_;
  const bool exchange = !(flags & 1), store_state = !(flags & 2), update_dots = !(flags & 4), start_dots = !(flags & 8);
  const unsigned bar_rs = smem(&bars[0]), bar_ag = smem(&bars[1]);
  if (tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_rs));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_ag));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // slot 0: the initial state slice
  const size_t fd = (size_t)F_ * D_;
  for (int i = tid; i < 32 * D_; i += 256) {
    const int f = i / D_, d = i % D_;
    W1[f * LDR + d] = w1[(size_t)bh * NS * fd + (size_t)(f0 + f) * D_ + d];
    S1[f * LDR + d] = s1[(size_t)bh * NS * fd + (size_t)(f0 + f) * D_ + d];
    const int d2 = i / BF_, f2 = i % BF_;
    W2[d2 * LDS + f2] = w2[(size_t)bh * NS * fd + (size_t)d2 * F_ + f0 + f2];
    S2[d2 * LDS + f2] = s2[(size_t)bh * NS * fd + (size_t)d2 * F_ + f0 + f2];
  }
  const float* kh = k + (size_t)bh * T * D_;
  const float* vh = v + (size_t)bh * T * D_;
  float* pkh = pk + (size_t)bh * T * D_;
  auto load_keys = [&](int c) {  // cp.async, 16 bytes each: 8 per thread
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int e = (tid + 256 * i) * 4, row = e / D_, col = e % D_;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem(&Kb[row * LDR + col])),
                   "l"(kh + (size_t)(c * C_ + row) * D_ + col) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
  load_keys(0);
  cluster_sync();  // barriers initialised everywhere before any copy lands

  // Each chunk's coefficients and owned rows of V are loaded one chunk ahead (their latency
  // was exposed: ~8 us per chunk for the kernel without dots, exchange or stores).
  const int orow = tid >> 5, ocol = (tid & 31) * 4;
  auto v_rows = [&](int c) { return *reinterpret_cast<const float4*>(vh + (size_t)(c * C_ + rank * 8 + orow) * D_ + ocol); };
  auto coef = [&](const float* p, int c) { return p[(size_t)bh * N + c]; };
  float wa_next = tid < C_ ? wa_g[(size_t)bh * N * C_ + tid] : 0.f, ws_next = tid < C_ ? ws_g[(size_t)bh * N * C_ + tid] : 0.f;
  float ak_next = coef(akeep, 0), am_next = coef(amom, 0), sk_next = coef(skeep, 0);
  float4 v_next = v_rows(0);
  for (int c = 0; c < N; ++c) {
    const unsigned parity = c & 1;
    if (tid < C_) {
      wa[tid] = -wa_next;
      ws[tid] = -ws_next;
    }
    const float a_keep = ak_next, a_mom = am_next, s_keep = sk_next;
    const float4 vv = v_next;
    if (c + 1 < N) {
      if (tid < C_) {
        wa_next = wa_g[((size_t)bh * N + c + 1) * C_ + tid];
        ws_next = ws_g[((size_t)bh * N + c + 1) * C_ + tid];
      }
      ak_next = coef(akeep, c + 1); am_next = coef(amom, c + 1); sk_next = coef(skeep, c + 1);
      v_next = v_rows(c + 1);
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    // Hk = K W1^T (64 x 32): warp -> rows 16 (warp / 2), hidden units 16 (warp % 2)
    {
      float acc[2][4] = {};
      const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 16;
      if (start_dots) gemm<16, 2, LDR, 1, 1, LDR>(acc, Kb, W1, m0, n0);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          Ak[row * LDS + col] = gelu(acc[j][e]);
          Gp[row * LDS + col] = gelu_grad(acc[j][e]);
        }
    }
    __syncthreads();
    // this CTA's share of P = Ak W2^T (64 x 128): warp -> rows 16 (warp / 2), d 64 (warp % 2)
    {
      float acc[8][4] = {};
      const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 64;
      if (start_dots) gemm<4, 8, LDS, 1, 1, LDS>(acc, Ak, W2, m0, n0);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = n0 + 8 * j + 2 * t4;
        *reinterpret_cast<float2*>(&part[(m0 + g) * LDR + col]) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(&part[(m0 + g + 8) * LDR + col]) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // bulk copies read what we stored
    __syncthreads();
    // reduce-scatter: CTA r owns rows 8r..8r+7; each row goes as one 512-byte bulk copy
    if (exchange) {
      if (tid == 0) expect_bytes(bar_rs, 7 * 8 * 512);
      if (tid < 56) {
        const unsigned r = (tid >> 3) + ((tid >> 3) >= (int)rank), row = tid & 7;
        bulk_copy(remote(&slots[rank * 1024 + row * 128], r), &part[(r * 8 + row) * LDR], 512, remote(&bars[0], r));
      }
    }
    // owner: P's rows = the 8 shares; E = P - V, into the gathered E
    const int tok = c * C_ + rank * 8 + orow;
    float4 p = *reinterpret_cast<const float4*>(&part[(rank * 8 + orow) * LDR + ocol]);
    if (exchange) {
      wait_phase(bar_rs, parity);
#pragma unroll
      for (unsigned r = 0; r < 8; ++r) {
        if (r == rank) continue;
        const float4 x = *reinterpret_cast<const float4*>(&slots[r * 1024 + orow * 128 + ocol]);
        p.x += x.x; p.y += x.y; p.z += x.z; p.w += x.w;
      }
    }
    *reinterpret_cast<float4*>(pkh + (size_t)tok * D_ + ocol) = p;
    *reinterpret_cast<float4*>(&Eg[(rank * 8 + orow) * LDR + ocol]) = make_float4(p.x - vv.x, p.y - vv.y, p.z - vv.z, p.w - vv.w);
    if (exchange) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncthreads();
      if (tid == 0) expect_bytes(bar_ag, 7 * 8 * 512);
      if (tid < 56) {
        const unsigned r = (tid >> 3) + ((tid >> 3) >= (int)rank), row = tid & 7;
        bulk_copy(remote(&Eg[(rank * 8 + row) * LDR], r), &Eg[(rank * 8 + row) * LDR], 512, remote(&bars[1], r));
      }
      wait_phase(bar_ag, parity);
    } else {  // timing only: every row of E from this CTA's own share
      for (int i = tid; i < 64 * 32; i += 256) {
        const int row = i / 32, col = (i % 32) * 4;
        const float4 x = *reinterpret_cast<const float4*>(&part[row * LDR + col]);
        *reinterpret_cast<float4*>(&Eg[row * LDR + col]) = x;
      }
    }
    __syncthreads();
    // D = (E W2) o gelu'(Hk) (64 x 32), in place of gelu'
    {
      float acc[2][4] = {};
      const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 16;
      if (start_dots) gemm<16, 2, LDR, 1, LDS, 1>(acc, Eg, W2, m0, n0);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          Gp[row * LDS + col] *= acc[j][e];
        }
    }
    __syncthreads();
    const size_t next = ((size_t)bh * NS + c + 1) * fd;
    // W1, S1 (32 x 128) += D^T diag(-w) K: warp -> units 16 (warp / 4), d 32 (warp % 4)
    {
      float pa[4][4] = {}, ps[4][4] = {};
      const int m0 = (warp >> 2) * 16, n0 = (warp & 3) * 32;
      if (update_dots) gemm2<8, 4, 1, LDS, LDR, 1>(pa, ps, Gp, Kb, wa, ws, m0, n0);
      __syncthreads();  // every warp is done with K: fetch the next chunk's
      if (c + 1 < N) load_keys(c + 1);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int f = m0 + g + 8 * h, d = n0 + 8 * j + 2 * t4;
          float2 w = *reinterpret_cast<float2*>(&W1[f * LDR + d]), s = *reinterpret_cast<float2*>(&S1[f * LDR + d]);
          w.x = a_keep * w.x + a_mom * s.x + pa[j][2 * h];
          w.y = a_keep * w.y + a_mom * s.y + pa[j][2 * h + 1];
          s.x = s_keep * s.x + ps[j][2 * h];
          s.y = s_keep * s.y + ps[j][2 * h + 1];
          *reinterpret_cast<float2*>(&W1[f * LDR + d]) = w;
          *reinterpret_cast<float2*>(&S1[f * LDR + d]) = s;
          if (store_state) {
            *reinterpret_cast<float2*>(&w1[next + (size_t)(f0 + f) * D_ + d]) = w;
            *reinterpret_cast<float2*>(&s1[next + (size_t)(f0 + f) * D_ + d]) = s;
          }
        }
    }
    // W2, S2 (128 x 32) += E^T diag(-w) Ak: warp -> d 16 (warp), all 32 units
    {
      float pa[4][4] = {}, ps[4][4] = {};
      const int m0 = warp * 16;
      if (update_dots) gemm2<8, 4, 1, LDR, LDS, 1>(pa, ps, Eg, Ak, wa, ws, m0, 0);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int d = m0 + g + 8 * h, f = 8 * j + 2 * t4;
          float2 w = *reinterpret_cast<float2*>(&W2[d * LDS + f]), s = *reinterpret_cast<float2*>(&S2[d * LDS + f]);
          w.x = a_keep * w.x + a_mom * s.x + pa[j][2 * h];
          w.y = a_keep * w.y + a_mom * s.y + pa[j][2 * h + 1];
          s.x = s_keep * s.x + ps[j][2 * h];
          s.y = s_keep * s.y + ps[j][2 * h + 1];
          *reinterpret_cast<float2*>(&W2[d * LDS + f]) = w;
          *reinterpret_cast<float2*>(&S2[d * LDS + f]) = s;
          if (store_state) {
            *reinterpret_cast<float2*>(&w2[next + (size_t)d * F_ + f0 + f]) = w;
            *reinterpret_cast<float2*>(&s2[next + (size_t)d * F_ + f0 + f]) = s;
          }
        }
    }
    __syncthreads();  // Ak, D, E and wa/ws are read before the next chunk rewrites them
  }
  cluster_sync();  // no CTA leaves while a copy may still read its shared memory
}
