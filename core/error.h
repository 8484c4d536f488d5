// brigade's one error-macro family (STYLE.md habit 4).
//
//   BRIGADE_CHECK(cond, msg...)   bad input: throws brigade::Error with file:line,
//                                 the failed expression and a message.
//   BRIGADE_FAIL(msg...)          the same without a condition.
//   BRIGADE_ASSERT(cond, msg...)  a broken invariant: a bug in brigade, not the user.
//
// Library code never calls exit(): errors travel up to launch/, which prints one
// line and returns a non-zero exit code.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace brigade {

class Error : public std::runtime_error {
 public:
  Error(std::string message, std::string where)
      : std::runtime_error(message), message_(std::move(message)), where_(std::move(where)) {}
  // The user-facing message without the source location.
  const std::string& message() const { return message_; }
  // "file.cpp:123 (expression)" of the check that fired.
  const std::string& where() const { return where_; }

 private:
  std::string message_;
  std::string where_;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& msg,
                              bool invariant);
}  // namespace detail

}  // namespace brigade

#define BRIGADE_FAIL(...) \
  ::brigade::detail::throw_error(__FILE__, __LINE__, "", ::brigade::detail::concat(__VA_ARGS__), false)

#define BRIGADE_CHECK(cond, ...)                                                                 \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::brigade::detail::throw_error(__FILE__, __LINE__, #cond,                                  \
                                     ::brigade::detail::concat(__VA_ARGS__), false);             \
  } while (0)

#define BRIGADE_ASSERT(cond, ...)                                                                \
  do {                                                                                           \
    if (!(cond)) [[unlikely]]                                                                    \
      ::brigade::detail::throw_error(__FILE__, __LINE__, #cond,                                  \
                                     ::brigade::detail::concat(__VA_ARGS__), true);              \
  } while (0)
