"""The cluster spec's commands: `reconcile tell`, `apply`, `diff`, `history`, `rollback`.

Each only turns argv into a call of reconciler/agent/specops.py on the store this node's
settings name (`store_op`); they work from any machine that has a node file or a spec that
names the store.
"""

from __future__ import annotations

import asyncio
import sys
from typing import NoReturn

import click

from reconciler import spec as specmod
from reconciler.cli import SPEC_HELP, complete_group, epilog, fail, main, own


def local_or_fail(path: str) -> tuple[specmod.Spec, dict]:
    """(a Spec holding only this node's local settings: enough to open the store; the
    settings) for the cluster spec commands, which work from a machine that has only the
    node file."""
    from reconciler.spec import loader

    node_file = click.get_current_context().obj.get("node_file")
    try:
        local = loader.local_settings(path, node_file=node_file)
        return loader.load_texts([], spec_path=path, local=local, origin="local settings"), local
    except specmod.SpecError as exc:
        fail(str(exc))
        raise AssertionError  # unreachable


def store_op(path: str, op, *, error_code: int = 1, no_spec=None, after=None) -> NoReturn:
    """Run `op(store, local)` (agent/specops.py) on the store this node's settings name; print
    its lines, exit with its code; its OpError or a StoreError: one line, `error_code`.
    `no_spec()`: what to do instead when the store holds no cluster spec yet; `after()`: what
    to do once it succeeded (--wait), before exiting 0."""
    from reconciler.agent import specops
    from reconciler.cluster import survey
    from reconciler.store import StoreError

    spec, local = local_or_fail(path)
    if no_spec is not None and survey.never_set_up(spec):
        no_spec()

    async def go():
        store = survey.open_spec_store(spec)
        try:
            return await op(store, local)
        finally:
            await store.close()

    try:
        code, lines = asyncio.run(go())
    except specops.NoClusterSpec:
        if no_spec is None:
            fail(f"{spec.shown_store_url}: the store holds no cluster spec yet (start an agent, or `reconcile apply`)",
                 error_code)
        no_spec()
    except (specops.OpError, StoreError) as exc:
        fail(str(exc), error_code)
    for line in lines:
        click.echo(line)
    if code == 0 and after is not None:
        after()
    sys.exit(code)


def wait_option(fn):
    """--wait and --timeout for a command that changes the cluster spec."""
    fn = click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True,
                      help="seconds --wait waits")(fn)
    return click.option("--wait", "wait", is_flag=True,
                        help="wait until every live node runs the new revision and every group converged to it "
                             "(exit 1 if not within --timeout)")(fn)


def waiter(ctx: click.Context, spec_path: str, wait: bool, timeout: float):
    """The `after` of store_op for --wait: the store's current revision, then its convergence."""
    if not wait:
        return None

    def after() -> None:
        from reconciler.agent import intentops
        from reconciler.cli.operator import wait_for

        node_file = ctx.obj.get("node_file")
        try:
            spec, number = intentops.with_revision(intentops.load_spec(spec_path, node_file=node_file), spec_path,
                                                   node_file=node_file)
        except intentops.OpError as exc:
            fail(str(exc))
        wait_for(spec, "revision", timeout=timeout, revision=number)
        click.echo(f"converged: every live node runs revision {number}")

    return after


@main.command(epilog=epilog("reconcile tell web stop", "reconcile tell web run --local --spec /etc/reconciler/web.toml"))
@click.argument("group", shell_complete=complete_group)
@click.argument("runlevel")
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--local", "local_file", is_flag=True,
              help="edit the local spec file instead of the cluster spec in the store (a node that runs alone)")
@wait_option
@click.pass_context
def tell(ctx, group, runlevel, spec_path, local_file, wait, timeout) -> None:
    """Set GROUP's desired RUNLEVEL in the cluster spec: a new revision in the store (comments
    kept), from any node, owner or not; every agent converges and writes it into its files.
    Before any agent has seeded the store (or with --local): in the local spec file."""
    spec_path = own(ctx, "spec", spec_path)

    def in_the_file() -> NoReturn:
        from reconciler.spec import edit

        try:
            path = edit.tell(spec_path, group, runlevel)
        except specmod.SpecError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{exc.filename or spec_path}: {exc.strerror or exc}")
        click.echo(f"{group}: runlevel {runlevel} (written to {path})")
        sys.exit(0)

    if local_file:
        if wait:
            ctx.fail("--wait watches the cluster spec in the store: not with --local")
        in_the_file()
    from reconciler.agent import specops

    store_op(spec_path, lambda store, local: specops.tell(store, group, runlevel, spec_path=spec_path, local=local),
             no_spec=in_the_file, after=waiter(ctx, spec_path, wait, timeout))


@main.command(epilog=epilog("reconcile apply", "reconcile apply --dry-run /etc/reconciler", "reconcile apply --force new.toml"))
@click.argument("path", required=False)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.option("--dry-run", "dry", is_flag=True, help="print what would change, apply nothing")
@click.option("--force", is_flag=True, help="apply files edited on an older revision than the store's")
@wait_option
@click.pass_context
def apply(ctx, path, spec_path, dry, force, wait, timeout) -> None:
    """Validate PATH (files or a directory; default: the spec) and publish it as the cluster
    spec's next revision, after a summary of what changes. Exit 0 applied (or nothing to
    apply), 1 on an error or a conflict."""
    from reconciler.agent import clusterspec, specops

    spec_path = own(ctx, "spec", spec_path)
    path = path or spec_path
    node_file = ctx.obj.get("node_file")
    if wait and dry:
        ctx.fail("--wait waits for what is applied: not with --dry-run")

    def base_of(new: specmod.Spec) -> int | None:
        synced = clusterspec.synced_for(new, path)
        if synced is None or clusterspec.local_hash(path)[0] == synced.files:
            return None  # no agent syncs these files, or they are as it left them
        return synced.revision

    store_op(spec_path, lambda store, local: specops.apply(store, path, node_file=node_file, local=local, force=force,
                                                           dry_run=dry, base_of=base_of, node=ctx.obj["node"]),
             after=waiter(ctx, spec_path, wait, timeout))


@main.command(epilog=epilog("reconcile diff", "reconcile diff new.toml && echo same"))
@click.argument("path", required=False)
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def diff(ctx, path, spec_path) -> None:
    """What `apply PATH` would change in the cluster spec: exit 0 the same, 1 different, 2 on
    an error (kubectl's convention)."""
    from reconciler.agent import specops

    spec_path = own(ctx, "spec", spec_path)
    path = path or spec_path
    node_file = ctx.obj.get("node_file")
    store_op(spec_path, lambda store, local: specops.diff(store, path, node_file=node_file, local=local), error_code=2)


@main.command(epilog=epilog("reconcile history"))
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def history(ctx, spec_path) -> None:
    """The cluster spec's revisions kept in the store, newest first: number, time, who, digest, what changed."""
    from reconciler.agent import specops

    store_op(own(ctx, "spec", spec_path), lambda store, _local: specops.history(store))


@main.command(epilog=epilog("reconcile rollback 7"))
@click.argument("revision", type=click.IntRange(min=1))
@click.option("--spec", "spec_path", default=None, help=SPEC_HELP)
@click.pass_context
def rollback(ctx, revision, spec_path) -> None:
    """Publish an earlier REVISION's files again, as the next revision."""
    from reconciler.agent import specops

    spec_path = own(ctx, "spec", spec_path)
    store_op(spec_path, lambda store, local: specops.rollback(store, revision, spec_path=spec_path, local=local))
