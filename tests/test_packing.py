"""The packer against its own inverse: every document back exactly, none lost or duplicated."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from llada_ray.data.packing import Piece, pack, unpack

PAD = 1


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 90), min_size=1, max_size=40),
    seq_len=st.sampled_from([4, 16, 32]),
    batches=st.integers(1, 5),
    split=st.booleans(),
)
def test_round_trip_over_batches_with_carry(
    lengths: list[int], seq_len: int, batches: int, split: bool
) -> None:
    rng = np.random.default_rng(len(lengths) * 31 + seq_len)
    docs = {key: rng.integers(2, 1000, n).astype(np.int32) for key, n in enumerate(lengths)}
    prompts = {key: int(rng.integers(0, n + 1)) for key, n in enumerate(lengths)}
    keys = list(docs)
    split = np.array_split(np.array(keys), batches)
    rows, carry = [], []
    for i, batch in enumerate(split):
        last = i == len(split) - 1
        pieces = carry + [
            Piece(int(k), 0, docs[int(k)], np.arange(len(docs[int(k)])) >= prompts[int(k)])
            for k in batch
        ]
        packed, carry = pack(pieces, seq_len, PAD, carry=not last, split_documents=split)
        rows += [
            dict(zip(packed.to_columns(), values, strict=True))
            for values in zip(*packed.to_columns().values(), strict=True)
        ]
    assert carry == []
    back = unpack(rows)
    assert list(back) == keys  # in order, none lost, none duplicated
    for key in keys:
        assert np.array_equal(back[key], docs[key])
    total = sum(lengths)
    assert all(len(r["input_ids"]) == seq_len for r in rows)
    assert sum(int(r["num_tokens"]) for r in rows) == total
    if split:
        assert len(rows) == -(-total // seq_len)  # padding only in the last row
    else:  # a document that fits in a row is never cut
        pieces_of = {}
        for r in rows:
            for key in r["segment_keys"]:
                pieces_of[int(key)] = pieces_of.get(int(key), 0) + 1
        assert all(pieces_of[k] == 1 for k, n in enumerate(lengths) if n <= seq_len)
    completion = {key: [] for key in keys}  # the mask follows its tokens through every cut
    for r in rows:
        n, ids = int(r["num_tokens"]), np.asarray(r["doc_ids"])
        for seg, key in enumerate(r["segment_keys"]):
            completion[int(key)] += list(np.asarray(r["completion"])[ids == seg])
        assert not np.asarray(r["completion"])[n:].any()
        assert (np.asarray(r["input_ids"])[n:] == PAD).all()
        assert (ids[n:] == len(r["segment_keys"])).all()  # padding: a document of its own
        assert (np.diff(ids) >= 0).all()
    for key, n in enumerate(lengths):
        assert completion[key] == [i >= prompts[key] for i in range(n)]


def test_unpack_refuses_a_missing_piece() -> None:
    packed, _ = pack([Piece(7, 0, np.arange(10, dtype=np.int32))], 4, PAD)  # padded tail
    cols = packed.to_columns()
    rows = [dict(zip(cols, values, strict=True)) for values in zip(*cols.values(), strict=True)]
    try:
        unpack([rows[0], rows[2]])
    except ValueError as err:
        assert "document 7" in str(err)
    else:
        raise AssertionError("a missing piece went unnoticed")
