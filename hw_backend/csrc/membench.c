/*
 * membench.c - memory microbenchmarks behind `hgsim calibrate` that Python cannot time.
 *
 * The simulator's host-memory model (hgsim/memory.py) needs three things per core and tier:
 * how many cache lines one core keeps in flight on random accesses (memory-level parallelism),
 * what a random row gather of a given row size achieves with n threads, and how a tier's
 * latency rises with the load on it. Each needs loads issued from C at full speed, with the
 * GIL released:
 *   - chase:        N independent pointer chases interleaved in one loop; each chain has
 *                   exactly one load outstanding, so up to the core's miss buffers N lines
 *                   are in flight and the time per step stays the latency;
 *   - gather:       random rows of a given size, every cache line of a row read once (one
 *                   8-byte word per line), rows split over OpenMP threads;
 *   - loaded_chase: one dependent chase while other threads stream another buffer at a
 *                   chosen rate (a read loop that spins between blocks), for loaded latency.
 * Times are taken per thread in CPU time as well as wall time: on a machine shared with other
 * jobs a thread may wait for a core longer than it runs, and how long it runs is what the
 * memory system decides. Their ratio (the thread's share of a core) is returned too, so a
 * caller can tell whether threads that should have overlapped did.
 * Input checking lives in hw_backend/memprobe.py. Here an index outside its buffer is read as
 * 0 (a compare and a conditional move, ~1 ns against ~100 ns of memory latency) rather than
 * checked beforehand: a pass over a 256 MiB cycle of links before every timed chase would
 * double the time of a short one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>
#include <time.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

#define MAX_CHAINS 256
#define BG_BLOCK 16384 /* bytes a background reader reads between clock checks */
#define LINE 64

static double clock_s(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double now_s(void) { return clock_s(CLOCK_MONOTONIC); }

/* CPU time of the calling thread: what a timing reads on a shared machine, where a thread
 * can wait for a core for longer than it runs (wall time then measures the scheduler). */
static double cpu_s(void) { return clock_s(CLOCK_THREAD_CPUTIME_ID); }

/* next[i], or 0 where i lies outside [0, n). */
#define LINK(next, i, n) ((uint64_t)(i) < (uint64_t)(n) ? (next)[i] : 0)

/* N chains of dependent loads, advanced in turns: chain j's next load depends only on its
 * own previous one, so the core can keep all N outstanding at once. */
static int64_t run_chase(const int64_t *next, int64_t len, int64_t *at, int n, int64_t steps)
{
    for (int64_t s = 0; s < steps; s++)
        for (int j = 0; j < n; j++)
            at[j] = LINK(next, at[j], len);
    int64_t sum = 0;
    for (int j = 0; j < n; j++)
        sum += at[j];
    return sum;
}

/*
 * Reads one word of every line of rows idx[lo..hi) (rows of row_bytes from base). Inlined with
 * a constant row size for the common ones, so the loop is a handful of instructions per line:
 * a core keeps only as many rows in flight as its reorder window holds loop iterations, and
 * with a variable size (a multiply, an inner loop) a 64 B gather kept ~30% fewer lines in
 * flight than the same loop specialised (measured on the Zen 4 VM, CPU time, back to back).
 */
static ALWAYS_INLINE uint64_t gather_span(const char *base, int64_t rows, const int64_t *idx,
                                          int64_t lo, int64_t hi, int64_t row_bytes)
{
    uint64_t total = 0;
    for (int64_t i = lo; i < hi; i++) {
        int64_t r = (uint64_t)idx[i] < (uint64_t)rows ? idx[i] : 0;
        const char *row = base + r * row_bytes;
        for (int64_t off = 0; off < row_bytes; off += LINE)
            total += *(const uint64_t *)(row + off);
    }
    return total;
}

#define GATHER_CASE(size)                                                                      \
    case size:                                                                                 \
        return gather_span(base, rows, idx, lo, hi, size);

static uint64_t gather_rows_of(const char *base, int64_t rows, const int64_t *idx, int64_t lo,
                               int64_t hi, int64_t row_bytes)
{
    switch (row_bytes) {
        GATHER_CASE(64)
        GATHER_CASE(128)
        GATHER_CASE(256)
        GATHER_CASE(512)
        GATHER_CASE(1024)
        GATHER_CASE(2048)
        GATHER_CASE(4096)
    default:
        return gather_span(base, rows, idx, lo, hi, row_bytes);
    }
}

typedef struct {
    double cpu_s;  /* longest CPU time of a thread */
    double wall_s; /* wall time of the parallel region */
    double share;  /* least CPU time / wall time over the threads */
    uint64_t sum;
} gather_t;

/* Random rows idx[0..n) split over nthreads threads, each a contiguous share. The sum is
 * returned, so the loads cannot be dropped. */
static gather_t run_gather(const char *base, int64_t rows, const int64_t *idx, int64_t n,
                           int64_t row_bytes, int nthreads)
{
    gather_t g = {0.0, 0.0, 1.0, 0};
    double w0 = now_s();
#pragma omp parallel num_threads(nthreads)
    {
        int tid = 0, nth = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        nth = omp_get_num_threads();
#endif
        int64_t lo = n * tid / nth, hi = n * (tid + 1) / nth;
        double c0 = cpu_s(), t0 = now_s();
        uint64_t total = gather_rows_of(base, rows, idx, lo, hi, row_bytes);
        double c = cpu_s() - c0, w = now_s() - t0;
#pragma omp critical
        {
            g.sum += total;
            if (c > g.cpu_s)
                g.cpu_s = c;
            if (w > 0 && c / w < g.share)
                g.share = c / w;
        }
    }
    g.wall_s = now_s() - w0;
    return g;
}

static uint64_t read_block(const uint64_t *p, int64_t words)
{
    uint64_t a = 0, b = 0, c = 0, d = 0;
    int64_t i = 0;
    for (; i + 4 <= words; i += 4) {
        a += p[i];
        b += p[i + 1];
        c += p[i + 2];
        d += p[i + 3];
    }
    for (; i < words; i++)
        a += p[i];
    return a + b + c + d;
}

typedef struct {
    double chase_cpu_s;  /* CPU time of the measured chase */
    double chase_wall_s; /* its wall time */
    double bg_s;         /* wall time the background readers were counted over */
    double bg_share;     /* least CPU time / wall time of a reader over that span */
    int64_t bg_bytes;    /* bytes they read meanwhile */
    int64_t end;         /* where the chase ended (keeps it from being elided) */
} loaded_t;

/*
 * Thread 0 follows `steps` dependent links from `at` while threads 1..bg read their slices of
 * `buf` over and over, each at bg_Bps / bg bytes per second (<= 0: as fast as it can), until
 * the chase is done. The chase begins `settle_s` after every reader has started (or after a
 * second, if one never gets a core: its rate then says so), so it sees the load from its
 * first step; the readers' rate is measured over the same span.
 */
static loaded_t run_loaded(const int64_t *next, int64_t len, int64_t steps, int64_t at,
                           const uint64_t *buf,
                           int64_t words, int bg, double bg_Bps, double settle_s)
{
    loaded_t r = {0.0, 0.0, 0.0, bg > 0 ? 1.0 : 0.0, 0, at};
    volatile int done = 0, started = 0, running = 0;
    double t_start = 0.0, t_end = 0.0, c_start = 0.0, c_end = 0.0;
    uint64_t sink = 0;
#pragma omp parallel num_threads(bg + 1) reduction(+ : sink)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        if (tid == 0) {
            double t0 = now_s();
            while (__atomic_load_n(&running, __ATOMIC_ACQUIRE) < bg && now_s() - t0 < 1.0)
                ;
            t0 = now_s();
            while (bg > 0 && now_s() - t0 < settle_s)
                ;
            __atomic_store_n(&started, 1, __ATOMIC_RELEASE);
            t_start = now_s();
            c_start = cpu_s();
            int64_t p = at;
            for (int64_t i = 0; i < steps; i++)
                p = LINK(next, p, len);
            c_end = cpu_s();
            t_end = now_s();
            r.end = p;
            __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
        } else {
            int64_t lo = words * (tid - 1) / bg, hi = words * tid / bg;
            int64_t block = BG_BLOCK / 8, pos = lo, mine = 0, counted = 0;
            double rate = bg_Bps > 0 ? bg_Bps / bg : 0.0, t0 = now_s(), tc = 0.0, cc = 0.0;
            int counting = 0;
            __atomic_fetch_add(&running, 1, __ATOMIC_ACQ_REL);
            while (!__atomic_load_n(&done, __ATOMIC_ACQUIRE)) {
                if (!counting && __atomic_load_n(&started, __ATOMIC_ACQUIRE)) {
                    counting = 1;
                    counted = mine;
                    tc = now_s();
                    cc = cpu_s();
                }
                int64_t n = hi - pos < block ? hi - pos : block;
                if (n <= 0) {
                    pos = lo;
                    continue;
                }
                sink += read_block(buf + pos, n);
                pos += n;
                mine += 8 * n;
                if (rate > 0)
                    while (now_s() - t0 < (double)mine / rate &&
                           !__atomic_load_n(&done, __ATOMIC_ACQUIRE))
                        ;
            }
            double span = counting ? now_s() - tc : 0.0, ran = counting ? cpu_s() - cc : 0.0;
#pragma omp critical
            {
                r.bg_bytes += mine - counted;
                if (span > r.bg_s)
                    r.bg_s = span;
                double share = span > 0 ? ran / span : 0.0;
                if (share < r.bg_share)
                    r.bg_share = share;
            }
        }
    }
    r.chase_cpu_s = c_end - c_start;
    r.chase_wall_s = t_end - t_start;
    r.end += (int64_t)(sink & 1);
    return r;
}

/* ------------------------------------------------------------------------------------------
 * Python bindings.
 */

static int get_buffer(PyObject *obj, Py_buffer *b, const char *name, Py_ssize_t itemsize)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous array", name);
        return 0;
    }
    if (itemsize && b->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd-byte items", name, itemsize);
        PyBuffer_Release(b);
        return 0;
    }
    return 1;
}

static PyObject *py_chase(PyObject *self, PyObject *args)
{
    PyObject *no, *so;
    Py_ssize_t steps;
    Py_buffer next, starts;
    int64_t at[MAX_CHAINS], sum = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOn", &no, &so, &steps))
        return NULL;
    if (!get_buffer(no, &next, "next", 8))
        return NULL;
    if (!get_buffer(so, &starts, "starts", 8)) {
        PyBuffer_Release(&next);
        return NULL;
    }
    int64_t n = (int64_t)(next.len / 8), chains = (int64_t)(starts.len / 8);
    if (chains < 1 || chains > MAX_CHAINS || steps < 0 || n < 1) {
        PyErr_SetString(PyExc_ValueError, "chase: 1..256 starts, steps >= 0, links to follow");
        PyBuffer_Release(&next);
        PyBuffer_Release(&starts);
        return NULL;
    }
    memcpy(at, starts.buf, (size_t)chains * 8);
    Py_BEGIN_ALLOW_THREADS
    sum = run_chase(next.buf, n, at, (int)chains, steps);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&next);
    PyBuffer_Release(&starts);
    return PyLong_FromLongLong(sum);
}

static PyObject *py_gather(PyObject *self, PyObject *args)
{
    PyObject *bo, *io;
    Py_ssize_t row_bytes;
    int nthreads;
    Py_buffer buf, idx;
    gather_t g;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOni", &bo, &io, &row_bytes, &nthreads))
        return NULL;
    if (!get_buffer(bo, &buf, "buf", 0))
        return NULL;
    if (!get_buffer(io, &idx, "idx", 8)) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    int64_t rows = row_bytes > 0 ? (int64_t)(buf.len / row_bytes) : 0;
    int64_t n = (int64_t)(idx.len / 8);
    if (row_bytes < 8 || nthreads < 1 || rows < 1) {
        PyErr_SetString(PyExc_ValueError, "gather: row_bytes >= 8, threads >= 1, a row in buf");
        PyBuffer_Release(&buf);
        PyBuffer_Release(&idx);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    g = run_gather(buf.buf, rows, idx.buf, n, row_bytes, nthreads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    PyBuffer_Release(&idx);
    return Py_BuildValue("(dddK)", g.cpu_s, g.wall_s, g.share, (unsigned long long)g.sum);
}

static PyObject *py_loaded_chase(PyObject *self, PyObject *args)
{
    PyObject *no, *bo;
    Py_ssize_t steps, at;
    int bg;
    double bg_Bps, settle_s;
    Py_buffer next, buf;
    loaded_t r;
    (void)self;
    if (!PyArg_ParseTuple(args, "OnnOidd", &no, &steps, &at, &bo, &bg, &bg_Bps, &settle_s))
        return NULL;
    if (!get_buffer(no, &next, "next", 8))
        return NULL;
    if (!get_buffer(bo, &buf, "buf", 0)) {
        PyBuffer_Release(&next);
        return NULL;
    }
    int64_t n = (int64_t)(next.len / 8), words = (int64_t)(buf.len / 8);
    if (steps < 0 || at < 0 || at >= n || bg < 0 || (bg > 0 && words < bg)) {
        PyErr_SetString(PyExc_ValueError, "loaded_chase: bad steps, start, threads or buffers");
        PyBuffer_Release(&next);
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    r = run_loaded(next.buf, n, steps, at, buf.buf, words, bg, bg_Bps, settle_s);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&next);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(ddddLL)", r.chase_cpu_s, r.chase_wall_s, r.bg_s, r.bg_share,
                         (long long)r.bg_bytes, (long long)r.end);
}

static PyMethodDef methods[] = {
    {"chase", py_chase, METH_VARARGS,
     "chase(next, starts, steps) -> checksum; len(starts) interleaved dependent chases"},
    {"gather", py_gather, METH_VARARGS,
     "gather(buf, idx, row_bytes, nthreads) -> (cpu_s, wall_s, share, checksum); one word "
     "of every line of each row"},
    {"loaded_chase", py_loaded_chase, METH_VARARGS,
     "loaded_chase(next, steps, at, buf, bg_threads, bg_Bps, settle_s) -> "
     "(chase_cpu_s, chase_wall_s, bg_s, bg_share, bg_bytes, end)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_membench",
    "Memory microbenchmarks behind hgsim calibrate (use hw_backend.memprobe).", -1, methods,
};

PyMODINIT_FUNC PyInit__membench(void) { return PyModule_Create(&module); }
