"""`serve` options for the mesh's mTLS and authorization defaults (model/security.py)."""

from __future__ import annotations

import functools

import click

from .model.security import DEFAULT_ROOT_NAMESPACE, MtlsMode, SecuritySettings


def mesh_security_options(command):
    """Add --mtls-mode, --root-namespace and --default-deny; the command gets one
    `mesh_security` argument: a SecuritySettings (its `mtls` and trust domain are decided by
    the app from the CA settings: mTLS needs certificates)."""

    @click.option("--mtls-mode", envvar="XDS_SERVER_MTLS_MODE", default="PERMISSIVE",
                  type=click.Choice([m.value for m in MtlsMode], case_sensitive=False),
                  show_default=True,
                  help="Mesh default for workloads no MTLSPolicy covers (with certificates "
                       "on, i.e. --auth other than none; without them everything is plaintext).")
    @click.option("--root-namespace", envvar="XDS_SERVER_ROOT_NAMESPACE",
                  default=DEFAULT_ROOT_NAMESPACE, show_default=True,
                  help="Policies here apply mesh-wide: an MTLSPolicy without selector is the "
                       "mesh default mode, AuthorizationPolicies apply in every namespace.")
    @click.option("--default-deny", envvar="XDS_SERVER_DEFAULT_DENY", is_flag=True,
                  help="Mesh-wide default-deny: a request is allowed only if an ALLOW "
                       "AuthorizationPolicy matches it.")
    @functools.wraps(command)
    def wrapper(*args, mtls_mode: str, root_namespace: str, default_deny: bool, **kwargs):
        settings = SecuritySettings(
            default_mode=MtlsMode(mtls_mode.upper()), root_namespace=root_namespace,
            default_deny=default_deny,
        )
        return command(*args, mesh_security=settings, **kwargs)

    return wrapper
