// Network backend: the AOTInductor package written by `lrm-rt export --aoti` (network.pt2), run with LibTorch's
// AOTIModelPackageLoader. AOTInductor rather than TorchScript: torch.jit is deprecated upstream, an AOTI package is
// the supported ahead-of-time path from Python to C++, it needs no Python at run time and it compiles the model for
// this machine's ISA. The only translation unit that includes LibTorch headers (they are slow to compile).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdlib>
#include <map>
#include <mutex>

#include "internal.hpp"

namespace lrm {

namespace {

std::string first_line(const std::string& s) {
    const size_t nl = s.find('\n');
    return nl == std::string::npos ? s : s.substr(0, nl);
}

using Loader = torch::inductor::AOTIModelPackageLoader;

// Loaders of freed contexts, kept for the next context on the same package. A loaded network.pt2 library can
// never be unmapped (its STB_GNU_UNIQUE symbols make glibc ignore dlclose), so without reuse every create/free
// cycle would leave another copy of it (weights included) mapped. Keyed by the package's sha256 (checked against
// the manifest at create) and device; each loader serves one context at a time, so contexts stay independent.
// At exit, idle loaders are destroyed (each removes the temporary directory it extracted its package to) by an
// atexit handler registered when the first loader is pooled: after that loader's load initialised LibTorch and
// CUDA, so the handler runs before their own exit hooks.
class LoaderPool {
public:
    static LoaderPool& get() {
        static LoaderPool* pool = new LoaderPool;
        return *pool;
    }
    std::unique_ptr<Loader> take(const std::string& key) {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = idle_.find(key);
        if (key.empty() || it == idle_.end() || it->second.empty()) return nullptr;
        std::unique_ptr<Loader> loader = std::move(it->second.back());
        it->second.pop_back();
        return loader;
    }
    void give_back(const std::string& key, std::unique_ptr<Loader> loader) {
        if (key.empty() || !loader) return;  // no recorded sha256: not reusable, freed (and its library leaks)
        static std::once_flag at_exit;
        std::call_once(at_exit, [] { std::atexit([] { get().clear(); }); });
        std::lock_guard<std::mutex> lock(mu_);
        idle_[key].push_back(std::move(loader));
    }

private:
    void clear() {
        std::map<std::string, std::vector<std::unique_ptr<Loader>>> idle;
        std::lock_guard<std::mutex> lock(mu_);
        idle.swap(idle_);
    }

    std::mutex mu_;
    std::map<std::string, std::vector<std::unique_ptr<Loader>>> idle_;
};

class AotiBackend final : public NetworkBackend {
public:
    AotiBackend(const ModelInfo& m, const lrm_params& p) : m_(m) {
        const bool cuda = p.device == LRM_DEVICE_CUDA;
        if ((m.aoti_device == "cuda") != cuda)
            fail(LRM_ERR_ARTIFACT, "network.pt2 in " + m.dir + " was compiled for " + m.aoti_device +
                                       ", but the context asks for " + (cuda ? "cuda" : "cpu") +
                                       "; export again on a matching machine (lrm-rt export --aoti)");
        if (cuda && !at::hasCUDA())
            fail(LRM_ERR_UNSUPPORTED, "this LibTorch has no CUDA support (the CPU torch wheel); link a CUDA LibTorch");
        device_ = cuda ? c10::Device(c10::kCUDA, (c10::DeviceIndex)p.device_index) : c10::Device(c10::kCPU);
        const std::string path = join_path(m.dir, m.aoti_file);
        const c10::DeviceIndex index = cuda ? (c10::DeviceIndex)p.device_index : (c10::DeviceIndex)-1;
        if (!m.aoti_sha256.empty()) pool_key_ = m.aoti_sha256 + "@" + std::to_string(index);
        loader_ = LoaderPool::get().take(pool_key_);
        if (!loader_) try {
            loader_ = std::make_unique<Loader>(path, "model", /*run_single_threaded=*/false, /*num_runners=*/1, index);
        } catch (const std::exception& e) {
            fail(LRM_ERR_ARTIFACT, "cannot load " + path + " (" + first_line(e.what()) +
                                       "); it must be compiled by the same torch version as the LibTorch this "
                                       "library links: export again with lrm-rt export --aoti");
        }
        name_ = std::string("aoti-") + (cuda ? "cuda" : "cpu");
    }

    ~AotiBackend() override { LoaderPool::get().give_back(pool_key_, std::move(loader_)); }

    std::string name() const override { return name_; }

    void set_threads(int threads) override {
        // Inductor's CPU kernels are OpenMP loops (calling thread's setting); ATen ops use the intra-op pool.
        if (threads > 0 && at::get_num_threads() != threads) at::set_num_threads(threads);
        omp_set_num_threads(threads > 0 ? threads : omp_get_num_procs());
    }

    std::vector<float> run(const float* pixels, const float* camera) override {
        c10::InferenceMode guard;
        const int64_t S = m_.input_size;
        std::vector<at::Tensor> inputs;
        // from_blob does not copy; the graph never writes its inputs.
        inputs.push_back(at::from_blob(const_cast<float*>(pixels), {1, 3, S, S}, at::kFloat).to(device_));
        if (camera) inputs.push_back(at::from_blob(const_cast<float*>(camera), {1, 16}, at::kFloat).to(device_));
        std::vector<at::Tensor> out;
        try {
            out = loader_->run(inputs);
        } catch (const std::exception& e) {
            fail(LRM_ERR_BACKEND, "network.pt2 failed to run (" + first_line(e.what()) +
                                      "); is it the export of this model? export again with lrm-rt export --aoti");
        }
        const std::vector<int64_t> want = {1, 3, m_.tri_C, m_.tri_H, m_.tri_W};
        if (out.size() != 1 || out[0].sizes().vec() != want)
            fail(LRM_ERR_ARTIFACT, "network.pt2 returns another triplane shape than manifest.json records "
                                   "(mixed-up export files); export again with lrm-rt export --aoti");
        at::Tensor t = out[0].to(at::kCPU, at::kFloat).contiguous();
        const float* p = t.data_ptr<float>();
        return std::vector<float>(p, p + t.numel());
    }

private:
    const ModelInfo& m_;
    c10::Device device_{c10::kCPU};
    std::unique_ptr<Loader> loader_;
    std::string pool_key_;
    std::string name_;
};

}  // namespace

std::unique_ptr<NetworkBackend> make_aoti_network(const ModelInfo& m, const lrm_params& p) {
    return std::make_unique<AotiBackend>(m, p);
}

}  // namespace lrm
