"""The compiled extensions' sources and flags (pure Python: setup.py loads this file by path, without torch).

Paths are relative to the source directory: the checkout's ``csrc/``, shipped in the package as
``segnext_kernels/csrc`` (``extension.source_dir``).
"""
#: segnext_kernels._C: the MSCA and NMF2D CUDA kernels and their binding.
CUDA_SOURCES = ("msca/msca_fwd.cu", "msca/msca_bwd.cu", "nmf/nmf_fwd.cu", "nmf/nmf_bwd.cu", "binding.cpp")
#: segnext_kernels._C_cpu: the C++ CPU kernels and their binding.
CPU_SOURCES = (
    "cpu/binding.cpp", "cpu/cpu_isa.cpp", "cpu/cpu_alloc.cpp", "cpu/cpu_plans.cpp",
    "cpu/msca_cpu_fwd.cpp", "cpu/msca_cpu_bwd.cpp", "cpu/msca_cpu_weights.cpp",
    "cpu/mlp_cpu_fwd.cpp", "cpu/mlp_cpu_bwd.cpp",
    "cpu/resize_cpu.cpp",
    "cpu/layernorm_cpu.cpp", "cpu/group_norm_cpu.cpp",
    "cpu/pwconv_cpu.cpp", "cpu/gemm_bf16.cpp",
    "cpu/nmf_cpu.cpp",
)
#: No -march: the CPU kernels choose their vector ISA at run time (csrc/cpu/cpu_isa.h). -fopenmp: ATen's
#: at::parallel_for is an inline OpenMP region in its header, which runs on one thread without it.
CPU_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
CPU_LDFLAGS = ("-fopenmp",)
