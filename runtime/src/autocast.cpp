// The few libtorch calls tch does not expose: autocast (bf16 mixed precision, CPU included) and the
// channels-last memory format.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>

extern "C" {

// Turns autocast on or off for `device` (0 CPU, 1 CUDA) with `bf16` (else fp16) as the lower precision.
// Returns whether it was on before, so callers can restore it.
bool ivado_autocast_set(int device, bool enabled, bool bf16) {
    const auto type = device == 0 ? at::kCPU : at::kCUDA;
    const bool previous = at::autocast::is_autocast_enabled(type);
    at::autocast::set_autocast_dtype(type, bf16 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(type, enabled);
    return previous;
}

// Autocast caches casted weights while enabled; drop them when a region ends, as torch.autocast does.
void ivado_autocast_clear_cache() { at::autocast::clear_cache(); }

// A channels-last copy of a 4D (or channels-last-3d copy of a 5D) tensor, owned by the caller; null on error.
at::Tensor* ivado_to_channels_last(const at::Tensor* tensor) {
    try {
        const auto format =
            tensor->dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
        return new at::Tensor(tensor->contiguous(format));
    } catch (...) {
        return nullptr;
    }
}

}
