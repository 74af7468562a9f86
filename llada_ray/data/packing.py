"""Packing token streams into fixed-length rows that keep document boundaries. Pure numpy.

Documents are concatenated in order and cut every `seq_len` tokens, so padding appears only in
the very last row. A document cut by a row boundary becomes pieces; every row records, per
segment, the document key and the piece's offset inside its document, so the pieces can be
joined back exactly and the document mask (`doc_ids`) never joins two documents.

Row columns:
  input_ids        [seq_len] int32
  doc_ids          [seq_len] int32  segment index within the row; padding is a segment of its own
  segment_keys     [n_segments] int64  document key of each non-padding segment
  segment_offsets  [n_segments] int64  where the segment starts inside its document
  completion       [seq_len] bool   tokens after their document's prompt (prompt/completion
                                    documents; every token of a plain one); False on padding
  num_tokens       int32  tokens before the padding (== seq_len except in the last row)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """A document or a part of one: tokens starting at `offset` of document `key`, and which of
    them are completion (not prompt); None: all of them."""

    key: int
    offset: int
    tokens: np.ndarray
    completion: np.ndarray | None = None

    def completion_mask(self) -> np.ndarray:
        if self.completion is None:
            return np.ones(len(self.tokens), dtype=bool)
        return self.completion


@dataclass(frozen=True)
class Rows:
    """A batch of packed rows as columns (see the module docstring)."""

    input_ids: np.ndarray  # [rows, seq_len]
    doc_ids: np.ndarray  # [rows, seq_len]
    segment_keys: list[np.ndarray]
    segment_offsets: list[np.ndarray]
    completion: np.ndarray  # [rows, seq_len] bool
    num_tokens: np.ndarray  # [rows]

    def __len__(self) -> int:
        return len(self.num_tokens)

    def to_columns(self) -> dict[str, list]:
        return {
            "input_ids": list(self.input_ids),
            "doc_ids": list(self.doc_ids),
            "segment_keys": self.segment_keys,
            "segment_offsets": self.segment_offsets,
            "completion": list(self.completion),
            "num_tokens": self.num_tokens,
        }


FILLER = -1  # the key of padding that ends a row early (whole-document packing)


def pack(
    pieces: Iterable[Piece],
    seq_len: int,
    pad_id: int,
    *,
    carry: bool = False,
    split_documents: bool = True,
) -> tuple[Rows, list[Piece]]:
    """Cut the concatenation of `pieces` into rows of `seq_len`.

    With `carry` the tail that does not fill a row is returned as pieces (to be carried into a
    later call); otherwise it is padded into a last row and the returned tail is empty. Without
    `split_documents`, a document that does not fit in what is left of a row starts the next one
    (the row ends in padding); only documents longer than a row are cut.
    """
    pieces = [p for p in pieces if len(p.tokens)]
    if not split_documents:
        pieces = _whole(pieces, seq_len, pad_id)
    if not pieces:
        return _empty_rows(seq_len), []
    lengths = np.array([len(p.tokens) for p in pieces])
    flat = np.concatenate([p.tokens for p in pieces]).astype(np.int32)
    flat_completion = np.concatenate([p.completion_mask() for p in pieces])
    piece_of_token = np.repeat(np.arange(len(pieces)), lengths)
    fillers = np.array([p.key == FILLER for p in pieces])
    piece_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offsets = np.array([p.offset for p in pieces])
    keys = np.array([p.key for p in pieces], dtype=np.int64)

    n_full = len(flat) // seq_len
    tail = len(flat) - n_full * seq_len
    if tail and carry:
        cut = n_full * seq_len
        first = piece_of_token[cut]
        end = piece_start[first] + lengths[first]
        rest = [
            Piece(
                int(keys[first]),
                int(offsets[first] + cut - piece_start[first]),
                flat[cut:end],
                flat_completion[cut:end],
            )
        ]
        rest += pieces[first + 1 :]
        n_rows = n_full
    else:
        rest, n_rows = [], n_full + (1 if tail else 0)

    input_ids = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    owner = np.full((n_rows, seq_len), -1, dtype=np.int64)
    completion = np.zeros((n_rows, seq_len), dtype=bool)
    used = min(len(flat), n_rows * seq_len)
    input_ids.reshape(-1)[:used] = flat[:used]
    completion.reshape(-1)[:used] = flat_completion[:used]
    owner.reshape(-1)[:used] = np.where(fillers[piece_of_token], -1, piece_of_token)[:used]

    doc_ids = np.empty((n_rows, seq_len), dtype=np.int32)
    segment_keys, segment_offsets, num_tokens = [], [], np.empty(n_rows, dtype=np.int32)
    for r in range(n_rows):
        row_owner = owner[r]
        real = row_owner >= 0
        n = int(real.sum())
        first_piece, last_piece = row_owner[0], row_owner[n - 1]
        doc_ids[r, :n] = row_owner[:n] - first_piece
        doc_ids[r, n:] = last_piece - first_piece + 1  # padding: a document of its own
        segs = np.arange(first_piece, last_piece + 1)
        seg_offsets = offsets[segs].copy()
        seg_offsets[0] += r * seq_len - piece_start[first_piece]  # a row may start mid-piece
        segment_keys.append(keys[segs])
        segment_offsets.append(seg_offsets)
        num_tokens[r] = n
    return Rows(input_ids, doc_ids, segment_keys, segment_offsets, completion, num_tokens), rest


def _whole(pieces: list[Piece], seq_len: int, pad_id: int) -> list[Piece]:
    """The pieces with padding fillers before each document that would straddle a row boundary
    (the first piece starts a row: a carried tail always does)."""
    out: list[Piece] = []
    used = 0  # tokens in the current row
    for p in pieces:
        n = len(p.tokens)
        if used and used + n > seq_len and n <= seq_len:
            gap = seq_len - used
            out.append(Piece(FILLER, 0, np.full(gap, pad_id, np.int32), np.zeros(gap, bool)))
            used = 0
        out.append(p)
        used = (used + n) % seq_len
    return out


def _empty_rows(seq_len: int) -> Rows:
    empty = np.empty((0, seq_len), dtype=np.int32)
    return Rows(
        empty, empty.copy(), [], [], np.empty((0, seq_len), bool), np.empty(0, dtype=np.int32)
    )


def unpack(rows: Iterable[dict]) -> dict[int, np.ndarray]:
    """Join packed rows back into documents, by key; raises if a piece is missing or repeated."""
    parts: dict[int, list[tuple[int, np.ndarray]]] = {}
    for row in rows:
        ids, docs = np.asarray(row["input_ids"]), np.asarray(row["doc_ids"])
        for seg, (key, offset) in enumerate(
            zip(row["segment_keys"], row["segment_offsets"], strict=True)
        ):
            parts.setdefault(int(key), []).append((int(offset), ids[docs == seg]))
    documents = {}
    for key, found in parts.items():
        found.sort(key=lambda part: part[0])
        position = 0
        for offset, tokens in found:
            if offset != position:
                raise ValueError(f"document {key}: piece at {offset}, expected {position}")
            position += len(tokens)
        documents[key] = np.concatenate([tokens for _, tokens in found])
    return documents
