// The chunked losses' elementwise tile kernels (csrc/loss_tiles_cpu.cpp), as csrc/bindings.cpp calls them.
#pragma once

#include <cstdint>

#include "clones.h"  // CLONES, INLINE: the per-CPU vector widths the kernels are built in

// Row and column log-sum-exp of a float32 C-contiguous tile z [m, k] (what fastclip.ops.tiles.tile_lse
// gives along dims 1 and 0): row_out [m], col_out [k] in float64, each the line's fp32 max (0 for an
// all -inf line) plus log of the fp32 sum of exp(z - max).  Rows split over `threads` std::threads.
void fc_tile_lse_rows_cols(const float *z, int64_t m, int64_t k, double *row_out, double *col_out, int threads);

// out [m, k] = exp(z - row_stat[:, None]) + exp(z - col_stat[None, :]) for a float32 tile, each
// statistic applied as fastclip.ops.tiles.sub_stat applies it: (z - hi) - lo in float32, hi and lo
// given here (lo all 0 for float32 statistics).  out may be z itself.  No argument is checked.
void fc_tile_softmax_pair(const float *z, int64_t m, int64_t k, const float *row_hi, const float *row_lo,
                          const float *col_hi, const float *col_lo, float *out, int threads);
