"""The configuration: frozen values (C{model}) and the loader that builds them
from a file (C{load}), with the parsers of endpoint strings, networks and keys."""
