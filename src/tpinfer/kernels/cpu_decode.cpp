// Decode kernels for x86-64 CPUs with AVX-512 (F, BW, VL): tpinfer compiles this file on the host that runs it
// (g++ -O3 -march=native -fopenmp, see tpinfer/kernels/__init__.py) and calls it through ctypes.
//
// Why: a decode step multiplies 1-8 activation rows by every weight. The weight is read once per step, so the
// step is bounded by memory bandwidth, and the work between the GEMVs is tiny. Torch's CPU GEMM streams the
// weight at about half the GEMV speed for 2-16 rows, and its bfloat16 GEMM has no fast path on CPUs without
// AVX512-BF16; eager attention for one query token costs tens of microseconds of dispatch per layer. The
// kernels below read each weight row once for all activation rows, widen bfloat16 to float32 in registers, and
// do rotary embedding + KV-cache write + attention for one new token per sequence in one call.
//
// Conventions: tensors are contiguous and row-major; dtype codes are 0 = float32, 1 = bfloat16. All arithmetic
// is float32; a bfloat16 result is rounded to nearest-even once, as torch's CPU kernels round their outputs.
// `threads` > 1 splits the independent rows over an OpenMP team (torch's own libgomp, already loaded).

#include <immintrin.h>
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <type_traits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__)
#error "tpinfer's CPU decode kernels need AVX-512 F/BW/VL"
#endif

namespace {

constexpr int kF32 = 0;
constexpr int kBF16 = 1;
// Not a tensor dtype: bfloat16 weights against bfloat16 activations kept as bfloat16 pairs, for the bfloat16 dot
// product instruction (VDPBF16PS, AVX512-BF16). Chosen inside the GEMV entry points (weight_kind), never passed in.
constexpr int kBF16Pairs = 2;
// Nor this: float32 weights against more than kMaxRows activation rows, x transposed for the broadcast kernel
// (gemv_bcast). Chosen per pass of rows (pass_kind).
constexpr int kF32Bcast = 3;
// And kBF16Pairs past kMaxRows rows with K even: x transposed by pairs for gemv_bcast<true>.
constexpr int kBF16PairsBcast = 4;
constexpr int kMaxRows = 8;  // activation rows per register tile (one accumulator register each)
// Activation rows per pass over a float weight: tiles of kMaxRows rows take turns on each block of weight rows
// while it is in L2 (gemv_f32_out), so a batch of up to this many rows still reads every weight from memory once.
constexpr int kMaxPassRows = 64;

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float load1(const void *p, int dtype, int64_t i) {
  return dtype == kF32 ? static_cast<const float *>(p)[i] : bf16_to_f32(static_cast<const uint16_t *>(p)[i]);
}

inline void store1(void *p, int dtype, int64_t i, float v) {
  if (dtype == kF32)
    static_cast<float *>(p)[i] = v;
  else
    static_cast<uint16_t *>(p)[i] = f32_to_bf16(v);
}

// 16 weights widened to float32; `mask` selects the valid lanes of a tail.
inline __m512 load16(const float *w, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, w); }
inline __m512 load16(const float *w) { return _mm512_loadu_ps(w); }
// 16 bfloat16 values (their bits) widened to float32: exact.
inline __m512 widen_bf16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load16(const uint16_t *w) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w)));
}

// Hardware prefetchers stop at 4 KiB pages, and a weight row is about that long or shorter, so each row would
// restart the stream. Prefetching this far ahead keeps the next rows in flight. Measured with two processes
// streaming at once (as TP=2 does), 1 and 8 rows: 8 KiB made one-row bfloat16 1.3-1.5x faster than no prefetch
// and was the best of 1-32 KiB at 8 rows; one-row float32 was unchanged. The prefetch goes to L2, not L1: at 4-8
// rows the activation rows (32-45 KiB of float32) live in L1, and weights prefetched there evicted them. Measured
// (same setup, huge pages): bfloat16 at 8 rows 11.3-11.7 GB/s against 8.6-10.3 into L1, at 4 rows +12%, float32
// at 8 rows +3-5%, one row unchanged.
constexpr int kPrefetchBytes = 8192;

// y[b, n] = sum_k x[b, k] W[n, k] for weight rows [n0, n1): R weight rows at a time against B activation rows
// (float32, contiguous, K floats each), so every weight element is loaded once and used B times.
// Hot (past 8 rows, where tiles of 8 take turns on a block of weights): each x vector is loaded once into a register
// for its R FMAs instead of once per FMA (folded into it), which bounded the tiles by their loads. At 8 rows or
// fewer, one pass straight from memory, the folded form measured faster (TP=2 decode).
// Rows of 4 KiB or more (float32 from K = 1024, bfloat16 from K = 2048) streamed from memory at 1-8 activation
// rows: each weight line is prefetched twice, kPrefetchBytes and twice that ahead. One prefetch 16-32 KiB ahead did
// not help (single runs); the pair did. `benchmarks/float_gemv.py` (two processes timed together, weights in huge
// pages; G multiply-adds/s of both), before -> after, three alternating rounds: bfloat16 at 8 rows, K = 2048
// 103-122 -> 124-163, K = 4096 66-74 -> 93-96; at 4 rows, K = 2048 57-71 -> 61-108; float32 at 4 rows, K = 2048
// 30-46 -> 31-55, at 8 rows 54-73 -> 66-78; one row, and float32 at K = 1024, the same within noise (bfloat16 rows
// under 4 KiB lost up to 5% with it in an earlier comparison, so they keep one). TP=2 decode of the 1.1B Llama in
// bfloat16 (K = 2048): batch 8 80-87 -> 102-107 tokens/s. Not for the prefetch of the next block (tiles past 8
// rows), which is far ahead already.
inline bool far_prefetch(int64_t pf, int64_t row_bytes) { return pf <= kPrefetchBytes * 8 && row_bytes >= 4096; }

template <int B, int R, bool Hot = false>
void gemv_rows(const float *x, const float *W, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1,
               int64_t pf = kPrefetchBytes) {
  const int64_t k_full = K & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - k_full)) - 1u);
  // Two rows at a time (4-8 activation rows): prefetch at least the next pair's rows, not the pair's own second row
  // (8 KiB is one float32 row at K = 2048). TP=2 bench, the 1.1B model in float32, batch 8: 34-41 -> 41-64 tok/s;
  // four rows at a time (1-3 activation rows) showed no clear gain either way, so they keep 8 KiB.
  const int64_t pair = R * K * int64_t(sizeof(float));
  if (R == 2 && pf < pair) pf = pair;
  const bool far = far_prefetch(pf, K * int64_t(sizeof(float)));
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][B];
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    const float *w = W + n * K;
    for (int64_t k = 0; k < k_full; k += 16) {
      __m512 wv[R];
      for (int r = 0; r < R; r++) {
        wv[r] = load16(w + r * K + k);
        _mm_prefetch(reinterpret_cast<const char *>(w + r * K + k) + pf, _MM_HINT_T1);
        if (far) _mm_prefetch(reinterpret_cast<const char *>(w + r * K + k) + 2 * pf, _MM_HINT_T1);
      }
      for (int b = 0; b < B; b++) {
        __m512 xv = _mm512_loadu_ps(x + b * K + k);
        if constexpr (Hot) __asm__("" : "+v"(xv));  // one load for R FMAs, not one folded into each
        for (int r = 0; r < R; r++) acc[r][b] = _mm512_fmadd_ps(wv[r], xv, acc[r][b]);
      }
    }
    if (tail) {
      for (int r = 0; r < R; r++) {
        __m512 wv = load16(w + r * K + k_full, tail);
        for (int b = 0; b < B; b++)
          acc[r][b] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + b * K + k_full), acc[r][b]);
      }
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) y[b * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
  }
  if (n < n1) gemv_rows<B, 1, Hot>(x, W, y, N, K, n, n1, pf);
}

// bfloat16 weights, even/odd form: a 64-byte load holds 32 weights; shifting each 32-bit lane left by 16 gives the
// even-indexed ones as float32, masking off the low half gives the odd ones. No lane shuffle, one load and two
// cheap ops per 32 weights, and 2 FMAs against x stored with each 32-block split into its 16 even then 16 odd
// elements (see prepare_x). Measured on one core against widening 16 at a time (vpmovzxwd + shift): 4%
// faster at 1 row, about 25% at 8 rows, where the shuffle port is shared with the FMAs.
//
// Pairs (CPUs with AVX512-BF16): x is bfloat16 in its natural layout instead, and one VDPBF16PS adds both products of
// each pair (k, k+1) of weight and activation into a float32 lane (the products are exact in float32; the
// instruction rounds to nearest even and treats denormals as zero): half the arithmetic instructions of the two
// FMAs, measured on one core at 8-64 rows in docs/performance.md. Either way x rows are padded with zeros to whole
// 32-blocks (prepare_x).
template <int B, int R, bool Pairs>
void gemv_rows_bf16(const void *x, const uint16_t *W, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1,
                    int64_t pf = kPrefetchBytes) {
  const int64_t KP = (K + 31) & ~int64_t(31);
  const int64_t k_full = K & ~int64_t(31);
  const bool far = far_prefetch(pf, K * 2);
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k_full)) - 1ull);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const float *xs = static_cast<const float *>(x);
  const uint16_t *xb = static_cast<const uint16_t *>(x);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][B];
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) acc[r][b] = _mm512_setzero_ps();
    const uint16_t *w = W + n * K;
    auto step = [&](int64_t k, auto masked) __attribute__((always_inline)) {
      __m512i v[R];
      for (int r = 0; r < R; r++) {
        if constexpr (masked) {
          v[r] = _mm512_maskz_loadu_epi16(tail, w + r * K + k);
        } else {
          v[r] = _mm512_loadu_si512(w + r * K + k);
          _mm_prefetch(reinterpret_cast<const char *>(w + r * K + k) + pf, _MM_HINT_T1);
          if (far) _mm_prefetch(reinterpret_cast<const char *>(w + r * K + k) + 2 * pf, _MM_HINT_T1);
        }
      }
      if constexpr (Pairs) {
#ifdef __AVX512BF16__
        for (int b = 0; b < B; b++) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + b * KP + k);
          for (int r = 0; r < R; r++) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)v[r], xv);
        }
#endif
      } else {
        __m512 we[R], wo[R];
        for (int r = 0; r < R; r++) {
          we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v[r], 16));
          wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v[r], odd));
        }
        for (int b = 0; b < B; b++) {
          const __m512 xe = _mm512_loadu_ps(xs + b * KP + k), xo = _mm512_loadu_ps(xs + b * KP + k + 16);
          for (int r = 0; r < R; r++) acc[r][b] = _mm512_fmadd_ps(wo[r], xo, _mm512_fmadd_ps(we[r], xe, acc[r][b]));
        }
      }
    };
    for (int64_t k = 0; k < k_full; k += 32) step(k, std::false_type{});
    if (tail) step(k_full, std::true_type{});
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) y[b * N + n + r] = _mm512_reduce_add_ps(acc[r][b]);
  }
  if (n < n1) gemv_rows_bf16<B, 1, Pairs>(x, W, y, N, K, n, n1, pf);
}

void gemv_dispatch(int B, const float *x, const float *W, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1,
                   int64_t pf, bool hot) {
  // R x B accumulators must fit the 32 vector registers with room for the loads.
  switch (B) {
    case 1: gemv_rows<1, 4>(x, W, y, N, K, n0, n1, pf); break;
    case 2: gemv_rows<2, 4>(x, W, y, N, K, n0, n1, pf); break;
    case 3: gemv_rows<3, 4>(x, W, y, N, K, n0, n1, pf); break;
    case 4: gemv_rows<4, 2>(x, W, y, N, K, n0, n1, pf); break;
    case 5: gemv_rows<5, 2>(x, W, y, N, K, n0, n1, pf); break;
    case 6: gemv_rows<6, 2>(x, W, y, N, K, n0, n1, pf); break;
    case 7: gemv_rows<7, 2>(x, W, y, N, K, n0, n1, pf); break;
    case 8:  // hot: three weight rows a step, 24 accumulators, 11 loads per 24 FMAs
      if (hot)
        gemv_rows<8, 3, true>(x, W, y, N, K, n0, n1, pf);
      else
        gemv_rows<8, 2>(x, W, y, N, K, n0, n1, pf);
      break;
  }
}

// Past kMaxRows activation rows: the broadcast form. x is transposed into groups of 16 rows (prepare_x: vector k
// of group g holds x[16 g + i, k] for i < 16, zero past the last row), and each weight element is broadcast once
// into a vector and multiplied into the V groups' vectors, for R weight rows at a time: R x V accumulators, each the
// 16 rows' sums for one output, so no horizontal sums, and per k only V vector loads and R scalar broadcasts for
// R x V FMAs. The dot-product form (gemv_rows) reduces 24 accumulators every row pass and loads x from L2 once per
// 24 FMAs at 8 rows a tile, which kept it at 80-84% of the FMA peak.
// Pairs: bfloat16 weights against bfloat16 activations (kBF16Pairs), K even, the same by pairs: 32-bit lane i of
// vector p of group g holds x[16 g + i, 2p] and x[16 g + i, 2p + 1], each weight pair is broadcast to all lanes, and
// one VDPBF16PS adds both products of the pair into each row's float32 sum. Either way a step reads 32-bit words.
// Each weight row is read once for all the rows, in order: the next tile's rows (R rows on) are prefetched into L2
// while this one computes.
typedef uint32_t word_t __attribute__((may_alias, aligned(4)));

template <bool Pairs, int V, int R>
void gemv_bcast(const void *x_t, const void *W, float *y, int64_t N, int64_t K, int B, int64_t n0, int64_t n1) {
  const int64_t S = Pairs ? K / 2 : K, pf = R * S;  // words per weight row
  const word_t *xt = static_cast<const word_t *>(x_t), *weights = static_cast<const word_t *>(W);
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][V];
#pragma GCC unroll 24
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
      for (int v = 0; v < V; v++) acc[r][v] = _mm512_setzero_ps();
    const word_t *w = weights + n * S;
    auto step = [&](int64_t s) __attribute__((always_inline)) {
      if constexpr (Pairs) {
#ifdef __AVX512BF16__
        __m512bh xv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; v++) xv[v] = (__m512bh)_mm512_load_si512(xt + (v * S + s) * 16);
#pragma GCC unroll 24
        for (int r = 0; r < R; r++) {
          if constexpr (V == 1) {
            // The pair broadcast by the instruction itself ({1to16}, which GCC 12 does not fold from set1 as it does
            // for float32): one instruction a pair instead of two, 16 rows 174-192 -> 189-200 G multiply-adds/s of
            // both cores (`float_gemv.py --dtypes bfloat16 --rows 16`); at 2-4 groups, where one broadcast feeds
            // several instructions, the same or slower.
            asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc[r][0]) : "v"(xv[0]), "m"(w[r * S + s]));
          } else {
            const __m512bh wb = (__m512bh)_mm512_set1_epi32(static_cast<int>(w[r * S + s]));
#pragma GCC unroll 4
            for (int v = 0; v < V; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wb, xv[v]);
          }
        }
#endif
      } else {  // float32 loads and broadcasts, which the compiler folds into the FMAs
        const float *xf = reinterpret_cast<const float *>(xt), *wf = reinterpret_cast<const float *>(w);
        __m512 xv[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; v++) xv[v] = _mm512_load_ps(xf + (v * S + s) * 16);
#pragma GCC unroll 24
        for (int r = 0; r < R; r++) {
          const __m512 wb = _mm512_set1_ps(wf[r * S + s]);
#pragma GCC unroll 4
          for (int v = 0; v < V; v++) acc[r][v] = _mm512_fmadd_ps(wb, xv[v], acc[r][v]);
        }
      }
    };
    int64_t s = 0;
    for (; s + 16 <= S; s += 16) {
#pragma GCC unroll 24
      for (int r = 0; r < R; r++) _mm_prefetch(reinterpret_cast<const char *>(w + r * S + s + pf), _MM_HINT_T1);
#pragma GCC unroll 16
      for (int i = 0; i < 16; i++) step(s + i);
    }
    for (; s < S; s++) step(s);
    alignas(64) float sums[R * V * 16];
    for (int r = 0; r < R; r++)
      for (int v = 0; v < V; v++) _mm512_store_ps(sums + (r * V + v) * 16, acc[r][v]);
    for (int b = 0; b < B; b++)
      for (int r = 0; r < R; r++) y[b * N + n + r] = sums[(r * V + b / 16) * 16 + b % 16];
  }
  if constexpr (R > 4) {
    if (n < n1) gemv_bcast<Pairs, V, 4>(x_t, W, y, N, K, B, n, n1);
  } else if constexpr (R > 1) {
    if (n < n1) gemv_bcast<Pairs, V, 1>(x_t, W, y, N, K, B, n, n1);
  }
}

// Weight rows per broadcast tile, by 16-row groups (V): 8, 6, 8, 6. Measured (`benchmarks/float_gemv.py`, K = 1024
// and 2048, float32): 16 rows 77 with 12 weight rows, 103-106 with 8; 32 rows 94 with 12 (without the unroll
// pragmas), 106-108 with 6. Past 6-8 weight rows their pointers no longer fit the general registers and every
// broadcast reloads one.
constexpr int bcast_tile(int V) { return V == 1 ? 8 : V == 2 ? 6 : V == 3 ? 8 : 6; }

// The rows of a pass of B (> kMaxRows) the broadcast groups take: whole groups of 16, and a last part group when it
// has 12 rows or more in float32 (a quarter of its FMAs wasted on zeros at most), 14 in bfloat16 pairs (whose
// dot-product tiles are closer to their peak: 12 rows padded to 16 measured 138-146 G multiply-adds/s against their
// 160-166). The rest go through the dot-product tiles while each block of weights is in L2.
int bcast_group_rows(int B, bool pairs) { return B % 16 >= (pairs ? 14 : 12) ? B : B / 16 * 16; }

template <bool Pairs>
void gemv_bcast_dispatch(int B, const void *xt, const void *W, float *y, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  switch ((B + 15) / 16) {
    case 1: gemv_bcast<Pairs, 1, bcast_tile(1)>(xt, W, y, N, K, B, n0, n1); break;
    case 2: gemv_bcast<Pairs, 2, bcast_tile(2)>(xt, W, y, N, K, B, n0, n1); break;
    case 3: gemv_bcast<Pairs, 3, bcast_tile(3)>(xt, W, y, N, K, B, n0, n1); break;
    case 4: gemv_bcast<Pairs, 4, bcast_tile(4)>(xt, W, y, N, K, B, n0, n1); break;
  }
}

// x in the form prepare_x gives for kBF16 (split) or kBF16Pairs (Pairs). The pairs kernel's accumulators are fed by
// one instruction each per 32 weights, so it takes more weight rows per pass at 4 and 8 rows.
template <bool Pairs>
void gemv_dispatch_bf16(int B, const void *x, const uint16_t *W, float *y, int64_t N, int64_t K, int64_t n0,
                        int64_t n1, int64_t pf) {
  switch (B) {
    case 1: gemv_rows_bf16<1, 4, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 2: gemv_rows_bf16<2, 4, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 3: gemv_rows_bf16<3, 4, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 4: gemv_rows_bf16<4, Pairs ? 4 : 2, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 5: gemv_rows_bf16<5, 2, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 6: gemv_rows_bf16<6, 2, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 7: gemv_rows_bf16<7, 2, Pairs>(x, W, y, N, K, n0, n1, pf); break;
    case 8: gemv_rows_bf16<8, Pairs ? 2 : 1, Pairs>(x, W, y, N, K, n0, n1, pf); break;
  }
}

#ifdef __AVX512BF16__
constexpr bool kHavePairs = true;
#else
constexpr bool kHavePairs = false;
#endif

// The kernel a weight dtype runs against these activations: bfloat16 pairs (VDPBF16PS) where both are bfloat16
// and the CPU has the instruction, unless TPINFER_NO_BF16_DOT is set (to compare the two paths).
int weight_kind(int x_dtype, int w_dtype) {
  static const bool pairs = kHavePairs && getenv("TPINFER_NO_BF16_DOT") == nullptr;
  return pairs && x_dtype == kBF16 && w_dtype == kBF16 ? kBF16Pairs : w_dtype;
}

// The kernel one pass of B rows runs: float32 weights, and bfloat16 pairs of an even K, past kMaxRows rows take
// the broadcast form (TPINFER_NO_BCAST set: the dot-product tiles, to compare the two).
int pass_kind(int kind, int B, int64_t K) {
  static const bool bcast = getenv("TPINFER_NO_BCAST") == nullptr;
  if (!bcast || B <= kMaxRows) return kind;
  return kind == kF32 ? kF32Bcast : kind == kBF16Pairs && K % 2 == 0 ? kBF16PairsBcast : kind;
}

// Blocks of weight rows handed to one thread at a time: large enough to amortise the scheduling, small
// enough to balance two to a few dozen threads.
constexpr int64_t kRowBlock = 64;

// A per-thread float32 buffer of at least n elements, 64-byte aligned; `which` picks one of ten (0, 1: GEMV
// outputs; 2: a quantized kernel's per-thread scales; 3: prepare_x; 4: group sums of x; 5: int8-rounded
// activations; 6: bfloat16 activations permuted for the wide int4 kernel; 7: encoder attention's transposed keys;
// 8: a row of the fused sum + LayerNorm; 9: the AMX GEMM's split activations).
float *scratch(int64_t n, int which) {
  static thread_local float *buffers[10] = {};
  static thread_local int64_t capacity[10] = {};
  if (capacity[which] < n) {
    free(buffers[which]);
    buffers[which] = static_cast<float *>(aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
    capacity[which] = n;
  }
  return buffers[which];
}

// The GEMV's input: B activation rows of K elements (float32 or bfloat16) as float32, in the layout the weight
// dtype's kernel reads. float32 weights: the rows as they are (no copy when x is float32). bfloat16 weights: each
// row padded with zeros to whole 32-blocks, each block stored as its 16 even-indexed then its 16 odd-indexed
// elements (gemv_rows_bf16). Vectorised: for bfloat16 x the split is the same shift and mask as the weights'.
const float *prepare_x(const void *x, int x_dtype, int w_dtype, int B, int64_t K) {
  if (w_dtype == kBF16PairsBcast) {  // the group rows transposed by pairs; the rest as kBF16Pairs lays them out
    const int Bg = bcast_group_rows(B, true), G = (Bg + 15) / 16;
    const int64_t P = K / 2, KP = (K + 31) & ~int64_t(31);
    uint16_t *out = reinterpret_cast<uint16_t *>(scratch((G * K * 16 + (B - Bg) * KP + 1) / 2, 3));
    uint32_t *pairs = reinterpret_cast<uint32_t *>(out);
    if (Bg % 16) memset(out + (G - 1) * K * 16, 0, K * 16 * 2);
    for (int b = 0; b < B; b++) {
      const uint16_t *src = static_cast<const uint16_t *>(x) + b * K;
      if (b < Bg) {
        uint32_t *dst = pairs + (b / 16) * P * 16 + b % 16;
        for (int64_t p = 0; p < P; p++) memcpy(dst + p * 16, src + 2 * p, 4);
      } else {
        uint16_t *dst = out + G * K * 16 + (b - Bg) * KP;
        memcpy(dst, src, K * 2);
        memset(dst + K, 0, (KP - K) * 2);
      }
    }
    return reinterpret_cast<const float *>(out);
  }
  if (w_dtype == kF32Bcast) {  // the group rows transposed, zeros past the last (gemv_bcast); the rest as they are
    const int Bg = bcast_group_rows(B, false), G = (Bg + 15) / 16;
    float *out = scratch(G * K * 16 + (B - Bg) * K, 3);
    if (Bg % 16) memset(out + (G - 1) * K * 16, 0, K * 16 * sizeof(float));
    for (int b = 0; b < B; b++) {
      float *dst = b < Bg ? out + (b / 16) * K * 16 + b % 16 : out + G * K * 16 + (b - Bg) * K;
      const int64_t step = b < Bg ? 16 : 1;
      if (x_dtype == kF32) {
        const float *src = static_cast<const float *>(x) + b * K;
        for (int64_t k = 0; k < K; k++) dst[k * step] = src[k];
      } else {
        const uint16_t *src = static_cast<const uint16_t *>(x) + b * K;
        for (int64_t k = 0; k < K; k++) dst[k * step] = bf16_to_f32(src[k]);
      }
    }
    return out;
  }
  if (w_dtype == kBF16Pairs) {  // bfloat16 rows as they are, padded with zeros to whole 32-blocks when K is not
    if (K % 32 == 0) return static_cast<const float *>(x);
    const int64_t KP = (K + 31) & ~int64_t(31);
    uint16_t *out = reinterpret_cast<uint16_t *>(scratch((B * KP + 1) / 2, 3));
    for (int b = 0; b < B; b++) {
      memcpy(out + b * KP, static_cast<const uint16_t *>(x) + b * K, K * 2);
      memset(out + b * KP + K, 0, (KP - K) * 2);
    }
    return reinterpret_cast<const float *>(out);
  }
  if (w_dtype == kF32) {
    if (x_dtype == kF32) return static_cast<const float *>(x);
    float *out = scratch(B * K, 3);
    const uint16_t *h = static_cast<const uint16_t *>(x);
    int64_t i = 0;
    for (; i + 16 <= B * K; i += 16) _mm512_storeu_ps(out + i, load16(h + i));
    for (; i < B * K; i++) out[i] = bf16_to_f32(h[i]);
    return out;
  }
  const int64_t KP = (K + 31) & ~int64_t(31);
  float *out = scratch(B * KP, 3);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i even_index = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_index = _mm512_add_epi32(even_index, _mm512_set1_epi32(1));
  for (int b = 0; b < B; b++) {
    float *dst = out + b * KP;
    for (int64_t k = 0; k < K; k += 32) {
      const int64_t left = K - k < 32 ? K - k : 32;
      if (x_dtype == kBF16) {
        const __mmask32 m = static_cast<__mmask32>(left == 32 ? ~0ull : (1ull << left) - 1ull);
        const __m512i v = _mm512_maskz_loadu_epi16(m, static_cast<const uint16_t *>(x) + b * K + k);
        _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        _mm512_storeu_ps(dst + k + 16, _mm512_castsi512_ps(_mm512_and_si512(v, odd)));
      } else {
        const float *src = static_cast<const float *>(x) + b * K + k;
        const __mmask16 m0 = static_cast<__mmask16>(left >= 16 ? 0xffffu : (1u << left) - 1u);
        const __mmask16 m1 = static_cast<__mmask16>(left >= 32 ? 0xffffu : left <= 16 ? 0u : (1u << (left - 16)) - 1u);
        const __m512 lo = _mm512_maskz_loadu_ps(m0, src), hi = _mm512_maskz_loadu_ps(m1, src + 16);
        _mm512_storeu_ps(dst + k, _mm512_permutex2var_ps(lo, even_index, hi));
        _mm512_storeu_ps(dst + k + 16, _mm512_permutex2var_ps(lo, odd_index, hi));
      }
    }
  }
  return out;
}


// out[B, N] (float32) = x[B, K] W[N, K]^T for B <= kMaxPassRows, x from prepare_x, blocks of W's rows split over
// threads. Past kMaxRows rows, the rows go in tiles of kMaxRows over each block of weight rows in turn; the block
// is sized to stay in L2 (256 KiB) between the tiles, so the weight is read from memory once per call.
void gemv_f32_out(const float *x, const void *W, int w_dtype, float *out, int B, int64_t N, int64_t K, int threads) {
  if (w_dtype == kF32Bcast || w_dtype == kBF16PairsBcast) {
    // Blocks of whole tiles that stay in L2 while the rows past the groups (if any) take their turn on them.
    const bool pairs = w_dtype == kBF16PairsBcast;
    const int Bg = bcast_group_rows(B, pairs), G = (Bg + 15) / 16;
    const int64_t es = pairs ? 2 : 4, stride = pairs ? (K + 31) & ~int64_t(31) : K;  // the rest rows' stride
    const int64_t R = G ? bcast_tile(G) : 1, fit = (int64_t(256) << 10) / (K * es);
    const int64_t limit = fit < kRowBlock ? fit : kRowBlock, rows = limit > R ? limit / R * R : R;
    const int64_t blocks = (N + rows - 1) / rows;
    const char *rest = reinterpret_cast<const char *>(x) + G * K * 16 * es;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
    for (int64_t blk = 0; blk < blocks; blk++) {
      const int64_t n0 = blk * rows, n1 = n0 + rows < N ? n0 + rows : N;
      if (Bg && pairs)
        gemv_bcast_dispatch<true>(Bg, x, W, out, N, K, n0, n1);
      else if (Bg)
        gemv_bcast_dispatch<false>(Bg, x, W, out, N, K, n0, n1);
      for (int b0 = Bg; b0 < B; b0 += kMaxRows) {
        const int tile = B - b0 < kMaxRows ? B - b0 : kMaxRows;
        const int64_t pf = Bg ? (n1 - n0) * K * es : kPrefetchBytes;
        const char *xr = rest + (b0 - Bg) * stride * es;
        if (pairs)
          gemv_dispatch_bf16<true>(tile, xr, static_cast<const uint16_t *>(W), out + b0 * N, N, K, n0, n1, pf);
        else
          gemv_dispatch(tile, reinterpret_cast<const float *>(xr), static_cast<const float *>(W), out + b0 * N, N, K,
                        n0, n1, pf, true);
      }
    }
    return;
  }
  const int64_t es = w_dtype == kF32 ? 4 : 2, stride = w_dtype == kF32 ? K : (K + 31) & ~int64_t(31);
  const uint16_t *xb = reinterpret_cast<const uint16_t *>(x);  // kBF16Pairs: x is bfloat16
  int64_t rows_per_block = kRowBlock;
  if (B > kMaxRows) {
    rows_per_block = (int64_t(256) << 10) / (K * es);
    rows_per_block = rows_per_block < 8 ? 8 : rows_per_block > kRowBlock ? kRowBlock : rows_per_block;
  }
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
  for (int64_t blk = 0; blk < blocks; blk++) {
    const int64_t n0 = blk * rows_per_block, n1 = n0 + rows_per_block < N ? n0 + rows_per_block : N;
    for (int b0 = 0; b0 < B; b0 += kMaxRows) {
      const int tile = B - b0 < kMaxRows ? B - b0 : kMaxRows;
      // The first tile streams the block from memory, prefetching its own rows ahead; the later tiles read it from
      // L2 and prefetch the next block instead, so the memory keeps streaming while they compute.
      const int64_t pf = b0 == 0 ? kPrefetchBytes : (n1 - n0) * stride * es;
      if (w_dtype == kF32)
        gemv_dispatch(tile, x + b0 * stride, static_cast<const float *>(W), out + b0 * N, N, K, n0, n1, pf,
                      B > kMaxRows);
      else if (w_dtype == kBF16Pairs)
        gemv_dispatch_bf16<true>(tile, xb + b0 * stride, static_cast<const uint16_t *>(W), out + b0 * N, N, K, n0, n1,
                                 pf);
      else
        gemv_dispatch_bf16<false>(tile, x + b0 * stride, static_cast<const uint16_t *>(W), out + b0 * N, N, K, n0, n1,
                                  pf);
    }
  }
}

// 16 float32 values rounded to bfloat16 (nearest even, NaN stays NaN), as f32_to_bf16.
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// y[row0 + b, :] = out[b, :] (+ bias) in y's dtype, for B rows of N.
void store_rows(const float *out, const void *bias, int bias_dtype, void *y, int y_dtype, int64_t row0, int B, int64_t N) {
  for (int b = 0; b < B; b++) {
    const float *o = out + b * N;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      __m512 v = _mm512_loadu_ps(o + n);
      if (bias)
        v = _mm512_add_ps(v, bias_dtype == kF32 ? load16(static_cast<const float *>(bias) + n)
                                                : load16(static_cast<const uint16_t *>(bias) + n));
      if (y_dtype == kF32)
        _mm512_storeu_ps(static_cast<float *>(y) + (row0 + b) * N + n, v);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(static_cast<uint16_t *>(y) + (row0 + b) * N + n), to_bf16(v));
    }
    for (; n < N; n++) store1(y, y_dtype, (row0 + b) * N + n, o[n] + (bias ? load1(bias, bias_dtype, n) : 0.0f));
  }
}

// One pass of up to kMaxPassRows rows: y[row0 : row0 + B] = x W^T (+ bias), x from prepare_x.
void project(const float *xf, const void *W, int w_dtype, const void *bias, int bias_dtype, void *y, int y_dtype,
             int64_t row0, int B, int64_t N, int64_t K, int threads) {
  if (y_dtype == kF32 && !bias) {
    gemv_f32_out(xf, W, w_dtype, static_cast<float *>(y) + row0 * N, B, N, K, threads);
    return;
  }
  float *out = scratch(B * N, 0);
  gemv_f32_out(xf, W, w_dtype, out, B, N, K, threads);
  store_rows(out, bias, bias_dtype, y, y_dtype, row0, B, N);
}

inline float silu(float g) { return g / (1.0f + expf(-g)); }

// e^x for 16 floats (Cephes' expf: range reduction by ln 2 in two parts, degree-6 polynomial, 2^n by vscalefps),
// within 2 ulp of expf; large |x| gives inf or 0, NaN stays NaN.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));  // NaN passes through
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu16(__m512 g) {
  return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// v rounded to bfloat16 and widened back: what a bfloat16 tensor between two ops holds.
inline __m512 round_bf16(__m512 v) { return widen_bf16(to_bf16(v)); }

inline __m512 load16_any(const void *p, int dtype, int64_t i) {
  return dtype == kF32 ? load16(static_cast<const float *>(p) + i) : load16(static_cast<const uint16_t *>(p) + i);
}

inline void store16_any(void *p, int dtype, int64_t i, __m512 v) {
  if (dtype == kF32)
    _mm512_storeu_ps(static_cast<float *>(p) + i, v);
  else
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(static_cast<uint16_t *>(p) + i), to_bf16(v));
}

// y[r0 + b] = silu(g + bg) * (u + bu) in y's dtype; for bfloat16 y each projection is rounded to bfloat16 before
// the product, as the unfused ops do.
void gated_epilogue(const float *g, const float *u, const void *bg, const void *bu, int bias_dtype, void *y,
                    int y_dtype, int64_t r0, int B, int64_t N) {
  for (int b = 0; b < B; b++) {
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {  // the scalar loop below, 16 at a time
      __m512 gv = _mm512_loadu_ps(g + b * N + n), uv = _mm512_loadu_ps(u + b * N + n);
      if (bg) gv = _mm512_add_ps(gv, load16_any(bg, bias_dtype, n));
      if (bu) uv = _mm512_add_ps(uv, load16_any(bu, bias_dtype, n));
      if (y_dtype == kBF16) {
        gv = round_bf16(silu16(round_bf16(gv)));
        store16_any(y, y_dtype, (r0 + b) * N + n, _mm512_mul_ps(gv, round_bf16(uv)));
      } else {
        store16_any(y, y_dtype, (r0 + b) * N + n, _mm512_mul_ps(silu16(gv), uv));
      }
    }
    for (; n < N; n++) {
      float gv = g[b * N + n], uv = u[b * N + n];
      if (bg) gv += load1(bg, bias_dtype, n);
      if (bu) uv += load1(bu, bias_dtype, n);
      if (y_dtype == kBF16) {
        gv = bf16_to_f32(f32_to_bf16(gv));
        uv = bf16_to_f32(f32_to_bf16(uv));
        gv = bf16_to_f32(f32_to_bf16(silu(gv)));
        store1(y, y_dtype, (r0 + b) * N + n, gv * uv);
      } else {
        store1(y, y_dtype, (r0 + b) * N + n, silu(gv) * uv);
      }
    }
  }
}

// The four sums of a0..a3's lanes as one vector (lane i: ai's sum): one reduction for four keys' scores instead of
// four _mm512_reduce_add_ps (14 instructions against 32).
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  // a0 a1 a0 a1 / lane
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));  // a0 a1 a2 a3 / lane
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// G query rows (heads sharing one KV head: GQA) against n cached positions of that KV head (head_dim 16 * NV,
// activations bfloat16 when BF): each key and value row is loaded and widened once for the G heads. Scores with q
// in registers, four keys a pass (reduce4), the softmax's exponentials 16 at a time (exp16), and the weighted sum of
// values in registers, divided by each head's total once at the end. qf: G x D (scaled q, float32); scores: G x n;
// out: G x D float32.
template <int NV, bool BF, int G>
void attend_rows(const float *qf, const void *k_cache, const void *v_cache, int64_t head, int64_t n, float *scores,
                 float *out) {
  constexpr int64_t D = 16 * NV;
  auto load = [](const void *p, int64_t i) __attribute__((always_inline)) {
    return BF ? load16(static_cast<const uint16_t *>(p) + i) : _mm512_loadu_ps(static_cast<const float *>(p) + i);
  };
  __m512 qv[G][NV];
  for (int g = 0; g < G; g++)
    for (int v = 0; v < NV; v++) qv[g][v] = _mm512_loadu_ps(qf + g * D + 16 * v);
  auto dots = [&](int64_t j, __m512 *a) __attribute__((always_inline)) {  // key j against the G heads' q
    const int64_t row = head + j * D;
    __m512 kv[NV];
    for (int v = 0; v < NV; v++) kv[v] = load(k_cache, row + 16 * v);
    for (int g = 0; g < G; g++) {
      a[g] = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int v = 1; v < NV; v++) a[g] = _mm512_fmadd_ps(qv[g][v], kv[v], a[g]);
    }
  };
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {  // four keys at a time: independent chains, one reduction per head
    __m512 a[4][G];
    for (int t = 0; t < 4; t++) dots(j + t, a[t]);
    for (int g = 0; g < G; g++) _mm_storeu_ps(scores + g * n + j, reduce4(a[0][g], a[1][g], a[2][g], a[3][g]));
  }
  for (; j < n; j++) {
    __m512 a[G];
    dots(j, a);
    for (int g = 0; g < G; g++) scores[g * n + j] = _mm512_reduce_add_ps(a[g]);
  }
  float total[G];
  for (int g = 0; g < G; g++) {
    float *sc = scores + g * n;
    float top = -INFINITY;
    for (j = 0; j < n; j++) top = sc[j] > top ? sc[j] : top;
    const __m512 tv = _mm512_set1_ps(top);
    __m512 tot = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), tv));
      _mm512_storeu_ps(sc + j, e);
      tot = _mm512_add_ps(tot, e);
    }
    if (j < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - j)) - 1u);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + j), tv));
      _mm512_mask_storeu_ps(sc + j, m, e);
      tot = _mm512_mask_add_ps(tot, m, tot, e);
    }
    total[g] = _mm512_reduce_add_ps(tot);
  }
  __m512 acc[G][NV];
  for (int g = 0; g < G; g++)
    for (int v = 0; v < NV; v++) acc[g][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i++) {
    const int64_t row = head + i * D;
    __m512 vv[NV];
    for (int v = 0; v < NV; v++) vv[v] = load(v_cache, row + 16 * v);
    for (int g = 0; g < G; g++) {
      const __m512 pv = _mm512_set1_ps(scores[g * n + i]);
      for (int v = 0; v < NV; v++) acc[g][v] = _mm512_fmadd_ps(pv, vv[v], acc[g][v]);
    }
  }
  for (int g = 0; g < G; g++) {
    const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
    for (int v = 0; v < NV; v++) _mm512_storeu_ps(out + g * D + 16 * v, _mm512_mul_ps(acc[g][v], inv));
  }
}

}  // namespace

#include "cpu_quant.inc"  // quantized GEMVs: qlinear_n, qlinear, qgated (namespace) and tpi_qlinear

extern "C" {

int tpi_abi_version() { return 10; }

// y[rows, N] = x[rows, K] W[N, K]^T (+ bias[N]); any rows (passes of up to kMaxPassRows); dtypes 0/1 per operand.
void tpi_linear(const void *x, int x_dtype, const void *W, int w_dtype, const void *bias, int bias_dtype, void *y,
                int y_dtype, int64_t rows, int64_t N, int64_t K, int threads) {
  w_dtype = weight_kind(x_dtype, w_dtype);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxPassRows) {
    const int B = static_cast<int>(rows - r0 < kMaxPassRows ? rows - r0 : kMaxPassRows);
    const int kind = pass_kind(w_dtype, B, K);
    const float *xf = prepare_x(static_cast<const char *>(x) + r0 * K * (x_dtype == kF32 ? 4 : 2), x_dtype, kind, B, K);
    project(xf, W, kind, bias, bias_dtype, y, y_dtype, r0, B, N, K, threads);
  }
}

// Three projections of the same x: attention's q, k and v (used by tpi_layer_attention).
void tpi_linear3(const void *x, int x_dtype, const void *W0, const void *W1, const void *W2, int w_dtype,
                 const void *b0, const void *b1, const void *b2, int bias_dtype, void *y0, void *y1, void *y2,
                 int y_dtype, int64_t rows, int64_t N0, int64_t N1, int64_t N2, int64_t K, int threads) {
  w_dtype = weight_kind(x_dtype, w_dtype);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxPassRows) {
    const int B = static_cast<int>(rows - r0 < kMaxPassRows ? rows - r0 : kMaxPassRows);
    const int kind = pass_kind(w_dtype, B, K);
    const float *xf = prepare_x(static_cast<const char *>(x) + r0 * K * (x_dtype == kF32 ? 4 : 2), x_dtype, kind, B, K);
    project(xf, W0, kind, b0, bias_dtype, y0, y_dtype, r0, B, N0, K, threads);
    project(xf, W1, kind, b1, bias_dtype, y1, y_dtype, r0, B, N1, K, threads);
    project(xf, W2, kind, b2, bias_dtype, y2, y_dtype, r0, B, N2, K, threads);
  }
}

// y[rows, N] = silu(x Wg^T + bg) * (x Wu^T + bu): the gated MLP's two projections and its activation in one
// call. When y is bfloat16 each projection is rounded to bfloat16 before the product, as the unfused ops do.
void tpi_gated_linear(const void *x, int x_dtype, const void *Wg, const void *Wu, int w_dtype, const void *bg,
                      const void *bu, int bias_dtype, void *y, int y_dtype, int64_t rows, int64_t N, int64_t K,
                      int threads) {
  w_dtype = weight_kind(x_dtype, w_dtype);
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxPassRows) {
    const int B = static_cast<int>(rows - r0 < kMaxPassRows ? rows - r0 : kMaxPassRows);
    const int kind = pass_kind(w_dtype, B, K);
    const float *xf = prepare_x(static_cast<const char *>(x) + r0 * K * (x_dtype == kF32 ? 4 : 2), x_dtype, kind, B, K);
    float *g = scratch(B * N, 0), *u = scratch(B * N, 1);
    gemv_f32_out(xf, Wg, kind, g, B, N, K, threads);
    gemv_f32_out(xf, Wu, kind, u, B, N, K, threads);
    gated_epilogue(g, u, bg, bu, bias_dtype, y, y_dtype, r0, B, N);
  }
}

// One new token per sequence: rotary embedding of q and k at each row's position, k and v written into the KV
// cache at [slot, head, position], then softmax(q K^T / sqrt(D)) V over the cache positions 0..position.
//   q: [B, Hq, D], k/v: [B, Hkv, D] (dtype act), modified in place (q, k rotated)
//   cos/sin: [max_len, D] float32 (HF rotate-half layout: the two halves share a frequency)
//   k_cache/v_cache: [S, Hkv, L, D] (dtype act); slots/positions: [B] int64; out: [B, Hq, D] (dtype act)
// For bfloat16 activations the rotated q and k are rounded to bfloat16 (what the unfused ops store), the
// attention itself runs in float32 and its output is rounded once.
void tpi_decode_attention(void *q, void *k, const void *v, int act_dtype, const float *cos_table,
                          const float *sin_table, void *k_cache, void *v_cache, const int64_t *slots,
                          const int64_t *positions, void *out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t L, float scale, int threads) {
  const int64_t half = D / 2;
  const int64_t group = Hq / Hkv;
  const int64_t es = act_dtype == kF32 ? 4 : 2;
  // Rotate q and k, append k and v to the cache: tiny, done by the calling thread.
  for (int64_t b = 0; b < B; b++) {
    const int64_t pos = positions[b], slot = slots[b];
    const float *c = cos_table + pos * D, *s = sin_table + pos * D;
    for (int64_t h = 0; h < Hq + Hkv; h++) {
      void *base = h < Hq ? q : k;
      const int64_t row = h < Hq ? (b * Hq + h) * D : (b * Hkv + h - Hq) * D;
      for (int64_t i = 0; i < half; i++) {
        const float x1 = load1(base, act_dtype, row + i), x2 = load1(base, act_dtype, row + i + half);
        store1(base, act_dtype, row + i, x1 * c[i] - x2 * s[i]);
        store1(base, act_dtype, row + i + half, x2 * c[i + half] + x1 * s[i + half]);
      }
    }
    for (int64_t h = 0; h < Hkv; h++) {
      const int64_t dst = ((slot * Hkv + h) * L + pos) * D * es;
      memcpy(static_cast<char *>(k_cache) + dst, static_cast<const char *>(k) + (b * Hkv + h) * D * es, D * es);
      memcpy(static_cast<char *>(v_cache) + dst, static_cast<const char *>(v) + (b * Hkv + h) * D * es, D * es);
    }
  }
  int64_t longest = 0;
  for (int64_t b = 0; b < B; b++) longest = positions[b] + 1 > longest ? positions[b] + 1 : longest;
  // The common head sizes (64, 128) in registers throughout (attend_rows), two query heads of a KV head at a time
  // where the group is even (each key and value row widened once for both).
  if (D == 64 || D == 128) {
    const int G = group % 2 == 0 ? 2 : 1;
    const bool bf = act_dtype == kBF16;
    auto *const attend = D == 64 ? (G == 2 ? (bf ? attend_rows<4, true, 2> : attend_rows<4, false, 2>)
                                           : (bf ? attend_rows<4, true, 1> : attend_rows<4, false, 1>))
                                 : (G == 2 ? (bf ? attend_rows<8, true, 2> : attend_rows<8, false, 2>)
                                           : (bf ? attend_rows<8, true, 1> : attend_rows<8, false, 1>));
    const int64_t units = B * (Hq / G);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && units * G * longest * D > 65536)
    for (int64_t u = 0; u < units; u++) {
      const int64_t b = u / (Hq / G), h = u % (Hq / G) * G, hk = h / group;
      const int64_t n = positions[b] + 1;
      const int64_t head = (slots[b] * Hkv + hk) * L * D;
      float *scores = scratch(G * (n + D), 0);
      float *acc = scores + G * n;
      alignas(64) float qf[2 * 128];
      const __m512 sv = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < G * D; i += 16)
        _mm512_store_ps(qf + i, _mm512_mul_ps(load16_any(q, act_dtype, (b * Hq + h) * D + i), sv));
      attend(qf, k_cache, v_cache, head, n, scores, acc);
      for (int64_t i = 0; i < G * D; i += 16) store16_any(out, act_dtype, (b * Hq + h) * D + i, _mm512_loadu_ps(acc + i));
    }
    return;
  }
  const int64_t pairs = B * Hq;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && pairs * longest * D > 65536)
  for (int64_t p = 0; p < pairs; p++) {
    const int64_t b = p / Hq, h = p % Hq, hk = h / group;
    const int64_t n = positions[b] + 1;
    const int64_t head = (slots[b] * Hkv + hk) * L * D;
    float *scores = scratch(n + D, 0);
    float *acc = scores + n;
    float qf[512];
    for (int64_t i = 0; i < D; i++) qf[i] = load1(q, act_dtype, (b * Hq + h) * D + i) * scale;
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
      float dot = 0.0f;
      if (act_dtype == kF32) {
        const float *kr = static_cast<const float *>(k_cache) + head + j * D;
        __m512 a = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + i), _mm512_loadu_ps(kr + i), a);
        dot = _mm512_reduce_add_ps(a);
        for (; i < D; i++) dot += qf[i] * kr[i];
      } else {
        const uint16_t *kr = static_cast<const uint16_t *>(k_cache) + head + j * D;
        __m512 a = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= D; i += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + i), load16(kr + i), a);
        dot = _mm512_reduce_add_ps(a);
        for (; i < D; i++) dot += qf[i] * bf16_to_f32(kr[i]);
      }
      scores[j] = dot;
      top = dot > top ? dot : top;
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) total += (scores[j] = expf(scores[j] - top));
    for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
      const float pj = scores[j] / total;
      const int64_t row = head + j * D;
      int64_t i = 0;
      const __m512 pv = _mm512_set1_ps(pj);
      if (act_dtype == kF32) {
        const float *vr = static_cast<const float *>(v_cache) + row;
        for (; i + 16 <= D; i += 16)
          _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(vr + i), _mm512_loadu_ps(acc + i)));
        for (; i < D; i++) acc[i] += pj * vr[i];
      } else {
        const uint16_t *vr = static_cast<const uint16_t *>(v_cache) + row;
        for (; i + 16 <= D; i += 16)
          _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, load16(vr + i), _mm512_loadu_ps(acc + i)));
        for (; i < D; i++) acc[i] += pj * bf16_to_f32(vr[i]);
      }
    }
    for (int64_t i = 0; i < D; i++) store1(out, act_dtype, (b * Hq + h) * D + i, acc[i]);
  }
}

// RMSNorm with the residual add folded in, for `rows` vectors of `n`:
//   sum = x + delta (rounded to the activation dtype; skipped when delta is null, then sum = x)
//   out = w * (sum * rsqrt(mean(sum^2) + eps))
// As HF's LlamaRMSNorm: statistics in float32; for bfloat16 the normalised value is rounded before the weight
// multiplies it. `sum` may alias `x`.
void tpi_add_rms_norm(const void *x, const void *delta, const void *w, void *sum, void *out, int act_dtype,
                      int64_t rows, int64_t n, float eps) {
  float *s = scratch(n, 0);
  for (int64_t r = 0; r < rows; r++) {
    __m512d sq0 = _mm512_setzero_pd(), sq1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {  // the scalar loop below, 16 at a time
      __m512 v = load16_any(x, act_dtype, r * n + i);
      if (delta) {
        v = _mm512_add_ps(v, load16_any(delta, act_dtype, r * n + i));
        if (act_dtype == kBF16) v = round_bf16(v);
        store16_any(sum, act_dtype, r * n + i, v);
      }
      _mm512_storeu_ps(s + i, v);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
      const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      sq0 = _mm512_fmadd_pd(lo, lo, sq0);
      sq1 = _mm512_fmadd_pd(hi, hi, sq1);
    }
    double squares = _mm512_reduce_add_pd(_mm512_add_pd(sq0, sq1));
    for (; i < n; i++) {
      float v = load1(x, act_dtype, r * n + i);
      if (delta) {
        v += load1(delta, act_dtype, r * n + i);
        if (act_dtype == kBF16) v = bf16_to_f32(f32_to_bf16(v));
        store1(sum, act_dtype, r * n + i, v);
      }
      s[i] = v;
      squares += static_cast<double>(v) * v;
    }
    const float inv = 1.0f / sqrtf(static_cast<float>(squares / n) + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= n; i += 16) {
      __m512 v = _mm512_mul_ps(_mm512_loadu_ps(s + i), vinv);
      if (act_dtype == kBF16) v = round_bf16(v);
      store16_any(out, act_dtype, r * n + i, _mm512_mul_ps(v, load16_any(w, act_dtype, i)));
    }
    for (; i < n; i++) {
      float v = s[i] * inv;
      if (act_dtype == kBF16) v = bf16_to_f32(f32_to_bf16(v));
      store1(out, act_dtype, r * n + i, v * load1(w, act_dtype, i));
    }
  }
}

// One decoder layer's two halves for one new token per row, so that a decode step costs two calls per layer
// instead of one per op. The layer's weights, norms and KV cache are described once (DecodeLayer, filled from
// Python); the residual stream x is updated in place with the previous half's output, and each half returns its
// row-parallel partial product (before the all-reduce, which Python runs between the halves). The ops and their
// rounding are exactly the per-op functions above.
struct DecodeLayer {
  const void *norm1, *norm2;                // [hidden], activation dtype
  const void *wq, *wk, *wv, *wo;            // this rank's slices, weight dtype
  const void *wg, *wu, *wd;
  const void *bq, *bk, *bv, *bg, *bu;       // column biases or null (row-parallel biases follow the all-reduce)
  void *k_cache, *v_cache;                  // [slots, kv_heads, max_len, head_dim], activation dtype
  const void *bo, *bd;                      // o/down biases or null, added after the all-reduce (tpi_decode_stack)
  int64_t hidden, heads, kv_heads, head_dim, ffn, max_len;
  float eps1, eps2, scale;
  int32_t w_dtype, act_dtype;
  int32_t reduce_o, reduce_d;               // o/down row-parallel: all-reduce their outputs (tpi_decode_stack)
  // Quantized projections (q_kind >= 0: 0 int8, 1 int4, 2 fp8, 3/4 int8/int4 with int8 activations; the w* pointers then hold the quantized values):
  const void *sq, *sk, *sv, *so, *sg, *su, *sd;  // scales
  const void *oq, *ok, *ov, *oo, *og, *ou, *od;  // offsets, or null when symmetric
  int64_t q_group;                               // inputs per scale; 0: one per output channel
  int32_t q_kind, q_per_tensor;                  // q_kind -1: float weights of w_dtype
  // Mixture of experts (n_experts > 0): the MLP half is a router and the rows' top_k experts (see layer_moe),
  // float weights only; wg/wu/wd/ffn then hold the shared expert's slices (Qwen2-MoE), used when ws_gate is set.
  const void *w_router;                // [n_experts, hidden], replicated
  const void *const *experts;          // [n_experts * 3]: this rank's gate, up, down of each; null: another rank's
  int64_t *expert_tokens;              // [n_experts]: rows routed to each expert, incremented every step
  const void *ws_gate;                 // [1, hidden]: the shared expert's gate, or null
  int64_t n_experts, top_k, expert_ffn;
  int32_t norm_topk, round_weights;    // renormalise the top-k weights; round them to the activation dtype (Qwen)
};

namespace {
QuantWeight quant_weight(const DecodeLayer *L, const void *w, const void *scale, const void *offset) {
  return QuantWeight{w, scale, offset, L->q_kind, L->q_group, L->q_per_tensor};
}

// Bytes of a rows x cols weight of this layer (what a prefetch of it covers).
int64_t weight_bytes(const DecodeLayer *L, int64_t rows, int64_t cols) {
  if (L->q_kind < 0) return rows * cols * (L->w_dtype == kF32 ? 4 : 2);
  return L->q_kind == kQInt4 || L->q_kind == kQInt4A8 ? rows * cols / 2 : rows * cols;
}

// Activation-sized intermediates of a layer half, reused across calls (one arena per calling thread).
char *arena(size_t bytes) {
  static thread_local std::vector<char> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}
}  // namespace

// x += delta; then the MoE MLP half, as tpinfer.models.moe.MoEBlock computes it: router logits in the activation dtype, softmax in
// float32, the top_k (renormalised when norm_topk), then for each expert some row picked, in ascending order, its
// rows gathered through this rank's slice of the expert (gated projection, down projection) and added to their
// rows' partial weighted by the routing weight (the product rounded to the activation dtype, then the sum), and
// the shared expert's partial scaled by sigmoid(x Wsg^T). Experts this rank does not hold (null) add nothing here:
// their owners' partials carry them through the all-reduce.
constexpr int kMaxTopK = 16, kMaxExperts = 256, kMaxMoeRows = 64;  // checked by tpinfer.kernels.moe_usable

static void layer_moe(const DecodeLayer *L, void *x, const void *delta, void *partial, int64_t B, int threads) {
  const int a = L->act_dtype;
  const int64_t es = a == kF32 ? 4 : 2, H = L->hidden, E = L->n_experts, k = L->top_k, F = L->expert_ffn;
  const int64_t shared_ffn = L->ws_gate ? L->ffn : 0, widest = F > shared_ffn ? F : shared_ffn;
  char *normed = arena(static_cast<size_t>(B * (3 * H + E + widest + 1) * es));
  char *logits = normed + B * H * es, *rows_x = logits + B * E * es, *y = rows_x + B * H * es, *h = y + B * H * es;
  char *gate = h + B * widest * es;
  tpi_add_rms_norm(x, delta, L->norm2, x, normed, a, B, H, L->eps2);
  tpi_linear(normed, a, L->w_router, L->w_dtype, nullptr, L->w_dtype, logits, a, B, E, H, threads);
  int64_t chosen[kMaxMoeRows][kMaxTopK];
  float weight[kMaxMoeRows][kMaxTopK];
  for (int64_t r = 0; r < B; r++) {
    float p[kMaxExperts], m = -INFINITY, sum = 0.0f;
    for (int64_t e = 0; e < E; e++) m = fmaxf(m, p[e] = load1(logits, a, r * E + e));
    for (int64_t e = 0; e < E; e++) sum += (p[e] = expf(p[e] - m));
    for (int64_t e = 0; e < E; e++) p[e] /= sum;
    float total = 0.0f;
    for (int64_t s = 0; s < k; s++) {  // the largest remaining probability; the lower index on a tie
      int64_t best = -1;
      for (int64_t e = 0; e < E; e++)
        if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
      chosen[r][s] = best;
      weight[r][s] = p[best];
      total += p[best];
      p[best] = -1.0f;
    }
    for (int64_t s = 0; s < k; s++) {
      if (L->norm_topk) weight[r][s] /= total;
      if (L->round_weights && a == kBF16) weight[r][s] = bf16_to_f32(f32_to_bf16(weight[r][s]));
    }
  }
  memset(partial, 0, static_cast<size_t>(B * H * es));
  for (int64_t e = 0; e < E; e++) {
    int64_t rows[kMaxMoeRows], n = 0;
    float w[kMaxMoeRows];
    for (int64_t r = 0; r < B; r++)
      for (int64_t s = 0; s < k; s++)
        if (chosen[r][s] == e) rows[n] = r, w[n++] = weight[r][s];
    if (!n) continue;
    L->expert_tokens[e] += n;
    const void *const *ex = L->experts + 3 * e;
    if (!ex[0]) continue;  // another rank's expert
    for (int64_t i = 0; i < n; i++) memcpy(rows_x + i * H * es, static_cast<const char *>(normed) + rows[i] * H * es, H * es);
    tpi_gated_linear(rows_x, a, ex[0], ex[1], L->w_dtype, nullptr, nullptr, L->w_dtype, h, a, n, F, H, threads);
    tpi_linear(h, a, ex[2], L->w_dtype, nullptr, L->w_dtype, y, a, n, H, F, threads);
    for (int64_t i = 0; i < n; i++)
      for (int64_t j = 0; j < H; j++) {  // out += (y * w).to(dtype), in the activation dtype
        const float v = load1(y, a, i * H + j) * w[i];
        const float rounded = a == kF32 ? v : bf16_to_f32(f32_to_bf16(v));
        store1(partial, a, rows[i] * H + j, load1(partial, a, rows[i] * H + j) + rounded);
      }
  }
  if (!shared_ffn) return;
  tpi_linear(normed, a, L->ws_gate, L->w_dtype, nullptr, L->w_dtype, gate, a, B, 1, H, threads);
  tpi_gated_linear(normed, a, L->wg, L->wu, L->w_dtype, nullptr, nullptr, L->w_dtype, h, a, B, shared_ffn, H, threads);
  tpi_linear(h, a, L->wd, L->w_dtype, nullptr, L->w_dtype, y, a, B, H, shared_ffn, threads);
  auto to_act = [a](float v) { return a == kF32 ? v : bf16_to_f32(f32_to_bf16(v)); };
  for (int64_t r = 0; r < B; r++) {
    const float g = to_act(1.0f / (1.0f + expf(-load1(gate, a, r))));
    for (int64_t j = 0; j < H; j++)
      store1(partial, a, r * H + j, load1(partial, a, r * H + j) + to_act(g * load1(y, a, r * H + j)));
  }
}

int64_t tpi_decode_layer_size() { return sizeof(DecodeLayer); }

// Ask for [p, p + bytes) in L2 without waiting for it: what a rank does while it waits at an all-reduce, so the
// next GEMV starts on cached weights instead of leaving this core's memory bandwidth idle.
void tpi_prefetch(const void *p, int64_t bytes) {
  const char *c = static_cast<const char *>(p);
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
}

// x += delta (when given); partial = attention(RMSNorm(x)) Wo^T for this rank's heads.
void tpi_layer_attention(const DecodeLayer *L, void *x, const void *delta, void *partial, const float *cos_table,
                         const float *sin_table, const int64_t *slots, const int64_t *positions, int64_t B,
                         int threads) {
  const int64_t es = L->act_dtype == kF32 ? 4 : 2;
  const int64_t q_rows = L->heads * L->head_dim, kv_rows = L->kv_heads * L->head_dim;
  char *base = arena(static_cast<size_t>(B * (L->hidden + 2 * q_rows + 2 * kv_rows) * es));
  char *normed = base, *q = normed + B * L->hidden * es, *k = q + B * q_rows * es, *v = k + B * kv_rows * es;
  char *attn = v + B * kv_rows * es;
  tpi_add_rms_norm(x, delta, L->norm1, x, normed, L->act_dtype, B, L->hidden, L->eps1);
  if (L->q_kind >= 0) {  // biases are in the activation dtype
    const int a = L->act_dtype;
    const QuantWeight w[3] = {quant_weight(L, L->wq, L->sq, L->oq), quant_weight(L, L->wk, L->sk, L->ok),
                              quant_weight(L, L->wv, L->sv, L->ov)};
    const void *const bias[3] = {L->bq, L->bk, L->bv};
    void *const out[3] = {q, k, v};
    const int64_t rows_out[3] = {q_rows, kv_rows, kv_rows};
    qlinear_n(normed, a, 3, w, bias, a, out, a, B, rows_out, L->hidden, threads);  // normed prepared once
  } else {
    tpi_linear3(normed, L->act_dtype, L->wq, L->wk, L->wv, L->w_dtype, L->bq, L->bk, L->bv, L->w_dtype, q, k, v,
                L->act_dtype, B, q_rows, kv_rows, kv_rows, L->hidden, threads);
  }
  tpi_decode_attention(q, k, v, L->act_dtype, cos_table, sin_table, L->k_cache, L->v_cache, slots, positions, attn, B,
                       L->heads, L->kv_heads, L->head_dim, L->max_len, L->scale, threads);
  if (L->q_kind >= 0)
    qlinear(attn, L->act_dtype, quant_weight(L, L->wo, L->so, L->oo), nullptr, L->act_dtype, partial, L->act_dtype, B,
            L->hidden, q_rows, threads);
  else
    tpi_linear(attn, L->act_dtype, L->wo, L->w_dtype, nullptr, L->w_dtype, partial, L->act_dtype, B, L->hidden,
               q_rows, threads);
}

// x += delta; partial = (silu(RMSNorm(x) Wg^T) * RMSNorm(x) Wu^T) Wd^T for this rank's FFN slice.
void tpi_layer_mlp(const DecodeLayer *L, void *x, const void *delta, void *partial, int64_t B, int threads) {
  const int64_t es = L->act_dtype == kF32 ? 4 : 2;
  char *normed = arena(static_cast<size_t>(B * (L->hidden + L->ffn) * es));
  char *h = normed + B * L->hidden * es;
  if (L->n_experts) return layer_moe(L, x, delta, partial, B, threads);
  tpi_add_rms_norm(x, delta, L->norm2, x, normed, L->act_dtype, B, L->hidden, L->eps2);
  if (L->q_kind >= 0) {
    const int a = L->act_dtype;
    qgated(normed, a, quant_weight(L, L->wg, L->sg, L->og), quant_weight(L, L->wu, L->su, L->ou), L->bg, L->bu, a, h,
           a, B, L->ffn, L->hidden, threads);
    qlinear(h, a, quant_weight(L, L->wd, L->sd, L->od), nullptr, a, partial, a, B, L->hidden, L->ffn, threads);
    return;
  }
  tpi_gated_linear(normed, L->act_dtype, L->wg, L->wu, L->w_dtype, L->bg, L->bu, L->w_dtype, h, L->act_dtype, B,
                   L->ffn, L->hidden, threads);
  tpi_linear(h, L->act_dtype, L->wd, L->w_dtype, nullptr, L->w_dtype, partial, L->act_dtype, B, L->hidden, L->ffn,
             threads);
}


// The shared-memory all-reduce of tpinfer.parallel.shm.ShmAllReduce, as native code sees it. The protocol is the
// Python one (see shm.py): round k copies this rank's tensor into slot k % 2, publishes counters[rank * stride] = k,
// waits until every counter >= k, then sums the slots in rank order (bfloat16 in float32, rounded once), so
// every rank computes the same bytes and the two paths are interchangeable round by round.
struct ShmGroup {
  int64_t *counters;          // rank r's round counter at counters[r * stride]
  char *data;                 // 2 slots x world x slot_bytes
  int64_t slot_bytes;
  int64_t round;              // the last round this rank entered
  int64_t calls, bytes, wait_ns;  // statistics, accumulated
  double spin_s;              // poll this long before yielding the core (short when ranks outnumber cores)
  double yield_s;             // then sched_yield until this long has passed, then return "pending" to Python
  int32_t world, rank, stride, pad;
};

namespace {

inline double now_s() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// While a rank waits for its peers: prefetch into L2, 32 KiB per poll and 1 MiB in all, the weights it reads
// next (the start of the next GEMVs), so the wait leaves the next step less to fetch.
struct WaitPrefetch {
  const char *start[3] = {nullptr, nullptr, nullptr};
  int64_t size[3] = {0, 0, 0};
  int index = 0;
  int64_t offset = 0, budget = 1 << 20;
  void add(const void *p, int64_t bytes) {
    for (int i = 0; i < 3; i++)
      if (!start[i]) {
        start[i] = static_cast<const char *>(p);
        size[i] = bytes;
        return;
      }
  }
  bool step() {
    while (index < 3 && (!start[index] || offset >= size[index])) index++, offset = 0;
    if (index >= 3 || budget <= 0) return false;
    int64_t chunk = size[index] - offset < (32 << 10) ? size[index] - offset : (32 << 10);
    tpi_prefetch(start[index] + offset, chunk);
    offset += chunk;
    budget -= chunk;
    return true;
  }
};

// t[rows, n] += bias[n], rounded to t's dtype (as torch's y + bias).
void add_bias(void *t, int dtype, const void *bias, int bias_dtype, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < n; i++) store1(t, dtype, r * n + i, load1(t, dtype, r * n + i) + load1(bias, bias_dtype, i));
}

// Sum of every rank's slot, in rank order, into t.
void sum_slots(const ShmGroup *g, const char *slots, void *t, int dtype, int64_t numel) {
  const int64_t W = g->world;
  int64_t i = 0;
  if (dtype == kF32) {
    float *out = static_cast<float *>(t);
    for (; i + 16 <= numel; i += 16) {
      __m512 v = _mm512_loadu_ps(reinterpret_cast<const float *>(slots) + i);
      for (int64_t r = 1; r < W; r++)
        v = _mm512_add_ps(v, _mm512_loadu_ps(reinterpret_cast<const float *>(slots + r * g->slot_bytes) + i));
      _mm512_storeu_ps(out + i, v);
    }
    for (; i < numel; i++) {
      float v = reinterpret_cast<const float *>(slots)[i];
      for (int64_t r = 1; r < W; r++) v += reinterpret_cast<const float *>(slots + r * g->slot_bytes)[i];
      out[i] = v;
    }
  } else {
    uint16_t *out = static_cast<uint16_t *>(t);
    for (; i + 16 <= numel; i += 16) {
      __m512 v = load16(reinterpret_cast<const uint16_t *>(slots) + i);
      for (int64_t r = 1; r < W; r++)
        v = _mm512_add_ps(v, load16(reinterpret_cast<const uint16_t *>(slots + r * g->slot_bytes) + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + i), to_bf16(v));
    }
    for (; i < numel; i++) {
      float v = bf16_to_f32(reinterpret_cast<const uint16_t *>(slots)[i]);
      for (int64_t r = 1; r < W; r++) v += bf16_to_f32(reinterpret_cast<const uint16_t *>(slots + r * g->slot_bytes)[i]);
      out[i] = f32_to_bf16(v);
    }
  }
}

// One round of the all-reduce on t (numel elements). 0: t holds the sum. 1: a peer had not arrived after
// g->yield_s; this rank's data is published and g->round is the open round, for Python to finish (it sleeps,
// times out and handles signals; native code never waits long).
int exchange(ShmGroup *g, void *t, int dtype, int64_t numel, WaitPrefetch *prefetch) {
  const double start = now_s();
  const int64_t nbytes = numel * (dtype == kF32 ? 4 : 2);
  const int64_t round = ++g->round;
  char *slots = g->data + (round & 1) * g->world * g->slot_bytes;
  memcpy(slots + g->rank * g->slot_bytes, t, nbytes);
  __atomic_store_n(g->counters + g->rank * g->stride, round, __ATOMIC_RELEASE);
  g->calls++;
  g->bytes += nbytes;
  int status = 0;
  for (int32_t r = 0; r < g->world && !status; r++) {
    if (r == g->rank) continue;
    const int64_t *counter = g->counters + r * g->stride;
    while (__atomic_load_n(counter, __ATOMIC_ACQUIRE) < round) {
      if (prefetch && prefetch->step()) continue;
      const double waited = now_s() - start;
      if (waited < g->spin_s) {
        _mm_pause();
      } else if (waited < g->yield_s) {
        sched_yield();
      } else {
        status = 1;
        break;
      }
    }
  }
  if (!status) sum_slots(g, slots, t, dtype, numel);
  g->wait_ns += static_cast<int64_t>((now_s() - start) * 1e9);
  return status;
}

}  // namespace

int64_t tpi_shm_group_size() { return sizeof(ShmGroup); }

// Decoder layers' halves first_half .. 2 * n_layers - 1 for one new token per row (half 2l: layer l's attention,
// 2l + 1: its MLP), each followed by its all-reduce (when the layer's reduce flag is set and group is given)
// and its row-parallel bias: the decode step's whole stack in one call.
//   x: the residual stream [B, hidden], updated in place; half h writes its output (the next half's delta)
//   to buffers[h % 2]; half 0 starts without a delta. After the last half, x + buffers[1] is the stream.
// Returns -1 when every half ran, or h when half h's all-reduce is still open (see exchange): the caller
// finishes that round, adds the bias of half h and calls again with first_half = h + 1.
int64_t tpi_decode_stack(const DecodeLayer *layers, int64_t n_layers, int64_t first_half, void *x, void *buffer0,
                         void *buffer1, const float *cos_table, const float *sin_table, const int64_t *slots,
                         const int64_t *positions, int64_t B, int threads, ShmGroup *group, const void *tail,
                         int64_t tail_bytes) {
  void *buffers[2] = {buffer0, buffer1};
  for (int64_t h = first_half; h < 2 * n_layers; h++) {
    const DecodeLayer *L = layers + h / 2;
    void *delta = h == 0 ? nullptr : buffers[(h - 1) & 1];
    void *out = buffers[h & 1];
    WaitPrefetch next;
    if (h % 2 == 0) {
      tpi_layer_attention(L, x, delta, out, cos_table, sin_table, slots, positions, B, threads);
      if (L->n_experts) {  // the router; the experts are known only once it has run
        next.add(L->w_router, weight_bytes(L, L->n_experts, L->hidden));
      } else {
        next.add(L->wg, weight_bytes(L, L->ffn, L->hidden));
        next.add(L->wu, weight_bytes(L, L->ffn, L->hidden));
      }
    } else {
      tpi_layer_mlp(L, x, delta, out, B, threads);
      if (h / 2 + 1 < n_layers) {
        const DecodeLayer *N = L + 1;
        next.add(N->wq, weight_bytes(N, N->heads * N->head_dim, N->hidden));
        next.add(N->wk, weight_bytes(N, N->kv_heads * N->head_dim, N->hidden));
        next.add(N->wv, weight_bytes(N, N->kv_heads * N->head_dim, N->hidden));
      } else if (tail) {
        next.add(tail, tail_bytes);
      }
    }
    const bool reduce = (h % 2 == 0 ? L->reduce_o : L->reduce_d) && group && group->world > 1;
    if (reduce && exchange(group, out, L->act_dtype, B * L->hidden, &next)) return h;
    const void *bias = h % 2 == 0 ? L->bo : L->bd;
    if (bias) add_bias(out, L->act_dtype, bias, L->q_kind >= 0 ? L->act_dtype : L->w_dtype, B, L->hidden);
  }
  return -1;
}

}  // extern "C"


// Encoder kernels (tpinfer.kernels.encoder_adapter): a bidirectional encoder's forward over whole sequences, where
// the GEMMs are large (oneDNN runs them) and what remains is attention over short sequences and the sum of the
// ranks' partial outputs followed by LayerNorm, which torch runs as several passes over memory.

namespace {

// e^x for x <= 0 (softmax arguments after subtracting the row's maximum): 2^n e^r with n = round(x / ln 2) and
// r = x - n ln 2 in [-ln2/2, ln2/2], e^r by its degree-6 Taylor polynomial (relative error under 3e-7). Arguments
// below -87 (e^x under 1.6e-38, against the row maximum's e^0 = 1) give exactly 0, as -inf does.
inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: exact n * hi
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// erf(u) for u = k/4 + (r + 1/2)/4 in [k/4, (k+1)/4), k = 0..15: row j holds each quarter's coefficient of r^j, r in
// [-1/2, 1/2). Degree-5 Chebyshev fits of erf on each quarter, in the power basis (float64 fits; in float32 Horner
// evaluation the largest error over [0, 4) is 6e-8); past 4, erf is 1 within 1.6e-8.
alignas(64) const float kErfQuarters[6][16] = {
    {0.140316203f, 0.404116899f, 0.623240888f, 0.784075081f, 0.888388216f, 0.948170066f,
     0.978443742f, 0.99199003f, 0.997345984f, 0.999217033f, 0.999794602f, 0.999952137f,
     0.999990106f, 0.999998212f, 0.999999702f, 0.99999994f},
    {0.277721316f, 0.245088205f, 0.190874889f, 0.131186262f, 0.0795684904f, 0.0425899439f,
     0.0201180633f, 0.00838645641f, 0.00308520487f, 0.0010016195f, 0.000286968861f, 7.25571226e-05f,
     1.61896987e-05f, 3.18794605e-06f, 5.53983398e-07f, 8.49564472e-08f},
    {-0.0086785974f, -0.0229765903f, -0.0298238471f, -0.0286969058f, -0.0223787706f, -0.0146404831f,
     -0.00817308761f, -0.00393118756f, -0.00163899991f, -0.000594684912f, -0.000188303951f, -5.21405636e-05f,
     -1.26442683e-05f, -2.68855024e-06f, -5.01700356e-07f, -8.22219448e-08f},
    {-0.0056049726f, -0.00366992224f, -0.000869918673f, 0.00145186938f, 0.00253828568f, 0.00246778131f,
     0.00179440528f, 0.00105378346f, 0.000516215747f, 0.000214539206f, 7.64106517e-05f, 2.34753606e-05f,
     6.24941595e-06f, 1.44626517e-06f, 2.91671029e-07f, 5.13554781e-08f},
    {0.000266319897f, 0.000646143919f, 0.000685519131f, 0.000438096031f, 0.000110684254f, -0.000117119525f,
     -0.000192894484f, -0.00016469913f, -0.000103136568f, -5.15859574e-05f, -2.13553994e-05f, -7.45531406e-06f,
     -2.21965388e-06f, -5.6775707e-07f, -1.25407993e-07f, -2.40102764e-08f},
    {0.000101101105f, 4.42637174e-05f, -2.6401156e-05f, -6.51453447e-05f, -5.96298923e-05f, -2.99257244e-05f,
     -2.24938503e-06f, 1.10624296e-05f, 1.21525154e-05f, 8.16462943e-06f, 4.13713587e-06f, 1.6872242e-06f,
     5.70573434e-07f, 1.62677523e-07f, 3.95119315e-08f, 8.23300983e-09f},
};

// GELU with erf, x Phi(x) = 0.5 x (1 + erf(x / sqrt 2)) = 0.5 x + 0.5 |x| erf(|x| / sqrt 2), erf from the table
// above (each lane's quarter picked by a permute): within 1e-7 max(1, |x|) of the exact GELU.
inline __m512 gelu_erf(__m512 x) {
  const __m512 half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  const __m512 abs_half = _mm512_abs_ps(half);
  // 4 |x| / sqrt 2, clamped to 16: the quarter's index and the offset r in it
  const __m512 u4 = _mm512_min_ps(_mm512_mul_ps(abs_half, _mm512_set1_ps(5.65685424949238019f)),
                                  _mm512_set1_ps(16.0f));
  const __m512 quarter = _mm512_min_ps(_mm512_roundscale_ps(u4, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                       _mm512_set1_ps(15.0f));
  const __m512i index = _mm512_cvttps_epi32(quarter);
  const __m512 r = _mm512_sub_ps(_mm512_sub_ps(u4, quarter), _mm512_set1_ps(0.5f));
  __m512 erf = _mm512_permutexvar_ps(index, _mm512_load_ps(kErfQuarters[5]));
  for (int j = 4; j >= 0; j--)
    erf = _mm512_fmadd_ps(erf, r, _mm512_permutexvar_ps(index, _mm512_load_ps(kErfQuarters[j])));
  // past the table erf is 1: GELU is exactly x, or 0 for x < -4 sqrt 2 (where it is above -4e-8)
  erf = _mm512_mask_mov_ps(erf, _mm512_cmp_ps_mask(u4, _mm512_set1_ps(16.0f), _CMP_GE_OQ), _mm512_set1_ps(1.0f));
  return _mm512_fmadd_ps(abs_half, erf, half);
}

// Query rows per register tile: 5 x 4 accumulators and the 4 key vectors fit the 32 registers (8 x 4 spilled: 15-20%
// slower at 16-100 keys in a stand-alone loop, the same at 256; 4 and 6 rows 1-10% slower than 5). Inside the engine
// at TP=2, batch 32 x 64, the same time either way: there q/k/v come from memory, just written by the GEMM.
constexpr int kAttnRows = 5;

// Scores of kAttnRows query rows against NV * 16 keys from `key` on: s[r][j] = scale * q_r . k_j + bias[j].
// kt holds K transposed (D rows of Tp keys); q[r] is row r's query vector. row_max[r] takes the max of what row r
// stores, lane by lane.
template <int NV>
inline void attn_scores(const float *const *q, const float *kt, int64_t Tp, int64_t D, int64_t key, float scale,
                        const float *bias, float *s, int64_t s_stride, __m512 *row_max) {
  __m512 acc[kAttnRows][NV];
  for (int r = 0; r < kAttnRows; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d++) {
    __m512 k[NV];
    for (int v = 0; v < NV; v++) k[v] = _mm512_loadu_ps(kt + d * Tp + key + 16 * v);
    for (int r = 0; r < kAttnRows; r++) {
      const __m512 qb = _mm512_set1_ps(q[r][d]);
      for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(qb, k[v], acc[r][v]);
    }
  }
  const __m512 vs = _mm512_set1_ps(scale);
  for (int v = 0; v < NV; v++) {
    const __m512 b = _mm512_loadu_ps(bias + key + 16 * v);
    for (int r = 0; r < kAttnRows; r++) {
      const __m512 score = _mm512_fmadd_ps(acc[r][v], vs, b);
      _mm512_storeu_ps(s + r * s_stride + key + 16 * v, score);
      row_max[r] = _mm512_max_ps(row_max[r], score);
    }
  }
}

// out_r[dim .. dim + NV * 16) = sum_j p[r][j] v_j over T keys, divided by the row's sum of p.
template <int NV>
inline void attn_values(const float *p, int64_t p_stride, const float *v, int64_t v_stride, int64_t T, int64_t dim,
                        const float *inv_sum, float *const *out) {
  __m512 acc[kAttnRows][NV];
  for (int r = 0; r < kAttnRows; r++)
    for (int i = 0; i < NV; i++) acc[r][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < T; j++) {
    __m512 vv[NV];
    for (int i = 0; i < NV; i++) vv[i] = _mm512_loadu_ps(v + j * v_stride + dim + 16 * i);
    // each weight broadcast by the FMA itself ({1to16}, which GCC does not fold from set1 when the value is used
    // twice): 3% less time for the whole attention at head_dim 32 than a broadcast register
    for (int r = 0; r < kAttnRows; r++)
      for (int i = 0; i < NV; i++)
        asm("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc[r][i]) : "v"(vv[i]), "m"(p[r * p_stride + j]));
  }
  for (int r = 0; r < kAttnRows; r++) {
    const __m512 inv = _mm512_set1_ps(inv_sum[r]);
    for (int i = 0; i < NV; i++) _mm512_storeu_ps(out[r] + dim + 16 * i, _mm512_mul_ps(acc[r][i], inv));
  }
}

// 16 rows of D floats (row stride `stride`, D a multiple of 16) into D rows of 16 (row stride `out_stride`): each
// 16 x 16 block transposed in registers (unpack, then 128-bit lane shuffles).
inline void transpose16(const float *in, int64_t stride, float *out, int64_t out_stride, int64_t D) {
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(in + i * stride + d0);
    for (int i = 0; i < 16; i += 2) {
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 4; i++) {
      t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
      t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
      t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
      t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
      r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
      r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
    }
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(out + (d0 + i) * out_stride, r[i]);
  }
}

// One (sequence, head): softmax(scale Q K^T + bias) V for its T queries. `ahead`: the q/k/v of the (sequence, head)
// to fetch into L2 meanwhile (its rows strided, which the hardware prefetcher does not fetch ahead), or null.
void encoder_head(const float *qkv, const float *key_bias, float *out, int64_t b, int64_t h, int64_t T, int64_t H,
                  int64_t D, float scale, const float *ahead) {
  const int64_t row = 3 * H * D, Tp = (T + 15) / 16 * 16;
  const float *q0 = qkv + b * T * row + h * D, *k0 = q0 + H * D, *v0 = k0 + H * D;
  float *kt = scratch(D * Tp + Tp + kAttnRows * Tp, 7), *bias = kt + D * Tp, *s = bias + Tp;
  int64_t j0 = 0;  // K transposed: whole blocks of 16 keys in registers, then the rest one by one
  for (; j0 + 16 <= T; j0 += 16) transpose16(k0 + j0 * row, row, kt + j0, Tp, D);
  for (int64_t j = j0; j < T; j++)
    for (int64_t d = 0; d < D; d++) kt[d * Tp + j] = k0[j * row + d];
  for (int64_t j = 0; j < T; j++) bias[j] = key_bias ? key_bias[b * T + j] : 0.0f;
  for (int64_t j = T; j < Tp; j++) {  // padding keys to the vector width: no weight
    for (int64_t d = 0; d < D; d++) kt[d * Tp + j] = 0.0f;
    bias[j] = -INFINITY;
  }
  for (int64_t i0 = 0; i0 < T; i0 += kAttnRows) {
    const float *q[kAttnRows];
    float *o[kAttnRows];
    if (ahead)  // a tile's worth of rows at a time (all of them at the head's start measured slower)
      for (int64_t j = i0; j < i0 + kAttnRows && j < T; j++)
        for (int64_t part = 0; part < 3; part++)
          for (int64_t d = 0; d < D; d += 16)
            _mm_prefetch(reinterpret_cast<const char *>(ahead + j * row + part * H * D + d), _MM_HINT_T1);
    for (int r = 0; r < kAttnRows; r++) {  // a last tile past T repeats row T - 1 (the same values stored again)
      const int64_t i = i0 + r < T ? i0 + r : T - 1;
      q[r] = q0 + i * row;
      o[r] = out + (b * T + i) * H * D + h * D;
    }
    __m512 row_max[kAttnRows];
    for (int r = 0; r < kAttnRows; r++) row_max[r] = _mm512_set1_ps(-INFINITY);
    int64_t key = 0;
    for (; key + 64 <= Tp; key += 64) attn_scores<4>(q, kt, Tp, D, key, scale, bias, s, Tp, row_max);
    switch ((Tp - key) / 16) {
      case 3: attn_scores<3>(q, kt, Tp, D, key, scale, bias, s, Tp, row_max); break;
      case 2: attn_scores<2>(q, kt, Tp, D, key, scale, bias, s, Tp, row_max); break;
      case 1: attn_scores<1>(q, kt, Tp, D, key, scale, bias, s, Tp, row_max); break;
      default: break;
    }
    // the softmax of the tile's rows side by side (each row's max taken as its scores were stored): independent
    // chains for the out-of-order core, where one row after another waits on each reduction in turn
    float inv_sum[kAttnRows];
    __m512 sum[kAttnRows];
    for (int r = 0; r < kAttnRows; r++) {
      row_max[r] = _mm512_set1_ps(_mm512_reduce_max_ps(row_max[r]));
      sum[r] = _mm512_setzero_ps();
    }
    for (int64_t j = 0; j < Tp; j += 16)
      for (int r = 0; r < kAttnRows; r++) {
        float *sr = s + r * Tp + j;
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sr), row_max[r]));
        _mm512_storeu_ps(sr, e);
        sum[r] = _mm512_add_ps(sum[r], e);
      }
    for (int r = 0; r < kAttnRows; r++) inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum[r]);
    int64_t dim = 0;
    for (; dim + 64 <= D; dim += 64) attn_values<4>(s, Tp, v0, row, T, dim, inv_sum, o);
    switch ((D - dim) / 16) {
      case 3: attn_values<3>(s, Tp, v0, row, T, dim, inv_sum, o); break;
      case 2: attn_values<2>(s, Tp, v0, row, T, dim, inv_sum, o); break;
      case 1: attn_values<1>(s, Tp, v0, row, T, dim, inv_sum, o); break;
      default: break;
    }
  }
}

}  // namespace

extern "C" {

// Bidirectional attention of whole sequences, float32. qkv (B, T, 3, H, D): the fused q/k/v projection's output
// as it comes (each token's q heads, then k, then v); key_bias (B, T) added to every score of a key (0 for a real
// token, -inf for padding), or null; out (B, T, H, D). D a multiple of 16. Every query row is computed, a padded
// one too (its output is not used). Threads split the (sequence, head) pairs.
void tpi_encoder_attention(const float *qkv, const float *key_bias, float *out, int64_t B, int64_t T, int64_t H,
                           int64_t D, float scale, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && B * H > 1)
  for (int64_t task = 0; task < B * H; task++) {
    // prefetched two (sequence, head)s ahead, spread over the tiles: against one ahead all at once, 6% less time
    // with q/k/v out of cache (as after the GEMM that wrote them), the same in cache
    const int64_t later = task + 2;
    const float *ahead = later < B * H ? qkv + (later / H) * T * 3 * H * D + (later % H) * D : nullptr;
    encoder_head(qkv, key_bias, out, task / H, task % H, T, H, D, scale, ahead);
  }
}

// out = LayerNorm(residual + ((parts[0] + parts[1] + ... + parts[n - 1]) + dense_bias)) * weight + bias, float32 rows
// of `hidden`: the ranks' partial outputs of a row-parallel dense summed in rank order (the order and rounding of the
// shared-memory all-reduce, so every rank gets the same bits), its bias and the residual added as the model adds
// them (each optional: null), then normalized with the biased variance, as torch's layer_norm. The residual has
// `residual_rows` rows, repeated: row r adds residual row r % residual_rows (an encoder's position embeddings,
// the same for every sequence).
void tpi_sum_layer_norm(const float *const *parts, int n_parts, const float *dense_bias, const float *residual,
                        int64_t residual_rows, const float *weight, const float *bias, float *out, int64_t rows,
                        int64_t hidden, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && rows > 1)
  for (int64_t r = 0; r < rows; r++) {
    float *x = scratch(hidden, 8);
    const float *res = residual ? residual + (r % residual_rows) * hidden : nullptr;
    __m512 total = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 16) {
      const __mmask16 m = hidden - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (hidden - i)) - 1);
      __m512 v = _mm512_maskz_loadu_ps(m, parts[0] + r * hidden + i);
      for (int p = 1; p < n_parts; p++) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, parts[p] + r * hidden + i));
      if (dense_bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, dense_bias + i));
      if (res) v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, res + i), v);
      _mm512_storeu_ps(x + i, v);
      total = _mm512_add_ps(total, v);
    }
    const float mean = _mm512_reduce_add_ps(total) / static_cast<float>(hidden);
    const __m512 vmean = _mm512_set1_ps(mean);
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < hidden; i += 16) {
      const __mmask16 m = hidden - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (hidden - i)) - 1);
      const __m512 c = _mm512_maskz_sub_ps(m, _mm512_loadu_ps(x + i), vmean);
      squares = _mm512_fmadd_ps(c, c, squares);
    }
    const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / static_cast<float>(hidden) + eps);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t i = 0; i < hidden; i += 16) {
      const __mmask16 m = hidden - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (hidden - i)) - 1);
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vmean), vinv);
      const __m512 y = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, weight + i), _mm512_maskz_loadu_ps(m, bias + i));
      _mm512_mask_storeu_ps(out + r * hidden + i, m, y);
    }
  }
}

// x = GELU(x) in place (the erf form, gelu_erf), n float32 values; threads take blocks of 4096.
void tpi_gelu(float *x, int64_t n, int threads) {
  const int64_t blocks = (n + 4095) / 4096;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && blocks > 1)
  for (int64_t b = 0; b < blocks; b++) {
    const int64_t end = b * 4096 + 4096 < n ? b * 4096 + 4096 : n;
    int64_t i = b * 4096;
    for (; i + 16 <= end; i += 16) _mm512_storeu_ps(x + i, gelu_erf(_mm512_loadu_ps(x + i)));
    if (i < end) {
      const __mmask16 m = static_cast<__mmask16>((1u << (end - i)) - 1);
      _mm512_mask_storeu_ps(x + i, m, gelu_erf(_mm512_maskz_loadu_ps(m, x + i)));
    }
  }
}

// One rank's share of an embedding lookup: out row i = table row (ids[i] - start) for an id in [start, start +
// length), zeros for any other (a vocabulary-parallel table's rows held by other ranks; a replicated table is start
// 0 and all its rows). float32 rows of `hidden`.
void tpi_embedding_rows(const float *table, int64_t start, int64_t length, const int64_t *ids, int64_t n,
                        int64_t hidden, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
  for (int64_t i = 0; i < n; i++) {
    const int64_t row = ids[i] - start;
    if (row >= 0 && row < length)
      memcpy(out + i * hidden, table + row * hidden, hidden * sizeof(float));
    else
      memset(out + i * hidden, 0, hidden * sizeof(float));
  }
}

}  // extern "C"

#include "cpu_amx.inc"  // float32 GEMMs through AMX's bfloat16 tiles: tpi_amx_available, tpi_amx_linear
