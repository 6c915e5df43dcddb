"""Training under torchrun with DistributedDataParallel (issue 15): real processes, real data.

Every run is ``torchrun --nproc-per-node N --no-python cdc-serve train`` (or the plain
command) on scikit-learn's digits, on the CPU (gloo), rendezvous on a free loopback port:

- two processes: rank 0 alone writes (an audit hook in every worker records each file it
  opens for writing, renames or removes under ``--out``), both end with the same weights,
  ``train_log.json`` says world_size 2;
- a two-process run killed in MoCo-v2, resumed, killed in CDC and resumed again continues
  from its checkpoints each time and ends with the weights of the uninterrupted run;
  resuming it with one process is refused with one line;
- one process under torchrun is the plain run, to the last digit.

Every process computes on one thread (``OMP_NUM_THREADS=1``, which torchrun sets for
several processes anyway), so that runs with one and two processes compute alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ARGS = ["train", "--dataset", "digits", "--preset", "quick", "--seed", "0", "--device", "cpu"]
RUN = [*ARGS, "--pretrain-epochs", "3", "--epochs", "6"]  # MoCo ~1 s, CDC ~0.3 s an epoch
FILES = {"assignments.csv", "backbone.pt", "cdc.ckpt", "init.pt", "metrics.json", "model.pth",
         "pretrain.ckpt", "train_log.json"}  # fmt: skip

# Imported by every Python process started with its folder on PYTHONPATH: a torchrun worker
# (RANK set) appends to AUDIT_LOG/writes-rank<RANK>.txt every path under AUDIT_OUT it opens
# for writing, renames, removes or creates as a folder (torch.save goes through
# checkpoint.atomic_save: a temporary file, then os.replace).
AUDIT_HOOK = """
import os, sys
_OUT, _RANK = os.environ.get("AUDIT_OUT"), os.environ.get("RANK")
if _OUT and _RANK is not None:
    _LOG = os.path.join(os.environ["AUDIT_LOG"], "writes-rank" + _RANK + ".txt")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _under(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False
        return os.path.realpath(os.fsdecode(path)).startswith(_OUT + os.sep)

    def _hook(event, args):
        if event == "open":
            paths = [args[0]] if isinstance(args[2], int) and args[2] & _WRITE else []
        elif event in ("os.rename", "os.remove", "os.mkdir"):
            paths = list(args[:2]) if event == "os.rename" else [args[0]]
        else:
            return
        for path in paths:
            if _under(path):
                with open(_LOG, "a") as f:
                    f.write(event + " " + os.path.basename(os.fsdecode(path)) + "\\n")

    sys.addaudithook(_hook)
"""


# One CDC batch (Algorithm 1: selection, mini-clusters, two sub-batches, SGD steps) of a
# fixed global batch, in one process (plain python) or split over two (torchrun); rank 0
# saves the weights after it. The model is in eval mode (BatchNorm by running statistics:
# on the CPU it normalises per process in training) and every view is the val view, so the
# two may differ only by float rounding.
# With seed 1 the two processes hold 5 and 8 (4 and 6) of the selected samples of
# sub-batch 1 (2): unequal shares, so the clustering loss's weights matter.
ONE_BATCH = """
import sys
import torch
from torch import nn
from cdc_serve_training import cdc, distributed
from cdc_serve_training.augment import Augmenter
from cdc_serve_training.config import CDCConfig
from cdc_serve_training.heads import ClusteringModel

class Flat(nn.Module):
    out_dim = 8
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(64, 8), nn.BatchNorm1d(8)
    def forward(self, x):
        return torch.relu(self.bn(self.fc(x.flatten(1))))

class SameViews(Augmenter):
    def weak(self, x, generator=None):
        return self.val(x)
    def strong(self, x, generator=None):
        return self.val(x)

device = torch.device("cpu")
with distributed.session(device):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    model = ClusteringModel(Flat(), 16, 3).eval()
    cfg = CDCConfig(batch_size=64, sub_batch_size=32, mini_clusters=4, kmeans_iters=5,
                    label_by="column")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    select_head, cal_head = cdc._heads(model, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    autocast = torch.autocast("cuda", enabled=False)
    step = distributed.wrap(cdc._SubBatch(model, cal_head, True, autocast), device,
                            find_unused_parameters=True)
    stats = cdc._train_batch(
        model, distributed.shard(images, 2), SameViews((8, 8), (0.5,), (0.25,)), cfg, 3,
        select_head, cal_head, optimizer, torch.Generator().manual_seed(1), autocast, step,
    )
    stats = distributed.average(stats)
    if distributed.is_main():
        torch.save({"before": before, "state": model.state_dict(), "stats": stats}, sys.argv[1])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(processes: int | None, out: Path, *extra: str, args=RUN) -> list[str]:
    """``cdc-serve train`` under torchrun with ``processes`` (None: the plain command)."""
    train = [str(BIN / "cdc-serve"), *args, "--out", str(out), *extra]
    if processes is None:
        return train
    return [str(BIN / "torchrun"), "--nproc-per-node", str(processes), "--master-addr",
            "127.0.0.1", "--master-port", str(_free_port()), "--no-python", *train]  # fmt: skip


def _env(tmp: Path, out: Path) -> dict[str, str]:
    audit = tmp / "audit"
    audit.mkdir(exist_ok=True)
    (audit / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(audit))
    return dict(env, AUDIT_OUT=os.path.realpath(out), AUDIT_LOG=str(audit))


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _log(out: Path) -> dict:
    return json.loads((out / "train_log.json").read_text())


def _epochs(stderr: str, stage: str) -> list[int]:
    """The epochs a run trained, from its ``<stage> epoch k/n`` lines (rank 0 prints them)."""
    return [int(line.split()[2].split("/")[0]) for line in stderr.splitlines()
            if line.startswith(f"{stage} epoch ")]  # fmt: skip


def _checkpoint_epoch(path: Path) -> int:
    from cdc_serve_training.checkpoint import safe_load

    return int(safe_load(path)["epoch"])


def _kill_when(command: list[str], env: dict[str, str], path: Path) -> str:
    """Start ``command`` and kill it as soon as ``path`` exists; returns its stderr.

    torchrun starts its workers in sessions of their own: SIGTERM to torchrun stops them
    (Python's default SIGTERM ends a process on the spot, as a kill would); then the test
    waits until every worker is gone.
    """
    log = path.parent.parent / f"stderr-{time.monotonic_ns()}.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 300
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.05)
    assert path.exists(), log.read_text()
    return log.read_text()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """An uninterrupted run with two processes: (out, stderr, audit folder)."""
    tmp = tmp_path_factory.mktemp("two")
    out = tmp / "run"
    env = _env(tmp, out)
    result = _run(_command(2, out), env)
    assert result.returncode == 0, result.stderr
    # one process says where the model is (torchrun passes every rank's stdout through)
    assert result.stdout.count("model: ") == 1, result.stdout
    return out, result.stderr, tmp / "audit"


def test_two_processes_rank0_alone_writes_and_both_end_identical(two):
    from cdc_serve_training.checkpoint import load_model
    from cdc_serve_training.distributed import digests

    out, stderr, audit = two
    assert {p.name for p in out.iterdir()} == FILES  # no temporary or per-rank leftovers
    assert not (audit / "writes-rank1.txt").exists()  # rank 1 wrote nothing under --out
    written = (audit / "writes-rank0.txt").read_text().split("\n")
    for name in ("model.pth", "metrics.json", "train_log.json", "cdc.ckpt", "backbone.pt"):
        assert any(line.endswith(f" {name}") for line in written), name  # the hook sees rank 0

    log = _log(out)
    assert log["world_size"] == 2
    first, second = log["rank_weight_digests"]
    assert first == second  # both processes ended with the same weights
    model, info = load_model(out / "model.pth")
    assert digests(model) == [first]  # ... and model.pth holds them
    assert info["config"]["cdc"]["sub_batch_size"] == 448  # 1797 images: B_s splits over 2
    assert _epochs(stderr, "MoCo") == [1, 2, 3] and _epochs(stderr, "CDC") == [1, 2, 3, 4, 5, 6]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 1797 and metrics["heads"]["cal"]["acc"] > 0.3  # chance: 0.1


def test_killed_two_process_run_resumes_from_its_checkpoints(two, tmp_path):
    out = tmp_path / "run"
    env = _env(tmp_path, out)
    # killed after the first MoCo-v2 epoch checkpoint
    _kill_when(_command(2, out), env, out / "pretrain.ckpt")
    assert not (out / "backbone.pt").exists()
    moco_done = _checkpoint_epoch(out / "pretrain.ckpt")
    assert 1 <= moco_done < 3
    # resumed: MoCo-v2 continues from it; killed again after the first CDC checkpoint
    stderr = _kill_when(_command(2, out, "--resume"), env, out / "cdc.ckpt")
    assert f"MoCo: resuming from {out / 'pretrain.ckpt'} after epoch {moco_done}/3" in stderr
    assert _epochs(stderr, "MoCo") == list(range(moco_done + 1, 4))
    assert not (out / "model.pth").exists()
    cdc_done = _checkpoint_epoch(out / "cdc.ckpt")
    assert 1 <= cdc_done < 6
    # resumed again: the backbone and the init are reused, CDC continues to the end
    result = _run(_command(2, out, "--resume"), env)
    assert result.returncode == 0, result.stderr
    assert "pretrain: reusing" in result.stderr and _epochs(result.stderr, "MoCo") == []
    assert f"CDC: resuming from {out / 'cdc.ckpt'} after epoch {cdc_done}/6" in result.stderr
    assert _epochs(result.stderr, "CDC") == list(range(cdc_done + 1, 7))
    assert {p.name for p in out.iterdir()} == FILES
    log = _log(out)
    assert log["world_size"] == 2 and len(log["history"]["loss_clu"]) == 6
    # the same weights as the uninterrupted run, on both processes
    assert log["rank_weight_digests"] == _log(two[0])["rank_weight_digests"]


def test_resuming_with_another_number_of_processes_is_refused(two, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two[0], out)
    env = _env(tmp_path, out)
    for command in (_command(1, out, "--resume"), _command(None, out, "--resume")):
        result = _run(command, env)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            f"error: cannot resume from {out / 'backbone.pt'}: it was written by a run of 2 "
            "processes, this one has 1 (world_size 2 -> 1); resume with the same number of "
            "processes (torchrun --nproc-per-node 2) or train into another --out"
        ]
    assert _log(out) == _log(two[0])  # nothing was overwritten


def test_one_process_under_torchrun_is_the_plain_run(tmp_path):
    short = [*ARGS, "--pretrain-epochs", "1", "--epochs", "2", "--limit", "600"]
    logs = {}
    for name, processes in (("plain", None), ("torchrun", 1)):
        out = tmp_path / name
        result = _run(_command(processes, out, args=short), _env(tmp_path, out))
        assert result.returncode == 0, result.stderr
        logs[name] = _log(out)
        logs[name]["history"].pop("seconds")
    plain, torchrun = tmp_path / "plain", tmp_path / "torchrun"
    assert (plain / "metrics.json").read_text() == (torchrun / "metrics.json").read_text()
    assert logs["plain"]["world_size"] == logs["torchrun"]["world_size"] == 1
    for key in ("rank_weight_digests", "history", "init_metrics"):
        assert logs["plain"][key] == logs["torchrun"][key], key


def test_two_processes_train_a_batch_as_one_process_would(tmp_path):
    """The global batch's selection, mini-clusters and loss weights: DDP's averaged step over
    two processes is the one-process step (the clustering loss weighted by each process's
    share of the selected samples, Eq. 2 of the global sub-batch's mean prediction)."""
    import torch

    script = tmp_path / "one_batch.py"
    script.write_text(ONE_BATCH)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = _run([sys.executable, str(script), str(tmp_path / "one.pt")], env)
    assert one.returncode == 0, one.stderr
    two = _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port()), str(script), str(tmp_path / "two.pt")], env)  # fmt: skip
    assert two.returncode == 0, two.stderr
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("one", "two"))
    assert a["stats"]["loss_clu"] > 0 and a["stats"]["selected"] > 0.3  # both losses ran
    for key, value in a["stats"].items():
        assert b["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    moved = [n for n, w in a["state"].items() if not torch.equal(w, a["before"][n])]
    assert {"backbone.fc.weight", "clu_head.fc2.weight", "cal_head.fc2.weight"} <= set(moved)
    for name, weight in a["state"].items():
        torch.testing.assert_close(b["state"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_restarts_under_two_processes(tmp_path):
    """``--restarts 2`` with two processes: every process trains both candidates, rank 0
    judges them, and both processes end on the same (chosen) weights."""
    short = [*ARGS, "--pretrain-epochs", "1", "--epochs", "2", "--restarts", "2"]
    out = tmp_path / "run"
    result = _run(_command(2, out, args=short), _env(tmp_path, out))
    assert result.returncode == 0, result.stderr
    log = _log(out)
    candidates = log["restarts"]["candidates"]
    assert [c["candidate"] for c in candidates] == [0, 1]
    estimates = [c["estimate"] for c in candidates]
    assert log["restarts"]["chosen"] == estimates.index(max(estimates))
    assert log["world_size"] == 2 and len(set(log["rank_weight_digests"])) == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["label_free"]["estimated_accuracy"] == pytest.approx(max(estimates), abs=1e-6)
