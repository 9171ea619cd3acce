"""End-to-end tests: a real mcpbridge process, real children, real clients.

Run with ``python -m twisted.trial tests.integration``. The Node tools come
from ``npm ci --prefix tests/node``; without them those tests are skipped
(or fail, when the environment variable CI is set).
"""
