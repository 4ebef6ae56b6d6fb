"""The user-facing API of the project's own kinds, one package per version.

These are the types users write (YAML files, custom resources) and the CRD schemas are
generated from them (`xds_server/crds.py`). Sources validate input with them and convert it
to the model (the IR, `xds_server/model/`) that the translators read; nothing past the
sources sees these types.
"""
