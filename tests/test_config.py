"""The config file: every problem listed with its path, ${ENV} interpolation, check-config's output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from difyq.worker.config import ConfigError, load_config, parse_config

GOOD = """
apps:
  support:
    api_key: ${DIFY_SUPPORT_KEY}
    mode: chat
    limits: {requests_per_minute: 60, max_concurrency: 4}
clients:
  crm: {token: "${CRM_TOKEN:-fallback-token}", apps: [support]}
schedules:
  digest: {cron: "0 9 * * 1-5", timezone: Europe/Berlin, app: support, query: "Digest {{ fire_time.date() }}"}
jobs: {idempotency_ttl: 24h, result_ttl: 7d, max_wait: 6h}
callbacks: {signing_secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, retry_schedule: [5s, 5m, 2h]}
"""


def test_good_config_with_env_and_durations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DIFY_SUPPORT_KEY", "app-secret")
    file = tmp_path / "difyq.yaml"
    file.write_text(GOOD)
    config = load_config(file)
    assert config.apps["support"].api_key.get_secret_value() == "app-secret"
    assert config.clients["crm"].token.get_secret_value() == "fallback-token"
    assert config.jobs.result_ttl == 7 * 86400
    assert config.callbacks.retry_schedule == [5, 300, 7200]
    assert "app-secret" not in repr(config)


def test_every_problem_is_listed_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MISSING_KEY", raising=False)
    with pytest.raises(ConfigError) as caught:
        parse_config({
            "apps": {"support": {"api_key": "${MISSING_KEY}", "mode": "chatbot", "timeout_s": -1}},
            "clients": {"crm": {"token": "t", "apps": ["nope"]}},
            "jobs": {"result_ttl": "soon"},
            "schedules": {"s": {"cron": "not cron", "timezone": "Mars/Base", "app": "support"}},
            "hooks": {"h": {"app": "ghost", "verify": {"scheme": "github"}, "query": "{{ body.x"}},
            "unknown_section": {},
        })
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "apps.support.api_key: environment variable MISSING_KEY is not set" in problems
    assert any(p.startswith("apps.support.mode: must be one of chat, agent, advanced-chat") for p in problems)
    assert any(p.startswith("apps.support.timeout_s:") for p in problems)
    assert any(p.startswith("jobs.result_ttl: must be a duration") for p in problems)
    assert any(p.startswith("schedules.s.cron:") for p in problems)
    assert any(p.startswith("schedules.s.timezone:") for p in problems)
    assert any(p.startswith("hooks.h.verify:") and "secret is required" in p for p in problems)
    assert "unknown_section: is not a known setting" in problems
    assert "Traceback" not in text


def test_cross_references_and_templates_are_checked() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({
            "apps": {"support": {"api_key": "k", "mode": "chat"}},
            "clients": {"crm": {"token": "t", "apps": ["nope"]}},
            "hooks": {"h": {"app": "ghost", "verify": {"scheme": "none"}, "query": "{{ body.x"}},
        })
    problems = caught.value.problems
    assert "clients.crm.apps: unknown app 'nope'" in problems
    assert "hooks.h.app: unknown app 'ghost'" in problems
    assert any(p.startswith("hooks.h.query: template error:") for p in problems)


def test_a_burst_is_at_most_the_request_limit() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"apps": {
            "over": {"api_key": "k", "mode": "chat", "limits": {"requests_per_minute": 20, "burst": 21}},
            "alone": {"api_key": "k", "mode": "chat", "limits": {"burst": 3}},
        }})
    assert caught.value.problems == ["apps.over.limits: burst (21) is over requests_per_minute (20)",
                                     "apps.alone.limits: burst needs requests_per_minute"]
    full = parse_config({"apps": {"a": {"api_key": "k", "mode": "chat",
                                        "limits": {"requests_per_minute": 20, "burst": 20}}}})
    assert full.apps["a"].limits is not None and full.apps["a"].limits.request_burst == 20


@pytest.mark.e2e
def test_check_config_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apps:\n  support: {api_key: k, mode: fax}\n")
    result = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "check-config", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "apps.support.mode: must be one of" in result.stderr
    assert "Traceback" not in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("apps: [unclosed\n")
    result = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "check-config", "--config", str(broken)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not valid YAML" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text("apps:\n  support: {api_key: k, mode: workflow}\n")
    result = subprocess.run([sys.executable, "-m", "difyq.producers.cli", "check-config", "--config", str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "1 app(s)" in result.stdout
