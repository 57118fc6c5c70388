// Minimal JSON reader for manifest.json and safetensors headers: a value tree, strict parsing, numbers as double.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace lrm {

class Json {
public:
    enum Type { Null, Bool, Number, String, Array, Object };

    static Json parse(const std::string& text);  // throws std::runtime_error with the offset

    Type type() const { return type_; }
    bool is_null() const { return type_ == Null; }
    bool is_number() const { return type_ == Number; }
    bool is_string() const { return type_ == String; }
    bool is_array() const { return type_ == Array; }
    bool is_object() const { return type_ == Object; }

    double number() const;
    bool boolean() const;
    const std::string& str() const;
    const std::vector<Json>& array() const;
    const std::map<std::string, Json>& object() const;

    bool has(const std::string& key) const;
    // Object member; a Null value when absent (or when this is not an object).
    const Json& operator[](const std::string& key) const;
    size_t size() const;

private:
    Type type_ = Null;
    bool b_ = false;
    double n_ = 0.0;
    std::string s_;
    std::vector<Json> a_;
    std::map<std::string, Json> o_;
    friend class JsonParser;
};

}  // namespace lrm
