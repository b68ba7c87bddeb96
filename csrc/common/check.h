// ALLOCMOE_CHECK(cond, parts...): TORCH_CHECK without std::ostringstream.
//
// Why: TORCH_CHECK formats a multi-part message with c10::str, i.e. std::ostringstream in the
// extension's own code. On the CUDA image this project targets (torch 2.11+cu130 wheel, the
// extension built there by g++ 13.3) ANY std::ostringstream used in extension code segfaults
// (measured 2026-11-22: a bare `std::ostringstream o; o << 1;` crashed with SIGSEGV, while
// std::to_string, snprintf and a TORCH_CHECK with a single literal message worked). So a bad
// argument would crash the process instead of raising. This macro builds the message with
// std::string appends only and raises through TORCH_CHECK's single `const char*` path, which
// constructs the c10::Error inside libc10. Use it instead of TORCH_CHECK in all of csrc/.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace allocmoe::detail {

template <typename T>
inline constexpr bool kUnsupportedPart = false;

template <typename T>
void append_part(std::string& s, const T& v) {
  if constexpr (std::is_same_v<T, bool>) {
    s += v ? "true" : "false";
  } else if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else if constexpr (std::is_integral_v<T> || (std::is_enum_v<T> && !std::is_same_v<T, c10::ScalarType> &&
                                                     !std::is_same_v<T, c10::DeviceType>)) {
    s += std::to_string(static_cast<long long>(v));
  } else if constexpr (std::is_floating_point_v<T>) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
    s += buf;
  } else if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    s += std::string_view(v);
  } else if constexpr (std::is_same_v<T, c10::ScalarType>) {
    s += c10::toString(v);
  } else if constexpr (std::is_same_v<T, c10::Device>) {
    s += v.str();  // formatted inside libc10
  } else if constexpr (std::is_same_v<T, c10::DeviceType>) {
    s += c10::DeviceTypeName(v, /*lower_case=*/true);
  } else if constexpr (std::is_convertible_v<const T&, c10::IntArrayRef>) {
    const c10::IntArrayRef a(v);
    s += '[';
    for (size_t i = 0; i < a.size(); ++i) {
      if (i) s += ", ";
      s += std::to_string(static_cast<long long>(a[i]));
    }
    s += ']';
  } else {
    static_assert(kUnsupportedPart<T>, "ALLOCMOE_CHECK: add a formatter for this message part type");
  }
}

template <typename... Parts>
[[noreturn]] C10_NOINLINE void check_failed(const char* func, const char* file, uint32_t line, const Parts&... parts) {
  std::string msg;
  (append_part(msg, parts), ...);
  // The const char* overload: the c10::Error (and its std::string members) is built in libc10.
  ::c10::detail::torchCheckFail(func, file, line, msg.c_str());
}

}  // namespace allocmoe::detail

#define ALLOCMOE_CHECK(cond, ...)                                                                \
  do {                                                                                           \
    if (C10_UNLIKELY(!(cond))) {                                                                 \
      ::allocmoe::detail::check_failed(__func__, __FILE__, static_cast<uint32_t>(__LINE__), __VA_ARGS__); \
    }                                                                                            \
  } while (0)
