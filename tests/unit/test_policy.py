"""Access rules: what matches, in which order, and what decides when nothing does."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from usbipy.config import Document, parse
from usbipy.policy import (
    Action,
    Client,
    ClientSelector,
    DeviceFacts,
    DeviceSelector,
    Policy,
    Rule,
)
from usbipy.tls import TlsError, certs

from ..helpers import signed_by

KEY = DeviceFacts("3-1.2", 0x1050, 0x0407, "YK123")
DISK = DeviceFacts("1-2", 0x1209, 0x0002, "MSC00000001")
PROBE = DeviceFacts("2-4", 0x0483, 0x3748, None)


def device(**fields: tuple[str, ...]) -> DeviceSelector:
    return DeviceSelector(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("selector", "facts", "expected"), [
    (device(busid=("3-1.2",)), KEY, True),
    (device(busid=("3-*",)), KEY, True),
    (device(busid=("3-?",)), KEY, False),          # ? is one character, not "1.2"
    (device(busid=("1-2", "3-1.2")), KEY, True),   # any listed value
    (device(vid_pid=("1050:0407",)), KEY, True),
    (device(vid_pid=("1050:*",)), KEY, True),
    (device(vid_pid=("1050:04?7",)), KEY, True),
    (device(vid_pid=("1050:0406",)), KEY, False),
    (device(vid_pid=("0483:374B",)), PROBE, False),
    (device(vid_pid=("0483:3748".upper(),)), PROBE, True),  # hex in either case
    (device(serial=("YK*",)), KEY, True),
    (device(serial=("yk*",)), KEY, False),         # serials are compared exactly
    (device(serial=("*",)), PROBE, False),         # no serial matches no serial pattern
    (device(vid_pid=("1050:*",), busid=("1-*",)), KEY, False),  # every field must match
    (device(vid_pid=("1050:*",), busid=("3-*",)), KEY, True),
])
def test_device_selectors(selector: DeviceSelector, facts: DeviceFacts, expected: bool) -> None:
    assert selector.matches(facts) is expected


ALICE = Client("10.1.2.3", cn="alice", sans=("alice.lab.example",))
BOB_V6 = Client("2001:db8::5", cn="bob")
MAPPED = Client("::ffff:10.1.2.3")
PLAIN = Client("192.0.2.9")


@pytest.mark.parametrize(("selector", "client", "expected"), [
    (ClientSelector(cn=("alice",)), ALICE, True),
    (ClientSelector(cn=("Alice",)), ALICE, False),  # a CN is compared exactly
    (ClientSelector(cn=("al*",)), ALICE, True),
    (ClientSelector(cn=("alice",)), PLAIN, False),  # no certificate, no CN
    (ClientSelector(san=("*.LAB.example",)), ALICE, True),  # DNS names fold case
    (ClientSelector(san=("bob*",)), ALICE, False),
    (ClientSelector(network=(ipaddress.ip_network("10.0.0.0/8"),)), ALICE, True),
    (ClientSelector(network=(ipaddress.ip_network("10.0.0.0/8"),)), MAPPED, True),
    (ClientSelector(network=(ipaddress.ip_network("10.0.0.0/8"),)), PLAIN, False),
    (ClientSelector(network=(ipaddress.ip_network("2001:db8::/32"),)), BOB_V6, True),
    (ClientSelector(network=(ipaddress.ip_network("10.0.0.0/8"),)), BOB_V6, False),
    (ClientSelector(network=(ipaddress.ip_network("10.0.0.0/8"),)), Client(), False),
    (ClientSelector(cn=("alice",), network=(ipaddress.ip_network("192.0.2.0/24"),)),
     ALICE, False),  # the right name from the wrong network
    (ClientSelector(cn=("bob", "alice")), ALICE, True),
])
def test_client_selectors(selector: ClientSelector, client: Client, expected: bool) -> None:
    assert selector.matches(client) is expected


def test_first_match_wins_then_the_default() -> None:
    deny_key_to_all = Rule(Action.DENY, device(vid_pid=("1050:*",)), number=1)
    allow_alice = Rule(Action.ALLOW, client=ClientSelector(cn=("alice",)), number=2)
    policy = Policy((deny_key_to_all, allow_alice), Action.DENY, "the default (deny)")
    assert policy.decide(ALICE, KEY).rule is deny_key_to_all  # earlier rule wins
    assert not policy.decide(ALICE, KEY).allowed
    decision = policy.decide(ALICE, DISK)
    assert decision.allowed and decision.rule is allow_alice
    assert decision.reason == "rule 2 (allow client cn=alice)"
    nobody = policy.decide(PLAIN, DISK)
    assert not nobody.allowed and nobody.rule is None
    assert nobody.reason == "the default (deny)"
    # the same rules in the other order decide otherwise
    swapped = Policy((allow_alice, deny_key_to_all), Action.DENY)
    assert swapped.decide(ALICE, KEY).allowed


def test_client_names_are_escaped_for_logs() -> None:
    forged = Client("10.0.0.1", cn="x\nusbipyd: INFO: forged\x1b[2J")
    assert "\n" not in forged.name and "\x1b" not in forged.name
    assert forged.name.startswith("CN=x\\n") and forged.name.endswith("from 10.0.0.1")


def _policy(text: str, tmp_path: Path) -> Policy:
    path = tmp_path / "usbipyd.toml"
    path.write_text(text)
    config = parse(Document.read(path))
    assert config.policy is not None
    return config.policy


def test_names_from_the_file_match_devices(tmp_path: Path) -> None:
    policy = _policy("""
[names]
yubikey = { vid_pid = "1050:*", serial = "YK*" }
team-disk = { busid = "1-2" }
team-probe = { vid_pid = "0483:3748" }

[policy]
default = "deny"
[[policy.rule]]
action = "allow"
client.cn = "alice"
device.name = "yubikey"
[[policy.rule]]
action = "allow"
client = { network = "10.0.0.0/8" }
device = { name = "team-*" }
""", tmp_path)
    assert policy.decide(ALICE, KEY).reason.startswith("rule 1 (allow client cn=alice "
                                                       "device name=yubikey, usbipyd.toml line")
    assert policy.decide(ALICE, DISK).rule is policy.rules[1]
    assert policy.decide(ALICE, PROBE).rule is policy.rules[1]
    assert not policy.decide(PLAIN, PROBE).allowed
    assert not policy.decide(BOB_V6, KEY).allowed  # bob is not alice
    # a yubikey without the serial the name asks for is not one
    assert not policy.decide(ALICE, DeviceFacts("3-1", 0x1050, 0x0407, "OTHER")).allowed


def test_a_ca_rule_matches_the_ca_that_issued_the_client_certificate(tmp_path: Path) -> None:
    lab, office = tmp_path / "lab", tmp_path / "office"
    certs.init_ca(lab, name="lab CA")
    certs.init_ca(office, name="office CA")
    lab_client = certs.issue("carol", server=False, base=lab)
    office_client = certs.issue("carol", server=False, base=office)
    policy = _policy(f"""
[policy]
default = "deny"
[[policy.rule]]
action = "allow"
client = {{ ca = "{lab / 'tls/ca.pem'}", cn = "carol" }}
""", tmp_path)

    def client(issued: certs.Issued) -> Client:
        der = ssl.PEM_cert_to_DER_cert(issued.cert.read_text())
        return Client("10.0.0.1", cn="carol", certificate=der)

    assert policy.decide(client(lab_client), DISK).allowed
    # the same name from the other CA is someone else
    assert not policy.decide(client(office_client), DISK).allowed
    assert not policy.decide(Client("10.0.0.1", cn="carol"), DISK).allowed  # no certificate



def test_a_ca_rule_is_not_fooled_by_another_ca_of_the_same_name(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ca_a = certs.init_ca(a, name="usbipy CA")
    ca_b = certs.init_ca(b, name="usbipy CA")
    policy = _policy(f"""
[policy]
default = "deny"
[[policy.rule]]
action = "allow"
client.ca = "{a / 'tls/ca.pem'}"
""", tmp_path)
    def carol_of(ca: certs.Issued) -> Client:
        return Client("10.0.0.1", cn="carol",
                      certificate=signed_by(ca, "carol").public_bytes(Encoding.DER))

    assert policy.decide(carol_of(ca_a), DISK).allowed
    # B's client, named as A's, with no key identifier to tell them apart (signed_by
    # adds no AuthorityKeyIdentifier)
    assert not policy.decide(carol_of(ca_b), DISK).allowed


def test_cert_init_names_each_ca_apart(tmp_path: Path) -> None:
    from cryptography import x509

    names = set()
    for base in (tmp_path / "one", tmp_path / "two"):
        made = certs.init_ca(base)
        names.add(x509.load_pem_x509_certificate(made.cert.read_bytes()).subject
                  .rfc4514_string())
    assert len(names) == 2
    assert all(n.startswith(f"CN=usbipy CA on {socket.gethostname()} ") for n in names)
    made = certs.init_ca(tmp_path / "three", name="lab 3")
    assert x509.load_pem_x509_certificate(made.cert.read_bytes()).subject.rfc4514_string() \
        == "CN=lab 3"
    with pytest.raises(TlsError, match="printable"):
        certs.init_ca(tmp_path / "four", name="lab\n4")
