// LoRA forward in raw CUDA C++: a naive three-kernel version and a fused one-kernel version.
//
//     y = x W^T + s (x A^T) B^T        x [M, K], W [N, K], A [r, K], B [N, r], all row-major, contiguous
//
// No torch headers here: the kernels take raw pointers, and a thin C++ glue (cuda_lora.py) turns
// tensors into pointers. Every kernel accumulates in float32; x, W, A, B, y may be float, half or
// bfloat16. These are teaching kernels: classic shared-memory tiling on the CUDA cores, no tensor
// cores, so compare them with each other (same engine), not with cuBLAS.
//
// The GEMM (gemm_lora_kernel): each block of 256 threads owns a BM x BN = 64 x 64 tile of y and walks
// K in steps of BK = 16. Per step it copies a 64 x 16 tile of x and of W into shared memory, transposed
// (k-major, so that the inner loop reads a row of 64 values for one k), then every thread updates its
// own TM x TN = 4 x 4 outputs: rows ty, ty + 16, ty + 32, ty + 48 and columns tx, tx + 16, ... (strided,
// so that the 16 threads of a half-warp read 16 consecutive words: no shared-memory bank conflicts).
//
// The copy into shared memory (load_tile_transposed) is where a naive version loses most of its speed:
// - Global side: each thread reads 16 bytes at once (8 half/bf16 or 4 floats along K of one row), and
//   neighbouring threads read the neighbouring 16 bytes, so a warp reads whole 32-byte sectors.
// - Shared side: the tile is stored transposed, dst[k][row]. Shared memory has 32 banks of 4-byte
//   words; word w lives in bank w % 32, and a warp's accesses to distinct words of one bank are
//   serialised. Unpadded, a row of the tile is 64 words long, so dst[k][row] for k = 0..15 of one row
//   all fall in bank row % 32: a 16-way conflict. Each row of the tile is therefore padded by PAD = 2
//   words: the 32 threads of a warp that store element q of their chunk write words
//   (c * VEC + q) * (ROWS + 2) + row for 16 (or 8) consecutive rows and 2 (or 4) chunks c, which land
//   in 32 distinct banks. `lora_cuda_tile_store_words` below lists those words so that the tests and
//   the notebook can count the conflicts.
// No double buffering (the next tile is not prefetched while the current one is used): it would need
// a second copy of every tile and register staging, and this file stays a readable first kernel.
//
// Naive LoRA (three kernels, like torch's addmm_ version, plus a memset when the shrink splits K):
//   1. gemm_lora_kernel<FUSED = false>  y = x W^T
//   2. shrink_kernel                    t = x A^T            (reads x a second time)
//      split over K: with few tokens (decode) ceil(M / 64) blocks would leave the GPU idle and walk all
//      of K alone; instead blocks (m, j) each sum a slice of K and atomically add into t (zeroed first).
//   3. expand_add_kernel                y += s t B^T         (reads and writes y a second time)
//
// Fused LoRA (one launch, the "shrink in the K loop" idea): gemm_lora_kernel<FUSED = true> also copies a
// 16 x R tile of A^T per step and, from the x tile already in shared memory, accumulates this block's
// rows of x A^T [64, R]. After the loop it multiplies them by a B^T tile [R, 64] and adds the result to
// the accumulators before the single store of y. The price: each of the N / 64 blocks along a row of
// tiles recomputes the same x A^T, i.e. r / 64 extra work (25% at r = 16) on top of the GEMM, and more
// registers per thread (fewer blocks fit on one SM).
//
// R is the rank rounded up to 16, 32 or 64 (a template parameter, so the loops unroll); entries
// beyond the true rank r are loaded as zeros.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Kernel launch and memset. Macros only so that the test suite can run these kernels on a CPU with a small
// emulation header (tests/ch4_low_rank/kernels/cuda_emulation.h); with nvcc it is the usual <<< >>>.
#ifndef LORA_LAUNCH
#define LORA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#endif
#ifndef LORA_MEMSET_ASYNC
#define LORA_MEMSET_ASYNC(ptr, bytes, stream) cudaMemsetAsync(ptr, 0, bytes, stream)
#endif

namespace lora {

// ---- storage type <-> float32 ---------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// ---- tile sizes ------------------------------------------------------------------------------------
constexpr int BM = 64;                              // rows of y per block
constexpr int BN = 64;                              // columns of y per block
constexpr int BK = 16;                              // step along K
constexpr int TM = 4;                               // rows per thread
constexpr int TN = 4;                               // columns per thread
constexpr int THREADS = (BM / TM) * (BN / TN);      // 256 threads per block
constexpr int EXPAND_THREADS = 256;                 // threads per block of the naive expand
constexpr int PAD = 2;                              // extra words per row of a shared tile (bank spread)
constexpr int SHRINK_TARGET_BLOCKS = 264;           // split the naive shrink's K until ~2 blocks per SM (132 SMs)
constexpr int SHRINK_MIN_STEPS = 4;                 // ... but give every block at least 4 steps of BK
// __launch_bounds__(THREADS, 2) below promises at most 256 threads per block and asks for 2 blocks per SM,
// which caps registers at 65536 / (2 * 256) = 128 per thread. Without the 2, ptxas for sm_90 aimed at 64
// registers for some instances and spilled to local memory (the nvcc test in tests/ catches that).

// Elements per 16-byte global load: 8 for half / bfloat16, 4 for float.
template <typename T> constexpr int VEC = 16 / sizeof(T);

// Which row of the tile, and which first k, thread slot e copies: chunks of VEC consecutive k of one
// row, the chunk index varying fastest (so a warp reads whole rows' worth of consecutive bytes).
struct TileSlot { int row, k; };
__host__ __device__ constexpr TileSlot tile_slot(int e, int vec) { return {e / (BK / vec), (e % (BK / vec)) * vec}; }

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<size_t>(p) & 15) == 0; }

// Copy rows [row0, row0 + ROWS) x columns [k0, k0 + BK) of a row-major matrix src [nrows, K] into
// shared memory, transposed: dst[k][row]. Out-of-range entries become 0, which handles ragged edges
// and the rank padding. `vec` says whether 16-byte loads are allowed (K a multiple of VEC, src aligned);
// a chunk that crosses the end of a row or of the matrix is read element by element.
template <typename T, int ROWS>
__device__ __forceinline__ void load_tile_transposed(float (&dst)[BK][ROWS + PAD], const T* __restrict__ src,
                                                     int row0, int nrows, int k0, int K, bool vec) {
    constexpr int V = VEC<T>;
    for (int e = threadIdx.x; e < ROWS * (BK / V); e += THREADS) {
        const TileSlot s = tile_slot(e, V);
        const int row = row0 + s.row, k = k0 + s.k;
        float v[V];
        if (vec && row < nrows && k + V <= K) {     // one 16-byte load
            const uint4 raw = *reinterpret_cast<const uint4*>(src + (size_t)row * K + k);
            T chunk[V];
            __builtin_memcpy(chunk, &raw, sizeof(raw));
#pragma unroll
            for (int q = 0; q < V; ++q) v[q] = to_float(chunk[q]);
        } else {
#pragma unroll
            for (int q = 0; q < V; ++q) v[q] = (row < nrows && k + q < K) ? to_float(src[(size_t)row * K + k + q]) : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < V; ++q) dst[s.k + q][s.row] = v[q];
    }
}

// ---- y = x W^T, optionally + s (x A^T) B^T computed inside the same K loop --------------------------
template <typename T, int R, bool FUSED>
__global__ void __launch_bounds__(THREADS, 2)
gemm_lora_kernel(const T* __restrict__ x, const T* __restrict__ W, const T* __restrict__ A,
                 const T* __restrict__ B, T* __restrict__ y, int M, int N, int K, int r, float s) {
    constexpr int RF = FUSED ? R : 1;               // the LoRA buffers shrink to nothing when not fused
    constexpr int XA_PER_THREAD = BM * RF / THREADS > 0 ? BM * RF / THREADS : 1;
    __shared__ float xs[BK][BM + PAD];              // x tile, transposed       [BK, BM]
    __shared__ float ws[BK][BN + PAD];              // W^T tile                 [BK, BN]
    __shared__ float as[BK][RF + PAD];              // A^T tile                 [BK, R]
    __shared__ float xas[BM][RF + 1];               // s * (x A^T) of our rows  [BM, R] (+1: fewer bank conflicts)
    __shared__ float bs[RF][BN];                    // B^T tile                 [R, BN]

    const int tx = threadIdx.x % (BN / TN);         // 0..15: columns tx, tx + 16, tx + 32, tx + 48
    const int ty = threadIdx.x / (BN / TN);         // 0..15: rows ty, ty + 16, ty + 32, ty + 48
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const bool vec = K % VEC<T> == 0 && aligned16(x) && aligned16(W) && aligned16(A);

    float acc[TM][TN] = {};                         // this thread's 4 x 4 outputs
    float xa[XA_PER_THREAD] = {};                   // this thread's share of x A^T (fused only)

    for (int k0 = 0; k0 < K; k0 += BK) {
        load_tile_transposed<T, BM>(xs, x, m0, M, k0, K, vec);
        load_tile_transposed<T, BN>(ws, W, n0, N, k0, K, vec);
        if constexpr (FUSED) load_tile_transposed<T, R>(as, A, 0, r, k0, K, vec);
        __syncthreads();                            // tiles complete before anyone reads them

#pragma unroll 4  // not 16: a full unroll doubles nvcc's compile time (and load_inline's build)
        for (int k = 0; k < BK; ++k) {
            float xv[TM], wv[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) xv[i] = xs[k][ty + i * (BM / TM)];
#pragma unroll
            for (int j = 0; j < TN; ++j) wv[j] = ws[k][tx + j * (BN / TN)];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += xv[i] * wv[j];
            if constexpr (FUSED) {                  // shrink, reusing the x tile: entry e = (row e / R, col e % R)
#pragma unroll
                for (int q = 0; q < XA_PER_THREAD; ++q) {
                    const int e = threadIdx.x * XA_PER_THREAD + q;
                    xa[q] += xs[k][e / R] * as[k][e % R];
                }
            }
        }
        __syncthreads();                            // everyone done before the next tiles overwrite these
    }

    if constexpr (FUSED) {                          // epilogue expand: acc += (s x A^T) B^T
#pragma unroll
        for (int q = 0; q < XA_PER_THREAD; ++q) {
            const int e = threadIdx.x * XA_PER_THREAD + q;
            xas[e / R][e % R] = s * xa[q];
        }
        for (int e = threadIdx.x; e < R * BN; e += THREADS) {
            const int j = e / BN, n = e % BN;
            bs[j][n] = (j < r && n0 + n < N) ? to_float(B[(size_t)(n0 + n) * r + j]) : 0.0f;
        }
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < R; ++j) {
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int jn = 0; jn < TN; ++jn)
                    acc[i][jn] += xas[ty + i * (BM / TM)][j] * bs[j][tx + jn * (BN / TN)];
        }
    }

#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + i * (BM / TM);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx + j * (BN / TN);  // neighbouring threads, neighbouring columns: coalesced
            if (m < M && n < N) y[(size_t)m * N + n] = from_float<T>(acc[i][j]);
        }
    }
}

// ---- naive step 2: t (+)= x A^T, float32 [M, r]; block (bx, by) sums K slice by over rows bx * 64.. --
template <typename T, int R>
__global__ void __launch_bounds__(THREADS, 2)
shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, float* __restrict__ t, int M, int K, int r,
              int k_per_block) {
    constexpr int PER_THREAD = BM * R / THREADS;
    __shared__ float xs[BK][BM + PAD];
    __shared__ float as[BK][R + PAD];
    const int m0 = blockIdx.x * BM;
    const int k_begin = blockIdx.y * k_per_block;   // a multiple of BK: tiles never straddle two slices
    const int k_end = K < k_begin + k_per_block ? K : k_begin + k_per_block;
    const bool vec = K % VEC<T> == 0 && aligned16(x) && aligned16(A);
    float acc[PER_THREAD] = {};

    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        load_tile_transposed<T, BM>(xs, x, m0, M, k0, K, vec);
        load_tile_transposed<T, R>(as, A, 0, r, k0, K, vec);
        __syncthreads();
#pragma unroll 4
        for (int k = 0; k < BK; ++k)
#pragma unroll
            for (int q = 0; q < PER_THREAD; ++q) {
                const int e = threadIdx.x * PER_THREAD + q;
                acc[q] += xs[k][e / R] * as[k][e % R];
            }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < PER_THREAD; ++q) {
        const int e = threadIdx.x * PER_THREAD + q;
        const int m = m0 + e / R, j = e % R;
        if (m < M && j < r) {
            if (gridDim.y == 1) t[(size_t)m * r + j] = acc[q];
            else atomicAdd(&t[(size_t)m * r + j], acc[q]);  // several K slices add into one t
        }
    }
}

// ---- naive step 3: y += s t B^T, one thread per element of y (a read and a write of all of y) ------
template <typename T>
__global__ void __launch_bounds__(EXPAND_THREADS)
expand_add_kernel(const float* __restrict__ t, const T* __restrict__ B, T* __restrict__ y, int M, int N, int r,
                  float s) {
    const int m = blockIdx.x;
    const int n = blockIdx.y * EXPAND_THREADS + threadIdx.x;
    if (m >= M || n >= N) return;                   // no __syncthreads in this kernel, so returning early is safe
    float sum = 0.0f;
    for (int j = 0; j < r; ++j) sum += t[(size_t)m * r + j] * to_float(B[(size_t)n * r + j]);
    const size_t i = (size_t)m * N + n;
    y[i] = from_float<T>(to_float(y[i]) + s * sum);
}

// ---- host side: pick the template instance and launch --------------------------------------------
enum Variant { BASE = 0, NAIVE = 1, FUSED_KLOOP = 2 };

// How many slices of K the naive shrink uses: enough blocks to fill the GPU when M is small, but at
// least SHRINK_MIN_STEPS steps of BK per block. Returns the slice count; *k_per_block its width.
inline int shrink_splits(int M, int K, int* k_per_block) {
    const int m_blocks = (M + BM - 1) / BM, k_steps = (K + BK - 1) / BK;
    const int wanted = (SHRINK_TARGET_BLOCKS + m_blocks - 1) / m_blocks;
    const int most = (k_steps + SHRINK_MIN_STEPS - 1) / SHRINK_MIN_STEPS;
    const int splits = wanted < most ? wanted : most;
    const int steps = (k_steps + (splits > 1 ? splits : 1) - 1) / (splits > 1 ? splits : 1);
    *k_per_block = steps * BK;
    return (k_steps + steps - 1) / steps;           // no empty slice
}

template <typename T, int R>
void launch(int variant, const void* x, const void* W, const void* A, const void* B, void* y, float* t, int M,
            int N, int K, int r, float s, cudaStream_t stream) {
    const T* x_ = static_cast<const T*>(x);
    const T* W_ = static_cast<const T*>(W);
    const T* A_ = static_cast<const T*>(A);
    const T* B_ = static_cast<const T*>(B);
    T* y_ = static_cast<T*>(y);
    const dim3 gemm_grid((N + BN - 1) / BN, (M + BM - 1) / BM);
    if (variant == FUSED_KLOOP) {
        auto kernel = gemm_lora_kernel<T, R, true>;
        LORA_LAUNCH(kernel, gemm_grid, dim3(THREADS), stream, x_, W_, A_, B_, y_, M, N, K, r, s);
        return;
    }
    auto gemm = gemm_lora_kernel<T, 16, false>;     // R is unused when not fused: one instance per dtype
    LORA_LAUNCH(gemm, gemm_grid, dim3(THREADS), stream, x_, W_, A_, B_, y_, M, N, K, r, s);
    if (variant == NAIVE) {
        int k_per_block = 0;
        const int splits = shrink_splits(M, K, &k_per_block);
        if (splits > 1) LORA_MEMSET_ASYNC(t, sizeof(float) * (size_t)M * r, stream);  // the slices add into t
        auto shrink = shrink_kernel<T, R>;
        LORA_LAUNCH(shrink, dim3((M + BM - 1) / BM, splits), dim3(THREADS), stream, x_, A_, t, M, K, r,
                    k_per_block);
        auto expand = expand_add_kernel<T>;
        const dim3 expand_grid(M, (N + EXPAND_THREADS - 1) / EXPAND_THREADS);
        LORA_LAUNCH(expand, expand_grid, dim3(EXPAND_THREADS), stream, t, B_, y_, M, N, r, s);
    }
}

template <typename T>
void launch_rank(int variant, const void* x, const void* W, const void* A, const void* B, void* y, float* t, int M,
                 int N, int K, int r, float s, cudaStream_t stream) {
    if (r <= 16) launch<T, 16>(variant, x, W, A, B, y, t, M, N, K, r, s, stream);
    else if (r <= 32) launch<T, 32>(variant, x, W, A, B, y, t, M, N, K, r, s, stream);
    else launch<T, 64>(variant, x, W, A, B, y, t, M, N, K, r, s, stream);
}

}  // namespace lora

// The one entry point the glue calls. dtype: 0 float32, 1 float16, 2 bfloat16. t: a float32 [M, r]
// buffer, used by the naive variant only. Returns nullptr on success, else an error message.
extern "C" const char* lora_cuda_forward(int variant, int dtype, const void* x, const void* W, const void* A,
                                         const void* B, void* y, float* t, int M, int N, int K, int r, float s,
                                         void* stream) {
    if (variant < lora::BASE || variant > lora::FUSED_KLOOP) return "unknown variant";
    if (r < 1 || r > 64) return "the rank must be between 1 and 64";
    if (variant == lora::NAIVE && t == nullptr) return "the naive variant needs a float32 [M, r] buffer";
    if (M == 0 || N == 0) return nullptr;
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case 0: lora::launch_rank<float>(variant, x, W, A, B, y, t, M, N, K, r, s, st); break;
        case 1: lora::launch_rank<__half>(variant, x, W, A, B, y, t, M, N, K, r, s, st); break;
        case 2: lora::launch_rank<__nv_bfloat16>(variant, x, W, A, B, y, t, M, N, K, r, s, st); break;
        default: return "dtype must be float32, float16 or bfloat16";
    }
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// ---- for tests and the notebook: the launch plan and the shared-memory layout, computed on the host --
// The number of K slices of the naive shrink (and their width in *k_per_block).
extern "C" int lora_cuda_shrink_splits(int M, int K, int* k_per_block) { return lora::shrink_splits(M, K, k_per_block); }

// The shared-memory word (index into dst, row length rows + PAD) that each of the 256 threads writes for
// element q of its first chunk, in words[thread * vec + q] (-1: the thread copies nothing). elem_bytes is
// 2 or 4; returns vec, the elements per 16-byte chunk. Bank of a word: word % 32.
extern "C" int lora_cuda_tile_store_words(int elem_bytes, int rows, int* words) {
    const int vec = 16 / elem_bytes;
    for (int tid = 0; tid < lora::THREADS; ++tid)
        for (int q = 0; q < vec; ++q) {
            const lora::TileSlot s = lora::tile_slot(tid, vec);
            words[tid * vec + q] = tid < rows * (lora::BK / vec) ? (s.k + q) * (rows + lora::PAD) + s.row : -1;
        }
    return vec;
}
