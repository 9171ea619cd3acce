# -*- test-case-name: tests.test_example -*-
"""Run the example server: ``python -m mcptwist.example``."""

from mcptwist.example.server import main

raise SystemExit(main())
