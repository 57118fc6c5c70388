// Picks the network backend for an export directory and a device, among the ones this build has.
#include "internal.hpp"

namespace lrm {

#if defined(LRM_RT_WITH_TORCH)
std::unique_ptr<NetworkBackend> make_aoti_network(const ModelInfo& m, const lrm_params& p);
#endif
#if defined(LRM_RT_WITH_TENSORRT)
std::unique_ptr<NetworkBackend> make_tensorrt_network(const ModelInfo& m, const lrm_params& p);
#endif

std::unique_ptr<NetworkBackend> make_network(const ModelInfo& m, const lrm_params& p) {
#if defined(LRM_RT_WITH_TENSORRT)
    // TensorRT engines first on a GPU: they are built for it (FP16 where the export asked for it).
    if (p.device == LRM_DEVICE_CUDA && !m.tensorrt_encoder.empty() && !m.tensorrt_transformer.empty())
        return make_tensorrt_network(m, p);
#endif
#if defined(LRM_RT_WITH_TORCH)
    if (!m.aoti_file.empty()) return make_aoti_network(m, p);
#endif
    (void)p;
    if (!m.aoti_file.empty())
        fail(LRM_ERR_UNSUPPORTED, "this lrm_rt library was built without LibTorch, so it cannot run network.pt2 "
                                  "(rebuild with LRM_RT_WITH_TORCH=ON)");
    fail(LRM_ERR_UNSUPPORTED, "export directory " + m.dir + " has only TensorRT engines, which this build or "
                              "device cannot run; add an AOTInductor package with lrm-rt export --aoti");
}

}  // namespace lrm
