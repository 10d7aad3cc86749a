// The kernel constants build.rs passes to nvcc (src/kernel_dims.rs), for the
// standalone probes in benches/, which build with one nvcc line on the
// device machine (no cargo) and take kernels/common.cuh as the kernels do.
// Only the ones common.cuh reads; a unit test in src/kernel_dims.rs checks
// each against KERNEL_DEFINES.
#pragma once

#define QMK_HIDDEN 1024
#define QMK_NUM_LAYERS 28
#define QMK_NUM_Q_HEADS 16
#define QMK_NUM_KV_HEADS 8
#define QMK_HEAD_DIM 128
#define QMK_INTERMEDIATE 3072
#define QMK_DECODE_POLL_BACKOFF_NS 0
