"""Round trips of the process-boundary types through floe.proto (floe/protocol.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from floe.errors import ValidationError
from floe.proto import floe_pb2
from floe.protocol import EmbedResult, EncodeOptions, Timings, TokenBatch
from floe.proto.convert import (options_from_proto, options_to_proto, request_to_proto,
                                result_from_proto, result_to_proto, tokens_from_proto)


@pytest.mark.parametrize("options", [
    EncodeOptions(),
    EncodeOptions(normalize=False, truncate=True, truncation_direction="left", prompt_name="query",
                  dimensions=64, output_dtype="bfloat16", priority=-3),
    EncodeOptions(normalize=True, truncate=False, prompt="Represent: ", output_dtype="float16",
                  priority=7),
    EncodeOptions(prompt=""),  # an explicit empty prompt is not "unset"
])
def test_options_round_trip(options):
    wire = options_to_proto(options).SerializeToString()
    msg = floe_pb2.EncodeOptions.FromString(wire)
    assert options_from_proto(msg) == options


def test_options_unset_fields_stay_none():
    o = options_from_proto(floe_pb2.EncodeOptions())
    assert (o.normalize, o.truncate, o.prompt, o.prompt_name, o.dimensions) == (None,) * 5
    assert (o.output_dtype, o.truncation_direction, o.priority) == ("float32", "right", 0)


def test_options_unknown_enums_are_validation_errors():
    with pytest.raises(ValidationError, match="output_dtype"):
        options_from_proto(floe_pb2.EncodeOptions(output_dtype=9))
    with pytest.raises(ValidationError, match="truncation_direction"):
        options_from_proto(floe_pb2.EncodeOptions(truncation_direction=5))


def test_request_round_trip_tokens():
    items = [[101, 7592, 102], [101, 102], [5] * 40]
    tb = TokenBatch.from_lists(items)
    msg = floe_pb2.EncodeRequest.FromString(
        request_to_proto("r", EncodeOptions(dimensions=8), tokens=tb, model="m").SerializeToString())
    assert (msg.request_id, msg.model, msg.options.dimensions) == ("r", "m", 8)
    back = tokens_from_proto(msg)
    assert back.n == 3 and back.total_tokens == 45
    assert [back.item(i).tolist() for i in range(3)] == items
    assert back.ids.dtype == np.int32 and back.offsets().tolist() == [0, 3, 5, 45]
    # the wire layout is int32 little-endian, whatever the host
    assert msg.token_ids[:4] == (101).to_bytes(4, "little")


def test_request_round_trip_texts():
    msg = request_to_proto("t", EncodeOptions(), texts=["a", "é ü"])
    assert tokens_from_proto(msg) is None and list(msg.texts) == ["a", "é ü"]


def test_tokens_from_proto_rejects_bad_payloads():
    with pytest.raises(ValidationError, match="not both"):
        tokens_from_proto(floe_pb2.EncodeRequest(texts=["a"], token_ids=b"\0" * 4, lengths=[1]))
    with pytest.raises(ValidationError, match="multiple of 4"):
        tokens_from_proto(floe_pb2.EncodeRequest(token_ids=b"\0" * 6, lengths=[1]))
    with pytest.raises(ValidationError, match="lengths sum"):
        tokens_from_proto(floe_pb2.EncodeRequest(token_ids=b"\0" * 8, lengths=[1]))
    with pytest.raises(ValidationError, match="lengths sum"):
        tokens_from_proto(floe_pb2.EncodeRequest(lengths=[2]))


def test_from_lists_rejects_ids_out_of_range():
    for bad in ([[1, 2**31]], [[-(2**31) - 1]], [[2**70]], [["a"]]):
        with pytest.raises(ValidationError):
            TokenBatch.from_lists(bad)
    assert TokenBatch.from_lists([]).n == 0
    assert TokenBatch.from_lists([[2**31 - 1]]).ids.tolist() == [2**31 - 1]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_result_round_trip(dtype):
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 16)).astype(np.float32)
    r = EmbedResult.from_array(arr, dtype, [4, 5, 6], model="m", request_id="id",
                               timings=Timings(0.1, 0.2, 0.3, 0.7))
    back = result_from_proto(floe_pb2.EncodeResponse.FromString(result_to_proto(r).SerializeToString()))
    assert (back.n, back.dim, back.dtype, back.model, back.request_id) == (3, 16, dtype, "m", "id")
    assert back.data == r.data
    assert back.token_counts.tolist() == [4, 5, 6]
    assert back.timings == Timings(0.1, 0.2, 0.3, 0.7)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(back.as_float32(), arr, rtol=tol, atol=tol)


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials():
    vals = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5,
                     np.inf, -np.inf, np.nan, 0.0], dtype=np.float32)
    r = EmbedResult.from_array(vals[None, :], "bfloat16", [1])
    got = r.as_float32()[0]
    # halfway cases go to the even mantissa; just above halfway rounds up
    assert got[:5].tolist() == [1.0, 1.0, 1.0 + 4 * 2**-8, 1.0 + 2 * 2**-8, -2.5]
    assert got[5] == np.inf and got[6] == -np.inf and np.isnan(got[7]) and got[8] == 0.0
    # a NaN whose payload sits in the low bits must not round up into infinity
    low_nan = np.array([[0x7F800001, 0xFF800001]], dtype=np.uint32).view(np.float32)
    assert np.isnan(EmbedResult.from_array(low_nan, "bfloat16", [1]).as_float32()).all()


def test_embed_result_checks_buffer_size():
    with pytest.raises(ValueError):
        EmbedResult(n=2, dim=4, dtype="float32", data=b"\0" * 31, token_counts=np.array([1, 1]))
    with pytest.raises(ValidationError):
        EmbedResult.from_array(np.zeros((1, 2), np.float32), "int8", [1])


# --- the replica link's frames ------------------------------------------------------------------

def test_frames_split_back_whatever_the_chunking():
    from floe.protocol import Frame, FrameReader, frame

    frames = [(Frame.HELLO, 0, b"token"), (Frame.ENCODE, 7, b"x" * 1000), (Frame.CANCEL, 7, b""),
              (Frame.RESULT, 2 ** 32 - 1, b"\x00\x01")]
    stream = b"".join(frame(k, c, p) for k, c, p in frames)
    for step in (1, 3, 9, 10, 4096):
        reader, got = FrameReader(max_payload=4096), []
        for i in range(0, len(stream), step):
            got += reader.feed(stream[i:i + step])
        assert got == [(int(k), c, p) for k, c, p in frames], step


def test_a_frame_over_the_limit_is_refused_before_its_payload_arrives():
    from floe.protocol import FRAME_HEADER, Frame, FrameReader

    reader = FrameReader(max_payload=100)
    with pytest.raises(ValueError, match="over the 100-byte limit"):
        reader.feed(FRAME_HEADER.pack(101, 1, Frame.ENCODE))   # the header alone is enough


def test_every_call_frame_has_its_request_and_answer_messages():
    from floe.protocol import FRAME_CALLS, Frame

    import msgspec

    assert set(FRAME_CALLS) == {Frame.ENCODE, Frame.HEALTH, Frame.INFO, Frame.ABORT, Frame.HAND_BACK}
    for kind, (request_type, answer_type) in FRAME_CALLS.items():
        # the link's own messages; only GetReplicaInfo is the public API's (what it returns)
        assert issubclass(request_type, msgspec.Struct)
        if kind == Frame.INFO:
            assert answer_type.DESCRIPTOR.full_name == "floe.v1.GetReplicaInfoResponse"
        else:
            assert issubclass(answer_type, msgspec.Struct)


def test_the_private_encode_call_round_trips_every_field():
    from floe.protocol import (Spans, decode_message, encode_call, encode_message, EncodeCall,
                               options_from_link, tokens_from_call)

    tb = TokenBatch(np.array([5, 6, 7, 8, 9, 10], dtype=np.int32), np.array([2, 4]),
                    type_splits=np.array([1, 3]),
                    spans=Spans(counts=np.array([1, 2]), bounds=np.array([0, 2, 0, 2, 2, 4])))
    opts = EncodeOptions(normalize=False, truncate=True, truncation_direction="left",
                         prompt_name="query", prompt="q: ", dimensions=8, output_dtype="float16",
                         priority=3, deadline=time.monotonic() + 5.0)
    wire = encode_message(encode_call("r1", tb, opts, "model-a", "embed"))
    call = decode_message(EncodeCall, wire)
    assert (call.request_id, call.model, call.kind) == ("r1", "model-a", "embed")
    back = tokens_from_call(call)
    np.testing.assert_array_equal(back.ids, tb.ids)
    np.testing.assert_array_equal(back.lengths, tb.lengths)
    np.testing.assert_array_equal(back.type_splits, [1, 3])
    np.testing.assert_array_equal(back.spans.counts, [1, 2])
    np.testing.assert_array_equal(back.spans.bounds.reshape(-1), [0, 2, 0, 2, 2, 4])
    o = options_from_link(call.options)
    assert (o.normalize, o.truncate, o.truncation_direction, o.prompt_name, o.prompt,
            o.dimensions, o.output_dtype, o.priority) == (False, True, "left", "query", "q: ", 8,
                                                          "float16", 3)
    assert 4.0 < o.deadline - time.monotonic() <= 5.0   # the time left crossed, not the clock
    plain = tokens_from_call(decode_message(EncodeCall, encode_message(
        encode_call("r2", TokenBatch.from_lists([[1, 2]]), EncodeOptions(), "", ""))))
    assert plain.type_splits is None and plain.spans is None
    assert options_from_link(decode_message(EncodeCall, encode_message(encode_call(
        "r3", TokenBatch.from_lists([[1]]), EncodeOptions(), "", ""))).options) == EncodeOptions()


def test_the_private_encode_answer_round_trips_dense_and_sparse():
    from floe.protocol import (EncodeAnswer, SparseRows, decode_message, encode_answer,
                               encode_message, result_from_answer)

    r = EmbedResult.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "float32",
                               np.array([4, 5]), model="m", request_id="x")
    r.timings = Timings(0.1, 0.2, 0.3, 0.6)
    back = result_from_answer(decode_message(EncodeAnswer, encode_message(encode_answer(r))))
    assert (back.n, back.dim, back.dtype, back.model, back.request_id) == (2, 3, "float32", "m", "x")
    np.testing.assert_array_equal(back.as_float32(), r.as_float32())
    assert back.token_counts.tolist() == [4, 5] and back.timings == r.timings
    sparse = EmbedResult(n=2, dim=100, dtype="float32", data=b"", token_counts=np.array([3, 2]),
                         sparse=SparseRows(counts=np.array([2, 1]), indices=np.array([3, 9, 7], "<i4"),
                                           values=np.array([0.5, 1.5, 2.0], "<f4")))
    sb = result_from_answer(decode_message(EncodeAnswer, encode_message(encode_answer(sparse))))
    assert sb.sparse.counts.tolist() == [2, 1] and sb.sparse.indices.tolist() == [3, 9, 7]
    assert sb.sparse.values.tolist() == [0.5, 1.5, 2.0] and sb.data == b""


def test_picked_items_keep_their_ids_lengths_and_type_splits():
    tb = TokenBatch(np.arange(10, dtype=np.int32), np.array([1, 2, 3, 4]),
                    type_splits=np.array([1, 1, 2, 3]))
    got = tb.pick(np.array([1, 3]))
    assert got.lengths.tolist() == [2, 4]
    assert got.ids.tolist() == [1, 2, 6, 7, 8, 9]
    assert got.type_splits.tolist() == [1, 3]
    assert tb.pick(np.array([], dtype=np.int64)).n == 0


def test_hand_back_messages_round_trip():
    from floe.protocol import (EmbedResult, HandBackAnswer, HandBackCall, decode_message,
                               encode_answer, encode_message, hand_back_answer,
                               handed_from_answer, result_from_answer)

    call = decode_message(HandBackCall, encode_message(HandBackCall(["b", "a"], 900, 300)))
    assert (call.request_ids, call.max_tokens, call.min_tokens) == (["b", "a"], 900, 300)
    wire = encode_message(hand_back_answer([("a", np.array([2, 7]))]))
    back = handed_from_answer(decode_message(HandBackAnswer, wire))
    assert back[0][0] == "a" and back[0][1].tolist() == [2, 7]
    with pytest.raises(ValidationError, match="whole int32s"):
        handed_from_answer(HandBackAnswer(calls=[("a", b"\x01\x02")]))
    r = EmbedResult.from_array(np.ones((1, 2), np.float32), "float32", [3],
                               handed_back=np.array([0, 2]))
    assert result_from_answer(encode_answer(r)).handed_back.tolist() == [0, 2]
    assert result_from_answer(encode_answer(EmbedResult.from_array(
        np.ones((1, 2), np.float32), "float32", [3]))).handed_back is None
