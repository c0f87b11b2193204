"""Settings: one object, priorities defaults < file < environment < flags, all state under home."""

from __future__ import annotations

import pytest

from assistant.config import Settings


def test_priorities_file_env_overrides(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9001\ntemperature = 0.2\nmodel = "from-file"\n')
    s = Settings.load(cfg, env={"ASSISTANT_PORT": "9002", "ASSISTANT_HOME": str(tmp_path / "h")}, model="flag")
    assert s.port == 9002 and s.temperature == 0.2 and s.model == "flag"
    assert s.home == tmp_path / "h"
    assert s.db_url == f"sqlite:///{tmp_path / 'h' / 'assistant.db'}"
    assert s.adapters_dir.parent == s.models_dir.parent == s.home


def test_config_file_in_home_is_read(tmp_path):
    (tmp_path / "config.toml").write_text('max_message_chars = 123\n')
    assert Settings.load(env={"ASSISTANT_HOME": str(tmp_path)}).max_message_chars == 123


def test_defaults_are_offline_and_local(tmp_path):
    s = Settings.load(env={}, home=tmp_path)
    assert s.host == "127.0.0.1" and s.model.startswith("embedded:") and s.device == "auto"


def test_unknown_or_invalid_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ASSISTANT_PROT"):
        Settings.load(env={"ASSISTANT_PROT": "1"})
    with pytest.raises(ValueError):
        Settings.load(env={"ASSISTANT_PORT": "not-a-number"})
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense_key = 1\n")
    with pytest.raises(ValueError):
        Settings.load(bad, env={})
    assert Settings.load(env={"ASSISTANT_TEST_PG_URL": "x"}, home=tmp_path).home == tmp_path
