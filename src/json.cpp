#include "json.hpp"

#include <charconv>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace lrm {

class JsonParser {
public:
    explicit JsonParser(const std::string& t) : t_(t) {}

    Json document() {
        Json v = value(0);
        ws();
        if (i_ != t_.size()) error("trailing characters");
        return v;
    }

private:
    const std::string& t_;
    size_t i_ = 0;

    [[noreturn]] void error(const char* what) const {
        throw std::runtime_error(std::string("invalid JSON at offset ") + std::to_string(i_) + ": " + what);
    }
    void ws() {
        while (i_ < t_.size() && (t_[i_] == ' ' || t_[i_] == '\n' || t_[i_] == '\r' || t_[i_] == '\t')) ++i_;
    }
    bool lit(const char* s) {
        const size_t n = std::strlen(s);
        if (t_.compare(i_, n, s) != 0) return false;
        i_ += n;
        return true;
    }
    Json value(int depth) {
        if (depth > 64) error("nesting too deep");  // bounded recursion on hostile input
        ws();
        if (i_ >= t_.size()) error("unexpected end");
        Json v;
        const char c = t_[i_];
        if (c == '{') {
            v.type_ = Json::Object;
            ++i_;
            ws();
            if (i_ < t_.size() && t_[i_] == '}') { ++i_; return v; }
            for (;;) {
                ws();
                if (i_ >= t_.size() || t_[i_] != '"') error("expected a key");
                std::string k = string();
                ws();
                if (i_ >= t_.size() || t_[i_] != ':') error("expected ':'");
                ++i_;
                v.o_[k] = value(depth + 1);
                ws();
                if (i_ < t_.size() && t_[i_] == ',') { ++i_; continue; }
                if (i_ < t_.size() && t_[i_] == '}') { ++i_; return v; }
                error("expected ',' or '}'");
            }
        }
        if (c == '[') {
            v.type_ = Json::Array;
            ++i_;
            ws();
            if (i_ < t_.size() && t_[i_] == ']') { ++i_; return v; }
            for (;;) {
                v.a_.push_back(value(depth + 1));
                ws();
                if (i_ < t_.size() && t_[i_] == ',') { ++i_; continue; }
                if (i_ < t_.size() && t_[i_] == ']') { ++i_; return v; }
                error("expected ',' or ']'");
            }
        }
        if (c == '"') {
            v.type_ = Json::String;
            v.s_ = string();
            return v;
        }
        if (lit("true")) { v.type_ = Json::Bool; v.b_ = true; return v; }
        if (lit("false")) { v.type_ = Json::Bool; return v; }
        if (lit("null")) return v;
        // Python's json writes NaN / Infinity for non-finite floats.
        if (lit("NaN")) { v.type_ = Json::Number; v.n_ = std::numeric_limits<double>::quiet_NaN(); return v; }
        if (lit("Infinity")) { v.type_ = Json::Number; v.n_ = std::numeric_limits<double>::infinity(); return v; }
        if (lit("-Infinity")) { v.type_ = Json::Number; v.n_ = -std::numeric_limits<double>::infinity(); return v; }
        if (c == '-' || (c >= '0' && c <= '9')) {
            // from_chars, not strtod: the host application's locale must not change how "0.85" parses
            const char* start = t_.data() + i_;
            const auto r = std::from_chars(start, t_.data() + t_.size(), v.n_);
            if (r.ec != std::errc()) error("bad number");
            v.type_ = Json::Number;
            i_ += (size_t)(r.ptr - start);
            return v;
        }
        error("unexpected character");
    }
    static void utf8(std::string& out, unsigned cp) {
        if (cp < 0x80) {
            out += (char)cp;
        } else if (cp < 0x800) {
            out += (char)(0xC0 | (cp >> 6));
            out += (char)(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += (char)(0xE0 | (cp >> 12));
            out += (char)(0x80 | ((cp >> 6) & 0x3F));
            out += (char)(0x80 | (cp & 0x3F));
        } else {
            out += (char)(0xF0 | (cp >> 18));
            out += (char)(0x80 | ((cp >> 12) & 0x3F));
            out += (char)(0x80 | ((cp >> 6) & 0x3F));
            out += (char)(0x80 | (cp & 0x3F));
        }
    }
    unsigned hex4() {
        if (i_ + 4 > t_.size()) error("short \\u escape");
        unsigned v = 0;
        for (int k = 0; k < 4; ++k) {
            const char h = t_[i_++];
            v <<= 4;
            if (h >= '0' && h <= '9') v |= (unsigned)(h - '0');
            else if (h >= 'a' && h <= 'f') v |= (unsigned)(h - 'a' + 10);
            else if (h >= 'A' && h <= 'F') v |= (unsigned)(h - 'A' + 10);
            else error("bad \\u escape");
        }
        return v;
    }
    std::string string() {
        ++i_;  // opening quote
        std::string out;
        while (i_ < t_.size()) {
            const char c = t_[i_++];
            if (c == '"') return out;
            if (c != '\\') { out += c; continue; }
            if (i_ >= t_.size()) break;
            const char e = t_[i_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    unsigned cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && i_ + 6 <= t_.size() && t_[i_] == '\\' && t_[i_ + 1] == 'u') {
                        i_ += 2;
                        const unsigned lo = hex4();
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    utf8(out, cp);
                    break;
                }
                default: error("bad escape");
            }
        }
        error("unterminated string");
    }
};

Json Json::parse(const std::string& text) { return JsonParser(text).document(); }

double Json::number() const {
    if (type_ != Number) throw std::runtime_error("expected a number");
    return n_;
}
bool Json::boolean() const {
    if (type_ != Bool) throw std::runtime_error("expected true or false");
    return b_;
}
const std::string& Json::str() const {
    if (type_ != String) throw std::runtime_error("expected a string");
    return s_;
}
const std::vector<Json>& Json::array() const {
    if (type_ != Array) throw std::runtime_error("expected an array");
    return a_;
}
const std::map<std::string, Json>& Json::object() const {
    if (type_ != Object) throw std::runtime_error("expected an object");
    return o_;
}
bool Json::has(const std::string& key) const { return type_ == Object && o_.count(key) != 0; }
const Json& Json::operator[](const std::string& key) const {
    static const Json null_value;
    if (type_ != Object) return null_value;
    auto it = o_.find(key);
    return it == o_.end() ? null_value : it->second;
}
size_t Json::size() const { return type_ == Array ? a_.size() : (type_ == Object ? o_.size() : 0); }

}  // namespace lrm
