"""Settings: flags > SNAPHOOK_* environment > YAML config file > defaults; errors name the field."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dispatcher.errors import ConfigError
from dispatcher.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SNAPHOOK_") or name.upper() in ("K_SINK", "SINK_URL"):
            monkeypatch.delenv(name)


def config(tmp_path: Path, text: str, name: str = "snaphook.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    s = Settings.load()
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.state_dir == Path(".snaphook")
    assert s.journal_path == Path(".snaphook/journal.sqlite3")
    assert s.hooks == Path("hooks")
    assert s.config is None
    assert s.bindings == []
    assert s.sink_url is None
    assert s.function_modules == []
    assert s.env_allow is None
    assert s.log_level == "info"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SNAPHOOK_HOST", "0.0.0.0")
    monkeypatch.setenv("SNAPHOOK_PORT", "9999")
    monkeypatch.setenv("SNAPHOOK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SNAPHOOK_HOOKS", str(tmp_path / "bp"))
    monkeypatch.setenv("SNAPHOOK_MAX_WAIT", "2m")
    monkeypatch.setenv("snaphook_log_level", "debug")  # names are case-insensitive
    monkeypatch.setenv(
        "SNAPHOOK_BINDINGS", '[{"blueprint": "demo", "match": {"namespace": "demo"}}]'
    )
    s = Settings.load()
    assert (s.host, s.port) == ("0.0.0.0", 9999)
    assert s.state_dir == tmp_path / "state"
    assert s.hooks == tmp_path / "bp"
    assert s.max_wait == 120.0
    assert s.log_level == "debug"
    assert [(b.blueprint, b.match.namespace) for b in s.bindings] == [("demo", "demo")]


def test_config_file_values(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        """\
apiVersion: snaphook.io/v1
kind: Config
port: 9001
state_dir: /var/lib/snaphook
shutdown_grace: 2s
sink_url: http://sink.example/
bindings:
  - blueprint: demo
    match: {namespace: demo, kind: Deployment, labels: {app: web}}
    failure_policy: ignore
    timeout: 20s
    params: {database: app}
""",
    )
    s = Settings.load(path)
    assert s.config == path
    assert s.port == 9001
    assert s.host == "127.0.0.1"  # not in the file: default
    assert s.state_dir == Path("/var/lib/snaphook")
    assert s.shutdown_grace == 2.0
    assert s.sink_url == "http://sink.example/"
    (binding,) = s.bindings
    assert binding.blueprint == "demo"
    assert binding.match.kind == "Deployment" and binding.match.labels == {"app": "web"}
    assert binding.match.name is None
    assert binding.failure_policy == "ignore"
    assert binding.timeout == 20.0
    assert binding.params == {"database": "app"}


def test_config_file_without_header_and_empty_file(tmp_path: Path) -> None:
    assert Settings.load(config(tmp_path, "port: 9002\n")).port == 9002
    assert Settings.load(config(tmp_path, "", "empty.yaml")).port == 8080


def test_precedence_flag_over_env_over_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = config(tmp_path, "port: 1001\nhost: file.example\nmax_batch: 7\n")
    monkeypatch.setenv("SNAPHOOK_PORT", "2002")
    monkeypatch.setenv("SNAPHOOK_HOST", "env.example")
    s = Settings.load(path, port=3003, host=None)  # None = flag not given
    assert s.port == 3003  # flag
    assert s.host == "env.example"  # env beats file
    assert s.max_batch == 7  # file beats default
    assert Settings.load(path).port == 2002
    monkeypatch.delenv("SNAPHOOK_PORT")
    assert Settings.load(path).port == 1001


def test_file_values_do_not_leak_into_later_loads(tmp_path: Path) -> None:
    Settings.load(config(tmp_path, "port: 1234\n"))
    assert Settings.load().port == 8080


def test_k_sink_sets_sink_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K_SINK", "http://broker.knative/default")
    assert Settings.load().sink_url == "http://broker.knative/default"
    # The explicit setting wins over the one Knative injects.
    monkeypatch.setenv("SNAPHOOK_SINK_URL", "http://explicit/")
    assert Settings.load().sink_url == "http://explicit/"
    assert Settings.load(sink_url="http://flag/").sink_url == "http://flag/"


def test_unprefixed_sink_url_env_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only SNAPHOOK_SINK_URL and K_SINK configure the sink, not some unrelated SINK_URL.
    monkeypatch.setenv("SINK_URL", "http://somebody-else/")
    assert Settings.load().sink_url is None


def test_comma_separated_lists_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAPHOOK_FUNCTION_MODULES", "tests.hookfns, my.functions ,")
    monkeypatch.setenv("SNAPHOOK_ENV_ALLOW", "REGION,STAGE")
    monkeypatch.setenv("SNAPHOOK_WEBHOOK_ALLOWED_ORIGINS", '["https://a.example"]')
    s = Settings.load()
    assert s.function_modules == ["tests.hookfns", "my.functions"]
    assert s.env_allow == ["REGION", "STAGE"]
    assert s.webhook_allowed_origins == ["https://a.example"]


def test_lists_in_file_and_flags(tmp_path: Path) -> None:
    s = Settings.load(
        config(tmp_path, "function_modules: [a.b]\nenv_allow: 'X, Y'\n"),
        webhook_allowed_origins=["https://o.example"],
    )
    assert s.function_modules == ["a.b"]
    assert s.env_allow == ["X", "Y"]
    assert s.webhook_allowed_origins == ["https://o.example"]


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("SNAPHOOK_PORT", "eighty", "port"),
        ("SNAPHOOK_PORT", "70000", "port"),
        ("SNAPHOOK_MAX_WAIT", "soon", "max_wait"),
        ("SNAPHOOK_LOG_LEVEL", "loud", "log_level"),
        ("SNAPHOOK_ENV_ALLOW", "[not json", "env_allow"),
        ("SNAPHOOK_BINDINGS", "not json", "bindings"),
        ("SNAPHOOK_BINDINGS", '[{"match": {}}]', "bindings.0.blueprint"),
    ],
)
def test_invalid_env_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    message = str(info.value)
    assert field in message
    assert message.startswith("invalid settings")


def test_invalid_file_value_names_field_and_file(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "port: -1\nbindings:\n  - blueprint: demo\n    failure_policy: maybe\n    colour: red\n",
    )
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    message = str(info.value)
    assert str(path) in message
    assert "port:" in message
    assert "bindings.0.failure_policy" in message
    assert "bindings.0.colour" in message


def test_unknown_setting_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prot"):
        Settings.load(config(tmp_path, "prot: 8080\n"))


def test_invalid_yaml_reports_the_line(tmp_path: Path) -> None:
    path = config(tmp_path, "port: 8080\nbindings:\n  - blueprint: [demo\n    match: {}\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    line = int(message.removeprefix(f"{path}:").split(":", 1)[0])
    assert 3 <= line <= 5
    assert "invalid YAML" in message


def test_config_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = config(tmp_path, "- port: 8080\n")
    with pytest.raises(ConfigError, match="must be a mapping") as info:
        Settings.load(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read config file") as info:
        Settings.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        "apiVersion: snaphook.io/v2\nkind: Config\n",
        "apiVersion: snaphook.io/v1\nkind: Blueprint\n",
        "kind: Settings\n",
    ],
)
def test_wrong_api_version_or_kind(tmp_path: Path, header: str) -> None:
    path = config(tmp_path, header + "port: 8080\n")
    expected = re.escape("expected apiVersion snaphook.io/v1, kind Config")
    with pytest.raises(ConfigError, match=expected):
        Settings.load(path)


def test_knative_port_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9123")
    assert Settings.load(None).port == 9123
    monkeypatch.setenv("SNAPHOOK_PORT", "9124")
    assert Settings.load(None).port == 9124


def test_binding_to_an_unloaded_blueprint_fails_startup(tmp_path: Path) -> None:
    from dispatcher.app import create_app

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    settings = Settings.load(
        None, hooks=hooks, state_dir=tmp_path / "s", bindings=[{"blueprint": "ghost"}]
    )
    with pytest.raises(ConfigError, match="bindings\\[0\\]: unknown blueprint 'ghost'"):
        create_app(settings)
