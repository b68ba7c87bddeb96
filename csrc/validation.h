// Data-dependent input validation (non-finite logits, ids out of range) costs a device-to-host
// sync on CUDA, so CUDA kernels run it only when enabled; CPU kernels always run it.
// Enabled by allocmoe_ext.ops.set_validation(True) or the environment variable ALLOCMOE_VALIDATE=1.
#pragma once

namespace allocmoe {
bool validation_enabled();
void set_validation_enabled(bool on);
}  // namespace allocmoe
