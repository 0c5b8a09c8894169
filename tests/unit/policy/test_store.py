"""The policy store: a bad reload is refused and the last good policy stays in force."""

from __future__ import annotations

import logging

import pytest

from broker.errors import PolicyError
from broker.policy import PolicyStore

GOOD = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
resources:
  - {match: "github://acme/*", provider: github, access: {read: {tier: read}}}
"""
NEWER = GOOD.replace("max_ttl: 1h", "max_ttl: 20m")
BAD = GOOD.replace("max_ttl: 1h", "max_ttl: forever")


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    return path


def test_first_load_with_a_bad_file_raises(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(BAD)
    with pytest.raises(PolicyError) as caught:
        PolicyStore(path)
    assert caught.value.problems[0]["line"] == 3


def test_bad_reload_keeps_the_last_good_policy(policy_file, caplog):
    store = PolicyStore(policy_file)
    before = store.current
    policy_file.write_text(BAD)
    with caplog.at_level(logging.ERROR, logger="broker.policy.store"):
        assert store.reload() is False
    assert store.current is before
    assert store.current.version == before.version
    assert store.current.tiers["read"].max_ttl == 3600
    assert any("tiers.read.max_ttl" in record.getMessage() for record in caplog.records)


def test_good_reload_switches(policy_file):
    store = PolicyStore(policy_file)
    before = store.current.version
    policy_file.write_text(NEWER)
    assert store.reload() is True
    assert store.current.version != before
    assert store.current.tiers["read"].max_ttl == 1200


def test_reload_after_a_refusal_recovers(policy_file):
    store = PolicyStore(policy_file)
    policy_file.write_text(BAD)
    assert store.reload() is False
    policy_file.write_text(NEWER)
    assert store.reload() is True
    assert store.current.tiers["read"].max_ttl == 1200


def test_unchanged_file_keeps_the_same_object(policy_file):
    store = PolicyStore(policy_file)
    before = store.current
    assert store.reload() is True
    assert store.current is before


def test_deleted_file_keeps_the_last_good(policy_file):
    store = PolicyStore(policy_file)
    before = store.current
    policy_file.unlink()
    assert store.reload() is False
    assert store.current is before


def test_shadow_is_loaded_and_kept_on_a_bad_reload(policy_file, tmp_path):
    shadow_file = tmp_path / "shadow.yaml"
    shadow_file.write_text(NEWER)
    store = PolicyStore(policy_file, shadow_path=shadow_file)
    assert store.shadow is not None and store.shadow.version != store.current.version
    shadow_before = store.shadow
    shadow_file.write_text(BAD)
    policy_file.write_text(NEWER)
    assert store.reload() is False  # one of the two files was refused
    assert store.shadow is shadow_before
    assert store.current.version == shadow_before.version  # the good main file still switched


def test_no_shadow_by_default(policy_file):
    assert PolicyStore(policy_file).shadow is None


def test_from_text():
    store = PolicyStore.from_text(GOOD, shadow_text=NEWER)
    assert store.current.tiers["read"].max_ttl == 3600
    assert store.shadow is not None and store.shadow.tiers["read"].max_ttl == 1200
    assert store.reload() is True
    with pytest.raises(PolicyError):
        PolicyStore.from_text(BAD)
