// Prototype (nineteenth session, fifth version): the depth-2 MLP memory's forward chain, no clip,
// with momentum, GELU, as ONE launch: a thread-block cluster of 8 CTAs per (batch, head), each CTA
// holding a 32-unit slice of the hidden layer for the whole sequence: W1, S1 (32 x 128) and W2, S2
// (128 x 32) in float32 registers, laid out as the update dots' accumulators, with W1, W2 and
// W2^T also in shared memory as the dots' operands. The sums over hidden units (the keys'
// prediction) go through distributed shared memory (reduce-scatter and all-gather by bulk copies,
// counted on mbarriers) instead of float32 atomics in L2 and a launch boundary. Same rule and
// outputs as the split kernels' forward chain without the clip
// (olmo_miras_plugin/memory/triton_mlp_split.py):
//
//   Hk = K W1^T;  Ak = gelu(Hk);  P = Ak W2^T (summed over the cluster);  E = P - V
//   D  = (E W2) o gelu'(Hk)
//   W1' = a_keep W1 + a_mom S1 - D^T diag(wA) K;   S1' = s_keep S1 - D^T diag(wS) K
//   W2' = a_keep W2 + a_mom S2 - E^T diag(wA) Ak;  S2' = s_keep S2 - E^T diag(wS) Ak
//
// It writes every chunk-start state (slots 1..N; slot 0 is the input), from registers in the
// update's epilogue (320 bulk copies of rows from shared memory per chunk measured slower), and P
// (the "keys' prediction" the backward reads). Dots: mma.sync m16n8k8 TF32 (operands truncated),
// float32 accumulation; gelu'(Hk) stays in registers from the Hk dot to the D dot (same tiles); Ak
// and D are also stored transposed, so that every operand whose contraction index is contiguous in
// shared memory is read 16 bytes at a time (see gemm); the keys' prediction shares E's buffer
// (safe: see the reduce-scatter). Fixed shapes: head size 128, hidden 256, chunk 64, 256 threads.
// An H100 runs at most 15 such clusters at once, so 16 heads take two waves (README.md).
// SMEM_BYTES: 191488
// flags (timing only, wrong results): bit 0 skips the cluster exchange (each CTA uses its own
// partial as P), bit 1 the state stores to global memory, bit 2 the update dots (G1, G2), bit 3
// the chunk-start dots (Hk, P, D).

#define D_ 128
#define F_ 256
#define C_ 64
#define BF_ 32
#define LDR 132  // row stride of 128-wide tiles (floats): +4 keeps the fragment loads' banks apart
#define LDS 48   // row stride of 32-wide tiles read 16 bytes at a time (48 = 16 mod 32: no bank conflicts)
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

extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256, 1)
cluster_mlp_fwd(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ pk,
                float* __restrict__ w1, float* __restrict__ w2, float* __restrict__ s1, float* __restrict__ s2,
                const float* __restrict__ akeep, const float* __restrict__ amom, const float* __restrict__ skeep,
                const float* __restrict__ wa_g, const float* __restrict__ ws_g, int T, int N, int NS, int flags) {
  extern __shared__ __align__(128) float sm[];
  float* W1 = sm;                   // [32][LDR]  (hidden unit, d): B of Hk = K W1^T
  float* W2 = W1 + 32 * LDR;        // [128][LDS] (d, hidden unit): B of P = Ak W2^T
  float* W2T = W2 + 128 * LDS;      // [32][LDR]  (hidden unit, d): B of E W2
  float* Kb = W2T + 32 * LDR;       // [64][LDR]  the chunk's keys
  float* Ak = Kb + 64 * LDR;        // [64][LDS]  gelu(Hk)
  float* AkT = Ak + 64 * LDS;       // [32][LDT]  gelu(Hk)^T: B of E^T diag(w) Ak
  float* DT = AkT + 32 * LDT;       // [32][LDT]  D^T: A of D^T diag(w) K
  float* Eg = DT + 32 * LDT;        // [64][LDR]  this CTA's share of P, then E (gathered)
  float* slots = Eg + 64 * LDR;     // [8 senders][8 rows][128]: shares of this CTA's 8 rows of P
  __shared__ __align__(16) float wa[C_], ws[C_];
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
  // The state slice in registers, where the update dots' accumulators are: W1, S1 at (hidden
  // unit u1 + g + 8h, d d1 + 8j + 2 t4 + e), W2, S2 at (d d2 + g + 8h, unit 8j + 2 t4 + e),
  // index [j][2h + e]; slot 0 of the state tensors is the initial state.
  const int u1 = (warp >> 2) * 16, d1 = (warp & 3) * 32, d2 = warp * 16;
  float W1r[4][4], S1r[4][4], W2r[4][4], S2r[4][4];
  const size_t fd = (size_t)F_ * D_;
  const size_t first = (size_t)bh * NS * fd;
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int u = u1 + g + 8 * h, d = d1 + 8 * j + 2 * t4;
      const float2 w = *reinterpret_cast<const float2*>(&w1[first + (size_t)(f0 + u) * D_ + d]);
      const float2 s = *reinterpret_cast<const float2*>(&s1[first + (size_t)(f0 + u) * D_ + d]);
      W1r[j][2 * h] = w.x; W1r[j][2 * h + 1] = w.y; S1r[j][2 * h] = s.x; S1r[j][2 * h + 1] = s.y;
      *reinterpret_cast<float2*>(&W1[u * LDR + d]) = w;
      const int dd = d2 + g + 8 * h, f = 8 * j + 2 * t4;
      const float2 w_ = *reinterpret_cast<const float2*>(&w2[first + (size_t)dd * F_ + f0 + f]);
      const float2 s_ = *reinterpret_cast<const float2*>(&s2[first + (size_t)dd * F_ + f0 + f]);
      W2r[j][2 * h] = w_.x; W2r[j][2 * h + 1] = w_.y; S2r[j][2 * h] = s_.x; S2r[j][2 * h + 1] = s_.y;
      *reinterpret_cast<float2*>(&W2[dd * LDS + f]) = w_;
      W2T[f * LDR + dd] = w_.x; W2T[(f + 1) * LDR + dd] = w_.y;
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
  cluster_sync();  // barriers initialised everywhere before any copy lands; operands stored

  // Each chunk's coefficients and owned rows of V are loaded one chunk ahead.
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
    // Hk = K W1^T (64 x 32): warp -> rows 16 (warp / 2), hidden units 16 (warp % 2); gelu'(Hk)
    // stays in registers for the D dot, which has the same tiles
    const int m0 = (warp >> 1) * 16, n0 = (warp & 1) * 16;
    float gp[2][4];
    {
      float acc[2][4] = {};
      if (start_dots) gemm<8, 2, LDR, 1, 1, LDR>(acc, Kb, W1, m0, n0);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          const float a = gelu(acc[j][e]);
          Ak[row * LDS + col] = a;
          AkT[col * LDT + row] = a;
          gp[j][e] = gelu_grad(acc[j][e]);
        }
    }
    __syncthreads();
    // this CTA's share of P = Ak W2^T (64 x 128): warp -> rows 16 (warp / 2), d 64 (warp % 2)
    {
      float acc[8][4] = {};
      const int n0p = (warp & 1) * 64;
      if (start_dots) gemm<2, 8, LDS, 1, 1, LDS>(acc, Ak, W2, m0, n0p);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int col = n0p + 8 * j + 2 * t4;
        *reinterpret_cast<float2*>(&Eg[(m0 + g) * LDR + col]) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(&Eg[(m0 + g + 8) * LDR + col]) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // bulk copies read what we stored
    __syncthreads();
    // Reduce-scatter: CTA r owns rows 8r..8r+7; each row goes as one 512-byte bulk copy. The
    // all-gather below writes CTA r's rows of E over the same rows of this buffer: only the copy
    // to r read those, and r sends E only once it has every share.
    if (exchange) {
      if (tid == 0) expect_bytes(bar_rs, 7 * 8 * 512);
      if (tid < 56) {
        const unsigned r = (tid >> 3) + ((tid >> 3) >= (int)rank), row = tid & 7;
        bulk_copy(remote(&slots[rank * 1024 + row * 128], r), &Eg[(r * 8 + row) * LDR], 512, remote(&bars[0], r));
      }
    }
    // owner: P's rows = the 8 shares; E = P - V in place
    const int tok = c * C_ + rank * 8 + orow;
    float4 p = *reinterpret_cast<const float4*>(&Eg[(rank * 8 + orow) * LDR + ocol]);
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
    }  // (timing only, without the exchange: the other rows keep this CTA's shares)
    __syncthreads();
    // D = (E W2) o gelu'(Hk) (64 x 32), stored transposed
    {
      float acc[2][4] = {};
      if (start_dots) gemm<8, 2, LDR, 1, 1, LDR>(acc, Eg, W2T, m0, n0);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = m0 + g + (e >> 1) * 8, col = n0 + 8 * j + 2 * t4 + (e & 1);
          DT[col * LDT + row] = acc[j][e] * gp[j][e];
        }
    }
    __syncthreads();
    const size_t next = ((size_t)bh * NS + c + 1) * fd;
    // W1, S1 (32 x 128) += D^T diag(-w) K: warp -> units 16 (u1), d 32 (d1)
    {
      float pa[4][4] = {}, ps[4][4] = {};
      if (update_dots) gemm2<4, 4, LDT, 1, LDR, 1>(pa, ps, DT, Kb, wa, ws, u1, d1);
      __syncthreads();  // every warp is done with K: fetch the next chunk's
      if (c + 1 < N) load_keys(c + 1);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int u = u1 + g + 8 * h, d = d1 + 8 * j + 2 * t4;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = 2 * h + e;
            W1r[j][i] = a_keep * W1r[j][i] + a_mom * S1r[j][i] + pa[j][i];
            S1r[j][i] = s_keep * S1r[j][i] + ps[j][i];
          }
          const float2 w = make_float2(W1r[j][2 * h], W1r[j][2 * h + 1]);
          *reinterpret_cast<float2*>(&W1[u * LDR + d]) = w;
          if (store_state) {
            *reinterpret_cast<float2*>(&w1[next + (size_t)(f0 + u) * D_ + d]) = w;
            *reinterpret_cast<float2*>(&s1[next + (size_t)(f0 + u) * D_ + d]) = make_float2(S1r[j][2 * h], S1r[j][2 * h + 1]);
          }
        }
    }
    // W2, S2 (128 x 32) += E^T diag(-w) Ak: warp -> d 16 (d2), all 32 units
    {
      float pa[4][4] = {}, ps[4][4] = {};
      if (update_dots) gemm2<4, 4, 1, LDR, 1, LDT>(pa, ps, Eg, AkT, wa, ws, d2, 0);
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int d = d2 + g + 8 * h, f = 8 * j + 2 * t4;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = 2 * h + e;
            W2r[j][i] = a_keep * W2r[j][i] + a_mom * S2r[j][i] + pa[j][i];
            S2r[j][i] = s_keep * S2r[j][i] + ps[j][i];
          }
          const float2 w = make_float2(W2r[j][2 * h], W2r[j][2 * h + 1]);
          *reinterpret_cast<float2*>(&W2[d * LDS + f]) = w;
          W2T[f * LDR + d] = w.x;
          W2T[(f + 1) * LDR + d] = w.y;
          if (store_state) {
            *reinterpret_cast<float2*>(&w2[next + (size_t)d * F_ + f0 + f]) = w;
            *reinterpret_cast<float2*>(&s2[next + (size_t)d * F_ + f0 + f]) = make_float2(S2r[j][2 * h], S2r[j][2 * h + 1]);
          }
        }
    }
    __syncthreads();  // Ak, D, E, the operands and wa/ws are read before the next chunk rewrites them
  }
  cluster_sync();  // no CTA leaves while a copy may still read its shared memory
}
