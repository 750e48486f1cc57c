/* SwiGLU's element-wise passes, each fused into one pass over its slices (sct_edge/model/fused.py compiles and
 * calls this file). Every function works in place on n contiguous elements, in parallel on the OpenMP runtime
 * torch already loaded (the same libgomp.so.1, so the same threads, still spinning after torch's last op).
 *
 * float32 takes its own exponential so that the loop vectorises without -ffast-math: Cephes' expf polynomial
 * (about 1 ulp on the clamped range), with the exponent clamped so that 1 + e stays finite. A NaN passes the
 * clamps (comparisons with NaN are false) and reaches every output. float64 (the gradient checks) takes libm's. */
#include <math.h>
#include <stdint.h>

/* Below this many elements the threads' hand-off costs more than it saves. */
#define PARALLEL_FROM 65536

static inline float exp_f32(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 · 2^23 */
  float r = x - n * 0.693359375f;                                     /* ln 2 in two parts, exact product */
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t bits; float value; } scale = {.bits = ((int32_t)n + 127) << 23};
  return p * scale.value;
}

#define SWIGLU(T, SUFFIX, EXP)                                                                              \
  /* g <- silu(g) * u */                                                                                    \
  void silu_mul_##SUFFIX(T *restrict g, const T *restrict u, long n) {                                      \
    _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_FROM)")                               \
    for (long i = 0; i < n; i++) {                                                                          \
      T x = g[i];                                                                                           \
      g[i] = x / ((T)1 + EXP(-x)) * u[i];                                                                   \
    }                                                                                                       \
  }                                                                                                         \
  /* p = silu(g) * u with gradient grad_p: g <- d/dg, u <- p, grad_p <- d/du */                             \
  void silu_mul_backward_##SUFFIX(T *restrict g, T *restrict u, T *restrict grad_p, long n) {               \
    _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_FROM)")                               \
    for (long i = 0; i < n; i++) {                                                                          \
      T x = g[i], up = u[i], grad = grad_p[i];                                                              \
      T sigmoid = (T)1 / ((T)1 + EXP(-x));                                                                  \
      T silu = x * sigmoid;                                                                                 \
      g[i] = grad * up * (sigmoid * ((T)1 + x * ((T)1 - sigmoid)));                                         \
      u[i] = silu * up;                                                                                     \
      grad_p[i] = grad * silu;                                                                              \
    }                                                                                                       \
  }

SWIGLU(float, f32, exp_f32)
SWIGLU(double, f64, exp)
