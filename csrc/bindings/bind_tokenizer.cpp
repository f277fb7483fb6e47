// Bindings of tokenizer/tokenizer.h: the C++ tokenizer and the chat-template functions. Python speaks in
// character offsets (str indices), C++ in UTF-8 byte offsets; the conversion happens here and nowhere
// else. Spans are (start, end) pairs; offsets outside the text are clamped to it, which keeps Python's
// meaning of a span (a special token lies inside it or not). TokenizerError and InputError reach Python as
// ValueError with their message (bind_errors.cpp translates the core's exceptions).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bindings/bind_registry.h"
#include "tokenizer/tokenizer.h"
#include "text/utf8.h"

namespace py = pybind11;

namespace {

using CharSpans = std::vector<std::pair<int64_t, int64_t>>;

std::vector<vle::Span> to_byte_spans(const std::string& text, const CharSpans& spans) {
  std::vector<vle::Span> out;
  if (spans.empty()) return out;
  const std::vector<size_t> offsets = vle::utf8::char_offsets(text);
  const int64_t chars = static_cast<int64_t>(offsets.size()) - 1;
  const auto byte_at = [&](int64_t i) { return offsets[static_cast<size_t>(std::clamp<int64_t>(i, 0, chars))]; };
  out.reserve(spans.size());
  for (const auto& [start, end] : spans) out.push_back({byte_at(start), byte_at(end)});
  return out;
}

CharSpans to_char_spans(const std::string& text, const std::vector<vle::Span>& spans) {
  CharSpans out;
  out.reserve(spans.size());
  for (const vle::Span& s : spans) {
    out.emplace_back(static_cast<int64_t>(vle::utf8::count_chars(text, s.start)),
                     static_cast<int64_t>(vle::utf8::count_chars(text, s.end)));
  }
  return out;
}

void bind_tokenizer(py::module_& m) {
  py::class_<vle::Tokenizer>(m, "Tokenizer",
                             "The slow LlamaTokenizer's ids on SentencePiece's C++ library (tokenizer.model) "
                             "plus the added tokens of tokenizer.json. Spans are (start, end) in characters.")
      .def(py::init([](const std::string& tokenizer_json, const std::string& sentencepiece,
                       const std::map<std::string, int64_t>& expected_ids, std::optional<bool> legacy,
                       std::optional<bool> add_prefix_space) {
             vle::TokenizerFiles files{tokenizer_json, sentencepiece, legacy, add_prefix_space};
             py::gil_scoped_release release;
             return vle::Tokenizer(files, expected_ids);
           }),
           py::arg("tokenizer_json"), py::arg("sentencepiece"),
           py::arg("expected_ids") = std::map<std::string, int64_t>{}, py::arg("legacy") = py::none(),
           py::arg("add_prefix_space") = py::none())
      .def(
          "encode_text",
          [](const vle::Tokenizer& t, const std::string& text, const CharSpans& spans, bool add_bos) {
            const std::vector<vle::Span> bytes = to_byte_spans(text, spans);
            py::gil_scoped_release release;
            return t.encode_text(text, bytes, add_bos);
          },
          py::arg("text"), py::arg("protected_spans") = CharSpans{}, py::arg("add_bos") = true)
      .def(
          "tokenize_with_image",
          [](const vle::Tokenizer& t, const std::string& prompt, const CharSpans& spans) {
            const std::vector<vle::Span> bytes = to_byte_spans(prompt, spans);
            py::gil_scoped_release release;
            return t.tokenize_with_image(prompt, bytes);
          },
          py::arg("prompt"), py::arg("protected_spans") = CharSpans{})
      .def(
          "decode",
          [](const vle::Tokenizer& t, const std::vector<int64_t>& ids, bool skip_special_tokens) {
            std::string text;
            {
              py::gil_scoped_release release;
              text = t.decode(ids, skip_special_tokens);
            }
            return py::str(text);
          },
          py::arg("ids"), py::arg("skip_special_tokens") = false)
      .def("token_id", &vle::Tokenizer::token_id, py::arg("token"))
      .def_property_readonly("vocab_size", &vle::Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &vle::Tokenizer::bos_id)
      .def_property_readonly("eos_id", &vle::Tokenizer::eos_id)
      .def_property_readonly("legacy", &vle::Tokenizer::legacy)
      .def_property_readonly("add_prefix_space", &vle::Tokenizer::add_prefix_space)
      .def_property_readonly("add_dummy_prefix", &vle::Tokenizer::add_dummy_prefix);

  m.def(
      "build_conversation",
      [](const std::vector<std::pair<std::string, std::optional<std::string>>>& turns) {
        const vle::Conversation conv = vle::build_conversation(turns);
        return std::make_pair(py::str(conv.text), to_char_spans(conv.text, conv.user_spans));
      },
      py::arg("turns"),
      "The vicuna_v1 template: (text, [(start, end)] user spans in characters) of (user, answer|None) turns.");
  m.def("insert_placeholders", &vle::insert_placeholders, py::arg("answer"), py::arg("num_embs"),
        py::arg("num_embs_gen"));
}

const vle::BindRegistration registration(bind_tokenizer);

}  // namespace
