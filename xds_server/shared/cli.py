"""`xds-server state-key create`: the operator's key for shared state (statekey.py)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("state-key")
def state_key() -> None:
    """The key that seals shared state in Redis (--state-key-file)."""


@state_key.command("create")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to create (0600; refused if it exists). Give every replica the same one, "
                   "e.g. as a Kubernetes Secret.")
def state_key_create(out: Path) -> None:
    """Write a new state key: 32 random bytes, base64."""
    from .statekey import StateKey, write_state_key

    key = StateKey.generate()
    try:
        write_state_key(out, key)
    except FileExistsError:
        raise click.ClickException(f"{out} exists: a replaced key makes every sealed entry "
                                   "unreadable; remove it first if you mean it") from None
    except OSError as err:
        raise click.ClickException(f"{out}: {err.strerror}") from None
    click.echo(f"state key {key.key_id_hex} written to {out}", err=True)
