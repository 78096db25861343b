// The decode attention kernels compiled for the build's baseline ISA (SSE2 on x86-64, the target's own elsewhere).
#define IK_DECODE_NS decode_attn_generic
#define IK_VW 4
#include "cpu/decode_attention_kernels.h"
