// The decode attention kernels compiled for AVX2 + FMA (x86-64-v3; CMakeLists.txt sets the flags for this file only).
#define IK_DECODE_NS decode_attn_avx2
#define IK_VW 8
#include "cpu/decode_attention_kernels.h"
