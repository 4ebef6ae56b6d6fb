"""Suite-wide settings.

`xds-server serve` requires `--auth` (an operator must choose between authentication and none;
see xds_server/settings/sections.py `AuthSection`). Tests that start `serve` to test something else
run it without authentication through the environment, which every `serve` subprocess and
CliRunner invocation inherits; tests of authentication pass `--auth` (or remove the variable).
"""

import os

os.environ.setdefault("XDS_SERVER_AUTH", "none")
# Every `serve` a test starts would otherwise bind the admin API's fixed port 15014, and
# parallel test processes would collide on it: any free port instead.
os.environ.setdefault("XDS_SERVER_ADMIN_ADDRESS", "127.0.0.1:0")
# The same for the xDS TLS listeners (15012, 15013), which `serve` opens whenever it runs the
# mesh CA (--auth other than none).
os.environ.setdefault("XDS_SERVER_XDS_TLS_ADDRESS", "127.0.0.1:0")
os.environ.setdefault("XDS_SERVER_XDS_TLS_TOKEN_ADDRESS", "127.0.0.1:0")
