// Shared device helpers for TwinFlow's CuPy kernels.
//
// Python prepends this text to every kernel source (kernels/_sources.py), so the same string is
// compiled by NVRTC inside CuPy and, in CI, by NVRTC and nvcc without a GPU. The include guard
// lets several sources be concatenated into one nvcc translation unit.
//
// NVRTC has no host C++ headers (<cstdint> fails), so only the CUDA fp16/bf16 headers are used.
// Every helper is marked __device__ explicitly: CuPy compiles with
// --device-as-default-execution-space, nvcc does not.
#ifndef TWINFLOW_COMMON_CUH
#define TWINFLOW_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace tf {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even casts, as torch's .to(dtype).
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC elements moved as one access: 16 bytes (a 128-bit ld/st) when VEC * sizeof(T) == 16; wider
// packs (8 floats) are 16-byte aligned and split into 128-bit accesses by the compiler.
template <typename T, int VEC>
struct alignas((sizeof(T) * VEC) > 16 ? 16 : (sizeof(T) * VEC)) Pack {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_f(const T* __restrict__ p, float (&out)[VEC]) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = to_f<T>(pk.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_f(T* __restrict__ p, const float (&in)[VEC]) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = from_f<T>(in[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// max that propagates NaN (fmaxf drops it; torch.amax keeps it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum returned to every thread. blockDim.x must be a multiple of 32 (the launchers
// guarantee it). Every warp re-reduces the per-warp partials in the same order, so the result is
// deterministic and needs no broadcast step. The leading barrier makes back-to-back calls safe.
__device__ __forceinline__ float block_sum(float v, float* smem32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) smem32[warp] = v;
    __syncthreads();
    return warp_sum(lane < nwarps ? smem32[lane] : 0.f);
}

__device__ __forceinline__ float block_max(float v, float* smem32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) smem32[warp] = v;
    __syncthreads();
    return warp_max(lane < nwarps ? smem32[lane] : -__int_as_float(0x7f800000));
}

}  // namespace tf

#endif  // TWINFLOW_COMMON_CUH
