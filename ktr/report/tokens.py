"""Completion token ids -> the text pieces a reader sees (layer L2, tokenizer only).

Byte-level BPE tokens (Qwen2/2.5) are byte strings: one token can hold half of a multi-byte character, or a
character can span two or three tokens. :func:`readable_pieces` groups consecutive tokens until their bytes
decode as UTF-8, so every piece is text a user reads, and records which token positions form it. Special
tokens (end of turn, padding, vision markers) are hidden: they get no piece.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Piece:
    """Readable text made of one or more consecutive completion tokens."""

    text: str
    positions: tuple[int, ...]  # token positions (columns of the completion) forming this text


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character map (what byte-level BPE vocabularies are written in)."""
    from ktr.model.tokenizer import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: its byte-level BPE string mapped back, else its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    table = _byte_decoder()
    if piece is not None and piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([int(token_id)]).encode("utf-8")


def _incomplete_tail(data: bytes) -> bool:
    """True when `data` ends inside a UTF-8 character (a lead byte whose continuation bytes are missing)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: look further back for its lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return need > back
    return False


def special_ids(tokenizer) -> set[int]:
    """Ids of tokens that never show in decoded text (as `decode(skip_special_tokens=True)` drops them)."""
    return {int(i) for i in tokenizer.all_special_ids}


def readable_pieces(tokenizer, ids: list[int], positions: list[int] | None = None,
                    hidden: set[int] | None = None) -> list[Piece]:
    """Group token `ids` (at completion `positions`, default 0..len-1) into readable pieces.

    A piece closes as soon as its bytes do not end inside a character; bytes that never complete a character
    (a sampled stray byte) are shown as U+FFFD, as `tokenizer.decode` does. Tokens in `hidden` (default: the
    tokenizer's special tokens) produce no piece and end the piece before them.
    """
    positions = list(range(len(ids))) if positions is None else list(positions)
    hidden = special_ids(tokenizer) if hidden is None else hidden
    out: list[Piece] = []
    buf, pos = b"", []

    def flush() -> None:
        nonlocal buf, pos
        if pos:
            out.append(Piece(buf.decode("utf-8", errors="replace"), tuple(pos)))
        buf, pos = b"", []

    for tid, p in zip(ids, positions, strict=True):
        if int(tid) in hidden:
            flush()
            continue
        data = token_bytes(tokenizer, tid)
        if pos and not (data and data[0] & 0xC0 == 0x80):  # a new character starts: the pending one is broken
            flush()
        buf += data
        pos.append(p)
        if not _incomplete_tail(buf):
            flush()
    flush()
    return out
