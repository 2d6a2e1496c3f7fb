// The int8 GEMM's neighbours: per-token activation quantization before it, dequant + bias +
// activation after it. Math and launch rules: kernels/int8.py.

// One block per row (token): scale = max(max|x|, eps) / 127, q = round_half_even(x / scale)
// clamped to [-127, 127]. x is read once (kept in registers, as the norm kernels do).
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024, 1)
quantize_int8_kernel(const T* __restrict__ x, signed char* __restrict__ q,
                     float* __restrict__ scale_out, int D, float eps) {
    __shared__ float smem32[32];
    const long long row = blockIdx.x;
    const int nvec = D / VEC;
    float v[NV][VEC];
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) tf::load_f<T, VEC>(x + row * D + (long long)j * VEC, v[k]);
        else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) amax = tf::nan_max(amax, fabsf(v[k][e]));
    }
    amax = tf::block_max(amax, smem32);
    // Same fp32 operations as the reference (clamp_min then / 127, then a true division per
    // element, not a reciprocal multiply), so q matches it exactly.
    const float scale = tf::nan_max(amax, eps) / 127.f;
    if (threadIdx.x == 0) scale_out[row] = scale;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            tf::Pack<signed char, VEC> pk;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float r = fminf(fmaxf(rintf(__fdiv_rn(v[k][e], scale)), -127.f), 127.f);
                pk.v[e] = (signed char)(int)r;
            }
            *reinterpret_cast<tf::Pack<signed char, VEC>*>(q + row * D + (long long)j * VEC) = pk;
        }
    }
}

// y = acc * a_scale[m] * w_scale[n] (+ bias[n]), then ACT (0 none, 1 GELU-tanh, 2 SiLU), cast to
// TO. Grid-stride over vectors of VEC int32 accumulators (VEC divides N).
template <typename TO, int ACT, int VEC>
__global__ void int8_gemm_epilogue_kernel(const int* __restrict__ acc,
                                          const float* __restrict__ a_scale,
                                          const float* __restrict__ w_scale,
                                          const float* __restrict__ bias, TO* __restrict__ out,
                                          long long n_vec, int N) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
        const long long e0 = i * VEC;
        const long long m = e0 / N;
        const int n0 = (int)(e0 - m * N);
        const tf::Pack<int, VEC> a = *reinterpret_cast<const tf::Pack<int, VEC>*>(acc + e0);
        float ws[VEC], bs[VEC], o[VEC];
        tf::load_f<float, VEC>(w_scale + n0, ws);
        if (bias != nullptr) tf::load_f<float, VEC>(bias + n0, bs);
        else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) bs[e] = 0.f;
        }
        const float as = a_scale[m];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            float y = ((float)a.v[e] * as) * ws[e] + bs[e];
            if (ACT == 1) {
                // GELU, tanh approximation (as F.gelu(approximate="tanh")).
                const float u = 0.7978845608028654f * (y + 0.044715f * y * y * y);
                y = 0.5f * y * (1.f + tanhf(u));
            } else if (ACT == 2) {
                y = y / (1.f + expf(-y));
            }
            o[e] = y;
        }
        tf::store_f<TO, VEC>(out + e0, o);
    }
}
