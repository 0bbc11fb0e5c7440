"""The settings model: one parser, errors that name the variable, the same rules for values
set in code, a lossless hand-over to child processes, and no other reader of the environment."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from copilot_cli.config import CliConfig
from servers.common.settings import Settings, SettingsError, parse, rows, setting, to_env
from servers.generation.config import GenerationConfig
from servers.retrieval.config import RetrievalConfig
from servers.retrieval.engine import DEFAULT_FUSION
from servers.retrieval.fusion import Fusion

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (Settings, RetrievalConfig, GenerationConfig, CliConfig)


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.edge_port == 8080
    assert settings.data_dir.is_absolute()
    assert settings.ratelimit_fail_open is True
    assert settings.redis_url is None
    assert RetrievalConfig.from_env({}).default_fusion is DEFAULT_FUSION


def test_values_are_converted_by_type() -> None:
    settings = Settings.from_env({"COPILOT_EDGE_PORT": "9000", "COPILOT_RATELIMIT_FAIL_OPEN": "off",
                                  "COPILOT_SHUTDOWN_GRACE_S": "2.5", "REDIS_URL": "redis://127.0.0.1:6379/0",
                                  "COPILOT_LOG_LEVEL": "WARNING", "COPILOT_USAGE_BACKEND": "SQLite"})
    assert (settings.edge_port, settings.ratelimit_fail_open, settings.shutdown_grace_s) == (9000, False, 2.5)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert (settings.log_level, settings.usage_backend) == ("warning", "sqlite")
    assert RetrievalConfig.from_env({"COPILOT_RETRIEVAL_FUSION": "relative_score"}).default_fusion \
        is Fusion.RELATIVE_SCORE


def test_empty_means_default() -> None:
    assert Settings.from_env({"COPILOT_EDGE_PORT": "", "REDIS_URL": "  "}) == Settings.from_env({})


@pytest.mark.parametrize(("env", "value", "expected"), [
    ("COPILOT_EDGE_PORT", "http", "COPILOT_EDGE_PORT must be an integer from 0 to 65535, got 'http'"),
    ("COPILOT_EDGE_PORT", "70000", "COPILOT_EDGE_PORT must be an integer from 0 to 65535, got '70000'"),
    ("COPILOT_RATELIMIT_FAIL_OPEN", "maybe", "COPILOT_RATELIMIT_FAIL_OPEN must be a boolean"),
    ("COPILOT_USAGE_BACKEND", "postgres", "COPILOT_USAGE_BACKEND must be one of clickhouse, sqlite, got 'postgres'"),
    ("COPILOT_AUDIT_ON_TENANT_DELETE", "shred", "COPILOT_AUDIT_ON_TENANT_DELETE must be one of keep, erase"),
    ("COPILOT_TENANT_CACHE_TTL_S", "nan", "COPILOT_TENANT_CACHE_TTL_S must be a number"),
    ("COPILOT_LOG_LEVEL", "loud", "COPILOT_LOG_LEVEL must be one of debug, info, warning, error, critical"),
])
def test_a_bad_value_names_its_variable(env: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({env: value})
    assert expected in str(caught.value)


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        RetrievalConfig.from_env({"COPILOT_RETRIEVAL_WORKERS": "many", "COPILOT_RETRIEVAL_ALPHA": "2",
                                  "COPILOT_STORE": "pinecone"})
    message = str(caught.value)
    for name in ("COPILOT_RETRIEVAL_WORKERS", "COPILOT_RETRIEVAL_ALPHA", "COPILOT_STORE"):
        assert name in message


@dataclasses.dataclass(frozen=True)
class _SecretSection:
    level: int = setting(1, env="SECRET_LEVEL", doc="a secret number", secret=True)


def test_secrets_are_never_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        parse(_SecretSection, {"SECRET_LEVEL": "hunter2"})
    assert "hunter2" not in str(caught.value)


def test_values_set_in_code_follow_the_same_rules() -> None:
    settings = Settings.from_env({})
    with pytest.raises(SettingsError, match="COPILOT_METERING_PORT"):
        dataclasses.replace(settings, metering_port=-1)
    with pytest.raises(SettingsError, match="COPILOT_USAGE_ON_DELETE"):
        dataclasses.replace(settings, usage_on_delete="shred")


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.__name__)
def test_a_child_gets_exactly_the_settings_of_its_parent(section: type) -> None:
    changed: dict[str, object] = {}
    for f in dataclasses.fields(section):
        value = getattr(parse(section, {}), f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, int) and f.name.endswith("port"):
            changed[f.name] = 4242
        elif value is None and f.type in ("str | None",):
            changed[f.name] = "http://127.0.0.1:1"
    parent: Any = dataclasses.replace(parse(section, {}), **changed)
    assert parse(section, to_env(parent)) == parent


def test_every_setting_is_documented_once() -> None:
    names = [row.env for section in SECTIONS for row in rows(section)]
    shared = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}  # retrieval's embeddings and generation's LLM
    duplicates = {n for n in names if names.count(n) > 1} - shared
    assert not duplicates
    assert all(row.doc for section in SECTIONS for row in rows(section))


def test_configuration_doc_is_current() -> None:
    from scripts.config_docs import TARGET, render

    assert TARGET.read_text() == render(), "run `python scripts/config_docs.py`"


def _reads_environment(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), filename=str(path))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            hits.append(node.lineno)
        if isinstance(node, ast.ImportFrom) and node.module == "os" \
                and any(alias.name in ("environ", "getenv") for alias in node.names):
            hits.append(node.lineno)
    return hits


def test_nothing_else_reads_the_environment() -> None:
    readers = {str(path.relative_to(ROOT)): lines
               for folder in ("servers", "copilot_cli")
               for path in sorted((ROOT / folder).rglob("*.py"))
               if path.name != "settings.py" and (lines := _reads_environment(path))}
    assert readers == {}, f"read settings through servers/common/settings.py, not os.environ: {readers}"


def test_replicas_have_their_own_ports_metrics_and_data(tmp_path: Path) -> None:
    base = parse(Settings, {"COPILOT_DATA_DIR": str(tmp_path), "COPILOT_REPLICAS": "3",
                            "COPILOT_REPLICA_PORT_STRIDE": "10", "COPILOT_METRICS_PORT_BASE": "9100"})
    second = parse(Settings, {**to_env(base), "COPILOT_REPLICA": "2"})
    # Every service steps by the stride.
    assert [base.port("generation", i) for i in range(3)] == [50052, 50062, 50072]
    assert second.address("edge_services") == "127.0.0.1:50074" and second.port("edge_http") == 50075
    assert second.address("retrieval") == "127.0.0.1:50071" and base.address("retrieval") == "127.0.0.1:50051"
    assert base.addresses("generation") == ["127.0.0.1:50052", "127.0.0.1:50062", "127.0.0.1:50072"]
    assert base.addresses("metering") == ["127.0.0.1:50053", "127.0.0.1:50063", "127.0.0.1:50073"]
    assert (second.metrics_port("generation"), second.metrics_port("edge"), second.metrics_port("metering")) == \
        (9122, 9124, 9123)
    # Generation replicas never share local state (outboxes); replica 0 keeps the single
    # process's. Retrieval's and metering's replicas share theirs (one store, coherent or locked).
    assert base.service_dir("generation") == tmp_path / "generation"
    assert second.service_dir("generation") == tmp_path / "generation-2"
    assert second.service_dir("metering") == base.service_dir("metering") == tmp_path / "metering"
    assert second.service_dir("retrieval") == tmp_path / "retrieval"


def test_a_replica_index_beyond_the_replicas_is_refused() -> None:
    with pytest.raises(SettingsError, match="COPILOT_REPLICA must be below COPILOT_REPLICAS"):
        parse(Settings, {"COPILOT_REPLICAS": "2", "COPILOT_REPLICA": "2"})
    with pytest.raises(SettingsError, match="above 65535"):
        parse(Settings, {"COPILOT_REPLICAS": "32", "COPILOT_REPLICA_PORT_STRIDE": "1000"})
