// multi_tensor_norm on CPU: the 2- or inf-norm of a list of tensors taken together
// and, if asked, of each tensor. Deterministic whatever the thread count: every
// tensor is cut into fixed-size chunks, each chunk's partial is computed in a fixed
// order, and the partials are reduced serially in a fixed order. A chunk's squares are
// summed in float, and again in double when that sum may be off (cpu/square_sum.h):
// the norm is finite whenever the inputs are and the norm itself fits a float; inf and
// NaN inputs still give inf and NaN.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cpu/square_sum.h"
#include "multi_tensor_checks.h"

namespace {

using catapult::cpu::FloatSquareSum;
using catapult::cpu::needs_double_sum;
using catapult::cpu::SquareSum;
using Vec = at::vec::Vectorized<float>;

// Independent accumulators of max_abs, so that the max latency never limits the loop.
constexpr int64_t kAccumulators = 8;
// Elements per chunk (a multiple of every vector block below): large enough that the
// per-chunk overhead vanishes, small enough that float lanes sum a chunk accurately.
constexpr int64_t kChunk = 1 << 16;

inline Vec load_float(const float* x) { return Vec::loadu(x); }

template <typename T>
inline Vec load_float(const T* x) {
  Vec out;
  at::vec::load_to_float(x, out);
  return out;
}

// max that returns NaN if either argument is NaN, as the norm must.
inline double max_nan(double a, double b) { return (a > b || std::isnan(a)) ? a : b; }

// Sum of x^2 over n elements in Acc's lanes (cpu/square_sum.h), with eight vector add
// chains in flight, so that the add latency never limits the loop.
template <typename Acc, typename T>
double sum_of_squares_in(const T* x, int64_t n) {
  constexpr int64_t kSums = 8 / Acc::kVectors;
  constexpr int64_t kBlock = kSums * Vec::size();
  Acc acc[kSums];
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t k = 0; k < kSums; ++k) acc[k].add(load_float(x + i + k * Vec::size()));
  }
  for (; i + Vec::size() <= n; i += Vec::size()) acc[0].add(load_float(x + i));
  for (int64_t width = kSums / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k].add(acc[k + width]);
  }
  double sum = acc[0].total();
  for (; i < n; ++i) {
    const double v = static_cast<float>(x[i]);
    sum += v * v;
  }
  return sum;
}

// max |x| from the bits: with the sign bit cleared, the bits of an IEEE float read
// as a signed integer order like |x|, and every NaN orders above inf. An integer
// max therefore gives max |x| with NaN propagated, in the tensor's own width.
template <typename T>
double max_abs(const T* x, int64_t n) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int16_t>;
  using IVec = at::vec::Vectorized<I>;
  constexpr I kMagnitude = std::numeric_limits<I>::max();
  constexpr int64_t kBlock = kAccumulators * IVec::size();
  const IVec magnitude(kMagnitude);
  IVec acc[kAccumulators];
  for (auto& a : acc) a = IVec(0);
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (int64_t k = 0; k < kAccumulators; ++k) {
      acc[k] = at::vec::maximum(acc[k], IVec::loadu(x + i + k * IVec::size()) & magnitude);
    }
  }
  for (; i + IVec::size() <= n; i += IVec::size()) {
    acc[0] = at::vec::maximum(acc[0], IVec::loadu(x + i) & magnitude);
  }
  for (int64_t width = kAccumulators / 2; width > 0; width /= 2) {
    for (int64_t k = 0; k < width; ++k) acc[k] = at::vec::maximum(acc[k], acc[k + width]);
  }
  I lanes[IVec::size()];
  acc[0].store(lanes);
  I result = 0;
  for (I lane : lanes) result = std::max(result, lane);
  for (; i < n; ++i) result = std::max(result, static_cast<I>(c10::bit_cast<I>(x[i]) & kMagnitude));
  return static_cast<float>(c10::bit_cast<T>(result));
}

// In float lanes, and again in double where that sum may be off (an element beyond
// 1.8e19, or squares too small for float): finite for any finite input. A sum of exactly
// 0 is most often a chunk of zeros (unused embedding rows, zero-initialised biases): the
// integer max pass, cheaper than the double sum, tells those from underflowed squares.
template <typename T>
double sum_of_squares(const T* x, int64_t n) {
  const double sum = sum_of_squares_in<FloatSquareSum>(x, n);
  if (!needs_double_sum(sum) || (sum == 0.0 && max_abs(x, n) == 0.0)) {
    return sum;
  }
  return sum_of_squares_in<SquareSum>(x, n);
}

template <typename T>
double partial(const void* data, int64_t begin, int64_t n, bool inf) {
  const T* x = static_cast<const T*>(data) + begin;
  return inf ? max_abs(x, n) : sum_of_squares(x, n);
}

double chunk_partial(const at::Tensor& t, int64_t begin, int64_t n, bool inf) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return partial<float>(t.const_data_ptr(), begin, n, inf);
    case at::kBFloat16:
      return partial<at::BFloat16>(t.const_data_ptr(), begin, n, inf);
    default:
      return partial<at::Half>(t.const_data_ptr(), begin, n, inf);
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_cpu(at::TensorList tensors, double ord,
                                                         bool per_tensor) {
  const bool inf = std::isinf(ord) && ord > 0;
  TORCH_CHECK(ord == 2.0 || inf, "catapult: multi_tensor_norm supports ord=2 or ord=inf, got ",
              ord);
  const int64_t n = static_cast<int64_t>(tensors.size());

  // Non-dense tensors are copied; a dense one is walked as a flat array whatever
  // its strides, since the norm does not depend on the order of the elements.
  std::vector<at::Tensor> flat;
  flat.reserve(n);
  std::vector<int64_t> first_chunk(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.is_cpu(), "catapult: multi_tensor_norm: tensors[", i, "] is on ", t.device(),
                "; the CPU kernel takes CPU tensors only");
    TORCH_CHECK(catapult::is_supported_float(t.scalar_type()), "catapult: multi_tensor_norm: tensors[",
                i, "] has dtype ", t.scalar_type(), "; supported: float32, bfloat16, float16");
    flat.push_back(t.is_non_overlapping_and_dense() ? t : t.contiguous());
    first_chunk[i + 1] = first_chunk[i] + (t.numel() + kChunk - 1) / kChunk;
  }
  const int64_t num_chunks = first_chunk[n];
  std::vector<int64_t> chunk_tensor(num_chunks);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(chunk_tensor.begin() + first_chunk[i], chunk_tensor.begin() + first_chunk[i + 1], i);
  }

  std::vector<double> partials(num_chunks);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const at::Tensor& t = flat[chunk_tensor[c]];
      const int64_t offset = (c - first_chunk[chunk_tensor[c]]) * kChunk;
      partials[c] = chunk_partial(t, offset, std::min(kChunk, t.numel() - offset), inf);
    }
  });

  at::Tensor per = at::empty({per_tensor ? n : 0}, at::kFloat);
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double r = 0.0;
    for (int64_t c = first_chunk[i]; c < first_chunk[i + 1]; ++c) {
      r = inf ? max_nan(r, partials[c]) : r + partials[c];
    }
    total = inf ? max_nan(total, r) : total + r;
    if (per_tensor) per.data_ptr<float>()[i] = static_cast<float>(inf ? r : std::sqrt(r));
  }
  at::Tensor total_t = at::empty({}, at::kFloat);
  *total_t.data_ptr<float>() = static_cast<float>(inf ? total : std::sqrt(total));
  return {total_t, per};
}

}  // namespace

TORCH_LIBRARY_IMPL(catapult, CPU, m) { m.impl("multi_tensor_norm", &multi_tensor_norm_cpu); }

// A call with no tensors at all (an empty list) carries no dispatch key, so the
// dispatcher sends it to the CompositeExplicitAutograd kernel: the CPU kernel
// answers it (total 0) and rejects tensors of devices that have no kernel.
TORCH_LIBRARY_IMPL(catapult, CompositeExplicitAutograd, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
}
