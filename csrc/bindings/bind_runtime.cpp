// Bindings of kv_arena.h, assemble.h, router.h and sampling.h: conversion, GIL release and nothing else.
// Arrays come in without copies (a wrong dtype is a TypeError naming the argument, never a silent cast) and
// go out as views whose owner is kept alive; C++ errors (std::invalid_argument and friends) reach Python as
// ValueError / IndexError with their message through pybind11's translation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "loop/assemble.h"
#include "bindings/bind_registry.h"
#include "memory/kv_arena.h"
#include "loop/labels.h"
#include "loop/router.h"
#include "loop/sampling.h"

namespace py = pybind11;

namespace {

// --- arrays in -------------------------------------------------------------------------------------------

std::string type_name(py::handle obj) { return py::str(py::type::handle_of(obj).attr("__name__")); }

// `obj` as an ndarray of exactly `dtype`, C-contiguous; TypeError / ValueError naming `name` otherwise.
py::array require_array(py::handle obj, const std::string& name, const py::dtype& dtype) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(name + " must be a numpy " + std::string(py::str(dtype)) + " array, got " +
                         type_name(obj));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().equal(dtype)) {
    throw py::type_error(name + " must be " + std::string(py::str(dtype)) + ", got " +
                         std::string(py::str(arr.dtype())));
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(name + " must be C-contiguous (np.ascontiguousarray makes it so)");
  }
  return arr;
}

std::vector<int64_t> shape_of(const py::array& arr) {
  return std::vector<int64_t>(arr.shape(), arr.shape() + arr.ndim());
}

// A float32 array in, zero-copy: `holder` keeps it alive while C++ reads it (GIL released or not).
vle::FloatArrayRef float_array(py::handle obj, const std::string& name, py::object& holder) {
  const py::array arr = require_array(obj, name, py::dtype::of<float>());
  holder = arr;
  return {static_cast<const float*>(arr.data()), shape_of(arr)};
}

// Logits of one row, `[V]` float32.
vle::FloatArrayRef logits_vector(py::handle obj, py::object& holder) {
  vle::FloatArrayRef l = float_array(obj, "logits", holder);
  if (l.shape.size() != 1 || l.shape[0] == 0) {
    throw py::value_error("logits must be a non-empty 1-D [V] array, got shape " +
                          vle::format_shape(l.shape));
  }
  return l;
}

// Token ids: a 1-D int64 ndarray (zero-copy) or a Python sequence of ints (converted).
struct Int64Ids {
  py::object owner;              // a numpy input, kept alive while C++ reads it
  std::vector<int64_t> storage;  // a converted Python sequence
  const int64_t* data = nullptr;
  int64_t size = 0;
  std::vector<int64_t> vector() const { return std::vector<int64_t>(data, data + size); }

  Int64Ids() = default;
  // `data` may point into `storage`: a move keeps that buffer, a copy would not.
  Int64Ids(const Int64Ids&) = delete;
  Int64Ids(Int64Ids&&) = default;
};

Int64Ids int64_ids(py::handle obj, const std::string& name) {
  Int64Ids ids;
  if (py::isinstance<py::array>(obj)) {
    const py::array arr = require_array(obj, name, py::dtype::of<int64_t>());
    if (arr.ndim() != 1) {
      throw py::value_error(name + " must be 1-D, got shape " + vle::format_shape(shape_of(arr)));
    }
    ids.owner = arr;
    ids.data = static_cast<const int64_t*>(arr.data());
    ids.size = static_cast<int64_t>(arr.size());
    return ids;
  }
  try {
    ids.storage = obj.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error(name + " must be an int64 array or a sequence of ints, got " + type_name(obj));
  }
  ids.data = ids.storage.data();
  ids.size = static_cast<int64_t>(ids.storage.size());
  return ids;
}

// --- arrays out --------------------------------------------------------------------------------------------

// Moves a result buffer into a numpy array without copying it.
template <typename T>
py::array_t<T> owned_array(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
  auto* heap = new std::vector<T>(std::move(values));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(std::move(shape), heap->data(), owner);
}

// A read-only view of a shared buffer (a query table, a link's states); the view holds a reference.
py::array shared_view(const std::shared_ptr<const std::vector<float>>& buffer, int64_t rows, int64_t cols) {
  auto* holder = new std::shared_ptr<const std::vector<float>>(buffer);
  py::capsule owner(holder,
                    [](void* p) { delete static_cast<std::shared_ptr<const std::vector<float>>*>(p); });
  py::array view(py::dtype::of<float>(), std::vector<py::ssize_t>{rows, cols}, {}, buffer->data(), owner);
  view.attr("setflags")(py::arg("write") = false);
  return view;
}

py::dtype kv_numpy_dtype(vle::KVDType dtype) { return py::dtype(vle::kv_dtype_name(dtype)); }

// `[rows, kv_heads, head_dim]` view into the arena at `data`, owned by the arena's Python object.
py::array arena_view(const py::object& self, const vle::KVArena& arena, const void* data, int64_t rows,
                     bool writable) {
  const std::vector<py::ssize_t> shape{rows, arena.kv_heads(), arena.head_dim()};
  py::array view(kv_numpy_dtype(arena.dtype()), shape, {}, data, self);
  if (!writable) view.attr("setflags")(py::arg("write") = false);
  return view;
}

std::vector<vle::KVRows> kv_blocks(const py::sequence& blocks, const char* name, const py::dtype& dtype,
                                   std::vector<py::array>& holders) {
  std::vector<vle::KVRows> rows;
  for (size_t i = 0; i < blocks.size(); ++i) {
    holders.push_back(require_array(blocks[i], std::string(name) + "[" + std::to_string(i) + "]", dtype));
    rows.push_back({holders.back().data(), shape_of(holders.back())});
  }
  return rows;
}

py::object optional_str(const std::string& s) { return s.empty() ? py::object(py::none()) : py::str(s); }

// --- the bindings --------------------------------------------------------------------------------------

void bind_kv_arena(py::module_& m) {
  py::class_<vle::KVArena>(
      m, "KVArena", "Sequence-major [capacity, kv_heads, head_dim] K and V arenas per layer (docs/architecture.md §4).")
      .def(py::init([](int64_t num_layers, int64_t capacity, int64_t kv_heads, int64_t head_dim,
                       const std::string& dtype) {
             return std::make_unique<vle::KVArena>(num_layers, capacity, kv_heads, head_dim,
                                                   vle::parse_kv_dtype(dtype));
           }),
           py::arg("num_layers"), py::arg("capacity"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("dtype") = vle::kv_dtype_name(vle::KVDType::kFloat32))
      .def("length", &vle::KVArena::length)
      .def("capacity", &vle::KVArena::capacity)
      .def("num_layers", &vle::KVArena::num_layers)
      .def("kv_heads", &vle::KVArena::kv_heads)
      .def("head_dim", &vle::KVArena::head_dim)
      .def("dtype", [](const vle::KVArena& a) { return vle::kv_dtype_name(a.dtype()); })
      .def("row_bytes", &vle::KVArena::row_bytes, "Bytes of one sequence row (kv_heads * head_dim elements).")
      .def(
          "past_key",
          [](const py::object& self, int64_t layer) {
            const auto& a = self.cast<const vle::KVArena&>();
            return arena_view(self, a, a.key_row(layer, 0), a.length(), false);
          },
          py::arg("layer"), "Read-only view of layer's K rows [0:length].")
      .def(
          "past_value",
          [](const py::object& self, int64_t layer) {
            const auto& a = self.cast<const vle::KVArena&>();
            return arena_view(self, a, a.value_row(layer, 0), a.length(), false);
          },
          py::arg("layer"), "Read-only view of layer's V rows [0:length].")
      .def(
          "new_rows_key",
          [](const py::object& self, int64_t layer, int64_t n) {
            auto& a = self.cast<vle::KVArena&>();
            a.check_room(n);
            return arena_view(self, a, a.key_row(layer, a.length()), n, true);
          },
          py::arg("layer"), py::arg("n"),
          "Writable view of layer's K rows [length:length+n]; commit(n) after writing them.")
      .def(
          "new_rows_value",
          [](const py::object& self, int64_t layer, int64_t n) {
            auto& a = self.cast<vle::KVArena&>();
            a.check_room(n);
            return arena_view(self, a, a.value_row(layer, a.length()), n, true);
          },
          py::arg("layer"), py::arg("n"),
          "Writable view of layer's V rows [length:length+n]; commit(n) after writing them.")
      .def("commit", &vle::KVArena::commit, py::arg("n"))
      .def(
          "append",
          [](vle::KVArena& a, const py::sequence& keys, const py::sequence& values) {
            const py::dtype dtype = kv_numpy_dtype(a.dtype());
            std::vector<py::array> holders;
            const auto k = kv_blocks(keys, "keys", dtype, holders);
            const auto v = kv_blocks(values, "values", dtype, holders);
            py::gil_scoped_release release;
            a.append(k, v);
          },
          py::arg("keys"), py::arg("values"),
          "Copies one [n, kv_heads, head_dim] block per layer in and commits.")
      .def("rollback", &vle::KVArena::rollback, py::arg("to_length"))
      .def("reset", &vle::KVArena::reset)
      .def(
          "key_data_ptr",
          [](vle::KVArena& a, int64_t layer) { return reinterpret_cast<uintptr_t>(a.key_row(layer, 0)); },
          py::arg("layer"), "Address of layer's K arena (row 0), for binding it to an engine.")
      .def(
          "value_data_ptr",
          [](vle::KVArena& a, int64_t layer) { return reinterpret_cast<uintptr_t>(a.value_row(layer, 0)); },
          py::arg("layer"), "Address of layer's V arena (row 0), for binding it to an engine.")
      .def("__repr__", [](const vle::KVArena& a) {
        return "KVArena(num_layers=" + std::to_string(a.num_layers()) +
               ", capacity=" + std::to_string(a.capacity()) + ", kv_heads=" + std::to_string(a.kv_heads()) +
               ", head_dim=" + std::to_string(a.head_dim()) +
               ", dtype='" + vle::kv_dtype_name(a.dtype()) + "', length=" + std::to_string(a.length()) + ")";
      });
}

void bind_assemble(py::module_& m) {
  m.def(
      "assemble_embeddings",
      [](py::handle token_table, py::handle ids, py::handle image_rows, int64_t image_token_id,
         py::handle region_rows, int64_t region_token_id, const py::dict& query_tables,
         const std::unordered_map<int64_t, std::string>& routing_kinds,
         const std::unordered_set<int64_t>& placeholder_ids) {
        std::vector<py::object> holders(3 + query_tables.size());
        vle::AssemblyInputs in;
        in.token_table = float_array(token_table, "token_table", holders[0]);
        const Int64Ids id_array = int64_ids(ids, "ids");
        in.ids = id_array.data;
        in.num_ids = id_array.size;
        if (!image_rows.is_none()) in.image_rows = float_array(image_rows, "image_rows", holders[1]);
        in.image_token_id = image_token_id;
        if (!region_rows.is_none()) in.region_rows = float_array(region_rows, "region_rows", holders[2]);
        in.region_token_id = region_token_id;
        size_t h = 3;
        for (const auto& [kind, table] : query_tables) {
          const auto name = py::cast<std::string>(kind);
          in.query_tables[name] = float_array(table, "query_tables['" + name + "']", holders[h++]);
        }
        in.routing_kinds = routing_kinds;
        in.placeholder_ids = placeholder_ids;
        // The output is allocated here, uninitialised, and filled in C++ without the GIL.
        vle::require_matrix(in.token_table, "token_table");
        py::array_t<float> out({static_cast<py::ssize_t>(in.num_ids), in.token_table.shape[1]});
        float* out_data = out.mutable_data();
        {
          py::gil_scoped_release release;
          vle::assemble_embeddings(in, out_data);
        }
        return out;
      },
      py::arg("token_table"), py::arg("ids"), py::arg("image_rows"), py::arg("image_token_id"),
      py::arg("region_rows"), py::arg("region_token_id"), py::arg("query_tables"), py::arg("routing_kinds"),
      py::arg("placeholder_ids"),
      "inputs_embeds [S, H]: token rows, image rows in the <im_patch> slots, region rows in the <region> "
      "slots, query rows after each routing token followed by its N placeholders (docs/architecture.md §3 step 4).");
}

void bind_router(py::module_& m) {
  py::class_<vle::Route>(m, "Route",
                         "One super-link routing token: kind, decoder, N placeholder ids, [N, H] queries.")
      .def(py::init([](int64_t token_id, std::string kind, std::string decoder,
                       std::vector<int64_t> placeholder_ids, py::handle query_table) {
             py::object holder;
             const vle::FloatArrayRef table = float_array(query_table, "query_table", holder);
             return vle::Route(token_id, std::move(kind), std::move(decoder), std::move(placeholder_ids),
                               table);
           }),
           py::arg("token_id"), py::arg("kind"), py::arg("decoder"), py::arg("placeholder_ids"),
           py::arg("query_table"))
      .def_readonly("token_id", &vle::Route::token_id)
      .def_readonly("kind", &vle::Route::kind)
      .def_readonly("decoder", &vle::Route::decoder)
      .def_readonly("placeholder_ids", &vle::Route::placeholder_ids)
      .def_readonly("num_queries", &vle::Route::num_queries)
      .def_readonly("hidden", &vle::Route::hidden)
      .def_property_readonly("query_table", [](const vle::Route& r) {
        return shared_view(r.query_table, r.num_queries, r.hidden);
      });

  py::class_<vle::StepPlan>(m, "StepPlan",
                            "What the decode loop does with one sampled token (see SuperLinkRouter.plan).")
      .def_readonly("token", &vle::StepPlan::token)
      .def_readonly("ids", &vle::StepPlan::ids, "ids this step adds to the sequence")
      .def_readonly("feed", &vle::StepPlan::feed, "run `ids` through the LLM")
      .def_readonly("rows", &vle::StepPlan::rows, "rows fed: 0, 1 or 1 + N")
      .def_readonly("position", &vle::StepPlan::position, "position of the first fed row (the arena length)")
      .def_property_readonly(
          "stop_reason", [](const vle::StepPlan& p) { return optional_str(vle::stop_reason_name(p.stop)); })
      .def_property_readonly("kind", [](const vle::StepPlan& p) { return optional_str(p.kind); })
      .def_readonly("num_queries", &vle::StepPlan::num_queries)
      .def_property_readonly("query_table",
                             [](const vle::StepPlan& p) -> py::object {
                               if (!p.query_table) return py::none();
                               return shared_view(p.query_table, p.num_queries, p.hidden);
                             })
      .def_readonly("output_rows", &vle::StepPlan::output_rows)
      .def("__repr__", [](const vle::StepPlan& p) {
        const std::string stop = vle::stop_reason_name(p.stop);
        return "StepPlan(token=" + std::to_string(p.token) +
               ", kind=" + (p.kind.empty() ? "None" : "'" + p.kind + "'") +
               ", feed=" + (p.feed ? "True" : "False") +
               ", rows=" + std::to_string(p.rows) + ", position=" + std::to_string(p.position) +
               ", stop_reason=" + (stop.empty() ? "None" : "'" + stop + "'") + ")";
      });

  py::class_<vle::LinkGroup>(m, "LinkGroup",
                             "One super-link group: kind, routing-token position, [N, H] states.")
      .def_readonly("kind", &vle::LinkGroup::kind)
      .def_readonly("decoder", &vle::LinkGroup::decoder)
      .def_readonly("position", &vle::LinkGroup::position)
      .def_readonly("num_queries", &vle::LinkGroup::num_queries)
      .def_property_readonly(
          "states", [](const vle::LinkGroup& g) { return shared_view(g.states, g.num_queries, g.hidden); })
      .def("__repr__", [](const vle::LinkGroup& g) {
        return "LinkGroup(kind='" + g.kind + "', position=" + std::to_string(g.position) + ")";
      });

  py::class_<vle::DecoderGroup>(m, "DecoderGroup",
                                "A link as a decoder call sees it; `index` is its slot (class k).")
      .def_readonly("index", &vle::DecoderGroup::index)
      .def_readonly("link", &vle::DecoderGroup::link)
      .def_property_readonly("kind", [](const vle::DecoderGroup& g) { return g.link.kind; })
      .def_property_readonly("position", [](const vle::DecoderGroup& g) { return g.link.position; })
      .def_property_readonly("states",
                             [](const vle::DecoderGroup& g) {
                               return shared_view(g.link.states, g.link.num_queries, g.link.hidden);
                             })
      .def("__repr__", [](const vle::DecoderGroup& g) {
        return "DecoderGroup(index=" + std::to_string(g.index) + ", kind='" + g.link.kind +
               "', position=" + std::to_string(g.link.position) + ")";
      });

  py::class_<vle::SuperLinkRouter>(
      m, "SuperLinkRouter", "Plans decode steps around routing tokens, keeps their links (docs/architecture.md §3 step 6).")
      .def(py::init<std::vector<vle::Route>, int64_t>(), py::arg("routes"), py::arg("eos_id"))
      .def_property_readonly("routes", &vle::SuperLinkRouter::routes)
      .def_property_readonly("eos_id", &vle::SuperLinkRouter::eos_id)
      .def_property_readonly("hidden_size", &vle::SuperLinkRouter::hidden_size)
      .def(
          "kind_of",
          [](const vle::SuperLinkRouter& r, int64_t token) -> py::object {
            const int i = r.route_of(token);
            return i < 0 ? py::object(py::none()) : py::str(r.routes()[static_cast<size_t>(i)].kind);
          },
          py::arg("token"), "Routing kind of a token id, or None.")
      .def("plan", &vle::SuperLinkRouter::plan, py::arg("token"), py::arg("past_length"), py::arg("capacity"),
           py::arg("last"))
      .def(
          "plan",
          [](const vle::SuperLinkRouter& r, int64_t token, const vle::KVArena& arena, bool last) {
            return r.plan(token, arena.length(), arena.capacity(), last);
          },
          py::arg("token"), py::arg("arena"), py::arg("last"))
      .def(
          "step_embeddings",
          [](const vle::SuperLinkRouter& r, const vle::StepPlan& plan, py::handle token_table) {
            py::object holder;
            const vle::FloatArrayRef table = float_array(token_table, "token_table", holder);
            std::vector<float> out = r.step_embeddings(plan, table);
            return owned_array(std::move(out), {plan.rows, r.hidden_size()});
          },
          py::arg("plan"), py::arg("token_table"))
      .def(
          "observe",
          [](vle::SuperLinkRouter& r, const vle::StepPlan& plan, py::handle hidden) {
            py::object holder;
            return r.observe(plan, float_array(hidden, "hidden", holder));
          },
          py::arg("plan"), py::arg("hidden"))
      .def(
          "prefill_query_rows",
          [](const vle::SuperLinkRouter& r, py::handle ids, int64_t start) {
            const Int64Ids id_array = int64_ids(ids, "ids");
            std::vector<int64_t> rows = r.prefill_query_rows(id_array.data, id_array.size, start);
            const auto n = static_cast<py::ssize_t>(rows.size());
            return owned_array(std::move(rows), {n});
          },
          py::arg("ids"), py::arg("start"))
      .def(
          "observe_prefill",
          [](vle::SuperLinkRouter& r, py::handle ids, int64_t start, py::handle hidden) {
            const Int64Ids id_array = int64_ids(ids, "ids");
            py::object holder;
            r.observe_prefill(id_array.data, id_array.size, start, float_array(hidden, "hidden", holder));
          },
          py::arg("ids"), py::arg("start"), py::arg("hidden"))
      .def("links", &vle::SuperLinkRouter::links)
      .def(
          "groups_for",
          [](const vle::SuperLinkRouter& r, const std::string& decoder) {
            py::dict out;
            for (auto& [role, groups] : r.groups_for(decoder)) out[py::str(role)] = py::cast(groups);
            return out;
          },
          py::arg("decoder"))
      .def("reset", &vle::SuperLinkRouter::reset);

  m.def("label_groups", &vle::label_groups, py::arg("answer_text"), py::arg("question_text"),
        py::arg("instruction") = py::none(),
        "(kind, label) of every routing token in the answer, by the label rule of loop/labels.h.");
}

void bind_sampling(py::module_& m) {
  const vle::SamplingParams defaults;
  py::class_<vle::SamplingParams>(m, "SamplingParams")
      .def(py::init([](bool do_sample, double temperature, int64_t top_k, double top_p,
                       double repetition_penalty) {
             return vle::SamplingParams{do_sample, temperature, top_k, top_p, repetition_penalty};
           }),
           // The defaults are the C++ struct's (everything off: greedy), not chosen here.
           py::kw_only(), py::arg("do_sample") = defaults.do_sample,
           py::arg("temperature") = defaults.temperature, py::arg("top_k") = defaults.top_k,
           py::arg("top_p") = defaults.top_p, py::arg("repetition_penalty") = defaults.repetition_penalty)
      .def_readwrite("do_sample", &vle::SamplingParams::do_sample)
      .def_readwrite("temperature", &vle::SamplingParams::temperature)
      .def_readwrite("top_k", &vle::SamplingParams::top_k)
      .def_readwrite("top_p", &vle::SamplingParams::top_p)
      .def_readwrite("repetition_penalty", &vle::SamplingParams::repetition_penalty)
      .def("__repr__", [](const vle::SamplingParams& p) {
        return "SamplingParams(do_sample=" + std::string(p.do_sample ? "True" : "False") +
               ", temperature=" + std::string(py::str(py::float_(p.temperature))) +
               ", top_k=" + std::to_string(p.top_k) +
               ", top_p=" + std::string(py::str(py::float_(p.top_p))) +
               ", repetition_penalty=" + std::string(py::str(py::float_(p.repetition_penalty))) + ")";
      });

  py::class_<vle::Sampler>(m, "Sampler", "Seeded next-token sampler; the same seed gives the same draws.")
      .def(py::init<uint64_t>(), py::arg("seed"))
      .def("reseed", &vle::Sampler::reseed, py::arg("seed"))
      .def("uniform", &vle::Sampler::uniform)
      .def(
          "sample",
          [](vle::Sampler& s, py::handle logits, const vle::SamplingParams& params,
             py::handle penalized_ids) {
            py::object holder;
            const vle::FloatArrayRef l = logits_vector(logits, holder);
            const std::vector<int64_t> ids = int64_ids(penalized_ids, "penalized_ids").vector();
            py::gil_scoped_release release;
            return s.sample(l.data, l.shape[0], params, ids);
          },
          py::arg("logits"), py::arg("params"), py::arg("penalized_ids"));

  m.def(
      "sampling_probabilities",
      [](py::handle logits, const vle::SamplingParams& params, py::handle penalized_ids) {
        py::object holder;
        const vle::FloatArrayRef l = logits_vector(logits, holder);
        const std::vector<int64_t> ids = int64_ids(penalized_ids, "penalized_ids").vector();
        std::vector<double> probs;
        {
          py::gil_scoped_release release;
          probs = vle::sampling_probabilities(l.data, l.shape[0], params, ids);
        }
        return owned_array(std::move(probs), {l.shape[0]});
      },
      py::arg("logits"), py::arg("params"), py::arg("penalized_ids"),
      "The float64 [V] distribution Sampler.sample draws from (one-hot at the argmax when not sampling).");

  m.def(
      "apply_repetition_penalty",
      [](py::handle logits, py::handle penalized_ids, double penalty) {
        py::object holder;
        const vle::FloatArrayRef l = logits_vector(logits, holder);
        const std::vector<int64_t> ids = int64_ids(penalized_ids, "penalized_ids").vector();
        std::vector<float> out(l.data, l.data + l.shape[0]);
        vle::apply_repetition_penalty(out.data(), l.shape[0], ids, penalty);
        return owned_array(std::move(out), {l.shape[0]});
      },
      py::arg("logits"), py::arg("penalized_ids"), py::arg("penalty"),
      "A penalized copy of logits [V] (HF repetition penalty, float32 math).");
}

void bind_runtime(py::module_& m) {
  bind_kv_arena(m);
  bind_assemble(m);
  bind_router(m);
  bind_sampling(m);
}

const vle::BindRegistration registration(&bind_runtime);

}  // namespace
