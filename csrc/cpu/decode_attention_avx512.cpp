// The decode attention kernels compiled for AVX-512 (x86-64-v4; CMakeLists.txt sets the flags for this file only).
#define IK_DECODE_NS decode_attn_avx512
#define IK_VW 16
#include "cpu/decode_attention_kernels.h"
