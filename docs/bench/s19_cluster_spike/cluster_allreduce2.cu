// Second cut of the eighteenth session's spike: the same per-chunk sum of a (64 x 128) float32
// tile over a cluster's 8 CTAs, with the distributed-shared-memory reads as 16-byte loads issued
// back to back (the first cut read 4 bytes at a time and its all-gather waited for each load),
// and the cluster barrier with release/acquire or relaxed semantics.
//   mode 0: reduce-scatter + all-gather, 16-byte loads, release/acquire barriers
//   mode 1: the same with relaxed barriers and one cluster-scope fence before each arrive
//   mode 2: the writes and the three release/acquire barriers only
//   mode 3: three release/acquire barriers only
//   mode 4: three relaxed barriers only, no fence
#include "cluster_common.cuh"

#define BAR_RA() cluster_sync()
#define BAR_RX() asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory")
#define FENCE() asm volatile("fence.acq_rel.cluster;" ::: "memory")

__device__ __forceinline__ float4 ld_remote4(unsigned addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
  return v;
}

extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256)
cluster_allreduce2(float* out, int chunks, int mode) {
  __shared__ __align__(16) float part[64 * 128];  // this CTA's partial, 32 KB
  __shared__ __align__(16) float slice[8 * 128];  // this CTA's rows of the sum
  const unsigned rank = cluster_rank();
  const bool relaxed = mode == 1 || mode == 4;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) {
    if (mode <= 2)
      for (int i = threadIdx.x; i < 64 * 128; i += 256) part[i] = (float)((i + c + rank) & 7);
    if (relaxed) { if (mode == 1) FENCE(); BAR_RX(); } else BAR_RA();
    if (mode <= 1) {  // reduce-scatter: thread t sums float4 t of this CTA's 8 rows over the 8 CTAs
      float4 v[8];
#pragma unroll
      for (unsigned r = 0; r < 8; ++r) v[r] = ld_remote4(remote(&part[rank * 1024 + threadIdx.x * 4], r));
      float4 s = v[0];
#pragma unroll
      for (int r = 1; r < 8; ++r) { s.x += v[r].x; s.y += v[r].y; s.z += v[r].z; s.w += v[r].w; }
      reinterpret_cast<float4*>(slice)[threadIdx.x] = s;
    }
    if (relaxed) { if (mode == 1) FENCE(); BAR_RX(); } else BAR_RA();
    if (mode <= 1) {  // all-gather: float4 t of CTA r's rows, for each r
      float4 v[8];
#pragma unroll
      for (unsigned r = 0; r < 8; ++r) v[r] = ld_remote4(remote(&slice[threadIdx.x * 4], r));
#pragma unroll
      for (int r = 0; r < 8; ++r) acc += v[r].x + v[r].y + v[r].z + v[r].w;
    }
    if (relaxed) { if (mode == 1) FENCE(); BAR_RX(); } else BAR_RA();
  }
  out[blockIdx.x * 256 + threadIdx.x] = acc;
}

// The test data: element i of CTA rank's share in chunk c (float4 from i), and the sum of a float4
// over this CTA's 8 slots.
__device__ __forceinline__ float4 test_share(int i, int c, unsigned rank) {
  return make_float4((float)((i + c + rank) & 7), (float)((i + 1 + c + rank) & 7),
                     (float)((i + 2 + c + rank) & 7), (float)((i + 3 + c + rank) & 7));
}
__device__ __forceinline__ float4 sum_slots(const float* slots, unsigned t) {
  float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    const float4 v = reinterpret_cast<const float4*>(slots)[r * 256 + t];
    s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
  }
  return s;
}

// Push model: each CTA sends its partial's row blocks straight into their owners' shared memory
// with st.async (16 bytes a thread, completion counted in bytes on the owner's mbarrier), the
// owner sums the 8 slots and sends its summed rows to every CTA the same way. No cluster barrier
// per chunk: the data dependencies keep the CTAs in step (a CTA cannot send chunk c + 1's partial
// before it has every CTA's sum of chunk c, which each sends only after reading its slots). A
// reduce-scatter alone, without the all-gather, would lose that: a fast CTA's bytes for chunk
// c + 1 could land in an owner's chunk-c phase and hang it (the first run of this spike did).
__device__ __forceinline__ void st_async4(unsigned addr, float4 v, unsigned bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];"
               :: "r"(addr), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar) : "memory");
}

extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256)
cluster_allreduce_push(float* out, int chunks) {
  extern __shared__ __align__(16) float dyn[];  // 64 KB, dynamic (over the 48 KB static limit)
  float* slots = dyn;            // 8 senders' partials of this CTA's 8 rows
  float* gather = dyn + 8 * 1024;  // the 8 owners' summed rows
  __shared__ __align__(8) unsigned long long bars[2];
  const unsigned rank = cluster_rank();
  const unsigned bar_rs = (unsigned)__cvta_generic_to_shared(&bars[0]);
  const unsigned bar_ag = (unsigned)__cvta_generic_to_shared(&bars[1]);
  init_exchange_barriers(bars);
  BAR_RA();  // once: every CTA's barriers initialised before anyone sends
  const unsigned t = threadIdx.x;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) {
    const unsigned parity = c & 1;
    if (t == 0) expect_bytes(bar_rs, 7 * 4096);
#pragma unroll
    for (unsigned r = 0; r < 8; ++r) {  // my partial of owner r's rows: float4 t of them
      const float4 v = test_share(r * 1024 + t * 4, c, rank);
      if (r == rank) reinterpret_cast<float4*>(slots)[rank * 256 + t] = v;
      else st_async4(remote(&slots[rank * 1024 + t * 4], r), v, remote(&bars[0], r));
    }
    __syncthreads();  // own slot written
    wait_phase(bar_rs, parity);
    const float4 s = sum_slots(slots, t);
    if (t == 0) expect_bytes(bar_ag, 7 * 4096);
#pragma unroll
    for (unsigned r = 0; r < 8; ++r) {
      if (r == rank) reinterpret_cast<float4*>(gather)[rank * 256 + t] = s;
      else st_async4(remote(&gather[rank * 1024 + t * 4], r), s, remote(&bars[1], r));
    }
    __syncthreads();
    wait_phase(bar_ag, parity);
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      float4 v = reinterpret_cast<float4*>(gather)[r * 256 + t];
      acc += v.x + v.y + v.z + v.w;
    }
    __syncthreads();  // gather read before the next chunk's sums may land
  }
  BAR_RA();  // no CTA exits while another may still send to it
  out[blockIdx.x * 256 + threadIdx.x] = acc;
}

// The push model with bulk copies: the partial is stored to this CTA's shared memory, and one
// thread sends each owner its 4 KB row block with one cp.async.bulk (shared::cta → shared::cluster,
// completion counted on the owner's mbarrier); the all-gather likewise. Same lockstep argument as
// above, which also keeps a source block from being rewritten before its copies have read it.
extern "C" __global__ void __cluster_dims__(8, 1, 1) __launch_bounds__(256)
cluster_allreduce_bulk(float* out, int chunks) {
  extern __shared__ __align__(128) float dyn[];  // 100 KB, dynamic
  float* slots = dyn;               // 8 senders' partials of this CTA's 8 rows
  float* gather = dyn + 8 * 1024;   // the 8 owners' summed rows
  float* part = dyn + 16 * 1024;    // this CTA's partial of all 64 rows
  float* mine = dyn + 24 * 1024;    // this CTA's summed rows
  __shared__ __align__(8) unsigned long long bars[2];
  const unsigned rank = cluster_rank();
  const unsigned bar_rs = (unsigned)__cvta_generic_to_shared(&bars[0]);
  const unsigned bar_ag = (unsigned)__cvta_generic_to_shared(&bars[1]);
  init_exchange_barriers(bars);
  BAR_RA();
  const unsigned t = threadIdx.x;
  float acc = 0.f;
  for (int c = 0; c < chunks; ++c) {
    const unsigned parity = c & 1;
#pragma unroll
    for (unsigned r = 0; r < 8; ++r) {
      const float4 v = test_share(r * 1024 + t * 4, c, rank);
      reinterpret_cast<float4*>(r == rank ? slots + rank * 1024 : part + r * 1024)[t] = v;
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copies (async proxy) see the stores
    __syncthreads();
    if (t == 0) {
      expect_bytes(bar_rs, 7 * 4096);
      for (unsigned r = 0; r < 8; ++r)
        if (r != rank) bulk_copy(remote(&slots[rank * 1024], r), part + r * 1024, 4096, remote(&bars[0], r));
    }
    wait_phase(bar_rs, parity);
    const float4 s = sum_slots(slots, t);
    reinterpret_cast<float4*>(mine)[t] = s;
    reinterpret_cast<float4*>(gather)[rank * 256 + t] = s;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (t == 0) {
      expect_bytes(bar_ag, 7 * 4096);
      for (unsigned r = 0; r < 8; ++r)
        if (r != rank) bulk_copy(remote(&gather[rank * 1024], r), mine, 4096, remote(&bars[1], r));
    }
    wait_phase(bar_ag, parity);
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      float4 v = reinterpret_cast<float4*>(gather)[r * 256 + t];
      acc += v.x + v.y + v.z + v.w;
    }
    __syncthreads();
  }
  BAR_RA();
  out[blockIdx.x * 256 + threadIdx.x] = acc;
}
