// Rotary embedding on adjacent pairs of the head dim. Math and launch rules: kernels/rope.py.
//
// x is [B, L, H, Dh] contiguous; cos/sin are fp32 [L, Dh/2] (tables_per_batch = 0) or
// [B, L, Dh/2] (tables_per_batch = 1). Grid-stride over vectors of VEC elements (VEC even and
// dividing Dh, so a vector holds VEC/2 whole pairs of one head).
template <typename T, int VEC>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos_t,
                            const float* __restrict__ sin_t, T* __restrict__ out, long long n_vec,
                            int half, int H, int L, int tables_per_batch) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_vec; i += stride) {
        const long long e0 = i * VEC;
        const long long p0 = e0 >> 1;               // first pair index
        const long long head_row = p0 / half;       // (b * L + l) * H + h
        const int j0 = (int)(p0 - head_row * half); // pair index inside the head
        const long long bl = head_row / H;          // b * L + l
        const long long t0 = (tables_per_batch ? bl : bl % L) * half + j0;
        float v[VEC], o[VEC];
        tf::load_f<T, VEC>(x + e0, v);
#pragma unroll
        for (int k = 0; k < VEC / 2; ++k) {
            const float c = cos_t[t0 + k], s = sin_t[t0 + k];
            const float x0 = v[2 * k], x1 = v[2 * k + 1];
            o[2 * k] = x0 * c - x1 * s;
            o[2 * k + 1] = x0 * s + x1 * c;
        }
        tf::store_f<T, VEC>(out + e0, o);
    }
}
