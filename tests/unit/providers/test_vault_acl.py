"""The narrowed Vault policy as text: exactly one path, exactly the capabilities, nothing a path can smuggle."""

from __future__ import annotations

import json

import pytest

from broker.errors import InvalidRequest, ProviderMisconfigured
from broker.policy.resources import parse_resource
from broker.providers.vault.acl import (
    NARROWED_POLICY_GLOB,
    broker_policy_hcl,
    capability_of_policy,
    is_shared_policy,
    narrowable_path,
    narrowed_policy,
    narrowed_policy_name,
    shared_policy_name,
)

# Every character the resource grammar lets into a segment, and the shapes KV paths take.
VALID = [
    "vault://secret/data/payments/api-key",
    "vault://secret/data/a.b_c~d@e=f,g:h-i",
    "vault://kv2/data/team/x/y/z",
]


@pytest.mark.parametrize("resource", VALID)
def test_the_policy_names_exactly_the_parsed_path(resource: str) -> None:
    path = narrowable_path(parse_resource(resource).segments)
    document = json.loads(narrowed_policy(path, ["read"]))
    assert document == {"path": {resource.removeprefix("vault://"): {"capabilities": ["read"]}}}


# `a+b` is literal to OpenBao 2.7 (only a whole `+` segment is a wildcard), refused all the same.
@pytest.mark.parametrize("segments", [("secret", "data", "+"), ("secret", "data", "a+b"), ("secret", "data", "*"),
                                      ("secret", "data", "x*"), ("secret", "", "x"), ()])
def test_a_path_openbao_would_read_as_a_pattern_is_refused(segments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        narrowable_path(segments)
    assert caught.value.code == "invalid-resource"


def test_capabilities_are_sorted_unique_and_never_list_sudo_or_root() -> None:
    assert json.loads(narrowed_policy("a/b", ["update", "read", "read"]))["path"]["a/b"]["capabilities"] == [
        "read", "update"]
    for bad in (["list"], ["sudo"], ["root"], ["deny"], [], ["read", "sudo"]):
        with pytest.raises(ProviderMisconfigured):
            narrowed_policy("a/b", bad)


def test_policy_names_come_from_capability_ids_and_back() -> None:
    cap = "cap_" + "0123456789abcdef" * 2
    assert narrowed_policy_name(cap) == "jit-" + cap
    assert capability_of_policy(narrowed_policy_name(cap)) == cap
    for other in ("jit-broker-self", "kv-payments-read", "default", "root", "jit-cap_", "jit-cap_../x", "xjit-cap_1"):
        assert capability_of_policy(other) is None
    for bad in ("cap_", "ses_123", "cap_../../x", 'cap_a"b', "cap_a/b"):
        with pytest.raises(ProviderMisconfigured):
            narrowed_policy_name(bad)


@pytest.mark.parametrize("path", ["secret/data/a", "secret/data/ünï", "kv/x/\"y", "a/b c/d", "a/{{x}}"])
def test_a_shared_policy_is_named_by_what_it_grants(path: str) -> None:
    read, write = narrowed_policy(path, ["read"]), narrowed_policy(path, ["read", "update"])
    name = shared_policy_name(read)
    assert name == shared_policy_name(narrowed_policy(path, ["read", "read"]))  # same grant, same name
    assert name != shared_policy_name(write) and name != shared_policy_name(narrowed_policy(path + "x", ["read"]))
    assert is_shared_policy(name) and name.startswith("jit-cap_")  # inside the role's jit-cap_* glob
    assert capability_of_policy(name) is None  # never taken for one capability's leftover
    for other in ("jit-cap_acl-", "jit-cap_acl-" + "0" * 39, "jit-cap_acl-" + "G" * 40, "jit-cap_" + "0" * 32):
        assert not is_shared_policy(other)


def test_the_broker_may_write_and_delete_only_narrowed_policies() -> None:
    hcl = broker_policy_hcl("jit-broker", ())
    assert f'path "sys/policies/acl/{NARROWED_POLICY_GLOB}" {{\n  capabilities = ["create", "update", "delete"]\n}}' in hcl
    assert 'path "sys/policies/acl" {\n  capabilities = ["list"]\n}' in hcl
    assert hcl.count("sys/policies/acl") == 2  # no other policy is the broker's to touch


def test_the_policy_file_accepts_exactly_the_narrowable_capabilities() -> None:
    import typing

    from broker.policy.models import Access
    from broker.providers.vault.acl import NARROWABLE

    (item,) = typing.get_args(typing.get_args(Access.model_fields["capabilities"].annotation)[0])
    assert typing.get_args(item) == NARROWABLE
