// Prototype variant (nineteenth session): cluster_mlp_fwd.cu with the cluster size CL a
// compile-time choice (-DCL=4 or 8; default 4), so that a head's hidden units are split over 4 CTAs
// (64 units each) where an H100 fits only 15 clusters of 8 one-CTA-per-SM programs at once (16
// heads at batch 1 then run in two waves). Same rule, outputs and flags as cluster_mlp_fwd.cu.
// Differences, forced by shared memory at 64 units per CTA: the momentum S stays in registers
// (in the update dots' accumulator layout) but W1, W2 live in shared memory only (their update
// reads and rewrites them there), and there are no transposed copies of W2 and Ak (those dots
// read the strided operand 4 bytes at a time). Update dots run in passes of 32 output columns.
// SMEM_BYTES: see smem_bytes() in bench_cluster_fwd.py (198656 at CL = 4)
#ifndef CL
#define CL 4
#endif
#define D_ 128
#define F_ 256
#define C_ 64
#define LDR 132  // row stride of 128-wide tiles (floats): +4 keeps the fragment loads' banks apart
#define LDT 80   // row stride of 64-wide (token) tiles, likewise

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


#define BF_ (F_ / CL)         // hidden units per CTA
#define OWN (C_ / CL)         // rows of the chunk each CTA sums (reduce-scatter owner)
#define LDW (BF_ + 4)         // row stride of BF-wide tiles (W2, Ak)
#define PASSES (BF_ / 32)     // update dots: passes of 32 output columns
#define LDT 80

extern "C" __global__ void __cluster_dims__(CL, 1, 1) __launch_bounds__(256, 1)
cluster_mlp_fwd(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ pk,
                float* __restrict__ w1, float* __restrict__ w2, float* __restrict__ s1, float* __restrict__ s2,
                const float* __restrict__ akeep, const float* __restrict__ amom, const float* __restrict__ skeep,
                const float* __restrict__ wa_g, const float* __restrict__ ws_g, int T, int N, int NS, int flags) {
  extern __shared__ __align__(128) float sm[];
  float* W1 = sm;                   // [BF][LDR]  (hidden unit, d)
  float* W2 = W1 + BF_ * LDR;       // [128][LDW] (d, hidden unit)
  float* Kb = W2 + 128 * LDW;       // [64][LDR]  the chunk's keys
  float* Ak = Kb + 64 * LDR;        // [64][LDW]  gelu(Hk)
  float* DT = Ak + 64 * LDW;        // [BF][LDT]  D^T
  float* Eg = DT + BF_ * LDT;       // [64][LDR]  this CTA's share of P, then E (gathered)
  float* slots = Eg + 64 * LDR;     // [CL - 1 senders][OWN rows][128]
  __shared__ __align__(16) float wa[C_], ws[C_];
  __shared__ __align__(8) unsigned long long bars[2];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const int bh = blockIdx.x / CL, f0 = rank * BF_;
  const bool exchange = !(flags & 1), store_state = !(flags & 2), update_dots = !(flags & 4), start_dots = !(flags & 8);
  const unsigned bar_rs = smem(&bars[0]), bar_ag = smem(&bars[1]);
  if (tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_rs));
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar_ag));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // update tiles: W1/S1 (units x d): warp -> units u1..u1+15, d d1 + 32 pass + [0, 32);
  // W2/S2 (d x units): d d2..d2+15, units 32 pass + [0, 32). S in registers there, [pass][j][2h + e].
  constexpr int WPM = 8 / (BF_ / 16);  // warps per 16 units
  const int u1 = (warp / WPM) * 16, d1 = (warp % WPM) * (128 / WPM), d2 = warp * 16;
  float S1r[PASSES][4][4], S2r[PASSES][4][4];
  const size_t fd = (size_t)F_ * D_;
  const size_t first = (size_t)bh * NS * fd;
  for (int i = tid; i < BF_ * D_; i += 256) {
    const int u = i / D_, d = i % D_;
    W1[u * LDR + d] = w1[first + (size_t)(f0 + u) * D_ + d];
    const int dd = i / BF_, f = i % BF_;
    W2[dd * LDW + f] = w2[first + (size_t)dd * F_ + f0 + f];
  }
#pragma unroll
  for (int p = 0; p < PASSES; ++p)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int u = u1 + g + 8 * h, d = d1 + 32 * p + 8 * j + 2 * t4;
        const float2 s = *reinterpret_cast<const float2*>(&s1[first + (size_t)(f0 + u) * D_ + d]);
        S1r[p][j][2 * h] = s.x; S1r[p][j][2 * h + 1] = s.y;
        const int dd = d2 + g + 8 * h, f = 32 * p + 8 * j + 2 * t4;
        const float2 s_ = *reinterpret_cast<const float2*>(&s2[first + (size_t)dd * F_ + f0 + f]);
        S2r[p][j][2 * h] = s_.x; S2r[p][j][2 * h + 1] = s_.y;
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
  cluster_sync();

  constexpr int OQ = OWN / 8;  // owned float4s per thread
  const int ocol = (tid & 31) * 4;
  auto v_rows = [&](int c, int q) {
    return *reinterpret_cast<const float4*>(vh + (size_t)(c * C_ + rank * OWN + (tid >> 5) + 8 * q) * D_ + ocol);
  };
  auto coef = [&](const float* p, int c) { return p[(size_t)bh * N + c]; };
  float wa_next = tid < C_ ? wa_g[(size_t)bh * N * C_ + tid] : 0.f, ws_next = tid < C_ ? ws_g[(size_t)bh * N * C_ + tid] : 0.f;
  float ak_next = coef(akeep, 0), am_next = coef(amom, 0), sk_next = coef(skeep, 0);
  float4 v_next[OQ];
#pragma unroll
  for (int q = 0; q < OQ; ++q) v_next[q] = v_rows(0, q);
  for (int c = 0; c < N; ++c) {
    const unsigned parity = c & 1;
    if (tid < C_) {
      wa[tid] = -wa_next;
      ws[tid] = -ws_next;
    }
    const float a_keep = ak_next, a_mom = am_next, s_keep = sk_next;
    float4 vv[OQ];
#pragma unroll
    for (int q = 0; q < OQ; ++q) vv[q] = v_next[q];
    if (c + 1 < N) {
      if (tid < C_) {
        wa_next = wa_g[((size_t)bh * N + c + 1) * C_ + tid];
        ws_next = ws_g[((size_t)bh * N + c + 1) * C_ + tid];
      }
      ak_next = coef(akeep, c + 1); am_next = coef(amom, c + 1); sk_next = coef(skeep, c + 1);
#pragma unroll
      for (int q = 0; q < OQ; ++q) v_next[q] = v_rows(c + 1, q);
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    // Hk = K W1^T (64 x BF): warp -> rows 16 (warp / 2), units BF / 2 (warp % 2)
    constexpr int NT1 = BF_ / 16;
    const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * (BF_ / 2);
    float gp[NT1][4];
    {
      float acc[NT1][4] = {};
      if (start_dots) gemm<8, NT1, LDR, 1, 1, LDR>(acc, Kb, W1, m0, n0);
#pragma unroll
      for (int j = 0; j < NT1; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          Ak[row * LDW + col] = gelu(acc[j][e]);
          gp[j][e] = gelu_grad(acc[j][e]);
        }
    }
    __syncthreads();
    // this CTA's share of P = Ak W2^T (64 x 128): warp -> rows 16 (warp / 2), d 64 (warp % 2)
    {
      float acc[8][4] = {};
      const int n0p = (warp & 1) * 64;
      if (start_dots) gemm<BF_ / 16, 8, LDW, 1, 1, LDW>(acc, Ak, W2, m0, n0p);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = n0p + 8 * j + 2 * t4;
        *reinterpret_cast<float2*>(&Eg[(m0 + g) * LDR + col]) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(&Eg[(m0 + g + 8) * LDR + col]) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    // reduce-scatter (CTA r owns rows OWN r ..): sender s lands in slot s - (s > r) of r
    if (exchange) {
      if (tid == 0) expect_bytes(bar_rs, (CL - 1) * OWN * 512);
      if (tid < (CL - 1) * OWN) {
        const unsigned pi = tid / OWN, r = pi + (pi >= rank), row = tid % OWN;
        const unsigned slot = rank - (rank > r);
        bulk_copy(remote(&slots[(slot * OWN + row) * 128], r), &Eg[(r * OWN + row) * LDR], 512, remote(&bars[0], r));
      }
    }
    float4 p[OQ];
#pragma unroll
    for (int q = 0; q < OQ; ++q) p[q] = *reinterpret_cast<const float4*>(&Eg[(rank * OWN + (tid >> 5) + 8 * q) * LDR + ocol]);
    if (exchange) {
      wait_phase(bar_rs, parity);
#pragma unroll
      for (int s = 0; s < CL - 1; ++s)
#pragma unroll
        for (int q = 0; q < OQ; ++q) {
          const float4 x = *reinterpret_cast<const float4*>(&slots[(s * OWN + (tid >> 5) + 8 * q) * 128 + ocol]);
          p[q].x += x.x; p[q].y += x.y; p[q].z += x.z; p[q].w += x.w;
        }
    }
#pragma unroll
    for (int q = 0; q < OQ; ++q) {
      const int row = rank * OWN + (tid >> 5) + 8 * q;
      *reinterpret_cast<float4*>(pkh + (size_t)(c * C_ + row) * D_ + ocol) = p[q];
      *reinterpret_cast<float4*>(&Eg[row * LDR + ocol]) =
          make_float4(p[q].x - vv[q].x, p[q].y - vv[q].y, p[q].z - vv[q].z, p[q].w - vv[q].w);
    }
    if (exchange) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      __syncthreads();
      if (tid == 0) expect_bytes(bar_ag, (CL - 1) * OWN * 512);
      if (tid < (CL - 1) * OWN) {
        const unsigned pi = tid / OWN, r = pi + (pi >= rank), row = tid % OWN;
        bulk_copy(remote(&Eg[(rank * OWN + row) * LDR], r), &Eg[(rank * OWN + row) * LDR], 512, remote(&bars[1], r));
      }
      wait_phase(bar_ag, parity);
    }
    __syncthreads();
    // D = (E W2) o gelu'(Hk) (64 x BF), stored transposed; W2 read 4 bytes at a time
    {
      float acc[NT1][4] = {};
      if (start_dots) gemm<8, NT1, LDR, 1, LDW, 1>(acc, Eg, W2, m0, n0);
#pragma unroll
      for (int j = 0; j < NT1; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          DT[col * LDT + row] = acc[j][e] * gp[j][e];
        }
    }
    __syncthreads();
    const size_t next = ((size_t)bh * NS + c + 1) * fd;
    // W1, S1 += D^T diag(-w) K, in passes of 32 d
#pragma unroll
    for (int ps_ = 0; ps_ < PASSES; ++ps_) {
      float pa[4][4] = {}, ps[4][4] = {};
      const int dp = d1 + 32 * ps_;
      if (update_dots) gemm2<4, 4, LDT, 1, LDR, 1>(pa, ps, DT, Kb, wa, ws, u1, dp);
      if (ps_ == PASSES - 1) {
        __syncthreads();  // every warp is done with K: fetch the next chunk's
        if (c + 1 < N) load_keys(c + 1);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int u = u1 + g + 8 * h, d = dp + 8 * j + 2 * t4;
          float2 w = *reinterpret_cast<float2*>(&W1[u * LDR + d]);
          float* S = &S1r[ps_][j][2 * h];
          w.x = a_keep * w.x + a_mom * S[0] + pa[j][2 * h];
          w.y = a_keep * w.y + a_mom * S[1] + pa[j][2 * h + 1];
          S[0] = s_keep * S[0] + ps[j][2 * h];
          S[1] = s_keep * S[1] + ps[j][2 * h + 1];
          *reinterpret_cast<float2*>(&W1[u * LDR + d]) = w;
          if (store_state) {
            *reinterpret_cast<float2*>(&w1[next + (size_t)(f0 + u) * D_ + d]) = w;
            *reinterpret_cast<float2*>(&s1[next + (size_t)(f0 + u) * D_ + d]) = make_float2(S[0], S[1]);
          }
        }
    }
    // W2, S2 += E^T diag(-w) Ak, in passes of 32 units; E and Ak read 4 bytes at a time
#pragma unroll
    for (int ps_ = 0; ps_ < PASSES; ++ps_) {
      float pa[4][4] = {}, ps[4][4] = {};
      if (update_dots) gemm2<4, 4, 1, LDR, LDW, 1>(pa, ps, Eg, Ak, wa, ws, d2, 32 * ps_);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int d = d2 + g + 8 * h, f = 32 * ps_ + 8 * j + 2 * t4;
          float2 w = *reinterpret_cast<float2*>(&W2[d * LDW + f]);
          float* S = &S2r[ps_][j][2 * h];
          w.x = a_keep * w.x + a_mom * S[0] + pa[j][2 * h];
          w.y = a_keep * w.y + a_mom * S[1] + pa[j][2 * h + 1];
          S[0] = s_keep * S[0] + ps[j][2 * h];
          S[1] = s_keep * S[1] + ps[j][2 * h + 1];
          *reinterpret_cast<float2*>(&W2[d * LDW + f]) = w;
          if (store_state) {
            *reinterpret_cast<float2*>(&w2[next + (size_t)d * F_ + f0 + f]) = w;
            *reinterpret_cast<float2*>(&s2[next + (size_t)d * F_ + f0 + f]) = make_float2(S[0], S[1]);
          }
        }
    }
    __syncthreads();
  }
  cluster_sync();
}
