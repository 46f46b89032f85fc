/*
 * cpu_attention.c - CPU side of CPU-GPU collaborative decode attention (HybridGen style).
 *
 * The CPU scans the part of the KV cache that lives in host (or CXL) memory. Decode attention
 * does ~1 FMA per byte of KV, so the goal is to run at memory bandwidth:
 *   - every K/V row is loaded once for all query heads of its GQA group;
 *   - one online-softmax (flash-decoding) pass over contiguous token rows;
 *   - OpenMP work items are (batch, kv head, token chunk) and chunk partials are merged
 *     exactly (split-K), so a single sequence with few KV heads still uses every core;
 *   - SIMD kernels (cpu_attention.h) are compiled for AVX-512, AVX2 and plain C and picked
 *     at run time; the GIL is released around all compute.
 * Input checking for users lives in hw_backend/cpu_attention.py; the checks here make sure a
 * direct call with inconsistent buffers, an empty batch or head set, or a thread count the
 * machine cannot run raises (or is capped) instead of reading out of bounds, dividing by zero
 * or ending the process inside the OpenMP runtime. They run while arguments are parsed,
 * before any OpenMP region.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_X86_SIMD 1
#include <immintrin.h>
#else
#define HAVE_X86_SIMD 0
#endif

#if defined(__GNUC__)
#define lowest_bit(x) __builtin_ctzll(x)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define PREFETCH(p) __builtin_prefetch((p), 0, 2)
#else
#define ALWAYS_INLINE inline
#define PREFETCH(p) ((void)(p))
static int lowest_bit(uint64_t x)
{
    int i = 0;
    while (!(x >> i & 1))
        i++;
    return i;
}
#endif

#define CAT_SFX_(a, b) a##_##b
#define CAT_SFX(a, b) CAT_SFX_(a, b)
#define STR_SFX_(x) #x
#define STR_SFX(x) STR_SFX_(x)

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SIMD_SCALAR = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2, SIMD_COUNT = 3 };

#define BT 32              /* tokens per block: a thread's K and V blocks stay in L1/L2 */
#define MIN_CHUNK 256      /* fewest tokens worth a separate work item */
#define ITEMS_PER_THREAD 8 /* work items per thread, for dynamic load balance */
#define PF_BYTES 24576     /* software prefetch distance for dense K/V scans (tuned on Zen 4) */

/* One instruction set's kernels; see cpu_attention.h for what each does. */
typedef struct {
    const char *name;
    void (*scores)(const float *q, int G, const void *k, int dtype, int nt, int64_t D,
                   float scale, float *s, int64_t s_stride, int64_t pf);
    void (*accum)(float *acc, int G, int64_t D, const float *p, int64_t p_stride,
                  const void *v, int dtype, int nt, int64_t pf);
    float (*exp_sub_sum)(float *s, int n, float m);
    float (*max_f32)(const float *s, int n);
    void (*scale_f32)(float *x, int64_t n, float a);
    uint64_t (*at_least)(const float *s, int n, float thr);
    uint64_t (*read_sum)(const uint64_t *p, int64_t n);
} kernels_t;

static inline float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0) {
        float mag = (float)man * 5.9604644775390625e-8f; /* subnormal: man * 2^-24, exact */
        return sign ? -mag : mag;
    }
    if (exp == 31)
        return bits_to_f32(sign | 0x7f800000u | (man << 13));
    return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* ------------------------------------------------------------------------------------------
 * Instruction-set variants of the kernel template.
 */
#if HAVE_X86_SIMD

#define KATTR_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define KATTR_AVX2 __attribute__((target("avx2,fma,f16c")))

/*
 * exp via 2^n * e^r with |r| <= ln2/2 and a degree-6 Taylor polynomial (~1 ulp on that
 * interval). max/min take x as the second operand, which they return when x is NaN, so
 * NaN scores stay NaN instead of being clamped to a finite value.
 */
static inline KATTR_AVX512 __m512 exp_avx512(__m512 x)
{
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606820309417e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

static inline KATTR_AVX2 __m256 exp_avx2(__m256 x)
{
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606820309417e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline KATTR_AVX2 float hsum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline KATTR_AVX2 float hmax_avx2(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * Eight horizontal sums at once: a transposing add tree costs ~3 operations per sum instead of
 * ~9 for separate reductions, which matters because scoring does one sum per 8 FMAs.
 */
static inline KATTR_AVX512 void rsum8_avx512(const __m512 a[8], float r[8])
{
    __m512 s[4], t[2];
    for (int i = 0; i < 4; i++) /* 128-bit lanes: [x0+x2, x1+x3, y0+y2, y1+y3] */
        s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
    for (int i = 0; i < 2; i++) /* lane j now sums to the total of a[4 * i + j] */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xdd));
    __m512 c = _mm512_add_ps(_mm512_unpacklo_ps(t[0], t[1]), _mm512_unpackhi_ps(t[0], t[1]));
    c = _mm512_add_ps(c, _mm512_permute_ps(c, 0x4e)); /* lane j: [a_j, a_4+j, a_j, a_4+j] */
    __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(r, _mm512_castps512_ps256(_mm512_permutexvar_ps(order, c)));
}

static inline KATTR_AVX2 void rsum8_avx2(const __m256 a[8], float r[8])
{
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 lo = _mm256_hadd_ps(s01, s23), hi = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(r, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20),
                                      _mm256_permute2f128_ps(lo, hi, 0x31)));
}

/* maskload/maskstore lane masks: 8 - n all-ones words followed by zeros, read from here. */
static const int32_t avx2_tail_masks[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                            0,  0,  0,  0,  0,  0,  0,  0};
#define AVX2_MASK(n) _mm256_loadu_si256((const __m256i *)(avx2_tail_masks + 8 - (n)))

/* AVX-512 */
#define SFX avx512
#define KATTR KATTR_AVX512
#define ACC_NV 4
#define SCORE_NT4 4
#define SPECIALIZE_D 1
#define VW 16
#define VF __m512
#define VZERO() _mm512_setzero_ps()
#define VSET1(x) _mm512_set1_ps(x)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps((p), (v))
#define VLOADN(p, n) _mm512_maskz_loadu_ps((__mmask16)((1u << (n)) - 1u), (p))
#define VSTOREN(p, v, n) _mm512_mask_storeu_ps((p), (__mmask16)((1u << (n)) - 1u), (v))
#define VADD(a, b) _mm512_add_ps((a), (b))
#define VSUB(a, b) _mm512_sub_ps((a), (b))
#define VMUL(a, b) _mm512_mul_ps((a), (b))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define VMAX(a, b) _mm512_max_ps((a), (b))
#define VRSUM(v) _mm512_reduce_add_ps(v)
#define VRSUM8(a, r) rsum8_avx512((a), (r))
#define VRMAX(v) _mm512_reduce_max_ps(v)
#define VMASK_NLT(v, t) ((uint64_t)_mm512_cmp_ps_mask((v), (t), _CMP_NLT_UQ))
#define VEXP(v) exp_avx512(v)
#define VLOAD_BF16(p)                                                                         \
    _mm512_castsi512_ps(_mm512_slli_epi32(                                                    \
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VLOAD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#include "cpu_attention.h"

/* AVX2 (16 registers: three vectors per head in accum) */
#define SFX avx2
#define KATTR KATTR_AVX2
#define ACC_NV 3
#define SCORE_NT4 3
#define SPECIALIZE_D 1
#define VW 8
#define VF __m256
#define VZERO() _mm256_setzero_ps()
#define VSET1(x) _mm256_set1_ps(x)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps((p), (v))
#define VLOADN(p, n) _mm256_maskload_ps((p), AVX2_MASK(n))
#define VSTOREN(p, v, n) _mm256_maskstore_ps((p), AVX2_MASK(n), (v))
#define VADD(a, b) _mm256_add_ps((a), (b))
#define VSUB(a, b) _mm256_sub_ps((a), (b))
#define VMUL(a, b) _mm256_mul_ps((a), (b))
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define VMAX(a, b) _mm256_max_ps((a), (b))
#define VRSUM(v) hsum_avx2(v)
#define VRSUM8(a, r) rsum8_avx2((a), (r))
#define VRMAX(v) hmax_avx2(v)
#define VMASK_NLT(v, t) ((uint64_t)_mm256_movemask_ps(_mm256_cmp_ps((v), (t), _CMP_NLT_UQ)))
#define VEXP(v) exp_avx2(v)
#define VLOAD_BF16(p)                                                                         \
    _mm256_castsi256_ps(_mm256_slli_epi32(                                                    \
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VLOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#include "cpu_attention.h"

#endif /* HAVE_X86_SIMD */

/* Plain C: one float per "vector"; portable fallback and reference for the SIMD copies. */
#define SFX scalar
#define KATTR
#define ACC_NV 4
#define SCORE_NT4 2
#define SPECIALIZE_D 0
#define VW 1
#define VF float
#define VZERO() 0.0f
#define VSET1(x) (x)
#define VLOAD(p) (*(p))
#define VSTORE(p, v) (*(p) = (v))
#define VLOADN(p, n) ((void)(n), *(p))
#define VSTOREN(p, v, n) ((void)(n), *(p) = (v))
#define VADD(a, b) ((a) + (b))
#define VSUB(a, b) ((a) - (b))
#define VMUL(a, b) ((a) * (b))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VMAX(a, b) ((b) > (a) ? (b) : (a))
#define VRSUM(v) (v)
#define VRSUM8(a, r) memcpy((r), (a), 8 * sizeof(float))
#define VRMAX(v) (v)
#define VMASK_NLT(v, t) ((uint64_t)!((v) < (t)))
#define VEXP(v) expf(v)
#define VLOAD_BF16(p) bf16_to_f32(*(p))
#define VLOAD_F16(p) f16_to_f32(*(p))
#include "cpu_attention.h"

/* ------------------------------------------------------------------------------------------
 * Run-time instruction-set choice.
 */
static const char *const simd_names[SIMD_COUNT] = {"scalar", "avx2", "avx512"};
static int simd_best = SIMD_SCALAR;
static int simd_current = SIMD_SCALAR;

static int detect_simd(void)
{
#if HAVE_X86_SIMD
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        return SIMD_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return SIMD_AVX2; /* every AVX2+FMA CPU also has F16C */
#endif
    return SIMD_SCALAR;
}

static const kernels_t *kernels_for(int level)
{
#if HAVE_X86_SIMD
    if (level == SIMD_AVX512)
        return &kernels_avx512;
    if (level == SIMD_AVX2)
        return &kernels_avx2;
#endif
    (void)level;
    return &kernels_scalar;
}

/* ------------------------------------------------------------------------------------------
 * Attention drivers (no Python objects; run with the GIL released).
 */
static size_t dtype_size(int dtype) { return dtype == DT_F32 ? 4 : 2; }

/* Threads of a call that names none: OpenMP's default (OMP_NUM_THREADS, else the CPUs). */
static int default_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* CPUs this machine has online (at least 1): the most threads a call runs with. */
static int machine_cpus(void)
{
    long n = -1;
#ifdef _SC_NPROCESSORS_ONLN
    n = sysconf(_SC_NPROCESSORS_ONLN);
#endif
#ifdef _OPENMP
    if (n < 1)
        n = omp_get_num_procs();
#endif
    return n < 1 ? 1 : n > 1 << 20 ? 1 << 20 : (int)n;
}

/* Shapes and data of one call: q (B,H,D) float32, K/V (B,KVH,T,D), G = H / KVH. */
typedef struct {
    const kernels_t *kt;
    const float *q;
    const char *K, *V;
    int kdt, vdt;
    int64_t B, H, KVH, T, D, G;
    float scale;
} attn_t;

/* The token rows of one (batch, kv head) pair. */
typedef struct {
    const char *base;
    int dtype;
    int64_t D;
} rows_t;

static rows_t head_rows(const attn_t *a, const char *data, int dtype, int64_t b, int64_t kh)
{
    rows_t r;
    r.base = data + (size_t)((b * a->KVH + kh) * a->T * a->D) * dtype_size(dtype);
    r.dtype = dtype;
    r.D = a->D;
    return r;
}

/* Per-thread buffers: gathered K and V rows (sparse attention) and the block's scores. */
typedef struct {
    char *kbuf, *vbuf;
    float *s;
} scratch_t;

static int scratch_init(scratch_t *ws, int64_t D, int64_t G)
{
    size_t rows = sizeof(float) * (size_t)(BT * D);
    char *mem = malloc(2 * rows + sizeof(float) * (size_t)(G * BT));
    ws->kbuf = mem;
    ws->vbuf = mem ? mem + rows : NULL;
    ws->s = mem ? (float *)(mem + 2 * rows) : NULL;
    return mem != NULL;
}

/*
 * Rows [first, first+nt) in their storage type, or with idx rows idx[first..] gathered into
 * buf; `end` bounds the positions. Dense rows are used in place and *pf is set so the
 * kernels prefetch ahead of them; gathered rows prefetch the row one block ahead here.
 *
 * Software prefetch (into L2) matters: the compute-heavy loops keep too few loads in flight
 * for DRAM latency on their own and the hardware prefetcher stops at pages, so without it a
 * core streams at a fraction of the bandwidth a plain read loop reaches.
 */
static int64_t prefetch_bytes = PF_BYTES;

static const void *fetch_rows(const rows_t *r, const int64_t *idx, int64_t first, int nt,
                              int64_t end, char *buf, int64_t *pf)
{
    size_t row_bytes = (size_t)r->D * dtype_size(r->dtype);
    *pf = idx ? 0 : prefetch_bytes;
    if (!idx)
        return r->base + (size_t)first * row_bytes;
    for (int i = 0; i < nt; i++) {
        if (first + i + BT < end) {
            const char *ahead = r->base + (size_t)idx[first + i + BT] * row_bytes;
            for (size_t off = 0; off < row_bytes; off += 64)
                PREFETCH(ahead + off);
        }
        memcpy(buf + i * row_bytes, r->base + (size_t)idx[first + i] * row_bytes, row_bytes);
    }
    return buf;
}

/*
 * Online softmax over positions [p0, p1) for the G heads of one KV group. Leaves the
 * unnormalised numerator acc (G x D), running max m and denominator l so chunk partials
 * can be merged exactly. NaN scores make l and acc NaN (and keep them NaN).
 */
static void attend(const kernels_t *kt, const float *q, int64_t G, int64_t D, const rows_t *K,
                   const rows_t *V, const int64_t *idx, int64_t p0, int64_t p1, float scale,
                   float *acc, float *m, float *l, scratch_t *ws)
{
    memset(acc, 0, sizeof(float) * (size_t)(G * D));
    for (int64_t g = 0; g < G; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    for (int64_t b0 = p0; b0 < p1; b0 += BT) {
        int nt = (int)(p1 - b0 < BT ? p1 - b0 : BT);
        int64_t pf;
        const void *kb = fetch_rows(K, idx, b0, nt, p1, ws->kbuf, &pf);
        kt->scores(q, (int)G, kb, K->dtype, nt, D, scale, ws->s, BT, pf);
        for (int64_t g = 0; g < G; g++) {
            float *s = ws->s + g * BT;
            float bm = kt->max_f32(s, nt);
            if (bm > m[g]) {
                float alpha = expf(m[g] - bm); /* 0 on the first block (m = -inf) */
                l[g] *= alpha;
                kt->scale_f32(acc + g * D, D, alpha);
                m[g] = bm;
            }
            l[g] += kt->exp_sub_sum(s, nt, m[g]);
        }
        const void *vb = fetch_rows(V, idx, b0, nt, p1, ws->vbuf, &pf);
        kt->accum(acc, (int)G, D, ws->s, BT, vb, V->dtype, nt, pf);
    }
}

/*
 * Merges nch partials (acc, m, l), spaced `stride` floats apart, into a normalised output
 * and its log-sum-exp. No tokens at all gives out = 0, lse = -inf; NaN propagates.
 */
static void finish_head(const float *acc0, const float *m0, const float *l0, int64_t stride,
                        int64_t nch, int64_t D, float *out, float *lse)
{
    float M = -INFINITY;
    for (int64_t c = 0; c < nch; c++)
        M = m0[c * stride] > M ? m0[c * stride] : M;
    float ref = M == -INFINITY ? 0.0f : M;
    float L = 0.0f;
    memset(out, 0, sizeof(float) * (size_t)D);
    for (int64_t c = 0; c < nch; c++) {
        float m = m0[c * stride];
        float w = m == -INFINITY ? 0.0f : expf(m - ref);
        const float *a = acc0 + c * stride;
        L += l0[c * stride] * w;
        for (int64_t d = 0; d < D; d++)
            out[d] += w * a[d];
    }
    if (L == 0.0f) {
        memset(out, 0, sizeof(float) * (size_t)D);
        *lse = -INFINITY;
        return;
    }
    float inv = 1.0f / L;
    for (int64_t d = 0; d < D; d++)
        out[d] *= inv;
    *lse = ref + logf(L);
}

/* How a token range is cut into chunks so that there are enough work items to share. */
typedef struct {
    int64_t nch, clen, items;
} split_t;

static split_t split_tokens(int64_t groups, int64_t ntok, int nthreads)
{
    split_t sp;
    if (groups < 1) /* callers reject empty batches; never divide by zero regardless */
        groups = 1;
    int64_t want = nthreads > 1 ? (ITEMS_PER_THREAD * nthreads + groups - 1) / groups : 1;
    int64_t most = (ntok + MIN_CHUNK - 1) / MIN_CHUNK;
    sp.nch = want < most ? want : most;
    if (sp.nch < 1)
        sp.nch = 1;
    sp.clen = (ntok + sp.nch - 1) / sp.nch;
    sp.clen = (sp.clen + BT - 1) / BT * BT;
    sp.nch = sp.clen > 0 ? (ntok + sp.clen - 1) / sp.clen : 1;
    sp.items = groups * sp.nch;
    return sp;
}

/* Work item `it` of a split over [start, end): its batch row, KV head and token range. */
typedef struct {
    int64_t b, kh, t0, t1;
} chunk_t;

static chunk_t chunk_at(const attn_t *a, split_t sp, int64_t it, int64_t start, int64_t end)
{
    int64_t grp = it / sp.nch, c = it % sp.nch;
    chunk_t ch = {grp / a->KVH, grp % a->KVH, start + c * sp.clen, 0};
    ch.t1 = ch.t0 + sp.clen < end ? ch.t0 + sp.clen : end;
    return ch;
}

/* out (B,H,D), lse (B,H) over tokens [start, end). Returns 0, or -1 when out of memory. */
static int run_partial(const attn_t *a, int64_t start, int64_t end, int nthreads, float *out,
                       float *lse)
{
    int64_t ntok = end - start, G = a->G, D = a->D;
    int64_t groups = a->B * a->KVH;
    if (ntok == 0) {
        memset(out, 0, sizeof(float) * (size_t)(a->B * a->H * D));
        for (int64_t i = 0; i < a->B * a->H; i++)
            lse[i] = -INFINITY;
        return 0;
    }
    split_t sp = split_tokens(groups, ntok, nthreads);
    int64_t stride = G * (D + 2);
    float *part = malloc(sizeof(float) * (size_t)(sp.items * stride));
    int failed = part == NULL;
    if (failed)
        return -1;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        scratch_t ws;
        int ok = scratch_init(&ws, D, G);
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < sp.items; it++) {
            if (!ok)
                continue;
            chunk_t ch = chunk_at(a, sp, it, start, end);
            rows_t K = head_rows(a, a->K, a->kdt, ch.b, ch.kh);
            rows_t V = head_rows(a, a->V, a->vdt, ch.b, ch.kh);
            float *acc = part + it * stride;
            attend(a->kt, a->q + (ch.b * a->H + ch.kh * G) * D, G, D, &K, &V, NULL, ch.t0, ch.t1,
                   a->scale, acc, acc + G * D, acc + G * D + G, &ws);
        }
        free(ws.kbuf);
    }
    if (!failed) {
#pragma omp parallel for num_threads(nthreads)
        for (int64_t hh = 0; hh < groups * G; hh++) {
            int64_t grp = hh / G, g = hh % G;
            const float *base = part + grp * sp.nch * stride;
            finish_head(base + g * D, base + G * D + g, base + G * D + G + g, stride, sp.nch, D,
                        out + hh * D, lse + hh);
        }
    }
    free(part);
    return failed ? -1 : 0;
}

/* scores (B,H,end-start), written in place by the score kernel. */
static int run_logits(const attn_t *a, int64_t start, int64_t end, int nthreads, float *out)
{
    int64_t ntok = end - start, G = a->G, D = a->D;
    if (ntok == 0)
        return 0;
    split_t sp = split_tokens(a->B * a->KVH, ntok, nthreads);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        scratch_t ws;
        int ok = scratch_init(&ws, D, G);
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < sp.items; it++) {
            if (!ok)
                continue;
            chunk_t ch = chunk_at(a, sp, it, start, end);
            rows_t K = head_rows(a, a->K, a->kdt, ch.b, ch.kh);
            float *dst = out + (ch.b * a->H + ch.kh * G) * ntok;
            for (int64_t b0 = ch.t0; b0 < ch.t1; b0 += BT) {
                int nt = (int)(ch.t1 - b0 < BT ? ch.t1 - b0 : BT);
                int64_t pf;
                const void *kb = fetch_rows(&K, NULL, b0, nt, ch.t1, ws.kbuf, &pf);
                a->kt->scores(a->q + (ch.b * a->H + ch.kh * G) * D, (int)G, kb, K.dtype, nt, D,
                              a->scale, dst + (b0 - start), ntok, pf);
            }
        }
        free(ws.kbuf);
    }
    return failed ? -1 : 0;
}

/* ---- top-k: candidate buffers with a rising threshold ---- */

/*
 * A candidate is one integer: a monotone uint32 key of the score in the high half (NaN above
 * +inf, like torch.topk) and the inverted token offset in the low half. A larger integer is
 * a better candidate, ties going to the earlier token, so selection and sorting compare
 * plain integers. Offsets are relative to the scanned range's start (< 2^32 tokens).
 */
static inline uint32_t order_key(float v)
{
    uint32_t u;
    if (v != v)
        return 0xffffffffu;
    memcpy(&u, &v, sizeof u);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline uint64_t cand_pack(float v, int64_t offset)
{
    return (uint64_t)order_key(v) << 32 | (0xffffffffu - (uint32_t)offset);
}

static inline int64_t cand_offset(uint64_t c) { return 0xffffffffu - (uint32_t)c; }

static inline float cand_value(uint64_t c)
{
    uint32_t key = (uint32_t)(c >> 32);
    if (key == 0xffffffffu)
        return NAN;
    return bits_to_f32((key & 0x80000000u) ? key & 0x7fffffffu : ~key);
}

/* Quickselect: a[0..k) become the k largest of a[0..n) (values are distinct). The partition
 * loop is branch-free (always swap, advance on compare), as random scores would make a
 * branchy one mispredict half the time. */
static void keep_largest(uint64_t *a, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n;
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2, store = lo;
        uint64_t x = a[lo], y = a[mid], z = a[hi - 1];
        uint64_t p = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        a[p == x ? lo : p == y ? mid : hi - 1] = z;
        a[hi - 1] = p;
        for (int64_t i = lo; i < hi - 1; i++) {
            uint64_t v = a[i];
            a[i] = a[store];
            a[store] = v;
            store += v > p;
        }
        a[hi - 1] = a[store];
        a[store] = p;
        if (store + 1 == k)
            return;
        if (store >= k)
            hi = store;
        else
            lo = store + 1;
    }
}

/* Sorts n candidates largest first (LSD radix on the inverted bits; tmp holds n). */
static void sort_desc(uint64_t *a, uint64_t *tmp, int64_t n)
{
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++)
            count[((~a[i]) >> shift & 0xff) + 1]++;
        if (count[((~a[0]) >> shift & 0xff) + 1] == n)
            continue; /* every candidate shares this digit */
        for (int d = 0; d < 256; d++)
            count[d + 1] += count[d];
        for (int64_t i = 0; i < n; i++)
            tmp[count[(~a[i]) >> shift & 0xff]++] = a[i];
        memcpy(a, tmp, sizeof(uint64_t) * (size_t)n);
    }
}

/*
 * Top-k selector: candidates are appended to a buffer of 2k; when it fills, quickselect keeps
 * the best k and their worst becomes the admission threshold. Each admitted candidate costs
 * O(1) amortised, and once the threshold exists a vector compare (at_least) rejects most
 * scores without touching them.
 */
typedef struct {
    uint64_t *c; /* 2k slots */
    int64_t n, k;
    uint64_t thr; /* admit only candidates above this; 0 before the first compaction */
    float thr_val;
} select_t;

static void select_init(select_t *s, uint64_t *mem, int64_t k)
{
    s->c = mem;
    s->n = 0;
    s->k = k;
    s->thr = 0;
    s->thr_val = -INFINITY;
}

static void select_compact(select_t *s)
{
    keep_largest(s->c, s->n, s->k);
    s->n = s->k;
    s->thr = s->c[0];
    for (int64_t i = 1; i < s->k; i++)
        s->thr = s->c[i] < s->thr ? s->c[i] : s->thr;
    s->thr_val = cand_value(s->thr);
}

static inline void select_push(select_t *s, uint64_t c)
{
    if (c <= s->thr)
        return;
    s->c[s->n++] = c;
    if (s->n == 2 * s->k)
        select_compact(s);
}

/* Offers cnt scores of offsets first, first+1, ... */
static void select_scores(const kernels_t *kt, select_t *s, const float *v, int64_t cnt,
                          int64_t first)
{
    for (int64_t t0 = 0; t0 < cnt; t0 += 64) {
        int m = (int)(cnt - t0 < 64 ? cnt - t0 : 64);
        uint64_t bits = kt->at_least(v + t0, m, s->thr_val);
        for (; bits; bits &= bits - 1) {
            int i = lowest_bit(bits);
            select_push(s, cand_pack(v[t0 + i], first + t0 + i));
        }
    }
}

/* Reduces to the best min(n, k) and returns how many; order unspecified. */
static int64_t select_reduce(select_t *s)
{
    if (s->n > s->k) {
        keep_largest(s->c, s->n, s->k);
        s->n = s->k;
    }
    return s->n;
}

/* Writes the best min(n, k) best first; indices are offsets plus `base`. */
static void select_write_sorted(select_t *s, int64_t base, float *values, int64_t *indices)
{
    int64_t n = select_reduce(s);
    sort_desc(s->c, s->c + s->k, n);
    for (int64_t i = 0; i < n; i++) {
        values[i] = cand_value(s->c[i]);
        indices[i] = base + cand_offset(s->c[i]);
    }
}

/*
 * Phase 1 of a fused top-k scan over [start, end) without storing score rows: each work item
 * (a chunk of one (batch, kv head)) keeps its best k per selector into kept/sizes. nsel == G:
 * one selector per query head; nsel == 1 with G > 1: one selector over the group's aggregate
 * score (max or sum, `agg`). The chunks are merged by the caller.
 */
enum { GSCORE_MAX = 0, GSCORE_SUM = 1 };
static void group_aggregate(const float *s, int64_t G, int nt, int agg, float *out);

static int scan_chunks_topk(const attn_t *a, int64_t start, int64_t end, int64_t k,
                            int64_t nsel, int agg, split_t sp, int nthreads, uint64_t *kept,
                            int64_t *sizes)
{
    int64_t G = a->G, D = a->D;
    int per_head = nsel == G;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        scratch_t ws;
        uint64_t *mem = malloc(sizeof(uint64_t) * (size_t)(2 * nsel * k));
        select_t *sel = malloc(sizeof(select_t) * (size_t)nsel);
        float *agg_s = per_head ? NULL : malloc(sizeof(float) * BT);
        int ok = scratch_init(&ws, D, G) && mem && sel && (per_head || agg_s);
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < sp.items; it++) {
            if (!ok)
                continue;
            chunk_t ch = chunk_at(a, sp, it, start, end);
            rows_t K = head_rows(a, a->K, a->kdt, ch.b, ch.kh);
            for (int64_t g = 0; g < nsel; g++)
                select_init(&sel[g], mem + g * 2 * k, k);
            for (int64_t b0 = ch.t0; b0 < ch.t1; b0 += BT) {
                int nt = (int)(ch.t1 - b0 < BT ? ch.t1 - b0 : BT);
                int64_t pf;
                const void *kb = fetch_rows(&K, NULL, b0, nt, ch.t1, ws.kbuf, &pf);
                a->kt->scores(a->q + (ch.b * a->H + ch.kh * G) * D, (int)G, kb, K.dtype, nt, D,
                              a->scale, ws.s, BT, pf);
                if (per_head) {
                    for (int64_t g = 0; g < G; g++)
                        select_scores(a->kt, &sel[g], ws.s + g * BT, nt, b0 - start);
                } else {
                    group_aggregate(ws.s, G, nt, agg, agg_s);
                    select_scores(a->kt, &sel[0], agg_s, nt, b0 - start);
                }
            }
            for (int64_t g = 0; g < nsel; g++) {
                sizes[it * nsel + g] = select_reduce(&sel[g]);
                memcpy(kept + (it * nsel + g) * k, sel[g].c, sizeof(uint64_t) * (size_t)sel[g].n);
            }
        }
        free(ws.kbuf);
        free(mem);
        free(sel);
        free(agg_s);
    }
    return failed;
}

/*
 * Fused scan: per-head top-k of the scores over [start, end) without storing score rows.
 * Each work item keeps its chunk's best k per head; a second pass merges the chunks.
 */
static int run_logits_topk(const attn_t *a, int64_t start, int64_t end, int64_t k,
                           int nthreads, float *values, int64_t *indices)
{
    int64_t ntok = end - start, G = a->G;
    int64_t groups = a->B * a->KVH;
    split_t sp = split_tokens(groups, ntok, nthreads);
    uint64_t *kept = malloc(sizeof(uint64_t) * (size_t)(sp.items * G * k));
    int64_t *sizes = malloc(sizeof(int64_t) * (size_t)(sp.items * G));
    int failed = kept == NULL || sizes == NULL;
    if (!failed)
        failed = scan_chunks_topk(a, start, end, k, G, GSCORE_MAX, sp, nthreads, kept, sizes);
    if (!failed) {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            uint64_t *mem = malloc(sizeof(uint64_t) * (size_t)(2 * k));
            failed |= mem == NULL;
#pragma omp for schedule(dynamic, 1)
            for (int64_t hh = 0; hh < groups * G; hh++) {
                if (!mem)
                    continue;
                int64_t grp = hh / G, g = hh % G;
                select_t sel;
                select_init(&sel, mem, k);
                for (int64_t c = 0; c < sp.nch; c++) {
                    int64_t it = grp * sp.nch + c;
                    for (int64_t i = 0; i < sizes[it * G + g]; i++)
                        select_push(&sel, kept[(it * G + g) * k + i]);
                }
                select_write_sorted(&sel, start, values + hh * k, indices + hh * k);
            }
            free(mem);
        }
    }
    free(kept);
    free(sizes);
    return failed ? -1 : 0;
}

/*
 * ---- grouped top-k under GQA (HybridGen's per-KV-group selection) ----
 *
 * The G query heads of a KV group read the same K and V rows, so a row several of them select
 * need be gathered and sent once per KV head. Per (batch, kv head) this keeps either the union
 * of the G heads' own top-k sets (GSEL_UNION) or one top-k of an aggregate of the group's
 * scores, their max or their sum (GSEL_SHARED), as ascending positions, and then gives every
 * head of the group its scores over those rows (re-scored on the gathered K rows: the scan
 * keeps no score rows). Groups keep different numbers of rows; the outputs are as wide as the
 * widest group (m), narrower groups padded with score -inf and their last position.
 */
enum { GSEL_UNION = 1, GSEL_SHARED = 2 };
#define RESCORE_ROWS 256 /* rows per work item of the re-scoring pass */

/* Rows a grouped top-k may keep per (batch, kv head): k shared, or a union of G sets of k
 * (at most G k, at most the range's ntok tokens; k >= 1). */
static int64_t group_capacity(int mode, int64_t G, int64_t k, int64_t ntok)
{
    if (mode == GSEL_SHARED)
        return k;
    return G > ntok / k ? ntok : G * k;
}

/*
 * out[t] = max or sum over the G heads of s[g * BT + t]; NaN in any head gives NaN. Head by
 * head over contiguous tokens, and branch-free: scores are random, so a compare-and-branch per
 * (token, head) mispredicts about half the time (~10 ns a token with G = 4, as long as scoring
 * the token), while a select over a block compiles to vector compares and blends. The sum adds
 * the heads in the same order as before (head 0 first), so results are unchanged bit for bit.
 */
static void group_aggregate(const float *s, int64_t G, int nt, int agg, float *out)
{
    memcpy(out, s, sizeof(float) * (size_t)nt);
    for (int64_t g = 1; g < G; g++) {
        const float *x = s + g * BT;
        if (agg == GSCORE_SUM) {
            for (int t = 0; t < nt; t++)
                out[t] += x[t];
        } else {
            for (int t = 0; t < nt; t++) {
                float v = out[t], y = x[t];
                int take = (y > v) | (y != y); /* larger, or NaN (which then stays) */
                out[t] = take ? y : v;
            }
        }
    }
}

/*
 * values (B, H, m) and indices (B, KVH, m), written as the contiguous prefixes of buffers of
 * width `cap` (group_capacity), counts (B, KVH) each group's rows; *m_out = m, the largest.
 */
static int run_logits_topk_group(const attn_t *a, int64_t start, int64_t end, int64_t k,
                                 int mode, int agg, int nthreads, float *values,
                                 int64_t *indices, int64_t *counts, int64_t *m_out)
{
    int64_t ntok = end - start, G = a->G, D = a->D;
    int64_t groups = a->B * a->KVH;
    int64_t nsel = mode == GSEL_UNION ? G : 1; /* selectors per group: heads, or the aggregate */
    int64_t cap = group_capacity(mode, G, k, ntok);
    split_t sp = split_tokens(groups, ntok, nthreads);
    uint64_t *kept = malloc(sizeof(uint64_t) * (size_t)(sp.items * nsel * k));
    int64_t *sizes = malloc(sizeof(int64_t) * (size_t)(sp.items * nsel));
    int64_t *rows = malloc(sizeof(int64_t) * (size_t)(groups * cap)); /* ascending positions */
    int failed = kept == NULL || sizes == NULL || rows == NULL;
    int64_t m = 0;
    /* 1: each work item's best k per selector */
    if (!failed)
        failed = scan_chunks_topk(a, start, end, k, nsel, agg, sp, nthreads, kept, sizes);
    /* 2: per group, each selector's final top-k; their positions sorted and deduplicated */
    if (!failed) {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            uint64_t *mem = malloc(sizeof(uint64_t) * (size_t)(2 * k));
            uint64_t *pos = malloc(sizeof(uint64_t) * (size_t)(2 * nsel * k)); /* + sort tmp */
            int ok = mem != NULL && pos != NULL;
            failed |= !ok;
#pragma omp for schedule(dynamic, 1)
            for (int64_t grp = 0; grp < groups; grp++) {
                if (!ok)
                    continue;
                int64_t n = 0, u = 0;
                int64_t *dst = rows + grp * cap;
                for (int64_t g = 0; g < nsel; g++) {
                    select_t sel;
                    select_init(&sel, mem, k);
                    for (int64_t c = 0; c < sp.nch; c++) {
                        int64_t it = grp * sp.nch + c;
                        for (int64_t i = 0; i < sizes[it * nsel + g]; i++)
                            select_push(&sel, kept[(it * nsel + g) * k + i]);
                    }
                    int64_t got = select_reduce(&sel);
                    for (int64_t i = 0; i < got; i++) /* the inverted offset: larger = earlier */
                        pos[n++] = sel.c[i] & 0xffffffffu;
                }
                sort_desc(pos, pos + nsel * k, n);
                for (int64_t i = 0; i < n; i++) {
                    int64_t at = start + (int64_t)(0xffffffffu - pos[i]);
                    if (u == 0 || dst[u - 1] != at)
                        dst[u++] = at;
                }
                counts[grp] = u;
            }
            free(mem);
            free(pos);
        }
    }
    /* 3: the widest group sets the width; every head's scores over its group's rows */
    for (int64_t grp = 0; !failed && grp < groups; grp++)
        m = counts[grp] > m ? counts[grp] : m;
    if (!failed) {
        int64_t nrc = (m + RESCORE_ROWS - 1) / RESCORE_ROWS;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        {
            scratch_t ws;
            int ok = scratch_init(&ws, D, G);
            failed |= !ok;
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < groups * nrc; it++) {
                if (!ok)
                    continue;
                int64_t grp = it / nrc, r0 = (it % nrc) * RESCORE_ROWS;
                int64_t r1 = r0 + RESCORE_ROWS < m ? r0 + RESCORE_ROWS : m;
                int64_t b = grp / a->KVH, kh = grp % a->KVH, cnt = counts[grp];
                int64_t v1 = r1 < cnt ? r1 : cnt;
                const int64_t *pick = rows + grp * cap;
                rows_t K = head_rows(a, a->K, a->kdt, b, kh);
                float *val = values + (b * a->H + kh * G) * m;
                int64_t *idx = indices + grp * m;
                for (int64_t b0 = r0; b0 < v1; b0 += BT) {
                    int nt = (int)(v1 - b0 < BT ? v1 - b0 : BT);
                    int64_t pf;
                    const void *kb = fetch_rows(&K, pick, b0, nt, v1, ws.kbuf, &pf);
                    a->kt->scores(a->q + (b * a->H + kh * G) * D, (int)G, kb, K.dtype, nt, D,
                                  a->scale, ws.s, BT, pf);
                    for (int64_t g = 0; g < G; g++)
                        memcpy(val + g * m + b0, ws.s + g * BT, sizeof(float) * (size_t)nt);
                    memcpy(idx + b0, pick + b0, sizeof(int64_t) * (size_t)nt);
                }
                for (int64_t j = r0 > cnt ? r0 : cnt; j < r1; j++) { /* padding */
                    for (int64_t g = 0; g < G; g++)
                        val[g * m + j] = -INFINITY;
                    idx[j] = pick[cnt - 1];
                }
            }
            free(ws.kbuf);
        }
    }
    *m_out = m;
    free(kept);
    free(sizes);
    free(rows);
    return failed ? -1 : 0;
}

/* Top-k of each of `rows` score rows of length T. */
static int run_topk(const kernels_t *kt, const float *scores, int64_t rows, int64_t T,
                    int64_t k, int nthreads, float *values, int64_t *indices)
{
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint64_t *mem = malloc(sizeof(uint64_t) * (size_t)(2 * k));
        failed |= mem == NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < rows; r++) {
            if (!mem)
                continue;
            select_t sel;
            select_init(&sel, mem, k);
            select_scores(kt, &sel, scores + r * T, T, 0);
            select_write_sorted(&sel, 0, values + r * k, indices + r * k);
        }
        free(mem);
    }
    return failed ? -1 : 0;
}

/* Position of the first index outside [0, T), or -1 when all are valid. */
static int64_t first_bad_index(const int64_t *idx, int64_t n, int64_t T)
{
    for (int64_t i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= T)
            return i;
    return -1;
}

/* Rows a gather prefetches ahead of the one it copies: a memcpy per row keeps only the few
 * rows its loop has in the reorder window in flight, well below the core's miss buffers, so
 * every line of a row GATHER_AHEAD rows ahead is requested before it is needed. */
#ifndef GATHER_AHEAD
#define GATHER_AHEAD 16
#endif

/* rows (B,H,k,D) = V[b, h // G, idx[b,h,j]] byte for byte. */
static void run_gather(const attn_t *a, const int64_t *idx, int64_t k, int nthreads, char *out)
{
    size_t row_bytes = (size_t)a->D * dtype_size(a->vdt);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bh = 0; bh < a->B * a->H; bh++) {
        rows_t V = head_rows(a, a->V, a->vdt, bh / a->H, (bh % a->H) / a->G);
        const int64_t *pick = idx + bh * k;
        for (int64_t j = 0; j < k && j < GATHER_AHEAD; j++)
            for (size_t off = 0; off < row_bytes; off += 64)
                __builtin_prefetch(V.base + (size_t)pick[j] * row_bytes + off, 0, 0);
        for (int64_t j = 0; j < k; j++) {
            if (j + GATHER_AHEAD < k) {
                const char *ahead = V.base + (size_t)pick[j + GATHER_AHEAD] * row_bytes;
                for (size_t off = 0; off < row_bytes; off += 64)
                    __builtin_prefetch(ahead + off, 0, 0);
            }
            memcpy(out + (size_t)(bh * k + j) * row_bytes,
                   V.base + (size_t)pick[j] * row_bytes, row_bytes);
        }
    }
}

/* Attention of each head over its own selected tokens idx[b,h,:]. */
static int run_sparse(const attn_t *a, const int64_t *idx, int64_t k, int nthreads, float *out,
                      float *lse)
{
    int64_t D = a->D;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        scratch_t ws;
        int ok = scratch_init(&ws, D, 1);
        float *acc = malloc(sizeof(float) * (size_t)(D + 2));
        ok = ok && acc != NULL;
        failed |= !ok;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < a->B * a->H; bh++) {
            if (!ok)
                continue;
            int64_t b = bh / a->H, kh = (bh % a->H) / a->G;
            rows_t K = head_rows(a, a->K, a->kdt, b, kh);
            rows_t V = head_rows(a, a->V, a->vdt, b, kh);
            attend(a->kt, a->q + bh * D, 1, D, &K, &V, idx + bh * k, 0, k, a->scale, acc,
                   acc + D, acc + D + 1, &ws);
            finish_head(acc, acc + D, acc + D + 1, 0, 1, D, out + bh * D, lse + bh);
        }
        free(ws.kbuf);
        free(acc);
    }
    return failed ? -1 : 0;
}

/* Streaming read of n words split across threads; returns a checksum so it is not elided. */
static uint64_t run_stream_read(const kernels_t *kt, const uint64_t *p, int64_t n, int nthreads)
{
    uint64_t total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int64_t tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        int64_t lo = n * tid / nth, hi = n * (tid + 1) / nth;
        total += kt->read_sum(p + lo, hi - lo);
    }
    return total;
}

/* Follows next-index links: each load depends on the previous one (latency probe). */
static int64_t run_pointer_chase(const int64_t *next, int64_t steps, int64_t at)
{
    for (int64_t i = 0; i < steps; i++)
        at = next[at];
    return at;
}

/* ------------------------------------------------------------------------------------------
 * Python bindings.
 */

/* Buffers acquired by one call, released together. */
typedef struct {
    Py_buffer v[8];
    int n;
} views_t;

static void views_release(views_t *vs)
{
    while (vs->n > 0)
        PyBuffer_Release(&vs->v[--vs->n]);
}

/* kind: 'f' float32, 'i' int64, 'h' any 16-bit type (bfloat16 arrives as (u)int16). */
static int format_matches(const char *fmt, char kind, Py_ssize_t itemsize)
{
    if (!fmt)
        return kind == 'h' && itemsize == 2;
    while (*fmt == '@' || *fmt == '=' || *fmt == '<' || *fmt == '>' || *fmt == '!')
        fmt++;
    switch (kind) {
    case 'f': return itemsize == 4 && strcmp(fmt, "f") == 0;
    case 'i': return itemsize == 8 && (strcmp(fmt, "q") == 0 || strcmp(fmt, "l") == 0);
    default: return itemsize == 2;
    }
}

/* A C-contiguous ndim-D buffer of the given kind, or a ValueError naming the argument. */
static Py_buffer *view_get(views_t *vs, PyObject *obj, const char *name, int ndim, char kind,
                           int writable)
{
    Py_buffer *b = &vs->v[vs->n];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s array", name,
                     writable ? " writable" : "");
        return NULL;
    }
    vs->n++;
    if (b->ndim != ndim || !format_matches(b->format, kind, b->itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D %s array", name, ndim,
                     kind == 'f' ? "float32" : kind == 'i' ? "int64" : "16-bit");
        return NULL;
    }
    return b;
}

static Py_buffer *kv_view(views_t *vs, PyObject *obj, const char *name, int dtype)
{
    if (dtype != DT_F32 && dtype != DT_BF16 && dtype != DT_F16) {
        PyErr_Format(PyExc_ValueError, "%s: unknown dtype code %d", name, dtype);
        return NULL;
    }
    return view_get(vs, obj, name, 4, dtype == DT_F32 ? 'f' : 'h', 0);
}

static int check_dims(int ok, const char *msg)
{
    if (!ok)
        PyErr_SetString(PyExc_ValueError, msg);
    return ok;
}

/*
 * The thread count a call runs with, checked while its arguments are parsed (before any
 * buffer is taken or OpenMP region entered). 0 is the OpenMP default; negative is a
 * ValueError. More than the machine's CPUs is capped there with a RuntimeWarning: extra
 * threads could only time-share cores (results are the same either way), and thousands of
 * them exhaust memory and end the process inside the OpenMP runtime, with no exception.
 * Returns the count, or -1 with an exception set (also when warnings are errors).
 */
static int thread_count(Py_ssize_t requested)
{
    if (requested < 0) {
        PyErr_Format(PyExc_ValueError, "nthreads: must be >= 0 (0: the OpenMP default), got %zd",
                     requested);
        return -1;
    }
    Py_ssize_t n = requested > 0 ? requested : default_threads();
    int cpus = machine_cpus();
    if (n > cpus) {
        if (PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                             "nthreads: %zd%s is more than the %d CPUs of this machine; "
                             "using %d", n, requested > 0 ? "" : " (the OpenMP default)",
                             cpus, cpus) < 0)
            return -1;
        n = cpus;
    }
    return (int)n;
}

/* Fills shapes from q (B,H,D) and K (B,KVH,T,D), checking they fit together. */
static int attn_from_views(attn_t *a, const Py_buffer *q, const Py_buffer *K, int kdt,
                           float scale)
{
    a->kt = kernels_for(simd_current);
    a->q = q->buf;
    a->K = K->buf;
    a->V = NULL;
    a->kdt = a->vdt = kdt;
    a->B = q->shape[0];
    a->H = q->shape[1];
    a->D = q->shape[2];
    a->KVH = K->shape[1];
    a->T = K->shape[2];
    a->scale = scale;
    if (!check_dims(a->B > 0, "q: batch must be >= 1") ||
        !check_dims(a->H > 0, "q: heads must be >= 1") ||
        !check_dims(a->D > 0, "q: head_dim must be >= 1") ||
        !check_dims(K->shape[0] == a->B, "K: batch size differs from q") ||
        !check_dims(K->shape[3] == a->D, "K: head_dim differs from q") ||
        !check_dims(a->KVH > 0, "K: kv heads must be >= 1") ||
        !check_dims(a->H % a->KVH == 0, "q: heads must be a multiple of kv heads"))
        return 0;
    a->G = a->H / a->KVH;
    return 1;
}

static int check_same_shape(const Py_buffer *x, const Py_buffer *ref, const char *msg)
{
    for (int i = 0; i < ref->ndim; i++)
        if (x->shape[i] != ref->shape[i])
            return check_dims(0, msg);
    return 1;
}

static int check_range(Py_ssize_t start, Py_ssize_t end, int64_t T)
{
    return check_dims(0 <= start && start <= end && end <= T,
                      "start/end: need 0 <= start <= end <= tokens");
}

static int check_shape3(const Py_buffer *x, int64_t d0, int64_t d1, int64_t d2, const char *msg)
{
    return check_dims(x->shape[0] == d0 && x->shape[1] == d1 && x->shape[2] == d2, msg);
}

static PyObject *memory_error_or_none(int rc)
{
    if (rc < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_partial_attention(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *vo, *oo, *lo;
    int kdt, vdt, nthreads;
    Py_ssize_t start, end, nthreads_arg;
    float scale;
    views_t vs = {.n = 0};
    attn_t a;
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOiOinnfnOO", &qo, &ko, &kdt, &vo, &vdt, &start, &end, &scale,
                          &nthreads_arg, &oo, &lo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *q = view_get(&vs, qo, "q", 3, 'f', 0);
    Py_buffer *K = q ? kv_view(&vs, ko, "K", kdt) : NULL;
    Py_buffer *V = K ? kv_view(&vs, vo, "V", vdt) : NULL;
    Py_buffer *out = V ? view_get(&vs, oo, "out", 3, 'f', 1) : NULL;
    Py_buffer *lse = out ? view_get(&vs, lo, "lse", 2, 'f', 1) : NULL;
    if (!lse || !attn_from_views(&a, q, K, kdt, scale) ||
        !check_same_shape(V, K, "V: shape differs from K") || !check_range(start, end, a.T) ||
        !check_same_shape(out, q, "out: shape differs from q") ||
        !check_dims(lse->shape[0] == a.B && lse->shape[1] == a.H, "lse: expected (B, H)")) {
        views_release(&vs);
        return NULL;
    }
    a.V = V->buf;
    a.vdt = vdt;
    Py_BEGIN_ALLOW_THREADS
    rc = run_partial(&a, start, end, nthreads, out->buf, lse->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return memory_error_or_none(rc);
}

static PyObject *py_logits(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *oo;
    int kdt, nthreads;
    Py_ssize_t start, end, nthreads_arg;
    float scale;
    views_t vs = {.n = 0};
    attn_t a;
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOinnfnO", &qo, &ko, &kdt, &start, &end, &scale, &nthreads_arg,
                          &oo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *q = view_get(&vs, qo, "q", 3, 'f', 0);
    Py_buffer *K = q ? kv_view(&vs, ko, "K", kdt) : NULL;
    Py_buffer *out = K ? view_get(&vs, oo, "out", 3, 'f', 1) : NULL;
    if (!out || !attn_from_views(&a, q, K, kdt, scale) || !check_range(start, end, a.T) ||
        !check_shape3(out, a.B, a.H, end - start, "out: expected (B, H, end - start)")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = run_logits(&a, start, end, nthreads, out->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return memory_error_or_none(rc);
}

static PyObject *py_logits_topk(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *valo, *idxo;
    int kdt, nthreads;
    Py_ssize_t start, end, nthreads_arg;
    float scale;
    views_t vs = {.n = 0};
    attn_t a;
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOinnfnOO", &qo, &ko, &kdt, &start, &end, &scale, &nthreads_arg,
                          &valo, &idxo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *q = view_get(&vs, qo, "q", 3, 'f', 0);
    Py_buffer *K = q ? kv_view(&vs, ko, "K", kdt) : NULL;
    Py_buffer *val = K ? view_get(&vs, valo, "values", 3, 'f', 1) : NULL;
    Py_buffer *idx = val ? view_get(&vs, idxo, "indices", 3, 'i', 1) : NULL;
    int64_t k = idx ? val->shape[2] : 0;
    if (!idx || !attn_from_views(&a, q, K, kdt, scale) || !check_range(start, end, a.T) ||
        !check_shape3(val, a.B, a.H, k, "values: expected (B, H, k)") ||
        !check_same_shape(idx, val, "indices: shape differs from values") ||
        !check_dims(k >= 1 && k <= end - start, "k: need 1 <= k <= end - start") ||
        !check_dims(end - start <= UINT32_MAX, "start/end: top-k scans at most 2^32 tokens")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = run_logits_topk(&a, start, end, k, nthreads, val->buf, idx->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return memory_error_or_none(rc);
}

static PyObject *py_logits_topk_group(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *valo, *idxo, *cnto;
    int kdt, nthreads, mode, agg;
    Py_ssize_t start, end, nthreads_arg, k;
    float scale;
    views_t vs = {.n = 0};
    attn_t a;
    int rc = 0;
    int64_t m = 0, cap = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOinnfnniiOOO", &qo, &ko, &kdt, &start, &end, &scale,
                          &nthreads_arg, &k, &mode, &agg, &valo, &idxo, &cnto) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    if (!check_dims(mode == GSEL_UNION || mode == GSEL_SHARED,
                    "mode: expected 1 (group union) or 2 (group shared)") ||
        !check_dims(agg == GSCORE_MAX || agg == GSCORE_SUM, "score: expected 0 (max) or 1 (sum)"))
        return NULL;
    Py_buffer *q = view_get(&vs, qo, "q", 3, 'f', 0);
    Py_buffer *K = q ? kv_view(&vs, ko, "K", kdt) : NULL;
    Py_buffer *val = K ? view_get(&vs, valo, "values", 3, 'f', 1) : NULL;
    Py_buffer *idx = val ? view_get(&vs, idxo, "indices", 3, 'i', 1) : NULL;
    Py_buffer *cnt = idx ? view_get(&vs, cnto, "counts", 2, 'i', 1) : NULL;
    int ok = cnt && attn_from_views(&a, q, K, kdt, scale) && check_range(start, end, a.T) &&
             check_dims(k >= 1 && k <= end - start, "k: need 1 <= k <= end - start") &&
             check_dims(end - start <= UINT32_MAX, "start/end: top-k scans at most 2^32 tokens");
    if (ok)
        cap = group_capacity(mode, a.G, k, end - start);
    if (!ok || !check_shape3(val, a.B, a.H, cap, "values: expected (B, H, capacity)") ||
        !check_shape3(idx, a.B, a.KVH, cap, "indices: expected (B, KVH, capacity)") ||
        !check_dims(cnt->shape[0] == a.B && cnt->shape[1] == a.KVH,
                    "counts: expected (B, KVH)")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = run_logits_topk_group(&a, start, end, k, mode, agg, nthreads, val->buf, idx->buf,
                               cnt->buf, &m);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    if (rc < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(m);
}

static PyObject *py_topk(PyObject *self, PyObject *args)
{
    PyObject *so, *valo, *idxo;
    int nthreads;
    Py_ssize_t nthreads_arg;
    views_t vs = {.n = 0};
    int rc = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnOO", &so, &nthreads_arg, &valo, &idxo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *s = view_get(&vs, so, "scores", 3, 'f', 0);
    Py_buffer *val = s ? view_get(&vs, valo, "values", 3, 'f', 1) : NULL;
    Py_buffer *idx = val ? view_get(&vs, idxo, "indices", 3, 'i', 1) : NULL;
    int64_t k = idx ? val->shape[2] : 0;
    if (!idx || !check_dims(s->shape[0] > 0 && s->shape[1] > 0, "scores: batch and heads must be >= 1") ||
        !check_shape3(val, s->shape[0], s->shape[1], k, "values: expected (B, H, k)") ||
        !check_same_shape(idx, val, "indices: shape differs from values") ||
        !check_dims(k >= 1 && k <= s->shape[2], "k: need 1 <= k <= tokens") ||
        !check_dims(s->shape[2] <= UINT32_MAX, "scores: top-k takes at most 2^32 tokens")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = run_topk(kernels_for(simd_current), s->buf, s->shape[0] * s->shape[1], s->shape[2], k,
                  nthreads, val->buf, idx->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return memory_error_or_none(rc);
}

/* Checks idx (B,H,k) against q-like dims and token count; returns k or -1 with an error set. */
static int64_t check_indices(const Py_buffer *idx, const attn_t *a)
{
    if (!check_dims(idx->shape[0] == a->B && idx->shape[1] == a->H, "idx: expected (B, H, k)"))
        return -1;
    int64_t k = idx->shape[2];
    int64_t bad = first_bad_index(idx->buf, a->B * a->H * k, a->T);
    if (bad >= 0) {
        PyErr_Format(PyExc_ValueError, "idx: index %lld is outside [0, %lld)",
                     (long long)((const int64_t *)idx->buf)[bad], (long long)a->T);
        return -1;
    }
    return k;
}

static PyObject *py_gather_rows(PyObject *self, PyObject *args)
{
    PyObject *vo, *idxo, *oo;
    int vdt, nthreads;
    Py_ssize_t nthreads_arg;
    views_t vs = {.n = 0};
    attn_t a;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiOnO", &vo, &vdt, &idxo, &nthreads_arg, &oo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *V = kv_view(&vs, vo, "V", vdt);
    Py_buffer *idx = V ? view_get(&vs, idxo, "idx", 3, 'i', 0) : NULL;
    Py_buffer *out = idx ? view_get(&vs, oo, "out", 4, vdt == DT_F32 ? 'f' : 'h', 1) : NULL;
    int64_t k = -1;
    if (out) {
        a.V = V->buf;
        a.vdt = vdt;
        a.B = V->shape[0];
        a.KVH = V->shape[1];
        a.T = V->shape[2];
        a.D = V->shape[3];
        a.H = idx->shape[1];
        if (check_dims(a.B > 0 && a.D > 0, "V: batch and head_dim must be >= 1") &&
            check_dims(a.KVH > 0, "V: kv heads must be >= 1") &&
            check_dims(a.H > 0, "idx: heads must be >= 1") &&
            check_dims(a.H % a.KVH == 0, "idx: heads must be a multiple of kv heads")) {
            a.G = a.H / a.KVH;
            k = check_indices(idx, &a);
        }
    }
    if (k < 0 || !check_dims(out->shape[0] == a.B && out->shape[1] == a.H &&
                                 out->shape[2] == k && out->shape[3] == a.D,
                             "out: expected (B, H, k, D)")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run_gather(&a, idx->buf, k, nthreads, out->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    Py_RETURN_NONE;
}

static PyObject *py_sparse_attention(PyObject *self, PyObject *args)
{
    PyObject *qo, *ko, *vo, *idxo, *oo, *lo;
    int kdt, vdt, nthreads;
    Py_ssize_t nthreads_arg;
    float scale;
    views_t vs = {.n = 0};
    attn_t a;
    int rc = 0;
    int64_t k = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOiOiOfnOO", &qo, &ko, &kdt, &vo, &vdt, &idxo, &scale,
                          &nthreads_arg, &oo, &lo) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    Py_buffer *q = view_get(&vs, qo, "q", 3, 'f', 0);
    Py_buffer *K = q ? kv_view(&vs, ko, "K", kdt) : NULL;
    Py_buffer *V = K ? kv_view(&vs, vo, "V", vdt) : NULL;
    Py_buffer *idx = V ? view_get(&vs, idxo, "idx", 3, 'i', 0) : NULL;
    Py_buffer *out = idx ? view_get(&vs, oo, "out", 3, 'f', 1) : NULL;
    Py_buffer *lse = out ? view_get(&vs, lo, "lse", 2, 'f', 1) : NULL;
    if (lse && attn_from_views(&a, q, K, kdt, scale) &&
        check_same_shape(V, K, "V: shape differs from K") &&
        check_same_shape(out, q, "out: shape differs from q") &&
        check_dims(lse->shape[0] == a.B && lse->shape[1] == a.H, "lse: expected (B, H)"))
        k = check_indices(idx, &a);
    if (k < 0) {
        views_release(&vs);
        return NULL;
    }
    a.V = V->buf;
    a.vdt = vdt;
    Py_BEGIN_ALLOW_THREADS
    rc = run_sparse(&a, idx->buf, k, nthreads, out->buf, lse->buf);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return memory_error_or_none(rc);
}

static PyObject *py_stream_read(PyObject *self, PyObject *args)
{
    PyObject *bo;
    int nthreads;
    Py_ssize_t nthreads_arg;
    Py_buffer b;
    uint64_t sum = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "On", &bo, &nthreads_arg) ||
        (nthreads = thread_count(nthreads_arg)) < 0)
        return NULL;
    if (PyObject_GetBuffer(bo, &b, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_SetString(PyExc_ValueError, "buf: expected a C-contiguous buffer");
        return NULL;
    }
    const kernels_t *kt = kernels_for(simd_current);
    Py_BEGIN_ALLOW_THREADS
    sum = run_stream_read(kt, b.buf, (int64_t)(b.len / 8), nthreads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(sum);
}

static PyObject *py_pointer_chase(PyObject *self, PyObject *args)
{
    PyObject *no;
    Py_ssize_t steps, at;
    views_t vs = {.n = 0};
    int64_t end = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Onn", &no, &steps, &at))
        return NULL;
    Py_buffer *next = view_get(&vs, no, "next", 1, 'i', 0);
    int64_t n = next ? next->shape[0] : 0;
    if (!next || !check_dims(steps >= 0 && at >= 0 && at < n, "steps/at: out of range") ||
        !check_dims(first_bad_index(next->buf, n, n) < 0, "next: links must lie in [0, len)")) {
        views_release(&vs);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    end = run_pointer_chase(next->buf, steps, at);
    Py_END_ALLOW_THREADS
    views_release(&vs);
    return PyLong_FromLongLong(end);
}

static PyObject *py_simd_level(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(simd_names[simd_current]);
}

static PyObject *py_supported_simd_levels(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObject *t = PyTuple_New(simd_best + 1);
    for (int i = 0; t && i <= simd_best; i++)
        PyTuple_SET_ITEM(t, i, PyUnicode_FromString(simd_names[i]));
    return t;
}

static PyObject *py_set_simd_level(PyObject *self, PyObject *args)
{
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    for (int i = 0; i < SIMD_COUNT; i++) {
        if (strcmp(name, simd_names[i]) != 0)
            continue;
        if (i > simd_best)
            return PyErr_Format(PyExc_ValueError, "level: this CPU supports up to %s, not %s",
                                simd_names[simd_best], name);
        PyObject *prev = PyUnicode_FromString(simd_names[simd_current]);
        simd_current = i;
        return prev;
    }
    return PyErr_Format(PyExc_ValueError, "level: expected scalar, avx2 or avx512, got %s", name);
}

static PyObject *py_set_prefetch_bytes(PyObject *self, PyObject *args)
{
    long long n;
    if (!PyArg_ParseTuple(args, "L", &n))
        return NULL;
    if (n < 0 || n > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "nbytes: must be between 0 and 1048576");
        return NULL;
    }
    long long old = prefetch_bytes;
    prefetch_bytes = n;
    return PyLong_FromLongLong(old);
}

static PyObject *py_max_threads(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    int n = default_threads(), cpus = machine_cpus();
    return PyLong_FromLong(n < cpus ? n : cpus);
}

static PyMethodDef methods[] = {
    {"set_prefetch_bytes", py_set_prefetch_bytes, METH_VARARGS, "set_prefetch_bytes(n) -> previous"},
    {"partial_attention", py_partial_attention, METH_VARARGS,
     "partial_attention(q, K, kdt, V, vdt, start, end, scale, nthreads, out, lse)"},
    {"logits", py_logits, METH_VARARGS, "logits(q, K, kdt, start, end, scale, nthreads, out)"},
    {"logits_topk", py_logits_topk, METH_VARARGS,
     "logits_topk(q, K, kdt, start, end, scale, nthreads, values, indices)"},
    {"logits_topk_group", py_logits_topk_group, METH_VARARGS,
     "logits_topk_group(q, K, kdt, start, end, scale, nthreads, k, mode, score, values, indices, "
     "counts) -> m; mode 1 union / 2 shared, score 0 max / 1 sum"},
    {"topk", py_topk, METH_VARARGS, "topk(scores, nthreads, values, indices)"},
    {"gather_rows", py_gather_rows, METH_VARARGS, "gather_rows(V, vdt, idx, nthreads, out)"},
    {"sparse_attention", py_sparse_attention, METH_VARARGS,
     "sparse_attention(q, K, kdt, V, vdt, idx, scale, nthreads, out, lse)"},
    {"stream_read", py_stream_read, METH_VARARGS,
     "stream_read(buf, nthreads) -> checksum; reads every 8-byte word of buf once"},
    {"pointer_chase", py_pointer_chase, METH_VARARGS,
     "pointer_chase(next, steps, at) -> final index after steps dependent loads"},
    {"simd_level", py_simd_level, METH_NOARGS, "Instruction set the kernels use now."},
    {"supported_simd_levels", py_supported_simd_levels, METH_NOARGS,
     "Instruction sets this CPU can run, lowest first."},
    {"set_simd_level", py_set_simd_level, METH_VARARGS,
     "set_simd_level(name) -> previous name; name must be supported by this CPU."},
    {"max_threads", py_max_threads, METH_NOARGS,
     "Threads a call uses when none are given (the OpenMP default, at most the CPUs)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpu_attention",
    "Compiled kernels behind hw_backend.cpu_attention (use that module, not this one).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__cpu_attention(void)
{
    simd_best = detect_simd();
    simd_current = simd_best;
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "DT_FLOAT32", DT_F32) < 0 ||
              PyModule_AddIntConstant(m, "DT_BFLOAT16", DT_BF16) < 0 ||
              PyModule_AddIntConstant(m, "DT_FLOAT16", DT_F16) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
