"""One epoch plan per node, shared through a memory map.

`PackedLoader` plans an epoch identically on every rank (`_EpochRows`: which samples each row
holds, in which order the rows are consumed). At 100M samples those arrays are about 1.2 GB and
their build peaks near 6 GB, in every process. With `PlanSharing` one process per node, the
*leader* (local rank 0), builds them and writes them to a file in a node-local directory; the
node's other processes (*followers*) map that file read-only, and so does the leader once it has
written it, dropping what it built. Every process of the node then reads the same page-cache pages:
the node holds one plan however many processes it runs. The rows are bit-identical to a plain
loader's: they are the same bytes, built by the same code.

Files (in the first of the plan directories, see `plan_dirs`; the leader falls back to the next
when the first lacks room, and followers look in each):

    rega-plan-u<uid>-<job>-<plan>-s<seed>-e<epoch>.plan   an epoch's arrays, complete
    ...-e<epoch>.plan.tmp<pid>                            being written by leader <pid>
    rega-plan-u<uid>-<job>-<plan>-s<seed>-leader          "<pid> <epoch> <pid namespace>"

<job> is a hash of the job's identity (`job_identity`), <plan> a hash of everything the plan
depends on: plan format version, package version, the dataset's fingerprint, its number of samples
and tokens, seq_len, window, shuffle and seed; the full digest is in the file's header too and is
checked when a file is mapped. A plan file's content is a pure function of its name, so a file
found under the right name is correct whatever wrote it; the job identity keeps two jobs from
removing each other's files or waiting on each other's leader.

Synchronisation, without communication: the leader writes the file under a temporary name and
renames it when complete (atomic), so a plan file is never seen half-written. Before planning an
epoch it announces itself in the `leader` file (also written and renamed). A follower polls: it
first waits until it has seen a live leader announce itself (a file left by a crashed earlier run
cannot hold it up or mislead it), then maps the epoch's file as soon as it is there. It gives up
with an error naming the file after `timeout_s`, and at once when the leader it saw has died. When
it learns that it will not get the file from the leader (the leader finished and cleaned up, or is
already past this epoch and removed it: an epoch shorter than one optimizer step can do that), it
builds the rows itself, as a plain loader would: correct, only not shared.

Cleanup: when the leader plans epoch e it removes its files of any epoch but e - 1 and e (a
follower still needing e - 1 while the leader plans e + 1 builds it itself, see above); when the
leader's loader is collected or the interpreter exits, it removes every file it wrote or used and
its `leader` file. Unlinking a mapped file is safe on Linux: the followers' maps stay readable
until they drop them. What a crash (SIGKILL, an OOM kill; a SIGTERM without the training loop's
handler) leaves behind is at most the two newest epoch files of that job's plan, a temporary file
and the `leader` file naming a dead pid. It is harmless to correctness: no other job reads it
(other names), and a rerun under the same name would find the same bytes. It does hold memory in
/dev/shm until the next leader of this user on this node starts: that one first sweeps the files
of every leader that is dead (judged only within its own pid namespace, so a container sharing
/dev/shm with others never removes theirs); a reboot clears /dev/shm too.

Environment (read by `PlanSharing.from_env`, which the training loop uses): REGA_PLAN_DIR (the
directory), REGA_PLAN_TIMEOUT_S (the followers' wait, default 1800 s) and REGA_SHARED_PLAN=0
(every process plans for itself, as before).
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rega_engine.errors import DataError
from rega_engine.log import get_logger

log = get_logger(__name__)

# Bump when the bytes of a plan change for the same inputs (the planning code, the packer, the
# layout below): the plan hash changes, so no file of an older layout is ever mapped.
PLAN_FORMAT_VERSION = 1
MAGIC = b"REGAPLAN"
# Header: magic (8 bytes), int64 format version, epoch, number of bins, number of bin_samples, then
# the 32-byte sha256 of the plan and epoch; zero padding up to HEADER_BYTES. The arrays follow,
# int64, in ARRAYS order: bin_splits (bins + 1), bin_samples, bin_segments, bin_tokens, row_bins.
HEADER_BYTES = 128
ARRAYS = ("bin_splits", "bin_samples", "bin_segments", "bin_tokens", "row_bins")
DEFAULT_TIMEOUT_S = 1800.0
# torchrun's and Slurm's variables that, together, tell concurrent jobs on one node apart: a
# standalone torchrun gets a random run id; a static one's MASTER_ADDR:MASTER_PORT cannot be bound
# by two live jobs; GROUP_RANK separates two agents of one job that share a host.
JOB_VARIABLES = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "SLURM_JOB_ID", "SLURM_STEP_ID")
_TMP = ".tmp"
_LEADER = "leader"
_ROOM_MARGIN = 64 << 20   # free bytes a directory must keep beyond the file to be chosen


def job_identity(environ: Mapping[str, str] | None = None) -> str:
    """The job, as every process of it on a node sees it alike: the launcher's variables of
    JOB_VARIABLES that are set."""
    env = os.environ if environ is None else environ
    return ";".join(f"{k}={env[k]}" for k in JOB_VARIABLES if env.get(k))


def plan_dirs(directory: str | os.PathLike | None = None) -> list[Path]:
    """Where plan files go: `directory` alone when given, else /dev/shm (memory, on Linux) when it
    exists and is writable, then the system temp directory."""
    if directory is not None:
        return [Path(directory)]
    dirs = []
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        dirs.append(shm)
    temp = Path(tempfile.gettempdir())
    if temp not in dirs:
        dirs.append(temp)
    return dirs


@dataclass(frozen=True)
class PlanSharing:
    """This process's place in its node's plan sharing: `local_rank` 0 builds and writes each
    epoch's plan, the other `local_world_size` - 1 processes map it. `job` tells this job's files
    from other jobs' on the node (the same string in every process of the job); `directory`
    overrides the default plan directories; followers wait at most `timeout_s` for a file."""
    local_rank: int
    local_world_size: int
    job: str
    directory: str | os.PathLike | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self):
        for name in ("local_rank", "local_world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"PlanSharing: {name} must be an integer, got {value!r}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"PlanSharing: local_rank {self.local_rank} must be in "
                             f"0..{self.local_world_size - 1}")
        if not isinstance(self.job, str):
            raise TypeError(f"PlanSharing: job must be a string, got {self.job!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"PlanSharing: timeout_s must be > 0, got {self.timeout_s!r}")

    @property
    def is_leader(self) -> bool:
        return self.local_rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PlanSharing | None:
        """Sharing for a process launched by torchrun with several processes on its node (None
        otherwise, or with REGA_SHARED_PLAN=0): local rank and size from LOCAL_RANK and
        LOCAL_WORLD_SIZE, the job from `job_identity`, REGA_PLAN_DIR and REGA_PLAN_TIMEOUT_S."""
        env = os.environ if environ is None else environ
        if env.get("REGA_SHARED_PLAN", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        try:
            local_rank, local_world = int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
        except (KeyError, ValueError):
            return None
        if local_world <= 1:
            return None
        timeout = env.get("REGA_PLAN_TIMEOUT_S")
        return cls(local_rank, local_world, job_identity(env), env.get("REGA_PLAN_DIR") or None,
                   float(timeout) if timeout else DEFAULT_TIMEOUT_S)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int, namespace: str) -> bool | None:
    """Whether process `pid` of pid namespace `namespace` runs; None when this process cannot
    tell (another namespace: a container sharing /dev/shm with the host, say)."""
    here = _pid_namespace()
    if not here or namespace != here:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_files(files: set[Path]) -> None:
    """The leader's cleanup (a weakref.finalize, so also at interpreter exit): plan files first,
    the `leader` file last, so that no plan file outlives it (what the sweep relies on)."""
    for path in sorted(files, key=lambda p: p.name.endswith(_LEADER)):
        try:
            _unlink(path)
        except OSError:
            pass
    files.clear()


def _read_leader(path: Path) -> tuple[int, int, str] | None:
    try:
        pid, epoch, namespace = path.read_text().split()
        return int(pid), int(epoch), namespace
    except (OSError, ValueError):
        return None


def _header(digest: bytes, epoch: int, num_bins: int, num_samples: int) -> bytes:
    head = MAGIC + np.array([PLAN_FORMAT_VERSION, epoch, num_bins, num_samples],
                            dtype="<i8").tobytes() + digest
    return head + bytes(HEADER_BYTES - len(head))


def _map_plan(path: Path, digest: bytes, epoch: int) -> dict[str, np.ndarray]:
    """The arrays of plan file `path`, read-only views of one shared map; DataError when the file
    is not the complete plan of `digest` (FileNotFoundError passes through)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_BYTES:
            raise DataError(f"{path}: the epoch plan file is truncated ({size} bytes, less than "
                            "its header); delete it and run again", path=str(path))
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    head = buffer[:HEADER_BYTES]
    version, file_epoch, num_bins, num_samples = np.frombuffer(head, "<i8", 4, len(MAGIC))
    expected = HEADER_BYTES + 8 * (4 * int(num_bins) + 1 + int(num_samples))
    problem = None
    if head[:len(MAGIC)] != MAGIC or version != PLAN_FORMAT_VERSION:
        problem = "is not an epoch plan of this version"
    elif head[40:72] != digest or file_epoch != epoch:
        problem = f"holds another plan than epoch {epoch} of this loader's"
    elif num_bins < 0 or num_samples < 0 or size != expected:
        problem = (f"is truncated or damaged: {size} bytes where its header promises "
                   f"{expected}")
    if problem is None:
        counts = (int(num_bins) + 1, int(num_samples), int(num_bins), int(num_bins),
                  int(num_bins))
        arrays, offset = {}, HEADER_BYTES
        for name, count in zip(ARRAYS, counts):
            arrays[name] = np.frombuffer(buffer, np.int64, count, offset)
            offset += 8 * count
        splits = arrays["bin_splits"]
        if splits[0] == 0 and splits[-1] == num_samples:
            return arrays
        problem = "is damaged: its bin_splits do not cover its bin_samples"
        del arrays, splits   # views of the map: it cannot close while they exist
    buffer.close()
    raise DataError(f"{path}: the epoch plan file {problem}; delete it and run again (the "
                    "node's leader, local rank 0, writes it anew)", path=str(path))


class SharedPlan:
    """The plan files of one loader (see the module's docstring). `identity` holds everything
    but the seed that the plan depends on; `rows` hands out an epoch's arrays."""

    def __init__(self, sharing: PlanSharing, identity: Mapping[str, object]):
        from rega_engine import __version__
        self.sharing = sharing
        self._identity = {"format": PLAN_FORMAT_VERSION, "rega_engine": __version__,
                          **identity, "job": sharing.job}
        self._dirs = plan_dirs(sharing.directory)
        self._uid = os.getuid() if hasattr(os, "getuid") else 0
        self._job = hashlib.sha256(sharing.job.encode()).hexdigest()[:12]
        self._namespace = _pid_namespace()
        self._seen_leader: set[str] = set()     # follower: prefixes whose live leader it saw
        self._swept = False
        self._noted = False
        # leader: every file it wrote or used, removed when it is collected or at exit
        self._owned: set[Path] = set()
        if sharing.is_leader:
            self._finalizer = weakref.finalize(self, _remove_files, self._owned)

    # -- names ---------------------------------------------------------------------------------
    def _prefix(self, seed: int) -> tuple[str, str]:
        key = json.dumps({**self._identity, "seed": int(seed)}, sort_keys=True)
        plan = hashlib.sha256(key.encode()).hexdigest()
        return f"rega-plan-u{self._uid}-{self._job}-{plan[:16]}-s{int(seed)}-", plan

    @staticmethod
    def _digest(plan: str, epoch: int) -> bytes:
        return hashlib.sha256(f"{plan}:{epoch}".encode()).digest()

    def path(self, seed: int, epoch: int) -> Path:
        """Where the leader writes the file of (seed, epoch) when the first directory has room."""
        return self._dirs[0] / f"{self._prefix(seed)[0]}e{int(epoch)}.plan"

    def _leader_path(self, prefix: str) -> Path:
        return self._dirs[0] / f"{prefix}{_LEADER}"

    # -- both ----------------------------------------------------------------------------------
    def rows(self, seed: int, epoch: int,
             build: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The ARRAYS of `epoch`: mapped from the node's plan file, or (the leader, or a follower
        that will not get the file) what `build()` returns, written for the others first."""
        prefix, plan = self._prefix(seed)
        digest = self._digest(plan, epoch)
        name = f"{prefix}e{int(epoch)}.plan"
        if self.sharing.is_leader:
            return self._lead(prefix, name, digest, epoch, build)
        return self._follow(prefix, name, digest, epoch, build)

    def _find(self, name: str, digest: bytes, epoch: int):
        """(path, arrays) of a complete file `name` in a plan directory, or None."""
        for directory in self._dirs:
            path = directory / name
            try:
                return path, _map_plan(path, digest, epoch)
            except FileNotFoundError:
                continue
        return None

    # -- leader --------------------------------------------------------------------------------
    def _lead(self, prefix: str, name: str, digest: bytes, epoch: int, build):
        if not self._swept:
            self._swept = True
            self._sweep_dead_leaders()
        self._announce(prefix, epoch)
        self._remove_epochs(prefix, keep=(f"e{epoch - 1}.plan", f"e{epoch}.plan"))
        try:
            found = self._find(name, digest, epoch)
        except DataError as error:   # a damaged file under our name: replace it
            log.warning(f"{error}; the leader plans the epoch again")
            for directory in self._dirs:
                _unlink(directory / name)
            found = None
        if found is not None:   # planned before (load_state_dict went back): same bytes
            self._owned.add(found[0])
            return found[1]
        path = self._write(name, digest, epoch, build())
        self._owned.add(path)
        found = self._find(name, digest, epoch)
        if found is None:
            raise DataError(f"{path}: the epoch plan file vanished right after it was written; "
                            "is another process cleaning the plan directory?", path=str(path))
        return found[1]

    def _announce(self, prefix: str, epoch: int) -> None:
        path = self._leader_path(prefix)
        tmp = path.with_name(f"{path.name}{_TMP}{os.getpid()}")
        try:
            tmp.write_text(f"{os.getpid()} {int(epoch)} {self._namespace}\n")
            os.replace(tmp, path)
        except OSError as error:
            _unlink(tmp)
            raise DataError(f"{path}: cannot write the epoch plan's leader file ({error}); set "
                            "REGA_PLAN_DIR to a writable node-local directory, or "
                            "REGA_SHARED_PLAN=0", path=str(path)) from error
        self._owned.add(path)

    def _write(self, name: str, digest: bytes, epoch: int,
               arrays: Mapping[str, np.ndarray]) -> Path:
        parts = [np.ascontiguousarray(arrays[k], dtype=np.int64) for k in ARRAYS]
        num_bins, num_samples = len(parts[2]), len(parts[1])
        size = HEADER_BYTES + sum(p.nbytes for p in parts)
        directory, room = self._dirs[0], -1
        for candidate in self._dirs:   # the first with room, else the roomiest
            try:
                stat = os.statvfs(candidate)
                free = stat.f_bavail * stat.f_frsize
            except OSError:
                continue
            if free >= size + _ROOM_MARGIN:
                directory, room = candidate, free
                break
            if free > room:
                directory, room = candidate, free
        path = directory / name
        tmp = path.with_name(f"{name}{_TMP}{os.getpid()}")
        try:
            # os.write, not a writable map: a full tmpfs gives ENOSPC here, not a SIGBUS later.
            # No fsync: the file is a cache that only outlives the job by accident, and other
            # processes see the page cache at once.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, "wb") as f:
                f.write(_header(digest, epoch, num_bins, num_samples))
                for part in parts:
                    f.write(memoryview(part).cast("B"))
            os.replace(tmp, path)
        except OSError as error:
            _unlink(tmp)
            raise DataError(
                f"{path}: cannot write the epoch plan ({size / 2**30:.2f} GiB; {room / 2**30:.2f} "
                f"GiB free in {directory}): {error}; set REGA_PLAN_DIR to a node-local directory "
                "with room (in a container: a larger /dev/shm, e.g. docker --shm-size), or "
                "REGA_SHARED_PLAN=0 to plan in every process", path=str(path)) from error
        return path

    def _entries(self, prefix: str = "rega-plan-"):
        """(directory, file name) of the plan files of this user starting with `prefix`."""
        mine = f"rega-plan-u{self._uid}-"
        for directory in self._dirs:
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for entry in names:
                if entry.startswith(mine) and entry.startswith(prefix):
                    yield directory, entry

    def _remove_epochs(self, prefix: str, keep: tuple[str, ...]) -> None:
        """Removes this plan's epoch files but `keep`, and the temporary files of dead writers."""
        for directory, entry in list(self._entries(prefix)):
            rest = entry[len(prefix):]
            if rest.startswith("e") and rest.endswith(".plan") and rest not in keep:
                _unlink(directory / entry)
                self._owned.discard(directory / entry)
            elif rest.startswith("e") and _TMP in rest:
                pid = rest.rsplit(_TMP, 1)[1]
                if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(
                        int(pid), self._namespace) is False:
                    _unlink(directory / entry)

    def _sweep_dead_leaders(self) -> None:
        """Removes the files of this user's plans whose leader is gone (a crashed job's): those
        whose `leader` file names a dead process of this pid namespace, and those without a
        `leader` file (a live leader announces itself before it writes anything and removes its
        `leader` file last) once they are a minute old (an announcement in flight is younger)."""
        groups: dict[str, list[Path]] = {}
        for directory, entry in self._entries():
            groups.setdefault(entry[:entry.rfind("-") + 1], []).append(directory / entry)
        # A leader's `leader` file is in the first of its plan directories: its REGA_PLAN_DIR,
        # where its plan files are too, or a default one.
        where = list(dict.fromkeys([*self._dirs, *plan_dirs()]))
        now = time.time()
        for prefix, files in groups.items():
            leaders = [p for p in (d / f"{prefix}{_LEADER}" for d in where) if p.exists()]
            if not leaders:
                stale = []
                for f in files:
                    try:
                        if now - f.stat().st_mtime > 60:
                            stale.append(f)
                    except OSError:
                        pass
            else:
                states = [_read_leader(p) for p in leaders]
                if not all(s is not None and _pid_alive(s[0], s[2]) is False for s in states):
                    continue   # alive, unreadable, or in another pid namespace: not ours to judge
                stale = files
            for f in sorted(stale, key=lambda p: p.name.endswith(_LEADER)):
                _unlink(f)

    # -- follower ------------------------------------------------------------------------------
    def _build_note(self, why: str) -> None:
        # Once at warning level: planning in a follower costs the memory sharing saves.
        text = f"{why}; this process plans the epoch itself"
        if self._noted:
            log.debug(text)
        else:
            self._noted = True
            log.warning(text + " (memory: one more copy of the plan on this node)")

    def _follow(self, prefix: str, name: str, digest: bytes, epoch: int, build):
        sharing = self.sharing
        leader_path = self._leader_path(prefix)
        start = time.monotonic()
        pause = 0.005
        while True:
            state = _read_leader(leader_path)   # before looking for the file: see below
            alive = None if state is None else _pid_alive(state[0], state[2])
            if state is not None and alive is not False:
                self._seen_leader.add(prefix)
            if prefix in self._seen_leader:
                found = self._find(name, digest, epoch)
                if found is not None:
                    return found[1]
                if state is None:
                    self._build_note(f"{leader_path.parent / name}: the node's leader finished "
                                     "and removed its plan files")
                    return dict(build())
                if alive is False:
                    raise DataError(
                        f"{leader_path.parent / name}: the node's leader (local rank 0, pid "
                        f"{state[0]}) exited without writing this epoch plan; see its error "
                        "(this process waits for the plan it writes)", path=str(leader_path))
                if state[1] > epoch:   # it announced a later epoch after this one's file went
                    self._build_note(f"{leader_path.parent / name}: the node's leader is past "
                                     f"epoch {epoch} and removed its plan")
                    return dict(build())
            waited = time.monotonic() - start
            if waited >= sharing.timeout_s:
                if state is None:
                    who = f"no leader announced itself in {leader_path}"
                elif alive is False:
                    who = (f"{leader_path} names pid {state[0]}, which does not run (a file left "
                           "by a crashed earlier run?)")
                else:
                    who = (f"the leader (pid {state[0]}) announced itself in {leader_path} but "
                           f"has not written the plan (it announced epoch {state[1]})")
                raise DataError(
                    f"{leader_path.parent / name}: waited {waited:.0f} s for the epoch plan that "
                    f"the node's leader (local rank 0) writes, in vain: {who}. Check that local "
                    "rank 0 runs, with the same job identity and plan directory (REGA_PLAN_DIR), "
                    "and its log; raise REGA_PLAN_TIMEOUT_S when planning is that slow, or set "
                    "REGA_SHARED_PLAN=0 to plan in every process", path=str(leader_path))
            time.sleep(min(pause, max(sharing.timeout_s - waited, 0.001)))
            pause = min(pause * 2, 0.2)
