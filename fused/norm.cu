// DiT norms: LayerNorm + adaLN modulate, gated residual (alone and fused with the next LN +
// modulate), and RMSNorm with weight. Math and launch rules: kernels/norm.py.
//
// Row kernels: one block per row of D elements. Thread t owns the vectors t, t + blockDim.x, ...
// (at most NV of them) and keeps them in registers, so x is read from memory once. VEC = 16 bytes
// of T when D and the pointers allow it, else 1. Statistics in fp32 with warp-shuffle reductions.
// Modulation rows (shift/scale/gate, already fp32): row r of x uses modulation row r / rows_per_mod.

template <int NV, int VEC>
__device__ __forceinline__ void ln_stats(const float (&v)[NV][VEC], int nvec, int D, float eps,
                                         float* smem32, float& mean, float& rstd) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += v[k][e];  // padding lanes hold 0
    mean = tf::block_sum(s, smem32) / (float)D;
    // Two-pass variance from registers: no cancellation for rows with a large mean.
    float q = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        if ((int)threadIdx.x + k * (int)blockDim.x < nvec) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float d = v[k][e] - mean;
                q += d * d;
            }
        }
    }
    const float var = tf::block_sum(q, smem32) / (float)D;
    rstd = rsqrtf(var + eps);
}

template <int VEC>
__device__ __forceinline__ void modulate_store(const float (&v)[VEC], float mean, float rstd,
                                               const float* __restrict__ shift,
                                               const float* __restrict__ scale,
                                               float* __restrict__ out) {
    float sh[VEC], sc[VEC], o[VEC];
    tf::load_f<float, VEC>(shift, sh);
    tf::load_f<float, VEC>(scale, sc);
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[e] = (v[e] - mean) * rstd * (1.f + sc[e]) + sh[e];
    tf::store_f<float, VEC>(out, o);
}

// out[r, :] = LN(x[r, :]) * (1 + scale[m, :]) + shift[m, :], m = r / rows_per_mod; out is fp32.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024, 1)
ln_modulate_kernel(const T* __restrict__ x, const float* __restrict__ shift,
                   const float* __restrict__ scale, float* __restrict__ out,
                   int D, int rows_per_mod, float eps) {
    __shared__ float smem32[32];
    const long long row = blockIdx.x;
    const int nvec = D / VEC;
    const T* xr = x + row * D;
    float v[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) tf::load_f<T, VEC>(xr + (long long)j * VEC, v[k]);
        else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = 0.f;
        }
    }
    float mean, rstd;
    ln_stats<NV, VEC>(v, nvec, D, eps, smem32, mean, rstd);
    const long long m = (row / rows_per_mod) * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            const long long c = (long long)j * VEC;
            modulate_store<VEC>(v[k], mean, rstd, shift + m + c, scale + m + c, out + row * D + c);
        }
    }
}

// x2 = x + gate * y (rounded to T, as the reference's .to(x.dtype)); out_y = LN(x2) modulated.
// y may have another dtype than x (Wan: fp32 residual stream, bf16 branch output).
template <typename T, typename TY, int VEC, int NV>
__global__ void __launch_bounds__(1024, 1)
gated_residual_ln_modulate_kernel(const T* __restrict__ x, const float* __restrict__ gate,
                                  const TY* __restrict__ y, const float* __restrict__ shift,
                                  const float* __restrict__ scale, T* __restrict__ out_x,
                                  float* __restrict__ out_y, int D, int gate_rows_per_mod,
                                  int rows_per_mod, float eps) {
    __shared__ float smem32[32];
    const long long row = blockIdx.x;
    const int nvec = D / VEC;
    const long long g = (row / gate_rows_per_mod) * D;
    float v[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            const long long c = (long long)j * VEC;
            float xv[VEC], yv[VEC], gv[VEC];
            tf::load_f<T, VEC>(x + row * D + c, xv);
            tf::load_f<TY, VEC>(y + row * D + c, yv);
            tf::load_f<float, VEC>(gate + g + c, gv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = tf::to_f<T>(tf::from_f<T>(xv[e] + yv[e] * gv[e]));
            tf::store_f<T, VEC>(out_x + row * D + c, v[k]);
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = 0.f;
        }
    }
    float mean, rstd;
    ln_stats<NV, VEC>(v, nvec, D, eps, smem32, mean, rstd);
    const long long m = (row / rows_per_mod) * D;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            const long long c = (long long)j * VEC;
            modulate_store<VEC>(v[k], mean, rstd, shift + m + c, scale + m + c, out_y + row * D + c);
        }
    }
}

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight (weight may be null), in T.
template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(1024, 1)
rms_norm_kernel(const T* __restrict__ x, const float* __restrict__ weight, T* __restrict__ out,
                int D, float eps) {
    __shared__ float smem32[32];
    const long long row = blockIdx.x;
    const int nvec = D / VEC;
    float v[NV][VEC];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) tf::load_f<T, VEC>(x + row * D + (long long)j * VEC, v[k]);
        else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) v[k][e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < VEC; ++e) s += v[k][e] * v[k][e];
    }
    const float r = rsqrtf(tf::block_sum(s, smem32) / (float)D + eps);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < nvec) {
            const long long c = (long long)j * VEC;
            float w[VEC], o[VEC];
            if (weight != nullptr) tf::load_f<float, VEC>(weight + c, w);
            else {
#pragma unroll
                for (int e = 0; e < VEC; ++e) w[e] = 1.f;
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] = (v[k][e] * r) * w[e];
            tf::store_f<T, VEC>(out + row * D + c, o);
        }
    }
}

// Elementwise, grid-stride over vectors of VEC elements (VEC divides D, so a vector never
// crosses a row): out = x + gate[m, c] * y, rounded to T; y may have another dtype than x.
template <typename T, typename TY, int VEC>
__global__ void gated_residual_kernel(const T* __restrict__ x, const float* __restrict__ gate,
                                      const TY* __restrict__ y, T* __restrict__ out,
                                      long long n_vec, int D, int rows_per_mod) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
        const long long e0 = i * VEC;
        const long long row = e0 / D;
        const long long c = e0 - row * D;
        float xv[VEC], yv[VEC], gv[VEC], o[VEC];
        tf::load_f<T, VEC>(x + e0, xv);
        tf::load_f<TY, VEC>(y + e0, yv);
        tf::load_f<float, VEC>(gate + (row / rows_per_mod) * D + c, gv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = xv[e] + yv[e] * gv[e];
        tf::store_f<T, VEC>(out + e0, o);
    }
}
