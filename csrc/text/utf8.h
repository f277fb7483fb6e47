// Text with Python's rules, shared by the tokenizer, the labels, the templates and every message that quotes
// a value: strict UTF-8 decoding (Python's rules: no overlong forms, no surrogates, nothing
// past U+10FFFF), Python's `str.isspace()` set and `str.lstrip()` / `str.rstrip()` on code points, and the
// conversion between code-point offsets (Python's string indices) and byte offsets.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace vle::utf8 {

// The length in bytes of the valid UTF-8 character that starts at `pos` (1 to 4), storing its code point
// in `*cp` when given; 0 when the bytes there do not form one (or `pos` is at the end).
size_t char_length(std::string_view s, size_t pos, char32_t* cp = nullptr);

// The byte offset of the first byte that does not start a valid character, or nothing when all of `s` is
// valid UTF-8.
std::optional<size_t> first_invalid(std::string_view s);

// Python's `str.isspace()`: the code points `str.strip()` removes.
bool is_python_space(char32_t cp);

// `s.lstrip()` / `s.rstrip()` of Python on a valid UTF-8 string.
std::string_view lstrip(std::string_view s);
std::string_view rstrip(std::string_view s);

// The byte offset of every code point of a valid UTF-8 string, plus its size at the end: entry k is where
// Python's index k lies (size = number of code points + 1).
std::vector<size_t> char_offsets(std::string_view s);

// The number of code points in the first `byte_offset` bytes of a valid UTF-8 string.
size_t count_chars(std::string_view s, size_t byte_offset);

// `s` as Python's repr() writes a str, for messages that quote a value: the quote Python picks, escapes for
// backslash, the quote, \n \r \t, the code points str.isprintable() rejects (\xNN, \uNNNN), and each byte
// that is not valid UTF-8 as the surrogate escape \udcNN.
std::string python_repr(std::string_view s);

}  // namespace vle::utf8
