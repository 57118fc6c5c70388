// Small helpers: files, clocks, SHA-256 (artifact checks against manifest.json).
#include <sys/stat.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstring>
#include <fstream>

#include "internal.hpp"

namespace lrm {

double now_seconds() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

bool is_file(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool path_exists(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0;
}

bool is_dir(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string join_path(const std::string& dir, const std::string& name) {
    if (dir.empty() || dir.back() == '/') return dir + name;
    return dir + "/" + name;
}

// Shortest round-trip text, independent of the host application's locale (snprintf is not); std::to_string would
// print 1e-300 as 0.000000.
std::string number_text(float v) {
    char b[32];
    return std::string(b, std::to_chars(b, b + sizeof(b), v).ptr);
}

std::string number_text(double v) {
    char b[32];
    return std::string(b, std::to_chars(b, b + sizeof(b), v).ptr);
}

std::string read_file(const std::string& path, const char* what, uint64_t max_bytes) {
    if (is_dir(path)) fail(LRM_ERR_IO, std::string(what) + " is a directory, not a file: " + path);
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) {
        const int e = errno;
        fail(LRM_ERR_IO, std::string(what) + " not found or unreadable (" + std::strerror(e) + "): " + path);
    }
    // Sized up front and read in one go: the size limit is checked before any allocation, and a short read
    // is an error (a stream copy swallowed bad_alloc and returned a silently truncated file).
    const std::streamoff size = f.tellg();
    if (size < 0) fail(LRM_ERR_IO, std::string("cannot read ") + what + " (no size): " + path);
    if ((uint64_t)size > max_bytes)
        fail(LRM_ERR_IO, std::string(what) + " is too large (" + std::to_string(size) + " bytes, limit " +
                             std::to_string(max_bytes) + "): " + path);
    std::string data((size_t)size, '\0');
    f.seekg(0);
    f.read(&data[0], size);
    if (f.gcount() != size) fail(LRM_ERR_IO, std::string("cannot read ") + what + " (short read): " + path);
    return data;
}

// ---- SHA-256 (FIPS 180-4)

namespace {
const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

inline uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

void sha_block(uint32_t h[8], const unsigned char* p) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
        const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
        const uint32_t S1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
        const uint32_t ch = (e & f) ^ (~e & g);
        const uint32_t t1 = hh + S1 + ch + K[i] + w[i];
        const uint32_t S0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
        const uint32_t mj = (a & b) ^ (a & c) ^ (b & c);
        const uint32_t t2 = S0 + mj;
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}
}  // namespace

struct Sha256 {
    uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    uint64_t n = 0;
    unsigned char buf[64];
    size_t fill = 0;
    void update(const unsigned char* p, size_t len) {
        n += len;
        if (fill) {
            const size_t take = len < 64 - fill ? len : 64 - fill;
            std::memcpy(buf + fill, p, take);
            fill += take, p += take, len -= take;
            if (fill < 64) return;
            sha_block(h, buf);
            fill = 0;
        }
        for (; len >= 64; p += 64, len -= 64) sha_block(h, p);
        std::memcpy(buf, p, len);
        fill = len;
    }
    std::string hex();
};

std::string Sha256::hex() {
    unsigned char tail[128] = {0};
    const size_t rem = fill;
    std::memcpy(tail, buf, rem);
    tail[rem] = 0x80;
    const size_t tl = rem + 9 <= 64 ? 64 : 128;
    const uint64_t bits = n * 8;
    for (int k = 0; k < 8; ++k) tail[tl - 1 - k] = (unsigned char)(bits >> (8 * k));
    sha_block(h, tail);
    if (tl == 128) sha_block(h, tail + 64);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (int k = 0; k < 8; ++k)
        for (int s = 28; s >= 0; s -= 4) out += hex[(h[k] >> s) & 0xF];
    return out;
}

std::string sha256_hex(const std::string& data) {
    Sha256 s;
    s.update(reinterpret_cast<const unsigned char*>(data.data()), data.size());
    return s.hex();
}

// Streamed: network packages of full-size models are gigabytes.
std::string sha256_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(LRM_ERR_IO, "cannot read " + path);
    Sha256 s;
    std::vector<char> chunk(1 << 20);
    while (f) {
        f.read(chunk.data(), (std::streamsize)chunk.size());
        s.update(reinterpret_cast<const unsigned char*>(chunk.data()), (size_t)f.gcount());
    }
    if (f.bad()) fail(LRM_ERR_IO, "cannot read " + path);
    return s.hex();
}

int64_t file_size(const std::string& path) {
    struct stat st;
    return ::stat(path.c_str(), &st) == 0 ? (int64_t)st.st_size : -1;
}

}  // namespace lrm
