"""The training runtime (ppml/train/runtime.py) and what sits on it: the schedule, the epoch order, checkpoints, stop
requests and the DDP check as units; in-model RS as an option of the PE-free model (the keys the trainer used to draw
itself, exact resume); the attack-training settings both learned attacks share; and the import rules (no circle
between the CLIs, no private name taken from another module)."""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ppml
from ppml.train import runtime
from ppml.train.runtime import Dist

ROOT = Path(__file__).resolve().parent.parent


# ---- the runtime's pieces --------------------------------------------------------------------------------------------


def test_warmup_cosine_rises_linearly_then_decays_to_min_lr_and_stays():
    f = runtime.warmup_cosine(4, 10, lr=1e-3, min_lr=1e-5, warmup_epochs=0.5)  # 40 steps, 5 of warm-up
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f(5) == pytest.approx(1.0)
    assert f(40) == pytest.approx(1e-2) and f(100) == pytest.approx(1e-2)  # min_lr / lr, held after the end
    mid = 5 + 35 / 2
    assert f(int(mid)) == pytest.approx(1e-2 + (1 - 1e-2) * 0.5 * (1 + math.cos(math.pi * (int(mid) - 5) / 35)))
    assert all(f(s) >= f(s + 1) for s in range(5, 45))
    assert runtime.warmup_cosine(2, 3, lr=1.0, min_lr=0.0, warmup_epochs=0)(0) == pytest.approx(1.0)  # no warm-up


def test_epoch_order_splits_every_index_over_ranks_with_equal_steps():
    n, bs = 23, 4
    one = runtime.epoch_order(n, bs, seed=0, epoch=0, d=Dist())
    assert sorted(torch.cat(one).tolist()) == list(range(n)) and [len(b) for b in one] == [4] * 5 + [3]
    assert torch.equal(torch.cat(one), torch.cat(runtime.epoch_order(n, bs, 0, 0, Dist())))  # seeded
    assert not torch.equal(torch.cat(one), torch.cat(runtime.epoch_order(n, bs, 0, 1, Dist())))  # per epoch
    ranks = [runtime.epoch_order(n, bs, 0, 0, Dist(world=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])  # the same number of steps on every rank (padded by wrapping)
    assert set(torch.cat(ranks[0]).tolist()) | set(torch.cat(ranks[1]).tolist()) == set(range(n))


def _set_ran() -> None:
    _RunsOnLoad.ran = True


class _RunsOnLoad:
    ran = False

    def __reduce__(self):
        return (_set_ran, ())


def test_atomic_save_open_checkpoint_and_metrics(tmp_path):
    out, path = str(tmp_path / "run"), str(tmp_path / "run" / "checkpoint.pt")
    runtime.make_run_dir(out, Dist())
    assert runtime.open_checkpoint(path, out, resume=False, op="ppml x") is None
    with pytest.raises(FileNotFoundError, match="ppml x: --resume given but there is no checkpoint at"):
        runtime.open_checkpoint(path, out, resume=True, op="ppml x")
    runtime.atomic_save({"epoch": 3, "w": torch.arange(4)}, path)
    assert os.listdir(out) == ["checkpoint.pt"]  # the temporary file was renamed, nothing else left
    ck = runtime.open_checkpoint(path, out, resume=True, op="ppml x")
    assert ck["epoch"] == 3 and torch.equal(ck["w"], torch.arange(4))
    with pytest.raises(FileExistsError, match="already holds a run"):
        runtime.open_checkpoint(path, out, resume=False, op="ppml x")
    # A checkpoint is unpickled with weights_only: one that would run code on load (here: set a flag) is refused.
    torch.save({"epoch": 4, "payload": _RunsOnLoad()}, path)
    _RunsOnLoad.ran = False
    with pytest.raises(pickle.UnpicklingError):
        runtime.open_checkpoint(path, out, resume=True, op="ppml x")
    assert not _RunsOnLoad.ran
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "w") as fh:
        fh.writelines(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3))
    runtime.keep_completed_epochs(metrics, 2)
    with open(metrics) as fh:
        assert [json.loads(ln)["epoch"] for ln in fh] == [1, 2]


def test_stop_request_finishes_the_step_then_a_second_signal_interrupts():
    before = signal.getsignal(signal.SIGTERM)
    with runtime.StopRequest() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # noted, not raised: the loop finishes its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_gather_in_sync_and_the_digest():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert runtime.param_digest(a) == runtime.param_digest(b)
    with torch.no_grad():
        b.bias[0] += 1e-3
    assert runtime.param_digest(a) != runtime.param_digest(b)
    states, digests = runtime.gather_in_sync({"step": 1}, a, Dist(), "ppml x")
    assert states == [{"step": 1}] and digests == [runtime.param_digest(a)]
    assert not runtime.any_rank(False, Dist(), torch.device("cpu")) and runtime.any_rank(True, Dist(), "cpu")


# ---- in-model RS in the PE-free model --------------------------------------------------------------------------------


def _pevit(**kw):
    pytest.importorskip("timm")
    from ppml.models import create_model

    torch.manual_seed(0)
    return create_model("pevit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2,
                        num_classes=5, **kw).eval()  # fmt: skip


def test_shuffle_input_draws_the_keys_the_trainer_drew_itself():
    """The model's keys are those the trainer drew before (ppml.random_permutations(B, (S/p)², generator=g) on the
    same stream), so seeded and resumed runs are unchanged; plain and shuffling models share their weights."""
    plain, shuffling = _pevit(), _pevit(shuffle_input=True)
    shuffling.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    perm = ppml.random_permutations(3, 16, generator=torch.Generator().manual_seed(7))
    want = plain.forward_features(ppml.shuffle_patches(x, 4, perm)[0])
    shuffling.shuffle_generator = torch.Generator().manual_seed(7)
    assert torch.equal(shuffling.forward_features(x), want)
    assert not torch.equal(plain.forward_features(x), want)  # the input really was shuffled
    # the stream goes on: the next call draws the next keys
    perm2 = ppml.random_permutations(3, 16, generator=_advanced(7, 3, 16))
    assert torch.equal(shuffling.forward_features(x), plain.forward_features(ppml.shuffle_patches(x, 4, perm2)[0]))
    assert "shuffle_input=True" in repr(shuffling) and not plain.shuffle_input


def _advanced(seed: int, b: int, n: int) -> torch.Generator:
    g = torch.Generator().manual_seed(seed)
    ppml.random_permutations(b, n, generator=g)
    return g


def test_shuffle_input_under_torch_compile_with_swapped_generators():
    """The key draw stays outside the graph: a new generator per epoch neither breaks nor changes the result."""
    model = _pevit(shuffle_input=True)
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    for seed in (3, 4):
        model.shuffle_generator = torch.Generator().manual_seed(seed)
        got = compiled(x)
        model.shuffle_generator = torch.Generator().manual_seed(seed)
        assert torch.equal(got, model(x))


def test_in_model_rs_resume_is_exact(tmp_path):
    pytest.importorskip("sklearn")
    from ppml.train import TrainConfig, run

    common = dict(encryption="rs", mode="in-model", epochs=2, img_size=16, patch_size=4, depth=1, embed_dim=24,
                  num_heads=2, batch_size=128, warmup_epochs=0.5, drop_path=0.1)  # fmt: skip
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **common))
    cfg = TrainConfig(out=str(tmp_path / "cut"), **common)
    assert run(cfg, stop_after=5)["stopped"]  # mid-epoch 1: the model's key stream continues from the checkpoint
    resumed = run(cfg, resume=True)
    assert resumed["param_digests"] == ref["param_digests"] and resumed["val_acc"] == ref["val_acc"]


@pytest.mark.parametrize("encryption,model", [("rs", "vit_tiny_patch16_224"), ("mi", "pevit_tiny_patch16_224")])
def test_in_model_needs_the_model_that_encrypts_its_input(tmp_path, encryption, model):
    from ppml.train import TrainConfig

    with pytest.raises(ValueError, match=f"--mode in-model with --encryption {encryption} needs a"):
        TrainConfig(encryption=encryption, mode="in-model", model=model, out=str(tmp_path)).check()


# ---- the attack-training kit -----------------------------------------------------------------------------------------


def test_attack_trainers_share_their_settings():
    from ppml.attacks import kit, train_position_attacker, train_unmix_decoder

    for fn in (train_position_attacker, train_unmix_decoder):
        with pytest.raises(TypeError, match=f"{fn.__name__}\\(\\) got an unexpected keyword argument 'stepz'"):
            fn(8, stepz=3)
        with pytest.raises(ValueError, match=f"ppml.attacks.{fn.__name__}: digits_fraction must lie in"):
            fn(8, digits_fraction=2.0)
    s = kit.TrainSettings.from_kwargs("op", {"lr": 1}, steps=3, batch_size=2, lr=0.5, weight_decay=0.0,
                                      digits_fraction=0.0)  # fmt: skip
    assert s.config() == dict(steps=3, batch_size=2, lr=1.0, weight_decay=0.0, data="public", digits_fraction=0.0,
                              seed=0)  # fmt: skip
    assert isinstance(s.config()["lr"], float)  # hashed into the cache name: 1 and 1.0 are the same setting


def test_load_inputs_names_the_caller(tmp_path):
    from ppml.show import load_inputs

    with pytest.raises(FileNotFoundError, match="^ppml attack: INPUT"):
        load_inputs(str(tmp_path / "missing.png"), op="ppml attack")
    with pytest.raises(ValueError, match="^ppml.show.load_inputs: size"):
        load_inputs("digits", size=0)


# ---- import rules ----------------------------------------------------------------------------------------------------

# The layers above the ops: the training runtime and everything built on it.
RUNTIME_FILES = sorted(
    [*ROOT.glob("ppml/train/*.py"), *ROOT.glob("ppml/detection/*.py"), *ROOT.glob("ppml/attacks/*.py"),
     *ROOT.glob("ppml/models/*.py"), ROOT / "ppml/cli.py", ROOT / "ppml/show.py"]
)  # fmt: skip


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_taken_from_another_module(path):
    """A private name (``_x``) is its module's own: what another module needs is made public where it lives."""
    taken = [
        f"{path.relative_to(ROOT)}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.module != "__future__"
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not taken, taken


def test_the_detection_cli_does_not_import_the_top_cli():
    code = "import sys, ppml.detection.cli; print('ppml.cli' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]
