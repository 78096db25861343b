// The attention kernels compiled for AVX-512 (x86-64-v4; CMakeLists.txt sets the flags for this file only).
#define IK_ATTN_NS attn_avx512
#define IK_VW 16
#include "cpu/attention_kernels.h"
