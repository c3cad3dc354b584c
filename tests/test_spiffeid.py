"""Table-driven tests for SPIFFE ID and trust domain parsing.

Cases are derived from the SPIFFE ID standard (spiffe/spiffe, standards/SPIFFE-ID.md,
sections 2, 2.1, 2.2 and 2.3) and from the behaviour exercised by go-spiffe v2's
spiffeid tests (id_test.go, trustdomain_test.go). Every rejected input is checked
for both the exception type and a message fragment naming the broken rule.
"""

from __future__ import annotations

import dataclasses
import re
import string

import hypothesis
import pytest
from hypothesis import strategies as st

from meshid.errors import InvalidSpiffeIdError, MeshIdError
from meshid.spiffeid import SpiffeId, TrustDomain

# Message fragments, one per rule of the standard.
EMPTY = "cannot be empty"
SCHEME = "scheme is missing or invalid"
SCHEME_CASE = "scheme must be lowercase"
TD_MISSING = "trust domain is missing"
TD_CHARS = (
    "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
)
TD_CASE = "trust domain must be lowercase"
TD_TOO_LONG = "trust domain is longer than 255 bytes"
TD_NO_PATH = "a trust domain name has no path"
PORT = "a port is not allowed"
USERINFO = "userinfo is not allowed"
PERCENT = "percent-encoding is not allowed"
QUERY = "a query is not allowed"
FRAGMENT = "a fragment is not allowed"
TRAILING = "path cannot have a trailing slash"
EMPTY_SEGMENT = "path cannot contain empty segments"
DOT_SEGMENT = "path cannot contain dot segments"
PATH_CHARS = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
ID_TOO_LONG = "longer than 2048 bytes"

MAX_ID = 2048
MAX_TD = 255

TD_ALLOWED = set(string.ascii_lowercase + string.digits + ".-_")
PATH_ALLOWED = set(string.ascii_letters + string.digits + ".-_")


def _raises(fragment: str):
    return pytest.raises(InvalidSpiffeIdError, match=re.escape(fragment))


def _id_of_length(n: int, prefix: str = "spiffe://trustdomain/") -> str:
    text = prefix + "a" * (n - len(prefix))
    assert len(text.encode()) == n
    return text


# --------------------------------------------------------------------------- valid IDs

VALID_IDS = [
    # (text, trust domain, path)
    pytest.param("spiffe://trustdomain", "trustdomain", "", id="no-path"),
    pytest.param("spiffe://trustdomain/path", "trustdomain", "/path", id="one-segment"),
    pytest.param("spiffe://domain.test/path/element", "domain.test", "/path/element", id="two-segments"),
    pytest.param(
        "spiffe://staging.example.com/payments/mysql",
        "staging.example.com", "/payments/mysql", id="std-service-mysql",
    ),
    pytest.param(
        "spiffe://staging.example.com/payments/web-fe",
        "staging.example.com", "/payments/web-fe", id="std-service-web-fe",
    ),
    pytest.param(
        "spiffe://k8s-west.example.com/ns/staging/sa/default",
        "k8s-west.example.com", "/ns/staging/sa/default", id="std-service-owner",
    ),
    pytest.param(
        "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
        "example.com", "/9eebccd2-12bf-40a6-b262-65fe0487d453", id="std-opaque",
    ),
    pytest.param(
        "spiffe://trust_domain_name.example.com",
        "trust_domain_name.example.com", "", id="std-underscore-td",
    ),
    pytest.param("spiffe://192.168.0.1/path", "192.168.0.1", "/path", id="std-ipv4-td"),
    pytest.param("spiffe://0/1", "0", "/1", id="digits-only"),
    pytest.param("spiffe://a/b", "a", "/b", id="single-chars"),
    pytest.param("spiffe://td-1_x.y/x", "td-1_x.y", "/x", id="td-every-class"),
    pytest.param("spiffe://trustdomain/PATH", "trustdomain", "/PATH", id="path-upper"),
    pytest.param("spiffe://trustdomain/Path0", "trustdomain", "/Path0", id="path-mixed-case"),
    pytest.param("spiffe://trustdomain/0123456789", "trustdomain", "/0123456789", id="path-digits"),
    pytest.param("spiffe://trustdomain/a.b-c_D", "trustdomain", "/a.b-c_D", id="path-every-class"),
    pytest.param("spiffe://trustdomain/-", "trustdomain", "/-", id="path-dash-only"),
    pytest.param("spiffe://trustdomain/_", "trustdomain", "/_", id="path-underscore-only"),
    pytest.param("spiffe://trustdomain/.path", "trustdomain", "/.path", id="leading-dot"),
    pytest.param("spiffe://trustdomain/..path", "trustdomain", "/..path", id="leading-dot-dot"),
    pytest.param("spiffe://trustdomain/...", "trustdomain", "/...", id="three-dots"),
    pytest.param("spiffe://trustdomain/path./x", "trustdomain", "/path./x", id="trailing-dot-in-segment"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID_IDS)
def test_parse_valid(text: str, td: str, path: str) -> None:
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain.parse(td)
    assert sid.trust_domain.name == td
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId.parse(str(sid)) == sid


# ------------------------------------------------------------------------- invalid IDs

INVALID_IDS = [
    # (text, message fragment)
    pytest.param("", EMPTY, id="empty"),
    # Scheme: "Valid SPIFFE IDs MUST have the scheme set to `spiffe`".
    pytest.param("s", SCHEME, id="scheme-truncated"),
    pytest.param("spiffe:/", SCHEME, id="scheme-single-slash"),
    pytest.param("spiffe:path/element", SCHEME, id="scheme-no-slashes"),
    pytest.param("spiffe:/path/element", SCHEME, id="scheme-one-slash-path"),
    pytest.param("spiffe:/trustdomain/path", SCHEME, id="scheme-one-slash-td"),
    pytest.param("http://domain.test/path/element", SCHEME, id="scheme-http"),
    pytest.param("https://trustdomain", SCHEME, id="scheme-https"),
    pytest.param("192.168.2.2:6688", SCHEME, id="scheme-host-port"),
    pytest.param("trustdomain/path", SCHEME, id="scheme-missing"),
    pytest.param("//trustdomain/path", SCHEME, id="scheme-relative"),
    pytest.param(" spiffe://trustdomain", SCHEME, id="scheme-leading-space"),
    pytest.param("spiffe//trustdomain", SCHEME, id="scheme-no-colon"),
    pytest.param("Spiffe://", SCHEME_CASE, id="scheme-capitalised"),
    pytest.param("SPIFFE://domain.test/path/element", SCHEME_CASE, id="scheme-upper"),
    pytest.param("sPiFfE://trustdomain", SCHEME_CASE, id="scheme-mixed-case"),
    # Trust domain: "The host part of the authority MUST NOT be empty."
    pytest.param("spiffe://", TD_MISSING, id="td-missing"),
    pytest.param("spiffe:///", TD_MISSING, id="td-missing-slash"),
    pytest.param("spiffe:///path", TD_MISSING, id="td-missing-path"),
    pytest.param("spiffe:///path/element", TD_MISSING, id="td-missing-two-segments"),
    # "The userinfo and port parts of the authority component MUST be empty."
    pytest.param("spiffe://domain.test:8080/path/element", PORT, id="port"),
    pytest.param("spiffe://domain.test:/path/element", PORT, id="empty-port"),
    pytest.param("spiffe://trustdomain:443", PORT, id="port-no-path"),
    pytest.param("spiffe://[::1]/path", PORT, id="ipv6-excluded"),
    pytest.param("spiffe://user:password@test.org/path/element", USERINFO, id="userinfo-password"),
    pytest.param("spiffe://user@test.org", USERINFO, id="userinfo"),
    # "The host part of the authority MUST be lowercase."
    pytest.param("spiffe://Example.org/path", TD_CASE, id="td-capitalised"),
    pytest.param("spiffe://TRUSTDOMAIN", TD_CASE, id="td-upper"),
    # "... MUST contain only letters, numbers, dots, dashes, and underscores ([a-z0-9.-_])."
    pytest.param("spiffe://trust$domain", TD_CHARS, id="td-dollar"),
    pytest.param("spiffe://trust domain/path", TD_CHARS, id="td-space"),
    pytest.param("spiffe://trust+domain", TD_CHARS, id="td-plus"),
    pytest.param("spiffe://ex\u00e4mple.org/path", TD_CHARS, id="td-non-ascii"),
    pytest.param("spiffe://\u212aexample/path", TD_CHARS, id="td-kelvin-sign"),
    pytest.param("spiffe://\ud800/path", TD_CHARS, id="td-lone-surrogate"),
    # "... MUST NOT contain percent-encoded characters."
    pytest.param("spiffe://%F0%9F%A4%AF/path", PERCENT, id="td-percent-unicode"),
    pytest.param("spiffe://%62%61%64/path", PERCENT, id="td-percent-ascii"),
    pytest.param("spiffe://trust%2Edomain", PERCENT, id="td-percent-dot"),
    # "... MUST NOT include a query or fragment component."
    pytest.param("spiffe://domain.test/path/element?query=1", QUERY, id="query"),
    pytest.param("spiffe://trustdomain?x=1", QUERY, id="query-no-path"),
    pytest.param("spiffe://trustdomain/?x", QUERY, id="query-after-slash"),
    pytest.param("spiffe://trustdomain/path?q/", QUERY, id="query-ending-in-slash"),
    pytest.param("spiffe://domain.test/path/element?#fragment-1", QUERY, id="query-empty-then-fragment"),
    pytest.param("spiffe://trustdomain/path#frag", FRAGMENT, id="fragment"),
    pytest.param("spiffe://trustdomain#frag", FRAGMENT, id="fragment-no-path"),
    pytest.param("spiffe://trustdomain/path#f/", FRAGMENT, id="fragment-ending-in-slash"),
    # Path: "MUST NOT include a trailing /" / "segments that are empty".
    pytest.param("spiffe://trustdomain/", TRAILING, id="trailing-slash-root"),
    pytest.param("spiffe://trustdomain/path/", TRAILING, id="trailing-slash"),
    pytest.param("spiffe://trustdomain//", TRAILING, id="double-slash-only"),
    pytest.param("spiffe://trustdomain//path", EMPTY_SEGMENT, id="empty-first-segment"),
    pytest.param("spiffe://trustdomain/a//b", EMPTY_SEGMENT, id="empty-middle-segment"),
    # "... or are relative path modifiers (i.e. ., ..)".
    pytest.param("spiffe://trustdomain/.", DOT_SEGMENT, id="dot"),
    pytest.param("spiffe://trustdomain/./path", DOT_SEGMENT, id="dot-first"),
    pytest.param("spiffe://trustdomain/path/./other", DOT_SEGMENT, id="dot-middle"),
    pytest.param("spiffe://trustdomain/path/..", DOT_SEGMENT, id="dot-dot-last"),
    pytest.param("spiffe://trustdomain/..", DOT_SEGMENT, id="dot-dot"),
    pytest.param("spiffe://trustdomain/../path", DOT_SEGMENT, id="dot-dot-first"),
    pytest.param("spiffe://trustdomain/path/../other", DOT_SEGMENT, id="dot-dot-middle"),
    # "The path component MUST NOT include percent-encoded characters."
    pytest.param("spiffe://trustdomain/%F0%9F%A4%AF", PERCENT, id="path-percent-unicode"),
    pytest.param("spiffe://trustdomain/%62%61%64", PERCENT, id="path-percent-ascii"),
    pytest.param("spiffe://domain.test/path/elem%5uent", PERCENT, id="path-bad-escape"),
    pytest.param("spiffe://domain.test/path/element%5", PERCENT, id="path-truncated-escape"),
    # "Individual path segments MUST contain only ... ([a-zA-Z0-9.-_])."
    pytest.param("spiffe://trustdomain/path$", PATH_CHARS, id="path-dollar"),
    pytest.param("spiffe://domain.test/pa:th/element:", PATH_CHARS, id="path-colon"),
    pytest.param("spiffe://domain.test/pa@th", PATH_CHARS, id="path-at"),
    pytest.param("spiffe://domain.test/p!a$t&h'/(e)l*e+m,e;n=t", PATH_CHARS, id="path-sub-delims"),
    pytest.param("spiffe://domain.test/path/elem[ent", PATH_CHARS, id="path-open-bracket"),
    pytest.param("spiffe://domain.test/path/elem]ent", PATH_CHARS, id="path-close-bracket"),
    pytest.param("spiffe://domain.test/spiffe://domain.test/path", PATH_CHARS, id="path-is-an-id"),
    pytest.param("spiffe://trustdomain/pa th", PATH_CHARS, id="path-space"),
    pytest.param("spiffe://trustdomain/p\u00e4th", PATH_CHARS, id="path-non-ascii"),
    pytest.param("spiffe://trustdomain/a\\b", PATH_CHARS, id="path-backslash"),
    pytest.param("spiffe://trustdomain/path~", PATH_CHARS, id="path-tilde"),
    pytest.param("spiffe://trustdomain/path\n", PATH_CHARS, id="path-newline"),
    # Section 2.3 limits.
    pytest.param(_id_of_length(MAX_ID + 1), ID_TOO_LONG, id="id-2049-bytes"),
    pytest.param(
        "spiffe://trustdomain/" + "a" * (MAX_ID - 22) + "\u00e9", ID_TOO_LONG, id="id-length-in-bytes",
    ),
    pytest.param("spiffe://" + "a" * (MAX_TD + 1), TD_TOO_LONG, id="td-256-bytes"),
    pytest.param("spiffe://" + "a" * (MAX_TD + 1) + "/path", TD_TOO_LONG, id="td-256-bytes-with-path"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID_IDS)
def test_parse_invalid(text: str, fragment: str) -> None:
    with _raises(fragment):
        SpiffeId.parse(text)


def test_invalid_error_is_value_error_and_meshid_error() -> None:
    with pytest.raises(ValueError, match=re.escape(SCHEME)) as info:
        SpiffeId.parse("http://example.org")
    assert isinstance(info.value, MeshIdError)
    assert isinstance(info.value, InvalidSpiffeIdError)


# -------------------------------------------------------------------------- length limits

LENGTH_OK = [
    pytest.param(_id_of_length(MAX_ID), id="id-exactly-2048"),
    pytest.param(_id_of_length(MAX_ID, "spiffe://" + "t" * MAX_TD + "/"), id="id-2048-with-255-td"),
    pytest.param("spiffe://" + "a" * MAX_TD, id="td-exactly-255"),
    pytest.param("spiffe://" + "a" * MAX_TD + "/path", id="td-exactly-255-with-path"),
]


@pytest.mark.parametrize("text", LENGTH_OK)
def test_length_limits_inclusive(text: str) -> None:
    assert len(text.encode()) <= MAX_ID
    assert str(SpiffeId.parse(text)) == text


def test_trust_domain_length_limits() -> None:
    assert TrustDomain.parse("a" * MAX_TD).name == "a" * MAX_TD
    with _raises(TD_TOO_LONG):
        TrustDomain.parse("a" * (MAX_TD + 1))


# -------------------------------------------------------- character sweeps (0x00..0xFF)

def _td_char_rule(c: str) -> str | None:
    """The rule a character breaks inside the trust domain of a full SPIFFE ID."""
    if c in TD_ALLOWED:
        return None
    special = {"?": QUERY, "#": FRAGMENT, "%": PERCENT, ":": PORT, "@": USERINFO}
    if c in special:
        return special[c]
    if c in string.ascii_uppercase:
        return TD_CASE
    return TD_CHARS


def _bare_td_char_rule(c: str) -> str | None:
    """The rule a character breaks in a bare trust domain name."""
    if c == "/":
        return TD_NO_PATH
    if c in "?#":
        return TD_CHARS
    return _td_char_rule(c)


def _path_char_rule(c: str) -> str | None:
    if c in PATH_ALLOWED:
        return None
    return {"?": QUERY, "#": FRAGMENT, "%": PERCENT}.get(c, PATH_CHARS)


ALL_BYTES = [pytest.param(chr(i), id=f"{i:02X}") for i in range(256)]
ALL_BUT_SLASH = [p for p in ALL_BYTES if p.values[0] != "/"]


@pytest.mark.parametrize("c", ALL_BUT_SLASH)
def test_trust_domain_character_in_id(c: str) -> None:
    text = f"spiffe://trustdomain{c}/path"
    rule = _td_char_rule(c)
    if rule is None:
        sid = SpiffeId.parse(text)
        assert sid.trust_domain.name == "trustdomain" + c
        assert sid.path == "/path"
    else:
        with _raises(rule):
            SpiffeId.parse(text)


@pytest.mark.parametrize("c", ALL_BYTES)
def test_trust_domain_character_bare(c: str) -> None:
    rule = _bare_td_char_rule(c)
    if rule is None:
        td = TrustDomain.parse("trustdomain" + c)
        assert td.name == "trustdomain" + c
        assert TrustDomain.parse("spiffe://trustdomain" + c) == td
    else:
        with _raises(rule):
            TrustDomain.parse("trustdomain" + c)


@pytest.mark.parametrize("c", ALL_BUT_SLASH)
def test_path_character(c: str) -> None:
    text = f"spiffe://trustdomain/path{c}"
    rule = _path_char_rule(c)
    if rule is None:
        assert SpiffeId.parse(text).path == "/path" + c
    else:
        with _raises(rule):
            SpiffeId.parse(text)


# ------------------------------------------------------------------- TrustDomain.parse

TD_VALID = [
    # (text, expected name)
    pytest.param("trustdomain", "trustdomain", id="bare"),
    pytest.param("example.org", "example.org", id="bare-dns"),
    pytest.param("192.168.0.1", "192.168.0.1", id="bare-ipv4"),
    pytest.param("trust_domain_name.example.com", "trust_domain_name.example.com", id="bare-underscore"),
    pytest.param("spiffe://trustdomain", "trustdomain", id="id-without-path"),
    pytest.param("spiffe://trustdomain/path", "trustdomain", id="id-with-path"),
    pytest.param("spiffe://k8s-west.example.com/ns/staging/sa/default", "k8s-west.example.com", id="id-deep"),
]


@pytest.mark.parametrize(("text", "name"), TD_VALID)
def test_trust_domain_parse_valid(text: str, name: str) -> None:
    td = TrustDomain.parse(text)
    assert td.name == name
    assert str(td) == name
    assert td.id() == SpiffeId.parse("spiffe://" + name)
    assert str(td.id()) == "spiffe://" + name


TD_INVALID = [
    pytest.param("", EMPTY, id="empty"),
    pytest.param("spiffe://", TD_MISSING, id="id-td-missing"),
    pytest.param("spiffe:///path", TD_MISSING, id="id-td-missing-path"),
    pytest.param("spiffe:/trustdomain/path", SCHEME, id="id-bad-scheme"),
    pytest.param("http://example.org", SCHEME, id="id-http"),
    pytest.param("SPIFFE://trustdomain", SCHEME_CASE, id="id-upper-scheme"),
    pytest.param("spiffe://trustdomain/", TRAILING, id="id-trailing-slash"),
    pytest.param("spiffe://trustdomain/path/", TRAILING, id="id-path-trailing-slash"),
    pytest.param("spiffe://%F0%9F%A4%AF/path", PERCENT, id="id-td-percent"),
    pytest.param("spiffe://trustdomain/%F0%9F%A4%AF", PERCENT, id="id-path-percent"),
    pytest.param("spiffe://trust$domain", TD_CHARS, id="id-td-dollar"),
    pytest.param("spiffe://trustdomain/path$", PATH_CHARS, id="id-path-dollar"),
    pytest.param("BAD", TD_CASE, id="upper"),
    pytest.param("Example.org", TD_CASE, id="capitalised"),
    pytest.param("example.org:8080", PORT, id="port"),
    pytest.param("user@example.org", USERINFO, id="userinfo"),
    pytest.param("ex%41mple.org", PERCENT, id="percent"),
    pytest.param("example.org/path", TD_NO_PATH, id="path"),
    pytest.param("exa mple", TD_CHARS, id="space"),
    pytest.param("\u212a", TD_CHARS, id="kelvin-sign"),
    pytest.param("\ud800", TD_CHARS, id="lone-surrogate"),
]


@pytest.mark.parametrize(("text", "fragment"), TD_INVALID)
def test_trust_domain_parse_invalid(text: str, fragment: str) -> None:
    with _raises(fragment):
        TrustDomain.parse(text)


# ------------------------------------------------------------------------- non-str input

NON_STR = [
    pytest.param(None, id="none"),
    pytest.param(b"spiffe://trustdomain", id="bytes"),
    pytest.param(42, id="int"),
    pytest.param(["spiffe://trustdomain"], id="list"),
]


@pytest.mark.parametrize("value", NON_STR)
def test_spiffe_id_parse_non_str(value: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        SpiffeId.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", NON_STR)
def test_trust_domain_parse_non_str(value: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        TrustDomain.parse(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- from_parts

FROM_PARTS_VALID = [
    # (trust domain, segments, expected)
    pytest.param("trustdomain", (), "spiffe://trustdomain", id="no-segments"),
    pytest.param("trustdomain", ("foo",), "spiffe://trustdomain/foo", id="one"),
    pytest.param("trustdomain", ("foo", "bar"), "spiffe://trustdomain/foo/bar", id="two"),
    pytest.param("domain.test", ("path", "element"), "spiffe://domain.test/path/element", id="str-td"),
    pytest.param(
        "spiffe://domain.test", ("path", "element"), "spiffe://domain.test/path/element", id="td-as-id",
    ),
    pytest.param("trustdomain", ("A.b-C_9",), "spiffe://trustdomain/A.b-C_9", id="every-class"),
    pytest.param("trustdomain", ("...",), "spiffe://trustdomain/...", id="three-dots"),
]


@pytest.mark.parametrize(("td", "segments", "expected"), FROM_PARTS_VALID)
def test_from_parts_valid(td: str, segments: tuple[str, ...], expected: str) -> None:
    sid = SpiffeId.from_parts(td, *segments)
    assert str(sid) == expected
    assert sid == SpiffeId.parse(expected)
    assert SpiffeId.from_parts(TrustDomain.parse(td), *segments) == sid


FROM_PARTS_INVALID = [
    pytest.param("trustdomain", ("",), EMPTY_SEGMENT, id="empty-segment"),
    pytest.param("trustdomain", ("foo", ""), EMPTY_SEGMENT, id="empty-last-segment"),
    pytest.param("trustdomain", ("/",), PATH_CHARS, id="slash-segment"),
    pytest.param("trustdomain", ("/foo",), PATH_CHARS, id="leading-slash-segment"),
    pytest.param("trustdomain", ("a/b",), PATH_CHARS, id="slash-inside-segment"),
    pytest.param("trustdomain", ("$",), PATH_CHARS, id="dollar-segment"),
    pytest.param("trustdomain", (".",), DOT_SEGMENT, id="dot-segment"),
    pytest.param("trustdomain", ("..",), DOT_SEGMENT, id="dot-dot-segment"),
    pytest.param("trustdomain", ("a?b",), QUERY, id="query-in-segment"),
    pytest.param("trustdomain", ("a#b",), FRAGMENT, id="fragment-in-segment"),
    pytest.param("trustdomain", ("%41",), PERCENT, id="percent-in-segment"),
    pytest.param("spiffe://", ("path",), TD_MISSING, id="td-missing"),
    pytest.param("", ("path",), EMPTY, id="td-empty"),
    pytest.param("Bad", ("x",), TD_CASE, id="td-upper"),
    pytest.param("trustdomain", ("a" * (MAX_ID - len("spiffe://trustdomain/") + 1),), ID_TOO_LONG, id="too-long"),
]


@pytest.mark.parametrize(("td", "segments", "fragment"), FROM_PARTS_INVALID)
def test_from_parts_invalid(td: str, segments: tuple[str, ...], fragment: str) -> None:
    with _raises(fragment):
        SpiffeId.from_parts(td, *segments)


# --------------------------------------------------------------------------- is_member_of

MEMBERSHIP = [
    # (id, trust domain, expected)
    pytest.param("spiffe://trustdomain/path/element", "trustdomain", True, id="with-path"),
    pytest.param("spiffe://trustdomain", "trustdomain", True, id="without-path"),
    pytest.param("spiffe://domain2.test/path/element", "trustdomain", False, id="other-td"),
    pytest.param("spiffe://other.domain.test/path", "domain.test", False, id="subdomain"),
    pytest.param("spiffe://domain.test/path", "other.domain.test", False, id="superdomain"),
    pytest.param("spiffe://domain.test/domain2.test", "domain2.test", False, id="td-in-path"),
]


@pytest.mark.parametrize(("text", "td", "expected"), MEMBERSHIP)
def test_is_member_of(text: str, td: str, expected: bool) -> None:
    assert SpiffeId.parse(text).is_member_of(TrustDomain.parse(td)) is expected


def test_trust_domain_is_taken_from_the_id() -> None:
    sid = SpiffeId.parse("spiffe://trustdomain/path/element")
    assert sid.trust_domain == TrustDomain.parse("trustdomain")
    assert sid.trust_domain == TrustDomain.parse("spiffe://trustdomain/other")
    assert sid.is_member_of(sid.trust_domain)


# ------------------------------------------------------------------------ value semantics

def test_spiffe_id_value_semantics() -> None:
    a = SpiffeId.parse("spiffe://trustdomain/path")
    b = SpiffeId.from_parts("trustdomain", "path")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != SpiffeId.parse("spiffe://trustdomain/Path")  # the path is case-sensitive
    assert a != SpiffeId.parse("spiffe://trustdomain")
    assert a != "spiffe://trustdomain/path"
    assert "spiffe://trustdomain/path" != a
    assert {a: 1}[b] == 1


def test_trust_domain_value_semantics() -> None:
    a = TrustDomain.parse("trustdomain")
    b = TrustDomain.parse("spiffe://trustdomain/path")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != TrustDomain.parse("other")
    assert a != "trustdomain"
    assert "trustdomain" != a


@pytest.mark.parametrize(
    ("obj", "attr", "value"),
    [
        pytest.param(SpiffeId.parse("spiffe://trustdomain/path"), "path", "/other", id="id-path"),
        pytest.param(
            SpiffeId.parse("spiffe://trustdomain/path"), "trust_domain", TrustDomain.parse("other"), id="id-td",
        ),
        pytest.param(TrustDomain.parse("trustdomain"), "name", "other", id="td-name"),
    ],
)
def test_frozen(obj: object, attr: str, value: object) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, attr, value)
    with pytest.raises((AttributeError, TypeError)):
        obj.extra = 1  # type: ignore[attr-defined]


# -- the one-pattern fast path agrees with the rules, for any input ---------------------------------

_TD_OK = set(string.ascii_lowercase + string.digits + ".-_")
_PATH_OK = set(string.ascii_letters + string.digits + ".-_")


def follows_the_standard(text: str) -> bool:
    """The SPIFFE ID standard's rules, written plainly (the reference the parser must agree with)."""
    if not text.startswith("spiffe://") or len(text.encode("utf-8", "surrogatepass")) > 2048:
        return False
    name, slash, path = text[len("spiffe://") :].partition("/")
    if not name or len(name) > 255 or not set(name) <= _TD_OK:
        return False
    return not slash or all(s not in ("", ".", "..") and set(s) <= _PATH_OK for s in path.split("/"))


_CHARS = "spifeSPIFE:/aZ09._-%?#@ \n\u00e9"
_IDS = st.one_of(
    st.text(alphabet=_CHARS, max_size=40),
    st.builds(
        lambda td, segments: "spiffe://" + td + "".join("/" + s for s in segments),
        st.text(alphabet="abz09._-A:@%", max_size=12),
        st.lists(st.text(alphabet="aZ09._-%?#/ ", max_size=5), max_size=5),
    ),
)


@hypothesis.settings(max_examples=3000, deadline=None)
@hypothesis.given(_IDS)
@hypothesis.example("spiffe://" + "a" * 255 + "/x")
@hypothesis.example("spiffe://" + "a" * 256 + "/x")
@hypothesis.example("spiffe://example.org/" + "x" * (2048 - len("spiffe://example.org/")))
@hypothesis.example("spiffe://example.org/" + "x" * (2049 - len("spiffe://example.org/")))
@hypothesis.example("spiffe://example.org/.../..x/x..")
@hypothesis.example("spiffe://example.org/a/./b")
def test_parse_accepts_exactly_what_the_standard_allows(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeIdError:
        assert not follows_the_standard(text)
    else:
        assert follows_the_standard(text)
        assert str(parsed) == text and parsed == SpiffeId(TrustDomain(parsed.trust_domain.name), parsed.path)


def test_ids_and_trust_domains_compare_and_hash_by_value_only() -> None:
    """Written-out __eq__/__hash__ (faster than the generated ones): the same semantics."""
    web = SpiffeId.parse("spiffe://example.org/ns/web")
    assert web == SpiffeId.parse("spiffe://example.org/ns/web") and hash(web) == hash(SpiffeId.parse(str(web)))
    assert web == SpiffeId.from_parts("example.org", "ns", "web")
    assert web != SpiffeId.parse("spiffe://example.org/ns/db")
    assert web != SpiffeId.parse("spiffe://example.com/ns/web")  # same path, another trust domain
    assert web != "spiffe://example.org/ns/web" and web != web.trust_domain
    assert TrustDomain.parse("example.org") == web.trust_domain != TrustDomain.parse("example.com")
    assert TrustDomain.parse("example.org") != "example.org"
    assert len({web, SpiffeId.parse(str(web)), web.trust_domain.id(), web.trust_domain}) == 3
    assert {web: 1}.get(SpiffeId.parse(str(web))) == 1 and {web.trust_domain: 2}.get(TrustDomain("example.org")) == 2
