"""Loading a tokenizer directory (`load_tokenizer`, for every stage), and training a small
SentencePiece tokenizer saved as a directory `AutoTokenizer` loads.

Used by the tests and the bundled demo world, where a real model's tokenizer is too big to ship.
SentencePiece trains the pieces (BPE, single thread, fixed seed: the same text always gives the
same vocabulary); the pieces and their merge order are then written into a `tokenizers` BPE model,
because transformers 5 loads tokenizers through `tokenizer.json`, not `.model` files.

Choices that matter downstream:
- no dummy prefix and no normalization: a space is always the piece marker `▁` and nothing else
  changes the text, so `decode(encode(text)) == text` exactly, for any text (unknown characters
  fall back to their UTF-8 bytes);
- digits are always single tokens (`split_digits`), which helps small models with arithmetic;
- `\\n` is a token of its own: chat renderings are line based;
- `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then the extra special tokens (e.g. ChatML markers).
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import ConfigError
from .files import read_json

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
NEWLINE = "\n"
# A directory AutoTokenizer can load holds at least one of these.
_VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                     "tokenizer_config.json")
# Its JSON files (and the model's config.json, which AutoTokenizer reads too), checked one by one
# when loading fails, to name the broken one.
_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "chat_template.json", "config.json")


def load_tokenizer(path: str | os.PathLike, key: str = "data.tokenizer"):
    """`AutoTokenizer.from_pretrained(path)`, local files only, never remote code. Raises
    ConfigError naming `key` and the directory (and the broken file, where one is) when there is
    no loadable tokenizer there."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"{key} = {path!r}: no such directory; point it at a tokenizer (a model "
                          "directory or the output of rega_engine.tokenizer.train_tokenizer)")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _VOCABULARY_FILES):
        raise ConfigError(f"{key} = {path!r}: cannot load a tokenizer from it: it holds none of "
                          f"{', '.join(_VOCABULARY_FILES)}")
    tokenizer = _load_named_class(path)
    if tokenizer is not None:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except Exception as e:   # transformers raises OSError, ValueError, KeyError... by the cause
        cause = f"{type(e).__name__}: {e}"
    fix = f"so the tokenizer of {key} = {path!r} cannot be loaded; copy its files again"
    for name in _JSON_FILES:
        if os.path.isfile(os.path.join(path, name)):
            read_json(os.path.join(path, name), error=ConfigError, fix=fix)
    raise ConfigError(f"{key} = {path!r}: cannot load a tokenizer from it ({cause})")


def _load_named_class(path: str):
    """The tokenizer class tokenizer_config.json names, loaded directly: what AutoTokenizer picks
    for such a directory (the fast variant first), without importing its model-config machinery,
    which imports torch (~1.5 s of every prepare process). None when there is no such class or it
    fails to load: the caller then asks AutoTokenizer."""
    try:
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            name = json.load(f).get("tokenizer_class")
        if not isinstance(name, str) or not name.isidentifier():
            return None
        import transformers

        for candidate in ([name] if name.endswith("Fast") else [f"{name}Fast", name]):
            cls = getattr(transformers, candidate, None)
            if cls is not None:
                return cls.from_pretrained(path, local_files_only=True)
    except Exception:   # anything unusual: AutoTokenizer decides, and names the problem
        return None
    return None


BYTE_PIECES = 256      # byte fallback: one piece per byte value, always in the vocabulary


def minimum_vocab_size(lines: Iterable[str], special_tokens: Sequence[str] = ()) -> int:
    """The smallest vocab_size SentencePiece accepts for `lines`: every piece it reserves (unk,
    bos, eos, pad, the extra special tokens, the newline and the 256 byte pieces) plus one piece
    per distinct character of the text (character_coverage 1.0; a space is the piece marker)."""
    characters = set()
    for line in lines:
        characters.update(line)
    if " " in characters:   # spaces become the piece marker (no normalization otherwise)
        characters.discard(" ")
        characters.add("▁")
    reserved = 4 + len(special_tokens) + 1 + BYTE_PIECES
    return reserved + len(characters)


def _train_sentencepiece(lines: list[str], vocab_size: int, special_tokens: Sequence[str],
                         seed: int):
    import sentencepiece as spm

    # Checked here, in our words: SentencePiece's own refusal is a C++ assertion that suggests a
    # --character_coverage option rega-engine does not have.
    needed = minimum_vocab_size(lines, special_tokens)
    if vocab_size < needed:
        raise ValueError(_too_small(vocab_size, needed, special_tokens))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=list(special_tokens), user_defined_symbols=[NEWLINE],
            minloglevel=2,
        )
    except RuntimeError as e:
        import re

        # The same limit counted differently (a SentencePiece release that reserves more): its
        # figure, never its assertion text.
        found = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if found:
            raise ValueError(_too_small(vocab_size, int(found.group(1)), special_tokens)) from None
        raise ValueError(f"train_tokenizer: SentencePiece could not train on this text "
                         f"({str(e).splitlines()[0][:300]})") from None
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def _too_small(vocab_size: int, needed: int, special_tokens: Sequence[str]) -> str:
    characters = needed - (4 + len(special_tokens) + 1 + BYTE_PIECES)
    return (f"vocabulary size {vocab_size} is too small for this text: it needs at least {needed} "
            f"({BYTE_PIECES} byte pieces, {5 + len(special_tokens)} special pieces and the text's "
            f"{characters} distinct characters); give a vocabulary of at least {needed} "
            f"(--vocab-size {needed})")


def _bpe_merges(vocab: dict[str, int], atomic: set[int]) -> list[tuple[str, str]]:
    """The merge list that reproduces SentencePiece's BPE: a piece's rank is its id (pieces are
    stored in the order they were merged), and every split of a piece into two known pieces is a
    merge producing it, ordered by the piece's rank, then by the left part's."""
    mergeable = {piece: i for piece, i in vocab.items() if i not in atomic}
    merges = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((piece_id, mergeable[left], mergeable[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _to_tokenizers(sp, special_tokens: Sequence[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # Special and byte pieces are matched as added tokens or by byte fallback, never built from
    # text by merges (the literal text "<s>" inside a word must not become BOS).
    atomic = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_byte(i)
              or sp.is_unknown(i)}
    merges = _bpe_merges(vocab, atomic)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in (UNK, BOS, EOS, PAD, *special_tokens)])
    tokenizer.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    # Like Llama: `tokenizer(text)` starts with <s>; chat renderings pass add_special_tokens=False.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, sp.bos_id())])
    return tokenizer


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000,
                    chat_template: str | None = None, special_tokens: Sequence[str] = (),
                    seed: int = 0) -> Path:
    """Train a BPE tokenizer on `texts` and save it to `out_dir`; returns `out_dir`.

    `vocab_size` is an upper bound (a small text yields fewer pieces). `special_tokens` are extra
    control tokens kept whole, e.g. ("<|im_start|>", "<|im_end|>") for a ChatML `chat_template`.
    The same texts and arguments always give the same tokenizer.
    """
    from transformers import PreTrainedTokenizerFast

    special_tokens = list(dict.fromkeys(special_tokens))
    reserved = {UNK, BOS, EOS, PAD, NEWLINE}
    clash = [t for t in special_tokens if t in reserved or not t]
    if clash:
        raise ValueError(f"train_tokenizer: special_tokens {clash!r} are empty or already reserved")
    # SentencePiece reads sentences; newlines are a token of their own, so they split the text.
    lines = [line for text in texts for line in text.split(NEWLINE) if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer: no text to train on")
    sp = _train_sentencepiece(lines, vocab_size, special_tokens, seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_to_tokenizers(sp, special_tokens),
        unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=special_tokens, chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_training_text(path: str) -> tuple[list[str], str]:
    """(texts, what was read) of one input file of `rega-engine tokenizer`. A .jsonl file gives
    the text of its rows: every message's "content" of a chat row and the "text" of a plain-text
    row (the JSON around them is not text the model will see); other files are read whole."""
    from .errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                text = f.read()
                return [text], f"{len(text.splitlines())} lines of text"
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{os.path.abspath(path)}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "give UTF-8 text files", "bad text", path) from None
    texts, chats, messages, plain, skipped, first_skip = [], 0, 0, 0, 0, ""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        found = []
        if isinstance(row, dict):
            if isinstance(row.get("text"), str):
                found.append(row["text"])
                plain += 1
            turns = row.get("messages")
            if isinstance(turns, list):
                contents = [t["content"] for t in turns
                            if isinstance(t, dict) and isinstance(t.get("content"), str)]
                found += contents
                chats += bool(contents)
                messages += len(contents)
        if not found:
            skipped += 1
            first_skip = first_skip or (f"line {number}: " + ("not a JSON object" if not
                                        isinstance(row, dict) else "no 'messages' or 'text'"))
        texts += found
    if not texts:
        raise DataError(f"{os.path.abspath(path)}: no text in it: a .jsonl file is read as rows "
                        "of {\"messages\": [{\"role\": ..., \"content\": ...}]} or "
                        "{\"text\": ...}" + (f" ({first_skip})" if first_skip else ""),
                        "no text", path)
    summary = f"{messages} messages of {chats} chats, {plain} text rows"
    if skipped:
        summary += f"; {skipped} lines without text skipped (first: {first_skip})"
    return texts, summary


def main(argv: Sequence[str] | None = None, prog: str = "python -m rega_engine.tokenizer") -> int:
    """`rega-engine tokenizer TEXT_FILE... --out DIR`: train a tokenizer on text files; prints the
    directory, the vocabulary size and the special token ids a model config needs."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="train a BPE tokenizer (SentencePiece pieces, saved for AutoTokenizer) on "
                    "UTF-8 text files; the same files and options always give the same tokenizer")
    parser.add_argument("texts", nargs="+",
                        help="UTF-8 text files to train on; of a .jsonl file, the text of its rows "
                             "(each message's content, and \"text\" fields)")
    parser.add_argument("--out", required=True,
                        help="output directory (AutoTokenizer.from_pretrained loads it)")
    parser.add_argument("--vocab-size", type=int, default=1000,
                        help="upper bound on the vocabulary (default 1000; a small text gives "
                             "fewer)")
    parser.add_argument("--chat-template",
                        help="a Jinja chat template file to store with the tokenizer")
    parser.add_argument("--special-token", action="append", default=[],
                        help="an extra control token (repeatable)")
    args = parser.parse_args(argv)
    for name in [*args.texts, *([args.chat_template] if args.chat_template else [])]:
        if not os.path.isfile(name):
            parser.error(f"{os.path.abspath(name)}: file not found")
    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    texts = []
    for name in args.texts:
        read, summary = read_training_text(name)
        print(f"read {name}: {summary}")
        texts += read
    try:
        out = train_tokenizer(texts, args.out, args.vocab_size, template, args.special_token)
    except ValueError as e:   # too small a vocabulary, no text: the user's to fix, in one line
        raise ConfigError(str(e)) from None
    tokenizer = load_tokenizer(out, "--out")
    special = ", ".join(f"{name} {token} = {tokenizer.convert_tokens_to_ids(token)}"
                        for name, token in
                        (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token),
                         ("pad", tokenizer.pad_token), ("unk", tokenizer.unk_token)) if token)
    print(f"tokenizer written to {out}: vocabulary of {len(tokenizer)} tokens (vocab_size "
          f"{len(tokenizer)})")
    print(f"special tokens: {special}")
    print(f"next: rega-engine model-config --preset tiny --tokenizer {out} --out model.json "
          "(a model config.json with this vocabulary and these ids)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
