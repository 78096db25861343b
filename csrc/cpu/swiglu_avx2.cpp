// The swiglu kernels compiled for AVX2 + FMA (x86-64-v3; CMakeLists.txt sets the flags for this file only).
#define IK_SWIGLU_NS swiglu_avx2
#define IK_VW 8
#include "cpu/swiglu_kernels.h"
