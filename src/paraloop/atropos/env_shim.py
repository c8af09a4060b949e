"""Runs an Atropos environment script the way `python SCRIPT serve ...` would, with one atroposlib quirk fixed.

    <atropos venv>/bin/python env_shim.py SCRIPT serve --openai.base_url ... (launch-atropos does this)

Executed by the Atropos venv's Python, so it imports atroposlib and nothing from paraloop. The quirk: when an
environment's config_init returns a single APIServerConfig instead of a list (GSM8K does, at atropos' final commit),
atroposlib's ServerManager treats it as a baseline and calls http://localhost:9004-9007/v1, ignoring
--openai.base_url. Here a single APIServerConfig that names a base_url is used as the one server it names.
"""

import runpy
import sys

from atroposlib.envs.server_handling import server_manager
from atroposlib.envs.server_handling.server_baseline import APIServerConfig

_original_init = server_manager.ServerManager.__init__


def _init(self, configs, *args, **kwargs):
    if isinstance(configs, APIServerConfig) and configs.base_url:
        configs = [configs]
    _original_init(self, configs, *args, **kwargs)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: env_shim.py SCRIPT [args ...]")
    server_manager.ServerManager.__init__ = _init
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
