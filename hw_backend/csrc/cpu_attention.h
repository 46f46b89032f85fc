/*
 * cpu_attention.h - SIMD kernel template for cpu_attention.c.
 *
 * Not a conventional header: cpu_attention.c includes it once per instruction set (AVX-512,
 * AVX2, plain C) after defining the vector macros listed below, which it undefines again at
 * its end, so every kernel is written once and compiled three times, each copy under its own
 * __attribute__((target)). The copy to run is picked at run time from the CPU's features,
 * which keeps the build free of -march=native and lets tests force a lower level.
 *
 * K/V rows are read in their storage type (float32, bfloat16, float16) and widened in
 * registers; the element type DT and, for the common head sizes, D are compile-time
 * constants inside each instantiated kernel, so the inner loops are fully unrolled.
 *
 * Macros the includer defines (VF is the float vector type, VW its lane count):
 *   SFX            suffix for the generated names (avx512, avx2, scalar)
 *   KATTR          function attribute selecting the instruction set
 *   ACC_NV         vectors per head kept in registers by accum (register budget)
 *   SCORE_NT4      tokens per score tile with 4 heads (register budget)
 *   SPECIALIZE_D   1 to compile unrolled copies for D = 64, 80, 96, 128, 256
 *   VZERO() VSET1(x) VLOAD(p) VSTORE(p, v) VADD VSUB VMUL VFMA(a, b, c) VMAX
 *   VLOADN(p, n) VSTOREN(p, v, n)   first n < VW lanes only (zero filled)
 *   VRSUM(v) VRMAX(v)               horizontal sum / max
 *   VRSUM8(a, r)                    r[i] = horizontal sum of a[i], i < 8
 *   VMASK_NLT(v, t)                 uint64_t lane bits where !(v < t) (v >= t or NaN)
 *   VEXP(v)                         exp, NaN in -> NaN out
 *   VLOAD_BF16(p) VLOAD_F16(p)      widen VW 16-bit values to float32
 */

#define FN(name) CAT_SFX(name, SFX)

/* VW elements at row[i] of element type DT, widened to float32. */
static ALWAYS_INLINE KATTR VF FN(load_row)(const void *row, int64_t i, int DT)
{
    if (DT == DT_BF16)
        return VLOAD_BF16((const uint16_t *)row + i);
    if (DT == DT_F16)
        return VLOAD_F16((const uint16_t *)row + i);
    return VLOAD((const float *)row + i);
}

/* The first n < VW elements at row[i], zero filled (generic head sizes only). */
static ALWAYS_INLINE KATTR VF FN(load_row_tail)(const void *row, int64_t i, int n, int DT)
{
    float tmp[VW];
    const uint16_t *h = (const uint16_t *)row + i;
    if (DT == DT_F32)
        return VLOADN((const float *)row + i, n);
    for (int j = 0; j < VW; j++)
        tmp[j] = j >= n ? 0.0f : DT == DT_BF16 ? bf16_to_f32(h[j]) : f16_to_f32(h[j]);
    return VLOAD(tmp);
}

/*
 * NH heads x NT tokens of dot products. Every K vector loaded is reused by NH queries and
 * every query vector by NT tokens: this reuse is what keeps GQA decode bandwidth-bound.
 * NH and NT are compile-time constants at each call site, so acc[] lives in registers, and
 * full tiles reduce 8 accumulators at a time with one transposing add tree (VRSUM8).
 * pf > 0 prefetches each row pf bytes ahead one line per step, as the step consumes a line:
 * issued in one burst per tile instead (32 prefetches for 4 fp32 rows), they held up the
 * loads and slowed a core's K scan (docs/calibration.md, history).
 */
static ALWAYS_INLINE KATTR void FN(score_tile)(const float *restrict q, const void *restrict k,
                                               int DT, int64_t D, int NH, int NT, float scale,
                                               float *restrict s, int64_t s_stride, int64_t pf)
{
    VF acc[16];
    VF kv[8];
    float r[16];
    int64_t d = 0;
    const int64_t esize = DT == DT_F32 ? 4 : 2;
    for (int i = 0; i < NH * NT; i++)
        acc[i] = VZERO();
    for (; d + VW <= D; d += VW) {
        if (pf && ((d * esize) & 63) == 0) /* one line per row as the row is consumed */
            for (int t = 0; t < NT; t++)
                PREFETCH((const char *)k + (t * D + d) * esize + pf);
        for (int t = 0; t < NT; t++)
            kv[t] = FN(load_row)(k, t * D + d, DT);
        for (int h = 0; h < NH; h++) {
            VF qv = VLOAD(q + h * D + d);
            for (int t = 0; t < NT; t++)
                acc[h * NT + t] = VFMA(qv, kv[t], acc[h * NT + t]);
        }
    }
    if (d < D) {
        int n = (int)(D - d);
        if (pf) /* the line(s) the tail reads */
            for (int t = 0; t < NT; t++) {
                PREFETCH((const char *)k + (t * D + d) * esize + pf);
                PREFETCH((const char *)k + ((t + 1) * D) * esize - 1 + pf);
            }
        for (int t = 0; t < NT; t++)
            kv[t] = FN(load_row_tail)(k, t * D + d, n, DT);
        for (int h = 0; h < NH; h++) {
            VF qv = VLOADN(q + h * D + d, n);
            for (int t = 0; t < NT; t++)
                acc[h * NT + t] = VFMA(qv, kv[t], acc[h * NT + t]);
        }
    }
    if (NH * NT >= 8) { /* zero-pad to whole add trees: cheaper than separate sums */
        for (int i = NH * NT; i % 8; i++)
            acc[i] = VZERO();
        for (int i = 0; i < NH * NT; i += 8)
            VRSUM8(acc + i, r + i);
    } else {
        for (int i = 0; i < NH * NT; i++)
            r[i] = VRSUM(acc[i]);
    }
    for (int h = 0; h < NH; h++)
        for (int t = 0; t < NT; t++)
            s[h * s_stride + t] = r[h * NT + t] * scale;
}

static ALWAYS_INLINE KATTR void FN(scores_nh)(const float *q, const void *k, int DT, int nt,
                                              int64_t D, int NH, int NT, float scale, float *s,
                                              int64_t s_stride, int64_t pf)
{
    size_t row_bytes = (size_t)D * (DT == DT_F32 ? 4 : 2);
    int t = 0;
    for (; t + NT <= nt; t += NT)
        FN(score_tile)(q, (const char *)k + t * row_bytes, DT, D, NH, NT, scale, s + t,
                       s_stride, pf);
    if (NT > 2) /* a block that is not a multiple of NT: pairs before singles */
        for (; t + 2 <= nt; t += 2)
            FN(score_tile)(q, (const char *)k + t * row_bytes, DT, D, NH, 2, scale, s + t,
                           s_stride, pf);
    for (; t < nt; t++)
        FN(score_tile)(q, (const char *)k + t * row_bytes, DT, D, NH, 1, scale, s + t, s_stride,
                       pf);
}

/* Head groups of 4, 2, 1; only the first group reads K from memory, so only it prefetches. */
static ALWAYS_INLINE KATTR void FN(scores_d)(const float *q, int G, const void *k, int DT,
                                             int nt, int64_t D, float scale, float *s,
                                             int64_t s_stride, int64_t pf)
{
    int h = 0;
    for (; h + 4 <= G; h += 4, pf = 0)
        FN(scores_nh)(q + h * D, k, DT, nt, D, 4, SCORE_NT4, scale, s + h * s_stride, s_stride,
                      pf);
    if (h + 2 <= G) {
        FN(scores_nh)(q + h * D, k, DT, nt, D, 2, 4, scale, s + h * s_stride, s_stride, pf);
        h += 2;
        pf = 0;
    }
    if (h < G)
        FN(scores_nh)(q + h * D, k, DT, nt, D, 1, 8, scale, s + h * s_stride, s_stride, pf);
}

static ALWAYS_INLINE KATTR void FN(scores_t)(const float *q, int G, const void *k, int DT,
                                             int nt, int64_t D, float scale, float *s,
                                             int64_t s_stride, int64_t pf)
{
#if SPECIALIZE_D
    switch (D) {
    case 64: FN(scores_d)(q, G, k, DT, nt, 64, scale, s, s_stride, pf); return;
    case 80: FN(scores_d)(q, G, k, DT, nt, 80, scale, s, s_stride, pf); return;
    case 96: FN(scores_d)(q, G, k, DT, nt, 96, scale, s, s_stride, pf); return;
    case 128: FN(scores_d)(q, G, k, DT, nt, 128, scale, s, s_stride, pf); return;
    case 256: FN(scores_d)(q, G, k, DT, nt, 256, scale, s, s_stride, pf); return;
    }
#endif
    FN(scores_d)(q, G, k, DT, nt, D, scale, s, s_stride, pf);
}

/*
 * s[h * s_stride + t] = scale * dot(q[h], k[t]) for the G query heads of one KV head and nt
 * rows of K stored as `dtype`. pf > 0 prefetches K pf bytes ahead (dense scans).
 */
static KATTR void FN(scores)(const float *q, int G, const void *k, int dtype, int nt, int64_t D,
                             float scale, float *s, int64_t s_stride, int64_t pf)
{
    if (dtype == DT_BF16)
        FN(scores_t)(q, G, k, DT_BF16, nt, D, scale, s, s_stride, pf);
    else if (dtype == DT_F16)
        FN(scores_t)(q, G, k, DT_F16, nt, D, scale, s, s_stride, pf);
    else
        FN(scores_t)(q, G, k, DT_F32, nt, D, scale, s, s_stride, pf);
}

/*
 * acc[h][d0 : d0 + NV*VW] += sum_t p[h][t] * v[t][d0 : ...] for NH heads, accumulators in
 * registers for the whole block. Each V vector loaded serves all NH heads. tail > 0 means
 * the last vector holds only `tail` valid lanes (generic head sizes).
 */
static ALWAYS_INLINE KATTR void FN(accum_tile)(float *restrict acc, int64_t D, int64_t d0,
                                               const float *restrict p, int64_t p_stride,
                                               const void *restrict v, int DT, int nt, int NH,
                                               int NV, int tail, int64_t pf)
{
    size_t esize = DT == DT_F32 ? 4 : 2, row_bytes = (size_t)D * esize;
    size_t slice_bytes = (size_t)(NV * VW) * esize;
    VF a[4][ACC_NV];
    VF vv[ACC_NV];
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < NV; j++)
            a[h][j] = (tail && j == NV - 1) ? VLOADN(acc + h * D + d0 + j * VW, tail)
                                            : VLOAD(acc + h * D + d0 + j * VW);
    for (int t = 0; t < nt; t++) {
        const void *row = (const char *)v + t * row_bytes;
        if (pf) {
            /* this tile's columns of the row pf bytes ahead: every column tile prefetches its
               own slice, so V prefetches spread over the whole accumulation */
            const char *ahead = (const char *)row + pf + d0 * esize;
            for (size_t off = 0; off < slice_bytes; off += 64)
                PREFETCH(ahead + off);
            PREFETCH(ahead + slice_bytes - 1);
        }
        for (int j = 0; j < NV; j++)
            vv[j] = (tail && j == NV - 1) ? FN(load_row_tail)(row, d0 + j * VW, tail, DT)
                                          : FN(load_row)(row, d0 + j * VW, DT);
        for (int h = 0; h < NH; h++) {
            VF pb = VSET1(p[h * p_stride + t]);
            for (int j = 0; j < NV; j++)
                a[h][j] = VFMA(pb, vv[j], a[h][j]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < NV; j++) {
            if (tail && j == NV - 1)
                VSTOREN(acc + h * D + d0 + j * VW, a[h][j], tail);
            else
                VSTORE(acc + h * D + d0 + j * VW, a[h][j]);
        }
}

/* All of D for NH heads, one column tile at a time (each prefetches its slice ahead). */
static ALWAYS_INLINE KATTR void FN(accum_nh)(float *acc, int64_t D, const float *p,
                                             int64_t p_stride, const void *v, int DT, int nt,
                                             int NH, int64_t pf)
{
    int nvec = (int)(D / VW), j = 0;
    for (; j + ACC_NV <= nvec; j += ACC_NV)
        FN(accum_tile)(acc, D, (int64_t)j * VW, p, p_stride, v, DT, nt, NH, ACC_NV, 0, pf);
    for (; j < nvec; j++) /* offsets in 64 bits: j * VW must not overflow an int */
        FN(accum_tile)(acc, D, (int64_t)j * VW, p, p_stride, v, DT, nt, NH, 1, 0, pf);
    if (D % VW)
        FN(accum_tile)(acc, D, (int64_t)j * VW, p, p_stride, v, DT, nt, NH, 1, (int)(D % VW),
                       pf);
}

static ALWAYS_INLINE KATTR void FN(accum_d)(float *acc, int G, int64_t D, const float *p,
                                            int64_t p_stride, const void *v, int DT, int nt,
                                            int64_t pf)
{
    int h = 0;
    for (; h + 4 <= G; h += 4, pf = 0)
        FN(accum_nh)(acc + h * D, D, p + h * p_stride, p_stride, v, DT, nt, 4, pf);
    if (h + 2 <= G) {
        FN(accum_nh)(acc + h * D, D, p + h * p_stride, p_stride, v, DT, nt, 2, pf);
        h += 2;
        pf = 0;
    }
    if (h < G)
        FN(accum_nh)(acc + h * D, D, p + h * p_stride, p_stride, v, DT, nt, 1, pf);
}

static ALWAYS_INLINE KATTR void FN(accum_t)(float *acc, int G, int64_t D, const float *p,
                                            int64_t p_stride, const void *v, int DT, int nt,
                                            int64_t pf)
{
#if SPECIALIZE_D
    switch (D) {
    case 64: FN(accum_d)(acc, G, 64, p, p_stride, v, DT, nt, pf); return;
    case 80: FN(accum_d)(acc, G, 80, p, p_stride, v, DT, nt, pf); return;
    case 96: FN(accum_d)(acc, G, 96, p, p_stride, v, DT, nt, pf); return;
    case 128: FN(accum_d)(acc, G, 128, p, p_stride, v, DT, nt, pf); return;
    case 256: FN(accum_d)(acc, G, 256, p, p_stride, v, DT, nt, pf); return;
    }
#endif
    FN(accum_d)(acc, G, D, p, p_stride, v, DT, nt, pf);
}

/*
 * acc[h] += sum_t p[h * p_stride + t] * v[t] for the G heads sharing one KV head, V rows
 * stored as `dtype`; pf > 0 prefetches V pf bytes ahead (dense scans).
 */
static KATTR void FN(accum)(float *acc, int G, int64_t D, const float *p, int64_t p_stride,
                            const void *v, int dtype, int nt, int64_t pf)
{
    if (dtype == DT_BF16)
        FN(accum_t)(acc, G, D, p, p_stride, v, DT_BF16, nt, pf);
    else if (dtype == DT_F16)
        FN(accum_t)(acc, G, D, p, p_stride, v, DT_F16, nt, pf);
    else
        FN(accum_t)(acc, G, D, p, p_stride, v, DT_F32, nt, pf);
}

/* s[i] = exp(s[i] - m) in place; returns the sum (the softmax denominator increment). */
static KATTR float FN(exp_sub_sum)(float *s, int n, float m)
{
    VF vm = VSET1(m);
    VF vsum = VZERO();
    int i = 0;
    for (; i + VW <= n; i += VW) {
        VF e = VEXP(VSUB(VLOAD(s + i), vm));
        VSTORE(s + i, e);
        vsum = VADD(vsum, e);
    }
    float sum = VRSUM(vsum);
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

/* Largest of n > 0 values (NaN handling is left to exp_sub_sum, which propagates it). */
static KATTR float FN(max_f32)(const float *s, int n)
{
    VF vmax = VSET1(-INFINITY);
    int i = 0;
    for (; i + VW <= n; i += VW)
        vmax = VMAX(vmax, VLOAD(s + i));
    float m = VRMAX(vmax);
    for (; i < n; i++)
        m = s[i] > m ? s[i] : m;
    return m;
}

/* x *= a, used to rescale an accumulator when the running max grows. */
static KATTR void FN(scale_f32)(float *x, int64_t n, float a)
{
    VF va = VSET1(a);
    int64_t i = 0;
    for (; i + VW <= n; i += VW)
        VSTORE(x + i, VMUL(VLOAD(x + i), va));
    for (; i < n; i++)
        x[i] *= a;
}

/* Bit i set where s[i] >= thr or is NaN: top-k candidates once a heap is full (n <= 64). */
static KATTR uint64_t FN(at_least)(const float *s, int n, float thr)
{
    VF vthr = VSET1(thr);
    uint64_t bits = 0;
    int i = 0;
    for (; i + VW <= n; i += VW)
        bits |= VMASK_NLT(VLOAD(s + i), vthr) << i;
    for (; i < n; i++)
        bits |= (uint64_t)!(s[i] < thr) << i;
    return bits;
}

/* Sums n words: a pure streaming read for the bandwidth probe (compiler vectorises it). */
static KATTR uint64_t FN(read_sum)(const uint64_t *restrict p, int64_t n)
{
    uint64_t s = 0;
    for (int64_t i = 0; i < n; i++)
        s += p[i];
    return s;
}

static const kernels_t FN(kernels) = {
    STR_SFX(SFX),
    FN(scores),
    FN(accum),
    FN(exp_sub_sum),
    FN(max_f32),
    FN(scale_f32),
    FN(at_least),
    FN(read_sum),
};

#undef FN
/* The includer's parameters, so the next instantiation can define its own. */
#undef SFX
#undef KATTR
#undef ACC_NV
#undef SCORE_NT4
#undef SPECIALIZE_D
#undef VW
#undef VF
#undef VZERO
#undef VSET1
#undef VLOAD
#undef VSTORE
#undef VLOADN
#undef VSTOREN
#undef VADD
#undef VSUB
#undef VMUL
#undef VFMA
#undef VMAX
#undef VRSUM
#undef VRSUM8
#undef VRMAX
#undef VMASK_NLT
#undef VEXP
#undef VLOAD_BF16
#undef VLOAD_F16
