// Reads an export directory (lrm_rt/export/manifest.py's layout) and checks that its pieces belong together:
// manifest format and version, config vs triplane shape vs decoder shapes, file hashes and sizes.
#include <cmath>
#include <cstring>

#include "internal.hpp"
#include "json.hpp"

namespace lrm {

namespace {

constexpr const char* kFormat = "lrm_rt-export";
constexpr int kFormatVersion = 1;
constexpr const char* kReexport = "; re-export it with: lrm-rt export --model M --out DIR --aoti";

[[noreturn]] void bad(const std::string& dir, const std::string& what) {
    fail(LRM_ERR_ARTIFACT, "export directory " + dir + ": " + what + kReexport);
}

double num(const Json& j, const std::string& dir, const char* key) {
    if (!j.is_number()) bad(dir, std::string("manifest field '") + key + "' is missing or not a number");
    return j.number();
}

int integer(const Json& j, const std::string& dir, const char* key) {
    const double v = num(j, dir, key);
    if (v != std::floor(v) || std::fabs(v) > 1e9) bad(dir, std::string("manifest field '") + key + "' is not an integer");
    return (int)v;
}

const std::string& text(const Json& j, const std::string& dir, const char* key) {
    if (!j.is_string()) bad(dir, std::string("manifest field '") + key + "' is missing or not a string");
    return j.str();
}

std::vector<double> numbers(const Json& j, const std::string& dir, const char* key, size_t n) {
    if (!j.is_array() || j.size() != n) bad(dir, std::string("manifest field '") + key + "' must hold " + std::to_string(n) + " numbers");
    std::vector<double> out;
    for (const Json& v : j.array()) out.push_back(num(v, dir, key));
    return out;
}

// decoder.safetensors: 8-byte little-endian header size, JSON header, raw tensor bytes.
void read_decoder(ModelInfo& m, const std::string& path, int layers, const std::string& expect_sha) {
    const std::string blob = read_file(path, "decoder weights");
    if (!expect_sha.empty() && sha256_hex(blob) != expect_sha)
        bad(m.dir, "decoder.safetensors does not match the sha256 recorded in manifest.json (mixed-up files)");
    if (blob.size() < 8) bad(m.dir, "decoder.safetensors is truncated");
    uint64_t hlen = 0;
    for (int k = 0; k < 8; ++k) hlen |= (uint64_t)(unsigned char)blob[k] << (8 * k);
    if (hlen > blob.size() - 8) bad(m.dir, "decoder.safetensors has a corrupt header");
    Json header;
    try {
        header = Json::parse(blob.substr(8, hlen));
    } catch (const std::exception& e) {
        bad(m.dir, std::string("decoder.safetensors header: ") + e.what());
    }
    const size_t data0 = 8 + (size_t)hlen;
    m.decoder_params.clear();
    m.decoder_dims.clear();
    for (int l = 0; l < layers; ++l) {
        for (const char* part : {"weight", "bias"}) {
            const std::string key = "layers." + std::to_string(l) + "." + part;
            const Json& t = header[key];
            if (!t.is_object()) bad(m.dir, "decoder.safetensors lacks tensor " + key);
            if (!t["dtype"].is_string() || t["dtype"].str() != "F32") bad(m.dir, key + " is not float32");
            const Json& shape = t["shape"];
            const Json& off = t["data_offsets"];
            if (!shape.is_array() || !off.is_array() || off.size() != 2) bad(m.dir, key + ": malformed entry");
            // Offsets and shapes are untrusted numbers: compared as doubles against the bytes after the header
            // (offsets near 2^64 would wrap a size_t sum), and the element count bounded by the same bytes.
            const size_t avail = blob.size() - data0;
            int64_t count = 1;
            std::vector<int> dims;
            for (const Json& d : shape.array()) {
                dims.push_back(integer(d, m.dir, "shape"));
                if (dims.back() < 0) bad(m.dir, key + ": negative shape");
                if (dims.back() > 0 && count > (int64_t)(avail / 4) / dims.back())
                    bad(m.dir, key + ": shape larger than decoder.safetensors");
                count *= dims.back();
            }
            const double b = num(off.array()[0], m.dir, "data_offsets"), e = num(off.array()[1], m.dir, "data_offsets");
            if (!(b >= 0 && b <= e && e <= (double)avail) || b != std::floor(b) || e - b != 4.0 * (double)count)
                bad(m.dir, key + ": data offsets out of range");
            const bool weight = part[0] == 'w';
            if (weight) {
                if (dims.size() != 2) bad(m.dir, key + " is not a matrix");
                if (l == 0) m.decoder_dims.push_back(dims[1]);
                if (dims[1] != m.decoder_dims.back()) bad(m.dir, key + " does not chain with the previous layer");
                m.decoder_dims.push_back(dims[0]);
            } else if (dims.size() != 1 || dims[0] != m.decoder_dims.back()) {
                bad(m.dir, key + " has the wrong size");
            }
            const size_t at = m.decoder_params.size();
            m.decoder_params.resize(at + (size_t)count);
            std::memcpy(m.decoder_params.data() + at, blob.data() + data0 + (size_t)b, (size_t)count * 4);
        }
    }
}

// aoti.inputs is the only record of the shapes network.pt2 was compiled for: the AOTInductor runtime does not
// check input shapes by default (only with AOTI_RUNTIME_CHECK_INPUTS=1), so a (1, 3, S, S) buffer of another S
// would be read out of bounds. `lrm-rt export --aoti` always writes the entry: without it the manifest is malformed.
void check_aoti_inputs(const Json& in, const ModelInfo& m, const std::string& dir) {
    const bool tsr = m.family == "triposr";
    if (!in.is_array() || in.size() != (tsr ? 1u : 2u))
        bad(dir, std::string("manifest field 'aoti.inputs' is missing or does not list the ") +
                     (tsr ? "pixel input" : "pixel and camera inputs") + " of network.pt2");
    const auto px = numbers(in.array()[0]["shape"], dir, "aoti.inputs.shape", 4);
    if (px[0] != 1 || px[1] != 3 || px[2] != m.input_size || px[3] != m.input_size)
        bad(dir, "network.pt2 takes another input size than the config");
    if (!tsr) {
        const auto cam = numbers(in.array()[1]["shape"], dir, "aoti.inputs.shape", 2);
        if (cam[0] != 1 || cam[1] != 16) bad(dir, "network.pt2 camera input is not (1, 16)");
    }
}

}  // namespace

ModelInfo read_export_dir(const std::string& dir) {
    if (!is_dir(dir)) fail(LRM_ERR_IO, "export directory not found: " + dir);
    const std::string mpath = join_path(dir, "manifest.json");
    if (!is_file(mpath))
        fail(LRM_ERR_ARTIFACT, dir + " is not an lrm-rt export directory (no manifest.json); create one with: "
                               "lrm-rt export --model M --out DIR --aoti");
    Json man;
    try {
        man = Json::parse(read_file(mpath, "manifest"));
    } catch (const Error&) {
        throw;
    } catch (const std::exception& e) {
        fail(LRM_ERR_ARTIFACT, "cannot parse " + mpath + ": " + e.what());
    }
    ModelInfo m;
    m.dir = dir;
    if (!man.is_object() || !man["format"].is_string()) bad(dir, "manifest.json is not an lrm-rt export manifest");
    if (man["format"].str() != kFormat) {
        if (man["format"].str().rfind(kFormat, 0) == 0)
            bad(dir, "the export failed its validation (format " + man["format"].str() + ")");
        bad(dir, "manifest.json is not an lrm-rt export manifest (format '" + man["format"].str() + "')");
    }
    if (!man["format_version"].is_number() || man["format_version"].number() != kFormatVersion)
        bad(dir, "unsupported export format version (this library reads version " + std::to_string(kFormatVersion) + ")");

    const Json& cfg = man["config"];
    if (!cfg.is_object()) bad(dir, "manifest.json has no model config");
    m.name = text(cfg["name"], dir, "config.name");
    m.family = text(cfg["family"], dir, "config.family");
    m.version = text(cfg["version"], dir, "config.version");
    if (m.family != "triposr" && m.family != "openlrm") bad(dir, "unknown model family '" + m.family + "'");
    if (!man["family"].is_string() || man["family"].str() != m.family || !man["version"].is_string() ||
        man["version"].str() != m.version)
        bad(dir, "manifest family/version disagree with its config (inconsistent directory)");
    m.input_size = integer(cfg["input_size"], dir, "config.input_size");
    if (m.input_size < 1 || m.input_size > 8192) bad(dir, "input_size out of range");
    if (!cfg["image_mean"].is_null() || !cfg["image_std"].is_null()) {
        const auto mean = numbers(cfg["image_mean"], dir, "config.image_mean", 3);
        const auto sd = numbers(cfg["image_std"], dir, "config.image_std", 3);
        for (int c = 0; c < 3; ++c) {
            if (sd[c] == 0.0) bad(dir, "image_std holds 0");
            m.mean[c] = (float)mean[c];
            m.stdev[c] = (float)sd[c];
        }
        m.normalize = true;
    }
    if (!cfg["foreground_ratio"].is_null()) {  // null: no framing
        m.foreground_ratio = num(cfg["foreground_ratio"], dir, "config.foreground_ratio");
        // The framed canvas is 1/ratio of the object's side: tiny ratios only make huge canvases (as Python).
        if (!(m.foreground_ratio >= kMinForegroundRatio && m.foreground_ratio <= 1.0))
            bad(dir, "config.foreground_ratio must be in [" + number_text(kMinForegroundRatio) + ", 1], got " +
                         number_text(m.foreground_ratio));
    }
    // Compositing colour in [0, 1]; a value outside makes the TripoSR uint8 conversion undefined.
    if (cfg["background"].is_array()) {
        const auto bg = numbers(cfg["background"], dir, "config.background", 3);
        for (int c = 0; c < 3; ++c) m.background[c] = bg[c];
    } else {
        const double bg = num(cfg["background"], dir, "config.background");
        m.background[0] = m.background[1] = m.background[2] = bg;
    }
    for (double bg : m.background)
        if (!(bg >= 0.0 && bg <= 1.0)) bad(dir, "config.background must be in [0, 1], got " + number_text(bg));
    m.mc_resolution = integer(cfg["mc_resolution"], dir, "config.mc_resolution");
    m.mc_threshold = num(cfg["mc_threshold"], dir, "config.mc_threshold");
    if (m.mc_resolution < 2 || m.mc_resolution > kMaxMcResolution)
        bad(dir, "config.mc_resolution must be in [2, " + std::to_string(kMaxMcResolution) + "], got " +
                     std::to_string(m.mc_resolution));
    if (!std::isfinite(m.mc_threshold)) bad(dir, "config.mc_threshold is not a finite number");

    // Triplane: the config's shape, the manifest's record of it and (later) the network's output must agree.
    const int low = integer(cfg["triplane_low_res"], dir, "config.triplane_low_res");
    m.tri_C = integer(cfg["triplane_dim"], dir, "config.triplane_dim");
    m.tri_H = m.tri_W = 2 * low;
    const auto shape = numbers(man["triplane"]["shape"], dir, "triplane.shape", 4);
    if (shape[0] != 3 || shape[1] != m.tri_C || shape[2] != m.tri_H || shape[3] != m.tri_W)
        bad(dir, "triplane shape in manifest.json disagrees with the model config");

    // Field conventions: fixed per family (lrm_rt/field/spec.py); the manifest's copy must not contradict them.
    const bool tsr = m.family == "triposr";
    m.field.radius = tsr ? 0.87 : 1.0;
    m.field.third_zy = !tsr;
    m.field.relu = !tsr;
    m.field.softplus = !tsr;
    m.field.color_clamp = !tsr;
    m.field.density_bias = -1.f;
    const Json& fs = man["triplane"]["field_spec"];
    if (fs.is_object()) {
        if (num(fs["radius"], dir, "field_spec.radius") != m.field.radius ||
            text(fs["third_plane"], dir, "field_spec.third_plane") != (tsr ? "yz" : "zy") ||
            text(fs["hidden_activation"], dir, "field_spec.hidden_activation") != (tsr ? "silu" : "relu") ||
            text(fs["density_activation"], dir, "field_spec.density_activation") != (tsr ? "exp" : "softplus") ||
            text(fs["color_activation"], dir, "field_spec.color_activation") != (tsr ? "sigmoid" : "sigmoid_clamp"))
            bad(dir, "field_spec in manifest.json is not the " + m.family + " convention this library implements");
        m.field.density_bias = (float)num(fs["density_bias"], dir, "field_spec.density_bias");
    }

    if (!tsr) {
        const auto cam = numbers(man["camera"]["default"], dir, "camera.default", 16);
        m.camera.assign(cam.begin(), cam.end());
    }

    // Decoder (the NeRF MLP the field kernels evaluate).
    const Json& dec = man["decoder"];
    const std::string dfile = dec["file"].is_string() ? dec["file"].str() : "decoder.safetensors";
    const std::string dpath = join_path(dir, dfile);
    if (!is_file(dpath)) bad(dir, "missing " + dfile);
    const int layers = integer(cfg["decoder_linear_layers"], dir, "config.decoder_linear_layers");
    if (layers < 1 || integer(dec["layers"], dir, "decoder.layers") != layers)
        bad(dir, "decoder layer count disagrees with the model config");
    read_decoder(m, dpath, layers, dec["sha256"].is_string() ? dec["sha256"].str() : "");
    if (m.decoder_dims.front() != 3 * m.tri_C || m.decoder_dims.back() != 4)
        bad(dir, "decoder maps " + std::to_string(m.decoder_dims.front()) + " -> " + std::to_string(m.decoder_dims.back()) +
                     " features, the triplane needs " + std::to_string(3 * m.tri_C) + " -> 4");

    // Network artifacts. Checked for presence here; the backend checks that it can run them.
    const Json& aoti = man["aoti"];
    if (aoti.is_object()) {
        m.aoti_file = text(aoti["file"], dir, "aoti.file");
        m.aoti_device = aoti["device"].is_string() ? aoti["device"].str() : "cpu";
        m.aoti_bytes = aoti["bytes"].is_number() ? (int64_t)aoti["bytes"].number() : -1;
        m.aoti_sha256 = aoti["sha256"].is_string() ? aoti["sha256"].str() : "";
        const std::string apath = join_path(dir, m.aoti_file);
        if (!is_file(apath)) bad(dir, "missing " + m.aoti_file);
        if (m.aoti_bytes >= 0 && file_size(apath) != m.aoti_bytes)
            bad(dir, m.aoti_file + " has another size than manifest.json records (mixed-up or truncated files)");
        if (!m.aoti_sha256.empty() && sha256_file(apath) != m.aoti_sha256)
            bad(dir, m.aoti_file + " does not match the sha256 recorded in manifest.json (mixed-up files)");
        check_aoti_inputs(aoti["inputs"], m, dir);
    }
    const Json& trt = man["tensorrt"]["engines"];
    if (trt.is_object()) {
        if (trt["encoder"]["file"].is_string()) m.tensorrt_encoder = trt["encoder"]["file"].str();
        if (trt["transformer"]["file"].is_string()) m.tensorrt_transformer = trt["transformer"]["file"].str();
    }
    if (m.aoti_file.empty() && m.tensorrt_encoder.empty())
        fail(LRM_ERR_ARTIFACT, "export directory " + dir + " holds no network for the C library (no 'aoti' entry in "
                               "manifest.json); add one with: lrm-rt export --model M --out DIR --aoti");
    return m;
}

}  // namespace lrm
