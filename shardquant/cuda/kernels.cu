// shardquant CUDA kernels. Inputs are raw storage: bf16 and f16 as unsigned short, f32 as float.
// Every fp32 operation uses the _rn intrinsics, so it is correctly rounded and never contracted
// into an FMA: results equal the NumPy path (and ModelOpt on the CPU) bit for bit.

#define E4M3_MAX 448.0f

// Raw<T>: one storage type's magnitude bits (|x|, ordered as integers), exact fp32 value and sign;
// inf_mag() is the magnitude at or above which a value is Inf or NaN (formats/base.py _NONFINITE).
template <typename T> struct Raw;
template <> struct Raw<unsigned short> {  // bf16
    static __device__ __forceinline__ unsigned int mag(unsigned short v) { return v & 0x7fffu; }
    static __device__ __forceinline__ float f32(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }
    static __device__ __forceinline__ float mag_f32(unsigned int m) { return __uint_as_float(m << 16); }
    static __device__ __forceinline__ unsigned int mag_f32_bits(unsigned int m) { return m << 16; }
    static __device__ __forceinline__ bool negative(unsigned short v) { return v & 0x8000u; }
    static __device__ __forceinline__ unsigned int inf_mag() { return 0x7f80u; }
};
struct Half {};  // f16, stored as unsigned short
__device__ __forceinline__ float f16_bits_to_f32(unsigned int h) {
    unsigned int s = (h >> 15) & 1u, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    float v;
    if (e == 0) v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    else if (e == 31) v = m ? __uint_as_float(0x7fc00000u) : __uint_as_float(0x7f800000u);
    else v = __uint_as_float(((e + 112u) << 23) | (m << 13));
    return s ? -v : v;
}
template <> struct Raw<Half> {
    static __device__ __forceinline__ unsigned int mag(unsigned short v) { return v & 0x7fffu; }
    static __device__ __forceinline__ float f32(unsigned short v) { return f16_bits_to_f32(v); }
    static __device__ __forceinline__ float mag_f32(unsigned int m) { return f16_bits_to_f32(m); }
    static __device__ __forceinline__ unsigned int mag_f32_bits(unsigned int m) { return __float_as_uint(f16_bits_to_f32(m)); }
    static __device__ __forceinline__ bool negative(unsigned short v) { return v & 0x8000u; }
    static __device__ __forceinline__ unsigned int inf_mag() { return 0x7c00u; }
};
template <> struct Raw<float> {
    static __device__ __forceinline__ unsigned int mag(float v) { return __float_as_uint(v) & 0x7fffffffu; }
    static __device__ __forceinline__ float f32(float v) { return v; }
    static __device__ __forceinline__ float mag_f32(unsigned int m) { return __uint_as_float(m); }
    static __device__ __forceinline__ unsigned int mag_f32_bits(unsigned int m) { return m; }
    static __device__ __forceinline__ bool negative(float v) { return __float_as_uint(v) >> 31; }
    static __device__ __forceinline__ unsigned int inf_mag() { return 0x7f800000u; }
};
template <typename T> struct Store { typedef T type; };
template <> struct Store<Half> { typedef unsigned short type; };

// float -> E4M3 code, round to nearest even. |x| must be <= 448 (callers clamp).
__device__ __forceinline__ unsigned int e4m3_rne(float x) {
    unsigned int b = __float_as_uint(x);
    unsigned int sign = (b >> 24) & 0x80u;
    unsigned int a = b & 0x7fffffffu;
    unsigned int code;
    if (a >= 0x3c800000u) {  // >= 2^-6: normal E4M3
        unsigned int q = a >> 20, rest = a & 0xfffffu;
        if (rest > 0x80000u || (rest == 0x80000u && (q & 1u))) q += 1u;
        code = q - (120u << 3);
    } else {  // subnormal E4M3: units of 2^-9; x * 512 is exact
        code = __float2uint_rn(__uint_as_float(a) * 512.0f);
    }
    return sign | code;
}

__device__ __forceinline__ float e4m3_to_f32(unsigned int c) {
    unsigned int e = (c >> 3) & 0xfu, m = c & 7u;
    float v = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f;
    return (c & 0x80u) ? -v : v;
}

// E2M1 code of an fp32 value: ties at 0.25, 1.25, 2.5, 5 round down, at 0.75, 1.75, 3.5 up;
// sign bit for x < 0 only (so -0.0 gives 0).
__device__ __forceinline__ unsigned int e2m1(float x) {
    float a = fabsf(x);
    unsigned int c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return c | ((x < 0.0f) ? 8u : 0u);
}

// fp32 value of an E2M1 magnitude code 0..7 (0, 0.5, 1, 1.5, 2, 3, 4, 6), from its bits: exponent
// c >> 1 (bias 1), mantissa c & 1; code 1 is the subnormal 0.5. Exact.
__device__ __forceinline__ float e2m1_mag(unsigned int c) {
    return c < 2u ? (float)c * 0.5f : __uint_as_float((((c >> 1) + 126u) << 23) | ((c & 1u) << 22));
}

__device__ __forceinline__ float e2m1_value(unsigned int c) {  // a signed code 0..15
    float v = e2m1_mag(c & 7u);
    return (c & 8u) ? -v : v;
}

// E2M1 magnitude code 0..7 of fp32 magnitude bits `a` against one row of nvfp4.code_thresholds
// (lo = the thresholds of 0.25, 0.75, 1.25, 1.75; hi = of 2.5, 3.5, 5, then the sign threshold):
// a 3-step search. Thresholds and magnitudes compare as fp32 bit patterns (integer order is the order
// of non-negative floats), so tiny and subnormal thresholds compare exactly, whatever the FTZ mode.
__device__ __forceinline__ unsigned int nvfp4_mag_code(unsigned int a, uint4 lo, uint4 hi) {
    bool b4 = a >= lo.w;                      // passes 1.75: code >= 4
    bool b2 = a >= (b4 ? hi.y : lo.y);        // passes 3.5 / 0.75
    unsigned int t1 = b4 ? (b2 ? hi.z : hi.x) : (b2 ? lo.z : lo.x);
    bool b1 = a >= t1;                        // passes 5 / 2.5 / 1.25 / 0.25
    return (b4 ? 4u : 0u) | (b2 ? 2u : 0u) | (b1 ? 1u : 0u);
}

// ---- --scale-search mse (formats/nvfp4.py search_scales, formats/mxfp4.py search_scales,
// formats/fp8_block.py search_tile_scales) ----
// Each candidate's error is the NumPy path's, operation for operation: the element codes it writes,
// their values times the candidate scale rounded as NumPy rounds them (fp32, or float64 where it
// multiplies in float64), then (x - deq)^2 in float64 added one term at a time in the NumPy path's fixed
// element order. So every sum is the CPU's to the bit, and so is every comparison: strictly less
// moves, so a tie (or a NaN) keeps the earlier candidate, RTN's first.

// Candidate k's step from round to nearest: 0, -1, +1, -2, +2 (nvfp4.SEARCH_STEPS, mxfp4.SEARCH_STEPS
// its first three; fp8_block.SEARCH_FACTORS are 1 + step / 16).
__device__ __forceinline__ int search_step(int k) {
    return ((k + 1) >> 1) * ((k & 1) ? -1 : 1);
}

// (x - deq)^2 in float64, each operation correctly rounded (never fused): one term of the sums above.
__device__ __forceinline__ double sq_err(double x, double deq) {
    double d = __dsub_rn(x, deq);
    return __dmul_rn(d, d);
}

// max |x| as magnitude bits (their integer order is the order of |x| for finite values).
template <typename T>
__global__ void amax_bits(const typename Store<T>::type* __restrict__ x, long long n, unsigned int* out) {
    unsigned int m = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        m = max(m, Raw<T>::mag(x[i]));
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    __shared__ unsigned int s[32];
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < (blockDim.x >> 5) ? s[threadIdx.x] : 0u;
        for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (threadIdx.x == 0) atomicMax(out, m);
    }
}

// One NVFP4 block's scale code under --scale-search mse (formats/nvfp4.py search_scales): RTN's code
// `sc`, then sc - 1, sc + 1, sc - 2, sc + 2 within [1, 0x7e] (2^-9 .. 448). block_sse's error: the
// code of each element by the candidate's thresholds, deq = value x (scale x s2) in fp32, then
// (|x| - deq)^2 summed in float64 over elements 0..15 in turn. Magnitudes suffice: deq has x's sign
// or is zero, and rounding is symmetric, so the signed difference has the same square.
__device__ unsigned int nvfp4_search(const unsigned int (&a)[16], unsigned int sc, float s2,
                                     const uint4* __restrict__ thr) {
    unsigned int best = sc;
    double best_err = 0.0;
    for (int k = 0; k < 5; ++k) {
        int c = (int)sc + search_step(k);
        if (c < 1 || c > 0x7e) continue;
        float d = __fmul_rn(e4m3_to_f32((unsigned int)c), s2);
        uint4 lo = __ldg(thr + 2 * c), hi = __ldg(thr + 2 * c + 1);
        double err = 0.0;  // 0 + the first term is that term: the NumPy path's copy of it
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            float deq = __fmul_rn(e2m1_mag(nvfp4_mag_code(a[j], lo, hi)), d);
            err = __dadd_rn(err, sq_err((double)__uint_as_float(a[j]), (double)deq));
        }
        if (k == 0 || err < best_err) {
            best = (unsigned int)c;
            best_err = err;
        }
    }
    return best;
}

// One thread per 16-element block: block amax, E4M3 block scale, 16 E2M1 codes packed in 8 bytes.
// Matches FORMATS.md section 2 / ModelOpt 0.47 NVFP4QTensor.quantize on the CPU. The element codes
// come from `thr` (nvfp4.code_thresholds: per scale code, the exact |w| at which the correctly
// rounded quotient w / (scale * s2) passes each FP4 bound), so no element needs a division:
// nvfp4_mag_code, then the sign. SEARCH 1: the scale is nvfp4_search's (--scale-search mse).
template <typename T, int SEARCH>
__global__ void nvfp4_quant(const typename Store<T>::type* __restrict__ x, long long nblocks, float s2,
                            const uint4* __restrict__ thr,
                            unsigned long long* __restrict__ packed, unsigned char* __restrict__ scales) {
    long long b = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    typedef typename Store<T>::type S;
    S v[16];
    const uint4* src = reinterpret_cast<const uint4*>(x + b * 16);
#pragma unroll
    for (int k = 0; k < (int)(16 * sizeof(S) / 16); ++k) reinterpret_cast<uint4*>(v)[k] = src[k];
    unsigned int a[16];  // |x| as fp32 bits
    unsigned int mx = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        unsigned int m = Raw<T>::mag(v[k]);
        mx = max(mx, m);
        a[k] = Raw<T>::mag_f32_bits(m);
    }
    float bamax = Raw<T>::mag_f32(mx);
    float t = __fmul_rn(6.0f, s2);
    float s = __fdiv_rn(bamax, t);
    if (s == 0.0f) s = 1.0f;
    s = fminf(fmaxf(s, 0.001953125f), E4M3_MAX);
    unsigned int sc = e4m3_rne(s);
    if (SEARCH) sc = nvfp4_search(a, sc, s2, thr);
    uint4 lo = __ldg(thr + 2 * sc), hi = __ldg(thr + 2 * sc + 1);  // t0..t3 | t4..t6, sign threshold
    unsigned long long p = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
        unsigned int c = nvfp4_mag_code(a[k], lo, hi);
        if (Raw<T>::negative(v[k]) && a[k] >= hi.w) c |= 8u;
        p |= (unsigned long long)c << (4 * k);
    }
    packed[b] = p;
    scales[b] = (unsigned char)sc;
}

// FP8 per-tensor: q = e4m3_rne(clamp(x / scale)), 8 elements per thread.
template <typename T>
__global__ void fp8_quant(const typename Store<T>::type* __restrict__ x, long long n8, float scale,
                          unsigned long long* __restrict__ out) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n8) return;
    typedef typename Store<T>::type S;
    S v[8];
    const uint4* src = reinterpret_cast<const uint4*>(x + i * 8);
#pragma unroll
    for (int k = 0; k < (int)(8 * sizeof(S) / 16); ++k) reinterpret_cast<uint4*>(v)[k] = src[k];
    unsigned long long p = 0;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        float q = __fdiv_rn(Raw<T>::f32(v[k]), scale);
        q = fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX);
        p |= (unsigned long long)e4m3_rne(q) << (8 * k);
    }
    out[i] = p;
}

// FP8 for tensors whose size is not a multiple of 8: one element per thread.
template <typename T>
__global__ void fp8_quant_scalar(const typename Store<T>::type* __restrict__ x, long long n, float scale,
                                 unsigned char* __restrict__ out) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    float q = __fdiv_rn(Raw<T>::f32(x[i]), scale);
    out[i] = (unsigned char)e4m3_rne(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX));
}

// ---- Formats with their own scales (fp8-channel, fp8-block, mxfp8, mxfp4) ----
// Each scale comes from the max magnitude of its row, tile or block, found in the same launch as the
// codes. A NaN/Inf there writes its magnitude bits to `bad` and leaves that scale's codes unwritten;
// the host refuses the tensor (Device._refuse_nonfinite), as the NumPy path refuses it.

// V consecutive raw elements: one 16-byte load when they fill it (the caller guarantees alignment).
template <typename S, int V>
__device__ __forceinline__ void load_chunk(const S* __restrict__ p, S (&v)[V]) {
    if (V * sizeof(S) == 16) {
        *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(p));
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = p[j];
    }
}

// V code bytes (byte j of c is element j), one store when V is 4 or 8 (p aligned to V bytes).
template <int V>
__device__ __forceinline__ void store_codes(unsigned char* __restrict__ p, unsigned long long c) {
    if (V == 8) {
        *reinterpret_cast<unsigned long long*>(p) = c;
    } else if (V == 4) {
        *reinterpret_cast<unsigned int*>(p) = (unsigned int)c;
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) p[j] = (unsigned char)(c >> (8 * j));
    }
}

__device__ __forceinline__ unsigned int warp_max(unsigned int m) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    return m;
}

// The max over the thread block (blockDim.x a multiple of 32), returned to every thread. Once per kernel.
__device__ __forceinline__ unsigned int block_max(unsigned int m) {
    __shared__ unsigned int s[32];
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) s[threadIdx.x >> 5] = m;
    __syncthreads();
    m = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) m = max(m, s[w]);
    return m;
}

// fp32 scale of a row or tile with max magnitude bits m: amax / 448, correctly rounded; 1.0 when
// below FLT_MIN (zero, or subnormal), as formats/fp8_channel.py row_scales and fp8_block.py tile_scales.
template <typename T>
__device__ __forceinline__ float fp8_scale(unsigned int m) {
    float s = __fdiv_rn(Raw<T>::mag_f32(m), E4M3_MAX);
    return s < __uint_as_float(0x00800000u) ? 1.0f : s;
}

// e4m3_rne(clip(x / scale)) of V elements, byte j for element j (formats/fp8.py e4m3).
template <typename T, int V>
__device__ __forceinline__ unsigned long long fp8_codes(const typename Store<T>::type (&v)[V], float scale) {
    unsigned long long c = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float q = __fdiv_rn(Raw<T>::f32(v[j]), scale);
        c |= (unsigned long long)e4m3_rne(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX)) << (8 * j);
    }
    return c;
}

#define ROW_CHUNKS 8  // chunks of V elements each thread of fp8_channel_quant keeps in registers

// FP8, one fp32 scale per output row (formats/fp8_channel.py): one thread block per row, V elements
// per load (rows cols % V == 0, 16-byte aligned; V = 1 otherwise). Up to ROW_CHUNKS chunks per thread
// stay in registers between the row amax and the codes, so a row of up to ROW_CHUNKS * V * blockDim.x
// elements is read from memory once; the rest of a longer row is read again (from L2) for its codes.
template <typename T, int V>
__global__ void fp8_channel_quant(const typename Store<T>::type* __restrict__ x, long long cols,
                                  unsigned char* __restrict__ out, float* __restrict__ scales,
                                  unsigned int* __restrict__ bad) {
    typedef typename Store<T>::type S;
    const S* xr = x + blockIdx.x * cols;
    unsigned char* orow = out + blockIdx.x * cols;
    const long long nc = cols / V;
    S v[ROW_CHUNKS][V];
    unsigned int m = 0;
#pragma unroll
    for (int k = 0; k < ROW_CHUNKS; ++k) {
        long long c = threadIdx.x + (long long)k * blockDim.x;
        if (c < nc) {
            load_chunk<S, V>(xr + c * V, v[k]);
#pragma unroll
            for (int j = 0; j < V; ++j) m = max(m, Raw<T>::mag(v[k][j]));
        }
    }
    for (long long c = threadIdx.x + (long long)ROW_CHUNKS * blockDim.x; c < nc; c += blockDim.x) {
        S w[V];
        load_chunk<S, V>(xr + c * V, w);
#pragma unroll
        for (int j = 0; j < V; ++j) m = max(m, Raw<T>::mag(w[j]));
    }
    m = block_max(m);
    if (m >= Raw<T>::inf_mag()) {
        if (threadIdx.x == 0) *bad = m;
        return;
    }
    float s = fp8_scale<T>(m);
    if (threadIdx.x == 0) scales[blockIdx.x] = s;
#pragma unroll
    for (int k = 0; k < ROW_CHUNKS; ++k) {
        long long c = threadIdx.x + (long long)k * blockDim.x;
        if (c < nc) store_codes<V>(orow + c * V, fp8_codes<T, V>(v[k], s));
    }
    for (long long c = threadIdx.x + (long long)ROW_CHUNKS * blockDim.x; c < nc; c += blockDim.x) {
        S w[V];
        load_chunk<S, V>(xr + c * V, w);
        store_codes<V>(orow + c * V, fp8_codes<T, V>(w, s));
    }
}

// One whole 128x128 tile's scale under --scale-search mse (formats/fp8_block.py search_tile_scales):
// RTN's scale s times 1, 15/16, 17/16, 7/8, 9/8 (one fp32 rounding; a candidate that is not a finite
// normal fp32 is skipped). tile_sse's error: e4m3_rne(clip(x / scale)), its value times the scale
// (fp32), (x - deq)^2 in float64 added along each tile row (elements 0..127 in turn), those row sums
// then added over the rows (0..127 in turn). The block's 256 threads take (candidate, row) pairs, each
// summing one row read again from memory (the tile's first read left it in L1/L2); every thread returns
// the same choice. `tile` points at the tile's first element; rows are `cols` apart.
template <typename T, int V>
__device__ float tile_search(const typename Store<T>::type* __restrict__ tile, long long cols, float s) {
    typedef typename Store<T>::type S;
    __shared__ double row_err[5][128];
    __shared__ double total[5];
    for (int p = threadIdx.x; p < 5 * 128; p += blockDim.x) {
        const int k = p >> 7, r = p & 127;
        const float c = __fmul_rn(s, (float)(16 + search_step(k)) * 0.0625f);
        const S* row = tile + r * cols;
        double t = 0.0;  // 0 + the first term is that term: the NumPy path's copy of it
        for (int j = 0; j < 128; j += V) {
            S w[V];
            load_chunk<S, V>(row + j, w);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float xv = Raw<T>::f32(w[e]);
                const float q = fminf(fmaxf(__fdiv_rn(xv, c), -E4M3_MAX), E4M3_MAX);
                const float deq = __fmul_rn(e4m3_to_f32(e4m3_rne(q)), c);
                t = __dadd_rn(t, sq_err((double)xv, (double)deq));
            }
        }
        row_err[k][r] = t;
    }
    __syncthreads();
    if (threadIdx.x < 5) {
        double t = 0.0;
        for (int r = 0; r < 128; ++r) t = __dadd_rn(t, row_err[threadIdx.x][r]);
        total[threadIdx.x] = t;
    }
    __syncthreads();
    float best = s;
    double best_err = total[0];
    for (int k = 1; k < 5; ++k) {
        const float c = __fmul_rn(s, (float)(16 + search_step(k)) * 0.0625f);
        const bool ok = c >= __uint_as_float(0x00800000u) && c <= __uint_as_float(0x7f7fffffu);  // finite, normal
        if (ok && total[k] < best_err) {
            best = c;
            best_err = total[k];
        }
    }
    return best;
}

// FP8, one fp32 scale per 128x128 tile (formats/fp8_block.py): one block of 256 threads per tile
// (grid: tile columns x tile rows). A tile row is 128 / V chunks; each thread holds the same chunk
// column of every (256 / (128 / V))-th tile row: 64 elements in registers, so each element is read
// once. Edge tiles hold only the elements inside the tensor, as the NumPy path crops them
// (cols % V == 0, so a chunk is wholly inside or outside). SEARCH 1: the scale is tile_search's
// (--scale-search mse; launched only for tensors of whole tiles, as the NumPy path searches only those).
template <typename T, int V, int SEARCH>
__global__ void __launch_bounds__(256) fp8_block_quant(const typename Store<T>::type* __restrict__ x, long long rows,
                                                       long long cols, unsigned char* __restrict__ out,
                                                       float* __restrict__ scales, unsigned int* __restrict__ bad) {
    typedef typename Store<T>::type S;
    const int CPR = 128 / V, RSTEP = 256 / CPR, K = 128 / RSTEP;
    const long long col = blockIdx.x * 128LL + (threadIdx.x % CPR) * V;
    const long long row0 = blockIdx.y * 128LL + threadIdx.x / CPR;
    const bool in_cols = col < cols;
    S v[K][V];
    unsigned int m = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        long long r = row0 + (long long)k * RSTEP;
        if (in_cols && r < rows) {
            load_chunk<S, V>(x + r * cols + col, v[k]);
#pragma unroll
            for (int j = 0; j < V; ++j) m = max(m, Raw<T>::mag(v[k][j]));
        }
    }
    m = block_max(m);
    if (m >= Raw<T>::inf_mag()) {  // the whole block returns: m is the block's
        if (threadIdx.x == 0) *bad = m;
        return;
    }
    float s = fp8_scale<T>(m);
    if (SEARCH) s = tile_search<T, V>(x + blockIdx.y * 128LL * cols + blockIdx.x * 128LL, cols, s);
    if (threadIdx.x == 0) scales[blockIdx.y * (long long)gridDim.x + blockIdx.x] = s;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        long long r = row0 + (long long)k * RSTEP;
        if (in_cols && r < rows) store_codes<V>(out + r * cols + col, fp8_codes<T, V>(v[k], s));
    }
}

// fp32 value of the MX element that a scaled value q is written as: E2M1 (EMAX 2; e2m1 above, past 6
// saturating) or E4M3 (EMAX 8; clipped to +-448, formats/mxfp8.py). A zero's sign is left as it
// comes: it changes no error below.
template <int EMAX>
__device__ __forceinline__ float mx_element(float q) {
    if (EMAX == 2) return e2m1_value(e2m1(q));
    return e4m3_to_f32(e4m3_rne(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX)));
}

// One MX block's byte under --scale-search mse (formats/mxfp4.py search_scales; MXFP8 passes E4M3
// elements): the rule's byte, then byte - 1 and byte + 1 within 1..254. block_sse's error: the element
// of x * 2^(127 - byte) (fp32; 2^(127 - 254) is written as 0, as mxfp4.inverse_scales writes it), its
// value times 2^(byte - 127) in float64 (exact), (x - deq)^2 added in float64 over elements 0..31 in
// turn: lane g of the block's L lanes adds its V terms onto the total lane g - 1 hands on by shuffle.
// Every lane of the warp must call it (shuffles), and every lane of a block returns the same byte.
template <typename T, int EMAX>
__device__ int mx_search(const typename Store<T>::type (&v)[16 / sizeof(typename Store<T>::type)], int rule) {
    typedef typename Store<T>::type S;
    const int V = 16 / sizeof(S), L = 32 / V;
    const int g = threadIdx.x & (L - 1);
    int best = rule;
    double best_err = 0.0;
    for (int k = 0; k < 3; ++k) {
        const int want = rule + search_step(k);
        const int c = min(max(want, 1), 254);
        const float inv = __uint_as_float((unsigned int)(254 - c) << 23);
        const double scale = __longlong_as_double((long long)(c + 1023 - 127) << 52);
        double sq[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const float xv = Raw<T>::f32(v[j]);
            sq[j] = sq_err((double)xv, __dmul_rn((double)mx_element<EMAX>(__fmul_rn(xv, inv)), scale));
        }
        double t = 0.0;  // 0 + the first term is that term: the NumPy path's copy of it
#pragma unroll
        for (int r = 0; r < L; ++r) {
            const double before = r ? __shfl_up_sync(0xffffffffu, t, 1, L) : 0.0;
            if (g == r) {
                t = before;
#pragma unroll
                for (int j = 0; j < V; ++j) t = __dadd_rn(t, sq[j]);
            }
        }
        t = __shfl_sync(0xffffffffu, t, L - 1, L);
        if (k == 0 || (want == c && t < best_err)) {
            best = c;
            best_err = t;
        }
    }
    return best;
}

// MX (formats/mxfp4.py, mxfp8.py): one E8M0 byte per 32 elements along the row (cols % 32 == 0, so
// the blocks are the tensor's consecutive 32-element runs). One thread per 16-byte chunk of V
// elements, L = 32 / V neighbouring lanes per block, their max combined by shuffles: every warp load
// is one coalesced 512-byte run. Returns the block's byte and sets *inv = 2^(127 - byte), or returns
// -1 for a thread past the end or a block holding NaN/Inf (whose magnitude goes to *bad).
// SEARCH 1: the byte is mx_search's (--scale-search mse).
template <typename T, int EMAX, int SEARCH>
__device__ __forceinline__ int mx_block(const typename Store<T>::type* __restrict__ x, long long nchunks,
                                        typename Store<T>::type (&v)[16 / sizeof(typename Store<T>::type)],
                                        float* inv, unsigned char* __restrict__ scales, unsigned int* __restrict__ bad) {
    typedef typename Store<T>::type S;
    const int V = 16 / sizeof(S), L = 32 / V;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const bool in = i < nchunks;  // nchunks is a multiple of L: a block's lanes are all in or all out
    unsigned int m = 0;
    if (in) {
        load_chunk<S, V>(x + i * V, v);
#pragma unroll
        for (int j = 0; j < V; ++j) m = max(m, Raw<T>::mag(v[j]));
    } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = 0;  // zeros for mx_search, which every lane joins
    }
#pragma unroll
    for (int o = L / 2; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    // mxfp4.e8m0_bytes: the amax's biased exponent after rounding up at mantissa >= 1.75, minus emax,
    // clamped to 1..254 (bits + 2^21 cannot carry past 0x7fa00000: no overflow)
    int e = (int)((Raw<T>::mag_f32_bits(m) + (1u << 21)) >> 23) - EMAX;
    e = min(max(e, 1), 254);
    if (SEARCH) e = mx_search<T, EMAX>(v, e);  // before any lane returns
    if (!in) return -1;
    if (m >= Raw<T>::inf_mag()) {
        *bad = m;
        return -1;
    }
    if ((threadIdx.x & (L - 1)) == 0) scales[i / L] = (unsigned char)e;
    *inv = __uint_as_float((unsigned int)(254 - e) << 23);  // mxfp4.inverse_scales (x * inv is exact but for underflow)
    return e;
}

// MXFP8: e4m3_rne(clip(x * 2^(127 - byte) + 0.0)) (formats/mxfp8.py); V code bytes per thread.
template <typename T, int SEARCH>
__global__ void mxfp8_quant(const typename Store<T>::type* __restrict__ x, long long nchunks,
                            unsigned char* __restrict__ out, unsigned char* __restrict__ scales,
                            unsigned int* __restrict__ bad) {
    typedef typename Store<T>::type S;
    const int V = 16 / sizeof(S);
    S v[V];
    float inv;
    if (mx_block<T, 8, SEARCH>(x, nchunks, v, &inv, scales, bad) < 0) return;
    unsigned long long c = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        float q = __fmul_rn(Raw<T>::f32(v[j]), inv);
        if (__float_as_uint(q) == 0x80000000u) q = 0.0f;  // -0.0 + 0.0 is +0.0 (compressed-tensors' zero point)
        c |= (unsigned long long)e4m3_rne(fminf(fmaxf(q, -E4M3_MAX), E4M3_MAX)) << (8 * j);
    }
    store_codes<V>(out + (blockIdx.x * (long long)blockDim.x + threadIdx.x) * V, c);
}

// MXFP4: E2M1 codes of x * 2^(127 - byte) (formats/nvfp4.py fp4_codes, e2m1 above; saturating at 6),
// two per byte, low nibble first: V / 2 bytes per thread.
template <typename T, int SEARCH>
__global__ void mxfp4_quant(const typename Store<T>::type* __restrict__ x, long long nchunks,
                            unsigned char* __restrict__ out, unsigned char* __restrict__ scales,
                            unsigned int* __restrict__ bad) {
    typedef typename Store<T>::type S;
    const int V = 16 / sizeof(S);
    S v[V];
    float inv;
    if (mx_block<T, 2, SEARCH>(x, nchunks, v, &inv, scales, bad) < 0) return;
    unsigned int p = 0;
#pragma unroll
    for (int j = 0; j < V; ++j) p |= e2m1(__fmul_rn(Raw<T>::f32(v[j]), inv)) << (4 * j);
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (V == 8) reinterpret_cast<unsigned int*>(out)[i] = p;
    else reinterpret_cast<unsigned short*>(out)[i] = (unsigned short)p;
}

// Start-up check that this build keeps IEEE semantics: a subnormal divided and halved exactly,
// and a subnormal compared as non-zero. Run once per device before any real work.
__global__ void ieee_probe(float tiny, unsigned int* out) {
    out[0] = __float_as_uint(__fdiv_rn(tiny, 3.0f));
    out[1] = __float_as_uint(__fmul_rn(tiny, 0.5f));
    out[2] = tiny > 0.0f ? 1u : 0u;
    out[3] = tiny == 0.0f ? 1u : 0u;
}

// verify --source (shardquant/verify.py _compare): one stored tensor dequantized against its
// source, reduced to sum ref^2, sum (deq - ref)^2 (float64) and max |ref| (fp32 magnitude bits),
// without writing the dequantized values anywhere. CODE 0: E4M3 codes, one per byte; 1: E2M1
// codes packed two per byte, low nibble first. SCALE 0: fp32 scales; 1: E4M3 codes; 2: E8M0 bytes.
// Scale of element (r, c): scale[(r / tile_r) * scale_cols + c / tile_c], times pq (NVFP4's s2, or
// 1): deq = value * (scale * pq), the order of formats/*.py dequantize.
__device__ __forceinline__ float e4m3_value(unsigned int c) {  // E4M3FN: 0x7f and 0xff are NaN
    return (c & 0x7fu) == 0x7fu ? __uint_as_float(0x7fc00000u) : e4m3_to_f32(c);
}

__device__ __forceinline__ float e8m0_value(unsigned int b) {  // 2^(b - 127); 0 is 2^-127, 255 NaN
    if (b == 255u) return __uint_as_float(0x7fc00000u);
    return b ? __uint_as_float(b << 23) : __uint_as_float(0x00400000u);
}

template <typename T, int CODE, int SCALE>
__global__ void __launch_bounds__(256) error_power(const typename Store<T>::type* __restrict__ src,
                                                   const unsigned char* __restrict__ w,
                                                   const void* __restrict__ scale, long long rows, unsigned int cols,
                                                   unsigned int tile_r, unsigned int tile_c, unsigned int scale_cols,
                                                   float pq, double* __restrict__ sums, unsigned int* __restrict__ top) {
    double s = 0.0, n = 0.0;
    unsigned int m = 0u;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long base = r * (long long)cols;
        const long long srow = (long long)(r / tile_r) * scale_cols;
        for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) {
            const long long i = base + c;
            const float ref = Raw<T>::f32(src[i]);
            float v;
            if (CODE == 0) v = e4m3_value(w[i]);
            else v = e2m1_value((w[i >> 1] >> ((unsigned int)(i & 1) * 4u)) & 0xfu);
            const long long si = srow + c / tile_c;
            float sc;
            if (SCALE == 0) sc = reinterpret_cast<const float*>(scale)[si];
            else if (SCALE == 1) sc = e4m3_value(reinterpret_cast<const unsigned char*>(scale)[si]);
            else sc = e8m0_value(reinterpret_cast<const unsigned char*>(scale)[si]);
            const float deq = __fmul_rn(v, __fmul_rn(sc, pq));
            const double d = (double)deq - (double)ref;
            s += (double)ref * (double)ref;
            n += d * d;
            m = max(m, __float_as_uint(fabsf(ref)));  // NaN's bits exceed every finite magnitude's
        }
    }
    __shared__ double ss[256], sn[256];
    __shared__ unsigned int sm[256];
    ss[threadIdx.x] = s;
    sn[threadIdx.x] = n;
    sm[threadIdx.x] = m;
    __syncthreads();
    for (unsigned int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) {
            ss[threadIdx.x] += ss[threadIdx.x + k];
            sn[threadIdx.x] += sn[threadIdx.x + k];
            sm[threadIdx.x] = max(sm[threadIdx.x], sm[threadIdx.x + k]);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        atomicAdd(sums, ss[0]);
        atomicAdd(sums + 1, sn[0]);
        atomicMax(top, sm[0]);
    }
}

// A block-FP8 source weight decoded on the GPU (shardquant/encoding.py DecodedTensor.decode, bit for
// bit): E4M3 code times the scale of its bh x bw tile (E8M0 0: fp32 scales; 1: E8M0 bytes), one fp32
// multiply, then rounded to nearest even into bf16 (any NaN becomes the quiet NaN 0x7fc0).
template <int E8M0>
__global__ void block_fp8_decode(const unsigned char* __restrict__ codes, const void* __restrict__ scales,
                                 long long rows, long long cols, long long scale_cols, int bh, int bw,
                                 unsigned short* __restrict__ out) {
    long long n = rows * cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        long long r = i / cols, c = i - r * cols;
        long long si = (r / bh) * scale_cols + c / bw;
        float s = E8M0 ? e8m0_value(reinterpret_cast<const unsigned char*>(scales)[si])
                       : reinterpret_cast<const float*>(scales)[si];
        float p = __fmul_rn(e4m3_value(codes[i]), s);
        unsigned int u = __float_as_uint(p);
        out[i] = (p != p) ? (unsigned short)0x7fc0u : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
}
