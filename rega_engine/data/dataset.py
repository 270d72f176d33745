"""The prepared dataset on disk: token ids and loss masks memory-mapped, one directory per dataset.

Layout (format 1):
    tokens.bin     int32, every sample's tokens concatenated
    loss_mask.bin  uint8, 1 where the token is an assistant token the model must learn to predict
    offsets.npy    int64, num_samples + 1: sample i is tokens[offsets[i]:offsets[i + 1]]
    kinds.npy      uint8, index into rega_engine.batch.KINDS (meta.json's "kinds" may be a prefix of
                   KINDS: a dataset prepared before a kind was added)
    domains.npy    int16, 0 = general, then the specific domains in role-table order
    meta.json      {"format": 1, "num_samples", "num_tokens", "domains", "kinds", "kind_weights",
                    "pad_id", "vocab_size", "seq_len", "report"}

The writer streams tokens to disk as samples arrive, so a large dataset never sits in memory, and
builds the directory under a temporary name that is renamed only once meta.json is written: a run
that dies half way never leaves something that looks like a whole dataset.

Sharded layout (format 2, what `rega-engine prepare` writes):
    meta.json             the index: the keys above, plus "shards" (name, num_samples, num_tokens
                          and the sha256 of each of its files, in order), the per-source and
                          per-kind counts and the config it came from; written once, last, when
                          every shard is complete
    shard_00000/ ...      each shard holds the five data files of format 1 and shard.json (its
                          counts and the fingerprint of the config that made it); a shard is built
                          under a temporary name and renamed when complete
Sample ids run over the shards in order. The loader maps every shard; nothing is concatenated.

Damage is caught at three costs. Opening a dataset checks what is cheap: every file's size against
meta.json and the per-sample arrays' ranges (kind and domain ids). `damaged_files()` hashes the
files against the sha256 sums of the index (about 1 s per GB on one core of the 2-core test
machine); train runs it when a run starts fresh, or with data.verify, each rank hashing a share
of the files. The loader checks every batch's token ids against the vocabulary and names the
shard and sample of one outside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from array import array
from pathlib import Path

import numpy as np

from rega_engine.errors import DataError
from rega_engine.files import file_sha256, read_json_object
from rega_engine.kinds import GENERAL_DOMAIN, KINDS, check_kind_weights

FORMAT = 1
SHARDED_FORMAT = 2
SHARD_FILE = "shard.json"
DATA_FILES = ("tokens.bin", "loss_mask.bin", "offsets.npy", "kinds.npy", "domains.npy")
META_FILE = "meta.json"
_TOKEN_DTYPE = np.int32
_MASK_DTYPE = np.uint8
_INT32_MAX = np.iinfo(np.int32).max
_DOMAIN_MAX = np.iinfo(np.int16).max


def _kind_weights_for_writer(kind_weights: dict, where: str) -> dict[str, float]:
    """Callers may leave kinds out (they weigh 1.0); the result obeys the one kind-weight rule."""
    if not isinstance(kind_weights, dict):
        raise TypeError(f"{where}: kind_weights must be a dict {{kind: weight}}, got "
                        f"{type(kind_weights).__name__}")
    return check_kind_weights({**dict.fromkeys(KINDS, 1.0), **kind_weights},
                              f"{where}: kind_weights", error=ValueError)


def _finish_sample_files(directory: Path, token_files, ends, kinds, domains) -> None:
    """Flushes and closes the token and mask files, and writes the per-sample arrays (offsets,
    kinds, domains) next to them: what both writers do when they complete."""
    for f in token_files:
        f.flush()
        os.fsync(f.fileno())
        f.close()
    offsets = np.zeros(len(ends) + 1, dtype=np.int64)
    offsets[1:] = np.frombuffer(ends, dtype=np.int64)
    np.save(directory / "offsets.npy", offsets)
    np.save(directory / "kinds.npy", np.frombuffer(kinds, dtype=np.uint8))
    np.save(directory / "domains.npy", np.frombuffer(domains, dtype=np.int16))


class TokenDatasetWriter:
    """Streams samples into a new prepared dataset at `out_dir`.

    `domains` lists the domain names by id; id 0 is the general domain. A list that does not start
    with "general" gets it put in front, so the ids of the names given start at 1.
    """

    def __init__(self, out_dir, *, domains: list[str], kind_weights: dict[str, float], pad_id: int,
                 vocab_size: int, seq_len: int):
        self.out_dir = Path(out_dir)
        domains = [str(d) for d in domains]
        if not domains or domains[0] != GENERAL_DOMAIN:
            domains.insert(0, GENERAL_DOMAIN)
        if len(set(domains)) != len(domains):
            raise ValueError(f"TokenDatasetWriter({self.out_dir}): domain names must be unique, "
                             f"got {domains}")
        if len(domains) > _DOMAIN_MAX + 1:
            raise ValueError(f"TokenDatasetWriter({self.out_dir}): at most {_DOMAIN_MAX + 1} "
                             "domains fit int16 ids")
        if int(vocab_size) < 1 or int(vocab_size) > _INT32_MAX:
            raise ValueError(f"TokenDatasetWriter({self.out_dir}): vocab_size = {vocab_size} must "
                             f"be in 1..{_INT32_MAX}")
        if int(seq_len) < 1:
            raise ValueError(f"TokenDatasetWriter({self.out_dir}): seq_len = {seq_len} must be "
                             ">= 1")
        if not 0 <= int(pad_id) < int(vocab_size):
            raise ValueError(f"TokenDatasetWriter({self.out_dir}): pad_id = {pad_id} must be in "
                             "0..vocab_size-1")
        self.domains = domains
        self.kind_weights = _kind_weights_for_writer(kind_weights,
                                                     f"TokenDatasetWriter({self.out_dir})")
        self.pad_id = int(pad_id)
        self.vocab_size = int(vocab_size)
        self.seq_len = int(seq_len)

        if self.out_dir.exists() and not _replaceable(self.out_dir):
            raise FileExistsError(
                f"{self.out_dir} exists and is not a prepared dataset; choose another output "
                "directory or remove it")
        # Unique per process, hidden, next to the target so that the final rename stays on one
        # filesystem.
        target = self.out_dir.resolve()
        self._tmp_dir = target.parent / f".{target.name}.incomplete-{os.getpid()}"
        if self._tmp_dir.exists():
            shutil.rmtree(self._tmp_dir)
        self._tmp_dir.mkdir(parents=True)
        self._tokens_file = open(self._tmp_dir / "tokens.bin", "wb")
        self._mask_file = open(self._tmp_dir / "loss_mask.bin", "wb")
        # Compact growable arrays: one entry per sample, small next to the token stream.
        self._ends = array("q")
        self._kinds = array("B")
        self._domains = array("h")
        self._num_tokens = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, tokens, loss_mask, kind: int, domain: int) -> None:
        if self._closed:
            raise RuntimeError(f"TokenDatasetWriter({self.out_dir}): add() after close()")
        where = f"TokenDatasetWriter({self.out_dir}).add (sample {len(self._ends)})"
        tokens = np.asarray(tokens)
        loss_mask = np.asarray(loss_mask)
        if tokens.ndim != 1 or tokens.shape[0] < 1:
            raise ValueError(f"{where}: tokens must be a non-empty 1-D sequence, got shape "
                             f"{tokens.shape}")
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{where}: tokens must be integers, got dtype {tokens.dtype}")
        if loss_mask.shape != tokens.shape:
            raise ValueError(f"{where}: loss_mask has shape {loss_mask.shape} but tokens has "
                             f"{tokens.shape}")
        if loss_mask.dtype != np.bool_:
            if (loss_mask.dtype.kind not in "iu" or int(loss_mask.min()) < 0
                    or int(loss_mask.max()) > 1):
                raise ValueError(f"{where}: loss_mask must be booleans or 0/1 integers")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"{where}: token ids must be in 0..{self.vocab_size - 1} "
                             f"(vocab_size), got {low}..{high}")
        kind, domain = int(kind), int(domain)
        if not 0 <= kind < len(KINDS):
            raise ValueError(f"{where}: kind = {kind} must index {list(KINDS)}")
        if not 0 <= domain < len(self.domains):
            raise ValueError(f"{where}: domain = {domain} must index the domains {self.domains}")
        self._tokens_file.write(np.ascontiguousarray(tokens, dtype=_TOKEN_DTYPE).data)
        self._mask_file.write(np.ascontiguousarray(loss_mask, dtype=_MASK_DTYPE).data)
        self._num_tokens += tokens.shape[0]
        self._ends.append(self._num_tokens)
        self._kinds.append(kind)
        self._domains.append(domain)

    def close(self, report: dict | None = None) -> TokenDataset:
        if self._closed:
            raise RuntimeError(f"TokenDatasetWriter({self.out_dir}): close() called twice")
        self._closed = True
        try:
            _finish_sample_files(self._tmp_dir, (self._tokens_file, self._mask_file), self._ends,
                                 self._kinds, self._domains)
            meta = {
                "format": FORMAT,
                "num_samples": len(self._ends),
                "num_tokens": self._num_tokens,
                "domains": self.domains,
                "kinds": list(KINDS),
                "kind_weights": self.kind_weights,
                "pad_id": self.pad_id,
                "vocab_size": self.vocab_size,
                "seq_len": self.seq_len,
                "report": dict(report or {}),
            }
            # meta.json last: its presence is what marks the dataset complete.
            with open(self._tmp_dir / META_FILE, "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            if self.out_dir.exists():
                trash = self._tmp_dir.parent / f".{self._tmp_dir.name}.replaced"
                os.replace(self.out_dir, trash)
                os.replace(self._tmp_dir, self.out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(self._tmp_dir, self.out_dir)
        except BaseException:
            self.abort()
            raise
        return TokenDataset(self.out_dir)

    def abort(self) -> None:
        """Drops everything written so far; the target directory is left as it was."""
        self._closed = True
        _close_quietly(self._tokens_file, self._mask_file)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self) -> TokenDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _replaceable(path: Path) -> bool:
    """Only an empty directory or an earlier prepared dataset may be overwritten."""
    if not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    return not names or (META_FILE in names and all(dataset_file(n) for n in names))


def dataset_file(name: str) -> bool:
    """A name a prepared dataset (either format, or one being prepared) may hold."""
    return name in DATA_FILES or name == META_FILE or name.startswith(("shard_", "."))


def _close_quietly(*files) -> None:
    """Closes files after a failed write. Closing flushes the buffer, which fails again on a full
    disk; the temporary directory must still be removed, so that error is not the one to report."""
    for f in files:
        if not f.closed:
            try:
                f.close()
            except OSError:
                pass


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class ShardWriter:
    """One shard of a sharded (format 2) dataset at `directory`: the five data files of format 1
    and shard.json. Built under a hidden temporary name next to it, renamed by finish(): a
    directory with the shard's name is complete by construction. `add_many` takes prepare's own
    arrays (already checked), so it checks nothing."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self._tmp = self.dir.parent / f".{self.dir.name}.tmp-{os.getpid()}"
        if self._tmp.exists():
            shutil.rmtree(self._tmp)
        self._tmp.mkdir(parents=True)
        self._tokens = open(self._tmp / "tokens.bin", "wb")
        self._mask = open(self._tmp / "loss_mask.bin", "wb")
        self._tokens_sha, self._mask_sha = hashlib.sha256(), hashlib.sha256()
        self._ends, self._kinds, self._domains = array("q"), array("B"), array("h")
        self._num_tokens = 0

    def add_many(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray, kinds: np.ndarray,
                 domains: np.ndarray) -> None:
        """Samples of `lengths` tokens each, concatenated in `ids` (int32) and `mask` (uint8)."""
        token_bytes = np.ascontiguousarray(ids, np.int32).data
        mask_bytes = np.ascontiguousarray(mask, np.uint8).data
        self._tokens.write(token_bytes)
        self._mask.write(mask_bytes)
        self._tokens_sha.update(token_bytes)
        self._mask_sha.update(mask_bytes)
        ends = self._num_tokens + np.cumsum(lengths, dtype=np.int64)
        if len(ends):
            self._num_tokens = int(ends[-1])
        self._ends.frombytes(ends.tobytes())
        self._kinds.frombytes(np.asarray(kinds, np.uint8).tobytes())
        self._domains.frombytes(np.asarray(domains, np.int16).tobytes())

    def __len__(self) -> int:
        return len(self._ends)

    def finish(self, info: dict) -> dict:
        """Writes the per-sample arrays and shard.json ({num_samples, num_tokens, sha256 per file,
        **info}), renames the shard into place and returns shard.json's contents."""
        try:
            _finish_sample_files(self._tmp, (self._tokens, self._mask), self._ends, self._kinds,
                                 self._domains)
            sha = {"tokens.bin": self._tokens_sha.hexdigest(),
                   "loss_mask.bin": self._mask_sha.hexdigest()}
            for name in ("offsets.npy", "kinds.npy", "domains.npy"):
                _fsync_file(self._tmp / name)
                sha[name] = file_sha256(self._tmp / name)
            record = {"num_samples": len(self._ends), "num_tokens": self._num_tokens, "sha256": sha,
                      **info}
            with open(self._tmp / SHARD_FILE, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            if self.dir.exists():   # a stale shard of another config: this one supersedes it
                trash = self.dir.parent / f".{self.dir.name}.replaced-{os.getpid()}"
                os.replace(self.dir, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(self._tmp, self.dir)
        except BaseException:
            self.abort()
            raise
        return record

    def abort(self) -> None:
        _close_quietly(self._tokens, self._mask)
        shutil.rmtree(self._tmp, ignore_errors=True)


def read_shard_record(directory) -> dict | None:
    """shard.json of a complete shard whose data files have the sizes it states; None otherwise."""
    directory = Path(directory)
    try:
        record = json.loads((directory / SHARD_FILE).read_text())
        n, tokens = int(record["num_samples"]), int(record["num_tokens"])
        sizes = {"tokens.bin": 4 * tokens, "loss_mask.bin": tokens}
        if any((directory / name).stat().st_size != size for name, size in sizes.items()):
            return None
        if not all((directory / name).is_file() for name in DATA_FILES) or n < 0:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def write_index(out_dir, meta: dict) -> None:
    """meta.json of a sharded dataset, atomically (a temporary file renamed): the mark that every
    shard is complete. Several processes may write the same index at once; the contents are
    equal."""
    out_dir = Path(out_dir)
    tmp = out_dir / f".{META_FILE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"format": SHARDED_FORMAT, **meta}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_dir / META_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_damage(directory, record: dict) -> str | None:
    """What is wrong with a complete shard's files against the sha256 sums its shard.json holds
    (the first file that differs), or None when they match. Costs one read of the shard."""
    directory = Path(directory)
    for name, digest in sorted((record.get("sha256") or {}).items()):
        problem = _hash_mismatch(directory / name, digest, directory / SHARD_FILE)
        if problem:
            return problem
    return None


def _hash_mismatch(file: Path, digest: str, index: Path) -> str | None:
    """What is wrong with `file` against the sha256 `digest` that `index` records, or None."""
    try:
        if file_sha256(file) != digest:
            return f"{file}: sha256 differs from {index}"
    except OSError as e:
        return f"{file}: cannot read it ({e.strerror or e})"
    return None


_PREPARE_AGAIN = "run `rega-engine prepare` again to rebuild the dataset"
_META_INTS = ("num_samples", "num_tokens", "pad_id", "vocab_size", "seq_len")


def _read_meta(meta_path: Path) -> dict:
    """meta.json, checked as far as it can be alone: format, keys and their types."""
    meta = read_json_object(meta_path, error=DataError, fix=_PREPARE_AGAIN)
    if meta.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise DataError(f"{meta_path}: unknown dataset format {meta.get('format')!r} (this "
                        f"rega-engine reads formats {FORMAT} and {SHARDED_FORMAT}; prepared by "
                        f"another version?); {_PREPARE_AGAIN} with this version")
    missing = [k for k in (*_META_INTS, "domains", "kinds", "kind_weights") if k not in meta]
    if meta["format"] == SHARDED_FORMAT and "shards" not in meta:
        missing.append("shards")
    if missing:
        raise DataError(f"{meta_path}: missing key(s) {', '.join(missing)}; {_PREPARE_AGAIN}")
    for key in _META_INTS:
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{meta_path}: {key} = {value!r}, expected a whole number >= 0; "
                            f"{_PREPARE_AGAIN}")
    domains = meta["domains"]
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise DataError(f"{meta_path}: domains = {meta['domains']!r}, expected a list of names; "
                        f"{_PREPARE_AGAIN}")
    # Kinds are only ever appended, so a dataset prepared before a kind existed keeps its ids.
    kinds = meta["kinds"]
    if not isinstance(kinds, list) or not kinds or kinds != list(KINDS[:len(kinds)]):
        raise DataError(f"{meta_path}: kinds {meta['kinds']} differ from this version's "
                        f"{list(KINDS)}; {_PREPARE_AGAIN}")
    if meta["format"] == SHARDED_FORMAT:
        shards = meta["shards"]
        ok = isinstance(shards, list) and all(
            isinstance(e, dict) and isinstance(e.get("name"), str) and "/" not in e["name"]
            and all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("num_samples", "num_tokens"))
            for e in shards)
        if not ok or sum(e["num_samples"] for e in shards) != meta["num_samples"] \
                or sum(e["num_tokens"] for e in shards) != meta["num_tokens"]:
            raise DataError(f"{meta_path}: shards do not add up to num_samples and num_tokens; "
                            f"{_PREPARE_AGAIN}")
    return meta


class _Shard:
    """One directory of the five data files, every array memory-mapped."""

    def __init__(self, path: Path, num_samples: int, num_tokens: int):
        self.path = path
        for name in DATA_FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} is missing; prepare the dataset again")
        self.offsets = self._load_npy("offsets.npy", np.int64, num_samples + 1)
        self.kinds = self._load_npy("kinds.npy", np.uint8, num_samples)
        self.domains = self._load_npy("domains.npy", np.int16, num_samples)
        self.tokens = self._map("tokens.bin", _TOKEN_DTYPE, num_tokens)
        self.loss_mask = self._map("loss_mask.bin", _MASK_DTYPE, num_tokens)
        if (self.offsets[0] != 0 or self.offsets[-1] != num_tokens
                or (np.diff(self.offsets) < 0).any()):
            raise DataError(f"{path / 'offsets.npy'} does not partition {num_tokens} tokens; "
                            f"{_PREPARE_AGAIN}")

    def _load_npy(self, name: str, dtype, count: int) -> np.ndarray:
        file = self.path / name
        try:
            array_ = np.load(file, allow_pickle=False, mmap_mode="r")
        except (ValueError, EOFError, OSError) as e:   # what numpy raises for a damaged .npy
            raise DataError(f"{file}: not a readable .npy file ({e}); {_PREPARE_AGAIN}") from None
        if array_.dtype != dtype or array_.shape != (count,):
            raise DataError(f"{file}: expected {count} x {np.dtype(dtype).name}, found "
                            f"{array_.shape} x {array_.dtype.name} (meta.json and the data "
                            f"disagree); {_PREPARE_AGAIN}")
        return array_

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        file = self.path / name
        expected = count * np.dtype(dtype).itemsize
        size = file.stat().st_size
        if size != expected:
            raise DataError(f"{file}: {size} bytes, expected {expected} ({count} x "
                            f"{np.dtype(dtype).name}): the file is truncated or does not belong to "
                            f"this meta.json; {_PREPARE_AGAIN}")
        if count == 0:
            return np.zeros(0, dtype=dtype)  # numpy cannot map an empty file
        return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def damaged_dataset_error(problems: list[str]) -> DataError:
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
    return DataError(f"{problems[0]}{more}: the shard is damaged; {_PREPARE_AGAIN} (it rewrites "
                     "damaged shards and keeps the others)")


class TokenDataset:
    """A prepared dataset, memory-mapped: opening it reads only the small per-sample arrays.

    Format 1 is one directory of data files; format 2 (prepare's) is any number of shards behind
    one index. Sample ids run over the shards in order; `shards` lists them, `sample_base[k]` is
    the id of shard k's first sample."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"prepared dataset {self.path} not found (run `rega-engine "
                                    "prepare` first)")
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} is missing: {self.path} is not a complete prepared dataset "
                "(an interrupted prepare run?); run `rega-engine prepare` again")
        meta = _read_meta(meta_path)
        self.meta = meta
        if meta["format"] == FORMAT:
            self.shards = [_Shard(self.path, meta["num_samples"], meta["num_tokens"])]
        else:
            self.shards = [_Shard(self.path / e["name"], e["num_samples"], e["num_tokens"])
                           for e in meta["shards"]]
        counts = [len(s.kinds) for s in self.shards]
        self.sample_base = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.sample_base[1:])
        if len(self.shards) == 1:
            only = self.shards[0]
            self.kinds, self.domains = only.kinds, only.domains
        else:
            self.kinds = np.concatenate([s.kinds
                for s in self.shards]) if self.shards else np.zeros(0, np.uint8)
            self.domains = (np.concatenate([s.domains for s in self.shards]) if self.shards
                            else np.zeros(0, np.int16))
        self.domain_names = list(meta["domains"])
        self._check_ids(len(meta["kinds"]), len(self.domain_names))
        self.kind_weights = check_kind_weights(meta["kind_weights"], f"{meta_path}: kind_weights",
                                               error=DataError)
        self.pad_id = meta["pad_id"]
        self.vocab_size = meta["vocab_size"]
        self.seq_len = meta["seq_len"]

    # One-shard datasets (format 1) have flat arrays; a sharded one is read shard by shard.
    def _only_shard(self, name: str) -> _Shard:
        if len(self.shards) != 1:
            raise AttributeError(f"TokenDataset.{name}: {self.path} has {len(self.shards)} shards; "
                                 f"read dataset.shards[k].{name}, or dataset.sample(i)")
        return self.shards[0]

    @property
    def tokens(self) -> np.ndarray:
        return self._only_shard("tokens").tokens

    @property
    def loss_mask(self) -> np.ndarray:
        return self._only_shard("loss_mask").loss_mask

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each sample (int64, num_samples): the offsets' differences, a private array
        of 8 bytes a sample (0.75 GiB at 100M samples) made at each call, where the offsets are
        memory-mapped and shared; a caller that needs it more than once keeps it. Not held by the
        dataset, so that the processes of a node that map one shared epoch plan never hold it."""
        if len(self.shards) == 1:
            return np.diff(self.shards[0].offsets)
        if not self.shards:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(s.offsets) for s in self.shards])

    @property
    def offsets(self) -> np.ndarray:
        """Global token offsets (num_samples + 1), as if the shards were one stream."""
        if len(self.shards) == 1:
            return self.shards[0].offsets
        out = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=out[1:])
        return out

    def _check_ids(self, num_kinds: int, num_domains: int) -> None:
        """Kind and domain ids within meta.json's lists: a flipped byte in kinds.npy or domains.npy
        would otherwise index past the weights and the metrics. The arrays are small (3 bytes a
        sample) and already read, so this costs milliseconds per million samples."""
        for name, values, limit in (("kinds.npy", self.kinds, num_kinds),
                                    ("domains.npy", self.domains, num_domains)):
            if not len(values):
                continue
            low, high = int(values.min()), int(values.max())
            if low >= 0 and high < limit:
                continue
            i = int(np.flatnonzero((values < 0) | (values >= limit))[0])
            k = int(np.searchsorted(self.sample_base, i, side="right")) - 1
            raise DataError(f"{self.shards[k].path / name}: sample {i - int(self.sample_base[k])} "
                            f"has id {int(values[i])}, outside 0..{limit - 1} "
                            f"({self.path / META_FILE} lists {limit}); the file is damaged; "
                            f"{_PREPARE_AGAIN} (it rewrites damaged shards)")

    @property
    def fingerprint(self) -> str:
        """What identifies this dataset's contents, cheaply (from meta.json alone): for a sharded
        dataset the sha256 sums of its files, so the same bytes anywhere (moved, copied, prepared
        again) have the same fingerprint; for format 1, meta.json itself."""
        if self.meta["format"] == SHARDED_FORMAT:
            identity = json.dumps([[e["name"], e["num_samples"], e["num_tokens"],
                                    e.get("sha256")] for e in self.meta["shards"]],
                                  sort_keys=True)
        else:
            identity = (self.path / META_FILE).read_text()
        return hashlib.sha256(identity.encode()).hexdigest()

    def checksummed_files(self) -> list[tuple[Path, str]]:
        """(file, sha256) of every file the index holds a sum for (format 2; none in format 1)."""
        return [(shard.path / name, digest)
                for entry, shard in zip(self.meta.get("shards", []), self.shards)
                for name, digest in sorted((entry.get("sha256") or {}).items())]

    def damaged_files(self, rank: int = 0, world_size: int = 1) -> list[str]:
        """Hashes the files of share `rank` of `world_size` against the index; returns a line per
        file that differs. Costs one read of those files. The shares are balanced by bytes (the
        largest file to the least loaded rank): every shard has one large tokens.bin beside small
        files, so every world_size-th file would hand one rank most of the bytes."""
        files = self.checksummed_files()
        sizes = [os.path.getsize(file) if os.path.exists(file) else 0 for file, _ in files]
        loads, share = [0] * world_size, []
        for i in sorted(range(len(files)), key=lambda i: (-sizes[i], i)):
            least = min(range(world_size), key=lambda r: (loads[r], r))
            loads[least] += sizes[i]
            if least == rank:
                share.append(files[i])
        found = (_hash_mismatch(file, digest, self.path / META_FILE) for file, digest in share)
        return [problem for problem in found if problem]

    def verify(self) -> None:
        """Checks every shard's files against the sha256 sums in the index (format 2); raises a
        DataError naming the first damaged file."""
        problems = self.damaged_files()
        if problems:
            raise damaged_dataset_error(problems)

    def __len__(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    def sample(self, i) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples in {self.path}")
        k = int(np.searchsorted(self.sample_base, i, side="right")) - 1
        shard, local = self.shards[k], i - int(self.sample_base[k])
        begin, end = int(shard.offsets[local]), int(shard.offsets[local + 1])
        return shard.tokens[begin:end], shard.loss_mask[begin:end]

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, samples={len(self)}, "
                f"tokens={self.num_tokens}, shards={len(self.shards)})")
