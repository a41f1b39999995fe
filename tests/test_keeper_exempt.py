"""The keeper spares the groups in maintenance (issue 15): STATE/NODE/maintenance.json, read
fail-closed, and what the agent writes there (act/exemptions.py)."""

from __future__ import annotations

import json

import pytest

from reconciler import keeper
from reconciler.act.exemptions import Exemptions


@pytest.mark.parametrize("text, want", [
    ('{"groups": ["a", "b"]}', {"a", "b"}),
    ('{"groups": []}', set()),
    ('{"groups": "a"}', set()),  # not a list: spares nothing
    ('{"groups": ["a", 3, ""]}', {"a"}),
    ("not json", set()),
    ("[1]", set()),
])
def test_the_list_reads_fail_closed(tmp_path, text, want):
    (tmp_path / "maintenance.json").write_text(text)
    assert keeper.exempt(str(tmp_path)) == want


def test_no_list_spares_nothing(tmp_path):
    assert keeper.exempt(str(tmp_path)) == frozenset()


def test_release_leaves_the_spared_groups_resources_alone():
    listing = json.dumps({"node": "n1", "resources": [
        {"group": "a", "tag": "vip", "kind": "address", "ip": "198.51.100.9/24", "interface": "nosuch0"},
        {"group": "a", "tag": "data", "kind": "mount", "target": "/nonexistent/reconciler-test", "fstype": "tmpfs"}]})
    assert keeper.release(listing, frozenset({"a"})) == []  # (no command run)
    done = keeper.release(listing, frozenset({"b"}))  # (a device that does not exist: nothing changes)
    assert len(done) == 1 and "addr del 198.51.100.9/24 dev nosuch0" in done[0]


def test_the_agent_writes_the_list_when_it_changes_and_says_when_it_cannot(tmp_path):
    path = tmp_path / "maintenance.json"
    ex = Exemptions(path)
    assert ex.save([]) and not path.exists()  # (nothing listed, nothing to write)
    assert ex.save(["b", "a"]) and json.loads(path.read_text()) == {"groups": ["a", "b"]}
    assert keeper.exempt(str(tmp_path)) == {"a", "b"}
    again = Exemptions(path)  # a new agent knows what the keeper reads
    assert again._written == ("a", "b")
    path.unlink()
    path.mkdir()  # cannot be replaced by a file: the write fails
    assert not again.save([])
    assert Exemptions(None).save(["a"])  # --once: no keeper, nothing to write
