// Shared pieces of the per-ISA CPU kernel bodies (csrc/cpu/{attention,decode_attention,rms_norm,swiglu}_kernels.h):
// native float vectors of IK_VW lanes, row loops with a tail, exp2 of non-positive arguments, horizontal max/sum, a per-thread scratch
// buffer, the weighted sum of rows (P V) both kernels run. Included *inside* each body's `namespace ik { namespace <isa> { namespace {`, after <cstdint>, <cstdlib> and
// <cstring>, so every definition here has internal linkage and is compiled for that file's ISA (see the note on
// external linkage in attention_kernels.h). No include guard: each ISA's translation unit includes it once.

constexpr int VW = IK_VW;                                  // floats per vector
typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));   // unaligned access
typedef int32_t vi __attribute__((vector_size(VW * 4)));

constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
// x - (+0) is x for every x, -0 included, so this folds to one broadcast (vf{} + x would be an addition: 0 + -0 = +0).
inline vf splat(float x) { return x - vf{}; }

// 2^x for x <= 0 (x >= -126 after the clamp): 2^round(x) from the exponent bits times a degree-6 Taylor polynomial of
// 2^f = e^(f ln 2) on |f| <= 1/2, whose remainder (0.35^7 / 7!) is ~1.2e-7 relative, about one float ulp.
inline vf exp2_neg(vf x) {
  x = x < splat(-126.f) ? splat(-126.f) : x;
  const vf shifted = x + splat(0.5f);
  vi n = __builtin_convertvector(shifted, vi);             // truncates toward zero
  n += (__builtin_convertvector(n, vf) > shifted);         // -1 where truncation rounded up: floor(x + 1/2)
  const vf f = x - __builtin_convertvector(n, vf);         // in [-1/2, 1/2]
  const vf t = f * splat(LN2);
  vf p = splat(1.f / 720);
  p = p * t + splat(1.f / 120);
  p = p * t + splat(1.f / 24);
  p = p * t + splat(1.f / 6);
  p = p * t + splat(0.5f);
  p = p * t + splat(1.f);
  p = p * t + splat(1.f);
  const vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The first n < VW floats at p as a vector (the other lanes 0), and their store: a row's tail.
inline vf load_first(const float* p, int64_t n) {
  vf x = splat(0.f);
  std::memcpy(&x, p, n * sizeof(float));
  return x;
}
inline void store_first(float* p, vf x, int64_t n) { std::memcpy(p, &x, n * sizeof(float)); }
// n <= VW floats at p: a whole vector (n == VW) or a row's tail.
inline vf load_n(const float* p, int64_t n) { return n == VW ? load(p) : load_first(p, n); }
inline void store_n(float* p, vf x, int64_t n) {
  if (n == VW) store(p, x); else store_first(p, x, n);
}
// Calls f(i, n) over a row of `width` floats: n = VW at each whole vector, then n < VW once for the tail if any.
template <class F>
inline void over_row(int64_t width, F f) {
  int64_t i = 0;
  for (; i + VW <= width; i += VW) f(i, int64_t(VW));
  if (i < width) f(i, width - i);
}

inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < VW; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float hsum(vf x) {
  float s = 0.f;
  for (int i = 0; i < VW; ++i) s += x[i];
  return s;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline void fill(float* begin, float* end, float value) {
  for (float* p = begin; p < end; ++p) *p = value;
}
constexpr float kInf = __builtin_inff();

// Each thread's work space, kept between calls and grown as needed.
struct Scratch {
  float* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
};
thread_local Scratch scratch;

float* scratch_floats(size_t n) {
  if (scratch.size < n) {
    std::free(scratch.data);
    scratch.data = static_cast<float*>(std::malloc(n * sizeof(float)));
    if (scratch.data == nullptr) std::abort();   // inside an OpenMP region an exception would terminate as well
    scratch.size = n;
  }
  return scratch.data;
}

// Register tiles: (rows × vectors) accumulators, 16 of AVX-512's 32 registers, 12 of AVX2's and SSE's 16 (the rest
// hold the loaded operands).
constexpr int ACC = VW == 16 ? 16 : 12;

// out[r][·] = mul[r] · Σ_{j < n} P[r][j] · B[j][·] for r < R (B rows of D floats, stride ldb): P V, dS K.
template <int D, int R>
inline void weighted_rows(const float* p, int64_t ldp, const float* b, int64_t ldb, int64_t n, float* out,
                          int64_t ldo, const float* mul) {
  constexpr int DV = D / VW;
  vf acc[R][DV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < DV; ++v) acc[r][v] = splat(0.f);
  for (int64_t j = 0; j < n; ++j) {
    vf x[DV];
    for (int v = 0; v < DV; ++v) x[v] = load(b + j * ldb + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf w = splat(p[r * ldp + j]);
      for (int v = 0; v < DV; ++v) acc[r][v] += w * x[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < DV; ++v) store(out + r * ldo + v * VW, acc[r][v] * mul[r]);
}

template <int D>
constexpr int weighted_rows_per_tile() {
  return ACC / (D / VW) > 0 ? ACC / (D / VW) : 1;
}
