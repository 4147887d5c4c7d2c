/* Native kernels of detkit's CPU fast path (detkit/native.py): Winograd F(m x m, 3 x 3)
 * transforms, darknet's maxpool and the [yolo] activation + decode.
 *
 * Activations are channels-last (NHWC) float32. The input transform gathers each (m+2)^2 tile,
 * zero-padded by 1 at the map's top/left (and as far as needed at the bottom/right), and writes
 * V = B^T d B as (tile, point, channel); the channel GEMMs run elsewhere (oneDNN); the output
 * transform reads M as (tile, point, channel), computes A^T M A, applies the activation and
 * writes the m x m pixels that lie inside the map. Each transform is one pass over memory and
 * one OpenMP parallel region, where the same work as PyTorch ops takes four to five of each.
 *
 * Only GOMP_parallel and omp_get_{thread_num,num_threads} are used (static schedule), so the
 * library binds to the libgomp that torch has already loaded (same soname, same thread pool).
 */
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 16 /* channels per block: one AVX-512 register of float32 */

static const float BT4[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
static const float AT4[4][6] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
static const float BT2[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
static const float AT2[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};

enum { ACT_LINEAR = 0, ACT_LEAKY = 1, ACT_RELU = 2, ACT_LOGISTIC = 3 };

/* GCC vector types: the compiler emits SIMD code for them whatever its cost model says. */
typedef float vec __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t))));

/* Split `total` items evenly over the team; [*begin, *end) is this thread's share. */
static void share(int64_t total, int64_t *begin, int64_t *end) {
    int64_t threads = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t chunk = total / threads, extra = total % threads;
    *begin = me * chunk + (me < extra ? me : extra);
    *end = *begin + chunk + (me < extra ? 1 : 0);
}

/* `width` (<= VL) channels from memory; the lanes past them are zero. */
static inline vec load(const float *src, int64_t width) {
    vec value = {0};
    if (width == VL) memcpy(&value, src, sizeof value);
    else memcpy(&value, src, width * sizeof(float));
    return value;
}

static inline void store(float *dst, vec value, int64_t width) {
    if (width == VL) memcpy(dst, &value, sizeof value);
    else memcpy(dst, &value, width * sizeof(float));
}

/* where `take`, b, else a: branch-free (a select on a compare mask) */
static inline vec select(ivec take, vec a, vec b) {
    return (vec)(((ivec)b & take) | ((ivec)a & ~take));
}

/* the larger of a and b, NaN if either is NaN (as torch.maximum and max_pool2d) */
static inline vec nan_max(vec a, vec b) { return select((b > a) | (b != b), a, b); }

static inline vec activate(vec value, int act) {
    switch (act) {
    case ACT_LEAKY: return select(value < 0.0f, value, value * 0.1f);   /* NaN stays NaN */
    case ACT_RELU: return select(value < 0.0f, value, (vec){0});
    case ACT_LOGISTIC:
        for (int l = 0; l < VL; l++) value[l] = 1.0f / (1.0f + expf(-value[l]));
        return value;
    default: return value;
    }
}

/* OUT[i][j] = sum over k of COEF * TERM (i < R, j < COLS, k < K), COEF an entry of a constant
 * matrix: the loops unroll, so its zero coefficients cost nothing. */
#define COMBINE(OUT, R, COLS, K, COEF, TERM)                                                     \
    _Pragma("GCC unroll 8") for (int i = 0; i < R; i++)                                         \
        _Pragma("GCC unroll 8") for (int j = 0; j < COLS; j++) {                                \
        vec acc = {0};                                                                           \
        _Pragma("GCC unroll 8") for (int k = 0; k < K; k++) if (COEF != 0.0f) acc +=            \
            COEF * TERM;                                                                         \
        OUT[i][j] = acc;                                                                         \
    }

/* The 1-D transform T (R x K) along a tile's rows, then its columns: OUT = T IN T^T for IN
 * (K x K) -> OUT (R x R), TMP (R x K). */
#define TRANSFORM_2D(OUT, TMP, T, IN, R, K)                                                      \
    COMBINE(TMP, R, K, K, T[i][k], IN[k][j])                                                     \
    COMBINE(OUT, R, R, K, T[j][k], TMP[i][k])

/* A map (n, h, w, c) cut into m x m tiles and VL-channel blocks: one work item per (tile,
 * block). `src` and `dst` are the transform's input and output. */
typedef struct {
    const float *src;
    float *dst;
    int64_t n, h, w, c, th, tw, blocks;
    int act;
} tile_job;

typedef struct {
    int64_t b, ty, tx, tile, c0, width;   /* image, tile row and column, tile index, channels */
} tile_item;

static tile_job tile_job_of(const float *src, float *dst, int64_t n, int64_t h, int64_t w,
                            int64_t c, int m, int act) {
    const tile_job job = {src, dst, n, h, w, c, (h + m - 1) / m, (w + m - 1) / m,
                          (c + VL - 1) / VL, act};
    return job;
}

static tile_item locate(const tile_job *job, int64_t index) {
    const int64_t block = index % job->blocks, tile = index / job->blocks;
    const int64_t c0 = block * VL;
    const tile_item at = {tile / (job->tw * job->th), (tile / job->tw) % job->th,
                          tile % job->tw, tile, c0, job->c - c0 < VL ? job->c - c0 : VL};
    return at;
}

/* The work items split evenly over one parallel region. */
static void for_each_tile_item(const tile_job *job, void (*work)(const tile_job *, int64_t),
                               int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        share(job->n * job->th * job->tw * job->blocks, &begin, &end);
        for (int64_t index = begin; index < end; index++) work(job, index);
    }
}

/* d: the (A x A) tile, zero outside the map -> V = B^T d B at (tile, point, channel) */
#define DEFINE_INPUT_ITEM(NAME, A, M, BT)                                                        \
    static void NAME(const tile_job *job, int64_t index) {                                       \
        const tile_item at = locate(job, index);                                                 \
        const int64_t h = job->h, w = job->w, c = job->c;                                        \
        vec d[A][A], t[A][A], u[A][A];                                                           \
        for (int i = 0; i < A; i++) {                                                            \
            const int64_t yy = at.ty * M - 1 + i;                                                \
            for (int j = 0; j < A; j++) {                                                        \
                const int64_t xx = at.tx * M - 1 + j;                                            \
                const int inside = yy >= 0 && yy < h && xx >= 0 && xx < w;                      \
                d[i][j] = inside ? load(job->src + ((at.b * h + yy) * w + xx) * c + at.c0,      \
                                        at.width)                                                \
                                 : (vec){0};                                                     \
            }                                                                                    \
        }                                                                                        \
        TRANSFORM_2D(u, t, BT, d, A, A)                                                          \
        float *out = job->dst + at.tile * (A * A) * c + at.c0;                                   \
        for (int i = 0; i < A; i++)                                                              \
            for (int j = 0; j < A; j++) store(out + (i * A + j) * c, u[i][j], at.width);         \
    }

/* M at (tile, point, channel) -> act(A^T M A), the pixels inside the map */
#define DEFINE_OUTPUT_ITEM(NAME, A, M, AT)                                                       \
    static void NAME(const tile_job *job, int64_t index) {                                       \
        const tile_item at = locate(job, index);                                                 \
        const int64_t h = job->h, w = job->w, c = job->c;                                        \
        const float *in = job->src + at.tile * (A * A) * c + at.c0;                              \
        vec p[A][A], t[M][A], o[M][M];                                                           \
        for (int i = 0; i < A; i++)                                                              \
            for (int j = 0; j < A; j++) p[i][j] = load(in + (i * A + j) * c, at.width);          \
        TRANSFORM_2D(o, t, AT, p, M, A)                                                          \
        for (int i = 0; i < M && at.ty * M + i < h; i++)                                         \
            for (int j = 0; j < M && at.tx * M + j < w; j++)                                     \
                store(job->dst + ((at.b * h + at.ty * M + i) * w + at.tx * M + j) * c + at.c0,  \
                      activate(o[i][j], job->act), at.width);                                    \
    }

DEFINE_INPUT_ITEM(input_f4, 6, 4, BT4)
DEFINE_INPUT_ITEM(input_f2, 4, 2, BT2)
DEFINE_OUTPUT_ITEM(output_f4, 6, 4, AT4)
DEFINE_OUTPUT_ITEM(output_f2, 4, 2, AT2)

/* x: (n, h, w, c) -> v: (n * ceil(h/m) * ceil(w/m), (m+2)^2, c). Returns 0, or -1 for bad m. */
int detkit_winograd_input(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, int m,
                          float *v, int threads) {
    if (m != 2 && m != 4) return -1;
    const tile_job job = tile_job_of(x, v, n, h, w, c, m, ACT_LINEAR);
    for_each_tile_item(&job, m == 4 ? input_f4 : input_f2, threads);
    return 0;
}

/* mm: (tiles, (m+2)^2, c) -> y: (n, h, w, c), activation applied. Returns 0, or -1. */
int detkit_winograd_output(const float *mm, int64_t n, int64_t h, int64_t w, int64_t c, int m,
                           int act, float *y, int threads) {
    if ((m != 2 && m != 4) || act < ACT_LINEAR || act > ACT_LOGISTIC) return -1;
    const tile_job job = tile_job_of(mm, y, n, h, w, c, m, act);
    for_each_tile_item(&job, m == 4 ? output_f4 : output_f2, threads);
    return 0;
}

/* Darknet maxpool on (n, h, w, c): window `size`, `stride`, starting `before` pixels above and
 * left of the map; pixels outside the map are skipped (darknet's -inf padding). y is
 * (n, out_h, out_w, c); a window with no pixel inside the map gives -inf.
 * The same code serves bfloat16 maps (the CPU bf16 path): each bf16 is the top half of a
 * float32, so it is widened by a shift, compared as float and narrowed back exactly (the max of
 * bf16 values is one of them). torch's own bf16 pooling took 3.7 ms on a channels-last
 * 16x416x416 map, this 0.2. `bf16` is a constant in each caller, so the compiler specialises. */
typedef uint16_t hvec __attribute__((vector_size(VL * sizeof(uint16_t))));

static inline vec load_any(const void *src, int64_t index, int bf16) {
    if (!bf16) return load((const float *)src + index, VL);
    hvec half;
    memcpy(&half, (const uint16_t *)src + index, sizeof half);
    return (vec)(__builtin_convertvector(half, ivec) << 16);
}

static inline void store_any(void *dst, int64_t index, vec value, int bf16) {
    if (!bf16) {
        store((float *)dst + index, value, VL);
        return;
    }
    const hvec half = __builtin_convertvector((ivec)value >> 16, hvec);
    memcpy((uint16_t *)dst + index, &half, sizeof half);
}

static inline float scalar_any(const void *src, int64_t index, int bf16) {
    if (!bf16) return ((const float *)src)[index];
    const uint32_t bits = (uint32_t)((const uint16_t *)src)[index] << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline void put_scalar_any(void *dst, int64_t index, float value, int bf16) {
    if (!bf16) {
        ((float *)dst)[index] = value;
        return;
    }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    ((uint16_t *)dst)[index] = (uint16_t)(bits >> 16);
}

static inline __attribute__((always_inline)) int maxpool_any(
        const void *x, int64_t n, int64_t h, int64_t w, int64_t c, int size, int stride,
        int before, int64_t out_h, int64_t out_w, void *y, int threads, const int bf16) {
    if (size < 1 || stride < 1) return -1;
    const int64_t rows = n * out_h;
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        share(rows, &begin, &end);
        for (int64_t row = begin; row < end; row++) {
            const int64_t oy = row % out_h, b = row / out_h;
            const int64_t y0 = oy * stride - before;
            const int64_t ky0 = y0 < 0 ? -y0 : 0, ky1 = y0 + size > h ? h - y0 : size;
            for (int64_t ox = 0; ox < out_w; ox++) {
                const int64_t dst = (row * out_w + ox) * c;
                const int64_t x0 = ox * stride - before;
                const int64_t kx0 = x0 < 0 ? -x0 : 0, kx1 = x0 + size > w ? w - x0 : size;
                int64_t c0 = 0;
                for (; c0 + VL <= c; c0 += VL) {
                    vec best = (vec){0} - INFINITY;
                    for (int64_t ky = ky0; ky < ky1; ky++) {
                        const int64_t src = ((b * h + y0 + ky) * w + x0) * c + c0;
                        for (int64_t kx = kx0; kx < kx1; kx++)
                            best = nan_max(best, load_any(x, src + kx * c, bf16));
                    }
                    store_any(y, dst + c0, best, bf16);
                }
                for (; c0 < c; c0++) {
                    float best = -INFINITY;
                    for (int64_t ky = ky0; ky < ky1; ky++)
                        for (int64_t kx = kx0; kx < kx1; kx++) {
                            const float value =
                                scalar_any(x, ((b * h + y0 + ky) * w + x0 + kx) * c + c0, bf16);
                            best = value > best || value != value ? value : best;
                        }
                    put_scalar_any(y, dst + c0, best, bf16);
                }
            }
        }
    }
    return 0;
}

int detkit_maxpool(const float *x, int64_t n, int64_t h, int64_t w, int64_t c, int size,
                   int stride, int before, int64_t out_h, int64_t out_w, float *y, int threads) {
    return maxpool_any(x, n, h, w, c, size, stride, before, out_h, out_w, y, threads, 0);
}

int detkit_maxpool_bf16(const uint16_t *x, int64_t n, int64_t h, int64_t w, int64_t c, int size,
                        int stride, int before, int64_t out_h, int64_t out_w, uint16_t *y,
                        int threads) {
    return maxpool_any(x, n, h, w, c, size, stride, before, out_h, out_w, y, threads, 1);
}

/* exp(x) per lane: Cephes' expf (range reduction by ln 2, degree-5 polynomial, about 1 ulp);
 * the argument is clamped to +-88.37 (exp of it is still a normal float). */
static inline vec vexp(vec x) {
    const vec limit = (vec){0} + 88.3762626647949f;
    x = select(x > limit, x, limit);       /* comparisons with NaN are false: NaN stays NaN */
    x = select(x < -limit, x, -limit);
    vec fx = x * 1.44269504088896341f + 0.5f;                 /* floor(x / ln 2 + 0.5) */
    vec whole = __builtin_convertvector(__builtin_convertvector(fx, ivec), vec);
    whole += __builtin_convertvector(whole > fx, vec);        /* truncation -> floor: -1 where above */
    x = x - whole * 0.693359375f + whole * 2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * x + 1.3981999507e-3f;
    p = p * x + 8.3334519073e-3f;
    p = p * x + 4.1665795894e-2f;
    p = p * x + 1.6666665459e-1f;
    p = p * x + 5.0000001201e-1f;
    p = p * x * x + x + 1.0f;
    const ivec exponent = (__builtin_convertvector(whole, ivec) + 127) << 23;   /* 2^whole */
    return p * (vec)exponent;
}

static inline vec vsigmoid(vec x) { return 1.0f / (1.0f + vexp(-x)); }

/* Darknet's [yolo] activation and decode in one pass, from the logits of the last conv:
 * x (b, anchors * k, h, w) with element strides `strides` (b, channel, y, x), k = 5 + classes;
 * out (b, anchors * h * w, k): cx, cy (input pixels: cell + scale_xy-adjusted sigmoid, times
 * the cell size), w, h (exp times the anchor), sigmoid(objectness), sigmoid(classes). */
int detkit_yolo_decode(const float *x, int64_t b, int64_t h, int64_t w, int64_t anchors,
                       int64_t k, const int64_t *strides, const float *anchor_wh, float scale_xy,
                       float cell_w, float cell_h, float *out, int threads) {
    if (k < 5) return -1;
    const int64_t cells = b * h * w;
    const int contiguous_channels = strides[1] == 1;
#pragma omp parallel num_threads(threads)
    {
        int64_t begin, end;
        share(cells * anchors, &begin, &end);
        float gathered[VL];
        for (int64_t item = begin; item < end; item++) {
            const int64_t a = item % anchors, cell = item / anchors;
            const int64_t xx = cell % w, yy = (cell / w) % h, bi = cell / (w * h);
            const float *src = x + bi * strides[0] + a * k * strides[1] + yy * strides[2] +
                               xx * strides[3];
            float *dst = out + ((bi * anchors + a) * h * w + yy * w + xx) * k;
            for (int64_t j0 = 0; j0 < k; j0 += VL) {
                const int64_t width = k - j0 < VL ? k - j0 : VL;
                vec logits;
                if (contiguous_channels) {
                    logits = load(src + j0, width);
                } else {
                    for (int64_t l = 0; l < width; l++) gathered[l] = src[(j0 + l) * strides[1]];
                    logits = load(gathered, width);
                }
                vec value = vsigmoid(logits);
                if (j0 == 0) {
                    const vec grown = vexp(logits);
                    const float shift = (scale_xy - 1.0f) / 2.0f;
                    value[0] = (value[0] * scale_xy - shift + (float)xx) * cell_w;
                    value[1] = (value[1] * scale_xy - shift + (float)yy) * cell_h;
                    value[2] = grown[2] * anchor_wh[2 * a];
                    value[3] = grown[3] * anchor_wh[2 * a + 1];
                }
                store(dst + j0, value, width);
            }
        }
    }
    return 0;
}
