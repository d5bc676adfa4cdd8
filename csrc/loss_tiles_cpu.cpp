// The elementwise tile work of the chunked contrastive losses (fastclip/ops/tiles.py), fused.
//
// PyTorch spends ~8 passes over a tile on its row and column log-sum-exp (amax, subtract, exp, sum,
// log, per dimension) and ~5 on the backward's exp(z - r) + exp(z - c).  Here the forward is two
// passes (the maxima, then both sums of exponentials) and the backward one.  Rows are split over
// std::threads (no OpenMP: the wheel carries no runtime); each thread keeps its own column maxima
// and sums, merged in double at the end.
//
// exp is a Cephes-style float polynomial written so that GCC vectorises it (glibc's vector exp is
// only used under -ffast-math): relative error ~2 ulp on [-87.3, 88], 0 below (exp(-inf) = 0).
//
// C-style C++ with no Python or torch headers; csrc/bindings.cpp checks every argument.
#include "loss_tiles_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kLanes = 16;
// Rows per lse_part call: its float column sums then add at most this many terms before the merge
// (in float, rescaled), and the block, read twice, stays in L2 (128 x 1024 floats = 512 KiB).
constexpr int64_t kLseRows = 128;

/* exp(x) in float: x = n ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial, 2^n through the exponent
   bits.  n is rounded with the 1.5 * 2^23 trick (needs no floor call, so the loop vectorises). */
INLINE float fast_exp(float x) {
    float c = x > 88.0f ? 88.0f : x;
    c = c < -87.3f ? -87.3f : c;
    const float t = c * 1.44269504088896341f + 12582912.0f;
    const float n = t - 12582912.0f;
    float r = c - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = (p * r) * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float s;
    std::memcpy(&s, &bits, sizeof s);
    return x < -87.3f ? 0.0f : y * s;
}

/* Rows [r0, r1) of the tile: their lse into row_out, and their column maxima and sums merged into
   this thread's cmax [k] and csum [k] (csum[j] = sum of exp(z - cmax[j]) over the thread's rows so
   far; 0 where none was finite).  bmax, bsum: k floats of scratch. */
CLONES
void lse_part(const float *z, int64_t r0, int64_t r1, int64_t k, double *row_out, float *cmax, float *csum,
              float *bmax, float *bsum) {
    for (int64_t j = 0; j < k; j++) {
        bmax[j] = kNegInf;
        bsum[j] = 0.0f;
    }
    for (int64_t i = r0; i < r1; i++) {  /* pass 1: row and column maxima */
        const float *row = z + i * k;
        float lane[kLanes];
        for (int q = 0; q < kLanes; q++) lane[q] = kNegInf;
        int64_t j = 0;
        for (; j + kLanes <= k; j += kLanes)
            for (int q = 0; q < kLanes; q++) {
                const float v = row[j + q];
                lane[q] = lane[q] > v ? lane[q] : v;
                bmax[j + q] = bmax[j + q] > v ? bmax[j + q] : v;
            }
        for (; j < k; j++) {
            const float v = row[j];
            lane[0] = lane[0] > v ? lane[0] : v;
            bmax[j] = bmax[j] > v ? bmax[j] : v;
        }
        float m = lane[0];
        for (int q = 1; q < kLanes; q++) m = m > lane[q] ? m : lane[q];
        row_out[i] = m;  /* the max for now; pass 2 adds the log-sum */
    }
    for (int64_t j = 0; j < k; j++) bmax[j] = bmax[j] == kNegInf ? 0.0f : bmax[j];
    for (int64_t i = r0; i < r1; i++) {  /* pass 2: both sums of exponentials, the row still in L1 */
        const float *row = z + i * k;
        const float m = row_out[i] == -std::numeric_limits<double>::infinity() ? 0.0f : (float)row_out[i];
        float lane[kLanes] = {0};
        int64_t j = 0;
        for (; j + kLanes <= k; j += kLanes)
            for (int q = 0; q < kLanes; q++) {
                const float v = row[j + q];
                lane[q] += fast_exp(v - m);
                bsum[j + q] += fast_exp(v - bmax[j + q]);
            }
        for (; j < k; j++) {
            lane[0] += fast_exp(row[j] - m);
            bsum[j] += fast_exp(row[j] - bmax[j]);
        }
        double s = 0.0;
        for (int q = 0; q < kLanes; q++) s += lane[q];
        row_out[i] = (double)m + std::log(s);
    }
    for (int64_t j = 0; j < k; j++) {  /* merge: the first block with a finite logit is copied exactly */
        const float a = cmax[j], b = bmax[j], top = a > b ? a : b;
        const bool none = csum[j] == 0.0f, skip = bsum[j] == 0.0f;
        const float merged = csum[j] * fast_exp(a - top) + bsum[j] * fast_exp(b - top);
        cmax[j] = skip ? a : (none ? b : top);
        csum[j] = skip ? csum[j] : (none ? bsum[j] : merged);
    }
}

CLONES
void softmax_pair_part(const float *z, int64_t r0, int64_t r1, int64_t k, const float *row_hi,
                       const float *row_lo, const float *col_hi, const float *col_lo, float *out) {
    for (int64_t i = r0; i < r1; i++) {
        const float *row = z + i * k;
        float *o = out + i * k;
        const float rh = row_hi[i], rl = row_lo[i];
        for (int64_t j = 0; j < k; j++) {
            const float v = row[j];
            o[j] = fast_exp((v - rh) - rl) + fast_exp((v - col_hi[j]) - col_lo[j]);
        }
    }
}

/* How many threads a tile of m x k is worth: one per 64 Ki elements (a thread start costs ~20 us,
   about what a core needs for that many exponentials), at most `threads` and m. */
int workers(int64_t m, int64_t k, int threads) {
    const int64_t by_size = std::max<int64_t>(1, (m * k) >> 16);
    return (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)std::max(threads, 1), by_size, m}));
}

/* run(t, r0, r1) over blocks of rows (a quarter of a thread's share, at most `most` rows) taken in
   turn by `parts` threads (t: 0 for the caller, 1.. for the started ones).  Blocks, not a fixed split: right after a torch matmul its OpenMP workers still
   spin on their cores for a while, so a started thread may run at half speed; the caller then takes
   more of the blocks. */
template <typename F> void split_rows(int64_t m, int64_t most, int parts, F &&run) {
    if (parts == 1) {
        for (int64_t r0 = 0; r0 < m; r0 += most) run(0, r0, std::min(m, r0 + most));
        return;
    }
    const int64_t block = std::max<int64_t>(1, std::min<int64_t>(m / (4 * parts), most));
    std::atomic<int64_t> next{0};
    auto worker = [&](int t) {
        for (int64_t r0; (r0 = next.fetch_add(block)) < m;) run(t, r0, std::min(m, r0 + block));
    };
    std::vector<std::thread> pool;
    pool.reserve(parts - 1);
    for (int t = 1; t < parts; t++) pool.emplace_back(worker, t);
    worker(0);
    for (auto &th : pool) th.join();
}

}  // namespace

void fc_tile_lse_rows_cols(const float *z, int64_t m, int64_t k, double *row_out, double *col_out, int threads) {
    if (m == 0) {
        for (int64_t j = 0; j < k; j++) col_out[j] = -std::numeric_limits<double>::infinity();
        return;
    }
    const int parts = workers(m, k, threads);
    std::vector<float> part(2 * (size_t)parts * (size_t)k, 0.0f), scratch(2 * (size_t)parts * (size_t)k);
    split_rows(m, kLseRows, parts, [&](int t, int64_t r0, int64_t r1) {
        lse_part(z, r0, r1, k, row_out, part.data() + 2 * t * k, part.data() + (2 * t + 1) * k,
                 scratch.data() + 2 * t * k, scratch.data() + (2 * t + 1) * k);
    });
    for (int64_t j = 0; j < k; j++) {
        float top = kNegInf;  /* the largest maximum among the parts that saw a finite logit */
        for (int t = 0; t < parts; t++)
            if (part[(2 * t + 1) * k + j] > 0.0f) top = std::max(top, part[2 * t * k + j]);
        top = top == kNegInf ? 0.0f : top;
        double s = 0.0;
        for (int t = 0; t < parts; t++) {
            const float mt = part[2 * t * k + j], st = part[(2 * t + 1) * k + j];
            s += parts == 1 ? (double)st : (double)st * std::exp((double)mt - (double)top);
        }
        col_out[j] = (double)top + std::log(s);
    }
}

void fc_tile_softmax_pair(const float *z, int64_t m, int64_t k, const float *row_hi, const float *row_lo,
                          const float *col_hi, const float *col_lo, float *out, int threads) {
    if (m == 0 || k == 0) return;
    split_rows(m, std::max<int64_t>(1, ((int64_t)1 << 16) / k), workers(m, k, threads), [&](int, int64_t r0, int64_t r1) {
        softmax_pair_part(z, r0, r1, k, row_hi, row_lo, col_hi, col_lo, out);
    });
}
