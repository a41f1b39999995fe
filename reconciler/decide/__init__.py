"""The pure core: plan(spec, observed, view, now) -> Plan.

No I/O, no clock (`now` is an argument), no logging: every decision of the agent is made
here, which is what makes `--dry-run` honest and every rule testable on its own.

    plan.py       which role this node has for each group, and what it does about it
    entries.py    how one group's entries reach a runlevel (the inittab part)
    placement.py  where each group should run: candidates, ranks, eligibility
    intent.py     what plan returns: Action, Plan
    identity.py   one agent per node name: the twin decision
"""
