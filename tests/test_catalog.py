"""The catalog of ready servers: its entries, the tables they become, and
C{python -m mcptwist catalog}."""

from __future__ import annotations

import io
import os
import tomllib
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mcptwist.__main__ import main
from mcptwist.config import catalog
from mcptwist.config.load import load_config

CATALOG = Path(__file__).resolve().parent.parent / "etc" / "catalog"
REQUIRED = {"time", "fetch", "filesystem", "memory", "everything", "sqlite", "git", "github",
            "postgres"}  # fmt: skip
EXAMPLE = '[servers.example]\ncommand = "python3"\nargs = ["-m", "mcptwist.example"]\n'


def values_for(entry: catalog.Entry) -> dict[str, str]:
    """Values for every non-secret value an entry takes (its example, or a path)."""
    return {v.name: v.example or "/tmp/x" for v in entry.values if not v.secret}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


class EntryTests(SynchronousTestCase):
    def test_the_catalog(self) -> None:
        """At least the common servers, each with a package pinned to a version."""
        found = catalog.entries(CATALOG)
        self.assertLessEqual(REQUIRED, set(found))
        for entry in found.values():
            self.assertIn("@" if entry.registry == "npm" else "==", entry.package)
            self.assertTrue(any(entry.package in arg for arg in entry.args), entry.name)
            self.assertTrue(entry.description and not entry.description.endswith("."))

    def test_every_table_loads(self) -> None:
        """Each entry, with values for what it needs, is a server the bridge's
        loader takes, run as the entry says, secrets as ${VAR} references."""
        for entry in catalog.entries(CATALOG).values():
            text = catalog.table(entry, entry.name, values_for(entry))
            path = Path(self.mktemp())
            path.write_text(text)
            environ = {name: f"secret-{name}" for name in catalog.secrets_of(entry)}
            server = load_config(path, environ).servers[entry.name]
            self.assertEqual(server.command, entry.command)
            self.assertEqual(server.sharing, entry.sharing)
            for name in catalog.secrets_of(entry):
                self.assertIn(f"${{{name}}}", text)
                self.assertIn(f"secret-{name}", [*server.args, *server.env.values()])

    def test_optional_values_left_out(self) -> None:
        """An optional value not given leaves its argument (or variable) out."""
        time = catalog.entries(CATALOG)["time"]
        doc = tomllib.loads(catalog.table(time, "time", {}))
        self.assertEqual(doc["servers"]["time"]["args"], ["mcp-server-time==2026.10.19"])
        doc = tomllib.loads(catalog.table(time, "time", {"LOCAL_TIMEZONE": "Europe/Paris"}))
        self.assertIn("--local-timezone=Europe/Paris", doc["servers"]["time"]["args"])

    def test_refusals(self) -> None:
        """A missing value, an unknown one, or a secret given in the clear."""
        found = catalog.entries(CATALOG)
        with self.assertRaises(catalog.CatalogError) as caught:
            catalog.table(found["git"], "git", {})
        self.assertIn("--set REPOSITORY=VALUE", str(caught.exception))
        with self.assertRaises(catalog.CatalogError) as caught:
            catalog.table(found["git"], "git", {"REPOSITORY": "/r", "COLOUR": "red"})
        self.assertIn("COLOUR", str(caught.exception))
        with self.assertRaises(catalog.CatalogError) as caught:
            catalog.table(found["github"], "gh", {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_s3cret"})
        self.assertIn("Export GITHUB_PERSONAL_ACCESS_TOKEN", str(caught.exception))
        self.assertNotIn("ghp_s3cret", str(caught.exception))

    def test_broken_entries(self) -> None:
        """A bad catalog file is named, with the key and the fix."""
        folder = Path(self.mktemp())
        folder.mkdir()
        base = 'description = "d"\nregistry = "npm"\npackage = "p@1"\ncommand = "npx"\n'
        for body, key in [
            (base + 'sharing = "all"\n', "sharing"),
            (base + 'sharing = "shared"\nargs = ["{ROOT}"]\n', "args"),
            (base + 'sharing = "shared"\ncolour = 1\n', "colour"),
            (
                'registry = "npm"\npackage = "p@1"\ncommand = "npx"\nsharing = "shared"\n',
                "description",
            ),
            (base + 'sharing = "shared"\n[env.X]\nsecret = true\n', "description"),
            ("not toml [", "TOML"),
        ]:
            path = folder / "broken.toml"
            path.write_text(body)
            with self.assertRaises(catalog.CatalogError) as caught:
                catalog.read(path)
            self.assertIn(str(path), str(caught.exception))
            self.assertIn(key, str(caught.exception))

    @given(st.text())
    def test_toml_string(self, text: str) -> None:
        """Any text, written as a TOML string, reads back the same."""
        self.assertEqual(tomllib.loads(f"k = {catalog.toml_string(text)}")["k"], text)

    @given(st.text(min_size=1).filter(lambda s: "$" not in s))
    def test_secrets_never_written(self, secret: str) -> None:
        """Whatever value a secret is offered, no table holds it."""
        postgres = catalog.entries(CATALOG)["postgres"]
        with self.assertRaises(catalog.CatalogError) as caught:
            catalog.table(postgres, "db", {"POSTGRES_URL": secret})
        self.assertNotIn(secret, str(caught.exception).replace("POSTGRES_URL", ""))


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = Path(self.mktemp())
        self.config.write_text(EXAMPLE)

    def add(self, *extra: str) -> tuple[int, str, str]:
        return run("catalog", "--catalog", str(CATALOG), "add", *extra,
                   "--config", str(self.config))  # fmt: skip

    def test_list_and_show(self) -> None:
        status, out, _ = run("catalog", "--catalog", str(CATALOG), "list")
        self.assertEqual(status, 0)
        for name in REQUIRED:
            self.assertIn(f"\n{name} ", out)
        status, out, _ = run("catalog", "--catalog", str(CATALOG), "show", "github")
        self.assertEqual(status, 0)
        self.assertIn("GITHUB_PERSONAL_ACCESS_TOKEN (environment; secret", out)
        self.assertIn("@modelcontextprotocol/server-github@", out)

    def test_add(self) -> None:
        """The table is appended, checked by the bridge's loader, and the
        secrets to export are named."""
        status, out, err = self.add("postgres", "--name", "db")
        self.assertEqual(status, 0, err)
        self.assertIn("POSTGRES_URL", out)
        status, _, err = self.add("git", "--set", "REPOSITORY=/srv/repo")
        self.assertEqual(status, 0, err)
        servers = tomllib.loads(self.config.read_text())["servers"]
        self.assertEqual(set(servers), {"example", "db", "git"})
        self.assertEqual(servers["db"]["args"][-1], "${POSTGRES_URL}")
        self.assertIn("--repository=/srv/repo", servers["git"]["args"])
        config = load_config(self.config, {"POSTGRES_URL": "postgresql://x"})
        self.assertEqual(config.servers["db"].args[-1], "postgresql://x")

    def test_add_refused_changes_nothing(self) -> None:
        """A name taken, a value missing, a secret in the clear, or a table
        the loader refuses: the file is left as it was."""
        for argv, expected in [
            (("time", "--name", "example"), "exists already"),
            (("git",), "--set REPOSITORY=VALUE"),
            (("github", "--set", "GITHUB_PERSONAL_ACCESS_TOKEN=ghp_x"), "is a secret"),
            (("git", "--set", "REPOSITORY=/r", "--name", "bad name"), str(self.config)),
            (("nonesuch",), "no catalog entry"),
        ]:
            status, _, err = self.add(*argv)
            self.assertEqual(status, 1, argv)
            self.assertIn(expected, err, argv)
            self.assertEqual(self.config.read_text(), EXAMPLE, argv)
            self.assertEqual(os.listdir(self.config.parent), [self.config.name])

    def test_print_without_config(self) -> None:
        status, out, _ = run("catalog", "--catalog", str(CATALOG), "add", "memory")
        self.assertEqual(status, 0)
        self.assertEqual(tomllib.loads(out)["servers"]["memory"]["sharing"], "principal")

    def test_installed_catalog(self) -> None:
        """Without --catalog, MCPTWIST_CATALOG, then the installed folder, then
        the source tree's."""
        self.assertEqual(catalog.directory({"MCPTWIST_CATALOG": "/c"}), Path("/c"))
        self.assertEqual(catalog.directory({"MCPTWIST_CATALOG": "/c"}, "/d"), Path("/d"))
        self.assertIn(catalog.directory({}), (catalog.INSTALLED, catalog.SOURCE_TREE))
