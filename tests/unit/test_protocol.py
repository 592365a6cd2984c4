"""Unit tests for erofs_domains.programs.ondemand.protocol (pure encode/decode/format code)."""

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_domains.programs.ondemand import protocol as P
from erofs_domains.programs.ondemand.protocol import (
    CloseRequest,
    OpenRequest,
    ProtocolError,
    ReadRequest,
    classify_copen,
    command,
    copen,
    copen_raw,
    copen_styled,
    decode,
    encode,
    encode_close,
    encode_header,
    encode_open,
    encode_read,
    kstrtoul,
)

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
volume_keys = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                      max_size=60).filter(lambda s: len(s.encode()) <= 255)
cookie_keys = st.binary(max_size=255)


def test_constants():
    assert (P.OP_OPEN, P.OP_CLOSE, P.OP_READ) == (0, 1, 2)
    assert P.CACHEFILES_IOC_READ_COMPLETE == (1 << 30) | (4 << 16) | (0x98 << 8) | 1 == 0x40049801
    assert P.MSG_MAX == 1024
    # the largest possible OPEN fits one read() buffer
    assert P.OPEN_FIXED_SIZE + P.VOLUME_KEY_MAX + P.COOKIE_KEY_MAX <= P.MSG_MAX


def test_reference_example_open():
    msg = encode_open(7, 3, "erofs,mydomain", b"blob1", fd=4)
    assert len(msg) == 52
    assert struct.unpack_from("<IIII", msg, 0) == (7, P.OP_OPEN, 52, 3)
    assert struct.unpack_from("<IIII", msg, 16) == (15, 5, 4, 0)
    assert msg[32:] == b"erofs,mydomain\0blob1"
    req = decode(msg)
    assert req == OpenRequest(7, 3, "erofs,mydomain", b"blob1", 4, 0)
    assert req.name == "blob1" and req.op == "OPEN"


def test_vm_observed_open_layout():
    # reference section 7: fsid=img1 -> len=47, volume_key_size 11, cookie_key_size 4
    req = decode(encode_open(0, 1, "erofs,img1", "img1", 4))
    assert (req.volume_key, req.cookie_key) == ("erofs,img1", b"img1")
    assert len(encode(req)) == 47


def test_read_and_close_layout():
    msg = encode_read(9, 2, 4096, 12288)
    assert msg == struct.pack("<IIIIQQ", 9, P.OP_READ, 32, 2, 4096, 12288)
    assert decode(msg) == ReadRequest(9, 2, 4096, 12288)
    msg = encode_close(10, 2)
    assert msg == struct.pack("<IIII", 10, P.OP_CLOSE, 16, 2)
    assert decode(msg) == CloseRequest(10, 2)


@given(u32, u32, volume_keys, cookie_keys, u32, u32)
def test_open_round_trip(msg_id, object_id, vkey, ckey, fd, flags):
    req = OpenRequest(msg_id, object_id, vkey, ckey, fd, flags)
    data = encode(req)
    assert len(data) == 32 + len(vkey.encode()) + 1 + len(ckey)
    assert decode(data) == req


@given(u32, u32, u64, u64)
def test_read_round_trip(msg_id, object_id, off, length):
    req = ReadRequest(msg_id, object_id, off, length)
    assert decode(encode(req)) == req


@given(st.binary(max_size=600))
def test_decode_never_raises_anything_but_protocol_error(data):
    try:
        decode(data)
    except ProtocolError:
        pass


def test_cookie_name_uses_surrogateescape():
    req = decode(encode_open(1, 1, "erofs,d", b"\xffblob", 3))
    assert req.name == "\udcffblob"
    assert req.name.encode("utf-8", "surrogateescape") == b"\xffblob"


def _open_with_sizes(vsize, csize, payload, length=None):
    body = struct.pack("<IIII", vsize, csize, 5, 0) + payload
    length = 16 + len(body) if length is None else length
    return encode_header(1, P.OP_OPEN, length, 2) + body


@pytest.mark.parametrize("data, pattern", [
    (b"", r"truncated header: got 0 bytes"),
    (b"\x00" * 10, r"truncated header: got 10 bytes"),
    (encode_header(1, P.OP_CLOSE, 20, 1), r"header len field is 20 but the message has 16"),
    (encode_read(1, 1, 0, 4096)[:-1], r"header len field is 32 but the message has 31"),
    (encode_header(4, 7, 16, 1), r"unknown opcode 7"),
    (encode_header(1, P.OP_READ, 16, 1), r"READ message must be 32 bytes, got 16"),
    (encode_header(1, P.OP_READ, 40, 1) + b"\0" * 24, r"READ message must be 32 bytes, got 40"),
    (encode_header(1, P.OP_CLOSE, 20, 1) + b"\0" * 4, r"CLOSE message must be 16 bytes, got 20"),
    (encode_header(1, P.OP_OPEN, 24, 1) + b"\0" * 8, r"OPEN message too short: 24 bytes"),
    (_open_with_sizes(0, 5, b"blob1"), r"volume_key_size is 0; it must include the terminating NUL"),
    (_open_with_sizes(4, 1, b"abcdx"), r"volume key is not NUL-terminated"),
    (_open_with_sizes(4, 1, b"a\0c\0x"), r"embedded NUL at byte 1"),
    (_open_with_sizes(257, 1, b"a" * 256 + b"\0" + b"x"), r"volume_key_size 257 exceeds 256"),
    (_open_with_sizes(2, 256, b"a\0" + b"x" * 256), r"cookie_key_size 256 exceeds 255"),
    (_open_with_sizes(3, 5, b"ab\0blob"), (r"sizes do not add up: 32 \+ volume_key_size 3 \+ "
                                           r"cookie_key_size 5 != len 39")),
])
def test_malformed_messages(data, pattern):
    with pytest.raises(ProtocolError, match=pattern):
        decode(data)


def test_protocol_error_carries_header_fields():
    with pytest.raises(ProtocolError) as info:
        decode(encode_header(12, 9, 16, 34))
    assert (info.value.msg_id, info.value.opcode, info.value.object_id) == (12, 9, 34)
    assert "msg_id 12" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        decode(b"short")
    assert info.value.msg_id is None


def test_encoders_reject_impossible_values():
    with pytest.raises(ValueError, match="key too long"):
        encode_open(1, 1, "v" * 256, b"c", 3)
    with pytest.raises(ValueError, match="key too long"):
        encode_open(1, 1, "v", b"c" * 256, 3)
    with pytest.raises(ValueError, match="msg_id"):
        encode_close(-1, 1)
    with pytest.raises(ValueError, match="off"):
        encode_read(1, 1, -4096, 1)


def test_copen_is_always_decimal():
    assert copen(3, 16384) == b"copen 3,16384"
    assert copen(0, 0) == b"copen 0,0"
    assert copen(8, 8) == b"copen 8,8"
    assert copen(5, -errno.ENOENT) == b"copen 5,-2"
    assert copen(5, -4095) == b"copen 5,-4095"
    for bad in ((-1, 0), (1, -4096), (1, 1.5), (True, 1), (1, "10")):
        with pytest.raises((ValueError, TypeError)):
            copen(*bad)


def test_copen_raw_and_styles():
    assert copen_raw("copen {id},010", 4) == b"copen 4,010"
    assert copen_raw("copen {id}, {size}", 4, 100) == b"copen 4, 100"
    assert copen_styled(17, 16384, "hex") == b"copen 0x11,0x4000"
    assert copen_styled(17, 16384, "octal") == b"copen 021,040000"
    assert copen_styled(17, -2, "octal") == b"copen 021,-02"
    assert copen_styled(0, 0, "octal") == b"copen 0,0"
    assert copen_styled(17, 16384, "decimal") == copen(17, 16384)
    with pytest.raises(ValueError):
        copen_styled(1, 1, "roman")


@given(u32, st.integers(-4095, 2**62), st.sampled_from(["decimal", "hex", "octal"]))
def test_styled_copen_parses_back_like_the_kernel(msg_id, size, style):
    outcome = classify_copen(copen_styled(msg_id, size, style), msg_id)
    if size >= 0:
        assert (outcome.kind, outcome.size) == ("open", size)
    else:
        assert (outcome.kind, outcome.errno) == ("failed", -size)


@pytest.mark.parametrize("raw, kind, detail", [
    (b"copen 3,16384", "open", 16384),
    (b"copen 3,010", "open", 8),             # base 0: leading 0 is octal
    (b"copen 0x3,0x10", "open", 16),
    (b"copen 3,16384\n", "open", 16384),
    (b"copen 3,-2", "failed", errno.ENOENT),
    (b"copen 3,abc", "failed", errno.EINVAL),   # OPEN consumed and failed
    (b"copen 3, 100", "failed", errno.EINVAL),
    (b"copen 3,1,2", "failed", errno.EINVAL),
    (b"copen 3,-5000", "failed", errno.EINVAL),
    (b"copen 3,99999999999999999999", "failed", errno.ERANGE),
    (b"copen", "rejected", errno.EINVAL),       # "Empty id specified"
    (b"copen 3", "rejected", errno.EINVAL),     # "Cache size is not specified"
    (b"copen x,100", "rejected", errno.EINVAL),
    (b"copen 99,100", "rejected", errno.EINVAL),  # not this OPEN
    (b"copen 3\0,1", "rejected", errno.EINVAL),
    (b"cread 3,1", "rejected", errno.EOPNOTSUPP),
    (b" copen 3,1", "rejected", errno.EOPNOTSUPP),
])
def test_classify_copen_models_the_kernel(raw, kind, detail):
    outcome = classify_copen(raw, 3)
    assert outcome.kind == kind
    if kind == "open":
        assert outcome.size == detail and outcome.write_errno == 0
    elif kind == "failed":
        assert outcome.errno == detail
    else:
        assert outcome.write_errno == detail


def test_kstrtoul_model():
    assert kstrtoul("10") == 10
    assert kstrtoul("010") == 8
    assert kstrtoul("0x1f") == 31
    assert kstrtoul("+7") == 7
    assert kstrtoul("7\n") == 7
    assert kstrtoul("-7", signed=True) == -7
    assert kstrtoul("0") == 0
    assert kstrtoul(str(2**64 - 1)) == 2**64 - 1
    for bad, err in (("", errno.EINVAL), ("08", errno.EINVAL), ("0x", errno.EINVAL),
                     ("-7", errno.EINVAL), ("-+7", errno.EINVAL), (" 7", errno.EINVAL),
                     ("7\n\n", errno.EINVAL), (str(2**64), errno.ERANGE)):
        with pytest.raises(ValueError) as info:
            kstrtoul(bad)
        assert info.value.args[1] == err, bad
    with pytest.raises(ValueError):
        kstrtoul(str(2**63), signed=True)
    assert kstrtoul(f"-{2**63}", signed=True) == -(2**63)


def test_command_formatting():
    assert command("dir", "/var/cache/od") == b"dir /var/cache/od"
    assert command("tag", "mytag") == b"tag mytag"
    assert command("bind", "ondemand") == b"bind ondemand"
    assert command("cull", "Dimg1") == b"cull Dimg1"
    assert command("inuse", "Dimg1") == b"inuse Dimg1"
    assert command("restore") == b"restore"
    with pytest.raises(ValueError, match="unknown"):
        command("bogus")
    with pytest.raises(ValueError, match="newline or NUL"):
        command("dir", "/a\nbind")
    with pytest.raises(ValueError, match="newline or NUL"):
        command("tag", "a\0b")
    with pytest.raises(ValueError, match="at most 4095"):
        command("dir", "/" + "a" * 4096)
