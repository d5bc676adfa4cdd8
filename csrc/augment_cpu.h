// The augment kernel's interface (csrc/augment_cpu.cpp), as csrc/bindings.cpp calls it.
#pragma once

#include <cstdint>

#include "clones.h"  // FASTCLIP_CLONES: whether fc_augment_image is built in per-CPU vector widths

// Floats of scratch one call of fc_augment_image needs for an h x w image and blur radius r.
inline int64_t fc_augment_scratch(int64_t h, int64_t w, int64_t r) { return 4 * h * w + w + 2 * r; }

// One image: see the comment at its definition.  No argument is checked here.
void fc_augment_image(const uint8_t *src, int64_t sc, int64_t sh, int64_t sw, int64_t h, int64_t w,
                      int32_t flip, const float *k, int64_t r, const float *a, const float *off,
                      const float *kl, const float *luma, const float *lo, const float *hi, float *out,
                      float *scratch);
