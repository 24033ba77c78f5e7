// Just enough of CUDA to run chapters/ch4_low_rank/kernels/lora_cuda.cu on a CPU, for tests.
//
// Compile the .cu as C++ with this header forced in first:
//     g++ -std=c++20 -shared -fPIC -I<cuda>/include -include cuda_emulation.h -x c++ lora_cuda.cu
// (the CUDA headers supply dim3, __half and __nv_bfloat16 with host-side conversions).
//
// A launch runs the blocks one after another; inside a block, each CUDA thread is one std::thread and
// __syncthreads() is a std::barrier over all of them; atomicAdd is a std::atomic_ref add. `__shared__` becomes `static`, so all threads of
// the (single, current) block see the same array. This checks indexing, masking, tiling and barrier
// placement. It cannot check warp-level behaviour, memory coalescing or speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

#undef __global__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __launch_bounds__(...)
#define __shared__ static

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 gridDim;
inline thread_local int emu_syncs = 0;          // __syncthreads() calls made by this thread
inline std::barrier<>* emu_block_barrier = nullptr;
inline cudaError_t emu_error = cudaSuccess;

inline void __syncthreads() {
    ++emu_syncs;
    emu_block_barrier->arrive_and_wait();
}

inline float atomicAdd(float* address, float value) {
    return std::atomic_ref<float>(*address).fetch_add(value);
}

inline cudaError_t cudaGetLastError() {
    const cudaError_t e = emu_error;
    emu_error = cudaSuccess;
    return e;
}
inline const char* cudaGetErrorString(cudaError_t) {
    return "emulation: threads of one block called __syncthreads() a different number of times";
}

template <typename... Params, typename... Args>
void emu_launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args... args) {
    const unsigned n = block.x * block.y * block.z;
    gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> bar(n);
                emu_block_barrier = &bar;
                std::vector<std::thread> threads;
                std::vector<int> syncs(n, 0);
                threads.reserve(n);
                for (unsigned tid = 0; tid < n; ++tid)
                    threads.emplace_back([=, &syncs] {
                        threadIdx = uint3{tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y)};
                        blockIdx = uint3{bx, by, bz};
                        emu_syncs = 0;
                        kernel(args...);
                        syncs[tid] = emu_syncs;
                        // leave the barrier so that a thread that returned early cannot hang the others;
                        // the count check below still reports it (on a GPU that would be a bug)
                        emu_block_barrier->arrive_and_drop();
                    });
                for (auto& t : threads) t.join();
                for (int c : syncs)
                    if (c != syncs[0]) emu_error = cudaErrorLaunchFailure;
            }
}

#define LORA_LAUNCH(kernel, grid, block, stream, ...) emu_launch(kernel, grid, block, __VA_ARGS__)
#define LORA_MEMSET_ASYNC(ptr, bytes, stream) std::memset(ptr, 0, bytes)
