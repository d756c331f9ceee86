// The few libtorch calls tch does not expose: autocast (bf16 mixed precision, CPU included), the
// channels-last memory format, inference mode and the CUDA bf16 query.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/InferenceMode.h>

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
        auto converted = tensor->contiguous(format);
        // With one channel the plain strides also count as channels-last, so `contiguous` keeps them, but
        // oneDNN reads the layout from the strides and runs the convolution in the plain layout, then copies
        // its output (single-threaded: a sixth of the 2D U-Net's forward). Same memory, explicit strides.
        if (converted.size(1) == 1) {
            const auto strides = tensor->dim() == 5 ? c10::get_channels_last_strides_3d(converted.sizes())
                                                    : c10::get_channels_last_strides_2d(converted.sizes());
            converted = converted.as_strided(converted.sizes(), strides);
        }
        return new at::Tensor(converted);
    } catch (...) {
        return nullptr;
    }
}

// Enters c10::InferenceMode on this thread (no autograd bookkeeping at all: cheaper than no_grad). The
// returned guard must be ended on the same thread, innermost first.
void* ivado_inference_mode_begin() {
    try {
        return new c10::InferenceMode(true);
    } catch (...) {
        return nullptr;
    }
}

void ivado_inference_mode_end(void* guard) { delete static_cast<c10::InferenceMode*>(guard); }

// Whether the current CUDA device runs bf16 convolutions natively (compute capability 8 and cuDNN 8);
// false without CUDA.
bool ivado_cuda_bf16_supported() {
    try {
        return at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8();
    } catch (...) {
        return false;
    }
}

}
