"""The C++ runtime glue (`_core`): KV arena, embedding assembly, super-link router, labels, sampler.

Each piece is checked against a NumPy (or plain Python) statement of the reference loop's semantics, and the
label rule against the reference's own `answer_labels` (that part needs torch and is skipped without it).
"""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
from visionllm_edge import _core, contract

# --- a tiny vocabulary with the contract's special tokens ---------------------------------------------------

H = 8
VOCAB = 64
EOS = 2
PATCH = 40
REGION = 41
# [DET]=42 ... [EDIT]=47
ROUTING_IDS = {token: 42 + i for i, token in enumerate(contract.ROUTING_TOKENS)}
KIND_OF_ID = {ROUTING_IDS[t]: k for t, k in contract.ROUTING_TOKENS.items()}
# [EMB]=30 ... [EMB8]=37
PLACEHOLDER_IDS = {token: 30 + i for i, token in enumerate(contract.ALL_PLACEHOLDERS)}
NUM_EMBS = 4
NUM_EMBS_GEN = 6  # 64 in the release; small here


def placeholders_of(kind: str) -> list[int]:
    """The ids a step feeds after a routing token, as the reference's `_placeholder_id` picks them."""
    if kind in contract.GENERATION_KINDS:
        return [PLACEHOLDER_IDS[contract.GENERATION_PLACEHOLDER]] * NUM_EMBS_GEN
    return [PLACEHOLDER_IDS[t] for t in contract.PERCEPTION_PLACEHOLDERS[:NUM_EMBS]]


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    token_table = rng.standard_normal((VOCAB, H)).astype(np.float32)
    query = {
        name: rng.standard_normal(
            (NUM_EMBS_GEN if name in contract.GENERATION_KINDS else NUM_EMBS, H)
        ).astype(np.float32)
        for name in set(contract.QUERY_TABLE.values())
    }
    by_kind = {kind: query[name] for kind, name in contract.QUERY_TABLE.items()}
    return token_table, by_kind


def make_router(by_kind) -> _core.SuperLinkRouter:
    routes = [
        _core.Route(
            ROUTING_IDS[token], kind, contract.DECODER_OF_KIND[kind], placeholders_of(kind), by_kind[kind]
        )
        for token, kind in contract.ROUTING_TOKENS.items()
    ]
    return _core.SuperLinkRouter(routes, EOS)


# --- KV arena -------------------------------------------------------------------------------------------


def test_arena_append_matches_concatenation_and_views_are_views():
    rng = np.random.default_rng(1)
    arena = _core.KVArena(num_layers=2, capacity=16, kv_heads=2, head_dim=3)
    assert (arena.length(), arena.capacity(), arena.dtype()) == (0, 16, "float32")
    want_k = [np.zeros((0, 2, 3), np.float32) for _ in range(2)]
    want_v = [np.zeros((0, 2, 3), np.float32) for _ in range(2)]
    for n in (5, 1, 4):
        keys = [rng.standard_normal((n, 2, 3)).astype(np.float32) for _ in range(2)]
        values = [rng.standard_normal((n, 2, 3)).astype(np.float32) for _ in range(2)]
        arena.append(keys, values)
        want_k = [np.concatenate([w, k]) for w, k in zip(want_k, keys)]
        want_v = [np.concatenate([w, v]) for w, v in zip(want_v, values)]
    assert arena.length() == 10
    for layer in range(2):
        past_k, past_v = arena.past_key(layer), arena.past_value(layer)
        assert past_k.shape == (10, 2, 3) and past_k.dtype == np.float32
        np.testing.assert_array_equal(past_k, want_k[layer])
        np.testing.assert_array_equal(past_v, want_v[layer])
        # Zero-copy: the view starts at the arena's own memory, and two views share it.
        assert past_k.__array_interface__["data"][0] == arena.key_data_ptr(layer)
        assert past_v.__array_interface__["data"][0] == arena.value_data_ptr(layer)
        assert np.shares_memory(past_k, arena.past_key(layer))
        assert not past_k.flags.writeable  # the past is read-only; new rows are written through new_rows_*
    assert arena.row_bytes() == 2 * 3 * 4


def test_arena_writes_in_place_through_new_row_views():
    arena = _core.KVArena(1, 8, 1, 2)
    arena.append([np.ones((3, 1, 2), np.float32)], [np.ones((3, 1, 2), np.float32)])
    new_k = arena.new_rows_key(0, 2)
    new_v = arena.new_rows_value(0, 2)
    assert new_k.shape == (2, 1, 2) and new_k.flags.writeable
    assert new_k.__array_interface__["data"][0] == arena.key_data_ptr(0) + 3 * arena.row_bytes()
    new_k[...] = 7.0  # what an engine does with an I/O-bound output
    new_v[...] = np.arange(4, dtype=np.float32).reshape(2, 1, 2)
    assert arena.length() == 3  # nothing is part of the past before commit
    arena.commit(2)
    np.testing.assert_array_equal(arena.past_key(0)[3:], np.full((2, 1, 2), 7.0, np.float32))
    np.testing.assert_array_equal(arena.past_value(0)[3:], np.arange(4, dtype=np.float32).reshape(2, 1, 2))


def test_arena_rollback_and_reset_reuse_rows():
    arena = _core.KVArena(1, 8, 1, 1)
    arena.append([np.arange(6, dtype=np.float32).reshape(6, 1, 1)], [np.zeros((6, 1, 1), np.float32)])
    arena.rollback(2)
    assert arena.length() == 2
    arena.append([np.full((1, 1, 1), 9, np.float32)], [np.zeros((1, 1, 1), np.float32)])
    np.testing.assert_array_equal(arena.past_key(0).ravel(), [0, 1, 9])
    with pytest.raises(ValueError, match=r"rollback: to_length must be in \[0, 3\].*got 4"):
        arena.rollback(4)
    arena.reset()
    assert arena.length() == 0 and arena.past_key(0).shape == (0, 1, 1)


def test_arena_overflow_names_capacity_length_and_rows_and_changes_nothing():
    arena = _core.KVArena(2, 8, 1, 2)
    block = [np.ones((6, 1, 2), np.float32)] * 2
    arena.append(block, block)
    too_many = [np.ones((3, 1, 2), np.float32)] * 2
    with pytest.raises(ValueError, match="capacity 8, length 6, cannot add 3 rows"):
        arena.append(too_many, too_many)
    with pytest.raises(ValueError, match="capacity 8, length 6, cannot add 3 rows"):
        arena.new_rows_key(1, 3)
    with pytest.raises(ValueError, match="capacity 8, length 6, cannot add 3 rows"):
        arena.commit(3)
    assert arena.length() == 6
    arena.commit(2)  # exactly full is fine
    assert arena.length() == 8


def test_arena_checks_dtypes_shapes_and_layers():
    arena = _core.KVArena(2, 8, 2, 4)
    good = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"keys\[1\] must be float32, got float64"):
        arena.append([good, good.astype(np.float64)], [good, good])
    with pytest.raises(ValueError, match=r"values\[0\] must be \[1, 2, 4\], got shape \(2, 2, 4\)"):
        arena.append([good, good], [np.zeros((2, 2, 4), np.float32), good])
    with pytest.raises(ValueError, match="one per layer"):
        arena.append([good], [good])
    with pytest.raises(ValueError, match="C-contiguous"):
        arena.append([good, np.zeros((1, 2, 8), np.float32)[:, :, ::2]], [good, good])
    with pytest.raises(IndexError, match="layer 2 is out of range for 2 layers"):
        arena.past_key(2)
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float16', got 'int8'"):
        _core.KVArena(1, 4, 1, 1, "int8")
    assert arena.length() == 0


def test_arena_float16_storage():
    arena = _core.KVArena(1, 4, 1, 2, dtype="float16")
    rows = np.array([[[0.5, -2.0]], [[1024.0, 3.25]]], np.float16)
    arena.append([rows], [rows])
    assert arena.past_key(0).dtype == np.float16 and arena.row_bytes() == 4
    np.testing.assert_array_equal(arena.past_value(0), rows)
    with pytest.raises(TypeError, match="float16"):
        arena.append([rows.astype(np.float32)], [rows.astype(np.float32)])


def test_arena_views_keep_the_arena_alive():
    arena = _core.KVArena(1, 4, 1, 2)
    arena.append([np.full((2, 1, 2), 3.0, np.float32)], [np.full((2, 1, 2), 4.0, np.float32)])
    view = arena.past_value(0)
    del arena
    gc.collect()
    np.testing.assert_array_equal(view, np.full((2, 1, 2), 4.0, np.float32))


# --- embedding assembly -------------------------------------------------------------------------------------


def embed_reference(token_table, ids, image_rows, region_rows, by_kind):
    """NumPy statement of the reference's `_embed` rule."""
    ids = np.asarray(ids)
    out = token_table[ids].copy()
    out[ids == PATCH] = image_rows
    if region_rows is not None:
        out[ids == REGION] = region_rows
    placeholder_set = set(PLACEHOLDER_IDS.values())
    for pos, tok in enumerate(ids.tolist()):
        kind = KIND_OF_ID.get(tok)
        if kind is None:
            continue
        n = by_kind[kind].shape[0]
        following = ids[pos + 1 : pos + 1 + n].tolist()
        if len(following) == n and all(i in placeholder_set for i in following):
            out[pos + 1 : pos + 1 + n] = by_kind[kind]
    return out


def assemble(token_table, ids, by_kind, image_rows=None, region_rows=None):
    return _core.assemble_embeddings(
        token_table,
        ids,
        image_rows,
        PATCH,
        region_rows,
        REGION,
        by_kind,
        KIND_OF_ID,
        set(PLACEHOLDER_IDS.values()),
    )


def conversation_ids() -> list[int]:
    det, gen, grd = (ROUTING_IDS[t] for t in ("[DET]", "[GEN]", "[GRD]"))
    return (
        [1, 5, 6]
        + [PATCH] * 6
        + [7, REGION, 8, REGION, 9]
        + [det, *placeholders_of("det"), 10]
        + [gen, *placeholders_of("gen")]
        + [grd, 11, 12]  # a routing token followed by text keeps its own rows
        + [det, *placeholders_of("det")[:2]]  # ... and so does one cut short by the end
    )


def test_assemble_matches_numpy_reference(tables):
    token_table, by_kind = tables
    rng = np.random.default_rng(2)
    ids = conversation_ids()
    image_rows = rng.standard_normal((6, H)).astype(np.float32)
    region_rows = rng.standard_normal((2, H)).astype(np.float32)
    got = assemble(token_table, np.asarray(ids, np.int64), by_kind, image_rows, region_rows)
    assert got.shape == (len(ids), H) and got.dtype == np.float32
    np.testing.assert_array_equal(got, embed_reference(token_table, ids, image_rows, region_rows, by_kind))
    # A list of ids is accepted too, and a decode step's ids reproduce step_embeddings.
    step = [ROUTING_IDS["[POSE]"], *placeholders_of("pose")]
    np.testing.assert_array_equal(
        assemble(token_table, step, by_kind), embed_reference(token_table, step, None, None, by_kind)
    )


def test_assemble_errors_name_argument_position_and_counts(tables):
    token_table, by_kind = tables
    image = np.zeros((2, H), np.float32)
    with pytest.raises(ValueError, match=rf"ids\[1\] = {VOCAB} is outside the token table's {VOCAB} rows"):
        assemble(token_table, [1, VOCAB, 2], by_kind)
    with pytest.raises(ValueError, match=r"ids\[0\] = -1"):
        assemble(token_table, [-1], by_kind)
    with pytest.raises(ValueError, match="3 <im_patch> slot\\(s\\) for 2 image_rows"):
        assemble(token_table, [PATCH] * 3, by_kind, image)
    with pytest.raises(ValueError, match="2 <im_patch> slot\\(s\\) but no image_rows"):
        assemble(token_table, [PATCH] * 2, by_kind)
    with pytest.raises(ValueError, match="1 <region> slot\\(s\\) for 2 region_rows"):
        assemble(token_table, [REGION], by_kind, None, image)
    with pytest.raises(ValueError, match=r"image_rows must be \[n, 8\], got shape \(2, 4\)"):
        assemble(token_table, [PATCH] * 2, by_kind, np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="token_table must be float32, got float64"):
        assemble(token_table.astype(np.float64), [1], by_kind)
    with pytest.raises(TypeError, match="image_rows must be float32, got float16"):
        assemble(token_table, [PATCH] * 2, by_kind, image.astype(np.float16))
    with pytest.raises(TypeError, match="ids must be int64, got int32"):
        assemble(token_table, np.array([1], np.int32), by_kind)
    with pytest.raises(ValueError, match="token_table must be C-contiguous"):
        assemble(np.asfortranarray(token_table), [1], by_kind)
    partial = {k: v for k, v in by_kind.items() if k != "edit"}
    with pytest.raises(ValueError, match="routing kind 'edit' .* has no entry in query_tables"):
        assemble(token_table, [1], partial)


# --- super-link router: the decode loop --------------------------------------------------------------------


def fake_hidden(position: int, rows: int) -> np.ndarray:
    """Post-norm hidden states that encode their own position, so a link's rows can be checked."""
    rows_at = np.arange(position, position + rows, dtype=np.float32)[:, None]
    return (rows_at + np.arange(H, dtype=np.float32) / 100).astype(np.float32)


def reference_decode(prompt_len: int, tokens, max_new_tokens: int, max_context: int):
    """The decisions of the reference's `_generate`, without a model: ids appended, steps fed, stop reason."""
    ids = [1] * prompt_len
    fed = []
    generated = 0
    stop_reason = "length"
    stream = iter(tokens)
    while generated < max_new_tokens:
        token = next(stream)
        generated += 1
        if token == EOS:
            stop_reason = "eos"
            ids.append(token)
            break
        kind = KIND_OF_ID.get(token)
        if generated == max_new_tokens and kind is None:
            ids.append(token)
            break
        step_ids = [token] + (placeholders_of(kind) if kind else [])
        if len(ids) + len(step_ids) > max_context:
            stop_reason = "length"
            break
        fed.append((len(ids), len(step_ids)))
        ids.extend(step_ids)
    return ids, fed, stop_reason


def router_decode(router, prompt_len: int, tokens, max_new_tokens: int, capacity: int, query_rows_only=False):
    """The runtime's loop: plan each sampled token, feed what the plan says, write KV rows into the arena."""
    arena = _core.KVArena(1, capacity, 1, 2)
    arena.commit(prompt_len)  # the prefill wrote these rows in place
    ids = [1] * prompt_len
    fed = []
    generated = 0
    stop_reason = "length"
    for token in tokens:
        if generated >= max_new_tokens:
            break
        generated += 1
        plan = router.plan(token, arena, last=generated == max_new_tokens)
        ids.extend(plan.ids)
        if plan.feed:
            assert plan.position == arena.length() and len(plan.ids) == plan.rows
            hidden = fake_hidden(plan.position, plan.rows)
            router.observe(plan, hidden[plan.output_rows] if query_rows_only else hidden)
            arena.new_rows_key(0, plan.rows)[...] = plan.position
            arena.commit(plan.rows)
            fed.append((plan.position, plan.rows))
        else:
            assert plan.rows == 0
        if plan.stop_reason is not None:
            stop_reason = plan.stop_reason
            break
    return ids, fed, stop_reason


def check_links(router, fed, ids):
    links = router.links()
    routed = [(pos, rows) for pos, rows in fed if ids[pos] in KIND_OF_ID]
    assert [lk.position for lk in links] == [pos for pos, _ in routed]
    for lk, (pos, rows) in zip(links, routed):
        assert lk.kind == KIND_OF_ID[ids[pos]]
        np.testing.assert_array_equal(lk.states, fake_hidden(pos, rows)[1:])


def test_plan_plain_and_routing_steps(tables):
    token_table, by_kind = tables
    router = make_router(by_kind)
    plain = router.plan(7, past_length=10, capacity=100, last=False)
    assert (plain.ids, plain.feed, plain.rows, plain.position, plain.output_rows) == ([7], True, 1, 10, [0])
    assert plain.kind is None and plain.stop_reason is None and plain.query_table is None
    det = router.plan(ROUTING_IDS["[DET]"], 10, 100, False)
    assert det.ids == [ROUTING_IDS["[DET]"], *placeholders_of("det")]
    assert (det.kind, det.rows, det.num_queries, det.output_rows) == ("det", 5, 4, [1, 2, 3, 4])
    np.testing.assert_array_equal(det.query_table, by_kind["det"])
    assert not det.query_table.flags.writeable
    np.testing.assert_array_equal(
        router.step_embeddings(det, token_table), np.concatenate([token_table[det.ids[:1]], by_kind["det"]])
    )
    gen = router.plan(ROUTING_IDS["[GEN]"], 10, 100, False)
    assert gen.ids == [ROUTING_IDS["[GEN]"]] + [PLACEHOLDER_IDS["[EMB]"]] * NUM_EMBS_GEN and gen.rows == 7
    assert router.kind_of(ROUTING_IDS["[SEG]"]) == "seg" and router.kind_of(7) is None


@pytest.mark.parametrize(
    ("name", "stream", "max_new", "capacity", "want_stop"),
    [
        ("answer then eos", [5, 42, 6, 42, 7, EOS], 20, 100, "eos"),
        ("routing token as the last token", [5, 6, 42], 3, 100, "length"),
        ("plain last token is kept, not fed", [5, 6, 7], 3, 100, "length"),
        ("two routing tokens in a row", [5, 42, 44, 6, EOS], 20, 100, "eos"),
        ("eos right after the queries", [5, 43, EOS], 20, 100, "eos"),
        ("routing step does not fit", [5, 6, 42, 7], 20, 14, "length"),
        ("routing step fits exactly", [5, 6, 42, EOS], 20, 17, "eos"),
        ("plain token fits where a routing step would not", [5, 6, 7, 42], 20, 14, "length"),
        ("generation group", [5, 46, 6, EOS], 20, 100, "eos"),
    ],
)
def test_router_loop_matches_reference_decisions(tables, name, stream, max_new, capacity, want_stop):
    router = make_router(tables[1])
    prompt_len = 10
    want_ids, want_fed, reference_stop = reference_decode(prompt_len, stream, max_new, capacity)
    ids, fed, stop = router_decode(router, prompt_len, stream, max_new, capacity)
    assert (ids, fed, stop) == (want_ids, want_fed, reference_stop), name
    assert stop == want_stop
    check_links(router, fed, ids)


def test_router_edge_cases_in_detail(tables):
    by_kind = tables[1]
    det, seg, grd = ROUTING_IDS["[DET]"], ROUTING_IDS["[SEG]"], ROUTING_IDS["[GRD]"]
    # Two routing tokens in a row: the second follows the first one's query rows.
    router = make_router(by_kind)
    _, fed, _ = router_decode(router, 10, [5, det, seg, EOS], 20, 100)
    assert [lk.position for lk in router.links()] == [11, 16] and fed == [(10, 1), (11, 5), (16, 5)]
    # EOS right after the queries: kept in the ids, not fed, the group is complete.
    router = make_router(by_kind)
    ids, fed, stop = router_decode(router, 10, [grd, EOS], 20, 100)
    assert ids[-6:] == [grd, *placeholders_of("grd"), EOS] and fed == [(10, 5)] and stop == "eos"
    assert len(router.links()) == 1
    # Capacity: 3 rows left, so [DET] (5 rows) is dropped without a partial step, and no link is made.
    plan = make_router(by_kind).plan(det, past_length=11, capacity=14, last=False)
    assert (plan.feed, plan.rows, plan.ids, plan.stop_reason, plan.kind) == (False, 0, [], "length", "det")
    # The last allowed token: a routing token is still fed (its link is needed), then the loop stops.
    plan = make_router(by_kind).plan(det, 11, 100, last=True)
    assert (plan.feed, plan.rows, plan.stop_reason) == (True, 5, "length")
    plan = make_router(by_kind).plan(EOS, 11, 11, last=True)
    assert (plan.feed, plan.ids, plan.stop_reason) == (False, [EOS], "eos")


def test_router_loop_matches_reference_on_random_streams(tables):
    rng = random.Random(3)
    alphabet = [5, 6, 7, 8] * 3 + list(KIND_OF_ID) + [EOS]
    for _ in range(300):
        stream = [rng.choice(alphabet) for _ in range(40)]
        max_new = rng.randint(1, 30)
        prompt_len = rng.randint(1, 12)
        capacity = prompt_len + rng.randint(0, 60)
        want = reference_decode(prompt_len, stream, max_new, capacity)
        router = make_router(tables[1])
        got = router_decode(router, prompt_len, stream, max_new, capacity, query_rows_only=rng.random() < 0.5)
        assert got == want, (stream, max_new, prompt_len, capacity)
        check_links(router, got[1], got[0])


def test_observe_checks_shapes_and_order(tables):
    router = make_router(tables[1])
    plan = router.plan(ROUTING_IDS["[DET]"], 3, 100, False)
    with pytest.raises(
        ValueError,
        match=r"hidden must have 5 rows \(the whole step\) or 4 \(its query rows\), "
        r"got shape \(3, 8\)",
    ):
        router.observe(plan, np.zeros((3, H), np.float32))
    with pytest.raises(TypeError, match="hidden must be float32"):
        router.observe(plan, np.zeros((5, H)))
    assert router.observe(plan, fake_hidden(3, 5))
    with pytest.raises(ValueError, match="observed in answer order, each once"):
        router.observe(plan, fake_hidden(3, 5))
    assert not router.observe(router.plan(7, 8, 100, False), np.zeros((1, H), np.float32))
    dropped = router.plan(ROUTING_IDS["[DET]"], 98, 100, False)
    with pytest.raises(ValueError, match="was not fed"):
        router.observe(dropped, fake_hidden(98, 5))


def test_link_states_outlive_the_router(tables):
    router = make_router(tables[1])
    router.observe(router.plan(ROUTING_IDS["[POSE]"], 4, 100, False), fake_hidden(4, 5))
    states = router.links()[0].states
    assert not states.flags.writeable
    router.reset()
    del router
    gc.collect()
    np.testing.assert_array_equal(states, fake_hidden(4, 5)[1:])


def test_groups_for_each_decoder(tables):
    router = make_router(tables[1])
    kinds = ["det", "pose", "grd", "gen", "det", "seg", "pose", "edit"]
    position = 0
    for kind in kinds:
        token = ROUTING_IDS[next(t for t, k in contract.ROUTING_TOKENS.items() if k == kind)]
        plan = router.plan(token, position, 1000, False)
        router.observe(plan, fake_hidden(position, plan.rows))
        position += plan.rows + 2
    positions = [lk.position for lk in router.links()]

    def summary(groups):
        return [(g.index, g.kind, g.position) for g in groups]

    obj = router.groups_for("object")
    assert list(obj) == ["groups"]
    assert summary(obj["groups"]) == [
        (0, "det", positions[0]),
        (1, "grd", positions[2]),
        (2, "det", positions[4]),
        (3, "seg", positions[5]),
    ]
    pose = router.groups_for("pose")
    assert summary(pose["objects"]) == [(0, "det", positions[0]), (1, "det", positions[4])]
    assert summary(pose["keypoints"]) == [(0, "pose", positions[1]), (1, "pose", positions[6])]
    assert summary(router.groups_for("gen")["groups"]) == [(0, "gen", positions[3])]
    assert summary(router.groups_for("edit")["groups"]) == [(0, "edit", positions[7])]
    np.testing.assert_array_equal(obj["groups"][1].states, router.links()[2].states)
    with pytest.raises(
        ValueError, match="unknown decoder 'mask'; the routes name 'object', 'pose', 'gen', 'edit'"
    ):
        router.groups_for("mask")


def test_prefill_links_from_an_answer_prefix(tables):
    router = make_router(tables[1])
    det, grd = ROUTING_IDS["[DET]"], ROUTING_IDS["[GRD]"]
    history = [1, 5, det, *placeholders_of("det"), 2]  # an earlier turn's group: not re-linked
    start = len(history) + 2
    ids = np.asarray(
        history + [6, 7] + [8, det, *placeholders_of("det"), 9, grd, *placeholders_of("grd")], np.int64
    )
    rows = router.prefill_query_rows(ids, start)
    p1, p2 = start + 1, start + 7
    np.testing.assert_array_equal(rows, list(range(p1 + 1, p1 + 5)) + list(range(p2 + 1, p2 + 5)))
    whole = fake_hidden(0, len(ids))
    router.observe_prefill(ids, start, whole)
    assert [(lk.kind, lk.position) for lk in router.links()] == [("det", p1), ("grd", p2)]
    other = make_router(tables[1])
    other.observe_prefill(ids, start, whole[rows])
    for a, b in zip(router.links(), other.links()):
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.states, whole[a.position + 1 : a.position + 5])
    # Decode steps continue after the prefill's groups.
    plan = router.plan(det, len(ids), 100, False)
    assert router.observe(plan, fake_hidden(len(ids), plan.rows))
    with pytest.raises(
        ValueError, match=rf"routing token {det} at position {len(ids)} is not followed by its 4"
    ):
        router.prefill_query_rows(np.append(ids, det), 0)


def test_router_construction_errors(tables):
    by_kind = tables[1]
    det = _core.Route(42, "det", "object", placeholders_of("det"), by_kind["det"])
    with pytest.raises(ValueError, match="token id 42 has more than one route"):
        _core.SuperLinkRouter([det, det], EOS)
    with pytest.raises(ValueError, match="eos_id 42 is a routing token"):
        _core.SuperLinkRouter([det], 42)
    with pytest.raises(ValueError, match=r"query_table has shape \(4, 8\) for 6 placeholder ids"):
        _core.Route(46, "gen", "gen", placeholders_of("gen"), by_kind["det"])
    with pytest.raises(TypeError, match="query_table must be float32"):
        _core.Route(42, "det", "object", placeholders_of("det"), by_kind["det"].astype(np.float64))
    np.testing.assert_array_equal(det.query_table, by_kind["det"])


# --- labels (docs/architecture.md §9) ----------------------------------------------------------------

#: (answer, question, instruction, expected [(kind, label)]): the one table both implementations must satisfy.
LABEL_CASES = [
    (
        "Yes, here are the results for person[DET], dog[DET] in the image.",
        "Detect person and dog.",
        None,
        [("det", "person"), ("det", "dog")],
    ),
    ("<det>a red circle</det>[DET]", "Find the red circle.", None, [("det", "a red circle")]),
    ("nose[POSE], left eye[POSE]", "Detect the keypoints.", None, [("pose", "nose"), ("pose", "left eye")]),
    ("It is [GRD].", "<image>\nWhere is the red ball in the image?", None, [("grd", "red ball")]),
    ("Sure, it is [GRD].", "Please locate the blue square.", None, [("grd", "blue square")]),
    ("yes[GRD]", "point to this little dog", None, [("grd", "this little dog")]),  # only "the" is dropped
    ("okay, that is [GRD]", "Can you find the cat on the photo?", None, [("grd", "cat")]),
    ("[GRD]", "What is this?", None, [("grd", "What is this?")]),
    ("the small red triangle[GRD]", "Where is it?", None, [("grd", "the small red triangle")]),
    ("Here[GRD]", "segment the sky", None, [("grd", "sky")]),
    ("It is [GRD]", "<image>", None, [("grd", "")]),
    ("The masks: sky[SEG] and grass[SEG].", "Segment everything.", None, [("seg", "sky"), ("seg", "grass")]),
    (
        "Results for a cat[DET][EMB][EMB2][EMB3][EMB4] and a dog[DET]",
        "",
        None,
        [("det", "a cat"), ("det", "a dog")],
    ),
    ("person[DET][DET]", "q", None, [("det", "person"), ("det", "")]),
    ("Here is the image [GEN].", "Draw a red circle.", None, [("gen", "Draw a red circle.")]),
    ("Done [EDIT]", "<image>\nmake it blue", "make the square blue", [("edit", "make the square blue")]),
    ("猫[DET]、犬[DET]", "検出して", None, [("det", "猫"), ("det", "、犬")]),
    ("café au lait: crème brûlée[DET]", "q", None, [("det", "crème brûlée")]),
    ("\u00a0naïve\u3000[DET]", "q", None, [("det", "naïve")]),
    ("a for b and c[DET]", "q", None, [("det", "c")]),
    ("a for and b[DET]", "q", None, [("det", "and b")]),  # non-overlapping scan, not the last occurrence
    ("x: <det>a, b</det> [DET]", "q", None, [("det", "a, b")]),
    # The reference regex's lazy match runs from the first <det> to the last </det> ...
    ("<det>a</det> then <det>b</det>[DET]", "q", None, [("det", "a</det> then <det>b")]),
    # ... but its `.` stops at a newline, and then the delimiter split decides.
    ("<det>a\nb</det>[DET]", "q", None, [("det", "<det>a\nb</det>")]),
    ("one.two[DET]", "q", None, [("det", "one.two")]),
    ("It is [GRD].", "WHERE'S THE ſmall KEY?", None, [("grd", "ſmall KEY")]),
    ("it[GRD]", "Locate   the   blue  ball   in   the  picture  ", None, [("grd", "blue  ball")]),
    ("sure it is [GRD]", "find  ?", None, [("grd", "find  ?")]),
    ("No routing here.", "q", None, []),
]


def reference_answer_labels():
    """The reference's label rule; it lives in `visionllm_edge.export`, which needs torch."""
    pytest.importorskip("torch", reason="the reference label rule needs torch (visionllm_edge.export)")
    from visionllm_edge.export.reference import answer_labels

    return answer_labels


@pytest.mark.parametrize(("answer", "question", "instruction", "want"), LABEL_CASES)
def test_labels_core(answer, question, instruction, want):
    assert _core.label_groups(answer, question, instruction) == want


@pytest.mark.parametrize(("answer", "question", "instruction", "want"), LABEL_CASES)
def test_labels_reference(answer, question, instruction, want):
    assert reference_answer_labels()(answer, question, instruction) == want


def test_labels_core_matches_reference_on_random_text():
    answer_labels = reference_answer_labels()
    rng = random.Random(4)
    answer_pieces = [*contract.ROUTING_TOKENS, *contract.LABEL_DELIMITERS] + (
        "[EMB]|[EMB3]|[EM|B]|for| |\n|<det>|</det>|person|It|is|this|yes|OK|,|.|:|é|猫|\u00a0|İ|ſ".split("|")
    )
    question_pieces = (
        "<image>|\n| |locate|Find|where's|point to|segment|see|the |red ball|猫|in|within|on|the|this|image|"
        "photo|is|?|.|!|<|\u212a|\u00a0"
    ).split("|")
    for _ in range(3000):
        answer = "".join(rng.choice(answer_pieces) for _ in range(rng.randint(0, 12)))
        question = "".join(rng.choice(question_pieces) for _ in range(rng.randint(0, 12)))
        instruction = None if rng.random() < 0.8 else " draw it "
        want = answer_labels(answer, question, instruction)
        assert _core.label_groups(answer, question, instruction) == want, (answer, question)


# --- sampler ------------------------------------------------------------------------------------------------


def numpy_penalty(logits, ids, penalty):
    out = logits.copy()
    seen = np.unique(np.asarray(ids, np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))
    return out


def numpy_probabilities(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The reference `_sample` distribution in float64."""
    z = logits.astype(np.float64) / temperature
    if top_k > 0:
        kth = np.sort(z)[::-1][min(top_k, z.size) - 1]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        drop = np.cumsum(sorted_p) - sorted_p > top_p
        sorted_p[drop] = 0.0
        p = np.zeros_like(p)
        p[order] = sorted_p
        p /= p.sum()
    return p


def test_repetition_penalty_matches_numpy():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    ids = [3, 7, 7, 12, 0, 49, 3]
    for penalty in (1.3, 0.7, 2.0):
        got = _core.apply_repetition_penalty(logits, ids, penalty)
        np.testing.assert_array_equal(got, numpy_penalty(logits, ids, penalty))
    np.testing.assert_array_equal(_core.apply_repetition_penalty(logits, [], 1.5), logits)
    with pytest.raises(ValueError, match="id 50 is outside the vocabulary of 50"):
        _core.apply_repetition_penalty(logits, [50], 1.5)


def test_greedy_is_argmax_after_penalty():
    logits = np.array([0.5, 3.0, 3.0, 2.9, -1.0], np.float32)
    sampler = _core.Sampler(0)
    greedy = _core.SamplingParams()
    assert sampler.sample(logits, greedy, []) == 1  # the first of equal maxima, as torch.argmax
    penalized = _core.SamplingParams(repetition_penalty=1.2)
    assert sampler.sample(logits, penalized, [1, 2]) == 3
    assert sampler.sample(logits, penalized, np.array([1, 2], np.int64)) == 3
    np.testing.assert_array_equal(_core.sampling_probabilities(logits, greedy, []), np.eye(5)[1])


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.9, 8, 0.9), (1.0, 100, 0.01)],
)
def test_sampling_distribution_matches_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(6).standard_normal(40).astype(np.float32) * 2
    params = _core.SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
    got = _core.sampling_probabilities(logits, params, [])
    want = numpy_probabilities(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(got > 0, want > 0)  # exactly the same tokens are excluded
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_top_p_matches_numpy_on_peaked_and_flat_distributions():
    # Peaked logits take the path that sorts only the likely head; flat ones, and the case below whose head
    # holds less than top_p, sort everything. Both must give the reference's nucleus.
    rng = np.random.default_rng(7)
    cases = [
        (rng.standard_normal(1000) * scale, float(rng.uniform(0.05, 0.99))) for scale in (0.3, 3, 12) * 20
    ]
    cases.append((np.log(np.array([0.5] + [0.0004] * 1250)), 0.9))
    for logits, top_p in cases:
        logits = logits.astype(np.float32)
        params = _core.SamplingParams(do_sample=True, top_p=top_p)
        want = numpy_probabilities(logits, top_p=top_p)
        got = _core.sampling_probabilities(logits, params, [])
        np.testing.assert_array_equal(got > 0, want > 0)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


def test_top_k_keeps_ties_and_top_p_drops_by_mass_before():
    params = _core.SamplingParams(do_sample=True, top_k=2)
    probs = _core.sampling_probabilities(np.array([1.0, 3.0, 2.0, 3.0, 2.0], np.float32), params, [])
    assert (probs > 0).tolist() == [False, True, False, True, False]
    params = _core.SamplingParams(do_sample=True, top_k=3)
    probs = _core.sampling_probabilities(np.array([1.0, 3.0, 2.0, 3.0, 2.0], np.float32), params, [])
    assert (probs > 0).tolist() == [False, True, True, True, True]  # both tie with the 3rd value
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    for top_p, kept in [(0.75, [0, 1]), (0.85, [0, 1, 2]), (0.4, [0]), (0.96, [0, 1, 2, 3])]:
        probs = _core.sampling_probabilities(logits, _core.SamplingParams(do_sample=True, top_p=top_p), [])
        assert np.flatnonzero(probs).tolist() == kept, top_p
        assert probs.sum() == pytest.approx(1.0)


def test_sample_frequencies_under_a_seed():
    want = np.array([0.4, 0.3, 0.2, 0.1, 0.0])
    logits = np.log(np.maximum(want, 1e-300)).astype(np.float32)
    params = _core.SamplingParams(do_sample=True, top_p=0.85)  # drops the 0.1 token: mass before it is 0.9
    kept = _core.sampling_probabilities(logits, params, [])
    sampler = _core.Sampler(1234)
    n = 20_000
    draws = np.array([sampler.sample(logits, params, []) for _ in range(n)])
    counts = np.bincount(draws, minlength=5)
    assert counts[3] == 0 and counts[4] == 0
    expected = kept[:3] * n
    chi2 = float((((counts[:3] - expected) ** 2) / expected).sum())
    assert chi2 < 13.8, (counts, expected)  # 2 degrees of freedom, p = 0.001
    # Same seed, same sequence; another seed, another one; reseed starts over.
    again = _core.Sampler(1234)
    assert [again.sample(logits, params, []) for _ in range(200)] == draws[:200].tolist()
    other = _core.Sampler(99)
    assert [other.sample(logits, params, []) for _ in range(200)] != draws[:200].tolist()
    again.reseed(1234)
    assert again.sample(logits, params, []) == draws[0]


def test_sampler_argument_errors():
    sampler = _core.Sampler(0)
    logits = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="logits must be float32, got float64"):
        sampler.sample(np.zeros(4), _core.SamplingParams(), [])
    with pytest.raises(ValueError, match=r"logits must be a non-empty 1-D \[V\] array, got shape \(1, 4\)"):
        sampler.sample(np.zeros((1, 4), np.float32), _core.SamplingParams(), [])
    with pytest.raises(ValueError, match="temperature must be positive when sampling, got 0"):
        sampler.sample(logits, _core.SamplingParams(do_sample=True, temperature=0.0), [])
    for top_p in (1.5, 0.0, float("nan")):  # (0, 1]: 0 would keep no token
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            sampler.sample(logits, _core.SamplingParams(do_sample=True, top_p=top_p), [])
    with pytest.raises(TypeError, match="penalized_ids must be int64"):
        sampler.sample(logits, _core.SamplingParams(), np.array([1], np.int32))
    # A row of a [R, V] engine output is a contiguous view and goes in without a copy.
    batch = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]], np.float32)
    assert sampler.sample(batch[1], _core.SamplingParams(), []) == 0


def test_official_pose_template_labels_are_the_keypoint_names():
    from visionllm_edge import templates
    from visionllm_edge.export.reference import answer_labels

    _history, question, answer = templates.pose(["head", "left hand", "right foot"])
    want = [("pose", "head"), ("pose", "left hand"), ("pose", "right foot")]
    assert [tuple(p) for p in _core.label_groups(answer, question, None)] == want
    assert answer_labels(answer, question) == want
