// Fused BitNet b1.58 linear for CPU inference: per-token absmax int8 activations times 2-bit ternary weights,
// accumulated in int32, divided once by s_x * s_w (plus an optional bias). Built on first use by
// forge_models/bitnet/kernel.py and registered as torch.ops.forge_bitnet.ternary_linear.
//
// Weights: uint8 (R, in), R = ceil(out / 4), the 2-bit layout of transformers' BitNet integration: byte
// (j, k) holds, in bits 2i..2i+1, the code t + 1 of weight W[i * R + j, k] (t in {-1, 0, 1}). One contiguous
// row j therefore feeds four outputs' dot products over k, and the unsigned codes go straight into the
// u8 x s8 multiply-add instructions: sum_k (t_k + 1) x_k = sum_k t_k x_k + sum_k x_k, so the row sum of the
// int8 activations is subtracted once per output. Every step is exact integer arithmetic; the float steps
// (the activation scale, the final division) are the same IEEE operations, in the same order, as the
// PyTorch reference (forge_models.bitnet.quant.activation_quant + integer_linear), so outputs are
// bit-identical to it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr float kEps = 1e-5f;     // quant.EPS
constexpr float kQMax = 127.0f;   // quant.ACT_QMAX
constexpr float kQMin = -128.0f;  // quant.ACT_QMIN

// One token: absmax scale and int8 codes, exactly as activation_quant computes them in float32:
// scale = reciprocal(clamp(max|x|, eps)) * 127 (Tensor.__rtruediv__ is reciprocal-then-multiply),
// q = clamp(round_half_even(x * scale), -128, 127).
float quantize_row(const float* x, int64_t n, int8_t* q, int32_t* sum) {
  float amax = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < n; ++k) {
    float a = std::fabs(x[k]);
    nan |= std::isnan(a);
    amax = a > amax ? a : amax;
  }
  if (nan) {
    for (int64_t k = 0; k < n; ++k) q[k] = 0;
    *sum = 0;
    return std::nanf("");  // NaN in, NaN out (as the reference), never undefined int8 casts
  }
  const float scale = (1.0f / (amax < kEps ? kEps : amax)) * kQMax;
  int32_t s = 0;
  for (int64_t k = 0; k < n; ++k) {
    float v = std::nearbyint(x[k] * scale);  // default rounding mode: half to even, as torch.round
    v = v < kQMin ? kQMin : (v > kQMax ? kQMax : v);
    q[k] = static_cast<int8_t>(v);
    s += static_cast<int32_t>(q[k]);
  }
  *sum = s;
  return scale;
}

#if defined(__AVX2__)
inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// acc += sum over groups of 4 of codes(u8) * x(s8), in int32.
inline __m256i dot_u8s8(__m256i acc, __m256i codes, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, codes, x);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, codes, x);
#else
  // |code * x| <= 256, so the pairwise int16 sums (<= 512) never saturate.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1)));
#endif
}
#endif

// The four code-weighted sums sum_k code_i(w[k]) * x[k] of one packed row.
inline void row_dots(const uint8_t* w, const int8_t* x, int64_t n, int32_t out[4]) {
  int64_t k = 0;
  int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#if defined(__AVX2__)
  const __m256i m3 = _mm256_set1_epi8(3);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (; k + 32 <= n; k += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k));
    a0 = dot_u8s8(a0, _mm256_and_si256(b, m3), xv);
    a1 = dot_u8s8(a1, _mm256_and_si256(_mm256_srli_epi16(b, 2), m3), xv);
    a2 = dot_u8s8(a2, _mm256_and_si256(_mm256_srli_epi16(b, 4), m3), xv);
    a3 = dot_u8s8(a3, _mm256_and_si256(_mm256_srli_epi16(b, 6), m3), xv);
  }
  s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
#endif
  for (; k < n; ++k) {
    const int32_t b = w[k], v = x[k];
    s0 += (b & 3) * v, s1 += ((b >> 2) & 3) * v, s2 += ((b >> 4) & 3) * v, s3 += ((b >> 6) & 3) * v;
  }
  out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& weight_scale,
                          const std::optional<at::Tensor>& bias, int64_t out_features) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu(), "ternary_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "ternary_linear: x must be a contiguous float32 (rows, in) matrix");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(),
              "ternary_linear: codes must be a contiguous uint8 (ceil(out/4), in) matrix");
  const int64_t rows = x.size(0), in = x.size(1), R = codes.size(0);
  TORCH_CHECK(codes.size(1) == in, "ternary_linear: codes have ", codes.size(1), " inputs, x has ", in);
  TORCH_CHECK(out_features > 4 * (R - 1) && out_features <= 4 * R, "ternary_linear: ", R,
              " packed rows cannot hold ", out_features, " outputs");
  TORCH_CHECK(weight_scale.numel() == 1 && weight_scale.scalar_type() == at::kFloat,
              "ternary_linear: weight_scale must be one float32");
  // |sum_k code * x_q| <= 2 * 128 * in (codes t + 1 <= 2) must stay below 2^31.
  TORCH_CHECK(in <= (1 << 22), "ternary_linear: in_features too large for exact int32 sums");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == out_features,
                "ternary_linear: bias must be a contiguous float32 vector of out_features");
    bias_ptr = bias->data_ptr<float>();
  }
  const float s_w = weight_scale.item<float>();
  std::vector<int8_t> q(static_cast<size_t>(rows * in));
  std::vector<int32_t> xsum(static_cast<size_t>(rows));
  std::vector<float> denom(static_cast<size_t>(rows));
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    denom[r] = quantize_row(xp + r * in, in, q.data() + r * in, &xsum[r]) * s_w;  // s_x * s_w, as in torch
  }
  at::Tensor y = at::empty({rows, out_features}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  // Each packed row is 4 outputs x `in` weights; ~16K weights per task amortises the fork/join.
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, in * rows));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    int32_t s[4];
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t r = 0; r < rows; ++r) {
        row_dots(cp + j * in, q.data() + r * in, in, s);
        for (int i = 0; i < 4; ++i) {
          const int64_t o = i * R + j;
          if (o >= out_features) continue;
          float v = static_cast<float>(s[i] - xsum[r]) / denom[r];
          if (bias_ptr) v = v + bias_ptr[o];
          yp[r * out_features + o] = v;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(forge_bitnet, m) {
  m.def("ternary_linear(Tensor x, Tensor codes, Tensor weight_scale, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(forge_bitnet, CPU, m) {
  m.impl("ternary_linear", &ternary_linear);
}
