// Reusable multi-tensor launcher for catapult's CUDA kernels (norms, AdamW, SGD,
// Lion, LAMB). One launch processes up to TensorTable::kMaxTensors tensors: the
// table (per tensor the address of each list, numel, cumulative chunk count, one
// integer of the op's own) travels in the kernel's parameters, each block handles
// one fixed-size chunk of one tensor and finds that tensor by a binary search over
// the cumulative chunk counts. More tensors than fit in one table are launched again.
//
// Capturable: nothing is allocated or copied to the device here, and the host
// never waits for the device; every launch goes to the current stream.
//
// Usage:
//   struct MyFunctor {
//     template <typename Table>
//     __device__ void operator()(const Table& table, const ChunkInfo& c) const;
//   };
//   multi_tensor_apply<NLists, NAux, kWriteMask>(lists, aux, select, [extra,] MyFunctor{...});
// lists: NLists lists walked elementwise, entry i of each the same numel, dtype and
//        dense layout (check first: catapult::check_update_lists); kWriteMask: bit l
//        set if list l is written;
// aux:   NAux lists whose tensors are only passed by address (e.g. step counts); an
//        empty aux list gives nullptr for every entry (an optional input, e.g.
//        agc_scales when AGC is off);
// select(i): whether entry i takes part (e.g. one dtype group); entries with 0
//        elements never do;
// extra(i): an int64 the functor finds in table.extra (the update ops: the AGC row
//        length); 0 when not given.
// Inside the functor, chunk_elementwise<T, N, kStoreMask>() does the common loop;
// for_each_dtype_group() runs one multi_tensor_apply per dtype.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>

namespace catapult {
namespace cuda {

// Threads per block. 256 lets the scheduler pack blocks finely (5 per SM at the
// fp32 AdamW kernel's 46 registers, 4 for bf16's 62) and keeps most threads busy on
// small tensors (1000 fp32 elements = 250 vectors); the fixed-order block
// reduction of the norm is a tree over its 8 warps. (512 measured the same for
// fp32 and 5% slower for bf16 AdamW, whose 66 registers then fit 2 blocks per SM.)
constexpr int kBlockSize = 256;
constexpr int kWarps = kBlockSize / 32;
static_assert(kBlockSize % 32 == 0 && kWarps <= 32, "block reduction assumes <= 32 full warps");

// Elements per chunk (one block each). 16K elements = 64 KiB per fp32 list: 16
// vector iterations per thread (8 for 16-bit types), enough to amortize the
// per-block setup (binary search, scalar loads, powf), while 100M params give
// ~6100 blocks (~12 rounds of the resident blocks on 132 SMs), so the tail is
// short. On an H100, 16K was 0.5-1% faster than 32K and 64K at 100M-400M params.
// A multiple of every vector width (4 fp32, 8 half), so every chunk of a
// 16-byte-aligned tensor starts 16-byte aligned. Norm partials: one float per chunk.
constexpr int64_t kChunkSize = 16384;
static_assert(kChunkSize % 8 == 0, "chunks must hold whole 16-byte vectors");
static_assert(kChunkSize <= (int64_t{1} << 30), "in-chunk offsets are int");

// Kernel-parameter budget for one table (CUDA 12.1+ allows 32764 bytes of kernel
// parameters on sm_70+; the functor needs a few dozen more). Measured on an H100
// with 5000 tensors of 1000 fp32 elements: a 30 KB table (496 tensors per launch)
// against an 8 KB one (128) cut the CUDA-graph step from 0.19 to 0.10 ms and the
// eager step from 12.1 to 7.6 ms (fewer launches; a launch did not get slower in
// proportion to its parameter size), at no cost for large tensors. 24 KB keeps
// margin under the limit: 304 tensors per AdamW or LAMB launch (4 lists + step +
// AGC scales), 288 with amsgrad or Grokfast, 256 with both, 448 for plain SGD, 656
// for a norm.
constexpr size_t kTableBytes = 24 * 1024;
constexpr int kMaxTensorsCap = 1024;

constexpr int max_tensors_for(int nptrs) {
  // bytes per tensor: nptrs addresses + numel + chunk_end + extra + index + aligned flag
  const int per = 8 * nptrs + 8 + 8 + 8 + 4 + 1;
  const int fit = static_cast<int>((kTableBytes - 64) / per) / 16 * 16;
  return fit < kMaxTensorsCap ? fit : kMaxTensorsCap;
}

template <int NLists, int NAux>
struct TensorTable {
  static_assert(NLists >= 1, "at least one elementwise list");
  static constexpr int kLists = NLists;
  static constexpr int kAux = NAux;
  static constexpr int kPtrs = NLists + NAux;
  static constexpr int kMaxTensors = max_tensors_for(kPtrs);
  static_assert(kMaxTensors >= 16, "too many lists for one table");

  // ptrs[l][t]: list l's tensor t (l < NLists: elementwise lists; then the aux lists,
  // nullptr where an aux list is empty).
  void* ptrs[kPtrs][kMaxTensors];
  int64_t numel[kMaxTensors];
  // Cumulative chunk count through tensor t (inclusive): blocks
  // [chunk_end[t-1], chunk_end[t]) of this launch belong to tensor t.
  int64_t chunk_end[kMaxTensors];
  int64_t extra[kMaxTensors];    // the op's own per-tensor integer (multi_tensor_apply's extra)
  int32_t index[kMaxTensors];    // entry's position in the caller's lists
  uint8_t aligned[kMaxTensors];  // all NLists addresses of tensor t are 16-byte aligned
  int32_t ntensors;
  int64_t chunk_base;  // chunks launched before this launch in the same multi_tensor_apply
};

// What a block works on.
struct ChunkInfo {
  int t;                 // slot in the table
  int64_t chunk;         // chunk index within the tensor
  int64_t start;         // first element of the chunk within the tensor (chunk * kChunkSize)
  int n;                 // elements in this chunk (<= kChunkSize)
  int64_t global_chunk;  // chunk index over all launches of this multi_tensor_apply call
};

// ---------------------------------------------------------------------------
// 16-byte vectors <-> float registers.
template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static void unpack(const uint4& r, float (&o)[kVec]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&o)[kVec]) {
    return make_uint4(__float_as_uint(o[0]), __float_as_uint(o[1]), __float_as_uint(o[2]),
                      __float_as_uint(o[3]));
  }
};

template <>
struct Vec16<c10::BFloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  __device__ __forceinline__ static uint32_t two(float a, float b) {
    // c10::BFloat16(float) rounds to nearest even, as every torch kernel does.
    return static_cast<uint32_t>(c10::BFloat16(a).x) |
           (static_cast<uint32_t>(c10::BFloat16(b).x) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&o)[kVec]) {
    o[0] = lo(r.x); o[1] = hi(r.x); o[2] = lo(r.y); o[3] = hi(r.y);
    o[4] = lo(r.z); o[5] = hi(r.z); o[6] = lo(r.w); o[7] = hi(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&o)[kVec]) {
    return make_uint4(two(o[0], o[1]), two(o[2], o[3]), two(o[4], o[5]), two(o[6], o[7]));
  }
};

template <>
struct Vec16<c10::Half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ __forceinline__ static float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static uint32_t two(float a, float b) {
    return static_cast<uint32_t>(c10::Half(a).x) | (static_cast<uint32_t>(c10::Half(b).x) << 16);
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&o)[kVec]) {
    o[0] = lo(r.x); o[1] = hi(r.x); o[2] = lo(r.y); o[3] = hi(r.y);
    o[4] = lo(r.z); o[5] = hi(r.z); o[6] = lo(r.w); o[7] = hi(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&o)[kVec]) {
    return make_uint4(two(o[0], o[1]), two(o[2], o[3]), two(o[4], o[5]), two(o[6], o[7]));
  }
};

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// ---------------------------------------------------------------------------
// The common per-chunk loop of an elementwise update over N same-dtype lists.
// ptr[l] points at the chunk's first element of list l, n <= kChunkSize elements.
// For each element: x[l] = list l's value as float, op(x, i) with i the element's
// index within the chunk (the functor adds ChunkInfo::start for the index within
// the tensor), then lists whose bit is set in kStoreMask are written back. All
// loads of a step are issued before op. op may keep state (e.g. a thread's partial
// sums): each thread calls it for its elements in a fixed order.
// aligned: all N base addresses are 16-byte aligned (then 16-byte vectors, and a
// scalar tail of < kVec elements); otherwise the whole chunk takes the scalar path
// (coalesced, kVec elements per thread per step).
template <typename T, int N, unsigned kStoreMask, typename Op>
__device__ __forceinline__ void chunk_elementwise(T* const (&ptr)[N], int n, bool aligned,
                                                  Op&& op) {
  using V = Vec16<T>;
  constexpr int kVec = V::kVec;
  int done = 0;
  if (aligned) {
    const int nvec = n / kVec;
    for (int v = threadIdx.x; v < nvec; v += kBlockSize) {
      uint4 r[N];
#pragma unroll
      for (int l = 0; l < N; ++l) r[l] = reinterpret_cast<const uint4*>(ptr[l])[v];
      float x[N][kVec];
#pragma unroll
      for (int l = 0; l < N; ++l) V::unpack(r[l], x[l]);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float e[N];
#pragma unroll
        for (int l = 0; l < N; ++l) e[l] = x[l][j];
        op(e, v * kVec + j);
#pragma unroll
        for (int l = 0; l < N; ++l) x[l][j] = e[l];
      }
#pragma unroll
      for (int l = 0; l < N; ++l) {
        if (kStoreMask & (1u << l)) reinterpret_cast<uint4*>(ptr[l])[v] = V::pack(x[l]);
      }
    }
    done = nvec * kVec;
  }
  for (int base = done; base < n; base += kBlockSize * kVec) {
    float x[N][kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int i = base + j * kBlockSize + static_cast<int>(threadIdx.x);
#pragma unroll
      for (int l = 0; l < N; ++l) x[l][j] = i < n ? to_float(ptr[l][i]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int i = base + j * kBlockSize + static_cast<int>(threadIdx.x);
      if (i < n) {
        float e[N];
#pragma unroll
        for (int l = 0; l < N; ++l) e[l] = x[l][j];
        op(e, i);
#pragma unroll
        for (int l = 0; l < N; ++l) {
          if (kStoreMask & (1u << l)) ptr[l][i] = from_float<T>(e[l]);
        }
      }
    }
  }
}

// Pointer to the chunk's first element of elementwise list l.
template <typename T, typename Table>
__device__ __forceinline__ T* chunk_ptr(const Table& table, int l, const ChunkInfo& c) {
  return static_cast<T*>(table.ptrs[l][c.t]) + c.start;
}

// ---------------------------------------------------------------------------
template <typename Table, typename Functor>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_apply_kernel(const __grid_constant__ Table table,
                              const __grid_constant__ Functor functor) {
  const int64_t block = blockIdx.x;
  // Smallest t with chunk_end[t] > block. chunk_end is strictly increasing (every
  // tensor in the table has >= 1 chunk) and chunk_end[ntensors-1] == gridDim.x >
  // block, so the answer lies in [0, ntensors-1]; the loop keeps it in [lo, hi].
  int lo = 0;
  int hi = table.ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (table.chunk_end[mid] <= block) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  ChunkInfo c;
  c.t = lo;
  c.chunk = block - (lo == 0 ? int64_t{0} : table.chunk_end[lo - 1]);
  c.start = c.chunk * kChunkSize;
  const int64_t left = table.numel[lo] - c.start;
  c.n = static_cast<int>(left < kChunkSize ? left : kChunkSize);
  c.global_chunk = table.chunk_base + block;
  functor(table, c);
}

__host__ __device__ inline int64_t num_chunks(int64_t numel) {
  return (numel + kChunkSize - 1) / kChunkSize;
}

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Launches functor over every selected entry with numel > 0, as few launches as the
// table allows. Entries are tabled in list order, so the chunks of the selected
// entries are numbered (ChunkInfo::global_chunk) in list order, each tensor's
// chunks consecutive. Returns the number of chunks launched.
// kWriteMask: bit l set if the kernel writes elementwise list l; the other lists and
// the aux lists are taken with const_data_ptr() (no copy-on-write materialization).
// extra(i) -> int64_t fills table.extra for entry i.
template <int NLists, int NAux, unsigned kWriteMask, typename Select, typename Extra,
          typename Functor>
int64_t multi_tensor_apply(const std::array<at::TensorList, NLists>& lists,
                           const std::array<at::TensorList, NAux>& aux, const Select& select,
                           const Extra& extra, const Functor& functor) {
  using Table = TensorTable<NLists, NAux>;
  static_assert(sizeof(Table) <= kTableBytes, "table exceeds its parameter budget");
  static_assert(sizeof(Table) + sizeof(Functor) <= 32000, "kernel parameters too large");

  const auto n = lists[0].size();
  TORCH_CHECK(n <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "catapult: too many tensors");
  for (int l = 1; l < NLists; ++l) TORCH_CHECK(lists[l].size() == n, "catapult: list sizes differ");
  for (int a = 0; a < NAux; ++a) {
    TORCH_CHECK(aux[a].empty() || aux[a].size() == n, "catapult: list sizes differ");
  }

  constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();  // gridDim.x limit
  Table table{};
  table.ntensors = 0;
  table.chunk_base = 0;
  int64_t chunks = 0;  // in the table being filled
  int64_t launched = 0;
  std::optional<c10::cuda::CUDAGuard> guard;
  cudaStream_t stream = nullptr;

  auto launch = [&]() {
    multi_tensor_apply_kernel<Table, Functor>
        <<<static_cast<unsigned>(chunks), kBlockSize, 0, stream>>>(table, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launched += chunks;
    table.ntensors = 0;
    table.chunk_base = launched;
    chunks = 0;
  };

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t0 = lists[0][i];
    const int64_t numel = t0.numel();
    if (numel == 0 || !select(i)) continue;
    if (!guard) {
      TORCH_CHECK(t0.is_cuda(), "catapult: multi_tensor_apply needs CUDA tensors");
      guard.emplace(t0.device());
      stream = c10::cuda::getCurrentCUDAStream(t0.device().index()).stream();
    }
    const int64_t tc = num_chunks(numel);
    TORCH_CHECK(tc <= kMaxGrid, "catapult: tensor of ", numel, " elements is too large");
    if (table.ntensors > 0 && chunks + tc > kMaxGrid) launch();

    const int k = table.ntensors;
    bool aligned = true;
    for (int l = 0; l < NLists; ++l) {
      const at::Tensor& t = lists[l][i];
      void* p = (kWriteMask >> l) & 1u ? t.data_ptr() : const_cast<void*>(t.const_data_ptr());
      table.ptrs[l][k] = p;
      aligned = aligned && is_aligned16(p);
    }
    for (int a = 0; a < NAux; ++a) {
      table.ptrs[NLists + a][k] =
          aux[a].empty() ? nullptr : const_cast<void*>(aux[a][i].const_data_ptr());
    }
    table.numel[k] = numel;
    chunks += tc;
    table.chunk_end[k] = chunks;
    table.extra[k] = extra(i);
    table.index[k] = static_cast<int32_t>(i);
    table.aligned[k] = aligned ? 1 : 0;
    table.ntensors = k + 1;
    if (table.ntensors == Table::kMaxTensors) launch();
  }
  if (table.ntensors > 0) launch();
  return launched;
}

// The same without a per-tensor extra (table.extra is 0).
template <int NLists, int NAux, unsigned kWriteMask, typename Select, typename Functor>
int64_t multi_tensor_apply(const std::array<at::TensorList, NLists>& lists,
                           const std::array<at::TensorList, NAux>& aux, const Select& select,
                           const Functor& functor) {
  return multi_tensor_apply<NLists, NAux, kWriteMask>(
      lists, aux, select, [](size_t) { return int64_t{0}; }, functor);
}

// Calls f(T{}, select) once per dtype present among params, in the order float32,
// bfloat16, float16 (T: float, c10::BFloat16, c10::Half), with select(i) true for
// the entries of that dtype: the update ops run one multi_tensor_apply per dtype
// (entry i of every list shares params[i]'s dtype: check first).
template <typename F>
void for_each_dtype_group(at::TensorList params, F&& f) {
  for (const at::ScalarType st : {at::kFloat, at::kBFloat16, at::kHalf}) {
    bool present = false;
    for (const auto& p : params) present = present || p.scalar_type() == st;
    if (!present) continue;
    const auto select = [params, st](size_t i) { return params[i].scalar_type() == st; };
    switch (st) {
      case at::kFloat:
        f(float{}, select);
        break;
      case at::kBFloat16:
        f(c10::BFloat16{}, select);
        break;
      default:
        f(c10::Half{}, select);
        break;
    }
  }
}

}  // namespace cuda
}  // namespace catapult
