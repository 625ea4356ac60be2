"""Config validation and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config.load import load
from tests.support.env import ROOT


def test_example_config_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(ROOT / "config" / "proxy.yaml")]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 models")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("models: []", "Expected `array` of length >= 1 - at `$.models`"),
        ("models:\n  - name: a\n    deployments: []", "at `$.models[0].deployments`"),
        (
            "models:\n  - name: a\n    deployments:\n      - base_url: http://x\n"
            "        timeouts: {connect: fast}",
            "Expected `float`, got `str` - at `$.models[0].deployments[0].timeouts.connect`",
        ),
        (
            "models:\n  - name: a\n    deployments:\n      - base_url: http://x\n        wieght: 2",
            "unknown field `wieght`",
        ),
        ("models:\n  - name: a\n    deployments:\n      - base_url: ftp://x", "base_url"),
        (
            "models:\n  - name: a\n    deployments: [{base_url: 'http://x'}]\n"
            "  - name: a\n    deployments: [{base_url: 'http://y'}]",
            "duplicate model name 'a'",
        ),
        (
            "models:\n  - name: a\n    deployments:\n      - base_url: http://x\n"
            "        api_key_env: MORNGPT_TEST_UNSET_VARIABLE",
            "environment variable MORNGPT_TEST_UNSET_VARIABLE is not set",
        ),
        ("models: [", "not valid YAML/JSON"),
        (
            "server: {port: 99999}\nmodels: [{name: a, deployments: [{base_url: 'http://x'}]}]",
            "port",
        ),
    ],
)
def test_bad_config_fails_with_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1


def test_upstream_key_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MORNGPT_TEST_KEY", "sk-from-env")
    path = tmp_path / "proxy.json"
    path.write_text(
        '{"models": [{"name": "a", "deployments": '
        '[{"base_url": "http://x/v1/", "api_key_env": "MORNGPT_TEST_KEY"}]}]}'
    )
    config = load(path)
    deployment = config.models[0].deployments[0]
    assert deployment.api_key == "sk-from-env"
    assert deployment.base_url == "http://x/v1"
    assert deployment.name == "a/0"
    assert "sk-from-env" not in repr(config)  # keys never show in a repr or a log line


def test_missing_file_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "/nonexistent/proxy.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err
