"""`xds-server demo`: a whole mesh on this machine, with real Envoy sidecars and real traffic.

What it runs, all from one directory of Kubernetes-shaped YAML (default `examples/demo`):

- the xDS server in-process, on the same code path as `xds-server serve --source DIR`
  (`app.start_app`), so the demo shows exactly what `serve` would push;
- one small app per pod on the pod's own loopback address (127.0.10.x): an HTTP app on each
  HTTP port that answers with its pod's `version` label, a TCP echo on each TCP port. The
  pod's app container env tunes it: `DEMO_FAIL_EVERY=5` answers every 5th request with 503,
  `DEMO_CALLS=api` makes the pod the one traffic is sent from, to that Host;
- one real Envoy sidecar per meshed pod, from the bootstrap `xds-server bootstrap` writes,
  its admin on the pod's address (port 15000), started in its own process group (so a
  terminal's Ctrl-C reaches only the demo, which stops each Envoy by PID in order);
- traffic in rounds, sent as the calling pod's app would: HTTP to its sidecar's outbound
  listener with `Host: <DEMO_CALLS>`, and TCP round trips through each of its
  `xds-server.io/tcp-upstreams` bindings. Each round prints one table row: responses per
  version, errors the app saw, what the sidecar hid (upstream 5xx, retries, from Envoy's
  stats), db round trips and latency.

The mesh directory is hot-reloaded as with `serve`: edit the HTTPRoute's weights while the
demo runs and the next rounds show the new split.

One module per job: `pods` (the plan read from the mesh, address checks), `apps` (the small
HTTP and TCP apps), `sidecar` (a pod's Envoy, on the shared `xds_server.envoy_process`
helper the tests use too), `traffic` (one round of requests), `report` (the table and
summary), `runner` (start, rounds, shutdown: the glue).
"""

from __future__ import annotations

from ..envoy_process import find_envoy
from .errors import DemoError
from .runner import Demo, DemoOptions, default_source, run
from .sidecar import INSTALL_HINT

__all__ = ["INSTALL_HINT", "Demo", "DemoError", "DemoOptions", "default_source", "find_envoy", "run"]
