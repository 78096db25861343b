// The rms_norm kernels compiled for AVX2 + FMA (x86-64-v3; CMakeLists.txt sets the flags for this file only).
#define IK_RMS_NORM_NS rms_norm_avx2
#define IK_VW 8
#include "cpu/rms_norm_kernels.h"
