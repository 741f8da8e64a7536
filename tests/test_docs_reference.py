"""The reference pages keep up with the code (no database: the package's source is read, and
``django_pooled_pg.settings`` imported, which needs no configured Django).

* Every system check id in the package's source has an entry in ``docs/troubleshooting.rst``
  (a ``.. _check-ID:`` label) and, when it validates a setting, is named in
  ``docs/configuration.rst``.
* Every pool option and every ``POOLED_PG`` key the validation accepts has a section in
  ``docs/configuration.rst`` (a ``.. _setting-KEY:`` label), with the default the code uses.
* The keys the package refuses to take (E003), the release modes, the exception classes and the
  kinds of summed-up warnings are named on the pages.

The lists come from the code (``settings.py``'s dicts, the ids' string constants), so a new
option, setting or check fails here until it is documented.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import django_pooled_pg
from django_pooled_pg import settings as pool_settings

ROOT = Path(__file__).resolve().parent.parent
# The package under test: the checkout's, or the installed wheel's (scripts/test-wheel).
PACKAGE = Path(django_pooled_pg.__file__).resolve().parent
CONFIGURATION = ROOT / "docs" / "configuration.rst"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.rst"

CHECK_ID = re.compile(r"django_pooled_pg\.[EW]\d{3}")
#: A Django setting named in a check's message: such a check validates a setting.
SETTING_NAMES = re.compile(r"\b(DATABASES|MIDDLEWARE|INSTALLED_APPS|POOLED_PG)\b")


def package_trees() -> dict[Path, ast.Module]:
    return {
        path: ast.parse(path.read_text(), str(path))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "migrations" not in path.parts
    }


def strings_in(node: ast.AST) -> str:
    """Every string constant under ``node`` (f-strings' literal parts included), joined."""
    return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def call_name(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""


def check_ids() -> dict[str, bool]:
    """Each check id the package can emit -> whether it validates a setting.

    An id is a string constant that is exactly ``django_pooled_pg.E001`` (so ids mentioned in
    prose are not counted). It validates a setting when it is made into a ``Problem`` (whose
    ``setting`` names one) or when its check's message names a Django setting."""
    ids: dict[str, bool] = {}
    for tree in package_trees().values():
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if not CHECK_ID.fullmatch(node.value):
                continue
            call = node
            while call is not None and not isinstance(call, ast.Call):
                call = parents.get(call)
            validates = call is not None and (
                call_name(call) == "Problem" or bool(SETTING_NAMES.search(strings_in(call)))
            )
            ids[node.value] = ids.get(node.value, False) or validates
    return ids


def label_sections(text: str, prefix: str) -> dict[str, str]:
    """``.. _PREFIXname:`` label -> the text from it to the next label."""
    found = {}
    matches = list(re.finditer(rf"^\.\. _{re.escape(prefix)}([^:\s]+):\s*$", text, re.M))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following is not None else len(text)
        found[match.group(1)] = text[match.end() : end]
    return found


def documented_default(section: str) -> object:
    """The value of the section's ``:Default: ``...``` field, as Python."""
    match = re.search(r"^:Default:\s*``([^`]+)``", section, re.M)
    assert match, "no ':Default: ``...``' field"
    return ast.literal_eval(match.group(1))


@pytest.fixture(scope="module")
def configuration() -> str:
    return CONFIGURATION.read_text()


@pytest.fixture(scope="module")
def troubleshooting() -> str:
    return TROUBLESHOOTING.read_text()


def test_the_source_has_check_ids():
    ids = check_ids()
    # (a guard for this test's parsing: if it found nothing, the tests below would pass empty)
    assert {"django_pooled_pg.E001", "django_pooled_pg.W001"} <= set(ids)
    assert ids["django_pooled_pg.E001"] and ids["django_pooled_pg.W001"]


@pytest.mark.parametrize("check_id", sorted(check_ids()))
def test_every_check_id_has_a_troubleshooting_entry(check_id, troubleshooting):
    code = check_id.rpartition(".")[2]
    assert check_id in troubleshooting, f"{check_id} is not named in docs/troubleshooting.rst"
    assert f".. _check-{code}:" in troubleshooting, (
        f"docs/troubleshooting.rst has no entry for {check_id}: add a section labelled '.. _check-{code}:'"
    )


@pytest.mark.parametrize("check_id", sorted(i for i, validates in check_ids().items() if validates))
def test_every_setting_check_id_is_in_the_configuration_reference(check_id, configuration):
    assert check_id in configuration, f"{check_id} validates a setting but is not named in docs/configuration.rst"


def test_no_check_id_is_documented_that_the_code_lacks(configuration, troubleshooting):
    known = set(check_ids())
    for name, text in (("configuration", configuration), ("troubleshooting", troubleshooting)):
        stale = set(CHECK_ID.findall(text)) - known
        assert not stale, f"docs/{name}.rst names check ids the code no longer emits: {sorted(stale)}"


POOL_OPTIONS = sorted({**pool_settings.PSYCOPG_POOL_OPTIONS, **pool_settings.OWN_OPTIONS})
POOLED_PG_KEYS = sorted({**pool_settings.STATS_DEFAULTS, **pool_settings.HEALTH_DEFAULTS})


@pytest.mark.parametrize("key", POOL_OPTIONS)
def test_every_pool_option_has_a_section(key, configuration):
    sections = label_sections(configuration, "setting-")
    assert key in sections, (
        f'pool option "{key}" has no section labelled ".. _setting-{key}:" in docs/configuration.rst'
    )
    if key in pool_settings.DEFAULTS:
        assert documented_default(sections[key]) == pool_settings.DEFAULTS[key], (
            f'docs/configuration.rst gives "{key}" another default than settings.DEFAULTS'
        )


@pytest.mark.parametrize("key", POOLED_PG_KEYS)
def test_every_pooled_pg_key_has_a_section(key, configuration):
    sections = label_sections(configuration, "setting-")
    assert key in sections, f'POOLED_PG["{key}"] has no section labelled ".. _setting-{key}:" in docs/configuration.rst'
    default = {**pool_settings.STATS_DEFAULTS, **pool_settings.HEALTH_DEFAULTS}[key]
    assert documented_default(sections[key]) == default, (
        f'docs/configuration.rst gives POOLED_PG["{key}"] another default than the code'
    )


def test_no_section_documents_an_option_the_code_lacks(configuration):
    """A ``setting-`` label in lower case is a pool option, in upper case a ``POOLED_PG`` key,
    except the standard Django settings and connection OPTIONS documented beside them."""
    django_settings = {
        "ENGINE", "INSTALLED_APPS", "MIDDLEWARE", "CONN_MAX_AGE", "CONN_HEALTH_CHECKS", "ATOMIC_REQUESTS",
        "AUTOCOMMIT", "DISABLE_SERVER_SIDE_CURSORS", "TIME_ZONE", "TEST",
        "connect_timeout", "application_name", "assume_role", "prepare_threshold", "isolation_level",
        "cursor_factory", "managed-keys",
    }  # fmt: skip
    documented = set(label_sections(configuration, "setting-")) - django_settings
    stale = documented - set(POOL_OPTIONS) - set(POOLED_PG_KEYS)
    assert not stale, f"docs/configuration.rst documents settings the code does not accept: {sorted(stale)}"


@pytest.mark.parametrize("key", sorted(pool_settings.MANAGED_BY_US))
def test_refused_keys_are_listed(key, configuration):
    assert f"``{key}``" in configuration, f'the refused pool key "{key}" (E003) is not listed in docs/configuration.rst'


@pytest.mark.parametrize("mode", pool_settings.RELEASE_MODES)
def test_release_modes_are_listed(mode, configuration):
    assert f'``"{mode}"``' in configuration


def test_every_exception_class_is_in_troubleshooting(troubleshooting):
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert "PoolExhausted" in classes
    missing = [name for name in classes if name not in troubleshooting]
    assert not missing, f"exceptions of django_pooled_pg.errors missing from docs/troubleshooting.rst: {missing}"


def test_every_summed_up_warning_is_in_troubleshooting(troubleshooting):
    """``eventlog.warn(KIND, ...)``: the KIND starts the summary line a user sees."""
    kinds = set()
    for tree in package_trees().values():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and call_name(node) == "warn"
                and isinstance(node.func, ast.Attribute)
                and getattr(node.func.value, "id", "") == "eventlog"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                kinds.add(node.args[0].value)
    assert len(kinds) >= 4
    missing = sorted(kind for kind in kinds if f"``{kind}``" not in troubleshooting)
    assert not missing, f"kinds of summed-up warnings missing from docs/troubleshooting.rst: {missing}"
