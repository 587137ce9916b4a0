// The Python module of the runtime's C++ kernels (built by native.py).
#include <torch/extension.h>

at::Tensor row_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& start, const at::Tensor& stop, const at::Tensor& col_ptr,
                         const at::Tensor& columns, double scaling);
at::Tensor block_attention(const at::Tensor& query, const at::Tensor& exact_key, const at::Tensor& exact_value,
                           int64_t view, int64_t block, const std::vector<at::Tensor>& key_blocks,
                           const std::vector<at::Tensor>& value_blocks, const std::vector<int64_t>& key_layout,
                           const std::vector<int64_t>& value_layout, const at::Tensor& table, const at::Tensor& start,
                           const at::Tensor& stop, const at::Tensor& col_ptr, const at::Tensor& columns,
                           double scaling);
at::Tensor group_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& minimum, const at::Tensor& scale_unit, const at::Tensor& minimum_unit,
                        int64_t bits);
at::Tensor group_mlp(const at::Tensor& x, const std::vector<at::Tensor>& gate, const std::vector<at::Tensor>& up,
                     const std::vector<at::Tensor>& down, const std::vector<int64_t>& bits, int64_t activation);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_attention", &row_attention, "row-invariant attention (float32, CPU)");
  m.def("block_attention", &block_attention, "row-invariant attention over compressed KV blocks (float32, CPU)");
  m.def("group_matmul", &group_matmul, "row-invariant matmul with 4- or 8-bit weight groups (float32, CPU)");
  m.def("group_mlp", &group_mlp, "a gated MLP over three group_matmul matrices in one call (float32, CPU)");
  m.def("rms_norm", &rms_norm, "row-invariant RMS norm over the last dimension (float32, CPU)");
}
