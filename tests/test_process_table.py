"""The process table the agent saves for its keeper and its successor (STATE/NODE/processes.json).

Supervisor.save keeps each record's JSON text and encodes it again only when a saved field
changed; whatever the sequence of changes, the file must say exactly what the records say.
"""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from reconciler.act import process

TAGS = [("g1", "a"), ("g1", "b"), ("g2", "a"), ("g3", "x")]
CHANGES = st.one_of(
    st.tuples(st.just("state"), st.sampled_from(["stopped", "starting", "running", "stopping", "backoff"])),
    st.tuples(st.just("pid"), st.one_of(st.none(), st.integers(1, 2**22))),
    st.tuples(st.just("since"), st.floats(0, 1e6, allow_nan=False)),
    st.tuples(st.just("exit_code"), st.one_of(st.none(), st.integers(-64, 255))),
    st.tuples(st.just("respawns"), st.integers(0, 10**6)),
    st.tuples(st.just("level"), st.text(max_size=8)),  # any text: quotes, escapes, non-ASCII
)
STEPS = st.lists(st.tuples(st.sampled_from(["add", "change", "remove"]), st.sampled_from(TAGS), CHANGES), max_size=30)


def expected(sup: process.Supervisor) -> dict:
    return {"node": sup.node, "records": [{k: getattr(r, k) for k in process._SAVED} for r in sup.records.values()]}


@settings(max_examples=150, deadline=None)
@given(steps=STEPS)
def test_the_saved_table_always_matches_the_records(tmp_path_factory, steps):
    sup = process.Supervisor(node='n"1é', state_dir=tmp_path_factory.mktemp("state"), on_change=lambda: None)
    for op, key, (field, value) in steps:
        if op == "add":
            sup.records.setdefault(key, process.Record(group=key[0], tag=key[1]))
        elif op == "change" and key in sup.records:
            setattr(sup.records[key], field, value)
        else:
            sup.records.pop(key, None)
        sup.dirty = True
        sup.save()
        assert json.loads(sup.state_file.read_text()) == expected(sup)


def test_an_unchanged_record_is_not_encoded_again(tmp_path, monkeypatch):
    sup = process.Supervisor(node="n1", state_dir=tmp_path, on_change=lambda: None)
    for i in range(3):
        sup.records[(f"g{i}", "t")] = process.Record(group=f"g{i}", tag="t", state="running", pid=100 + i)
    sup.dirty = True
    sup.save()
    encoded = []
    real = json.dumps
    monkeypatch.setattr(process.json, "dumps", lambda obj, **kw: encoded.append(obj) or real(obj, **kw))
    sup.records[("g1", "t")].pid = 200
    sup.dirty = True
    sup.save()
    assert [o for o in encoded if isinstance(o, dict)] == [expected(sup)["records"][1]]
    assert json.loads(sup.state_file.read_text()) == expected(sup)
