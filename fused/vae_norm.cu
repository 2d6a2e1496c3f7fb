// The Wan VAE's channel-first RMS norm, optionally fused with SiLU. Math and launch rules:
// kernels/vae_norm.py.
//
// x is [B, C, S] (S = T*H*W, contiguous); the norm runs over C for every (b, s). A block of
// TX x TY = 256 threads owns TX adjacent vectors of VEC positions: thread (tx, ty) walks channels
// ty, ty + TY, ... of vector tx. Per channel, the TX threads of a row read TX * 16 contiguous bytes
// (one 128-byte line for 16-bit types), and splitting C over TY threads gives the GPU enough
// independent loads even for the small decoder frames (S = 60 x 104). Partial sums of squares
// meet in shared memory in a fixed order (deterministic); the second walk scales and stores,
// re-reading x mostly from L2 (a block's slice is TX * VEC * C elements).
#define TF_CF_TX 8
#define TF_CF_TY 32

template <typename T, int VEC>
__global__ void __launch_bounds__(TF_CF_TX * TF_CF_TY)
rms_norm_cf_kernel(const T* __restrict__ x, const T* __restrict__ gamma,
                   const T* __restrict__ bias, T* __restrict__ out, int C, long long S,
                   long long n_vec, float eps, float sqrt_c, int silu) {
    __shared__ float part[TF_CF_TY][TF_CF_TX][VEC];
    __shared__ float total[TF_CF_TX][VEC];
    const int tx = threadIdx.x % TF_CF_TX, ty = threadIdx.x / TF_CF_TX;
    const long long i = (long long)blockIdx.x * TF_CF_TX + tx;  // vector index over B * S / VEC
    const bool active = i < n_vec;
    long long base = 0;
    float ss[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) ss[e] = 0.f;
    if (active) {
        const long long p0 = i * VEC;  // flat (b, s) position; VEC divides S
        const long long b = p0 / S;
        base = b * C * S + (p0 - b * S);
        for (int c = ty; c < C; c += TF_CF_TY) {
            float v[VEC];
            tf::load_f<T, VEC>(x + base + (long long)c * S, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) ss[e] += v[e] * v[e];
        }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) part[ty][tx][e] = ss[e];
    __syncthreads();
    if (ty < VEC) {  // TY >= VEC: thread (tx, e) adds up element e of vector tx
        float t = 0.f;
#pragma unroll 8
        for (int k = 0; k < TF_CF_TY; ++k) t += part[k][tx][ty];
        total[tx][ty] = t;
    }
    __syncthreads();
    if (!active) return;
    float inv[VEC];
    // F.normalize: x / max(||x||, eps); the sqrt(C) factor is folded into the same multiplier.
#pragma unroll
    for (int e = 0; e < VEC; ++e) inv[e] = sqrt_c / fmaxf(sqrtf(total[tx][e]), eps);
    for (int c = ty; c < C; c += TF_CF_TY) {
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
