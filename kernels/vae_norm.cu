// The Wan VAE's channel-first RMS norm, optionally fused with SiLU. Math and launch rules:
// kernels/vae_norm.py.
//
// x is [B, C, S] (S = T*H*W, contiguous). A thread owns VEC adjacent spatial positions of one
// sample and walks the C channels twice (sum of squares, then scale and store); neighbouring
// threads touch neighbouring addresses, so every channel step is a coalesced row of 128-bit
// accesses. The second walk re-reads x, mostly from L2.
template <typename T, int VEC>
__global__ void rms_norm_cf_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                                   const T* __restrict__ bias, T* __restrict__ out,
                                   int C, long long S, long long n_vec, float eps, float sqrt_c,
                                   int silu) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
        const long long p0 = i * VEC;          // flat (b, s) position; VEC divides S
        const long long b = p0 / S;
        const long long base = b * C * S + (p0 - b * S);
        float ss[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) ss[e] = 0.f;
        for (int c = 0; c < C; ++c) {
            float v[VEC];
            tf::load_f<T, VEC>(x + base + (long long)c * S, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss[e] += v[e] * v[e];
        }
        float inv[VEC];
        // F.normalize: x / max(||x||, eps); the sqrt(C) factor is folded into the same multiplier.
#pragma unroll
        for (int e = 0; e < VEC; ++e) inv[e] = sqrt_c / fmaxf(sqrtf(ss[e]), eps);
        for (int c = 0; c < C; ++c) {
            const long long off = base + (long long)c * S;
            const float g = tf::to_f<T>(gamma[c]);
            const float bb = bias != nullptr ? tf::to_f<T>(bias[c]) : 0.f;
            float v[VEC];
            tf::load_f<T, VEC>(x + off, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                float y = v[e] * inv[e] * g + bb;
                if (silu) y = y / (1.f + expf(-y));  // F.silu
                v[e] = y;
            }
            tf::store_f<T, VEC>(out + off, v);
        }
    }
}
