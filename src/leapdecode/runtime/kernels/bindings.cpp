// The Python module of the runtime's C++ kernels (built by native.py).
#include <torch/extension.h>

at::Tensor row_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const at::Tensor& start, const at::Tensor& stop, const at::Tensor& col_ptr,
                         const at::Tensor& columns, double scaling);
at::Tensor group_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                        const at::Tensor& minimum, const at::Tensor& scale_unit, const at::Tensor& minimum_unit,
                        int64_t bits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("row_attention", &row_attention, "row-invariant attention (float32, CPU)");
  m.def("group_matmul", &group_matmul, "row-invariant matmul with 4- or 8-bit weight groups (float32, CPU)");
}
