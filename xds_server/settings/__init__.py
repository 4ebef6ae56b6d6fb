"""Every setting of `xds-server serve`, in one tree (pydantic-settings).

    leaf.py      what one setting is: value types, flag, variable (`setting()`, `Leaf`)
    sections.py  the sections below, with their defaults and checks
    tree.py      `ServeSettings`: flags and variables in, the server's dataclasses out

The sections:

    logging     --log-level, --log-format (options of `xds-server` itself, before `serve`)
    xds         the gRPC server: address, debouncing, push and message bounds, keepalive
    sources     the mesh directory and the raw-resources directory
    scope       which services a proxy sees (export defaults, tenant label)
    kubernetes  the cluster source: watches, status writing, leader election
    auth        how proxies prove who they are (--auth), TokenReview audiences
    limits      bounds per identity and per stream
    ca          the built-in CA and workload certificates (SDS)
    mesh        mesh-wide mTLS and authorization defaults
    admin       the admin HTTP API

Each leaf has exactly one flag and one environment variable, named alike: `--xds-address`
and `XDS_SERVER_XDS_ADDRESS` (`ENV_PREFIX` + the flag in capitals). A flag wins over the
environment, the environment over the default. The `serve` options are generated from this
tree (`cli.py`), so a setting cannot exist without its flag, variable and help text, and a
test checks that the README's table lists them all.

The tree is validated once, naming the flag and variable of any bad value, and then builds
the dataclasses the other modules define (`ServeSettings.app_config()`): those stay plain
and free of pydantic, and this is the only place that knows how operator input maps to them.
Durations take the one grammar of config.py ('1.5s', '100ms', '1h30m', '7d', or seconds).
"""

from ..admin.auth import ENV_TOKENS as ADMIN_TOKENS_ENV
from .leaf import ENV_PREFIX, Leaf, format_duration
from .sections import LoggingSection
from .tree import (
    ServeSettings,
    describe_errors,
    environment_values,
    leaf_by_path,
    leaves,
)

__all__ = [
    "ADMIN_TOKENS_ENV",
    "ENV_PREFIX",
    "Leaf",
    "LoggingSection",
    "ServeSettings",
    "describe_errors",
    "environment_values",
    "format_duration",
    "leaf_by_path",
    "leaves",
]
