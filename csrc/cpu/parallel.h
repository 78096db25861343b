// Function multi-versioning of the CPU kernels' hot loops.
#pragma once

// The hot loops are compiled for baseline x86-64, AVX2+FMA and AVX-512 and picked at load time (ifunc), so a
// portable build still runs wide vectors. Elsewhere the compiler's target flags apply.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define IK_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define IK_CPU_CLONES
#endif
