// The Jinja2 subset of data/jinja.h. Three stages, each on one screen or a few:
//   lex     template source -> tokens, applying Jinja's whitespace rules (trim_blocks,
//           lstrip_blocks, -/+ markers) exactly as jinja2/lexer.py does, so the text
//           tokens already hold the bytes that will be printed;
//   parse   tokens -> a tree of statements and expressions (jinja2/parser.py's
//           grammar and precedence);
//   render  walk the tree with Python value semantics (Value below).
// Failures inside expressions are thrown as Failure without a location and turned
// into brigade::Error by the innermost expression or statement that knows its line.
#include "data/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <functional>
#include <optional>
#include <unordered_map>
#include <variant>

#include "core/error.h"

namespace brigade::data {
namespace jinja {
namespace {

using ojson = nlohmann::ordered_json;

// A failure without a location yet; see the comment at the top.
struct Failure {
  std::string message;
};

[[noreturn]] void fail(std::string message) { throw Failure{std::move(message)}; }

// ---------------------------------------------------------------------------------
// UTF-8: Python counts code points, so lengths, indices and slices decode first.

std::u32string decode(const std::string& s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (i + n > s.size()) n = 1;
    char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1f) : n == 3 ? (c & 0x0f) : (c & 0x07);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3f);
    out.push_back(cp);
    i += n;
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xc0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xe0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    out += static_cast<char>(0xf0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
    out += static_cast<char>(0x80 | (cp & 0x3f));
  }
}

std::string encode(const std::u32string& s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) append_utf8(out, cp);
  return out;
}

bool is_ascii(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
}

size_t codepoint_length(const std::string& s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xc0) != 0x80;
  return n;
}

// Python's str.isspace().
bool is_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

// Python's str.isprintable(), approximated by the ranges that occur in practice.
bool is_printable(char32_t c) {
  if (c < 0x20 || (c >= 0x7f && c <= 0xa0) || c == 0xad) return false;
  if ((c >= 0x2000 && c <= 0x200f) || (c >= 0x2028 && c <= 0x202f) || (c >= 0x205f && c <= 0x206f)) return false;
  if (c == 0x1680 || c == 0x3000 || c == 0xfeff || (c >= 0xd800 && c <= 0xf8ff) || (c >= 0xfff9 && c <= 0xfffb))
    return false;
  return c <= 0x10ffff;
}

// Simple case mapping for the scripts chat text mostly holds: ASCII, Latin-1, Latin
// Extended-A, Greek and Cyrillic (Python's full Unicode tables are not carried).
char32_t upper_char(char32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c < 0xe0) return c;
  if (c <= 0xfe) return c == 0xf7 ? c : c - 32;
  if (c == 0xff) return 0x178;
  if ((c >= 0x100 && c <= 0x137) || (c >= 0x14a && c <= 0x177)) return c & 1 ? c - 1 : c;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17e)) return c & 1 ? c : c - 1;
  if (c >= 0x3b1 && c <= 0x3c9) return c == 0x3c2 ? 0x3a3 : c - 32;
  if (c >= 0x430 && c <= 0x44f) return c - 32;
  if (c >= 0x450 && c <= 0x45f) return c - 80;
  return c;
}
char32_t lower_char(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c < 0xc0) return c;
  if (c <= 0xde) return c == 0xd7 ? c : c + 32;
  if (c == 0x178) return 0xff;
  if ((c >= 0x100 && c <= 0x137) || (c >= 0x14a && c <= 0x177)) return c & 1 ? c : c + 1;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17e)) return c & 1 ? c + 1 : c;
  if (c >= 0x391 && c <= 0x3a9 && c != 0x3a2) return c + 32;
  if (c >= 0x410 && c <= 0x42f) return c + 32;
  if (c >= 0x400 && c <= 0x40f) return c + 80;
  return c;
}
bool is_alpha(char32_t c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0xc0; }

// ---------------------------------------------------------------------------------
// Values: Python's objects as chat templates meet them. Lists, dicts and namespaces
// are shared by reference as in Python (a namespace set in a loop is seen after it).

struct Value;
struct ListData;
struct DictData;
struct NamespaceData;
struct FunctionData;

struct Undefined {
  std::string hint;  // Jinja's UndefinedError message for this value, e.g. "'x' is undefined"
};
struct None {};

struct Value {
  std::variant<Undefined, None, bool, int64_t, double, std::string, std::shared_ptr<ListData>,
               std::shared_ptr<DictData>, std::shared_ptr<NamespaceData>, std::shared_ptr<FunctionData>>
      v;

  Value() : v(Undefined{}) {}
  template <typename T>
  Value(T x) : v(std::move(x)) {}
  Value(const char* s) : v(std::string(s)) {}
  Value(int x) : v(static_cast<int64_t>(x)) {}
  Value(size_t x) : v(static_cast<int64_t>(x)) {}

  bool undefined() const { return std::holds_alternative<Undefined>(v); }
  bool none() const { return std::holds_alternative<None>(v); }
  bool is_bool() const { return std::holds_alternative<bool>(v); }
  bool is_int() const { return std::holds_alternative<int64_t>(v); }
  bool is_float() const { return std::holds_alternative<double>(v); }
  bool is_number() const { return is_bool() || is_int() || is_float(); }
  bool is_string() const { return std::holds_alternative<std::string>(v); }
  bool is_list() const { return std::holds_alternative<std::shared_ptr<ListData>>(v); }
  bool is_dict() const { return std::holds_alternative<std::shared_ptr<DictData>>(v); }
  bool is_namespace() const { return std::holds_alternative<std::shared_ptr<NamespaceData>>(v); }
  bool is_function() const { return std::holds_alternative<std::shared_ptr<FunctionData>>(v); }

  const std::string& str() const { return std::get<std::string>(v); }
  ListData& list() const { return *std::get<std::shared_ptr<ListData>>(v); }
  DictData& dict() const { return *std::get<std::shared_ptr<DictData>>(v); }
  NamespaceData& ns() const { return *std::get<std::shared_ptr<NamespaceData>>(v); }
  FunctionData& function() const { return *std::get<std::shared_ptr<FunctionData>>(v); }
  // bool and int as Python's int; valid when is_bool() || is_int().
  int64_t integer() const { return is_bool() ? std::get<bool>(v) : std::get<int64_t>(v); }
  double number() const { return is_float() ? std::get<double>(v) : static_cast<double>(integer()); }
};

struct ListData {
  std::vector<Value> items;
  bool tuple = false;  // prints as (a, b) and never equals a list
};

struct DictData {
  std::vector<std::pair<std::string, Value>> items;  // insertion order, as Python dicts
  const Value* find(const std::string& key) const {
    for (const auto& [k, v] : items)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value value) {
    for (auto& [k, v] : items)
      if (k == key) {
        v = std::move(value);
        return;
      }
    items.emplace_back(key, std::move(value));
  }
};

struct NamespaceData {
  DictData attrs;
};

struct Args {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

struct FunctionData {
  std::string name;
  std::function<Value(Args&)> call;
};

Value make_list(std::vector<Value> items, bool tuple = false) {
  auto list = std::make_shared<ListData>();
  list->items = std::move(items);
  list->tuple = tuple;
  return Value(std::move(list));
}

Value make_dict(DictData data = {}) { return Value(std::make_shared<DictData>(std::move(data))); }

Value make_function(std::string name, std::function<Value(Args&)> call) {
  return Value(std::make_shared<FunctionData>(FunctionData{std::move(name), std::move(call)}));
}

Value undefined(std::string hint) { return Value(Undefined{std::move(hint)}); }

std::string type_name(const Value& v) {
  switch (v.v.index()) {
    case 0: return "Undefined";
    case 1: return "NoneType";
    case 2: return "bool";
    case 3: return "int";
    case 4: return "float";
    case 5: return "str";
    case 6: return v.list().tuple ? "tuple" : "list";
    case 7: return "dict";
    case 8: return "Namespace";
    default: return "function";
  }
}

[[noreturn]] void fail_undefined(const Value& v) {
  const std::string& hint = std::get<Undefined>(v.v).hint;
  fail(hint.empty() ? "a value is undefined" : hint);
}

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value(None{});
    case ojson::value_t::boolean: return Value(j.get<bool>());
    case ojson::value_t::number_integer: return Value(j.get<int64_t>());
    case ojson::value_t::number_unsigned: return Value(static_cast<int64_t>(j.get<uint64_t>()));
    case ojson::value_t::number_float: return Value(j.get<double>());
    case ojson::value_t::string: return Value(j.get<std::string>());
    case ojson::value_t::array: {
      std::vector<Value> items;
      for (const auto& e : j) items.push_back(from_json(e));
      return make_list(std::move(items));
    }
    case ojson::value_t::object: {
      DictData d;
      for (auto it = j.begin(); it != j.end(); ++it) d.items.emplace_back(it.key(), from_json(it.value()));
      return make_dict(std::move(d));
    }
    default: fail("unsupported JSON value in the template context");
  }
}

bool truthy(const Value& v) {
  switch (v.v.index()) {
    case 0: case 1: return false;
    case 2: return std::get<bool>(v.v);
    case 3: return std::get<int64_t>(v.v) != 0;
    case 4: return std::get<double>(v.v) != 0.0;
    case 5: return !v.str().empty();
    case 6: return !v.list().items.empty();
    case 7: return !v.dict().items.empty();
    default: return true;
  }
}

// ---------------------------------------------------------------------------------
// Python's str(), repr() and json.dumps().

// float.__repr__: the shortest digits that round-trip, fixed notation for decimal
// exponents -4 <= e < 16, else d.ddde+XX.
std::string float_repr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t e_pos = sci.find('e');
  std::string digits;
  for (size_t i = 0; i < e_pos; ++i)
    if (sci[i] != '.') digits += sci[i];
  const int exponent = std::stoi(sci.substr(e_pos + 1));
  const int decpt = exponent + 1;
  std::string out;
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) {
      out = "0." + std::string(-decpt, '0') + digits;
    } else if (decpt >= static_cast<int>(digits.size())) {
      out = digits + std::string(decpt - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, decpt) + "." + digits.substr(decpt);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const int e = decpt - 1;
    out += e < 0 ? "e-" : "e+";
    if (std::abs(e) < 10) out += "0";
    out += std::to_string(std::abs(e));
  }
  return sign + out;
}

void append_hex(std::string& out, uint32_t value, int width) {
  static const char* kHex = "0123456789abcdef";
  for (int shift = (width - 1) * 4; shift >= 0; shift -= 4) out += kHex[(value >> shift) & 0xf];
}

std::string string_repr(const std::string& s) {
  const char quote = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : decode(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (is_printable(c)) {
      append_utf8(out, c);
    } else if (c <= 0xff) {
      out += "\\x";
      append_hex(out, c, 2);
    } else if (c <= 0xffff) {
      out += "\\u";
      append_hex(out, c, 4);
    } else {
      out += "\\U";
      append_hex(out, c, 8);
    }
  }
  return out + quote;
}

std::string py_repr(const Value& v);

std::string py_str(const Value& v) {
  switch (v.v.index()) {
    case 0: return "";
    case 1: return "None";
    case 2: return std::get<bool>(v.v) ? "True" : "False";
    case 3: return std::to_string(std::get<int64_t>(v.v));
    case 4: return float_repr(std::get<double>(v.v));
    case 5: return v.str();
    case 6: {
      const ListData& l = v.list();
      std::string out = l.tuple ? "(" : "[";
      for (size_t i = 0; i < l.items.size(); ++i) out += (i ? ", " : "") + py_repr(l.items[i]);
      if (l.tuple && l.items.size() == 1) out += ",";
      return out + (l.tuple ? ")" : "]");
    }
    case 7: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, item] : v.dict().items) {
        out += (first ? "" : ", ") + string_repr(k) + ": " + py_repr(item);
        first = false;
      }
      return out + "}";
    }
    case 8: {
      std::string out = "<Namespace {";
      bool first = true;
      for (const auto& [k, item] : v.ns().attrs.items) {
        out += (first ? "" : ", ") + string_repr(k) + ": " + py_repr(item);
        first = false;
      }
      return out + "}>";
    }
    default: return "<function " + v.function().name + ">";
  }
}

std::string py_repr(const Value& v) {
  if (v.is_string()) return string_repr(v.str());
  if (v.undefined()) return "Undefined";
  return py_str(v);
}

struct JsonStyle {
  std::optional<std::string> indent;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;
};

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (char32_t c : decode(s)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || (ensure_ascii && c > 0x7e)) {
          if (c > 0xffff) {
            const char32_t v = c - 0x10000;
            out += "\\u";
            append_hex(out, 0xd800 | (v >> 10), 4);
            out += "\\u";
            append_hex(out, 0xdc00 | (v & 0x3ff), 4);
          } else {
            out += "\\u";
            append_hex(out, c, 4);
          }
        } else {
          append_utf8(out, c);
        }
    }
  }
  out += '"';
}

void json_dump(std::string& out, const Value& v, const JsonStyle& style, int level) {
  auto newline = [&](int depth) {
    out += '\n';
    for (int i = 0; i < depth; ++i) out += *style.indent;
  };
  switch (v.v.index()) {
    case 1: out += "null"; return;
    case 2: out += std::get<bool>(v.v) ? "true" : "false"; return;
    case 3: out += std::to_string(std::get<int64_t>(v.v)); return;
    case 4: {
      const double x = std::get<double>(v.v);
      out += std::isnan(x) ? "NaN" : std::isinf(x) ? (x > 0 ? "Infinity" : "-Infinity") : float_repr(x);
      return;
    }
    case 5: json_string(out, v.str(), style.ensure_ascii); return;
    case 6: {
      const auto& items = v.list().items;
      if (items.empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += style.item_separator;
        if (style.indent) newline(level + 1);
        json_dump(out, items[i], style, level + 1);
      }
      if (style.indent) newline(level);
      out += ']';
      return;
    }
    case 7: {
      auto items = v.dict().items;
      if (items.empty()) {
        out += "{}";
        return;
      }
      if (style.sort_keys)
        std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += style.item_separator;
        if (style.indent) newline(level + 1);
        json_string(out, items[i].first, style.ensure_ascii);
        out += style.key_separator;
        json_dump(out, items[i].second, style, level + 1);
      }
      if (style.indent) newline(level);
      out += '}';
      return;
    }
    default: fail("Object of type " + type_name(v) + " is not JSON serializable");
  }
}

// ---------------------------------------------------------------------------------
// Python operators.

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is_float() || b.is_float()) return a.number() == b.number();
    return a.integer() == b.integer();
  }
  if (a.v.index() != b.v.index()) return false;
  switch (a.v.index()) {
    case 0: case 1: return true;
    case 5: return a.str() == b.str();
    case 6: {
      const ListData &x = a.list(), &y = b.list();
      if (x.tuple != y.tuple || x.items.size() != y.items.size()) return false;
      for (size_t i = 0; i < x.items.size(); ++i)
        if (!equal(x.items[i], y.items[i])) return false;
      return true;
    }
    case 7: {
      const DictData &x = a.dict(), &y = b.dict();
      if (x.items.size() != y.items.size()) return false;
      for (const auto& [k, item] : x.items) {
        const Value* other = y.find(k);
        if (!other || !equal(item, *other)) return false;
      }
      return true;
    }
    case 8: return &a.ns() == &b.ns();
    default: return &a.function() == &b.function();
  }
}

// -1, 0, 1 as Python's <, ==, > would order them; a TypeError otherwise.
int compare(const Value& a, const Value& b, const std::string& op) {
  if (a.is_number() && b.is_number()) {
    if (!a.is_float() && !b.is_float()) return a.integer() < b.integer() ? -1 : a.integer() > b.integer();
    return a.number() < b.number() ? -1 : a.number() > b.number();
  }
  if (a.is_string() && b.is_string())
    return a.str() < b.str() ? -1 : a.str() > b.str();  // UTF-8 keeps code point order
  if (a.is_list() && b.is_list() && a.list().tuple == b.list().tuple) {
    const auto &x = a.list().items, &y = b.list().items;
    for (size_t i = 0; i < x.size() && i < y.size(); ++i)
      if (!equal(x[i], y[i])) return compare(x[i], y[i], op);
    return x.size() < y.size() ? -1 : x.size() > y.size();
  }
  if (a.undefined()) fail_undefined(a);
  if (b.undefined()) fail_undefined(b);
  fail("'" + op + "' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
}

// Python's iter(): the elements a for loop, list() or join see.
std::vector<Value> iterate(const Value& v) {
  if (v.undefined()) return {};
  if (v.is_list()) return v.list().items;
  if (v.is_dict()) {
    std::vector<Value> keys;
    for (const auto& [k, item] : v.dict().items) keys.emplace_back(k);
    return keys;
  }
  if (v.is_string()) {
    std::vector<Value> chars;
    for (char32_t c : decode(v.str())) {
      std::string s;
      append_utf8(s, c);
      chars.emplace_back(std::move(s));
    }
    return chars;
  }
  fail("'" + type_name(v) + "' object is not iterable");
}

int64_t length(const Value& v) {
  if (v.undefined()) return 0;
  if (v.is_string()) return codepoint_length(v.str());
  if (v.is_list()) return v.list().items.size();
  if (v.is_dict()) return v.dict().items.size();
  fail("object of type '" + type_name(v) + "' has no len()");
}

bool contains(const Value& container, const Value& item) {
  if (container.undefined()) return false;
  if (container.is_string()) {
    if (!item.is_string()) fail("'in <string>' requires string as left operand, not " + type_name(item));
    return container.str().find(item.str()) != std::string::npos;
  }
  if (container.is_list()) {
    for (const Value& e : container.list().items)
      if (equal(e, item)) return true;
    return false;
  }
  if (container.is_dict()) return item.is_string() && container.dict().find(item.str()) != nullptr;
  fail("argument of type '" + type_name(container) + "' is not iterable");
}

int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

Value binary(const std::string& op, const Value& a, const Value& b) {
  if (a.undefined()) fail_undefined(a);
  if (b.undefined()) fail_undefined(b);
  const bool ints = (a.is_int() || a.is_bool()) && (b.is_int() || b.is_bool());
  const bool numbers = a.is_number() && b.is_number();
  if (op == "+") {
    if (ints) return Value(a.integer() + b.integer());
    if (numbers) return Value(a.number() + b.number());
    if (a.is_string() && b.is_string()) return Value(a.str() + b.str());
    if (a.is_list() && b.is_list() && a.list().tuple == b.list().tuple) {
      std::vector<Value> items = a.list().items;
      items.insert(items.end(), b.list().items.begin(), b.list().items.end());
      return make_list(std::move(items), a.list().tuple);
    }
  } else if (op == "-") {
    if (ints) return Value(a.integer() - b.integer());
    if (numbers) return Value(a.number() - b.number());
  } else if (op == "*") {
    if (ints) return Value(a.integer() * b.integer());
    if (numbers) return Value(a.number() * b.number());
    const Value* seq = a.is_string() || a.is_list() ? &a : &b;
    const Value* count = seq == &a ? &b : &a;
    if ((seq->is_string() || seq->is_list()) && (count->is_int() || count->is_bool())) {
      const int64_t n = std::max<int64_t>(0, count->integer());
      if (seq->is_string()) {
        std::string out;
        for (int64_t i = 0; i < n; ++i) out += seq->str();
        return Value(out);
      }
      std::vector<Value> items;
      for (int64_t i = 0; i < n; ++i) items.insert(items.end(), seq->list().items.begin(), seq->list().items.end());
      return make_list(std::move(items), seq->list().tuple);
    }
  } else if (op == "/") {
    if (numbers) {
      if (b.number() == 0) fail("division by zero");
      return Value(a.number() / b.number());
    }
  } else if (op == "//") {
    if (numbers && b.number() == 0) fail("integer division or modulo by zero");
    if (ints) return Value(floor_div(a.integer(), b.integer()));
    if (numbers) return Value(std::floor(a.number() / b.number()));
  } else if (op == "%") {
    if (numbers && b.number() == 0) fail("integer division or modulo by zero");
    if (ints) return Value(a.integer() - floor_div(a.integer(), b.integer()) * b.integer());
    if (numbers) {
      double r = std::fmod(a.number(), b.number());
      if (r != 0 && ((r < 0) != (b.number() < 0))) r += b.number();
      return Value(r);
    }
    if (a.is_string()) fail("printf-style formatting with '%' is not supported");
  } else if (op == "**") {
    if (ints && b.integer() >= 0) {
      int64_t r = 1;
      for (int64_t i = 0; i < b.integer(); ++i) r *= a.integer();
      return Value(r);
    }
    if (numbers) return Value(std::pow(a.number(), b.number()));
  }
  fail("unsupported operand type(s) for " + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
}

// ---------------------------------------------------------------------------------
// Python string methods and the filters built on them.

std::u32string strip_chars(const std::u32string& s, const std::optional<std::u32string>& chars, bool left,
                           bool right) {
  auto strip_it = [&](char32_t c) { return chars ? chars->find(c) != std::u32string::npos : is_space(c); };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e && strip_it(s[b])) ++b;
  if (right)
    while (e > b && strip_it(s[e - 1])) --e;
  return s.substr(b, e - b);
}

std::string strip(const std::string& s, const Value& chars, bool left, bool right) {
  std::optional<std::u32string> set;
  if (chars.is_string()) set = decode(chars.str());
  else if (!chars.undefined() && !chars.none()) fail("strip arg must be None or str");
  if (!set && is_ascii(s)) {
    size_t b = 0, e = s.size();
    if (left)
      while (b < e && is_space(static_cast<unsigned char>(s[b]))) ++b;
    if (right)
      while (e > b && is_space(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
  }
  return encode(strip_chars(decode(s), set, left, right));
}

std::vector<Value> split(const std::string& s, const Value& sep, int64_t maxsplit, bool from_right) {
  std::vector<std::string> parts;
  if (sep.undefined() || sep.none()) {
    // Runs of white space separate; leading and trailing white space is dropped.
    std::u32string u = decode(s);
    std::vector<std::u32string> words;
    if (!from_right) {
      size_t i = 0;
      while (i < u.size()) {
        while (i < u.size() && is_space(u[i])) ++i;
        if (i == u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          words.push_back(strip_chars(u.substr(i), std::nullopt, false, true));
          break;
        }
        size_t j = i;
        while (j < u.size() && !is_space(u[j])) ++j;
        words.push_back(u.substr(i, j - i));
        i = j;
      }
    } else {
      size_t i = u.size();
      while (i > 0) {
        while (i > 0 && is_space(u[i - 1])) --i;
        if (i == 0) break;
        if (maxsplit >= 0 && static_cast<int64_t>(words.size()) == maxsplit) {
          words.push_back(strip_chars(u.substr(0, i), std::nullopt, true, false));
          break;
        }
        size_t j = i;
        while (j > 0 && !is_space(u[j - 1])) --j;
        words.push_back(u.substr(j, i - j));
        i = j;
      }
      std::reverse(words.begin(), words.end());
    }
    std::vector<Value> out;
    for (const auto& w : words) out.emplace_back(encode(w));
    return out;
  }
  if (!sep.is_string()) fail("must be str or None, not " + type_name(sep));
  const std::string& d = sep.str();
  if (d.empty()) fail("empty separator");
  if (!from_right) {
    size_t start = 0;
    while (true) {
      size_t pos = s.find(d, start);
      if (pos == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) break;
      parts.push_back(s.substr(start, pos - start));
      start = pos + d.size();
    }
    parts.push_back(s.substr(start));
  } else {
    size_t end = s.size();
    while (true) {
      if (end < d.size()) break;
      size_t pos = s.rfind(d, end - d.size());
      if (pos == std::string::npos || (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) break;
      parts.push_back(s.substr(pos + d.size(), end - pos - d.size()));
      end = pos;
    }
    parts.push_back(s.substr(0, end));
    std::reverse(parts.begin(), parts.end());
  }
  std::vector<Value> out;
  for (auto& p : parts) out.emplace_back(std::move(p));
  return out;
}

std::string replace(const std::string& s, const std::string& old, const std::string& with, int64_t count) {
  std::string out;
  if (old.empty()) {
    std::u32string u = decode(s);
    int64_t done = 0;
    for (size_t i = 0; i <= u.size(); ++i) {
      if (count < 0 || done < count) {
        out += with;
        ++done;
      }
      if (i < u.size()) append_utf8(out, u[i]);
    }
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    size_t pos = s.find(old, start);
    if (pos == std::string::npos) break;
    out += s.substr(start, pos - start) + with;
    start = pos + old.size();
    ++done;
  }
  return out + s.substr(start);
}

std::string map_case(const std::string& s, char32_t (*f)(char32_t)) {
  if (is_ascii(s)) {
    std::string out = s;
    for (char& c : out) c = static_cast<char>(f(static_cast<unsigned char>(c)));
    return out;
  }
  std::u32string u = decode(s);
  for (char32_t& c : u) c = f(c);
  return encode(u);
}

std::string capitalize(const std::string& s) {
  std::u32string u = decode(s);
  for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? upper_char(u[i]) : lower_char(u[i]);
  return encode(u);
}

// Python's str.title(): a letter after a non-letter is upper case, other letters lower.
std::string py_title(const std::string& s) {
  std::u32string u = decode(s);
  bool previous_letter = false;
  for (char32_t& c : u) {
    c = previous_letter ? lower_char(c) : upper_char(c);
    previous_letter = is_alpha(c);
  }
  return encode(u);
}

// Jinja's title filter: words begin after runs of white space, - ( { [ <.
std::string jinja_title(const std::string& s) {
  std::u32string u = decode(s);
  bool word_start = true;
  for (char32_t& c : u) {
    const bool separator = is_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (separator) {
      word_start = true;
      continue;
    }
    c = word_start ? upper_char(c) : lower_char(c);
    word_start = false;
  }
  return encode(u);
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// Python's index normalisation for s[i] and slices over `n` elements.
std::optional<int64_t> normalize_index(int64_t i, int64_t n) {
  if (i < 0) i += n;
  if (i < 0 || i >= n) return std::nullopt;
  return i;
}

std::vector<int64_t> slice_indices(int64_t n, const Value& start, const Value& stop, const Value& step_v) {
  auto as_int = [](const Value& v) -> std::optional<int64_t> {
    if (v.undefined() || v.none()) return std::nullopt;
    if (!v.is_int() && !v.is_bool()) fail("slice indices must be integers or None");
    return v.integer();
  };
  const int64_t step = as_int(step_v).value_or(1);
  if (step == 0) fail("slice step cannot be zero");
  auto clamp = [&](std::optional<int64_t> v, int64_t dflt) {
    if (!v) return dflt;
    int64_t i = *v;
    if (i < 0) i += n;
    if (step > 0) return std::clamp<int64_t>(i, 0, n);
    return std::clamp<int64_t>(i, -1, n - 1);
  };
  const int64_t b = clamp(as_int(start), step > 0 ? 0 : n - 1);
  const int64_t e = clamp(as_int(stop), step > 0 ? n : -1);
  std::vector<int64_t> out;
  for (int64_t i = b; step > 0 ? i < e : i > e; i += step) out.push_back(i);
  return out;
}

// ---------------------------------------------------------------------------------
// Lexer.

enum class Tok { Data, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok kind;
  std::string text;  // data, name, operator, or the decoded string literal
  int line = 1;
  int column = 1;
  int64_t int_value = 0;
  double float_value = 0;
};

class Lexer {
 public:
  Lexer(const std::string& source, const std::string& name) : src_(normalize(source)), name_(name) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i)
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
  }

  std::vector<Token> run() {
    bool line_starting = true;  // whether the last match ended a line (jinja2's lstrip rule)
    while (pos_ < src_.size()) {
      size_t open = find_open(pos_);
      if (open == std::string::npos) {
        emit_data(src_.substr(pos_), pos_);
        pos_ = src_.size();
        break;
      }
      std::string text = src_.substr(pos_, open - pos_);
      const char kind = src_[open + 1];
      const char sign = open + 2 < src_.size() && (src_[open + 2] == '-' || src_[open + 2] == '+') ? src_[open + 2] : 0;
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+' && kind != '{') {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() && all_ws(text, l_pos)) text.resize(l_pos);
      }
      emit_data(text, pos_);
      const size_t body = open + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        line_starting = lex_comment(open, body);
      } else if (kind == '%' && lex_raw(open, body, line_starting)) {
      } else {
        line_starting = lex_tag(kind, open, body);
      }
    }
    tokens_.push_back(Token{Tok::Eof, "", line_at(src_.size()), column_at(src_.size())});
    return std::move(tokens_);
  }

 private:
  // Jinja normalises line breaks to \n and drops one trailing newline.
  static std::string normalize(const std::string& s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '\r') {
        out += '\n';
        if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
      } else {
        out += s[i];
      }
    }
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  }

  static bool ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
  static bool all_ws(const std::string& s, size_t from) {
    return std::all_of(s.begin() + from, s.end(), [](char c) { return ws(c); });
  }
  static std::string rstrip_ws(const std::string& s) {
    size_t e = s.size();
    while (e > 0 && ws(s[e - 1])) --e;
    return s.substr(0, e);
  }

  int line_at(size_t pos) const {
    return static_cast<int>(std::upper_bound(line_starts_.begin(), line_starts_.end(), pos) - line_starts_.begin());
  }
  int column_at(size_t pos) const { return static_cast<int>(pos - line_starts_[line_at(pos) - 1]) + 1; }

  [[noreturn]] void error(size_t pos, const std::string& message) const {
    BRIGADE_FAIL(name_, " line ", line_at(pos), ", column ", column_at(pos), ": ", message);
  }

  size_t find_open(size_t from) const {
    for (size_t i = from; i + 1 < src_.size(); ++i)
      if (src_[i] == '{' && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    return std::string::npos;
  }

  void emit_data(const std::string& text, size_t pos) {
    if (!text.empty()) tokens_.push_back(Token{Tok::Data, text, line_at(pos), column_at(pos)});
  }

  // After a closing -%} / %} / +%}: what the strip sign or trim_blocks removes.
  // Returns whether the consumed text ended with a newline.
  bool after_close(char sign, bool block) {
    if (sign == '-') {
      while (pos_ < src_.size() && ws(src_[pos_])) ++pos_;
    } else if (sign != '+' && block && pos_ < src_.size() && src_[pos_] == '\n') {
      ++pos_;
    }
    return pos_ > 0 && src_[pos_ - 1] == '\n';
  }

  bool lex_comment(size_t open, size_t body) {
    const size_t close = src_.find("#}", body);
    if (close == std::string::npos) error(open, "missing end of comment tag");
    const char sign = close > body && (src_[close - 1] == '-' || src_[close - 1] == '+') ? src_[close - 1] : 0;
    pos_ = close + 2;
    return after_close(sign, true);
  }

  // {% raw %}...{% endraw %}: the text between is data, verbatim.
  bool lex_raw(size_t open, size_t body, bool& line_starting) {
    size_t p = body;
    while (p < src_.size() && ws(src_[p])) ++p;
    if (src_.compare(p, 3, "raw") != 0) return false;
    p += 3;
    while (p < src_.size() && ws(src_[p])) ++p;
    bool strip_after = false;
    if (src_.compare(p, 3, "-%}") == 0) {
      strip_after = true;
      p += 3;
    } else if (src_.compare(p, 2, "%}") == 0) {
      p += 2;
    } else {
      return false;
    }
    if (strip_after)
      while (p < src_.size() && ws(src_[p])) ++p;
    for (size_t q = src_.find("{%", p); q != std::string::npos; q = src_.find("{%", q + 2)) {
      size_t r = q + 2;
      const char sign = r < src_.size() && (src_[r] == '-' || src_[r] == '+') ? src_[r] : 0;
      if (sign) ++r;
      while (r < src_.size() && ws(src_[r])) ++r;
      if (src_.compare(r, 6, "endraw") != 0) continue;
      r += 6;
      while (r < src_.size() && ws(src_[r])) ++r;
      char close_sign = 0;
      if (r < src_.size() && (src_[r] == '-' || src_[r] == '+')) close_sign = src_[r++];
      if (src_.compare(r, 2, "%}") != 0) continue;
      std::string text = src_.substr(p, q - p);
      if (sign == '-') {
        text = rstrip_ws(text);
      } else if (sign != '+') {
        const size_t l_pos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if (l_pos > 0 && l_pos < text.size() && all_ws(text, l_pos)) text.resize(l_pos);
      }
      emit_data(text, p);
      pos_ = r + 2;
      line_starting = after_close(close_sign, true);
      return true;
    }
    error(open, "missing end of raw directive");
  }

  // The tokens of {{ ... }} or {% ... %}; ends at the closing delimiter outside brackets.
  bool lex_tag(char kind, size_t open, size_t body) {
    const bool block = kind == '%';
    tokens_.push_back(Token{block ? Tok::BlockBegin : Tok::VarBegin, "", line_at(open), column_at(open)});
    std::vector<char> brackets;
    size_t p = body;
    while (true) {
      while (p < src_.size() && ws(src_[p])) ++p;
      if (p >= src_.size()) error(open, std::string("missing end of ") + (block ? "block" : "variable") + " tag");
      const char c = src_[p];
      const int line = line_at(p), column = column_at(p);
      if (brackets.empty()) {
        char sign = 0;
        size_t q = p;
        if (c == '-' || (c == '+' && block)) sign = c, ++q;
        if (src_.compare(q, 2, block ? "%}" : "}}") == 0) {
          tokens_.push_back(Token{block ? Tok::BlockEnd : Tok::VarEnd, "", line, column});
          pos_ = q + 2;
          return after_close(sign, block);
        }
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        tokens_.push_back(Token{Tok::Name, src_.substr(p, q - p), line, column});
        p = q;
      } else if (c == '\'' || c == '"') {
        p = lex_string(p, line, column);
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        p = lex_number(p, line, column);
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "/", "*", "%", "~", "[", "]", "(",
                                     ")", "{", "}", "<", ">", "=", ".", ":", "|", ",", ";"};
        const char* op = nullptr;
        for (const char* o : kOps)
          if (src_.compare(p, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        if (!op) error(p, std::string("unexpected character '") + c + "'");
        const std::string s = op;
        if (s == "(" || s == "[" || s == "{") brackets.push_back(s == "(" ? ')' : s == "[" ? ']' : '}');
        if (s == ")" || s == "]" || s == "}") {
          if (brackets.empty() || brackets.back() != s[0]) error(p, "unexpected '" + s + "'");
          brackets.pop_back();
        }
        tokens_.push_back(Token{Tok::Op, s, line, column});
        p += s.size();
      }
    }
  }

  // Python's unicode-escape decoding of a string literal's body.
  size_t lex_string(size_t p, int line, int column) {
    const char quote = src_[p];
    std::string out;
    size_t q = p + 1;
    while (true) {
      if (q >= src_.size()) error(p, "unterminated string");
      const char c = src_[q];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++q;
        continue;
      }
      if (q + 1 >= src_.size()) error(p, "unterminated string");
      const char e = src_[q + 1];
      q += 2;
      auto hex = [&](int n) {
        if (q + n > src_.size()) error(p, "truncated escape in string");
        char32_t v = 0;
        for (int i = 0; i < n; ++i) {
          const char h = src_[q + i];
          if (!std::isxdigit(static_cast<unsigned char>(h))) error(p, "truncated escape in string");
          v = v * 16 + (std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
        }
        q += n;
        append_utf8(out, v);
      };
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\n': break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = e - '0';
            for (int i = 0; i < 2 && q < src_.size() && src_[q] >= '0' && src_[q] <= '7'; ++i)
              v = v * 8 + (src_[q++] - '0');
            append_utf8(out, v);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    tokens_.push_back(Token{Tok::String, out, line, column});
    return q + 1;
  }

  size_t lex_number(size_t p, int line, int column) {
    auto digits = [&](size_t q) {
      while (q < src_.size() &&
             (std::isdigit(static_cast<unsigned char>(src_[q])) ||
              (src_[q] == '_' && q + 1 < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q + 1])))))
        ++q;
      return q;
    };
    size_t q = digits(p);
    bool is_float = false;
    if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
      is_float = true;
      q = digits(q + 1);
    }
    if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
      size_t r = q + 1;
      if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
      if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
        is_float = true;
        q = digits(r);
      }
    }
    std::string text;
    for (size_t i = p; i < q; ++i)
      if (src_[i] != '_') text += src_[i];
    Token t{is_float ? Tok::Float : Tok::Int, text, line, column};
    if (is_float) {
      t.float_value = std::strtod(text.c_str(), nullptr);
    } else {
      auto res = std::from_chars(text.data(), text.data() + text.size(), t.int_value);
      if (res.ec != std::errc()) error(p, "integer literal out of range");
    }
    tokens_.push_back(t);
    return q;
  }

  std::string src_;
  const std::string& name_;
  std::vector<size_t> line_starts_;  // byte offset where each line begins
  size_t pos_ = 0;
  std::vector<Token> tokens_;
};

// ---------------------------------------------------------------------------------
// Syntax tree.

enum class ExprKind {
  Literal, Name, List, Tuple, Dict, Attr, Item, Slice, Call, Filter, Test,
  Not, Neg, Pos, Binary, Concat, Compare, And, Or, Cond
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  ExprKind kind;
  int line;
  Value literal;                // Literal
  std::string name;             // Name, Attr, Filter, Test, Binary operator
  std::vector<ExprPtr> args;    // operands; for Call/Filter/Test args[0] is the callee/subject
  std::vector<std::pair<std::string, ExprPtr>> kwargs;  // Call/Filter/Test keywords; Dict keys are args
  std::vector<std::string> ops;  // Compare
  bool negated = false;          // `is not`
};

}  // namespace

enum class NodeKind { Body, Text, Output, If, For, Set, SetAttr, SetBlock, Macro, Break, Continue, Generation };

struct Node {
  NodeKind kind;
  int line = 0;
  std::string text;                   // Text; Macro name
  ExprPtr expr;                       // Output, For iterable, Set value
  ExprPtr filter;                     // For `if`
  std::vector<std::string> targets;   // For / Set names; SetAttr {namespace, attribute}
  std::vector<std::pair<ExprPtr, std::vector<std::unique_ptr<Node>>>> branches;  // If
  std::vector<std::unique_ptr<Node>> body, else_body;
  std::vector<std::string> params;    // Macro
  std::vector<ExprPtr> defaults;      // Macro, nullptr where none
};

namespace {

using NodePtr = std::unique_ptr<Node>;
using Body = std::vector<NodePtr>;

ExprPtr make_expr(ExprKind kind, int line) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->line = line;
  return e;
}

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::string& name) : t_(std::move(tokens)), name_(name) {}

  NodePtr parse_template() {
    auto root = std::make_unique<Node>();
    root->kind = NodeKind::Body;
    std::string ended;
    root->body = parse_body({}, ended);
    return root;
  }

 private:
  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t n = 1) const { return t_[std::min(i_ + n, t_.size() - 1)]; }
  Token next() { return t_[i_ < t_.size() - 1 ? i_++ : i_]; }
  bool is_op(const char* op) const { return cur().kind == Tok::Op && cur().text == op; }
  bool is_name(const char* name) const { return cur().kind == Tok::Name && cur().text == name; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    ++i_;
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    ++i_;
    return true;
  }

  [[noreturn]] void error(const Token& at, const std::string& message) const {
    BRIGADE_FAIL(name_, " line ", at.line, ", column ", at.column, ": ", message);
  }

  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Tok::Eof: return "end of template";
      case Tok::BlockEnd: return "end of statement block";
      case Tok::VarEnd: return "end of print statement";
      case Tok::String: return "string";
      case Tok::Data: return "template data";
      default: return "'" + t.text + "'";
    }
  }

  void expect_op(const char* op) {
    if (!skip_op(op)) error(cur(), std::string("expected '") + op + "', got " + describe(cur()));
  }
  std::string expect_name() {
    if (cur().kind != Tok::Name) error(cur(), "expected a name, got " + describe(cur()));
    return next().text;
  }
  void expect_block_end() {
    if (cur().kind != Tok::BlockEnd) error(cur(), "expected end of statement block, got " + describe(cur()));
    ++i_;
  }

  // Statements until `{% <one of end_names>`; `ended` says which (the name is consumed).
  Body parse_body(const std::vector<std::string>& end_names, std::string& ended) {
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.kind == Tok::Eof) {
        if (end_names.empty()) return body;
        error(t, "unexpected end of template, expected '" + end_names.front() + "'");
      }
      if (t.kind == Tok::Data) {
        auto n = std::make_unique<Node>();
        n->kind = NodeKind::Text;
        n->line = t.line;
        n->text = t.text;
        body.push_back(std::move(n));
        ++i_;
      } else if (t.kind == Tok::VarBegin) {
        ++i_;
        auto n = std::make_unique<Node>();
        n->kind = NodeKind::Output;
        n->line = t.line;
        n->expr = parse_tuple(true, {});
        if (cur().kind != Tok::VarEnd) error(cur(), "expected end of print statement, got " + describe(cur()));
        ++i_;
        body.push_back(std::move(n));
      } else if (t.kind == Tok::BlockBegin) {
        const Token& keyword = peek();
        if (keyword.kind != Tok::Name) error(keyword, "expected a statement name, got " + describe(keyword));
        if (std::find(end_names.begin(), end_names.end(), keyword.text) != end_names.end()) {
          i_ += 2;
          ended = keyword.text;
          return body;
        }
        ++i_;
        body.push_back(parse_statement());
      } else {
        error(t, "unexpected " + describe(t));
      }
    }
  }

  NodePtr parse_statement() {
    const Token keyword = next();
    auto n = std::make_unique<Node>();
    n->line = keyword.line;
    const std::string& k = keyword.text;
    std::string ended;
    if (k == "if") {
      n->kind = NodeKind::If;
      ExprPtr test = parse_tuple(false, {});
      while (true) {
        expect_block_end();
        Body body = parse_body({"elif", "else", "endif"}, ended);
        n->branches.emplace_back(std::move(test), std::move(body));
        if (ended == "elif") {
          test = parse_tuple(false, {});
          continue;
        }
        if (ended == "else") {
          expect_block_end();
          n->else_body = parse_body({"endif"}, ended);
        }
        break;
      }
    } else if (k == "for") {
      n->kind = NodeKind::For;
      n->targets = parse_targets();
      if (!skip_name("in")) error(cur(), "expected 'in', got " + describe(cur()));
      n->expr = parse_tuple(false, {"recursive"});
      if (skip_name("if")) n->filter = parse_expression(true);
      if (is_name("recursive")) error(cur(), "recursive for loops are not supported");
      expect_block_end();
      ++loop_depth_;
      n->body = parse_body({"endfor", "else"}, ended);
      --loop_depth_;
      if (ended == "else") {
        expect_block_end();
        n->else_body = parse_body({"endfor"}, ended);
      }
    } else if (k == "set") {
      if (cur().kind == Tok::Name && peek().kind == Tok::Op && peek().text == ".") {
        n->kind = NodeKind::SetAttr;
        n->targets.push_back(next().text);
        ++i_;
        n->targets.push_back(expect_name());
        expect_op("=");
        n->expr = parse_tuple(true, {});
      } else {
        n->targets = parse_targets();
        if (skip_op("=")) {
          n->kind = NodeKind::Set;
          n->expr = parse_tuple(true, {});
        } else {
          if (n->targets.size() != 1) error(cur(), "a block set takes one name");
          if (is_op("|")) error(cur(), "filters on block set are not supported");
          n->kind = NodeKind::SetBlock;
          expect_block_end();
          n->body = parse_body({"endset"}, ended);
        }
      }
    } else if (k == "macro") {
      n->kind = NodeKind::Macro;
      n->text = expect_name();
      expect_op("(");
      while (!skip_op(")")) {
        if (!n->params.empty()) expect_op(",");
        if (skip_op(")")) break;
        n->params.push_back(expect_name());
        n->defaults.push_back(skip_op("=") ? parse_expression(true) : nullptr);
      }
      expect_block_end();
      const int outer_loops = std::exchange(loop_depth_, 0);
      n->body = parse_body({"endmacro"}, ended);
      loop_depth_ = outer_loops;
      if (cur().kind == Tok::Name && cur().text == n->text) ++i_;
    } else if (k == "break" || k == "continue") {
      if (loop_depth_ == 0) error(keyword, "'" + k + "' outside of a loop");
      n->kind = k == "break" ? NodeKind::Break : NodeKind::Continue;
    } else if (k == "generation") {
      n->kind = NodeKind::Generation;
      expect_block_end();
      n->body = parse_body({"endgeneration"}, ended);
    } else if (k.rfind("end", 0) == 0 || k == "elif" || k == "else") {
      error(keyword, "unexpected '" + k + "'");
    } else {
      error(keyword, "tag '" + k + "' is not supported");
    }
    expect_block_end();
    return n;
  }

  // for / set targets: a name or a tuple of names.
  std::vector<std::string> parse_targets() {
    std::vector<std::string> names;
    const bool paren = skip_op("(");
    do {
      if (paren && is_op(")")) break;
      names.push_back(expect_name());
    } while (skip_op(","));
    if (paren) expect_op(")");
    return names;
  }

  // jinja2's parse_tuple: `a, b` is a tuple; one expression is itself.
  ExprPtr parse_tuple(bool with_condexpr, const std::vector<std::string>& extra_end, bool explicit_parens = false) {
    const int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) expect_op(",");
      const Token& t = cur();
      const bool end =
          t.kind == Tok::VarEnd || t.kind == Tok::BlockEnd || t.kind == Tok::Eof ||
          (t.kind == Tok::Op && t.text == ")") ||
          (t.kind == Tok::Name && std::find(extra_end.begin(), extra_end.end(), t.text) != extra_end.end());
      if (end) break;
      items.push_back(with_condexpr ? parse_expression(true) : parse_or());
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) error(cur(), "expected an expression, got " + describe(cur()));
    }
    auto e = make_expr(ExprKind::Tuple, line);
    e->args = std::move(items);
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    if (!with_condexpr) return parse_or();
    ExprPtr e = parse_or();
    while (is_name("if")) {
      const int line = next().line;
      auto c = make_expr(ExprKind::Cond, line);
      ExprPtr test = parse_or();
      ExprPtr otherwise = skip_name("else") ? parse_expression(true) : nullptr;
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  ExprPtr binary(ExprKind kind, int line, ExprPtr a, ExprPtr b, std::string op = {}) {
    auto e = make_expr(kind, line);
    e->name = std::move(op);
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }

  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      const int line = next().line;
      e = binary(ExprKind::Or, line, std::move(e), parse_and());
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      const int line = next().line;
      e = binary(ExprKind::And, line, std::move(e), parse_not());
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      auto e = make_expr(ExprKind::Not, next().line);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    const int line = cur().line;
    ExprPtr first = parse_math1();
    auto e = make_expr(ExprKind::Compare, line);
    e->args.push_back(std::move(first));
    while (true) {
      if (cur().kind == Tok::Op &&
          (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == "<=" || cur().text == ">" ||
           cur().text == ">=")) {
        e->ops.push_back(next().text);
      } else if (is_name("in")) {
        ++i_;
        e->ops.push_back("in");
      } else if (is_name("not") && peek().kind == Tok::Name && peek().text == "in") {
        i_ += 2;
        e->ops.push_back("not in");
      } else {
        break;
      }
      e->args.push_back(parse_math1());
    }
    if (e->ops.empty()) return std::move(e->args[0]);
    return e;
  }
  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token op = next();
      e = binary(ExprKind::Binary, op.line, std::move(e), parse_concat(), op.text);
    }
    return e;
  }
  ExprPtr parse_concat() {
    const int line = cur().line;
    ExprPtr first = parse_math2();
    if (!is_op("~")) return first;
    auto e = make_expr(ExprKind::Concat, line);
    e->args.push_back(std::move(first));
    while (skip_op("~")) e->args.push_back(parse_math2());
    return e;
  }
  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token op = next();
      e = binary(ExprKind::Binary, op.line, std::move(e), parse_pow(), op.text);
    }
    return e;
  }
  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      const Token op = next();
      e = binary(ExprKind::Binary, op.line, std::move(e), parse_unary(true), op.text);
    }
    return e;
  }
  ExprPtr parse_unary(bool with_filter) {
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const Token op = next();
      e = make_expr(op.text == "-" ? ExprKind::Neg : ExprKind::Pos, op.line);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token t = cur();
    if (t.kind == Tok::Name) {
      ++i_;
      auto e = make_expr(ExprKind::Literal, t.line);
      if (t.text == "true" || t.text == "True") e->literal = Value(true);
      else if (t.text == "false" || t.text == "False") e->literal = Value(false);
      else if (t.text == "none" || t.text == "None") e->literal = Value(None{});
      else {
        e->kind = ExprKind::Name;
        e->name = t.text;
      }
      return e;
    }
    if (t.kind == Tok::String) {
      std::string s;
      while (cur().kind == Tok::String) s += next().text;
      auto e = make_expr(ExprKind::Literal, t.line);
      e->literal = Value(s);
      return e;
    }
    if (t.kind == Tok::Int || t.kind == Tok::Float) {
      ++i_;
      auto e = make_expr(ExprKind::Literal, t.line);
      e->literal = t.kind == Tok::Int ? Value(t.int_value) : Value(t.float_value);
      return e;
    }
    if (skip_op("(")) {
      ExprPtr e = parse_tuple(true, {}, true);
      expect_op(")");
      return e;
    }
    if (skip_op("[")) {
      auto e = make_expr(ExprKind::List, t.line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (skip_op("{")) {
      auto e = make_expr(ExprKind::Dict, t.line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    error(t, "unexpected " + describe(t));
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".") || is_op("[")) e = parse_subscript(std::move(e));
      else if (is_op("(")) e = parse_call(std::move(e));
      else return e;
    }
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) e = parse_filter(std::move(e));
      else if (is_name("is")) e = parse_test(std::move(e));
      else if (is_op("(")) e = parse_call(std::move(e));
      else return e;
    }
  }

  ExprPtr parse_subscript(ExprPtr target) {
    const Token t = next();
    if (t.text == ".") {
      const Token attr = next();
      if (attr.kind == Tok::Name) {
        auto e = make_expr(ExprKind::Attr, t.line);
        e->name = attr.text;
        e->args.push_back(std::move(target));
        return e;
      }
      if (attr.kind == Tok::Int) {
        auto e = make_expr(ExprKind::Item, t.line);
        e->args.push_back(std::move(target));
        auto index = make_expr(ExprKind::Literal, attr.line);
        index->literal = Value(attr.int_value);
        e->args.push_back(std::move(index));
        return e;
      }
      error(attr, "expected name or number after '.'");
    }
    std::vector<ExprPtr> items;
    while (!is_op("]")) {
      if (!items.empty()) expect_op(",");
      items.push_back(parse_subscribed());
    }
    expect_op("]");
    if (items.size() == 1 && items[0] && items[0]->kind == ExprKind::Slice) {
      items[0]->args.insert(items[0]->args.begin(), std::move(target));
      return std::move(items[0]);
    }
    auto e = make_expr(ExprKind::Item, t.line);
    e->args.push_back(std::move(target));
    if (items.size() == 1) {
      e->args.push_back(std::move(items[0]));
    } else {
      auto tuple = make_expr(ExprKind::Tuple, t.line);
      tuple->args = std::move(items);
      e->args.push_back(std::move(tuple));
    }
    return e;
  }

  // One subscript: an expression, or a slice start:stop:step (the target is added later).
  ExprPtr parse_subscribed() {
    const int line = cur().line;
    std::vector<ExprPtr> parts;
    if (skip_op(":")) {
      parts.push_back(nullptr);
    } else {
      ExprPtr e = parse_expression(true);
      if (!skip_op(":")) return e;
      parts.push_back(std::move(e));
    }
    if (is_op(":")) parts.push_back(nullptr);
    else if (!is_op("]") && !is_op(",")) parts.push_back(parse_expression(true));
    else parts.push_back(nullptr);
    if (skip_op(":")) parts.push_back(!is_op("]") && !is_op(",") ? parse_expression(true) : nullptr);
    else parts.push_back(nullptr);
    auto slice = make_expr(ExprKind::Slice, line);
    slice->args = std::move(parts);
    return slice;
  }

  // `(args)` after a callee, filter or test; fills e->args (after args[0]) and e->kwargs.
  void parse_call_args(Expr& e) {
    expect_op("(");
    while (!is_op(")")) {
      if (!e.args.empty() && (e.args.size() > 1 || !e.kwargs.empty())) expect_op(",");
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) error(cur(), "*args and **kwargs in calls are not supported");
      if (cur().kind == Tok::Name && peek().kind == Tok::Op && peek().text == "=") {
        std::string key = next().text;
        ++i_;
        e.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!e.kwargs.empty()) error(cur(), "positional argument after keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = make_expr(ExprKind::Call, cur().line);
    e->args.push_back(std::move(callee));
    parse_call_args(*e);
    return e;
  }

  std::string dotted_name() {
    std::string name = expect_name();
    while (is_op(".") && peek().kind == Tok::Name) {
      ++i_;
      name += "." + next().text;
    }
    return name;
  }

  ExprPtr parse_filter(ExprPtr subject) {
    const int line = next().line;
    auto e = make_expr(ExprKind::Filter, line);
    e->name = dotted_name();
    e->args.push_back(std::move(subject));
    if (is_op("(")) parse_call_args(*e);
    return e;
  }

  ExprPtr parse_test(ExprPtr subject) {
    const int line = next().line;
    auto e = make_expr(ExprKind::Test, line);
    e->negated = skip_name("not");
    e->name = dotted_name();
    e->args.push_back(std::move(subject));
    const Token& t = cur();
    if (is_op("(")) {
      parse_call_args(*e);
    } else if ((t.kind == Tok::Name || t.kind == Tok::String || t.kind == Tok::Int || t.kind == Tok::Float ||
                (t.kind == Tok::Op && (t.text == "(" || t.text == "[" || t.text == "{"))) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error(t, "You cannot chain multiple tests with is");
      e->args.push_back(parse_postfix(parse_primary()));
    }
    return e;
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  const std::string& name_;
  int loop_depth_ = 0;  // enclosing for loops in the current macro or template
};

}  // namespace
}  // namespace jinja

namespace jinja {
namespace {

// ---------------------------------------------------------------------------------
// Rendering.

struct Scope {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;

  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

ScopePtr child_scope(const ScopePtr& parent) {
  auto s = std::make_shared<Scope>();
  s->parent = parent;
  return s;
}

enum class Flow { Normal, Break, Continue };

// Argument i of a call, by position or keyword, else `fallback`.
Value arg(const Args& a, size_t i, const char* key, Value fallback = Value()) {
  if (i < a.positional.size()) return a.positional[i];
  for (const auto& [k, v] : a.keyword)
    if (k == key) return v;
  return fallback;
}

// Rejects arguments beyond `names` (Python's TypeError).
void check_args(const Args& a, const std::string& what, std::initializer_list<const char*> names) {
  if (a.positional.size() > names.size())
    fail(what + " takes at most " + std::to_string(names.size()) + " argument(s)");
  for (const auto& [k, v] : a.keyword) {
    const bool known = std::any_of(names.begin(), names.end(), [&](const char* n) { return k == n; });
    if (!known) fail(what + " got an unexpected keyword argument '" + k + "'");
  }
}

int64_t int_arg(const Value& v, const std::string& what) {
  if (!v.is_int() && !v.is_bool()) fail(what + " must be an integer, not " + type_name(v));
  return v.integer();
}

std::string str_arg(const Value& v, const std::string& what) {
  if (!v.is_string()) fail(what + " must be str, not " + type_name(v));
  return v.str();
}

Value unsafe_method(const std::string& name, const Value& obj) {
  const std::string message = "access to attribute '" + name + "' of '" + type_name(obj) + "' object is unsafe.";
  return make_function(name, [message](Args&) -> Value { fail(message); });
}

Value string_method(const std::string& s, const std::string& name) {
  auto method = [&](std::function<Value(Args&)> f) { return make_function("str." + name, std::move(f)); };
  const std::string what = "str." + name + "()";
  if (name == "startswith" || name == "endswith") {
    const bool starts = name == "startswith";
    return method([s, starts, what](Args& a) {
      check_args(a, what, {"prefix", "start", "end"});
      if (a.positional.size() > 1) fail(what + " with start/end is not supported");
      const Value p = arg(a, 0, "prefix");
      std::vector<std::string> options;
      if (p.is_string()) options.push_back(p.str());
      else if (p.is_list() && p.list().tuple)
        for (const Value& o : p.list().items) options.push_back(str_arg(o, what));
      else fail(what + " first arg must be str or a tuple of str, not " + type_name(p));
      for (const std::string& o : options) {
        if (o.size() > s.size()) continue;
        if (starts ? s.compare(0, o.size(), o) == 0 : s.compare(s.size() - o.size(), o.size(), o) == 0)
          return Value(true);
      }
      return Value(false);
    });
  }
  if (name == "split" || name == "rsplit") {
    const bool right = name == "rsplit";
    return method([s, right, what](Args& a) {
      check_args(a, what, {"sep", "maxsplit"});
      return make_list(split(s, arg(a, 0, "sep"), int_arg(arg(a, 1, "maxsplit", Value(-1)), "maxsplit"), right));
    });
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    const bool left = name != "rstrip", right = name != "lstrip";
    return method([s, left, right, what](Args& a) {
      check_args(a, what, {"chars"});
      return Value(strip(s, arg(a, 0, "chars"), left, right));
    });
  }
  if (name == "replace") {
    return method([s, what](Args& a) {
      check_args(a, what, {"old", "new", "count"});
      return Value(replace(s, str_arg(arg(a, 0, "old"), "old"), str_arg(arg(a, 1, "new"), "new"),
                           int_arg(arg(a, 2, "count", Value(-1)), "count")));
    });
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    return method([s, name, what](Args& a) {
      check_args(a, what, {});
      if (name == "upper") return Value(map_case(s, upper_char));
      if (name == "lower") return Value(map_case(s, lower_char));
      if (name == "title") return Value(py_title(s));
      return Value(capitalize(s));
    });
  }
  if (name == "find" || name == "rfind" || name == "index" || name == "rindex") {
    return method([s, name, what](Args& a) {
      check_args(a, what, {"sub"});
      const std::string sub = str_arg(arg(a, 0, "sub"), "sub");
      const size_t pos = name[0] == 'r' ? s.rfind(sub) : s.find(sub);
      if (pos == std::string::npos) {
        if (name.find("index") != std::string::npos) fail("substring not found");
        return Value(-1);
      }
      return Value(static_cast<int64_t>(codepoint_length(s.substr(0, pos))));
    });
  }
  if (name == "count") {
    return method([s, what](Args& a) {
      check_args(a, what, {"sub"});
      const std::string sub = str_arg(arg(a, 0, "sub"), "sub");
      if (sub.empty()) return Value(static_cast<int64_t>(codepoint_length(s) + 1));
      int64_t n = 0;
      for (size_t pos = s.find(sub); pos != std::string::npos; pos = s.find(sub, pos + sub.size())) ++n;
      return Value(n);
    });
  }
  if (name == "join") {
    return method([s, what](Args& a) {
      check_args(a, what, {"iterable"});
      std::string out;
      bool first = true;
      for (const Value& v : iterate(arg(a, 0, "iterable"))) {
        out += (first ? "" : s) + str_arg(v, "sequence item");
        first = false;
      }
      return Value(out);
    });
  }
  if (name == "splitlines") {
    return method([s, what](Args& a) {
      check_args(a, what, {"keepends"});
      const bool keep = truthy(arg(a, 0, "keepends", Value(false)));
      std::vector<Value> lines;
      size_t start = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] != '\n' && s[i] != '\r') continue;
        size_t end = i;
        if (s[i] == '\r' && i + 1 < s.size() && s[i + 1] == '\n') ++i;
        lines.emplace_back(s.substr(start, (keep ? i + 1 : end) - start));
        start = i + 1;
      }
      if (start < s.size()) lines.emplace_back(s.substr(start));
      return make_list(std::move(lines));
    });
  }
  if (name == "format") {
    return method([s](Args& a) {
      std::string out;
      size_t auto_index = 0;
      for (size_t i = 0; i < s.size(); ++i) {
        const char c = s[i];
        if ((c == '{' || c == '}') && i + 1 < s.size() && s[i + 1] == c) {
          out += c;
          ++i;
          continue;
        }
        if (c == '}') fail("Single '}' encountered in format string");
        if (c != '{') {
          out += c;
          continue;
        }
        const size_t close = s.find('}', i);
        if (close == std::string::npos) fail("Single '{' encountered in format string");
        const std::string field = s.substr(i + 1, close - i - 1);
        if (field.find_first_of(":!.[") != std::string::npos) fail("format specs in str.format() are not supported");
        Value v;
        if (field.empty()) {
          if (auto_index >= a.positional.size()) fail("Replacement index out of range for positional args tuple");
          v = a.positional[auto_index++];
        } else if (std::isdigit(static_cast<unsigned char>(field[0]))) {
          const size_t index = std::stoul(field);
          if (index >= a.positional.size()) fail("Replacement index out of range for positional args tuple");
          v = a.positional[index];
        } else {
          v = arg(a, SIZE_MAX, field.c_str());
          if (v.undefined()) fail("KeyError: '" + field + "'");
        }
        out += py_str(v);
        i = close;
      }
      return Value(out);
    });
  }
  if (name == "isdigit" || name == "isalpha" || name == "isalnum" || name == "isspace" || name == "islower" ||
      name == "isupper") {
    return method([s, name](Args&) {
      if (s.empty()) return Value(false);
      bool cased = false;
      for (char32_t c : decode(s)) {
        const bool digit = c >= '0' && c <= '9', alpha = is_alpha(c);
        if (name == "isdigit" && !digit) return Value(false);
        if (name == "isalpha" && !alpha) return Value(false);
        if (name == "isalnum" && !(alpha || digit)) return Value(false);
        if (name == "isspace" && !is_space(c)) return Value(false);
        if (name == "islower" && c >= 'A' && c <= 'Z') return Value(false);
        if (name == "isupper" && c >= 'a' && c <= 'z') return Value(false);
        cased = cased || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
      }
      return Value(name == "islower" || name == "isupper" ? cased : true);
    });
  }
  return undefined("'str object' has no attribute '" + name + "'");
}

Value get_item(const Value& obj, const Value& key);

Value get_attr(const Value& obj, const std::string& name) {
  if (obj.undefined()) fail_undefined(obj);
  if (obj.is_dict()) {
    const DictData& d = obj.dict();
    if (name == "items" || name == "keys" || name == "values") {
      auto data = std::get<std::shared_ptr<DictData>>(obj.v);
      return make_function("dict." + name, [data, name](Args& a) {
        check_args(a, "dict." + name + "()", {});
        std::vector<Value> out;
        for (const auto& [k, v] : data->items) {
          if (name == "items") out.push_back(make_list({Value(k), v}, true));
          else out.push_back(name == "keys" ? Value(k) : v);
        }
        return make_list(std::move(out));
      });
    }
    if (name == "get") {
      auto data = std::get<std::shared_ptr<DictData>>(obj.v);
      return make_function("dict.get", [data](Args& a) {
        check_args(a, "dict.get()", {"key", "default"});
        const Value key = arg(a, 0, "key");
        const Value* found = key.is_string() ? data->find(key.str()) : nullptr;
        return found ? *found : arg(a, 1, "default", Value(None{}));
      });
    }
    if (name == "update" || name == "pop" || name == "setdefault" || name == "clear" || name == "popitem")
      return unsafe_method(name, obj);
    if (const Value* v = d.find(name)) return *v;
    return undefined("'dict object' has no attribute '" + name + "'");
  }
  if (obj.is_namespace()) {
    if (const Value* v = obj.ns().attrs.find(name)) return *v;
    return undefined("'Namespace' has no attribute '" + name + "'");
  }
  if (obj.is_string()) return string_method(obj.str(), name);
  if (obj.is_list()) {
    if (name == "index" || name == "count") {
      auto data = std::get<std::shared_ptr<ListData>>(obj.v);
      return make_function("list." + name, [data, name](Args& a) {
        check_args(a, "list." + name + "()", {"value"});
        const Value x = arg(a, 0, "value");
        int64_t n = 0;
        for (size_t i = 0; i < data->items.size(); ++i) {
          if (!equal(data->items[i], x)) continue;
          if (name == "index") return Value(static_cast<int64_t>(i));
          ++n;
        }
        if (name == "index") fail(py_repr(x) + " is not in list");
        return Value(n);
      });
    }
    if (name == "append" || name == "extend" || name == "insert" || name == "pop" || name == "remove" ||
        name == "sort" || name == "reverse" || name == "clear")
      return unsafe_method(name, obj);
  }
  return undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
}

// jinja2's Environment.getitem: obj[key], then for a string key getattr(obj, key).
Value get_item(const Value& obj, const Value& key) {
  if (obj.undefined()) fail_undefined(obj);
  if (obj.is_dict() && key.is_string()) {
    if (const Value* v = obj.dict().find(key.str())) return *v;
    return get_attr(obj, key.str());
  }
  if ((obj.is_list() || obj.is_string()) && (key.is_int() || key.is_bool())) {
    if (obj.is_list()) {
      const auto& items = obj.list().items;
      if (auto i = normalize_index(key.integer(), items.size())) return items[*i];
      return undefined(type_name(obj) + " object has no element " + std::to_string(key.integer()));
    }
    const std::u32string u = decode(obj.str());
    if (auto i = normalize_index(key.integer(), u.size())) return Value(encode(u.substr(*i, 1)));
    return undefined("str object has no element " + std::to_string(key.integer()));
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return undefined(type_name(obj) + " object has no element " + py_repr(key));
}

// `attribute=` of map, selectattr, sort, ...: a dotted path of keys or indices.
Value get_path(const Value& obj, const Value& path) {
  if (!path.is_string()) return get_item(obj, path);
  Value v = obj;
  size_t start = 0;
  const std::string& p = path.str();
  while (true) {
    const size_t dot = p.find('.', start);
    const std::string part = p.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const bool digits = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) {
      return std::isdigit(static_cast<unsigned char>(c));
    });
    v = get_item(v, digits ? Value(static_cast<int64_t>(std::stoll(part))) : Value(part));
    if (dot == std::string::npos) return v;
    start = dot + 1;
  }
}

std::string lower_for_compare(const Value& v) { return v.is_string() ? map_case(v.str(), lower_char) : ""; }

// Case-insensitive keys where Jinja's filters use ignore_case.
Value sort_key(const Value& v, bool case_sensitive) {
  return !case_sensitive && v.is_string() ? Value(lower_for_compare(v)) : v;
}

bool test_value(const std::string& name, const Value& v, const Args& a) {
  auto one = [&](const char* key) {
    const Value x = arg(a, 0, key);
    return x;
  };
  if (name == "defined") return !v.undefined();
  if (name == "undefined") return v.undefined();
  if (name == "none") return v.none();
  if (name == "boolean") return v.is_bool();
  if (name == "true") return v.is_bool() && std::get<bool>(v.v);
  if (name == "false") return v.is_bool() && !std::get<bool>(v.v);
  if (name == "integer") return v.is_int();
  if (name == "float") return v.is_float();
  if (name == "number") return v.is_number();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.is_dict();
  if (name == "iterable" || name == "sequence") return v.undefined() || v.is_string() || v.is_list() || v.is_dict();
  if (name == "callable") return v.is_function();
  if (name == "sameas") {
    const Value other = one("other");
    if (v.v.index() != other.v.index()) return false;
    if (v.is_list()) return &v.list() == &other.list();
    if (v.is_dict()) return &v.dict() == &other.dict();
    return equal(v, other);
  }
  if (name == "equalto" || name == "eq" || name == "==") return equal(v, one("b"));
  if (name == "ne" || name == "!=") return !equal(v, one("b"));
  if (name == "lt" || name == "lessthan" || name == "<") return compare(v, one("b"), "<") < 0;
  if (name == "le" || name == "<=") return compare(v, one("b"), "<=") <= 0;
  if (name == "gt" || name == "greaterthan" || name == ">") return compare(v, one("b"), ">") > 0;
  if (name == "ge" || name == ">=") return compare(v, one("b"), ">=") >= 0;
  if (name == "in") return contains(one("seq"), v);
  if (name == "odd" || name == "even") return (int_arg(v, "value") % 2 != 0) == (name == "odd");
  if (name == "divisibleby") return int_arg(v, "value") % int_arg(one("num"), "num") == 0;
  if (name == "lower" || name == "upper") {
    const std::string s = py_str(v);
    const bool want_lower = name == "lower";
    bool cased = false;
    for (char c : s) {
      if ((want_lower && c >= 'A' && c <= 'Z') || (!want_lower && c >= 'a' && c <= 'z')) return false;
      cased = cased || std::isalpha(static_cast<unsigned char>(c));
    }
    return cased;
  }
  if (name == "escaped") return false;
  fail("test '" + name + "' is not supported");
}

// Python's int() and float() on a string, as the int and float filters use them.
std::optional<int64_t> parse_int(const std::string& raw, int base) {
  std::string s = strip(raw, Value(), true, true);
  s.erase(std::remove(s.begin(), s.end(), '_'), s.end());
  if (s.empty()) return std::nullopt;
  int64_t out = 0;
  const char* b = s.data() + (s[0] == '+' ? 1 : 0);
  auto res = std::from_chars(b, s.data() + s.size(), out, base);
  if (res.ec != std::errc() || res.ptr != s.data() + s.size()) return std::nullopt;
  return out;
}

std::optional<double> parse_float(const std::string& raw) {
  const std::string s = strip(raw, Value(), true, true);
  if (s.empty()) return std::nullopt;
  char* end = nullptr;
  const double x = std::strtod(s.c_str(), &end);
  if (end != s.c_str() + s.size()) return std::nullopt;
  return x;
}

std::string strftime_now(const std::string& format) {
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  std::string buffer(256 + format.size() * 8, '\0');
  const size_t n = std::strftime(buffer.data(), buffer.size(), format.c_str(), &local);
  buffer.resize(n);
  return buffer;
}

class Renderer {
 public:
  Renderer(const std::string& name, ChatRendering& result) : name_(name), result_(result) {}

  void render(const Node& root, const ojson& context) {
    BRIGADE_CHECK(context.is_object(), name_, ": the context must be a JSON object, got ", context.type_name());
    auto globals = std::make_shared<Scope>();
    add_globals(*globals);
    auto scope = child_scope(globals);
    for (auto it = context.begin(); it != context.end(); ++it) scope->vars[it.key()] = from_json(it.value());
    result_.text.clear();
    result_.generation_spans.clear();
    exec(root.body, scope, result_.text);
  }

 private:
  [[noreturn]] void error(int line, const std::string& message) const {
    BRIGADE_FAIL(name_, " line ", line, ": ", message);
  }

  void add_globals(Scope& g) {
    g.vars["range"] = make_function("range", [](Args& a) {
      check_args(a, "range()", {"start", "stop", "step"});
      int64_t start = 0, stop = 0, step = 1;
      if (a.positional.size() == 1) {
        stop = int_arg(a.positional[0], "range() argument");
      } else if (a.positional.size() >= 2) {
        start = int_arg(a.positional[0], "range() argument");
        stop = int_arg(a.positional[1], "range() argument");
        if (a.positional.size() == 3) step = int_arg(a.positional[2], "range() argument");
      } else {
        fail("range expected at least 1 argument");
      }
      if (step == 0) fail("range() arg 3 must not be zero");
      std::vector<Value> out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (out.size() >= 100000) fail("Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        out.emplace_back(i);
      }
      return make_list(std::move(out));
    });
    auto dict_from = [](Args& a, const std::string& what) {
      if (a.positional.size() > 1) fail(what + " expected at most 1 positional argument");
      DictData d;
      if (!a.positional.empty()) {
        const Value& init = a.positional[0];
        if (init.is_dict()) {
          d = init.dict();
        } else {
          for (const Value& pair : iterate(init)) {
            if (!pair.is_list() || pair.list().items.size() != 2) fail(what + ": sequence elements must be pairs");
            d.set(str_arg(pair.list().items[0], "key"), pair.list().items[1]);
          }
        }
      }
      for (const auto& [k, v] : a.keyword) d.set(k, v);
      return d;
    };
    g.vars["dict"] = make_function("dict", [dict_from](Args& a) { return make_dict(dict_from(a, "dict()")); });
    g.vars["namespace"] = make_function("namespace", [dict_from](Args& a) {
      auto ns = std::make_shared<NamespaceData>();
      ns->attrs = dict_from(a, "namespace()");
      for (const auto& [k, v] : ns->attrs.items)
        if (!k.empty() && k[0] == '_')
          fail("Chat templates cannot store underscore-prefixed attributes on a namespace, but got '" + k + "'");
      return Value(ns);
    });
    g.vars["raise_exception"] = make_function("raise_exception", [](Args& a) -> Value {
      fail(py_str(arg(a, 0, "message")));
    });
    g.vars["strftime_now"] = make_function("strftime_now", [](Args& a) {
      check_args(a, "strftime_now()", {"format"});
      return Value(strftime_now(str_arg(arg(a, 0, "format"), "format")));
    });
  }

  Flow exec(const Body& body, const ScopePtr& scope, std::string& out) {
    for (const NodePtr& node : body) {
      const Flow flow = exec_node(*node, scope, out);
      if (flow != Flow::Normal) return flow;
    }
    return Flow::Normal;
  }

  void assign(Scope& scope, const std::vector<std::string>& targets, const Value& v) {
    if (targets.size() == 1) {
      scope.vars[targets[0]] = v;
      return;
    }
    const std::vector<Value> items = iterate(v);
    if (items.size() != targets.size())
      fail(std::string(items.size() < targets.size() ? "not enough" : "too many") + " values to unpack (expected " +
           std::to_string(targets.size()) + ", got " + std::to_string(items.size()) + ")");
    for (size_t i = 0; i < targets.size(); ++i) scope.vars[targets[i]] = items[i];
  }

  Flow exec_node(const Node& n, const ScopePtr& scope, std::string& out) {
    try {
      switch (n.kind) {
        case NodeKind::Text: out += n.text; return Flow::Normal;
        case NodeKind::Output: out += py_str(eval(*n.expr, scope)); return Flow::Normal;
        case NodeKind::If:
          for (const auto& [test, body] : n.branches)
            if (truthy(eval(*test, scope))) return exec(body, scope, out);
          return exec(n.else_body, scope, out);
        case NodeKind::For: return exec_for(n, scope, out);
        case NodeKind::Set: assign(*scope, n.targets, eval(*n.expr, scope)); return Flow::Normal;
        case NodeKind::SetAttr: {
          const Value* target = scope->find(n.targets[0]);
          if (!target || !target->is_namespace()) fail("cannot assign attribute on non-namespace object");
          if (!n.targets[1].empty() && n.targets[1][0] == '_')
            fail("Chat templates cannot store underscore-prefixed attributes on a namespace");
          target->ns().attrs.set(n.targets[1], eval(*n.expr, scope));
          return Flow::Normal;
        }
        case NodeKind::SetBlock: {
          std::string text;
          exec(n.body, child_scope(scope), text);
          scope->vars[n.targets[0]] = Value(text);
          return Flow::Normal;
        }
        case NodeKind::Macro: define_macro(n, scope); return Flow::Normal;
        case NodeKind::Break: return Flow::Break;
        case NodeKind::Continue: return Flow::Continue;
        case NodeKind::Generation: {
          const size_t begin = out.size();
          const Flow flow = exec(n.body, scope, out);
          if (&out == &result_.text) result_.generation_spans.emplace_back(begin, out.size());
          return flow;
        }
        case NodeKind::Body: return exec(n.body, scope, out);
      }
    } catch (const Failure& f) {
      error(n.line, f.message);
    }
    return Flow::Normal;
  }

  Flow exec_for(const Node& n, const ScopePtr& scope, std::string& out) {
    std::vector<Value> items = iterate(eval(*n.expr, scope));
    if (n.filter) {
      std::vector<Value> kept;
      for (const Value& item : items) {
        auto s = child_scope(scope);
        assign(*s, n.targets, item);
        if (truthy(eval(*n.filter, s))) kept.push_back(item);
      }
      items = std::move(kept);
    }
    // The else block is outside this loop: a break there belongs to an enclosing loop.
    if (items.empty()) return exec(n.else_body, child_scope(scope), out);
    const int64_t count = items.size();
    for (int64_t i = 0; i < count; ++i) {
      auto s = child_scope(scope);
      assign(*s, n.targets, items[i]);
      DictData loop;
      loop.set("index", Value(i + 1));
      loop.set("index0", Value(i));
      loop.set("revindex", Value(count - i));
      loop.set("revindex0", Value(count - i - 1));
      loop.set("first", Value(i == 0));
      loop.set("last", Value(i == count - 1));
      loop.set("length", Value(count));
      loop.set("depth", Value(1));
      loop.set("depth0", Value(0));
      if (i > 0) loop.set("previtem", items[i - 1]);
      if (i + 1 < count) loop.set("nextitem", items[i + 1]);
      loop.set("cycle", make_function("loop.cycle", [i](Args& a) {
        if (a.positional.empty()) fail("no items for cycling given");
        return a.positional[i % a.positional.size()];
      }));
      s->vars["loop"] = make_dict(std::move(loop));
      if (exec(n.body, s, out) == Flow::Break) break;
    }
    return Flow::Normal;
  }

  void define_macro(const Node& n, const ScopePtr& scope) {
    std::weak_ptr<Scope> closure = scope;
    const Node* macro = &n;
    scope->vars[n.text] = make_function(n.text, [this, macro, closure](Args& a) {
      ScopePtr parent = closure.lock();
      if (!parent) fail("macro '" + macro->text + "' was called after its scope ended");
      if (a.positional.size() > macro->params.size())
        fail("macro '" + macro->text + "' takes not more than " + std::to_string(macro->params.size()) +
             " argument(s)");
      auto s = child_scope(parent);
      for (const auto& [k, v] : a.keyword)
        if (std::find(macro->params.begin(), macro->params.end(), k) == macro->params.end())
          fail("macro '" + macro->text + "' takes no keyword argument '" + k + "'");
      for (size_t i = 0; i < macro->params.size(); ++i) {
        Value v = arg(a, i, macro->params[i].c_str());
        if (v.undefined() && macro->defaults[i]) v = eval(*macro->defaults[i], s);
        if (v.undefined()) v = undefined("parameter '" + macro->params[i] + "' was not provided");
        s->vars[macro->params[i]] = v;
      }
      std::string text;
      exec(macro->body, s, text);
      return Value(text);
    });
  }

  Args eval_args(const Expr& e, const ScopePtr& scope) {
    Args a;
    for (size_t i = 1; i < e.args.size(); ++i) a.positional.push_back(eval(*e.args[i], scope));
    for (const auto& [k, v] : e.kwargs) a.keyword.emplace_back(k, eval(*v, scope));
    return a;
  }

  Value eval(const Expr& e, const ScopePtr& scope) {
    try {
      return eval_inner(e, scope);
    } catch (const Failure& f) {
      error(e.line, f.message);
    }
  }

  Value eval_inner(const Expr& e, const ScopePtr& scope) {
    switch (e.kind) {
      case ExprKind::Literal: return e.literal;
      case ExprKind::Name: {
        const Value* v = scope->find(e.name);
        return v ? *v : undefined("'" + e.name + "' is undefined");
      }
      case ExprKind::List:
      case ExprKind::Tuple: {
        std::vector<Value> items;
        for (const ExprPtr& x : e.args) items.push_back(eval(*x, scope));
        return make_list(std::move(items), e.kind == ExprKind::Tuple);
      }
      case ExprKind::Dict: {
        DictData d;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          const Value key = eval(*e.args[i], scope);
          if (!key.is_string()) fail("dict literal keys other than strings are not supported");
          d.set(key.str(), eval(*e.args[i + 1], scope));
        }
        return make_dict(std::move(d));
      }
      case ExprKind::Attr: return get_attr(eval(*e.args[0], scope), e.name);
      case ExprKind::Item: return get_item(eval(*e.args[0], scope), eval(*e.args[1], scope));
      case ExprKind::Slice: {
        const Value target = eval(*e.args[0], scope);
        Value bounds[3];
        for (int i = 0; i < 3; ++i)
          if (e.args[i + 1]) bounds[i] = eval(*e.args[i + 1], scope);
        if (target.undefined()) fail_undefined(target);
        if (target.is_string()) {
          const std::u32string u = decode(target.str());
          std::u32string out;
          for (int64_t i : slice_indices(u.size(), bounds[0], bounds[1], bounds[2])) out += u[i];
          return Value(encode(out));
        }
        if (target.is_list()) {
          std::vector<Value> out;
          const auto& items = target.list().items;
          for (int64_t i : slice_indices(items.size(), bounds[0], bounds[1], bounds[2])) out.push_back(items[i]);
          return make_list(std::move(out), target.list().tuple);
        }
        fail("'" + type_name(target) + "' object is not subscriptable");
      }
      case ExprKind::Call: {
        const Value callee = eval(*e.args[0], scope);
        Args a = eval_args(e, scope);
        if (callee.undefined()) fail_undefined(callee);
        if (!callee.is_function()) fail("'" + type_name(callee) + "' object is not callable");
        return callee.function().call(a);
      }
      case ExprKind::Filter: {
        const Value subject = eval(*e.args[0], scope);
        Args a = eval_args(e, scope);
        return filter(e.name, subject, a);
      }
      case ExprKind::Test: {
        const Value subject = eval(*e.args[0], scope);
        Args a = eval_args(e, scope);
        return Value(test_value(e.name, subject, a) != e.negated);
      }
      case ExprKind::Not: return Value(!truthy(eval(*e.args[0], scope)));
      case ExprKind::Neg:
      case ExprKind::Pos: {
        const Value v = eval(*e.args[0], scope);
        if (v.undefined()) fail_undefined(v);
        if (!v.is_number())
          fail("bad operand type for unary " + std::string(e.kind == ExprKind::Neg ? "-" : "+") + ": '" + type_name(v) +
               "'");
        if (e.kind == ExprKind::Pos) return v.is_bool() ? Value(v.integer()) : v;
        return v.is_float() ? Value(-v.number()) : Value(-v.integer());
      }
      case ExprKind::Binary: return binary(e.name, eval(*e.args[0], scope), eval(*e.args[1], scope));
      case ExprKind::Concat: {
        std::string out;
        for (const ExprPtr& x : e.args) out += py_str(eval(*x, scope));
        return Value(out);
      }
      case ExprKind::Compare: {
        Value left = eval(*e.args[0], scope);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.args[i + 1], scope);
          const std::string& op = e.ops[i];
          bool ok;
          if (op == "==") ok = equal(left, right);
          else if (op == "!=") ok = !equal(left, right);
          else if (op == "in") ok = contains(right, left);
          else if (op == "not in") ok = !contains(right, left);
          else {
            const int c = compare(left, right, op);
            ok = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
          }
          if (!ok) return Value(false);
          left = std::move(right);
        }
        return Value(true);
      }
      case ExprKind::And: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? eval(*e.args[1], scope) : a;
      }
      case ExprKind::Or: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? a : eval(*e.args[1], scope);
      }
      case ExprKind::Cond:
        if (truthy(eval(*e.args[0], scope))) return eval(*e.args[1], scope);
        if (e.args[2]) return eval(*e.args[2], scope);
        return undefined("the inline if-expression on line " + std::to_string(e.line) +
                         " evaluated to false and no else section was defined.");
    }
    fail("unknown expression");
  }

  // select / reject / selectattr / rejectattr.
  Value select(const Value& seq, const Args& a, bool by_attribute, bool keep_when) {
    size_t next = 0;
    Value attribute;
    if (by_attribute) attribute = arg(a, next++, "attribute");
    const Value test = next < a.positional.size() ? a.positional[next++] : Value();
    Args test_args;
    test_args.positional.assign(a.positional.begin() + std::min(next, a.positional.size()), a.positional.end());
    std::vector<Value> out;
    for (const Value& item : iterate(seq)) {
      const Value subject = by_attribute ? get_path(item, attribute) : item;
      const bool passed =
          test.undefined() ? truthy(subject) : test_value(str_arg(test, "test name"), subject, test_args);
      if (passed == keep_when) out.push_back(item);
    }
    return make_list(std::move(out));
  }

  Value filter(const std::string& name, const Value& v, Args& a) {
    const std::string what = "filter '" + name + "'";
    if (name == "trim") {
      check_args(a, what, {"chars"});
      return Value(strip(py_str(v), arg(a, 0, "chars"), true, true));
    }
    if (name == "tojson") {
      check_args(a, what, {"ensure_ascii", "indent", "separators", "sort_keys"});
      JsonStyle style;
      style.ensure_ascii = truthy(arg(a, 0, "ensure_ascii", Value(false)));
      const Value indent = arg(a, 1, "indent", Value(None{}));
      if (indent.is_string()) style.indent = indent.str();
      else if (indent.is_int()) style.indent = std::string(std::max<int64_t>(0, indent.integer()), ' ');
      else if (!indent.none()) fail("tojson indent must be an int or a string");
      if (style.indent) style.item_separator = ",";
      const Value separators = arg(a, 2, "separators", Value(None{}));
      if (!separators.none()) {
        const std::vector<Value> parts = iterate(separators);
        if (parts.size() != 2) fail("tojson separators must be a pair of strings");
        style.item_separator = str_arg(parts[0], "separator");
        style.key_separator = str_arg(parts[1], "separator");
      }
      style.sort_keys = truthy(arg(a, 3, "sort_keys", Value(false)));
      std::string out;
      json_dump(out, v, style, 0);
      return Value(out);
    }
    if (name == "length" || name == "count") return Value(length(v));
    if (name == "default" || name == "d") {
      check_args(a, what, {"default_value", "boolean"});
      const bool boolean = truthy(arg(a, 1, "boolean", Value(false)));
      return v.undefined() || (boolean && !truthy(v)) ? arg(a, 0, "default_value", Value("")) : v;
    }
    if (name == "first") {
      const std::vector<Value> items = iterate(v);
      return items.empty() ? undefined("No first item, sequence was empty.") : items.front();
    }
    if (name == "last") {
      const std::vector<Value> items = iterate(v);
      return items.empty() ? undefined("No last item, sequence was empty.") : items.back();
    }
    if (name == "join") {
      check_args(a, what, {"d", "attribute"});
      const std::string sep = py_str(arg(a, 0, "d", Value("")));
      const Value attribute = arg(a, 1, "attribute", Value(None{}));
      std::string out;
      bool first = true;
      for (const Value& item : iterate(v)) {
        out += (first ? "" : sep) + py_str(attribute.none() ? item : get_path(item, attribute));
        first = false;
      }
      return Value(out);
    }
    if (name == "upper") return Value(map_case(py_str(v), upper_char));
    if (name == "lower") return Value(map_case(py_str(v), lower_char));
    if (name == "capitalize") return Value(capitalize(py_str(v)));
    if (name == "title") return Value(jinja_title(py_str(v)));
    if (name == "replace") {
      check_args(a, what, {"old", "new", "count"});
      const Value count = arg(a, 2, "count", Value(None{}));
      return Value(replace(py_str(v), py_str(arg(a, 0, "old")), py_str(arg(a, 1, "new")),
                           count.none() ? -1 : int_arg(count, "count")));
    }
    if (name == "list") return make_list(iterate(v));
    if (name == "string") return Value(py_str(v));
    if (name == "safe") return v.is_string() ? v : Value(py_str(v));
    if (name == "escape" || name == "e") return Value(html_escape(py_str(v)));
    if (name == "int") {
      check_args(a, what, {"default", "base"});
      const Value fallback = arg(a, 0, "default", Value(0));
      if (v.is_bool() || v.is_int()) return Value(v.integer());
      if (v.is_float()) return std::isfinite(v.number()) ? Value(static_cast<int64_t>(v.number())) : fallback;
      if (v.is_string()) {
        if (auto i = parse_int(v.str(), static_cast<int>(int_arg(arg(a, 1, "base", Value(10)), "base"))))
          return Value(*i);
        if (auto f = parse_float(v.str()); f && std::isfinite(*f)) return Value(static_cast<int64_t>(*f));
      }
      return fallback;
    }
    if (name == "float") {
      check_args(a, what, {"default"});
      if (v.is_number()) return Value(v.number());
      if (v.is_string())
        if (auto f = parse_float(v.str())) return Value(*f);
      return arg(a, 0, "default", Value(0.0));
    }
    if (name == "items") {
      if (v.undefined()) return make_list({});
      if (!v.is_dict()) fail("Can only get item pairs from a mapping.");
      std::vector<Value> out;
      for (const auto& [k, item] : v.dict().items) out.push_back(make_list({Value(k), item}, true));
      return make_list(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr") return select(v, a, true, name == "selectattr");
    if (name == "select" || name == "reject") return select(v, a, false, name == "select");
    if (name == "map") {
      std::vector<Value> out;
      const Value attribute = arg(a, SIZE_MAX, "attribute");
      if (!attribute.undefined()) {
        const Value fallback = arg(a, SIZE_MAX, "default");
        for (const Value& item : iterate(v)) {
          Value x = get_path(item, attribute);
          out.push_back(x.undefined() && !fallback.undefined() ? fallback : x);
        }
        return make_list(std::move(out));
      }
      if (a.positional.empty()) fail("map requires a filter argument");
      const std::string filter_name = str_arg(a.positional[0], "filter name");
      Args rest;
      rest.positional.assign(a.positional.begin() + 1, a.positional.end());
      rest.keyword = a.keyword;
      for (const Value& item : iterate(v)) out.push_back(filter(filter_name, item, rest));
      return make_list(std::move(out));
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string u = decode(v.str());
        std::reverse(u.begin(), u.end());
        return Value(encode(u));
      }
      std::vector<Value> items = iterate(v);
      std::reverse(items.begin(), items.end());
      return make_list(std::move(items));
    }
    if (name == "sort" || name == "unique" || name == "min" || name == "max") {
      const bool is_sort = name == "sort";
      if (is_sort) check_args(a, what, {"reverse", "case_sensitive", "attribute"});
      else check_args(a, what, {"case_sensitive", "attribute"});
      const bool reverse = is_sort && truthy(arg(a, 0, "reverse", Value(false)));
      const bool case_sensitive = truthy(arg(a, is_sort ? 1 : 0, "case_sensitive", Value(false)));
      const Value attribute = arg(a, is_sort ? 2 : 1, "attribute", Value(None{}));
      auto key = [&](const Value& item) {
        return sort_key(attribute.none() ? item : get_path(item, attribute), case_sensitive);
      };
      std::vector<Value> items = iterate(v);
      if (name == "unique") {
        std::vector<Value> out, seen;
        for (const Value& item : items) {
          const Value k = key(item);
          if (std::none_of(seen.begin(), seen.end(), [&](const Value& s) { return equal(s, k); })) {
            seen.push_back(k);
            out.push_back(item);
          }
        }
        return make_list(std::move(out));
      }
      if (!is_sort) {
        if (items.empty()) return undefined("No aggregated item, sequence was empty.");
        size_t best = 0;
        for (size_t i = 1; i < items.size(); ++i) {
          const int c = compare(key(items[i]), key(items[best]), name == "min" ? "<" : ">");
          if (name == "min" ? c < 0 : c > 0) best = i;
        }
        return items[best];
      }
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) {
        return reverse ? compare(key(y), key(x), "<") < 0 : compare(key(x), key(y), "<") < 0;
      });
      return make_list(std::move(items));
    }
    if (name == "sum") {
      check_args(a, what, {"attribute", "start"});
      const Value attribute = arg(a, 0, "attribute", Value(None{}));
      Value total = arg(a, 1, "start", Value(0));
      for (const Value& item : iterate(v))
        total = binary("+", total, attribute.none() ? item : get_path(item, attribute));
      return total;
    }
    if (name == "abs") {
      if (v.is_float()) return Value(std::fabs(v.number()));
      if (v.is_int() || v.is_bool()) return Value(std::abs(v.integer()));
      fail("bad operand type for abs(): '" + type_name(v) + "'");
    }
    if (name == "round") {
      check_args(a, what, {"precision", "method"});
      const int64_t precision = int_arg(arg(a, 0, "precision", Value(0)), "precision");
      const std::string method = py_str(arg(a, 1, "method", Value("common")));
      if (!v.is_number()) fail("round of " + type_name(v) + " is not supported");
      if (method == "common" && !v.is_float()) return Value(v.integer());
      const double scale = std::pow(10.0, static_cast<double>(precision));
      const double x = v.number() * scale;
      if (method == "common") return Value(std::nearbyint(x) / scale);
      if (method == "ceil") return Value(std::ceil(x) / scale);
      if (method == "floor") return Value(std::floor(x) / scale);
      fail("method must be common, ceil or floor");
    }
    if (name == "wordcount") {
      int64_t words = 0;
      bool in_word = false;
      for (char32_t c : decode(py_str(v))) {
        const bool word_char = is_alpha(c) || (c >= '0' && c <= '9') || c == '_';
        if (word_char && !in_word) ++words;
        in_word = word_char;
      }
      return Value(words);
    }
    if (name == "indent") {
      check_args(a, what, {"width", "first", "blank"});
      const Value width = arg(a, 0, "width", Value(4));
      const std::string indention =
          width.is_string() ? width.str() : std::string(std::max<int64_t>(0, int_arg(width, "width")), ' ');
      const bool first = truthy(arg(a, 1, "first", Value(false)));
      const bool blank = truthy(arg(a, 2, "blank", Value(false)));
      Args no_args;
      const Value split_lines = string_method(py_str(v) + "\n", "splitlines").function().call(no_args);
      std::vector<std::string> lines;
      for (const Value& line : split_lines.list().items) lines.push_back(line.str());
      std::string rv;
      if (blank) {
        for (size_t i = 0; i < lines.size(); ++i) rv += (i ? "\n" + indention : "") + lines[i];
      } else {
        rv = lines.empty() ? "" : lines[0];
        for (size_t i = 1; i < lines.size(); ++i) rv += "\n" + (lines[i].empty() ? "" : indention) + lines[i];
      }
      return Value(first ? indention + rv : rv);
    }
    if (name == "attr") return get_attr(v, str_arg(arg(a, 0, "name"), "attribute name"));
    fail("filter '" + name + "' is not supported");
  }

  const std::string& name_;
  ChatRendering& result_;
};

}  // namespace
}  // namespace jinja

ChatTemplate::ChatTemplate(const std::string& source, std::string name) : name_(std::move(name)) {
  root_ = jinja::Parser(jinja::Lexer(source, name_).run(), name_).parse_template();
}


ChatRendering ChatTemplate::render_tracked(const nlohmann::ordered_json& context) const {
  ChatRendering result;
  jinja::Renderer(name_, result).render(*root_, context);
  return result;
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  return render_tracked(context).text;
}

ChatRendering ChatTemplate::apply(const ChatRequest& request) const {
  using ojson = nlohmann::ordered_json;
  BRIGADE_CHECK(request.messages.is_array(), name_, ": messages must be a JSON array");
  BRIGADE_CHECK(request.variables.is_object(), name_, ": template variables must be a JSON object");
  ojson messages = ojson::array();
  for (const ojson& m : request.messages) {
    BRIGADE_CHECK(m.is_object(), name_, ": each message must be a JSON object, got ", m.dump());
    ojson message = ojson::object();
    for (auto it = m.begin(); it != m.end(); ++it)
      if (!it.value().is_null()) message[it.key()] = it.value();
    // transformers' _alias_reasoning_fields: {"thinking": r, **message, "reasoning_content": r}.
    const ojson* reasoning = nullptr;
    for (const char* key : {"reasoning_content", "thinking", "reasoning"})
      if (!reasoning && message.contains(key)) reasoning = &message[key];
    if (reasoning) {
      const ojson r = *reasoning;
      ojson aliased = ojson::object();
      aliased["thinking"] = r;
      for (auto it = message.begin(); it != message.end(); ++it) aliased[it.key()] = it.value();
      aliased["reasoning_content"] = r;
      message = std::move(aliased);
    }
    messages.push_back(std::move(message));
  }
  ojson context = request.variables;
  context["messages"] = std::move(messages);
  context["tools"] = request.tools;
  context["documents"] = request.documents;
  context["add_generation_prompt"] = request.add_generation_prompt;
  return render_tracked(context);
}

}  // namespace brigade::data
