"""One epoch plan per node (rega_engine/data/shared_plan.py): the node's leader (local rank 0)
writes each epoch's rows to a file, the other processes map it; batches are a plain loader's."""
import gc
import hashlib
import json
import mmap
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_loader import write_dataset

from rega_engine.data.loader import PackedLoader
from rega_engine.data.shared_plan import (
    ARRAYS,
    HEADER_BYTES,
    PlanSharing,
    job_identity,
    plan_dirs,
)
from rega_engine.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("input_ids", "labels", "position_ids", "cu_seqlens", "kind_ids", "domain_ids",
          "loss_weights")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    lengths = np.random.default_rng(7).integers(1, 30, 400)
    return write_dataset(tmp_path_factory.mktemp("shared_plan") / "ds", lengths, seq_len=32)[0]


def loader(dataset, rank=0, world=1, *, sharing=None, seed=3, **kwargs):
    kwargs.setdefault("prefetch", 0)
    return PackedLoader(dataset, batch_size=2, rank=rank, world_size=world, seed=seed,
                        pin_memory=False, share_plan=sharing, **kwargs)


def share(local_rank, local_world, plan_dir, job="job-a", timeout_s=5.0):
    return PlanSharing(local_rank, local_world, job, plan_dir, timeout_s=timeout_s)


def batches(it, limit=None):
    out = []
    for batch in it:
        out.append(tuple(getattr(batch, f).numpy().copy() for f in FIELDS)
                   + (batch.max_seqlen, batch.num_real_tokens))
        if limit is not None and len(out) == limit:
            break
    return out


def assert_same(got, want):
    assert len(got) == len(want) and len(want) > 0
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def plan_files(plan_dir):
    return sorted(p.name for p in Path(plan_dir).iterdir())


def mapped(array):
    """Whether `array` is a read-only view of a memory map."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "obj", None) if isinstance(base, memoryview) else base.base
    return isinstance(base, mmap.mmap) and not array.flags.writeable


@pytest.fixture
def count_builds(monkeypatch):
    built = []
    original = PackedLoader._build_rows

    def counting(self, epoch):
        if self.share_plan is not None:   # (local rank, epoch) of each build by a sharing loader
            built.append((self.share_plan.local_rank, epoch))
        return original(self, epoch)

    monkeypatch.setattr(PackedLoader, "_build_rows", counting)
    return built


def test_shared_loaders_hand_out_a_plain_loaders_batches(dataset, tmp_path, count_builds):
    world = 3
    shared = [loader(dataset, r, world, sharing=share(r, world, tmp_path),
                     prefetch=2 if r == 1 else 0) for r in range(world)]
    plain = [loader(dataset, r, world) for r in range(world)]
    count_builds.clear()
    for epoch in range(2):
        for r in range(world):   # the leader first: followers wait for its file
            assert_same(batches(shared[r]), batches(plain[r]))
            assert shared[r].epoch == epoch + 1
    assert count_builds == [(0, 0), (0, 1)], "the node built each epoch once: the leader"
    for r in range(world):
        for name in ARRAYS:
            assert mapped(getattr(shared[r]._rows, name)), (r, name)

    # Resumes, elastically: a state saved mid-epoch by 3 ranks, continued by 2 sharing ranks.
    for r in range(world):
        it = iter(plain[r])
        batches(it, limit=3)
    state = plain[0].state_dict()
    assert state["rows_consumed"] % (2 * 2) != 0   # not on the new world's batch boundary
    resumed = [loader(dataset, r, 2, sharing=share(r, 2, tmp_path, job="job-b"))
               for r in range(2)]
    fresh = [loader(dataset, r, 2) for r in range(2)]
    for new in resumed + fresh:   # the leader first
        new.load_state_dict(state)
    for r in range(2):
        assert_same(batches(resumed[r]), batches(fresh[r]))
        assert mapped(resumed[r]._rows.bin_samples)


def test_processes_map_the_one_file_their_leader_built(dataset, tmp_path):
    """Separate processes: one build on the node, every process maps the same file, the rows are
    a plain loader's, and nothing is left in the plan directory once they exit."""
    child = textwrap.dedent("""
        import hashlib, json, sys
        from rega_engine.data.loader import PackedLoader
        from rega_engine.data.shared_plan import ARRAYS, PlanSharing
        path, plan_dir, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        builds = []
        original = PackedLoader._build_rows
        PackedLoader._build_rows = lambda self, e: builds.append(e) or original(self, e)
        loader = PackedLoader(path, batch_size=2, rank=rank, world_size=world, seed=3,
                              prefetch=0, pin_memory=False,
                              share_plan=PlanSharing(rank, world, "job-p", plan_dir, 20.0))
        len(loader)
        rows = loader._rows
        digest = hashlib.sha256(b"".join(getattr(rows, n).tobytes() for n in ARRAYS))
        maps = [line.split()[-1] for line in open("/proc/self/maps") if plan_dir in line]
        print(json.dumps({"builds": builds, "digest": digest.hexdigest(), "maps": maps,
                          "batches": loader._plan.batches.tolist()}), flush=True)
        sys.stdin.read()   # the leader stays until every follower has mapped its file
    """)
    world = 3
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", child, str(dataset.path), str(tmp_path),
                               str(r), str(world)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for r in range(world)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
    assert [p.returncode for p in procs] == [0] * world
    assert [r["builds"] for r in reports] == [[0]] + [[]] * (world - 1)
    rows = loader(dataset, 0, world)._epoch_rows(0)
    want = hashlib.sha256(b"".join(getattr(rows, n).tobytes() for n in ARRAYS)).hexdigest()
    assert {r["digest"] for r in reports} == {want}
    files = {m for r in reports for m in r["maps"]}
    assert len(files) == 1 and all(r["maps"] for r in reports), reports
    assert Path(files.pop()).name.endswith("-e0.plan")
    for r, report in enumerate(reports):
        assert report["batches"] == loader(dataset, r, world)._epoch_plan().batches.tolist()
    assert plan_files(tmp_path) == [], "the leader removes its files at exit"


def test_a_follower_without_a_leader_times_out_naming_the_file(dataset, tmp_path):
    follower = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path, timeout_s=0.3))
    name = follower._shared.path(3, 0).name
    with pytest.raises(DataError, match="local rank 0") as error:
        len(follower)
    text = str(error.value)
    assert name in text and "no leader announced itself" in text
    assert "REGA_SHARED_PLAN=0" in text and "REGA_PLAN_TIMEOUT_S" in text


def test_a_follower_fails_at_once_when_its_leader_dies(dataset, tmp_path):
    follower = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path, timeout_s=30))
    shared = follower._shared
    prefix, _ = shared._prefix(3)
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    namespace = os.readlink("/proc/self/ns/pid")
    shared._leader_path(prefix).write_text(f"{stand_in.pid} 0 {namespace}\n")

    def die():
        stand_in.kill()
        stand_in.wait()

    timer = threading.Timer(0.3, die)
    timer.start()
    try:
        with pytest.raises(DataError, match=f"pid {stand_in.pid}.*exited without writing"):
            len(follower)
    finally:
        timer.cancel()
        die()


def test_a_stale_leader_file_neither_holds_up_nor_fails_a_follower(dataset, tmp_path):
    """A crashed earlier run's `leader` file (dead pid) is not a live leader: the follower waits for
    the real one, whose first plan sweeps the stale files away."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    namespace = os.readlink("/proc/self/ns/pid")
    follower = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path, timeout_s=0.3))
    prefix, _ = follower._shared._prefix(3)
    stale = [tmp_path / f"{prefix}leader", tmp_path / f"{prefix}e7.plan",
             tmp_path / f"{prefix}e7.plan.tmp{dead.pid}"]
    stale[0].write_text(f"{dead.pid} 7 {namespace}\n")
    for path in stale[1:]:
        path.write_bytes(b"x" * 10)
    with pytest.raises(DataError, match=f"names pid {dead.pid}, which does not run"):
        len(follower)
    # Another job's live files (its leader is this process) and another namespace's stay.
    other = f"rega-plan-u{os.getuid()}-000000000000-0000000000000000-s1-"
    (tmp_path / f"{other}leader").write_text(f"{os.getpid()} 0 {namespace}\n")
    (tmp_path / f"{other}e0.plan").write_bytes(b"y")
    foreign = f"rega-plan-u{os.getuid()}-111111111111-0000000000000000-s1-"
    (tmp_path / f"{foreign}leader").write_text(f"{dead.pid} 0 pid:[1]\n")
    (tmp_path / f"{foreign}e0.plan").write_bytes(b"z")
    kept = plan_files(tmp_path)
    leader = loader(dataset, 0, 2, sharing=share(0, 2, tmp_path))
    len(leader)
    follower._shared.sharing = share(1, 2, tmp_path, timeout_s=5)
    assert_same(batches(follower), batches(loader(dataset, 1, 2)))
    left = plan_files(tmp_path)
    assert not {p.name for p in stale[1:]} & set(left)
    assert {n for n in kept if not n.startswith(prefix)} <= set(left)
    assert f"{prefix}leader" in left and f"{prefix}e0.plan" in left


def test_earlier_epochs_files_go_and_the_leader_removes_the_rest(dataset, tmp_path):
    leader = loader(dataset, 0, 2, sharing=share(0, 2, tmp_path))
    follower = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path))
    plain = loader(dataset, 1, 2)
    prefix, _ = leader._shared._prefix(3)
    for epoch in range(4):
        leader._advance(epoch, 0)
        len(leader)
        assert plan_files(tmp_path) == sorted(
            [f"{prefix}leader"] + [f"{prefix}e{e}.plan" for e in (epoch - 1, epoch) if e >= 0])
    # A follower that lags (epochs shorter than a step can do that) plans a removed epoch itself.
    follower._advance(1, 0)
    plain._advance(1, 0)
    assert_same(batches(follower), batches(plain))
    assert not mapped(follower._rows.bin_samples)
    follower._advance(3, 0)
    plain._advance(3, 0)
    it = iter(follower)
    assert mapped(follower._rows.bin_samples)
    del leader
    gc.collect()
    assert plan_files(tmp_path) == [], "the leader's loader took its files along"
    # Unlinked, still mapped: the follower reads on, and plans for itself once the leader is gone.
    assert_same(batches(it), batches(plain))
    assert_same(batches(follower), batches(plain))   # epoch 4: no leader left
    assert not mapped(follower._rows.bin_samples)
    assert plan_files(tmp_path) == []


def test_other_jobs_seeds_and_plans_get_other_files(dataset, tmp_path):
    base = loader(dataset, 0, 2, sharing=share(0, 2, tmp_path))
    path = base._shared.path(3, 0)
    assert path.parent == tmp_path and path.name.startswith(f"rega-plan-u{os.getuid()}-")
    assert "-s3-e0.plan" in path.name
    others = [loader(dataset, 0, 2, sharing=share(0, 2, tmp_path, job="job-b")),
              loader(dataset, 0, 2, sharing=share(0, 2, tmp_path), seq_len=31),
              loader(dataset, 0, 2, sharing=share(0, 2, tmp_path), window=7),
              loader(dataset, 0, 2, sharing=share(0, 2, tmp_path), shuffle=False)]
    names = {path.name, base._shared.path(3, 1).name, base._shared.path(4, 0).name}
    names |= {o._shared.path(3, 0).name for o in others}
    assert len(names) == 3 + len(others)

    # A follower of another job does not take job-a's file; one of another seed gets its own.
    len(base)
    stranger = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path, job="job-b", timeout_s=0.2))
    with pytest.raises(DataError, match="no leader announced itself"):
        len(stranger)
    seeded = [loader(dataset, r, 2, sharing=share(r, 2, tmp_path), seed=4) for r in range(2)]
    for r in range(2):
        assert_same(batches(seeded[r]), batches(loader(dataset, r, 2, seed=4)))
    # load_state_dict can change the seed: the plan of the saved seed, not the loader's.
    state = loader(dataset, 0, 2, seed=5).state_dict()
    for r in range(2):
        seeded[r].load_state_dict(state)
        assert_same(batches(seeded[r]), batches(loader(dataset, r, 2, seed=5)))
        assert mapped(seeded[r]._rows.bin_samples)


def test_a_damaged_plan_file_is_named(dataset, tmp_path):
    leader = loader(dataset, 0, 2, sharing=share(0, 2, tmp_path))
    len(leader)
    path = leader._shared.path(3, 0)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 8)
    follower = loader(dataset, 1, 2, sharing=share(1, 2, tmp_path))
    with pytest.raises(DataError, match="truncated or damaged") as error:
        len(follower)
    assert str(path) in str(error.value)
    path.write_bytes(b"short")
    with pytest.raises(DataError, match="truncated"):
        len(follower)
    # The leader replaces a damaged file under its name when it plans the epoch again.
    path.write_bytes(b"\0" * size)
    leader.load_state_dict(leader.state_dict())
    assert path.stat().st_size == size
    assert_same(batches(follower), batches(loader(dataset, 1, 2)))
    header = path.read_bytes()[:HEADER_BYTES]
    assert header.startswith(b"REGAPLAN")


def test_plan_sharing_from_the_environment(tmp_path, monkeypatch):
    env = {"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "RANK": "6", "WORLD_SIZE": "8",
           "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none"}
    sharing = PlanSharing.from_env(env)
    assert (sharing.local_rank, sharing.local_world_size, sharing.directory) == (2, 4, None)
    assert sharing.job == job_identity(env) and "MASTER_PORT=29500" in sharing.job
    assert PlanSharing.from_env({**env, "MASTER_PORT": "29501"}).job != sharing.job
    assert PlanSharing.from_env({**env, "REGA_PLAN_DIR": str(tmp_path),
                                 "REGA_PLAN_TIMEOUT_S": "9"}).directory == str(tmp_path)
    assert PlanSharing.from_env({**env, "REGA_PLAN_TIMEOUT_S": "9"}).timeout_s == 9.0
    assert PlanSharing.from_env({**env, "REGA_SHARED_PLAN": "0"}) is None
    assert PlanSharing.from_env({**env, "LOCAL_WORLD_SIZE": "1"}) is None
    assert PlanSharing.from_env({}) is None
    with pytest.raises(ValueError, match="local_rank"):
        PlanSharing(4, 4, "j")
    dirs = plan_dirs()
    assert dirs[-1] == Path(__import__("tempfile").gettempdir())
    if os.access("/dev/shm", os.W_OK):
        assert dirs[0] == Path("/dev/shm")
    assert plan_dirs(tmp_path) == [tmp_path]


def test_make_loaders_shares_under_torchrun_with_several_local_processes(dataset, tmp_path,
                                                                         monkeypatch):
    from rega_engine.train.loop import _make_loaders
    config = SimpleNamespace(
        data=SimpleNamespace(seq_len=32, kind_weights=dict(dataset.kind_weights)),
        train=SimpleNamespace(micro_batch_size=2, seed=3, grad_accum=2))
    runtime = SimpleNamespace(dp_rank=0, dp_size=2, world_size=2)
    monkeypatch.setenv("REGA_PLAN_DIR", str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    [shared] = _make_loaders(config, dataset, runtime, None)
    assert shared.share_plan is not None and shared.share_plan.is_leader
    assert mapped(shared._rows.bin_samples) and any(tmp_path.iterdir())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert _make_loaders(config, dataset, runtime, None)[0].share_plan is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    single = SimpleNamespace(dp_rank=0, dp_size=1, world_size=1)
    deals = _make_loaders(config, dataset, single, [(0, 2), (1, 2)])
    assert [d.share_plan for d in deals] == [None, None]


def test_only_the_planning_process_holds_the_samples_lengths(dataset, tmp_path, monkeypatch):
    # dataset.lengths is a private array of 8 bytes a sample (0.75 GiB at 100M samples): a
    # follower counts its loader's tokens shard by shard and maps the plan, never holding it.
    from rega_engine.data.dataset import TokenDataset
    calls = []
    original = TokenDataset.lengths

    def counted(self):
        calls.append(threading.current_thread().name)
        return original.fget(self)

    monkeypatch.setattr(TokenDataset, "lengths", property(counted))
    shared = [loader(dataset, r, 2, sharing=share(r, 2, tmp_path)) for r in range(2)]
    plain = loader(dataset)
    assert [s.tokens_per_epoch for s in shared] == [plain.tokens_per_epoch] * 2
    calls.clear()
    for _ in range(2):   # two epochs
        for r in range(2):   # the leader first
            batches(shared[r])
    assert len(calls) == 2, "the leader's one build per epoch, and no follower"
