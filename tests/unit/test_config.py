"""Settings: file formats, precedence, error messages that name key and source, and secret hygiene."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from conveyor.config import ApiSettings, Settings, WorkerSettings, load_settings
from conveyor.config.redact import mask_secret
from conveyor.errors import ConfigError

PASSWORD = "hunter2-Zq9"
DATABASE_URL = f"postgresql://app:{PASSWORD}@db.internal:5432/conveyor"


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Discovery looks for ./conveyor.*; run every test where there is none unless it writes one.
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def load(config_file: Path | None = None, *, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """load_settings with an explicit, otherwise empty environment (never the test runner's)."""
    return load_settings(
        config_file, environ=env or {}, overrides={k.replace("__", "."): v for k, v in overrides.items()}
    )


def config_error(path: Path | None = None, *, env: dict[str, str] | None = None, **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, env=env, **overrides)
    return str(info.value)


# The same settings in every format; the INI spells lists as comma-separated strings.
SAMPLES = {
    "yaml": f"""
        database_url: {DATABASE_URL}
        log_level: warning
        worker:
          queues: [emails, reports]
          concurrency: 25
          heartbeat_interval_s: 0.5
          lease_timeout_s: 5
        api:
          port: 9000
          cors_origins: ["https://a.example"]
        embedded:
          port: 6543
        scheduler:
          enabled: false
        """,
    "json": json.dumps(
        {
            "database_url": DATABASE_URL,
            "log_level": "warning",
            "worker": {
                "queues": ["emails", "reports"],
                "concurrency": 25,
                "heartbeat_interval_s": 0.5,
                "lease_timeout_s": 5,
            },
            "api": {"port": 9000, "cors_origins": ["https://a.example"]},
            "embedded": {"port": 6543},
            "scheduler": {"enabled": False},
        }
    ),
    "toml": f"""
        database_url = "{DATABASE_URL}"
        log_level = "warning"

        [worker]
        queues = ["emails", "reports"]
        concurrency = 25
        heartbeat_interval_s = 0.5
        lease_timeout_s = 5

        [api]
        port = 9000
        cors_origins = ["https://a.example"]

        [embedded]
        port = 6543

        [scheduler]
        enabled = false
        """,
    "ini": f"""
        [conveyor]
        database_url = {DATABASE_URL}
        log_level = warning

        [worker]
        queues = emails, reports
        concurrency = 25
        heartbeat_interval_s = 0.5
        lease_timeout_s = 5

        [api]
        port = 9000
        cors_origins = https://a.example

        [embedded]
        port = 6543

        [scheduler]
        enabled = false
        """,
}
SAMPLES["yml"] = SAMPLES["yaml"]


def namespaced(fmt: str) -> str:
    """The sample with everything under a top-level ``conveyor`` key."""
    if fmt == "yaml":
        return "conveyor:\n" + textwrap.indent(textwrap.dedent(SAMPLES["yaml"]), "  ")
    if fmt == "json":
        return json.dumps({"conveyor": json.loads(SAMPLES["json"])})
    lines = textwrap.dedent(SAMPLES["toml"]).splitlines()
    return "[conveyor]\n" + "\n".join(
        line.replace("[", "[conveyor.", 1) if line.startswith("[") else line for line in lines
    )


def assert_sample(settings: Settings) -> None:
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == DATABASE_URL
    assert settings.log_level == "warning"
    assert settings.worker.queues == ("emails", "reports")
    assert settings.worker.concurrency == 25
    assert settings.worker.heartbeat_interval_s == 0.5
    assert settings.worker.lease_timeout_s == 5.0
    assert settings.api.port == 9000
    assert settings.api.cors_origins == ("https://a.example",)
    assert settings.embedded.port == 6543
    assert settings.scheduler.enabled is False
    # Untouched keys keep their defaults.
    assert settings.worker.processes == 1
    assert settings.api.host == "127.0.0.1"


# --- defaults and file formats ---------------------------------------------------------------------


def test_defaults__without_any_source() -> None:
    settings = load()

    assert settings == Settings()
    assert settings.database_url is None
    assert settings.payload_limit_bytes == 1_048_576
    assert settings.worker.queues == ("default",)
    assert settings.worker.lease_timeout_s == 30.0


@pytest.mark.parametrize("fmt", ["yaml", "yml", "json", "toml", "ini"])
def test_file__every_format_loads_the_same_settings(tmp_path: Path, fmt: str) -> None:
    assert_sample(load(write(tmp_path / f"settings.{fmt}", SAMPLES[fmt])))


@pytest.mark.parametrize("fmt", ["yaml", "json", "toml"])
def test_file__settings_may_sit_under_a_conveyor_key(tmp_path: Path, fmt: str) -> None:
    assert_sample(load(write(tmp_path / f"settings.{fmt}", namespaced(fmt))))


def test_file__keys_beside_the_conveyor_key_belong_to_other_tools(tmp_path: Path) -> None:
    path = write(tmp_path / "shared.yaml", "other_tool: {x: 1}\nconveyor:\n  worker: {concurrency: 3}\n")

    assert load(path).worker.concurrency == 3


def test_file__a_setting_beside_the_conveyor_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "mixed.yaml", "worker: {concurrency: 3}\nconveyor:\n  log_level: debug\n")

    message = config_error(path)

    assert str(path) in message
    assert "worker" in message


def test_file__empty_yaml_means_defaults(tmp_path: Path) -> None:
    assert load(write(tmp_path / "empty.yaml", "# nothing yet\n")) == Settings()


def test_file__must_hold_a_mapping(tmp_path: Path) -> None:
    message = config_error(write(tmp_path / "list.yaml", "- a\n- b\n"))

    assert str(tmp_path / "list.yaml") in message
    assert "mapping" in message


def test_ini__percent_signs_are_not_interpolation(tmp_path: Path) -> None:
    url = "postgresql://app:p%40ss%25w@db/conveyor"
    path = write(tmp_path / "c.ini", f"[conveyor]\ndatabase_url = {url}\n")

    settings = load(path)

    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == url


# --- choosing the file -----------------------------------------------------------------------------


def test_config_env_var__selects_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere.toml", "[worker]\nconcurrency = 7\n")

    assert load(env={"CONVEYOR_CONFIG": str(path)}).worker.concurrency == 7


def test_config_env_var__explicit_file_wins(tmp_path: Path) -> None:
    chosen = write(tmp_path / "chosen.yaml", "worker: {concurrency: 4}\n")
    ignored = write(tmp_path / "ignored.yaml", "worker: {concurrency: 9}\n")

    assert load(chosen, env={"CONVEYOR_CONFIG": str(ignored)}).worker.concurrency == 4


def test_config_env_var__pointing_at_a_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    message = config_error(env={"CONVEYOR_CONFIG": str(missing)})

    assert str(missing) in message
    assert "not found" in message


def test_discovery__reads_the_one_conveyor_file_in_the_current_directory(tmp_path: Path) -> None:
    write(tmp_path / "conveyor.ini", "[worker]\nconcurrency = 12\n")

    assert load().worker.concurrency == 12


def test_discovery__two_conveyor_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "conveyor.yaml", "{}\n")
    write(tmp_path / "conveyor.json", "{}\n")

    message = config_error()

    assert "conveyor.yaml" in message
    assert "conveyor.json" in message


# --- precedence and merging ------------------------------------------------------------------------


def test_precedence__file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.yaml",
        "log_level: debug\nworker: {concurrency: 20, processes: 2, name: from-file}\n",
    )
    env = {"CONVEYOR_WORKER__CONCURRENCY": "30", "CONVEYOR_WORKER__PROCESSES": "3"}

    settings = load(path, env=env, worker__concurrency=40)

    assert settings.log_level == "debug"  # file only
    assert settings.worker.name == "from-file"  # file only
    assert settings.worker.processes == 3  # environment beats file
    assert settings.worker.concurrency == 40  # override beats both


def test_merge__is_deep_across_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "[worker]\nconcurrency = 50\n[api]\nport = 9100\n")

    settings = load(path, env={"CONVEYOR_WORKER__QUEUES": "a,b"}, api__workers=4)

    assert settings.worker.concurrency == 50
    assert settings.worker.queues == ("a", "b")
    assert settings.api.port == 9100
    assert settings.api.workers == 4


def test_overrides__none_means_flag_not_given(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "worker: {concurrency: 20}\ndatabase_url: " + DATABASE_URL + "\n")

    settings = load(path, worker__concurrency=None, database_url=None)

    assert settings.worker.concurrency == 20
    assert settings.database_url is not None


def test_overrides__accept_top_level_and_dotted_keys() -> None:
    settings = load(database_url=DATABASE_URL, worker__queues=["x"], scheduler__enabled=False)

    assert settings.database_url == SecretStr(DATABASE_URL)
    assert settings.worker.queues == ("x",)
    assert settings.scheduler.enabled is False


def test_environment__config_variable_is_not_a_setting() -> None:
    assert load(env={"CONVEYOR_CONFIG": "", "OTHER_APP_PORT": "1"}) == Settings()


def test_environment__blank_value_unsets_an_optional_setting() -> None:
    settings = load(env={"CONVEYOR_DATABASE_URL": "", "CONVEYOR_EMBEDDED__PORT": " "})

    assert settings.database_url is None
    assert settings.embedded.port is None


def test_environment__top_level_values() -> None:
    env = {
        "CONVEYOR_DATABASE_URL": DATABASE_URL,
        "CONVEYOR_REDIS_URL": "redis://cache:6379/0",
        "CONVEYOR_PAYLOAD_LIMIT_BYTES": "2048",
        "CONVEYOR_LOG_LEVEL": "ERROR",
    }

    settings = load(env=env)

    assert settings.redis_url == SecretStr("redis://cache:6379/0")
    assert settings.payload_limit_bytes == 2048
    assert settings.log_level == "error"


def test_one_source_setting_a_section_and_a_key_inside_it_is_an_error() -> None:
    message = config_error(env={"CONVEYOR_WORKER": "x", "CONVEYOR_WORKER__CONCURRENCY": "5"})

    assert message == (
        "worker.concurrency (from CONVEYOR_WORKER__CONCURRENCY) conflicts with worker (from CONVEYOR_WORKER)"
    )


# --- value shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["a,b", " a , b ,", ["a", "b"], ("a", "b")])
def test_queues__accept_a_list_or_a_comma_separated_string(raw: Any) -> None:
    assert WorkerSettings(queues=raw).queues == ("a", "b")


def test_queues__comma_separated_from_the_environment() -> None:
    assert load(env={"CONVEYOR_WORKER__QUEUES": "high,low"}).worker.queues == ("high", "low")


@pytest.mark.parametrize(
    ("raw", "problem"),
    [(" , ", "must name at least one queue"), ("a,b,a", "lists a queue more than once: a")],
)
def test_queues__empty_or_repeated_names_are_rejected(raw: str, problem: str) -> None:
    message = config_error(env={"CONVEYOR_WORKER__QUEUES": raw})

    assert f"worker.queues: {problem} (from CONVEYOR_WORKER__QUEUES)" in message


def test_cors_origins__comma_separated_from_the_environment() -> None:
    settings = load(env={"CONVEYOR_API__CORS_ORIGINS": "https://a.example,https://b.example"})

    assert settings.api.cors_origins == ("https://a.example", "https://b.example")


def test_durations__accept_sub_second_values() -> None:
    env = {
        "CONVEYOR_WORKER__HEARTBEAT_INTERVAL_S": "0.1",
        "CONVEYOR_WORKER__LEASE_TIMEOUT_S": "0.5",
        "CONVEYOR_WORKER__POLL_INTERVAL_S": "0.1",
        "CONVEYOR_WORKER__RESCUE_INTERVAL_S": "0.2",
        "CONVEYOR_SCHEDULER__TICK_INTERVAL_S": "0.1",
        "CONVEYOR_SCHEDULER__LEADER_LEASE_S": "0.3",
    }

    settings = load(env=env, worker__shutdown_grace_s=0)

    assert settings.worker.heartbeat_interval_s == 0.1
    assert settings.worker.lease_timeout_s == 0.5
    assert settings.worker.poll_interval_s == 0.1
    assert settings.worker.rescue_interval_s == 0.2
    assert settings.worker.shutdown_grace_s == 0.0
    assert settings.scheduler.tick_interval_s == 0.1
    assert settings.scheduler.leader_lease_s == 0.3


def test_batch_size_and_pool_size__zero_resolves_to_the_documented_default() -> None:
    worker = WorkerSettings(concurrency=8)

    assert worker.claim_batch_size == 8
    assert worker.pool_size >= 1
    assert WorkerSettings(concurrency=8, batch_size=3, process_pool_size=2).claim_batch_size == 3
    assert WorkerSettings(process_pool_size=2).pool_size == 2


@pytest.mark.parametrize("app", ["myapp:app", "pkg.tasks:conveyor_app", "pkg.mod:factory.app"])
def test_worker_app__accepts_module_colon_attribute(app: str) -> None:
    assert WorkerSettings(app=app).app == app


def test_worker_app__rejects_other_shapes() -> None:
    message = config_error(env={"CONVEYOR_WORKER__APP": "pkg/tasks.py"})

    assert "worker.app: must look like 'package.module:attribute' (from CONVEYOR_WORKER__APP)" in message


# --- errors name the key and the source ------------------------------------------------------------


def test_unknown_key_in_file__names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "worker:\n  concurency: 5\n")

    message = config_error(path)

    assert f"worker.concurency: unknown key; did you mean 'worker.concurrency'? (from {path})" in message


def test_unknown_section_in_ini__names_the_section_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.ini", "[wokrer]\nconcurrency = 5\n")

    message = config_error(path)

    assert "wokrer: unknown key" in message
    assert f"(from {path})" in message


def test_unknown_environment_variable__names_the_variable() -> None:
    message = config_error(env={"CONVEYOR_DATABSE_URL": "postgresql://h/db"})

    assert "databse_url: unknown key; did you mean 'database_url'? (from CONVEYOR_DATABSE_URL)" in message


def test_unknown_nested_environment_variable__names_the_variable() -> None:
    message = config_error(env={"CONVEYOR_WORKER__CONCURENCY": "5"})

    assert "worker.concurency: unknown key" in message
    assert "(from CONVEYOR_WORKER__CONCURENCY)" in message


def test_malformed_environment_variable_name__is_an_error() -> None:
    message = config_error(env={"CONVEYOR_WORKER____CONCURRENCY": "5"})

    assert "CONVEYOR_WORKER____CONCURRENCY" in message


def test_unknown_override__names_the_command_line() -> None:
    message = config_error(worker__concurency=5)

    assert "worker.concurency: unknown key; did you mean 'worker.concurrency'? (from command line)" in message


@pytest.mark.parametrize("source", ["environment", "file", "command line"])
def test_bad_value__names_the_key_and_its_source(tmp_path: Path, source: str) -> None:
    if source == "environment":
        message = config_error(env={"CONVEYOR_WORKER__LEASE_TIMEOUT_S": "0"})
        origin = "CONVEYOR_WORKER__LEASE_TIMEOUT_S"
    elif source == "file":
        path = write(tmp_path / "c.toml", "[worker]\nlease_timeout_s = 0\n")
        message = config_error(path)
        origin = str(path)
    else:
        message = config_error(worker__lease_timeout_s=0)
        origin = "command line"

    assert f"worker.lease_timeout_s: must be greater than 0 (from {origin})" in message


def test_bad_value__the_winning_source_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "worker: {concurrency: 5}\n")

    message = config_error(path, env={"CONVEYOR_WORKER__CONCURRENCY": "lots"})

    assert "worker.concurrency: must be a whole number (from CONVEYOR_WORKER__CONCURRENCY)" in message
    assert str(path) not in message


def test_errors__every_problem_is_listed_at_once() -> None:
    env = {
        "CONVEYOR_LOG_LEVEL": "loud",
        "CONVEYOR_WORKER__CONCURRENCY": "0",
        "CONVEYOR_API__WORKERS": "0",
        "CONVEYOR_EMBEDDED__PORT": "5432",
        "CONVEYOR_NOPE": "1",
    }

    message = config_error(env=env)

    levels = "'debug', 'info', 'warning' or 'error'"
    assert f"log_level: must be one of {levels} (from CONVEYOR_LOG_LEVEL)" in message
    assert "worker.concurrency: must be at least 1 (from CONVEYOR_WORKER__CONCURRENCY)" in message
    assert "api.workers: must be at least 1 (from CONVEYOR_API__WORKERS)" in message
    assert "embedded.port: 5432 is left to a system PostgreSQL" in message
    assert "nope: unknown key (from CONVEYOR_NOPE)" in message


def test_errors__a_section_given_a_single_value(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "worker: 5\n")

    assert f"worker: must be a section of keys, not a single value (from {path})" in config_error(path)


def test_lease_not_above_heartbeat__names_both_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "worker: {heartbeat_interval_s: 3}\n")

    message = config_error(path, env={"CONVEYOR_WORKER__LEASE_TIMEOUT_S": "3"})

    assert "worker.lease_timeout_s: must be greater than worker.heartbeat_interval_s (3.0 <= 3.0)" in message
    assert "from CONVEYOR_WORKER__LEASE_TIMEOUT_S" in message
    assert f"worker.heartbeat_interval_s from {path}" in message


def test_lease_not_above_heartbeat__default_lease_is_named_as_default() -> None:
    message = config_error(env={"CONVEYOR_WORKER__HEARTBEAT_INTERVAL_S": "45"})

    assert "worker.lease_timeout_s: must be greater than worker.heartbeat_interval_s" in message
    assert "from defaults" in message


def test_leader_lease_not_above_tick__names_both_keys() -> None:
    message = config_error(scheduler__leader_lease_s=1, scheduler__tick_interval_s=1)

    assert "scheduler.leader_lease_s: must be greater than scheduler.tick_interval_s" in message
    assert "(from command line)" in message


def test_lease_check__direct_construction_also_names_both_fields() -> None:
    with pytest.raises(ValidationError, match=r"lease_timeout_s \(1\.0\) must be greater than heartbeat"):
        WorkerSettings(heartbeat_interval_s=1, lease_timeout_s=1)


# --- file errors -----------------------------------------------------------------------------------


def test_missing_explicit_file__names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"

    message = config_error(missing)

    assert f"config file {missing}: not found" in message


def test_unreadable_file__names_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "dir.yaml"
    directory.mkdir()

    assert f"config file {directory}: cannot be read" in config_error(directory)


def test_unparseable_yaml__names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "worker:\n  concurrency: 5\n  queues: [a, b\n")

    message = config_error(path)

    assert f"config file {path}: invalid YAML at line 4" in message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.json", '{"worker": {"concurrency": 5,}}', "invalid JSON at line 1"),
        ("bad.toml", "[worker]\nconcurrency = = 5\n", "invalid TOML: Invalid value (at line 2"),
        ("bad.ini", "[worker]\nconcurrency = 5\nnot a key value line\n", "invalid INI at line 3"),
        ("nosection.ini", "concurrency = 5\n", "invalid INI at line 1"),
        (
            "dupe.ini",
            "[worker]\nconcurrency = 5\nconcurrency = 6\n",
            "option 'concurrency' repeated in [worker] at line 3",
        ),
    ],
)
def test_unparseable_file__names_file_and_line(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")

    message = config_error(path)

    assert f"config file {path}: {expected}" in message


def test_unparseable_file__does_not_quote_the_broken_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", f'database_url: "{DATABASE_URL}\nworker: {{}}\n')

    assert PASSWORD not in config_error(path)


def test_unknown_extension__lists_the_supported_ones(tmp_path: Path) -> None:
    path = write(tmp_path / "settings.conf", "x = 1\n")

    message = config_error(path)

    assert str(path) in message
    for suffix in (".yaml", ".yml", ".json", ".toml", ".ini"):
        assert suffix in message


# --- secrets ---------------------------------------------------------------------------------------


def test_redacted__hides_passwords_but_keeps_host_and_database() -> None:
    settings = load(
        env={"CONVEYOR_DATABASE_URL": DATABASE_URL, "CONVEYOR_REDIS_URL": f"redis://:{PASSWORD}@cache:6379/1"}
    )

    redacted = settings.redacted()

    assert redacted["database_url"] == "postgresql://app:***@db.internal:5432/conveyor"
    assert redacted["redis_url"] == "redis://:***@cache:6379/1"
    assert redacted["worker"]["queues"] == ["default"]
    shown = (json.dumps(redacted), repr(redacted), repr(settings), str(settings), repr(settings.database_url))
    for text in shown:
        assert PASSWORD not in text


def test_redacted__is_json_ready() -> None:
    settings = load(embedded__data_dir="/var/lib/conveyor")

    assert json.loads(json.dumps(settings.redacted()))["embedded"]["data_dir"] == "/var/lib/conveyor"


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        ("postgresql://app@db/conveyor", "postgresql://app@db/conveyor"),
        ("postgresql://app:pw@db/conveyor?ssl=1", "postgresql://app:***@db/conveyor?ssl=1"),
        ("postgresql://db/conveyor?user=app&password=pw", "postgresql://db/conveyor?user=app&password=***"),
        ("postgresql://app:p@ss@db/conveyor", "postgresql://app:***@db/conveyor"),
        ("postgresql://app:pa/ss@db/conveyor", "***"),
        ("postgresql://app:pw@db:notaport/conveyor", "***"),
        ("host=db password=pw", "***"),
    ],
)
def test_mask_secret(secret: str, masked: str) -> None:
    assert mask_secret(secret) == masked


def test_validation_error__does_not_echo_a_secret() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"CONVEYOR_DATABASE_URL": f"mysql://app:{PASSWORD}@db/x"})

    assert "database_url: must be a URL such as postgresql://" in str(info.value)
    assert "(from CONVEYOR_DATABASE_URL)" in str(info.value)
    assert PASSWORD not in str(info.value)
    # Nothing chained either: pydantic's own error holds the raw input.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_direct_construction_error__does_not_echo_a_secret() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(database_url=SecretStr(f"mysql://app:{PASSWORD}@db/x"))

    assert PASSWORD not in str(info.value)


# --- frozen values ---------------------------------------------------------------------------------


def test_frozen__assignment_raises() -> None:
    settings = load()

    with pytest.raises(ValidationError, match="frozen"):
        settings.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        settings.worker.concurrency = 1  # type: ignore[misc]
    assert isinstance(settings.api, ApiSettings)
    assert isinstance(settings.worker.queues, tuple)


def test_frozen__settings_are_hashable_values() -> None:
    assert hash(load()) == hash(Settings())
