// Every kernel launch in csrc/cuda is written FS_LAUNCH(grid, block, stream, kernel)(arguments...).
//
// Under nvcc it is the triple-chevron launch (no dynamic shared memory). The tests' CPU
// emulator (tests/cuda_emulator) compiles these same sources with the host compiler and
// FUSED_SCHED_CUDA_EMULATOR defined, and then a launch runs the kernel's blocks one after
// another on the CPU, a block's threads as fibers: the kernels' indexing, selection and
// synchronisation logic is tested on machines without a GPU, from the text nvcc compiles.
#pragma once

#if defined(FUSED_SCHED_CUDA_EMULATOR)
#define FS_LAUNCH(grid, block, stream, ...) ::fused_sched::emulator::launch((grid), (block), (stream), __VA_ARGS__)
#else
#define FS_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>
#endif
