"""`xds-server demo`: a whole mesh on this machine, with real Envoy sidecars and real traffic.

What it runs, all from one directory of Kubernetes-shaped YAML (default `examples/demo`):

- the xDS server in-process, on the same code path as `xds-server serve --source DIR`
  (`app.start_app`), so the demo shows exactly what `serve` would push;
- the pods in one of two modes (netns.choose_mode; `--mode`, `XDS_SERVER_DEMO_MODE`):
  capture, when the machine can (root, iproute2, iptables, setpriv): each pod a Linux network
  namespace (netns.py) with its hosts file naming the Services, the capture rules of the
  injector's init container applied with `xds-server iptables`, its sidecar as UID 1337, and
  the server reading a rewritten copy of the mesh (meshcopy.py: namespace addresses,
  ClusterIPs); otherwise explicit, each pod on its own loopback address (127.0.10.x), with one
  line saying why;
- one small app per pod: an HTTP app on each HTTP port that answers with its pod's `version`
  label, a TCP echo on each TCP port. The pod's app container env tunes it:
  `DEMO_FAIL_EVERY=5` answers every 5th request with 503, `DEMO_CALLS=api` makes the pod the
  one traffic is sent from, to that Service, `DEMO_CALLS_TCP=db:5432` its TCP target;
- one real Envoy sidecar per meshed pod, from the bootstrap `xds-server bootstrap` writes,
  started in its own process group (so a terminal's Ctrl-C reaches only the demo, which stops
  each Envoy by PID in order);
- traffic in rounds, sent as the calling pod's app would (app_client.py): in capture mode a
  process inside its namespace calling `http://api/` and `db:5432` by name; in explicit mode
  HTTP to its sidecar's outbound listener with `Host: <DEMO_CALLS>` and TCP round trips through
  its `xds-server.io/tcp-upstreams` bindings. Each round prints one table row: responses per
  version, errors the app saw, what the sidecar hid (upstream 5xx, retries, from Envoy's
  stats), db round trips and latency.

The mesh directory is hot-reloaded as with `serve`: edit the HTTPRoute's weights while the
demo runs and the next rounds show the new split.

One module per job: `pods` (the plan read from the mesh, address checks), `apps` (the small
HTTP and TCP apps), `sidecar` (a pod's Envoy, on the shared `xds_server.envoy_process`
helper the tests use too), `netns` (pods as network namespaces, the mode decision),
`meshcopy` (the mesh as the capture mode serves it), `app_client` (the calling app's
requests, standard library only), `traffic` (one round of them, in either mode), `report`
(the table and summary), `runner` (start, rounds, shutdown: the glue).
"""

from __future__ import annotations

from ..envoy_process import find_envoy
from .errors import DemoError
from .runner import Demo, DemoOptions, default_source, run
from .sidecar import INSTALL_HINT

__all__ = ["INSTALL_HINT", "Demo", "DemoError", "DemoOptions", "default_source", "find_envoy", "run"]
