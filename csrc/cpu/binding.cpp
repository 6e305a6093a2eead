// Python binding of the CPU extension segnext_kernels._C_cpu: plain functions (no dispatcher ops; the package's one
// op layer is the Python torch.library custom op in segnext_kernels/msca/interface.py, which calls these).
#include <torch/extension.h>

#include <array>
#include <string>
#include <vector>

#include "cpu/cpu_alloc.h"
#include "cpu/cpu_isa.h"
#include "cpu/cpu_plans.h"
#include "cpu/msca_cpu.h"
#include "cpu/mlp_cpu.h"
#include "cpu/resize_cpu.h"
#include "cpu/pwconv_cpu.h"
#include "cpu/nmf_cpu.h"
#include "cpu/layernorm_cpu.h"
#include "cpu/group_norm_cpu.h"

namespace {

std::vector<at::Tensor> msca_backward_py(const at::Tensor& grad_out, const at::Tensor& u, const at::Tensor& w0,
                                         const at::Tensor& b0, const at::Tensor& ws, const at::Tensor& bs,
                                         const at::Tensor& w3, const at::Tensor& b3, const std::vector<bool>& needs) {
  TORCH_CHECK(needs.size() == 7, "needs_input_grad: expected 7 bools (u, w0, b0, ws, bs, w3, b3), got ", needs.size());
  std::array<bool, 7> n{};
  for (size_t i = 0; i < 7; ++i) n[i] = needs[i];
  return segnext_cpu::msca_backward(grad_out, u, w0, b0, ws, bs, w3, b3, n);
}

std::vector<at::Tensor> mlp_backward_py(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                        const at::Tensor& b1, const at::Tensor& wdw, const at::Tensor& bdw,
                                        const at::Tensor& w2, const at::Tensor& b2, const std::vector<bool>& needs) {
  TORCH_CHECK(needs.size() == 7, "needs_input_grad: expected 7 bools (x, w1, b1, wdw, bdw, w2, b2), got ", needs.size());
  std::array<bool, 7> n{};
  for (size_t i = 0; i < 7; ++i) n[i] = needs[i];
  return segnext_cpu::mlp_backward(grad_out, x, w1, b1, wdw, bdw, w2, b2, n);
}

std::string isa() { return segnext_cpu::isa_name(segnext_cpu::isa()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "segnext-kernels CPU kernels (fused MSCA, MLP, 1x1 convolution, NMF2D, resize, stage LayerNorm, GroupNorm)";
  m.def("msca_forward", &segnext_cpu::msca_forward, "Fused MSCA forward on CPU tensors (csrc/cpu/msca_cpu.h)");
  m.def("msca_backward", &msca_backward_py, "Fused MSCA backward on CPU tensors (csrc/cpu/msca_cpu.h)");
  m.def("msca_forward_official", &segnext_cpu::msca_forward_official,
        "msca_forward on the official (unpacked) weights (csrc/cpu/msca_cpu.h; the eager direct path)");
  m.def("msca_pack_weights", &segnext_cpu::msca_pack_weights,
        "MSCA's official weights to the packed layout (csrc/cpu/msca_cpu.h; the eager direct path)");
  m.def("msca_unpack_grads", &segnext_cpu::msca_unpack_grads,
        "msca_backward's packed weight gradients to the official shapes (csrc/cpu/msca_cpu.h; the eager direct path)");
  m.def("mlp_forward", &segnext_cpu::mlp_forward, "Fused MSCAN MLP forward on CPU tensors (csrc/cpu/mlp_cpu.h)",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("wdw"), py::arg("bdw"), py::arg("w2"), py::arg("b2"),
        py::arg("residual") = py::none(), py::arg("affine") = py::none(), py::arg("lowp") = false);
  m.def("pwconv_forward", &segnext_cpu::pwconv_forward,
        "Fused 1x1 convolution + epilogue forward on CPU tensors (csrc/cpu/pwconv_cpu.h)", py::arg("x"), py::arg("w"),
        py::arg("bias"), py::arg("act"), py::arg("alpha"), py::arg("r"), py::arg("gamma") = py::none(),
        py::arg("out_dtype") = py::none(), py::arg("lowp") = false);
  m.def("nmf_forward", &segnext_cpu::nmf_forward, "NMF2D forward on CPU tensors (csrc/cpu/nmf_cpu.h)",
        py::arg("x"), py::arg("bases0"), py::arg("steps"), py::arg("eps"), py::arg("inv_t"), py::arg("return_state"));
  m.def("channel_layer_norm_forward", &segnext_cpu::channel_layer_norm_forward,
        "LayerNorm over the channels of (B, C, N) CPU tensors (csrc/cpu/layernorm_cpu.h)", py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("group_norm_forward", &segnext_cpu::group_norm_forward,
        "GroupNorm forward (F.group_norm) on (B, C, *) CPU tensors (csrc/cpu/group_norm_cpu.h)", py::arg("x"),
        py::arg("num_groups"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("mlp_backward", &mlp_backward_py, "Fused MSCAN MLP backward on CPU tensors (csrc/cpu/mlp_cpu.h)");
  m.def("resize_bilinear_forward", &segnext_cpu::resize_bilinear_forward,
        "Bilinear resize forward (F.interpolate mode=\"bilinear\") on CPU tensors (csrc/cpu/resize_cpu.h)");
  m.def("set_output_cache_limit", &segnext_cpu::set_output_cache_limit,
        "Bytes the cache of big resize outputs may keep (csrc/cpu/resize_cpu.h; 0 = none)", py::arg("bytes"));
  m.def("output_cache_bytes", &segnext_cpu::output_cache_bytes, "Bytes of idle output mappings cached now");
  m.def("isa", &isa, "The vector ISA the kernels run with: avx512, avx2 or scalar");
  m.def("set_plan_override", &segnext_cpu::set_plan_override,
        "Tiling-plan override: which 0 msca forward, 1 mlp forward, 2 mlp backward; '' = the kernels' own plan",
        py::arg("which"), py::arg("value"));
  m.def("set_poison", &segnext_cpu::set_poison, "Tests: fill every output with NaN at allocation (off by default)");
}
