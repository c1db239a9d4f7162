"""Checkpoint directories on object storage: s3:// URLs against moto's S3 server on loopback.

Two ranks train with checkpoint.dir=s3://bucket/...: synchronous saves with retention, then a
resumed run with asynchronous saves; the losses must be those of an uninterrupted run. Then the
newest checkpoint loses its completeness marker (as a save killed before its last PUT would leave
it): the next start reports it, resumes from the one before and repeats the same losses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen2_megatron.checkpoint.store import CheckpointStore
from qwen2_megatron.checkpoint.validate import check_files
from qwen2_megatron.cli import checkpoint as checkpoint_cli
from qwen2_megatron.parallel.layout import ParallelLayout
from qwen2_megatron.parallel.local_launch import spawn
from tests.s3_server import S3Server, s3_server  # noqa: F401 - the fixture
from tests.test_checkpoint import _cfg
from tests.trainer_workers import train_configs


def _s3_cfg(root: Path, s3: S3Server, run: str, steps: int, **ckpt):  # noqa: ANN202
    cfg = _cfg(root, run, steps, ParallelLayout(), **ckpt)
    cfg.checkpoint.dir = s3.url(run, "checkpoints")
    return cfg


@pytest.fixture(scope="module")
def s3_runs(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    root = tmp_path_factory.mktemp("s3")
    configs = {
        "ref": _cfg(root, "ref", 6, ParallelLayout(), save_at_end=False),
        "first": _s3_cfg(root, s3_server, "s3run", 3, interval=1, keep_last=2),
        "resumed": _s3_cfg(root, s3_server, "s3run", 6, interval=2, keep_last=2, async_save=True),
    }
    results = dict(zip(configs, spawn(train_configs, 2, list(configs.values()))[0]))
    store = CheckpointStore(s3_server.url("s3run", "checkpoints"))
    results["after_resume"] = store.listing()
    results["keys"] = s3_server.keys("s3run/checkpoints/")
    check_files(store.path(6))
    # the newest checkpoint without its marker, as a save killed before its last write leaves it
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="s3run/checkpoints/step_00000006/train_state.json")
    again = {"after_crash": _s3_cfg(root, s3_server, "s3run", 6, interval=0, keep_last=2, save_at_end=False)}
    results.update(zip(again, spawn(train_configs, 2, list(again.values()))[0]))
    results["store"] = store
    return results


def test_s3_checkpoints_resume_exactly(s3_runs: dict) -> None:
    assert s3_runs["first"] + s3_runs["resumed"] == s3_runs["ref"]


def test_s3_retention_and_publication(s3_runs: dict) -> None:
    store: CheckpointStore = s3_runs["store"]
    listing = s3_runs["after_resume"]
    assert [p.name for p in listing.complete] == ["step_00000004", "step_00000006"] and not listing.incomplete
    prefixes = {key.split("/")[2] for key in s3_runs["keys"]}
    assert prefixes == {"latest", "step_00000004", "step_00000006"}, prefixes  # 1-3 deleted whole
    assert any(key.endswith("step_00000006/.metadata") for key in s3_runs["keys"])


def test_s3_incomplete_checkpoint_is_ignored(s3_runs: dict, capsys: pytest.CaptureFixture) -> None:
    store: CheckpointStore = s3_runs["store"]
    assert s3_runs["after_crash"] == s3_runs["ref"][4:]  # resumed from step 4, not the broken 6
    assert [p.name for p in store.listing().incomplete] == ["step_00000006"]
    assert store.latest() == store.path(4)
    assert checkpoint_cli.main(["list", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "step_00000004  step 4" in out and "step_00000006  incomplete" in out, out
