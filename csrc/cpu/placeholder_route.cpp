#include <torch/library.h>
#include <ATen/ATen.h>
namespace allocmoe {
std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& logits, int64_t top_k, double budget, int64_t k_base,
    c10::string_view scoring, const std::optional<at::Tensor>& bias, int64_t n_group, int64_t topk_group,
    bool norm, double scale) {
  auto p = logits.softmax(-1, at::kFloat);
  auto [w, i] = p.topk(top_k, -1);
  return {w, i.to(at::kInt)};
}
}
TORCH_LIBRARY_IMPL(allocmoe, CPU, m) { m.impl("route", &allocmoe::route_cpu); }
