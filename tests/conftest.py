"""Fixtures of the server tests; they and the helpers live in tests/server_support.py.

Import helpers with `from server_support import ...`, not `from conftest import ...`: there is
another conftest.py in tests/integration, and in a whole-suite run either can be `conftest`.
"""

from atoma import atoma_sdk  # noqa: F401  (pytest fixtures)
from server_support import all_logs, echo_node, make_node, node_client, node_process  # noqa: F401
from image_support import image_node, make_image_node, tiny_pipeline  # noqa: F401
