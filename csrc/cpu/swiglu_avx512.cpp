// The swiglu kernels compiled for AVX-512 (x86-64-v4; CMakeLists.txt sets the flags for this file only).
#define IK_SWIGLU_NS swiglu_avx512
#define IK_VW 16
#include "cpu/swiglu_kernels.h"
