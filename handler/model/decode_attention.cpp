// One decode step's attention over the torch backend's slot cache, for the compiled step on CPU
// (handler/model/cpu_ops.py builds and loads it; handler/model/compiled.py calls it).
//
// Each row attends to its own cached keys only, [start, position), and to the step's own key:
// unlike a masked attention over the longest row's length it reads no key it then masks out, and
// it reads each key once for the whole group of query heads that share it. fp32 throughout, as the
// graph's own attention: the scores, a two-pass softmax (maximum, then exp and sum) and the
// weighted sum of the values.
//
//   hfns::decode_attention(q [b, heads, d], k_new [b, kv_heads, d], v_new [b, kv_heads, d],
//                          cache [layers, 2, slots, kv_heads, S, d], layer, positions [b] int64,
//                          window, scale) -> [b, heads, d]
//
// `window` > 0 is a sliding window: a row at position p attends to keys p - window + 1 .. p.
// d is 32, 64 or 128 (cpu_ops.supported says which models qualify); dtypes fp32, bf16, fp16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr int64_t MAX_GROUP = 8;  // query heads per key head

// NV * W elements of a row as fp32 vectors.
template <typename T, int NV>
inline void load_row(const T* p, Vec* out) {
  if constexpr (std::is_same_v<T, float>) {
    for (int v = 0; v < NV; ++v) out[v] = Vec::loadu(p + v * W);
  } else {
    static_assert(NV % 2 == 0, "a reduced-precision row loads as pairs of fp32 vectors");
    for (int v = 0; v < NV; v += 2) {
      auto pair = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p + v * W));
      out[v] = std::get<0>(pair);
      out[v + 1] = std::get<1>(pair);
    }
  }
}

template <typename T, int NV>
inline void store_row(T* p, const Vec* in) {
  if constexpr (std::is_same_v<T, float>) {
    for (int v = 0; v < NV; ++v) in[v].store(p + v * W);
  } else {
    for (int v = 0; v < NV; v += 2) {
      at::vec::convert_from_float<T>(in[v], in[v + 1]).store(p + v * W);
    }
  }
}

inline float sum_all(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

inline float max_all(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T, int NV>
void attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
            const at::Tensor& cache, int64_t layer, const at::Tensor& positions, int64_t window,
            double scale, at::Tensor& out) {
  constexpr int64_t dim = NV * W;
  const int64_t b = q.size(0), heads = q.size(1), kv_heads = k_new.size(1);
  const int64_t group = heads / kv_heads, seq = cache.size(4);
  const int64_t head_stride = seq * dim, slot_stride = kv_heads * head_stride;
  const int64_t half = cache.size(2) * slot_stride;  // keys, then values, of one layer
  const T* keys_layer = cache.data_ptr<T>() + layer * 2 * half;
  const T* values_layer = keys_layer + half;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_new.data_ptr<T>();
  const T* vp = v_new.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const Vec vscale(static_cast<float>(scale));
  at::parallel_for(0, b * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, stride]: each query head's weights over its keys
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, h = task % kv_heads;
      const int64_t p = pos[row];
      const int64_t start = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
      const int64_t n = p - start, m = n + 1;  // cached keys, then the row's own
      const int64_t stride = (m + W - 1) / W * W;
      const int64_t offset = row * slot_stride + h * head_stride + start * dim;
      const T* keys = keys_layer + offset;
      const T* values = values_layer + offset;
      const T* own_key = kp + (row * kv_heads + h) * dim;
      const T* own_value = vp + (row * kv_heads + h) * dim;
      Vec query[MAX_GROUP][NV];
      for (int64_t g = 0; g < group; ++g) {
        load_row<T, NV>(qp + (row * heads + h * group + g) * dim, query[g]);
        for (int v = 0; v < NV; ++v) query[g][v] = query[g][v] * vscale;
      }
      scores.resize(group * stride);
      for (int64_t j = 0; j < m; ++j) {
        Vec key[NV];
        load_row<T, NV>(j < n ? keys + j * dim : own_key, key);
        for (int64_t g = 0; g < group; ++g) {
          Vec acc = query[g][0] * key[0];
          for (int v = 1; v < NV; ++v) acc = at::vec::fmadd(query[g][v], key[v], acc);
          scores[g * stride + j] = sum_all(acc);
        }
      }
      float total[MAX_GROUP];
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * stride;
        Vec vmax(-INFINITY);
        int64_t j = 0;
        for (; j + W <= m; j += W) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
        float top = max_all(vmax);
        for (; j < m; ++j) top = std::max(top, s[j]);
        const Vec vtop(top);
        Vec vsum(0.f);
        for (j = 0; j + W <= m; j += W) {
          Vec e = (Vec::loadu(s + j) - vtop).exp_u20();
          e.store(s + j);
          vsum = vsum + e;
        }
        float sum = sum_all(vsum);
        for (; j < m; ++j) {
          s[j] = std::exp(s[j] - top);
          sum += s[j];
        }
        total[g] = sum;
      }
      Vec acc[MAX_GROUP][NV];
      for (int64_t g = 0; g < group; ++g) {
        for (int v = 0; v < NV; ++v) acc[g][v] = Vec(0.f);
      }
      for (int64_t j = 0; j < m; ++j) {
        Vec value[NV];
        load_row<T, NV>(j < n ? values + j * dim : own_value, value);
        for (int64_t g = 0; g < group; ++g) {
          const Vec weight(scores[g * stride + j]);
          for (int v = 0; v < NV; ++v) acc[g][v] = at::vec::fmadd(weight, value[v], acc[g][v]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const Vec inverse(1.f / total[g]);
        for (int v = 0; v < NV; ++v) acc[g][v] = acc[g][v] * inverse;
        store_row<T, NV>(op + (row * heads + h * group + g) * dim, acc[g]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& cache, int64_t layer, const at::Tensor& positions_in,
                            int64_t window, double scale) {
  const auto q = q_in.contiguous();
  const auto k_new = k_in.contiguous();
  const auto v_new = v_in.contiguous();
  const auto positions = positions_in.to(at::kLong).contiguous();
  TORCH_CHECK(cache.dim() == 6 && cache.is_contiguous(), "decode_attention: the cache must be a "
              "contiguous [layers, 2, slots, kv_heads, S, head_dim] tensor");
  TORCH_CHECK(q.dim() == 3 && k_new.dim() == 3 && v_new.sizes() == k_new.sizes(),
              "decode_attention: q [b, heads, d], k_new and v_new [b, kv_heads, d]");
  const int64_t b = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k_new.size(1);
  TORCH_CHECK(k_new.size(0) == b && positions.numel() == b && b <= cache.size(2),
              "decode_attention: rows disagree");
  TORCH_CHECK(kv_heads == cache.size(3) && dim == k_new.size(2) && dim == cache.size(5),
              "decode_attention: heads or head_dim disagree with the cache");
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= MAX_GROUP,
              "decode_attention: at most ", MAX_GROUP, " query heads per key head");
  TORCH_CHECK(0 <= layer && layer < cache.size(0), "decode_attention: no layer ", layer);
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && k_new.scalar_type() == cache.scalar_type()
              && v_new.scalar_type() == cache.scalar_type(), "decode_attention: dtypes disagree");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < b; ++r) {
    TORCH_CHECK(0 <= pos[r] && pos[r] < cache.size(4), "decode_attention: position ", pos[r],
                " outside the cache");
  }
  auto out = at::empty_like(q);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    if (dim == 4 * W) {
      attend<T, 4>(q, k_new, v_new, cache, layer, positions, window, scale, out);
    } else if (dim == 8 * W) {
      attend<T, 8>(q, k_new, v_new, cache, layer, positions, window, scale, out);
    } else if (dim == 2 * W) {
      attend<T, 2>(q, k_new, v_new, cache, layer, positions, window, scale, out);
    } else {
      TORCH_CHECK(false, "decode_attention: head_dim ", dim, " is not ", 2 * W, ", ", 4 * W,
                  " or ", 8 * W);
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "decode_attention: dtype ", q.scalar_type(), " not supported");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(hfns, m) {
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor cache, int layer, "
        "Tensor positions, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(hfns, CPU, m) { m.impl("decode_attention", &decode_attention); }
