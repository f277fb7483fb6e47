// Reading JSON strictly and writing the pieces of error messages about it.
//
// The artifact's JSON files are read with two rules on top of the JSON grammar: a key may appear only once
// in an object (a repeated key is almost always a merge mistake, and most readers keep one of the two
// silently), and NaN / Infinity are refused as the non-JSON they are. Objects keep the file's key order,
// so the first fault reported is the first one in the file.
//
// Messages quote values the way the Python SDK's messages always have, so that both read the same:
// strings as Python's repr ('x'), numbers as Python prints them (17.5, 1e-05, 64.0), key paths as
// `graphs.llm.inputs[0].name` with keys that are not identifiers in brackets (`tokens["<unk>"]`).
#pragma once

#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace vle {

using OrderedJson = nlohmann::ordered_json;

// Parses `text` strictly; an ArtifactError "<source>: [<key path>: ]invalid JSON ..." naming the line and
// column of a syntax error, the key repeated in one object, or the NaN / Infinity met.
OrderedJson parse_json_strictly(const std::string& text, const std::string& source);

// `path.key`, `path["odd key"]` or `path[3]` (`key` alone at the top level).
std::string key_child(const std::string& path, const std::string& key);
std::string key_child(const std::string& path, size_t index);

// A double as Python prints it: the shortest text that reads back the same, `.0` on integral values,
// exponent form below 1e-4 and from 1e16 on.
std::string number_text(double value);
// What a JSON value is, for "expected X, got Y": `17.5 (a number)`, `"64" (a string)`, `an array`, `null`.
std::string describe(const OrderedJson& value);
// `['a', 'b', ... 3 more]`: at most `limit` names quoted.
std::string short_list(const std::vector<std::string>& names, size_t limit = 6);
// `a, b, c`.
std::string joined(const std::vector<std::string>& names, const char* separator = ", ");

}  // namespace vle
