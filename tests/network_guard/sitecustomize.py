"""Loaded at start-up by every Python process the tests start (conftest puts this folder on their
``PYTHONPATH``): the same loopback-only hook as the test process's."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.network_guard import install

install()
sys.path.pop(0)
