"""`ppml train`: the digits split, every encryption/mode/loss path, exact resume, DDP with two CPU ranks, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("sklearn")

import ppml.data  # noqa: E402
from ppml.train import TrainConfig, run  # noqa: E402

# A model small enough that an epoch over the 1,437 training digits takes about a second on two cores.
TINY = dict(img_size=16, patch_size=4, depth=1, embed_dim=24, num_heads=2, batch_size=128, warmup_epochs=0.5)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_digits_split_is_fixed_stratified_and_in_range():
    a, b = ppml.data.load_digits(16), ppml.data.load_digits(16)
    assert a.train_x.shape == (1438, 3, 16, 16) and a.val_x.shape == (359, 3, 16, 16)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert a.train_x.min() >= 0 and a.train_x.max() <= 1
    # every class is in both parts, in about the 80/20 ratio
    tr, va = a.train_y.bincount(minlength=10), a.val_y.bincount(minlength=10)
    assert ((va.double() / (tr + va).double() - 0.2).abs() < 0.01).all()
    # the split does not overlap: the images of sklearn's set appear once
    from sklearn.datasets import load_digits

    assert len(a.train_y) + len(a.val_y) == len(load_digits().target)


def test_image_folder(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / cls)
        for i in range(5):
            arr = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    split = ppml.data.load_image_folder(str(tmp_path), img_size=16)
    assert split.classes == ["cat", "dog"]
    assert split.train_x.shape == (8, 3, 16, 16) and split.val_x.shape == (2, 3, 16, 16)
    assert sorted(split.val_y.tolist()) == [0, 1]
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        ppml.data.load_image_folder(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "encryption,mode,loss",
    [
        ("none", "owner", "ce"),
        ("rs", "owner", "ce"),
        ("rs", "in-model", "anchor-sqeuclidean"),
        ("mi", "owner", "anchor-cosine"),
        ("mi", "in-model", "anchor-euclidean"),
    ],
)
def test_every_path_trains_and_writes(tmp_path, encryption, mode, loss):
    out = str(tmp_path / "run")
    cfg = TrainConfig(encryption=encryption, mode=mode, loss=loss, epochs=1, out=out, key_seed=1, **TINY)
    summary = run(cfg)
    assert summary["final"] and 0.0 <= summary["val_acc"] <= 1.0
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1] and rows[0]["world_size"] == 1
    for name in ("checkpoint.pt", "summary.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, name))
    # owner mode: the trainer worked on the cached ciphertext; RS keys are kept apart for the owner
    assert os.path.exists(os.path.join(out, "ciphertext.pt")) == (encryption != "none" and mode == "owner")
    assert os.path.exists(os.path.join(out, "owner_keys.pt")) == (encryption == "rs" and mode == "owner")


def test_learns_the_digits(tmp_path):
    """Four epochs of a small PE-free ViT on RS ciphertext (owner mode, 2×2 patches of 16 px) are far above chance
    (10%): the trainer never saw a plain image."""
    cfg = TrainConfig(
        encryption="rs", epochs=4, lr=3e-3, img_size=32, patch_size=16, depth=2, embed_dim=48, num_heads=3,
        batch_size=64, warmup_epochs=0.5, key_seed=0, out=str(tmp_path / "run"),
    )
    assert run(cfg)["val_acc"] > 0.6


@pytest.mark.parametrize("stop_after", [5, 12, 17])  # mid-epoch 1, exactly the end of epoch 1, mid-epoch 2
def test_resume_is_exact(tmp_path, stop_after):
    common = dict(encryption="rs", epochs=2, key_seed=3, cutmix=1.0, patch_drop=0.1, drop_path=0.1, **TINY)
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **common))
    cfg = TrainConfig(out=str(tmp_path / "cut"), **common)
    stopped = run(cfg, stop_after=stop_after)
    assert stopped["stopped"]
    resumed = run(cfg, resume=True)
    # the same parameters to the last bit, hence the same metrics
    assert resumed["param_digests"] == ref["param_digests"]
    assert resumed["val_acc"] == ref["val_acc"] and resumed["train_loss"] == ref["train_loss"]
    # every epoch's metric line too (all but the wall time); lines of the epoch that was cut short are not doubled
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "train_s"} for r in rows]  # noqa: E731
    assert untimed(_metrics(str(tmp_path / "cut"))) == untimed(_metrics(str(tmp_path / "ref")))


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    run(TrainConfig(encryption="rs", epochs=2, out=out, key_seed=0, **TINY), stop_after=2)
    with pytest.raises(ValueError, match="differ from the checkpoint"):
        run(TrainConfig(encryption="rs", epochs=2, out=out, key_seed=0, **{**TINY, "batch_size": 64}), resume=True)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run(TrainConfig(encryption="rs", epochs=2, out=out, key_seed=0, **TINY))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(TrainConfig(out=str(tmp_path / "other"), **TINY), resume=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(encryption="aes"), "--encryption must be one of"),
        (dict(mode="cloud"), "--mode must be one of"),
        (dict(loss="hinge"), "--loss must be one of"),
        (dict(img_size=30, patch_size=4), "--patch-size must divide --img-size"),
        (dict(encryption="none", mode="in-model"), "needs --encryption rs or mi"),
        (dict(epochs=0), "--epochs must be a positive int"),
    ],
)
def test_bad_settings(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(TrainConfig(out=str(tmp_path / "run"), **{**TINY, **kwargs}))


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=TESTS_DIR,
        env={**os.environ, **(env or {})},
    )


def _tiny_cli_args(out: str) -> list[str]:
    return [
        "--img-size", "16", "--patch-size", "4", "--depth", "1", "--embed-dim", "24", "--num-heads", "2",
        "--batch-size", "128", "--key-seed", "0", "--out", out,
    ]


def test_cli_help_and_errors(tmp_path):
    res = _cli("-m", "ppml", "train", "--help")
    assert res.returncode == 0 and "--encryption" in res.stdout and "--resume" in res.stdout
    res = _cli("-m", "ppml", "train", "--encryption", "rs", "--img-size", "30", "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "--patch-size must divide --img-size" in res.stderr


def test_ddp_two_cpu_ranks_stay_in_sync(tmp_path):
    """torchrun with 2 processes (gloo): after the first step and after a whole epoch, both ranks hold identical
    parameters (the trainer all-gathers a digest of every rank's parameters at each checkpoint)."""
    out = str(tmp_path / "ddp")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ppml", "train",
            "--encryption", "rs", "--epochs", "1", *_tiny_cli_args(out)]
    env = {"OMP_NUM_THREADS": "1"}
    res = _cli(*args, "--stop-after", "1", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    stopped = json.loads(res.stdout.strip().splitlines()[-1])
    assert stopped["stopped"] and stopped["step"] == 1
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert len(ckpt["param_digests"]) == 2 and ckpt["param_digests"][0] == ckpt["param_digests"][1]
    assert len(ckpt["rank_states"]) == 2
    res = _cli(*args, "--resume", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["final"] and len(summary["param_digests"]) == 2
    assert summary["param_digests"][0] == summary["param_digests"][1]
    assert _metrics(out)[0]["world_size"] == 2


# -- CUDA set-up, checked without a GPU: torch.cuda and the process-group set-up are mocked (conftest's fake_cuda) --
TORCHRUN_RANK1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}


@pytest.mark.parametrize(
    "device,env,current,expected",
    [
        ("cuda", {}, 0, 0),  # one process: the current CUDA device (torch.cuda.set_device(cuda) used to fail)
        ("cuda", {}, 1, 1),
        ("auto", {}, 0, 0),
        ("cuda:1", {}, 0, 1),  # an explicit index, as is
        ("cuda", TORCHRUN_RANK1, 0, 1),  # torchrun: cuda:LOCAL_RANK
        ("auto", TORCHRUN_RANK1, 0, 1),
        ("cuda:1", TORCHRUN_RANK1, 0, 1),  # an index equal to LOCAL_RANK is accepted
    ],
)
def test_cuda_setup_gets_a_device_with_an_index(fake_cuda, monkeypatch, tmp_path, device, env, current, expected):
    from ppml.train.trainer import _Trainer

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    fake_cuda.current = current
    t = _Trainer(TrainConfig(device=device, out=str(tmp_path / "run"), **TINY))
    assert fake_cuda.set_device == [expected]
    assert t.device == torch.device("cuda", expected) and t.device.index == expected
    assert t.amp  # bf16 autocast by default on CUDA
    assert (t.d.world, t.d.rank, t.d.local_rank) == ((2, 1, 1) if env else (1, 0, 0))
    assert len(fake_cuda.backends) == (1 if env else 0)


def test_torchrun_on_cuda_joins_a_group_that_reduces_cpu_and_cuda_tensors(fake_cuda, monkeypatch, tmp_path):
    """The trainer all-reduces CPU tensors (the epoch's loss sums, the validation counts) and CUDA ones; a group made
    with backend="nccl" alone refuses CPU tensors ("No backend type associated with device type cpu")."""
    from conftest import backend_device_types

    from ppml.train.trainer import _Trainer

    for k, v in TORCHRUN_RANK1.items():
        monkeypatch.setenv(k, v)
    _Trainer(TrainConfig(device="cuda", out=str(tmp_path / "run"), **TINY))
    (backend,) = fake_cuda.backends
    assert backend_device_types(backend) >= {"cpu", "cuda"}
    from torch.distributed.distributed_c10d import BackendConfig

    assert BackendConfig(backend).get_device_backend_map()["cuda"] == "nccl"


@pytest.mark.parametrize(
    "device,env,match",
    [
        ("cuda:0", TORCHRUN_RANK1, "LOCAL_RANK=1 uses cuda:1"),  # torchrun: an index other than LOCAL_RANK
        ("cuda:2", {}, "device_count\\(\\) is 2"),
        ("cuda", {"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 needs cuda:2"),
        ("gpu", {}, "--device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_cuda_setup_refuses_a_device_it_cannot_use(fake_cuda, monkeypatch, tmp_path, device, env, match):
    from ppml.train.trainer import _Trainer

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        _Trainer(TrainConfig(device=device, out=str(tmp_path / "run"), **TINY))
    assert fake_cuda.set_device == [] and fake_cuda.backends == []


def test_cuda_asked_for_without_cuda(monkeypatch, tmp_path, capsys):
    """No CUDA: --device cuda is a clean CLI error (exit 2), auto falls back to the CPU without touching CUDA."""
    from ppml.cli import main
    from ppml.train.trainer import _Trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) without CUDA"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "x")]) == 2
    assert "--device cuda requested but torch.cuda.is_available() is False" in capsys.readouterr().err
    t = _Trainer(TrainConfig(device="auto", out=str(tmp_path / "run"), **TINY))
    assert t.device == torch.device("cpu") and not t.amp
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "LOCAL_RANK" in capsys.readouterr().out


def _folder_with_a_truncated_jpeg(root, n=6):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n):
            arr = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / cls / f"{i}.jpg", quality=95)
    whole = (root / "dog" / "0.jpg").read_bytes()
    (root / "dog" / "0.jpg").write_bytes(whole[: len(whole) // 2])  # a truncated JPEG
    return str(root)


def test_truncated_jpeg_is_skipped_listed_and_counted_like_encrypt(tmp_path, capsys):
    import ppml.data.encrypted as enc

    data = _folder_with_a_truncated_jpeg(tmp_path / "photos")
    split = ppml.data.load_image_folder(data, img_size=16)
    assert [s["path"] for s in split.skipped] == [os.path.join("dog", "0.jpg")]
    assert "truncated" in split.skipped[0]["error"]
    assert len(split.train_y) + len(split.val_y) == 11
    # the same skip list as `ppml encrypt` on the same folder
    enc.encrypt_dataset(data, str(tmp_path / "enc"), patch_size=4, size=16, progress=False)
    corrupt = json.load(open(tmp_path / "enc.key.index.json"))["corrupt"]  # the owner-side report, outside DST
    assert [{"path": c["path"], "error": c["error"]} for c in corrupt] == split.skipped
    out = tmp_path / "run"
    summary = run(TrainConfig(data=data, encryption="rs", epochs=1, key_seed=0, out=str(out), **TINY))
    assert summary["final"] and summary["skipped_images"] == 1
    assert json.load(open(out / "skipped.json"))["skipped"] == split.skipped
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


def test_early_failures_leave_no_run_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        run(TrainConfig(data=str(tmp_path / "missing"), out=str(out), **TINY))
    assert not out.exists()
    bad = tmp_path / "bad"
    os.makedirs(bad / "a")
    (bad / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"a/x\.jpg"):  # nothing readable: refused, the file named
        run(TrainConfig(data=str(bad), out=str(out), **TINY))
    assert not out.exists()
    # a failure after the data are loaded (an unknown model) removes the folder the run made
    with pytest.raises(RuntimeError, match="no_such_model_xyz"):
        run(TrainConfig(model="no_such_model_xyz", out=str(out), **TINY))
    assert not out.exists()
    # a folder that existed before is left alone
    os.makedirs(out)
    with pytest.raises(RuntimeError, match="no_such_model_xyz"):
        run(TrainConfig(model="no_such_model_xyz", out=str(out), **TINY))
    assert out.is_dir()


def test_ctrl_c_before_the_first_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from ppml.cli import main

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ppml.data, "load_dataset", interrupted)
    out = tmp_path / "run"
    assert main(["train", *_tiny_cli_args(str(out))]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0] and "re-run" in err[0] and "Traceback" not in err[0]
    assert not out.exists()

def test_compile_trains_checkpoints_the_plain_module_and_resumes_without_it(tmp_path, capsys):
    """--compile (aot_eager: dynamo and AOTAutograd without inductor's C++ compile, cheap on 2 cores): a run stopped
    mid-epoch writes the plain module's state_dict (no `_orig_mod.` keys), and resumed without --compile ends with the
    parameters of an uncompiled straight run, bit for bit (the graph runs the same ATen ops)."""
    from ppml.cli import main
    from ppml.train.trainer import build_model

    common = dict(encryption="rs", epochs=2, key_seed=0, drop_path=0.1, **TINY)
    ref = run(TrainConfig(out=str(tmp_path / "ref"), **common))
    out = str(tmp_path / "cut")
    args = ["train", *_tiny_cli_args(out), "--encryption", "rs", "--epochs", "2", "--drop-path", "0.1",
            "--warmup-epochs", "0.5"]  # fmt: skip
    assert main([*args, "--compile", "aot_eager", "--stop-after", "5"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stopped"]
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)
    assert ckpt["config"]["compile"] == "aot_eager" and not any("_orig_mod" in k for k in ckpt["model"])
    build_model(TrainConfig(**common), 10).load_state_dict(ckpt["model"])  # strict: the plain module's keys
    assert main([*args, "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["final"] and resumed["param_digests"] == ref["param_digests"]
    assert resumed["val_acc"] == ref["val_acc"] and resumed["train_loss"] == ref["train_loss"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(compile="fastest"), "--compile must name a torch.compile backend"),
        (dict(compile_mode="max-autotune"), "--compile-mode max-autotune needs --compile"),
    ],
)
def test_compile_settings_are_checked(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(TrainConfig(out=str(tmp_path / "run"), **{**TINY, **kwargs}))
