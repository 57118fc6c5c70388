// Network backend: the TensorRT engines of an export directory (`lrm-rt export --tensorrt`, manifest "tensorrt"),
// run with the TensorRT 10 C++ API: encoder (pixels -> tokens) then transformer (tokens [+ camera] -> triplane),
// float32 at the engine boundaries as lrm_rt/tensorrt_backend.py builds them.
//
// UNVERIFIED: TensorRT cannot be installed on the CI machine, so this file has never been compiled or run. It is
// built only with -DLRM_RT_WITH_TENSORRT=ON. Engines are tied to the TensorRT version and GPU that built them;
// a mismatch shows up as a failed deserialisation (LRM_ERR_ARTIFACT).
#include <NvInfer.h>
#include <cuda_runtime.h>

#include <cstdio>

#include "internal.hpp"

namespace lrm {

namespace {

class Logger final : public nvinfer1::ILogger {
public:
    void log(Severity severity, const char* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
    }
};

void cuda_ok(cudaError_t e, const char* what) {
    if (e != cudaSuccess) fail(LRM_ERR_BACKEND, std::string("TensorRT backend, ") + what + ": " + cudaGetErrorString(e));
}

struct DeviceMemory {
    void* p = nullptr;
    explicit DeviceMemory(size_t bytes) { cuda_ok(cudaMalloc(&p, bytes), "cudaMalloc"); }
    ~DeviceMemory() { cudaFree(p); }
    DeviceMemory(const DeviceMemory&) = delete;
    DeviceMemory& operator=(const DeviceMemory&) = delete;
};

int64_t volume(const nvinfer1::Dims& d) {
    int64_t v = 1;
    for (int i = 0; i < d.nbDims; ++i) v *= d.d[i];
    return v;
}

struct Engine {
    std::unique_ptr<nvinfer1::ICudaEngine> engine;
    std::unique_ptr<nvinfer1::IExecutionContext> context;
};

class TensorRTBackend final : public NetworkBackend {
public:
    TensorRTBackend(const ModelInfo& m, const lrm_params& p) : m_(m) {
        cuda_ok(cudaSetDevice(p.device_index), "cudaSetDevice");
        runtime_.reset(nvinfer1::createInferRuntime(logger_));
        if (!runtime_) fail(LRM_ERR_BACKEND, "cannot create the TensorRT runtime");
        encoder_ = load(m.tensorrt_encoder);
        transformer_ = load(m.tensorrt_transformer);
        cuda_ok(cudaStreamCreate(&stream_), "cudaStreamCreate");
    }
    ~TensorRTBackend() override {
        if (stream_) cudaStreamDestroy(stream_);
    }

    std::string name() const override { return "tensorrt"; }

    std::vector<float> run(const float* pixels, const float* camera) override {
        const int64_t S = m_.input_size;
        DeviceMemory px((size_t)(3 * S * S) * 4);
        cuda_ok(cudaMemcpyAsync(px.p, pixels, (size_t)(3 * S * S) * 4, cudaMemcpyHostToDevice, stream_), "upload");
        nvinfer1::IExecutionContext* enc = encoder_.context.get();
        set_input(enc, "pixels", nvinfer1::Dims4{1, 3, S, S}, px.p);
        const nvinfer1::Dims tok_dims = enc->getTensorShape("tokens");
        if (tok_dims.nbDims != 3 || volume(tok_dims) <= 0) fail(LRM_ERR_ARTIFACT, "encoder engine: unexpected tokens shape");
        DeviceMemory tokens((size_t)volume(tok_dims) * 4);
        enc->setTensorAddress("tokens", tokens.p);
        if (!enc->enqueueV3(stream_)) fail(LRM_ERR_BACKEND, "TensorRT encoder engine failed to run");

        nvinfer1::IExecutionContext* tr = transformer_.context.get();
        set_input(tr, "tokens", tok_dims, tokens.p);
        std::unique_ptr<DeviceMemory> cam;
        if (camera) {
            cam.reset(new DeviceMemory(16 * 4));
            cuda_ok(cudaMemcpyAsync(cam->p, camera, 16 * 4, cudaMemcpyHostToDevice, stream_), "upload");
            set_input(tr, "camera", nvinfer1::Dims2{1, 16}, cam->p);
        }
        const nvinfer1::Dims out_dims = tr->getTensorShape("triplane");
        const int64_t n = (int64_t)3 * m_.tri_C * m_.tri_H * m_.tri_W;
        if (volume(out_dims) != n) fail(LRM_ERR_ARTIFACT, "transformer engine returns another triplane shape than manifest.json");
        DeviceMemory tri((size_t)n * 4);
        tr->setTensorAddress("triplane", tri.p);
        if (!tr->enqueueV3(stream_)) fail(LRM_ERR_BACKEND, "TensorRT transformer engine failed to run");
        std::vector<float> out((size_t)n);
        cuda_ok(cudaMemcpyAsync(out.data(), tri.p, (size_t)n * 4, cudaMemcpyDeviceToHost, stream_), "download");
        cuda_ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        return out;
    }

private:
    Engine load(const std::string& file) {
        const std::string path = join_path(m_.dir, file);
        const std::string blob = read_file(path, "TensorRT engine");
        Engine e;
        e.engine.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
        if (!e.engine)
            fail(LRM_ERR_ARTIFACT, "cannot deserialise " + path + ": engines only run on the TensorRT version and GPU "
                                   "that built them; rebuild with lrm-rt export --tensorrt");
        for (int i = 0; i < e.engine->getNbIOTensors(); ++i) {
            const char* name = e.engine->getIOTensorName(i);
            if (e.engine->getTensorDataType(name) != nvinfer1::DataType::kFLOAT)
                fail(LRM_ERR_UNSUPPORTED, path + ": tensor '" + name + "' is not float32 at the engine boundary");
        }
        e.context.reset(e.engine->createExecutionContext());
        if (!e.context) fail(LRM_ERR_OUT_OF_MEMORY, "cannot create a TensorRT execution context for " + path);
        return e;
    }

    static void set_input(nvinfer1::IExecutionContext* ctx, const char* name, const nvinfer1::Dims& dims, void* ptr) {
        if (!ctx->setInputShape(name, dims) || !ctx->setTensorAddress(name, ptr))
            fail(LRM_ERR_ARTIFACT, std::string("TensorRT engine rejects input '") + name + "' (shape outside its profile?)");
    }

    const ModelInfo& m_;
    Logger logger_;
    std::unique_ptr<nvinfer1::IRuntime> runtime_;
    Engine encoder_, transformer_;  // destroyed before the runtime (declared after it)
    cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<NetworkBackend> make_tensorrt_network(const ModelInfo& m, const lrm_params& p) {
    return std::make_unique<TensorRTBackend>(m, p);
}

}  // namespace lrm
