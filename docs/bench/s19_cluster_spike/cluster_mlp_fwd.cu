// Prototype (nineteenth session): the depth-2 MLP memory's forward chain, no clip, with momentum,
// GELU, as ONE launch: a thread-block cluster of CL CTAs per (batch, head) (-DCL=8, the default,
// or 4), each CTA holding F / CL hidden units for the whole sequence: W1 (units x 128) and W2
// (128 x units) in shared memory, the momentum S1, S2 in float32 registers laid out as the update
// dots' accumulators. The sums over hidden units (the keys' prediction) go through distributed
// shared memory (reduce-scatter and all-gather by bulk copies, counted on mbarriers) instead of
// float32 atomics in L2 and a launch boundary. Same rule and outputs as the split kernels'
// forward chain without the clip (olmo_miras_plugin/memory/triton_mlp_split.py):
//
//   Hk = K W1^T;  Ak = gelu(Hk);  P = Ak W2^T (summed over the cluster);  E = P - V
//   D  = (E W2) o gelu'(Hk)
//   W1' = a_keep W1 + a_mom S1 - D^T diag(wA) K;   S1' = s_keep S1 - D^T diag(wS) K
//   W2' = a_keep W2 + a_mom S2 - E^T diag(wA) Ak;  S2' = s_keep S2 - E^T diag(wS) Ak
//
// It writes every chunk-start state (slots 1..N; slot 0 is the input) from registers in the
// update's epilogue, and P (the "keys' prediction" the backward reads). Dots: mma.sync m16n8k8
// TF32 (operands truncated), float32 accumulation; gelu'(Hk) stays in registers from the Hk dot
// to the D dot (same tiles); D is stored transposed, so that it is read 16 bytes at a time like
// every operand whose contraction index is contiguous in shared memory (see gemm); the keys'
// prediction shares E's buffer (safe: see the reduce-scatter). Update dots run in passes of 32
// output columns. Fixed shapes: head size 128, hidden 256, chunk 64, 256 threads.
// An H100 runs at most 15 clusters of 8 such CTAs at once, so at CL = 8 16 heads take two waves;
// at CL = 4 they fit, with twice the dots per CTA (README.md).
// The fifth version (git show 17c3096:docs/bench/s19_cluster_spike/cluster_mlp_fwd.cu), CL = 8
// only, also kept W1, W2 in registers and transposed copies of W2 and Ak in shared memory: 1-5 %
// faster (8k, 15 heads: 1.48 against 1.50 ms in one call, 1.41 against 1.49 in another).
// SMEM_BYTES: see smem_bytes() in bench_cluster_fwd.py (151040 at CL = 8, 198656 at CL = 4)
// flags (timing only, wrong results): bit 0 skips the cluster exchange (each CTA uses its own
// partial as P), bit 1 the state stores to global memory, bit 2 the update dots (G1, G2), bit 3
// the chunk-start dots (Hk, P, D).
#ifndef CL
#define CL 8
#endif
#define D_ 128
#define F_ 256
#define C_ 64
#define LDR 132  // row stride of 128-wide tiles (floats): +4 keeps the fragment loads' banks apart
#define LDT 80   // row stride of 64-wide (token) tiles, read 16 bytes at a time (80 = 16 mod 32)
#define BF_ (F_ / CL)         // hidden units per CTA
#define OWN (C_ / CL)         // rows of the chunk each CTA sums (reduce-scatter owner)
#define LDW (BF_ + 4)         // row stride of BF-wide tiles (W2, Ak)
#define PASSES (BF_ / 32)     // update dots: passes of 32 output columns

#include "cluster_common.cuh"

// One thread's pair of adjacent state entries through a chunk's update: W (shared memory, at w)
// and S (registers) from the update sums pa, ps, then both to their slot in global memory.
__device__ __forceinline__ void update_pair(float* w, float* S, const float* pa, const float* ps, float a_keep,
                                            float a_mom, float s_keep, float* w_out, float* s_out, bool store) {
  float2 x = *reinterpret_cast<float2*>(w);
  x.x = a_keep * x.x + a_mom * S[0] + pa[0];
  x.y = a_keep * x.y + a_mom * S[1] + pa[1];
  S[0] = s_keep * S[0] + ps[0];
  S[1] = s_keep * S[1] + ps[1];
  *reinterpret_cast<float2*>(w) = x;
  if (store) {
    *reinterpret_cast<float2*>(w_out) = x;
    *reinterpret_cast<float2*>(s_out) = make_float2(S[0], S[1]);
  }
}

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
  const unsigned rank = cluster_rank();
  const int bh = blockIdx.x / CL, f0 = rank * BF_;
  const bool exchange = !(flags & 1), store_state = !(flags & 2), update_dots = !(flags & 4), start_dots = !(flags & 8);
  const unsigned bar_rs = smem(&bars[0]), bar_ag = smem(&bars[1]);
  init_exchange_barriers(bars);
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
          const size_t out = next + (size_t)(f0 + u) * D_ + d;
          update_pair(&W1[u * LDR + d], &S1r[ps_][j][2 * h], &pa[j][2 * h], &ps[j][2 * h], a_keep, a_mom, s_keep,
                      &w1[out], &s1[out], store_state);
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
          const size_t out = next + (size_t)d * F_ + f0 + f;
          update_pair(&W2[d * LDW + f], &S2r[ps_][j][2 * h], &pa[j][2 * h], &ps[j][2 * h], a_keep, a_mom, s_keep,
                      &w2[out], &s2[out], store_state);
        }
    }
    __syncthreads();
  }
  cluster_sync();
}
