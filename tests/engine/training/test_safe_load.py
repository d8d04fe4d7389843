"""Planted pickles in a run folder: refused in one line naming the file and the class; nothing runs.

Each payload would create a marker file when unpickled; the tests assert that it does not exist.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings

import pytest
import torch

from d2v2.engine.training.checkpoint import SHARDED_DIR, load_checkpoint, newest_loadable, read_sharded
from d2v2.engine.cli import main
from d2v2.engine.training.safe_load import UnsafePickleError
from tests.helpers import one_line_error

FAST = ["--set", "data.num_workers=0", "--set", "train.log_every=1"]
SYSTEM = f"{os.system.__module__}.system"  # posix.system: what a pickle of os.system names


class Payload:
    """Unpickled by plain ``pickle``, it runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("safe") / "run"
    os.environ.setdefault("D2V2_CACHE", str(tmp_path_factory.getbasetemp() / "d2v2-cache"))
    assert main(["pretrain", "--recipe", "image-tiny", "--out", str(run), "--max-steps", "1", *FAST, "--set", "data.batch_size=8"]) == 0
    return run


@pytest.fixture
def crafted(real_run, tmp_path):
    """A copy of a real run whose newest ``state.pt`` says it is sharded, with a payload as ``sharded/.metadata``."""
    run = tmp_path / "crafted"
    shutil.copytree(real_run, run, ignore=shutil.ignore_patterns(".lock"))
    folder = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save({**state, "sharded": SHARDED_DIR}, folder / "state.pt")
    (folder / SHARDED_DIR).mkdir()
    marker = tmp_path / "ran"
    (folder / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return run, marker


def _refused(err: str, file: str, marker) -> None:
    assert f"refusing {file}" in err and SYSTEM in err, err
    assert not marker.exists(), "the planted command ran"


COMMANDS = {
    "probe": lambda run, tmp: ["probe", "--checkpoint", str(run)],
    "export": lambda run, tmp: ["export", "--checkpoint", str(run), "--out", str(tmp / "export")],
    "init-from": lambda run, tmp: ["pretrain", "--recipe", "image-tiny", "--init-from", str(run), "--out", str(tmp / "new"),
                                   "--max-steps", "1", *FAST, "--set", "data.batch_size=8"],  # fmt: skip
    "resume": lambda run, tmp: ["pretrain", "--out", str(run), "--max-steps", "2", *FAST],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_planted_dcp_metadata_is_refused_by_every_command(crafted, tmp_path, capsys, command):
    run, marker = crafted
    err = one_line_error(capsys, COMMANDS[command](run, tmp_path))
    _refused(err, f"{run / 'checkpoints' / 'step-00000001' / SHARDED_DIR / '.metadata'}", marker)
    assert not (tmp_path / "export").exists() and not (tmp_path / "new" / "checkpoints").exists()


def test_a_planted_state_pt_is_refused_naming_the_class(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"method": {}, "config": {"payload": Payload(marker)}}, folder / "state.pt")
    with pytest.raises(UnsafePickleError, match=f"refusing {folder / 'state.pt'}: it names {SYSTEM}"):
        load_checkpoint(folder)
    _refused(one_line_error(capsys, ["probe", "--checkpoint", str(folder)]), str(folder / "state.pt"), marker)


def test_a_planted_dcp_entry_is_refused_naming_its_shard(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save({"method": {"w": torch.ones(2)}, "optimizer": {"param_groups": [{"lr": Payload(marker)}]}},
                 checkpoint_id=tmp_path / SHARDED_DIR)  # fmt: skip
    assert read_sharded(tmp_path / SHARDED_DIR, "method")["w"].tolist() == [1.0, 1.0]
    with pytest.raises(UnsafePickleError, match=rf"refusing {tmp_path / SHARDED_DIR / '__0_0.distcp'}: it names {SYSTEM}"):
        read_sharded(tmp_path / SHARDED_DIR, "optimizer")
    assert not marker.exists()


def test_resume_does_not_fall_back_past_a_planted_file(crafted):
    run, marker = crafted
    with pytest.raises(UnsafePickleError, match=r"\.metadata"):
        newest_loadable(run)  # a planted file is not damage: the run stops instead of reading on
    assert not marker.exists()
