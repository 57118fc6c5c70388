// Image files -> RGBA8: PNG (zlib for the inflate, everything else here), JPEG (libjpeg), binary PNM (P5, P6, P7).
// Conversions follow what the Python loader gets from Pillow, so both runtimes see the same pixels:
// 16-bit colour samples keep their high byte, 16-bit grey is rounded (v / 257), low bit depths are scaled
// to 0..255, tRNS keys (16-bit RGB ones compared at their high byte, grey ones at full depth) and palette alpha
// become the alpha channel, and the orientation Pillow reports is applied: EXIF (a PNG eXIf chunk, a tEXt "exif"
// or ImageMagick's "Raw profile type exif" text; JPEG APP1s), else an XMP packet's tiff:Orientation. JPEG through
// libjpeg-turbo, the library Pillow decodes with, when the build found it.
#include <zlib.h>
#if defined(LRM_RT_WITH_JPEG)
#include <csetjmp>
#include <cstdio>  // jpeglib.h needs FILE
#include <jpeglib.h>
#include <jerror.h>  // after jpeglib.h: the message codes (JWRN_JPEG_EOF)
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "internal.hpp"

namespace lrm {

namespace {

[[noreturn]] void bad_image(const std::string& source, const std::string& what) {
    fail(LRM_ERR_IMAGE, what + ": " + source);
}

// Header sizes are untrusted: PNG sides go up to 2^32 - 1 and PNM/PAM ones further, so w * h can overflow int64
// and pass a plain product test, so it is compared by division (h > 0 here).
void check_size(int64_t w, int64_t h, const std::string& source) {
    if (w <= 0 || h <= 0) bad_image(source, "image has zero size (" + std::to_string(w) + "x" + std::to_string(h) + ")");
    if (w > kMaxImagePixels / h)
        bad_image(source, "image is too large (" + std::to_string(w) + "x" + std::to_string(h) + " pixels, limit " +
                              std::to_string(kMaxImagePixels) + "; refusing to decode a possible decompression bomb)");
}

uint32_t be32(const unsigned char* p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

// ------------------------------------------------------------------------------------------------ EXIF

constexpr int kNoOrientation = -1;  // no orientation given: the XMP one, if any, is used
constexpr int kUnreadable = -2;     // a block Pillow's reader raises on: the Python loader keeps the image as stored

// An EXIF block's Orientation tag read by Pillow's rules (Exif.load, ImageFileDirectory_v2.load), so that both
// loaders turn the same images: up to two "Exif\0\0" prefixes, a TIFF header of its accepted forms (BigTIFF makes
// it raise), the first IFD's entries up to the first that cannot be read whole (an out-of-line value past the end
// ends the reading, one beyond the running total of such values is skipped); entries of an unknown type or no data
// are skipped and the first of a repeated tag counts. Returns the value when it is a whole number in 1..8, 0 for any
// other value (present: no XMP fallback, no turn), or kNoOrientation / kUnreadable.
int exif_orientation(const std::string& block) {
    size_t start = 0;
    for (int k = 0; k < 2 && block.compare(start, 6, std::string("Exif\0\0", 6)) == 0; ++k) start += 6;
    const auto* b = reinterpret_cast<const unsigned char*>(block.data()) + start;
    const uint64_t n = block.size() - start;
    if (n == 0) return kNoOrientation;
    if (n < 8) return kUnreadable;
    const bool le = b[0] == 'I' && b[1] == 'I', be = b[0] == 'M' && b[1] == 'M';
    const bool classic = (b[2] == 42 && b[3] == 0) || (b[2] == 0 && b[3] == 42);
    if (!(le || be) || !classic) return kUnreadable;
    auto u16 = [&](uint64_t at) -> uint32_t { return le ? b[at] | b[at + 1] << 8 : b[at] << 8 | b[at + 1]; };
    auto u32 = [&](uint64_t at) -> uint32_t { return le ? u16(at) | u16(at + 2) << 16 : u16(at) << 16 | u16(at + 2); };
    auto u64 = [&](uint64_t at) -> uint64_t {
        return le ? u32(at) | (uint64_t)u32(at + 4) << 32 : (uint64_t)u32(at) << 32 | u32(at + 4);
    };
    static const int unit[17] = {0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8};  // bytes per value, by type
    const uint64_t ifd = u32(4);
    if (ifd + 2 > n) return kNoOrientation;
    std::vector<bool> stored(65536, false);
    uint64_t total = 0, pos = ifd + 2;
    const uint32_t entries = u16(ifd);
    for (uint32_t e = 0; e < entries && pos + 12 <= n; ++e, pos += 12) {
        const uint32_t tag = u16(pos), type = u16(pos + 2);
        if (stored[tag] || type > 16 || unit[type] == 0) continue;
        const uint64_t size = (uint64_t)u32(pos + 4) * unit[type];
        uint64_t at = pos + 8;
        if (size > 4) {
            total += size;
            if (total > n) continue;
            at = u32(pos + 8);
            if (at + size > n) break;
        }
        if (size == 0) continue;
        stored[tag] = true;
        if (tag != 0x0112) continue;
        double v;  // the first value, as Pillow decodes it (BYTE, ASCII and UNDEFINED are bytes or text: never match)
        switch (type) {
            case 6: v = (int8_t)b[at]; break;
            case 3: v = u16(at); break;
            case 8: v = (int16_t)u16(at); break;
            case 4: case 13: v = u32(at); break;  // 13: an IFD offset, read as a LONG
            case 9: v = (int32_t)u32(at); break;
            case 16: v = (double)u64(at); break;
            case 11: { const uint32_t bits = u32(at); float f; std::memcpy(&f, &bits, 4); v = f; break; }
            case 12: { const uint64_t bits = u64(at); std::memcpy(&v, &bits, 8); break; }
            case 5: case 10: {  // a fraction: equal to k only when the numerator is k times the denominator
                const int64_t num = type == 5 ? (int64_t)u32(at) : (int32_t)u32(at);
                const int64_t den = type == 5 ? (int64_t)u32(at + 4) : (int32_t)u32(at + 4);
                v = den != 0 && num % den == 0 ? (double)(num / den) : 0.0;
                break;
            }
            default: v = 0; break;
        }
        return v >= 1 && v <= 8 && v == std::floor(v) ? (int)v : 0;
    }
    return kNoOrientation;
}

// An XMP packet's orientation, as Pillow reads one: the first "tiff:Orientation" followed by '="' or '>' and a digit.
int xmp_orientation(const std::string& xmp) {
    for (size_t at = xmp.find("tiff:Orientation"); at != std::string::npos; at = xmp.find("tiff:Orientation", at + 1)) {
        size_t v = at + 16;
        if (xmp.compare(v, 2, "=\"") == 0) v += 2;
        else if (xmp.compare(v, 1, ">") == 0) v += 1;
        else continue;
        if (v < xmp.size() && xmp[v] >= '0' && xmp[v] <= '9') return xmp[v] - '0';
    }
    return kNoOrientation;
}

// The orientation Pillow's getexif() reports: the EXIF one, else the XMP one.
int orientation_of(const std::string& exif, const std::string& xmp) {
    const int o = exif_orientation(exif);
    if (o == kUnreadable) return 1;
    return o != kNoOrientation ? o : xmp_orientation(xmp);
}

// The image as it should be displayed: orientation 2-8 flip / rotate / transpose it (5-8 swap its sides).
Image apply_orientation(Image in, int orientation) {
    if (orientation < 2 || orientation > 8) return in;  // moved out, not copied
    const size_t w = in.width, h = in.height;
    const bool swap = orientation >= 5;
    Image out;
    out.width = swap ? in.height : in.width;
    out.height = swap ? in.width : in.height;
    out.rgba.resize(in.rgba.size());
    for (size_t y = 0; y < (size_t)out.height; ++y) {
        for (size_t x = 0; x < (size_t)out.width; ++x) {
            size_t sx = x, sy = y;  // the stored pixel shown at (x, y)
            switch (orientation) {
                case 2: sx = w - 1 - x; break;                      // mirrored left-right
                case 3: sx = w - 1 - x; sy = h - 1 - y; break;      // rotated 180
                case 4: sy = h - 1 - y; break;                      // mirrored top-bottom
                case 5: sx = y; sy = x; break;                      // transposed
                case 6: sx = y; sy = h - 1 - x; break;              // turned 90 clockwise for display
                case 7: sx = w - 1 - y; sy = h - 1 - x; break;      // transversed
                default: sx = w - 1 - y; sy = x; break;             // 8: turned 90 counter-clockwise
            }
            std::memcpy(&out.rgba[(y * out.width + x) * 4], &in.rgba[(sy * w + sx) * 4], 4);
        }
    }
    return out;
}

// ------------------------------------------------------------------------------------------------ PNG

// What Pillow keeps of a PNG's text chunks for the orientation (later chunks replace earlier ones, as in its dict).
struct PngText {
    std::string exif, raw_profile, xmp_text, xmp;  // xmp: an iTXt's bytes (Pillow's info["xmp"])
    bool have_exif = false, exif_is_text = false, have_raw_profile = false;
};

// Inflates a whole zlib stream into out[0, cap): the zlib status, and the bytes written in `got`.
int inflate_into(const void* in, size_t n, unsigned char* out, size_t cap, size_t& got) {
    z_stream zs;
    std::memset(&zs, 0, sizeof(zs));
    if (inflateInit(&zs) != Z_OK) fail(LRM_ERR_OUT_OF_MEMORY, "zlib inflateInit failed");
    zs.next_in = reinterpret_cast<Bytef*>(const_cast<void*>(in));
    zs.avail_in = (uInt)n;
    zs.next_out = out;
    zs.avail_out = (uInt)cap;
    const int r = inflate(&zs, Z_FINISH);
    got = cap - zs.avail_out;
    inflateEnd(&zs);
    return r;
}

// zlib data of a text chunk, inflated to at most 1 MiB (Pillow's MAX_TEXT_CHUNK).
enum class Inflated { ok, corrupt, too_large };
Inflated inflate_text(const std::string& in, std::string& out) {
    out.assign((1 << 20) + 1, '\0');  // one byte more than allowed: filling it means too large
    size_t got = 0;
    const int r = inflate_into(in.data(), in.size(), reinterpret_cast<unsigned char*>(&out[0]), out.size(), got);
    out.resize(got);
    if (got > (1u << 20)) return Inflated::too_large;
    return r == Z_STREAM_END ? Inflated::ok : Inflated::corrupt;
}

// Strict UTF-8, as Python's decoder: no overlong forms, surrogates or code points past U+10FFFF.
bool valid_utf8(const std::string& t) {
    const auto* p = reinterpret_cast<const unsigned char*>(t.data());
    for (size_t i = 0, n = t.size(); i < n;) {
        const unsigned c = p[i];
        const int extra = c < 0x80 ? 0 : (c >= 0xC2 && c <= 0xDF) ? 1 : (c >= 0xE0 && c <= 0xEF) ? 2
                                                                     : (c >= 0xF0 && c <= 0xF4) ? 3 : -1;
        if (extra < 0 || n - i <= (size_t)extra) return false;
        for (int k = 1; k <= extra; ++k)
            if ((p[i + k] & 0xC0) != 0x80) return false;
        const unsigned second = extra ? p[i + 1] : 0;
        if ((c == 0xE0 && second < 0xA0) || (c == 0xED && second > 0x9F) || (c == 0xF0 && second < 0x90) ||
            (c == 0xF4 && second > 0x8F))
            return false;
        i += 1 + extra;
    }
    return true;
}

// Pillow's reading of tEXt / zTXt / iTXt: refuses a zTXt of an unknown compression method and compressed text
// beyond 1 MiB (so does this loader); keeps what the orientation needs.
void read_text_chunk(const std::string& type, const std::string& body, PngText& meta, const std::string& source) {
    const size_t nul = body.find('\0');
    const std::string key = body.substr(0, nul);
    std::string value = nul == std::string::npos ? "" : body.substr(nul + 1);
    auto inflated = [&](const std::string& data, std::string& text) {
        const Inflated r = inflate_text(data, text);
        if (r == Inflated::too_large)
            bad_image(source, "PNG " + type + " text chunk '" + key + "' is larger than 1 MiB when inflated");
        return r == Inflated::ok;
    };
    if (type == "zTXt") {  // method byte 0 (deflate), then the data; data that does not inflate reads as ""
        if (!value.empty() && value[0] != 0)
            bad_image(source, "PNG zTXt text chunk '" + key + "' uses an unknown compression method");
        std::string text;
        value = !value.empty() && inflated(value.substr(1), text) ? text : "";
    } else if (type == "iTXt") {  // flag, method, language\0, translated keyword\0, text
        if (value.size() < 2) return;
        const char flag = value[0], method = value[1];
        const size_t a = value.find('\0', 2), b = a == std::string::npos ? a : value.find('\0', a + 1);
        if (b == std::string::npos) return;
        std::string text = value.substr(b + 1);
        if (flag != 0 && (method != 0 || !inflated(value.substr(b + 1), text))) return;
        if (key == "XML:com.adobe.xmp") meta.xmp = text;
        if (!valid_utf8(value.substr(2, b - 2)) || !valid_utf8(text)) return;  // Pillow keeps no text entry then
        value = text;
    }
    if (key == "exif") meta.exif = value, meta.have_exif = true, meta.exif_is_text = type != "tEXt";  // else text
    else if (key == "Raw profile type exif") meta.raw_profile = value, meta.have_raw_profile = true;
    else if (key == "XML:com.adobe.xmp") meta.xmp_text = value;
}

// ImageMagick's "Raw profile type exif": a header of three lines, then the block in hex (Pillow: bytes.fromhex of
// the lines after the third, joined). False when that is not hex.
bool raw_profile_exif(const std::string& text, std::string& out) {
    size_t at = 0;
    for (int line = 0; line < 3; ++line) {
        at = text.find('\n', at);
        if (at == std::string::npos) return out.clear(), true;
        ++at;
    }
    std::string hex;
    for (size_t i = at; i < text.size(); ++i)
        if (text[i] != '\n') hex += text[i];
    auto digit = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                                         : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1; };
    auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; };
    out.clear();
    for (size_t i = 0; i < hex.size();) {
        if (space(hex[i])) { ++i; continue; }
        if (i + 1 >= hex.size() || digit(hex[i]) < 0 || digit(hex[i + 1]) < 0) return false;
        out += (char)(digit(hex[i]) << 4 | digit(hex[i + 1]));
        i += 2;
    }
    return true;
}

struct PngHeader {
    uint32_t w = 0, h = 0;
    int depth = 0, ctype = 0, interlace = 0;
    int channels() const { return ctype == 0 ? 1 : ctype == 2 ? 3 : ctype == 3 ? 1 : ctype == 4 ? 2 : 4; }
    int bits_per_pixel() const { return channels() * depth; }
    size_t row_bytes(uint32_t width) const { return ((size_t)width * bits_per_pixel() + 7) / 8; }
};

int paeth(int a, int b, int c) {
    const int p = a + b - c, pa = std::abs(p - a), pb = std::abs(p - b), pc = std::abs(p - c);
    return (pa <= pb && pa <= pc) ? a : (pb <= pc ? b : c);
}

// Reverses the per-row filters of one (sub)image in place; rows are 1 filter byte + rb bytes.
void unfilter(unsigned char* data, uint32_t rows, size_t rb, int bpp_bytes, const std::string& source) {
    unsigned char* prev = nullptr;
    for (uint32_t y = 0; y < rows; ++y) {
        unsigned char* row = data + y * (rb + 1);
        const int f = row[0];
        unsigned char* x = row + 1;
        for (size_t i = 0; i < rb; ++i) {
            const int a = i >= (size_t)bpp_bytes ? x[i - bpp_bytes] : 0;
            const int b = prev ? prev[i] : 0;
            const int c = (prev && i >= (size_t)bpp_bytes) ? prev[i - bpp_bytes] : 0;
            switch (f) {
                case 0: break;
                case 1: x[i] = (unsigned char)(x[i] + a); break;
                case 2: x[i] = (unsigned char)(x[i] + b); break;
                case 3: x[i] = (unsigned char)(x[i] + ((a + b) >> 1)); break;
                case 4: x[i] = (unsigned char)(x[i] + paeth(a, b, c)); break;
                default: bad_image(source, "PNG data is corrupt (unknown row filter " + std::to_string(f) + ")");
            }
        }
        prev = x;
    }
}

struct PngPalette {
    unsigned char rgb[256][3] = {};
    unsigned char alpha[256];
    int n = 0;
    bool has_key = false;
    uint16_t key[3] = {0, 0, 0};  // tRNS colour key of grey / RGB images, at the file's bit depth
    PngPalette() { std::memset(alpha, 255, sizeof(alpha)); }
};

uint32_t sample(const unsigned char* row, size_t idx, int depth) {
    if (depth == 8) return row[idx];
    if (depth == 16) return (uint32_t)row[2 * idx] << 8 | row[2 * idx + 1];
    const size_t bit = idx * depth;
    return (row[bit >> 3] >> (8 - depth - (bit & 7))) & ((1u << depth) - 1);
}

uint8_t to8(uint32_t v, int depth) {
    switch (depth) {
        case 1: return v ? 255 : 0;
        case 2: return (uint8_t)(v * 85);
        case 4: return (uint8_t)(v * 17);
        case 8: return (uint8_t)v;
        default: return (uint8_t)(v >> 8);  // 16-bit colour: high byte, as Pillow's RGB;16B unpacker
    }
}

void put_pixel(const PngHeader& hd, const PngPalette& pal, const unsigned char* row, uint32_t x, unsigned char* out) {
    const int d = hd.depth;
    switch (hd.ctype) {
        case 0: {
            const uint32_t v = sample(row, x, d);
            // 16-bit grey: Pillow opens it as I;16 and the Python loader rescales with rounding.
            const uint8_t g = d == 16 ? (uint8_t)std::lrint(v / 257.0) : to8(v, d);
            out[0] = out[1] = out[2] = g;
            out[3] = (pal.has_key && v == pal.key[0]) ? 0 : 255;  // every depth at full precision, as PNG defines
            break;
        }
        case 2: {
            uint32_t v[3];
            for (int c = 0; c < 3; ++c) v[c] = sample(row, 3 * (size_t)x + c, d);
            for (int c = 0; c < 3; ++c) out[c] = to8(v[c], d);
            // 16-bit keys are compared at the 8 bits kept (as the Python loader, which gets 8-bit colours from Pillow)
            const int s = d == 16 ? 8 : 0;
            bool keyed = pal.has_key;
            for (int c = 0; c < 3; ++c) keyed = keyed && (v[c] >> s) == (uint32_t)(pal.key[c] >> s);
            out[3] = keyed ? 0 : 255;
            break;
        }
        case 3: {
            const uint32_t i = sample(row, x, d);
            if ((int)i < pal.n) {
                std::memcpy(out, pal.rgb[i], 3);
                out[3] = pal.alpha[i];
            } else {
                out[0] = out[1] = out[2] = 0;
                out[3] = 255;
            }
            break;
        }
        case 4:
            out[0] = out[1] = out[2] = to8(sample(row, 2 * (size_t)x, d), d);
            out[3] = to8(sample(row, 2 * (size_t)x + 1, d), d);
            break;
        default:
            for (int c = 0; c < 4; ++c) out[c] = to8(sample(row, 4 * (size_t)x + c, d), d);
    }
}

Image decode_png(const std::string& bytes, const std::string& source) {
    const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
    const size_t n = bytes.size();
    PngHeader hd;
    PngPalette pal;
    PngText meta;
    std::string idat;
    bool have_ihdr = false, have_iend = false;
    size_t pos = 8;
    while (pos + 12 <= n) {
        const uint32_t len = be32(p + pos);
        if (len > n - pos - 12) bad_image(source, "PNG file is truncated");
        const unsigned char* type = p + pos + 4;
        const unsigned char* data = p + pos + 8;
        const uint32_t crc = (uint32_t)crc32(crc32(0L, Z_NULL, 0), type, len + 4);
        if (crc != be32(data + len)) bad_image(source, "PNG file is corrupt (chunk CRC mismatch)");
        const std::string t(reinterpret_cast<const char*>(type), 4);
        pos += 12 + len;
        if (t == "IHDR") {
            if (len != 13) bad_image(source, "PNG header is malformed");
            hd.w = be32(data);
            hd.h = be32(data + 4);
            hd.depth = data[8];
            hd.ctype = data[9];
            hd.interlace = data[12];
            check_size(hd.w, hd.h, source);
            const int dp = hd.depth, ct = hd.ctype;
            const bool ok = (ct == 0 && (dp == 1 || dp == 2 || dp == 4 || dp == 8 || dp == 16)) ||
                            (ct == 3 && (dp == 1 || dp == 2 || dp == 4 || dp == 8)) ||
                            ((ct == 2 || ct == 4 || ct == 6) && (dp == 8 || dp == 16));
            if (!ok || data[10] != 0 || data[11] != 0 || hd.interlace > 1)
                bad_image(source, "unsupported PNG variant (colour type " + std::to_string(ct) + ", bit depth " +
                                      std::to_string(dp) + ")");
            have_ihdr = true;
        } else if (!have_ihdr) {
            bad_image(source, "PNG file is corrupt (no IHDR first)");
        } else if (t == "PLTE") {
            if (len % 3 || len > 768) bad_image(source, "PNG palette is malformed");
            pal.n = (int)(len / 3);
            for (int i = 0; i < pal.n; ++i) std::memcpy(pal.rgb[i], data + 3 * i, 3);
        } else if (t == "tRNS") {
            if (hd.ctype == 3) {
                for (uint32_t i = 0; i < len && i < 256; ++i) pal.alpha[i] = data[i];
            } else if (hd.ctype == 0 && len >= 2) {
                pal.has_key = true;
                pal.key[0] = (uint16_t)(data[0] << 8 | data[1]);
            } else if (hd.ctype == 2 && len >= 6) {
                pal.has_key = true;
                for (int c = 0; c < 3; ++c) pal.key[c] = (uint16_t)(data[2 * c] << 8 | data[2 * c + 1]);
            }
        } else if (t == "eXIf") {
            meta.exif = std::string("Exif\0\0", 6) + std::string(reinterpret_cast<const char*>(data), len);  // Pillow's
            meta.have_exif = true, meta.exif_is_text = false;
        } else if (t == "tEXt" || t == "zTXt" || t == "iTXt") {
            read_text_chunk(t, std::string(reinterpret_cast<const char*>(data), len), meta, source);
        } else if (t == "IDAT") {
            idat.append(reinterpret_cast<const char*>(data), len);
        } else if (t == "IEND") {
            have_iend = true;
            break;
        } else if (!(type[0] & 0x20)) {  // unknown critical chunk: the image cannot be decoded correctly
            bad_image(source, "PNG uses an unsupported critical chunk '" + t + "'");
        }
    }
    if (!have_ihdr) bad_image(source, "PNG file is corrupt (no IHDR)");
    if (!have_iend || idat.empty()) bad_image(source, "image data is truncated or corrupt (PNG without IEND/IDAT)");
    if (hd.ctype == 3 && pal.n == 0) bad_image(source, "PNG palette image without a palette");

    // Adam7 passes (x0, y0, dx, dy); one pass covering everything when not interlaced.
    static const int adam7[7][4] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                                    {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};
    static const int whole[1][4] = {{0, 0, 1, 1}};
    const int (*passes)[4] = hd.interlace ? adam7 : whole;
    const int npass = hd.interlace ? 7 : 1;
    size_t total = 0;
    uint32_t pw[7], ph[7];
    for (int k = 0; k < npass; ++k) {
        pw[k] = hd.w > (uint32_t)passes[k][0] ? (hd.w - passes[k][0] + passes[k][2] - 1) / passes[k][2] : 0;
        ph[k] = hd.h > (uint32_t)passes[k][1] ? (hd.h - passes[k][1] + passes[k][3] - 1) / passes[k][3] : 0;
        if (pw[k] && ph[k]) total += (size_t)ph[k] * (hd.row_bytes(pw[k]) + 1);
    }
    std::vector<unsigned char> raw(total);
    size_t got = 0;
    const int zr = inflate_into(idat.data(), idat.size(), raw.data(), raw.size(), got);
    if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) || got != raw.size())
        bad_image(source, "image data is truncated or corrupt (PNG pixel data ends early)");

    Image img;
    img.width = (int32_t)hd.w;
    img.height = (int32_t)hd.h;
    img.rgba.assign((size_t)hd.w * hd.h * 4, 0);
    const int bpp_bytes = (hd.bits_per_pixel() + 7) / 8;
    size_t off = 0;
    for (int k = 0; k < npass; ++k) {
        if (!pw[k] || !ph[k]) continue;
        const size_t rb = hd.row_bytes(pw[k]);
        unfilter(raw.data() + off, ph[k], rb, bpp_bytes, source);
        for (uint32_t y = 0; y < ph[k]; ++y) {
            const unsigned char* row = raw.data() + off + y * (rb + 1) + 1;
            const size_t oy = (size_t)passes[k][1] + (size_t)y * passes[k][3];
            for (uint32_t x = 0; x < pw[k]; ++x) {
                const size_t ox = (size_t)passes[k][0] + (size_t)x * passes[k][2];
                put_pixel(hd, pal, row, x, &img.rgba[(oy * hd.w + ox) * 4]);
            }
        }
        off += ph[k] * (rb + 1);
    }
    // Pillow's info["exif"] (eXIf or tEXt "exif", the later), else ImageMagick's hex text; then XMP. Where Pillow's
    // exif_transpose raises (an iTXt "exif", a hex text that is not hex), the Python loader keeps the image as stored.
    std::string exif = meta.exif;
    if (meta.have_exif && meta.exif_is_text) return img;
    if (!meta.have_exif && meta.have_raw_profile && !raw_profile_exif(meta.raw_profile, exif)) return img;
    return apply_orientation(std::move(img), orientation_of(exif, meta.xmp_text.empty() ? meta.xmp : meta.xmp_text));
}

// ------------------------------------------------------------------------------------------------ JPEG
#if defined(LRM_RT_WITH_JPEG)

// libjpeg reports errors through error_exit, which must not return: it jumps back to decode_jpeg. Only plain C
// data lives between setjmp and longjmp there (the C++ objects are made before setjmp), so no destructor is skipped.
// One decode's state, on the heap and owned by decode_jpeg: read_jpeg, which calls setjmp, has no local that
// changes between setjmp and a longjmp (libjpeg's error_exit must not return, so it jumps back there), and every
// C++ object outlives the jump.
struct JpegJob {
    jpeg_decompress_struct cinfo;
    jpeg_error_mgr err;
    std::jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    bool eof = false;  // the data ended before the image did
    Image img;
    std::string exif, xmp;
    std::vector<JSAMPLE> row;
};

[[noreturn]] void jpeg_error_jump(j_common_ptr cinfo) {
    auto* job = reinterpret_cast<JpegJob*>(cinfo->client_data);
    (*cinfo->err->format_message)(cinfo, job->message);
    std::longjmp(job->jump, 1);
}

// Warnings about damaged data are ignored, as Pillow does, except the end of the data before the last row: a
// truncated file, which libjpeg would pad with grey and Pillow refuses.
void jpeg_warning(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        reinterpret_cast<JpegJob*>(cinfo->client_data)->eof = true;
        jpeg_error_jump(cinfo);
    }
}

// Pillow's CMYK -> RGB (Convert.c cmyk2rgb) on libjpeg's Adobe-inverted samples (Pillow unpacks them as "CMYK;I").
uint8_t cmyk_channel(uint8_t inverted_c, uint8_t inverted_k) {
    const int c = 255 - inverted_c, nk = inverted_k, t = c * nk + 128;
    return (uint8_t)(nk - (((t >> 8) + t) >> 8));
}

// 0 when decoded into job.img, 1 after a libjpeg error (job.message), 2 for a size the guard refuses, 3 for a
// component count Pillow has no mode for. The caller destroys the decompressor whatever happens.
int read_jpeg(JpegJob& job, const std::string& bytes) {
    jpeg_decompress_struct& cinfo = job.cinfo;
    cinfo.err = jpeg_std_error(&job.err);
    job.err.error_exit = jpeg_error_jump;
    job.err.emit_message = jpeg_warning;
    cinfo.client_data = &job;  // kept by jpeg_create_decompress
    if (setjmp(job.jump)) return 1;
    jpeg_create_decompress(&cinfo);
    auto* data = reinterpret_cast<unsigned char*>(const_cast<char*>(bytes.data()));  // libjpeg 6b's API is not const
    jpeg_mem_src(&cinfo, data, (unsigned long)bytes.size());
    jpeg_save_markers(&cinfo, JPEG_APP0 + 1, 0xFFFF);
    jpeg_read_header(&cinfo, TRUE);
    // Pillow's info: "exif" from the Exif APP1s (the first whole, the later ones' data appended), "xmp" from the last
    // XMP one (after its namespace and NUL). Read now: the saved markers live in the image's memory pool.
    static const char xmp_ns[] = "http://ns.adobe.com/xap/1.0/";
    for (jpeg_saved_marker_ptr m = cinfo.marker_list; m; m = m->next) {
        const char* d = reinterpret_cast<const char*>(m->data);
        const size_t len = m->data_length;
        if (m->marker != JPEG_APP0 + 1) continue;
        if (len >= 6 && std::memcmp(d, "Exif\0\0", 6) == 0) job.exif.append(d + (job.exif.empty() ? 0 : 6), d + len);
        else if (len >= sizeof xmp_ns && std::memcmp(d, xmp_ns, sizeof xmp_ns) == 0)
            job.xmp.assign(d + sizeof xmp_ns, d + len);
    }
    const int64_t w = cinfo.image_width, h = cinfo.image_height;
    if (w <= 0 || h <= 0 || w > kMaxImagePixels / h) return 2;
    const int nc = cinfo.num_components;
    if (nc != 1 && nc != 3 && nc != 4) return 3;
    // Pillow's modes: L, RGB (libjpeg converts YCbCr), CMYK (libjpeg converts YCCK)
    cinfo.out_color_space = nc == 1 ? JCS_GRAYSCALE : nc == 3 ? JCS_RGB : JCS_CMYK;
    jpeg_start_decompress(&cinfo);
    Image& img = job.img;
    img.width = (int32_t)cinfo.output_width;
    img.height = (int32_t)cinfo.output_height;
    img.rgba.resize((size_t)img.width * img.height * 4);
    job.row.resize((size_t)cinfo.output_width * cinfo.output_components);
    while (cinfo.output_scanline < cinfo.output_height) {
        uint8_t* out = &img.rgba[(size_t)cinfo.output_scanline * img.width * 4];
        JSAMPROW r = job.row.data();
        jpeg_read_scanlines(&cinfo, &r, 1);
        for (int32_t x = 0; x < img.width; ++x, out += 4) {
            const JSAMPLE* px = &job.row[(size_t)x * cinfo.output_components];
            if (nc == 1) out[0] = out[1] = out[2] = px[0];
            else if (nc == 3) out[0] = px[0], out[1] = px[1], out[2] = px[2];
            else for (int c = 0; c < 3; ++c) out[c] = cmyk_channel(px[c], px[3]);
            out[3] = 255;
        }
    }
    // No jpeg_finish_decompress: every row is in, and what follows the last one (an EOI, or a marker and the end of
    // the file) does not change the image; Pillow does not ask for it either.
    return 0;
}

Image decode_jpeg(const std::string& bytes, const std::string& source) {
    auto job = std::make_unique<JpegJob>();
    int status;
    try {
        status = read_jpeg(*job, bytes);
    } catch (...) {  // std::bad_alloc from the pixel buffers
        jpeg_destroy_decompress(&job->cinfo);
        throw;
    }
    jpeg_destroy_decompress(&job->cinfo);
    if (status == 1 && job->eof)
        bad_image(source, "image data is truncated or corrupt (the JPEG data ends before its last row)");
    if (status == 1) bad_image(source, std::string("unsupported or corrupt JPEG (libjpeg: ") + job->message + ")");
    if (status == 2) check_size(job->cinfo.image_width, job->cinfo.image_height, source);
    if (status == 3)
        bad_image(source, "unsupported JPEG with " + std::to_string(job->cinfo.num_components) + " colour components");
    return apply_orientation(std::move(job->img), orientation_of(job->exif, job->xmp));
}

#endif

// ------------------------------------------------------------------------------------------------ PNM

struct PnmReader {
    const std::string& b;
    size_t i = 2;
    const std::string& source;
    void skip_ws() {
        while (i < b.size()) {
            if (b[i] == '#') {
                while (i < b.size() && b[i] != '\n') ++i;
            } else if (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
                ++i;
            } else {
                break;
            }
        }
    }
    int64_t integer() {
        skip_ws();
        int64_t v = 0;
        size_t start = i;
        while (i < b.size() && b[i] >= '0' && b[i] <= '9' && v < (1LL << 40)) v = v * 10 + (b[i++] - '0');
        if (i == start) bad_image(source, "PNM header is malformed");
        return v;
    }
    std::string line() {
        size_t e = b.find('\n', i);
        if (e == std::string::npos) bad_image(source, "PAM header is truncated");
        std::string l = b.substr(i, e - i);
        i = e + 1;
        if (!l.empty() && l.back() == '\r') l.pop_back();
        return l;
    }
};

Image decode_pnm(const std::string& bytes, const std::string& source) {
    PnmReader r{bytes, 2, source};
    const char kind = bytes[1];
    int64_t w = 0, h = 0, maxval = 0, depth = 0;
    std::string tuple;
    if (kind == '7') {
        for (;;) {
            const std::string l = r.line();
            if (l.empty() || l[0] == '#') continue;
            if (l == "ENDHDR") break;
            const size_t sp = l.find(' ');
            const std::string key = l.substr(0, sp), val = sp == std::string::npos ? "" : l.substr(sp + 1);
            if (key == "TUPLTYPE") { tuple = val; continue; }
            const int64_t v = std::strtoll(val.c_str(), nullptr, 10);  // saturates out of range (atoll: undefined)
            if (key == "WIDTH") w = v;
            else if (key == "HEIGHT") h = v;
            else if (key == "DEPTH") depth = v;
            else if (key == "MAXVAL") maxval = v;
        }
    } else {
        w = r.integer();
        h = r.integer();
        maxval = r.integer();
        depth = kind == '5' ? 1 : 3;
        if (r.i >= bytes.size()) bad_image(source, "PNM file is truncated");
        ++r.i;  // the single whitespace before the samples
    }
    check_size(w, h, source);
    if (maxval < 1 || maxval > 65535 || depth < 1 || depth > 4)
        bad_image(source, "unsupported PNM variant (depth " + std::to_string(depth) + ", maxval " + std::to_string(maxval) + ")");
    const int bps = maxval > 255 ? 2 : 1;
    const size_t need = (size_t)w * h * depth * bps;
    if (bytes.size() - r.i < need) bad_image(source, "image data is truncated or corrupt (PNM samples end early)");
    const auto* s = reinterpret_cast<const unsigned char*>(bytes.data() + r.i);
    auto at = [&](size_t k) -> uint8_t {
        const uint32_t v = bps == 1 ? s[k] : ((uint32_t)s[2 * k] << 8 | s[2 * k + 1]);
        return maxval == 255 ? (uint8_t)v : (uint8_t)std::lrint(std::min<double>(v, maxval) * 255.0 / maxval);
    };
    Image img;
    img.width = (int32_t)w;
    img.height = (int32_t)h;
    img.rgba.resize((size_t)w * h * 4);
    const bool grey = depth <= 2;
    const bool alpha = depth == 2 || depth == 4;
    for (size_t p = 0; p < (size_t)w * h; ++p) {
        unsigned char* o = &img.rgba[4 * p];
        const size_t b = p * depth;
        o[0] = at(b);
        o[1] = grey ? o[0] : at(b + 1);
        o[2] = grey ? o[0] : at(b + 2);
        o[3] = alpha ? at(b + depth - 1) : 255;
    }
    return img;
}

}  // namespace

Image decode_image(const std::string& bytes, const std::string& source) {
    if (bytes.empty()) bad_image(source, "image file is empty (0 bytes)");
    Image img;
    static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (bytes.size() >= 8 && std::memcmp(bytes.data(), png_sig, 8) == 0) {
        img = decode_png(bytes, source);
    } else if (bytes.size() >= 3 && bytes[0] == 'P' && (bytes[1] == '5' || bytes[1] == '6' || bytes[1] == '7')) {
        img = decode_pnm(bytes, source);
    } else if (bytes.size() >= 3 && (unsigned char)bytes[0] == 0xFF && (unsigned char)bytes[1] == 0xD8 &&
               (unsigned char)bytes[2] == 0xFF) {  // SOI and a marker, as Pillow identifies a JPEG
#if defined(LRM_RT_WITH_JPEG)
        img = decode_jpeg(bytes, source);
#else
        bad_image(source, "JPEG is not supported by this build of the C library (built without libjpeg; PNG and "
                          "PPM/PGM/PAM are); convert the image to PNG, or rebuild with libjpeg-turbo's headers");
#endif
    } else {
        bad_image(source, "not a recognised image file (PNG, JPEG, PPM/PGM/PAM)");
    }
    bool any = false;
    for (size_t p = 3; p < img.rgba.size() && !any; p += 4) any = img.rgba[p] != 0;
    if (!any) bad_image(source, "alpha channel is empty (every pixel fully transparent)");
    return img;
}

Image load_image(const std::string& path) {
    if (!path_exists(path)) fail(LRM_ERR_IO, "image file not found: " + path);
    // Directories get read_file's message; devices and FIFOs are never read (they may not end).
    if (!is_file(path) && !is_dir(path)) fail(LRM_ERR_IO, "image path is not a regular file: " + path);
    return decode_image(read_file(path, "image file", kMaxImageFileBytes), path);
}

}  // namespace lrm
