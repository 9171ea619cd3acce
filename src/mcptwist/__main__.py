# -*- test-case-name: tests.test_auth -*-
"""Command-line tools: C{python -m mcptwist token --name NAME}.

The bridge itself runs under C{twistd -n mcpbridge}; this is for chores
around it. Nothing here imports the reactor, so it starts quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO


def token_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print a new token once, and the configuration that accepts it."""
    from .auth import digest_text, generate_token, hash_token

    name = args.name.strip()
    if not name:
        err.write("mcptwist token: --name must not be empty\n")
        return 2
    servers = sorted({s.strip() for s in args.servers.split(",") if s.strip()})
    if not servers:
        err.write('mcptwist token: --servers names no server; give "*" for all\n')
        return 2
    token = generate_token()
    out.write(f"{token}\n\n")
    out.write("[[auth.tokens]]\n")
    # JSON strings are valid TOML basic strings.
    out.write(f"name = {json.dumps(name)}\n")
    out.write(f'hash = "{digest_text(hash_token(token))}"\n')
    out.write(f"servers = [{', '.join(json.dumps(s) for s in servers)}]\n")
    out.write(f"admin = {'true' if args.admin else 'false'}\n")
    err.write(
        "The token above is shown only once: give it to its user now. "
        "The bridge keeps only its hash; paste the [[auth.tokens]] table into the config.\n"
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m mcptwist",
        description="Tools for mcptwist (the bridge itself runs as: twistd -n mcpbridge).",
    )
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    token = commands.add_parser(
        "token",
        help="generate a bearer token and its [[auth.tokens]] configuration",
        description="Generate a bearer token. It is printed once; the bridge stores only its hash.",
    )
    token.add_argument("--name", required=True, help="who the token is for (shown in logs)")
    token.add_argument(
        "--servers",
        default="*",
        help='comma-separated server names the token may use (default "*": all)',
    )
    token.add_argument("--admin", action="store_true", help="also allow the admin endpoints")
    token.set_defaults(run=token_command)
    return top


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run one command; the exit status."""
    top = parser()
    args = top.parse_args(argv)
    if args.command is None:
        top.print_help(err or sys.stderr)
        return 2
    status: int = args.run(args, out or sys.stdout, err or sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
