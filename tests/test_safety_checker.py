"""The safety checker must itself be right: it is what every multi-node test trusts."""

import safety


def write(tmp_path, lines):
    p = tmp_path / "guard.log"
    p.write_text("".join(f"{line}\n" for line in lines))
    return str(p)


def test_overlap_of_two_nodes_is_a_violation(tmp_path):
    log = write(tmp_path, [
        "1.00 start n1 g 8 1", "1.01 alive n1 g 8 1",
        "1.005 start n2 g 9 2", "1.02 alive n2 g 9 2",
    ])
    assert len(safety.violations(log)) == 1


def test_handover_without_overlap_passes(tmp_path):
    log = write(tmp_path, [
        "1.00 start n1 g 8 1", "1.50 alive n1 g 8 1", "1.51 stop n1 g 8 1",
        "1.60 start n2 g 9 2", "2.00 alive n2 g 9 2",
    ])
    assert safety.violations(log) == []


def test_sigkilled_run_ends_shortly_after_its_last_alive(tmp_path):
    # n1 was SIGKILLed after its last alive at 1.50: a start at 1.51 overlaps (within the
    # alive period), a start at 1.60 does not.
    bad = write(tmp_path, ["1.00 start n1 g 8 1", "1.50 alive n1 g 8 1", "1.51 start n2 g 9 2"])
    assert len(safety.violations(bad)) == 1
    good = write(tmp_path, ["1.00 start n1 g 8 1", "1.50 alive n1 g 8 1", "1.60 start n2 g 9 2"])
    assert safety.violations(good) == []


def test_reused_pid_starts_a_new_run(tmp_path):
    # A restarted node reuses pid 8: the second run must not inherit the first one's stop.
    log = write(tmp_path, [
        "1.00 start n1 g 8 1", "1.10 stop n1 g 8 1",
        "2.00 start n1 g 8 3", "2.20 start n2 g 9 4",
        "2.50 alive n1 g 8 3", "2.52 alive n2 g 9 4",
    ])
    assert len(safety.violations(log)) == 1
    assert safety.running_now(log, now=2.55) == {"g": {"n1", "n2"}}


def test_same_node_restart_is_not_a_violation(tmp_path):
    log = write(tmp_path, ["1.00 start n1 g 8 1", "1.20 alive n1 g 8 1", "1.21 start n1 g 9 1", "1.3 alive n1 g 9 1"])
    assert safety.violations(log) == []


def test_same_node_name_in_two_pid_namespaces_is_a_violation(tmp_path):
    # A twin (a cloned VM with the same node name) is another machine: its run overlapping
    # the original's is a double run. Records without the namespace field keep the old rule.
    log = write(tmp_path, [
        "1.00 start n1 g 8 1 4026531", "1.01 alive n1 g 8 1 4026531",
        "1.005 start n1 g 8 1 4026999", "1.02 alive n1 g 8 1 4026999",
    ])
    assert len(safety.violations(log)) == 1
    assert safety.live_runs(log, now=1.03) == {"g": [("n1", "4026531", 8), ("n1", "4026999", 8)]}
    same = write(tmp_path, ["1.00 start n1 g 8 1 4026531", "1.20 alive n1 g 8 1 4026531", "1.21 start n1 g 9 1 4026531"])
    assert safety.violations(same) == []
