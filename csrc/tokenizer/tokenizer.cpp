// The slow `LlamaTokenizer`, step by step, on SentencePiece's C++ library.
//
// What SentencePiece does here is the innermost step only: turning a piece of plain text into pieces
// (spaces become "\u2581"; the dummy prefix is the model's own setting, which export bakes into
// tokenizer.model as the slow tokenizer loads it). Everything around it is the slow tokenizer's own logic,
// reproduced literally:
//   - encoding: with legacy=False a "\u2581" goes in front of the text and every "\u2581" the user wrote becomes
//     a space; the text is split at added tokens (leftmost, longest first), each added token strips the
//     Python whitespace of its neighbours by its lstrip/rstrip flags; a text piece that starts with a space
//     is encoded behind an "<unk>" whose pieces are then dropped; a lone leading "\u2581" before a special
//     token is dropped; pieces map to ids by their string, added tokens first.
//   - protected spans: inside text the user wrote only the input markers act as tokens; other special-token
//     spellings there are matched (so the search moves past them) but stay text.
//   - decoding: the runs between added tokens past the base vocabulary are joined into text as
//     `convert_tokens_to_string` does, with SentencePiece's decode rules (byte pieces collected and decoded
//     as UTF-8, a byte that starts no valid character becoming U+FFFD; control pieces empty; "<unk>" as
//     " \u2047 "; a string that is not a piece verbatim), and the parts are joined with spaces.
#include "tokenizer/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "artifact/contract.h"
#include "text/utf8.h"
#include "visionllm_edge/errors.h"

namespace vle {

namespace {

using json = nlohmann::json;

const std::string kUnderline = "\xE2\x96\x81";  // U+2581, SentencePiece's word-start mark
const std::string kUnkSurface = " \xE2\x81\x87 ";  // " \u2047 ", what SentencePiece shows for "<unk>"

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  while (true) {
    const size_t at = s.find(from, pos);
    if (at == std::string_view::npos) break;
    out.append(s.substr(pos, at - pos));
    out.append(to);
    pos = at + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

struct AddedToken {
  std::string content;
  int64_t id = 0;
  bool lstrip = false, rstrip = false, special = false;
};

struct Piece {
  std::string text;
  int64_t id = 0;
};

// A text span or an added token, as the slow tokenizer's split gives them.
struct Part {
  std::string text;
  bool token = false;
};

// A span in the bytes of one text, clamped to it.
struct ByteSpan {
  size_t start = 0, end = 0;
};

bool is_input_marker(const std::string& token) {
  const std::vector<std::string>& markers = contract::input_markers();
  return std::find(markers.begin(), markers.end(), token) != markers.end();
}

// The settings tokenizer.json's layout records (the layout the converter writes, which is
// transformers' LlamaConverter's).
struct FileSettings {
  bool legacy = false;
  bool add_prefix_space = true;
  bool add_dummy_prefix = false;
};

[[noreturn]] void fail(const std::filesystem::path& file, const std::string& what) {
  throw TokenizerError(file.string() + ": " + what);
}

const json* member(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string str_member(const json* obj, const char* key) {
  if (!obj) return {};
  const json* v = member(*obj, key);
  return v && v->is_string() ? v->get<std::string>() : std::string();
}

FileSettings read_settings(const json& data, const std::filesystem::path& file) {
  const json* model = member(data, "model");
  const json* byte_fallback = model ? member(*model, "byte_fallback") : nullptr;
  if (!model || str_member(model, "type") != "BPE" || !byte_fallback || !byte_fallback->is_boolean() ||
      !byte_fallback->get<bool>()) {
    fail(file, "expected a BPE model with byte_fallback (a converted Llama tokenizer)");
  }
  const json* normalizer = member(data, "normalizer");
  const json* pre = member(data, "pre_tokenizer");
  const json* decoder = member(data, "decoder");
  const json* decoder_steps = decoder ? member(*decoder, "decoders") : nullptr;
  const bool strips = decoder_steps && decoder_steps->is_array() && !decoder_steps->empty() &&
                      str_member(&decoder_steps->back(), "type") == "Strip";
  FileSettings out;
  if (pre) {
    const json* split = member(*pre, "split");
    const bool splits = !split || !split->is_boolean() || split->get<bool>();
    const std::string scheme = str_member(pre, "prepend_scheme");
    if (normalizer || str_member(pre, "type") != "Metaspace" || str_member(pre, "replacement") != kUnderline ||
        splits || (scheme != "first" && scheme != "never")) {
      fail(file, "unsupported pre_tokenizer " + pre->dump() +
                     " (with normalizer " + (normalizer ? normalizer->dump() : "null") + ")");
    }
    out.legacy = false;
    out.add_prefix_space = scheme == "first";
    return out;
  }
  const json* steps = normalizer ? member(*normalizer, "normalizers") : nullptr;
  std::vector<std::string> kinds;
  if (steps && steps->is_array()) {
    for (const json& step : *steps) kinds.push_back(str_member(&step, "type"));
  }
  const bool plain = kinds == std::vector<std::string>{"Replace"};
  const bool prepend = kinds == std::vector<std::string>{"Prepend", "Replace"};
  if ((!plain && !prepend) || (prepend && str_member(&(*steps)[0], "prepend") != kUnderline)) {
    fail(file, "unsupported normalizer " + (normalizer ? normalizer->dump() : std::string("null")) +
                   " without a pre_tokenizer");
  }
  const json& replace = steps->back();
  const json* pattern = member(replace, "pattern");
  if (!pattern || str_member(pattern, "String") != " " || str_member(&replace, "content") != kUnderline) {
    fail(file, "unsupported Replace step " + replace.dump());
  }
  out.legacy = true;
  out.add_prefix_space = strips;
  out.add_dummy_prefix = prepend;
  return out;
}

std::vector<AddedToken> read_added_tokens(const json& data, const std::filesystem::path& file) {
  const json* list = member(data, "added_tokens");
  if (!list || !list->is_array()) fail(file, "no added_tokens list");
  std::vector<AddedToken> out;
  for (size_t i = 0; i < list->size(); ++i) {
    const json& item = (*list)[i];
    const std::string at = "added_tokens[" + std::to_string(i) + "]";
    const json* id = member(item, "id");
    const json* content = member(item, "content");
    if (!id || !id->is_number_integer() || id->get<int64_t>() < 0) fail(file, at + ".id: expected an id >= 0");
    if (!content || !content->is_string() || content->get<std::string>().empty()) {
      fail(file, at + ".content: expected a non-empty string");
    }
    AddedToken t;
    t.content = content->get<std::string>();
    t.id = id->get<int64_t>();
    for (auto [key, flag] : {std::pair<const char*, bool*>{"lstrip", &t.lstrip},
                             {"rstrip", &t.rstrip}, {"special", &t.special}}) {
      const json* v = member(item, key);
      if (v && !v->is_boolean()) fail(file, at + "." + key + ": expected true or false");
      *flag = v && v->get<bool>();
    }
    if (utf8::first_invalid(t.content)) fail(file, at + ".content is not valid UTF-8");
    out.push_back(std::move(t));
  }
  return out;
}

json read_json(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) fail(file, "cannot be read");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(file, std::string("not valid JSON (") + e.what() + ")");
  }
}

void require_file(const std::filesystem::path& file, const char* what) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(file, ec)) fail(file, std::string("no such file (") + what + ")");
}

// Python's `bytes(run).decode("utf-8")` applied character by character: each byte that does not start a
// valid character becomes one U+FFFD (SentencePiece's rule for byte pieces).
void append_bytes(std::string& out, const std::string& bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    const size_t n = utf8::char_length(bytes, pos);
    if (n == 0) {
      out += "\xEF\xBF\xBD";
      ++pos;
    } else {
      out.append(bytes, pos, n);
      pos += n;
    }
  }
}

}  // namespace

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  bool legacy = false, add_prefix_space = true, add_dummy_prefix = false;

  std::vector<AddedToken> added;
  std::unordered_map<std::string, size_t> added_index;  // content -> index in `added`
  std::vector<size_t> by_length;                        // indices of `added`, longest content first
  std::unordered_set<std::string> all_special;          // the slow tokenizer's all_special_tokens
  std::unordered_set<std::string> decode_apart;         // added tokens kept out of the text runs in decode

  std::string unk_piece;
  size_t unk_length = 0;  // how many pieces SentencePiece makes of the text "<unk>"
  int64_t base_size = 0, vocab_size = 0, bos = 0, eos = 0;
  std::vector<std::string> id_to_piece;               // the whole vocabulary
  std::unordered_map<std::string, int> base_vocab;    // SentencePiece piece -> id

  // --- encoding ----------------------------------------------------------------------------------------

  const AddedToken* find_added(const std::string& s) const {
    auto it = added_index.find(s);
    return it == added_index.end() ? nullptr : &added[it->second];
  }

  // `sp_model.encode(text, out_type=str)`, each piece with its id.
  std::vector<Piece> sp_encode(const std::string& text) const {
    std::vector<Piece> out;
    if (text.empty()) return out;
    std::vector<std::string> pieces;
    const auto status = sp.Encode(text, &pieces);
    if (!status.ok()) throw TokenizerError("SentencePiece could not encode a text: " + status.ToString());
    out.reserve(pieces.size());
    for (auto& p : pieces) {
      const int id = sp.PieceToId(p);
      out.push_back({std::move(p), id});
    }
    return out;
  }

  // `LlamaTokenizer._tokenize`: with legacy=False a text that starts with "\u2581" or a space is encoded
  // behind "<unk>", whose pieces are then dropped, so that the mark counts as a word start.
  std::vector<Piece> text_pieces(const std::string& text) const {
    if (legacy || !(starts_with(text, kUnderline) || starts_with(text, " "))) return sp_encode(text);
    std::vector<Piece> pieces = sp_encode(unk_piece + text);
    if (pieces.size() >= unk_length) pieces.erase(pieces.begin(), pieces.begin() + unk_length);
    return pieces;
  }

  // The leftmost added token at or after `from` (the longest one there), as (position, index in added).
  bool next_token(const std::string& text, size_t from, size_t* at, size_t* which) const {
    for (size_t pos = from; pos < text.size(); ++pos) {
      for (size_t i : by_length) {
        const std::string& t = added[i].content;
        if (text.compare(pos, t.size(), t) == 0) {
          *at = pos;
          *which = i;
          return true;
        }
      }
    }
    return false;
  }

  // Splits at added tokens (skipping all but the input markers inside protected spans), then lets each
  // token strip its neighbours' whitespace, left to right; empty parts dropped.
  std::vector<Part> split(const std::string& text, const std::vector<ByteSpan>& spans) const {
    std::vector<Part> parts;
    size_t pos = 0, search = 0, at = 0, which = 0;
    while (next_token(text, search, &at, &which)) {
      const AddedToken& t = added[which];
      const size_t end = at + t.content.size();
      search = end;  // a skipped match still consumes its characters
      const bool inside = std::any_of(spans.begin(), spans.end(),
                                      [&](const ByteSpan& s) { return s.start <= at && end <= s.end; });
      if (inside && !is_input_marker(t.content)) continue;
      if (at > pos) parts.push_back({text.substr(pos, at - pos), false});
      parts.push_back({t.content, true});
      pos = end;
    }
    if (pos < text.size()) parts.push_back({text.substr(pos), false});
    for (size_t i = 0; i < parts.size(); ++i) {
      if (!parts[i].token) continue;
      const AddedToken& t = *find_added(parts[i].text);
      if (t.rstrip && i + 1 < parts.size() && !parts[i + 1].text.empty()) {
        parts[i + 1].text = std::string(utf8::lstrip(parts[i + 1].text));
      }
      if (t.lstrip && i > 0 && !parts[i - 1].text.empty()) {
        parts[i - 1].text = std::string(utf8::rstrip(parts[i - 1].text));
      }
    }
    parts.erase(std::remove_if(parts.begin(), parts.end(), [](const Part& p) { return p.text.empty(); }),
                parts.end());
    return parts;
  }

  std::vector<int64_t> encode(const std::string& original, std::vector<ByteSpan> spans, bool add_bos) const {
    std::vector<Piece> tokens;
    if (!original.empty()) {
      std::string text = original;
      if (!legacy) {
        // Every "\u2581" becomes a space (3 bytes to 1: the spans move with the text).
        std::string replaced;
        std::vector<size_t> moved(original.size() + 1);
        size_t pos = 0;
        while (pos < original.size()) {
          if (original.compare(pos, kUnderline.size(), kUnderline) == 0) {
            for (size_t k = 0; k < kUnderline.size(); ++k) moved[pos + k] = replaced.size();
            replaced += ' ';
            pos += kUnderline.size();
          } else {
            moved[pos] = replaced.size();
            replaced += original[pos++];
          }
        }
        moved[original.size()] = replaced.size();
        for (ByteSpan& s : spans) s = {moved[s.start], moved[s.end]};
        text = std::move(replaced);
        if (add_prefix_space) {
          text = kUnderline + text;
          for (ByteSpan& s : spans) s = {s.start + kUnderline.size(), s.end + kUnderline.size()};
        }
      }
      for (const Part& part : split(text, spans)) {
        if (part.token) {
          tokens.push_back({part.text, find_added(part.text)->id});
        } else {
          for (Piece& p : text_pieces(part.text)) tokens.push_back(std::move(p));
        }
      }
      // `LlamaTokenizer.tokenize` (legacy=False) drops the prefix "\u2581" when a special token follows.
      if (!legacy && tokens.size() > 1 && tokens[0].text == kUnderline && all_special.count(tokens[1].text)) {
        tokens.erase(tokens.begin());
      }
    }
    std::vector<int64_t> ids;
    ids.reserve(tokens.size() + 1);
    if (add_bos) ids.push_back(bos);
    // The slow tokenizer maps pieces to ids by their string, added tokens first.
    for (const Piece& p : tokens) {
      const AddedToken* t = find_added(p.text);
      ids.push_back(t ? t->id : p.id);
    }
    return ids;
  }

  // --- decoding ----------------------------------------------------------------------------------------

  int piece_id(const std::string& piece) const {
    auto it = base_vocab.find(piece);
    return it == base_vocab.end() ? -1 : it->second;
  }

  // `SentencePieceProcessor.decode(pieces)`.
  std::string sp_decode(const std::vector<std::string>& pieces) const {
    std::string text, pending;
    bool is_bos_ws = true, bos_ws_seen = false;
    for (const std::string& original : pieces) {
      const int id = piece_id(original);
      if (id >= 0 && sp.IsByte(id)) {
        pending += static_cast<char>(std::stoi(original.substr(3, 2), nullptr, 16));
        continue;
      }
      append_bytes(text, pending);
      pending.clear();
      if (bos_ws_seen || !text.empty()) is_bos_ws = false;
      bos_ws_seen = false;
      if (id >= 0 && sp.IsControl(id)) continue;
      if (id < 0 || original == unk_piece) {
        text += original == unk_piece ? kUnkSurface : original;
        continue;
      }
      std::string_view piece = original;
      if (is_bos_ws && add_dummy_prefix && starts_with(piece, kUnderline)) {
        piece.remove_prefix(kUnderline.size());
        bos_ws_seen = true;
      }
      text += replace_all(piece, kUnderline, " ");
    }
    append_bytes(text, pending);
    return text;
  }

  // `LlamaTokenizer.convert_tokens_to_string`.
  std::string tokens_to_string(std::vector<std::string> tokens) const {
    if (add_prefix_space && starts_with(tokens[0], kUnderline)) tokens[0].erase(0, kUnderline.size());
    std::vector<std::string> current;
    std::string out;
    bool prev_is_special = false;
    for (size_t i = 0; i < tokens.size(); ++i) {
      const std::string& token = tokens[i];
      if (all_special.count(token)) {
        if (!prev_is_special && i != 0 && legacy) out += ' ';
        out += sp_decode(current) + token;
        prev_is_special = true;
        current.clear();
      } else {
        if (prev_is_special && i == 1 && add_prefix_space && !starts_with(token, kUnderline)) out += ' ';
        current.push_back(token);
        prev_is_special = false;
      }
    }
    return out + sp_decode(current);
  }
};

Tokenizer::Tokenizer(const TokenizerFiles& files, const std::map<std::string, int64_t>& expected_ids)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  require_file(files.tokenizer_json, "the tokenizer's added tokens and settings, tokenizer.json");
  require_file(files.sentencepiece, "the tokenizer's SentencePiece model, tokenizer.model");
  const json data = read_json(files.tokenizer_json);
  const FileSettings settings = read_settings(data, files.tokenizer_json);
  for (auto [given, from_file, name] :
       {std::tuple<std::optional<bool>, bool, const char*>{files.legacy, settings.legacy, "legacy"},
        {files.add_prefix_space, settings.add_prefix_space, "add_prefix_space"}}) {
    if (given && *given != from_file) {
      fail(files.tokenizer_json, std::string("tokenizer mismatch: the manifest says ") + name + "=" +
                                     (*given ? "true" : "false") + ", the file's layout says " + name + "=" +
                                     (from_file ? "true" : "false"));
    }
  }
  m.legacy = settings.legacy;
  m.add_prefix_space = settings.add_prefix_space;

  const auto status = m.sp.Load(files.sentencepiece.string());
  if (!status.ok()) fail(files.sentencepiece, "not a SentencePiece model (" + status.ToString() + ")");
  m.base_size = m.sp.GetPieceSize();
  m.id_to_piece.reserve(static_cast<size_t>(m.base_size) + 32);
  for (int i = 0; i < m.base_size; ++i) {
    m.id_to_piece.push_back(m.sp.IdToPiece(i));
    m.base_vocab.emplace(m.id_to_piece.back(), i);
  }
  // The dummy prefix is the model's own setting; it shows in how a one-letter text is cut.
  const std::vector<Piece> probe = m.sp_encode("x");
  m.add_dummy_prefix = !probe.empty() && (starts_with(probe[0].text, kUnderline) || probe[0].text == "<0xE2>");
  if (m.add_dummy_prefix != settings.add_dummy_prefix) {
    fail(files.sentencepiece,
         std::string("tokenizer mismatch: the model ") + (m.add_dummy_prefix ? "adds" : "does not add") +
             " a dummy prefix, tokenizer.json (legacy=" + (settings.legacy ? "true" : "false") + ") needs it " +
             (settings.add_dummy_prefix ? "on" : "off") +
             " (export writes tokenizer.model with the slow tokenizer's setting baked in)");
  }

  // The added tokens: those inside the base vocabulary must be its pieces, the others follow it densely.
  m.added = read_added_tokens(data, files.tokenizer_json);
  std::vector<std::string> past_base;
  for (size_t i = 0; i < m.added.size(); ++i) {
    const AddedToken& t = m.added[i];
    if (!m.added_index.emplace(t.content, i).second) {
      fail(files.tokenizer_json, "added token '" + t.content + "' is listed twice");
    }
    if (t.id < m.base_size) {
      if (m.id_to_piece[static_cast<size_t>(t.id)] != t.content) {
        fail(files.tokenizer_json, "tokenizer mismatch: added token '" + t.content + "' has id " +
                                       std::to_string(t.id) + ", which is the piece '" +
                                       m.id_to_piece[static_cast<size_t>(t.id)] + "' in " +
                                       files.sentencepiece.string());
      }
    } else {
      const size_t slot = static_cast<size_t>(t.id - m.base_size);
      if (past_base.size() <= slot) past_base.resize(slot + 1);
      if (!past_base[slot].empty()) {
        fail(files.tokenizer_json, "added tokens '" + past_base[slot] + "' and '" + t.content +
                                       "' share the id " + std::to_string(t.id));
      }
      past_base[slot] = t.content;
    }
    if (t.special) m.all_special.insert(t.content);
  }
  for (size_t slot = 0; slot < past_base.size(); ++slot) {
    if (past_base[slot].empty()) {
      fail(files.tokenizer_json, "no added token has the id " + std::to_string(m.base_size + slot) +
                                     " (the added ids past the base vocabulary of " +
                                     std::to_string(m.base_size) + " must have no gaps)");
    }
    m.id_to_piece.push_back(past_base[slot]);
  }
  m.vocab_size = static_cast<int64_t>(m.id_to_piece.size());
  for (const AddedToken& t : m.added) {
    if (!t.special || t.id >= m.base_size) m.decode_apart.insert(t.content);
  }
  std::vector<std::string> missing;
  for (const std::string& t : contract::required_tokens()) {
    if (!m.added_index.count(t)) missing.push_back(t);
  }
  if (!missing.empty()) {
    std::string list;
    for (const auto& t : missing) list += (list.empty() ? "" : ", ") + t;
    fail(files.tokenizer_json, "the tokenizer lacks the special tokens " + list);
  }
  m.bos = m.find_added(contract::kBosToken)->id;
  m.eos = m.find_added(contract::kEosToken)->id;

  const json* model = member(data, "model");
  m.unk_piece = str_member(model, "unk_token");
  if (m.unk_piece.empty()) m.unk_piece = contract::kUnkToken;
  if (m.sp.unk_id() < 0 || m.sp.IdToPiece(m.sp.unk_id()) != m.unk_piece) {
    fail(files.tokenizer_json, "tokenizer mismatch: the unknown piece is '" + m.unk_piece + "' here and '" +
                                   (m.sp.unk_id() < 0 ? std::string("none") : m.sp.IdToPiece(m.sp.unk_id())) +
                                   "' in " + files.sentencepiece.string());
  }
  m.unk_length = m.sp_encode(m.unk_piece).size();

  // Longest first: at one position the longest added token wins (two of equal length cannot both match).
  m.by_length.resize(m.added.size());
  for (size_t i = 0; i < m.added.size(); ++i) m.by_length[i] = i;
  std::stable_sort(m.by_length.begin(), m.by_length.end(), [&](size_t a, size_t b) {
    return m.added[a].content.size() > m.added[b].content.size();
  });

  for (const auto& [token, id] : expected_ids) {
    const AddedToken* t = m.find_added(token);
    if (!t) {
      fail(files.tokenizer_json, "tokenizer mismatch: the manifest gives token '" + token + "' the id " +
                                     std::to_string(id) + ", the tokenizer has no such added token");
    }
    if (t->id != id) {
      fail(files.tokenizer_json, "tokenizer mismatch: token '" + token + "' has id " + std::to_string(id) +
                                     " in the manifest but " + std::to_string(t->id) + " in the tokenizer");
    }
  }
}

Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

namespace {

void require_utf8(const std::string& text, const char* what) {
  if (auto bad = utf8::first_invalid(text)) {
    std::ostringstream msg;
    msg << what << " is not valid UTF-8: byte " << *bad << " (0x" << std::hex
        << static_cast<int>(static_cast<unsigned char>(text[*bad])) << ") starts no character";
    throw InputError(msg.str());
  }
}

std::vector<ByteSpan> clamp(const std::vector<Span>& spans, size_t size) {
  std::vector<ByteSpan> out;
  out.reserve(spans.size());
  for (const Span& s : spans) out.push_back({std::min(s.start, size), std::min(s.end, size)});
  return out;
}

}  // namespace

std::vector<int64_t> Tokenizer::encode_text(const std::string& text, const std::vector<Span>& protected_spans,
                                            bool add_bos) const {
  require_utf8(text, "the text");
  return impl_->encode(text, clamp(protected_spans, text.size()), add_bos);
}

std::vector<int64_t> Tokenizer::tokenize_with_image(const std::string& prompt,
                                                    const std::vector<Span>& protected_spans) const {
  require_utf8(prompt, "the prompt");
  const Impl& m = *impl_;
  const std::string image(contract::kImageToken);
  const std::vector<ByteSpan> spans = clamp(protected_spans, prompt.size());
  // Python's `prompt.split("<image>")`, each chunk encoded with the protected spans it overlaps.
  std::vector<std::vector<int64_t>> chunks;
  size_t start = 0;
  while (true) {
    const size_t found = prompt.find(image, start);
    const size_t end = found == std::string::npos ? prompt.size() : found;
    const std::string part = prompt.substr(start, end - start);
    std::vector<ByteSpan> local;
    for (const ByteSpan& s : spans) {
      const size_t a = std::max(s.start, start), b = std::min(s.end, end);
      if (b > a) local.push_back({a - start, b - start});
    }
    chunks.push_back(part.empty() ? std::vector<int64_t>{m.bos} : m.encode(part, local, true));
    if (found == std::string::npos) break;
    start = found + image.size();
  }
  std::vector<int64_t> ids;
  size_t offset = 0;
  if (!chunks[0].empty() && chunks[0][0] == m.bos) {
    offset = 1;
    ids.push_back(m.bos);
  }
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (i > 0) ids.push_back(kImageSentinel);
    ids.insert(ids.end(), chunks[i].begin() + static_cast<std::ptrdiff_t>(std::min(offset, chunks[i].size())),
               chunks[i].end());
  }
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::vector<std::string> parts, run;
  for (int64_t id : ids) {
    if (id < 0 || id >= m.vocab_size) {
      throw InputError("token id " + std::to_string(id) + " is outside the vocabulary (size " +
                       std::to_string(m.vocab_size) + ")");
    }
    const std::string& token = m.id_to_piece[static_cast<size_t>(id)];
    if (skip_special_tokens && m.all_special.count(token)) continue;
    // `PreTrainedTokenizer._decode`: the added tokens past the base vocabulary (and the non-special ones)
    // stand apart, the runs between them become text, and the parts are joined with single spaces.
    if (m.decode_apart.count(token)) {
      if (!run.empty()) {
        std::string text = m.tokens_to_string(run);
        if (!text.empty()) parts.push_back(std::move(text));
        run.clear();
      }
      parts.push_back(token);
    } else {
      run.push_back(token);
    }
  }
  if (!run.empty()) parts.push_back(m.tokens_to_string(run));
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += ' ';
    out += parts[i];
  }
  return out;
}

int64_t Tokenizer::token_id(const std::string& token) const {
  const AddedToken* t = impl_->find_added(token);
  if (!t) throw TokenizerError("'" + token + "' is not a special token of this tokenizer");
  return t->id;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
int64_t Tokenizer::bos_id() const { return impl_->bos; }
int64_t Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::legacy() const { return impl_->legacy; }
bool Tokenizer::add_prefix_space() const { return impl_->add_prefix_space; }
bool Tokenizer::add_dummy_prefix() const { return impl_->add_dummy_prefix; }

}  // namespace vle
