// The per-CPU vector widths fastclip's kernels are compiled in, shared by every csrc/ kernel file.
#pragma once

// 1 when the kernels are built in several vector widths (GCC/clang target_clones on x86-64), the
// one the CPU supports picked at load time; elsewhere, or when the toolchain refuses (setup.py
// then rebuilds with FASTCLIP_NO_CLONES), the baseline only.  setup.py's CLONES agrees.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTCLIP_NO_CLONES)
#define FASTCLIP_CLONES 1
#else
#define FASTCLIP_CLONES 0
#endif

// CLONES marks a function built in every width; INLINE a helper inlined into each clone.
#if FASTCLIP_CLONES
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif
