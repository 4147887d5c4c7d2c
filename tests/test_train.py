"""Trainer behaviour on a tiny synthetic data set: resume equals an uninterrupted run, a SIGKILL
mid-run still resumes, two DDP processes equal one, the NaN guard, and a detector that learns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detkit.data.dataset import Sample
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.engine.train import Trainer, TrainOptions, evaluate_samples, optimizer_kind_of
from detkit.errors import DetkitError

CFG = """[net]
batch=8
subdivisions=2
width=64
height=64
channels=3
momentum=0.9
decay=0.0005
learning_rate=0.01
burn_in=2
max_batches=20
policy=steps
steps=15
scales=.1
hue=.05
saturation=1.2
exposure=1.2

[convolutional]
batch_normalize={bn}
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize={bn}
filters=16
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize={bn}
filters=32
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=18
size=1
stride=1
pad=1
activation=linear

[yolo]
mask=0,1,2
anchors=10,10, 20,20, 30,30
classes=1
num=3
jitter=.1
ignore_thresh=.7
truth_thresh=1
random=0
"""


def make_data(root: Path, count: int, seed: int) -> list[Sample]:
    """White squares on noise; one or two per image."""
    rng = np.random.default_rng(seed)
    samples = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = rng.integers(0, 90, (64, 64, 3), dtype=np.uint8)
        boxes = []
        for _ in range(int(rng.integers(1, 3))):
            size = int(rng.integers(10, 28))
            x, y = int(rng.integers(0, 64 - size)), int(rng.integers(0, 64 - size))
            image[y:y + size, x:x + size] = 255
            boxes.append([(x + size / 2) / 64, (y + size / 2) / 64, size / 64, size / 64])
        path = root / f"{i}.png"
        cv2.imwrite(str(path), image)
        samples.append(Sample(path, np.array(boxes, np.float32), np.zeros(len(boxes), np.int64)))
    return samples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    (root / "tiny.cfg").write_text(CFG.format(bn=1))
    (root / "tiny-nobn.cfg").write_text(CFG.format(bn=0))
    return root, make_data(root / "train", 24, 0), make_data(root / "val", 8, 1)


def options(data, out: Path, **overrides) -> TrainOptions:
    root, train, val = data
    base = dict(cfg=root / "tiny.cfg", train=train, val=val, out=out, workers=0,
                eval_interval=0, checkpoint_interval=1, quiet=True, seed=3)
    base.update(overrides)
    return TrainOptions(**base)


def trajectory(result) -> list[tuple[float, float]]:
    return [(round(h["loss"], 4), h["lr"]) for h in result.history]


def test_resume_continues_as_if_uninterrupted(data, tmp_path):
    torch.set_num_threads(1)
    whole = Trainer(options(data, tmp_path / "whole", max_batches=8)).train()
    Trainer(options(data, tmp_path / "split", max_batches=4)).train()
    rest = Trainer(options(data, tmp_path / "split", max_batches=8, resume=True)).train()
    assert rest.iterations == 8
    assert trajectory(rest) == trajectory(whole)[4:]
    a = load_checkpoint(tmp_path / "whole" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


RUNNER = """
import sys, pickle
from pathlib import Path
from detkit.engine.train import TrainOptions, Trainer
options = pickle.loads(Path(sys.argv[1]).read_bytes())
Trainer(options).train()
assert not torch.distributed.is_initialized(), "the run left its process group behind"
"""


def test_sigkill_mid_run_resumes_from_last_good_checkpoint(data, tmp_path):
    import pickle

    out = tmp_path / "killed"
    spec = tmp_path / "options.pkl"
    spec.write_bytes(pickle.dumps(options(data, out, max_batches=200)))
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(spec)])
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "last.pt").exists():
        time.sleep(0.2)
    time.sleep(1.5)  # let it write a few more checkpoints; kill at an arbitrary moment
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(out / "last.pt")
    done = int(state["iteration"])
    assert 1 <= done < 200
    resumed = Trainer(options(data, out, max_batches=done + 2, resume=True)).train()
    assert resumed.iterations == done + 2 and len(resumed.history) == 2


def test_nan_guard_aborts_with_a_message(data, tmp_path):
    trainer = Trainer(options(data, tmp_path / "nan", max_batches=20, max_nan_steps=3))
    with torch.no_grad():
        trainer.model.layers[0].conv.weight.fill_(float("nan"))
    with pytest.raises(DetkitError, match="not finite for 3 iterations"):
        trainer.train()


DDP_RUNNER = """
import os, sys, pickle
from pathlib import Path
import torch
torch.set_num_threads(1)
from detkit.engine.train import TrainOptions, Trainer
options = pickle.loads(Path(sys.argv[1]).read_bytes())
Trainer(options).train()
assert not torch.distributed.is_initialized(), "the run left its process group behind"
"""


def free_port() -> int:
    """A loopback port nobody listens on now (a fixed one collides with parallel runs)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ddp_processes_equal_one(data, tmp_path):
    """gloo on the CPU, a cfg without batch norm (local BN statistics differ by design)."""
    import pickle

    root = data[0]
    single = Trainer(options(data, tmp_path / "one", cfg=root / "tiny-nobn.cfg", max_batches=4)).train()
    assert single.iterations == 4
    spec = tmp_path / "ddp.pkl"
    spec.write_bytes(pickle.dumps(options(data, tmp_path / "two", cfg=root / "tiny-nobn.cfg", max_batches=4)))
    procs = []
    port = free_port()
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", DDP_RUNNER, str(spec)], env=env))
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    a = load_checkpoint(tmp_path / "one" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "two" / "last.pt")["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-5, worst


@pytest.mark.slow
def test_detector_learns_squares(data, tmp_path):
    trainer = Trainer(options(data, tmp_path / "learn", max_batches=60, eval_interval=0,
                              checkpoint_interval=100))
    before = evaluate_samples(trainer.model, data[2], "cpu").map
    result = trainer.train()
    assert result.last_map > before + 0.3, (before, result.last_map)


def test_eval_tile_scores_large_validation_photos_in_windows(data, tmp_path):
    """`--eval-tile`: the trainer's evaluation (metrics.csv, best.pt) is `eval --tile`'s. The
    validation photos are 2x2 mosaics of the 64 px validation images: letterboxed whole, their
    squares reach the network at half the size it learnt (measured: 0.557 sliced, 0.053 whole)."""
    root, train, val = data
    big = []
    for k in range(0, len(val), 4):
        quads = [cv2.imread(str(s.image)) for s in val[k:k + 4]]
        mosaic = np.vstack([np.hstack(quads[:2]), np.hstack(quads[2:])])
        boxes, classes = [], []
        for q, s in enumerate(val[k:k + 4]):
            for cx, cy, w, h in s.boxes:
                boxes.append([(cx + q % 2) / 2, (cy + q // 2) / 2, w / 2, h / 2])
                classes.append(0)
        path = tmp_path / f"mosaic{k}.png"
        cv2.imwrite(str(path), mosaic)
        big.append(Sample(path, np.array(boxes, np.float32), np.array(classes, np.int64)))
    trainer = Trainer(options(data, tmp_path / "tiled", val=big, eval_tile=64, max_batches=60,
                              checkpoint_interval=100))
    result = trainer.train()
    sliced = evaluate_samples(trainer.model, big, "cpu", tile=64).map
    whole = evaluate_samples(trainer.model, big, "cpu").map
    assert result.last_map == pytest.approx(sliced, abs=1e-9) and sliced > whole + 0.1, (sliced, whole)


SSD_CFG = """[net]
batch=4
subdivisions=1
width=64
height=64
channels=3
learning_rate=0.001
max_batches=2
[convolutional]
batch_normalize=1
filters=8
size=3
stride=4
pad=1
activation=relu
[convolutional]
batch_normalize=1
filters=16
size=3
stride=2
pad=1
activation=relu
[ssd]
layers=0,1
classes=1
aspect_ratios=2;2
scales=0.2,0.5,0.9
"""


def test_ssd_trains_with_ssd_augmentation_and_is_evaluated_stretched(data, tmp_path):
    """The augmentation family and the evaluation geometry follow the head (default_letterbox):
    an SSD sees Caffe SSD's crops/expand warped to the square input, and is scored that way."""
    from detkit.data.ssd_augment import SSDAugment
    from detkit.engine.train import predict_samples

    root, train, val = data
    (tmp_path / "ssd.cfg").write_text(SSD_CFG)
    trainer = Trainer(options(data, tmp_path / "ssd", cfg=tmp_path / "ssd.cfg", max_batches=2))
    assert isinstance(trainer._augment_settings(), SSDAugment)
    assert trainer.train().iterations == 2
    yolo = Trainer(options(data, tmp_path / "yolo", max_batches=1))
    assert not isinstance(yolo._augment_settings(), SSDAugment)

    wide = tmp_path / "wide.png"  # 128x32: letterboxing would leave gray bars above and below
    cv2.imwrite(str(wide), np.full((32, 128, 3), 200, np.uint8))
    sample = Sample(wide, np.array([[0.5, 0.5, 0.5, 0.5]], np.float32), np.zeros(1, np.int64))
    seen = []
    model = trainer.model

    def fake_forward(x, targets=None):  # one box over the whole network input, class 0
        seen.append(x.clone())
        out = torch.zeros(x.shape[0], 1, 6)
        out[:, 0] = torch.tensor([32.0, 32.0, 64.0, 64.0, 1.0, 1.0])
        return out

    model.forward = fake_forward
    detections, truths = predict_samples(model, [sample], "cpu")
    assert seen[0].shape[-2:] == (64, 64) and torch.allclose(seen[0], torch.full_like(seen[0], 200 / 255))
    np.testing.assert_allclose(detections[0].boxes[0], [0, 0, 128, 32], atol=1e-4)  # the whole image
    np.testing.assert_allclose(truths[0].boxes[0], [32, 8, 96, 24], atol=1e-4)


def test_evaluation_writes_metrics_with_loss_parts_and_plots(data, tmp_path):
    import csv

    out = tmp_path / "plots"
    Trainer(options(data, out, max_batches=4, eval_interval=2)).train()
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    assert {"loss", "xy", "wh", "obj", "noobj", "cls", "lr", "map50"} <= set(rows[0])
    for name in ("loss.png", "map.png", "lr.png", "pr.png"):
        image = cv2.imread(str(out / name))
        assert image is not None and image.std() > 0, name


def test_metrics_minutes_continue_after_resume(data, tmp_path):
    """The time column counts the whole training: a resumed run starts from the minutes its
    last.pt recorded (here a pretend 7 minutes), not from 0."""
    import csv

    from detkit.engine.checkpoint import save_checkpoint

    out = tmp_path / "minutes"
    Trainer(options(data, out, max_batches=2, eval_interval=2)).train()
    state = load_checkpoint(out / "last.pt")
    assert 0 < state["minutes"] < 7
    state["minutes"] = 7.0
    save_checkpoint(out / "last.pt", state)
    Trainer(options(data, out, max_batches=4, eval_interval=2, resume=True)).train()
    with (out / "metrics.csv").open() as handle:
        minutes = [float(r["minutes"]) for r in csv.DictReader(handle)]
    assert len(minutes) == 2 and minutes[0] < 7 < minutes[1] < 8
    assert load_checkpoint(out / "last.pt")["minutes"] > 7


def test_sync_batchnorm_conversion_keeps_parameters_and_darknet_inference(data):
    from detkit.layers.conv import DarknetSyncBatchNorm, convert_sync_batchnorm
    from detkit.model import model_from_cfg

    model = model_from_cfg(data[0] / "tiny.cfg").eval()
    params = list(model.parameters())
    x = torch.rand(2, 3, 64, 64)
    before = model(x)
    assert convert_sync_batchnorm(model) == 3
    assert all(isinstance(layer.bn, DarknetSyncBatchNorm) for layer in list(model.layers)[:3])
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert torch.equal(model(x), before)  # darknet's inference formula, unchanged


def test_sync_bn_in_one_process_is_ignored_with_a_warning(data, tmp_path, caplog):
    Trainer(options(data, tmp_path / "sync", sync_bn=True, max_batches=1))
    assert "nothing to synchronise" in caplog.text


def test_gpus_launches_one_process_per_device_with_torchrun(data, tmp_path):
    """`detkit train --gpus 2` on the CPU (gloo): torchrun runs two processes, one run folder."""
    root, train, _ = data
    listing = tmp_path / "train.txt"
    labels = tmp_path / "labels"
    labels.mkdir()
    lines = []
    for sample in train[:8]:
        rows = [f"0 {' '.join(f'{v:.6f}' for v in box)}" for box in sample.boxes]
        (labels / f"{sample.image.stem}.txt").write_text("\n".join(rows) + "\n")
        image = tmp_path / "images" / sample.image.name
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(sample.image.read_bytes())
        lines.append(str(image))
    listing.write_text("\n".join(lines) + "\n")
    run = subprocess.run([sys.executable, "-m", "detkit", "train", "--data", str(listing), "--cfg",
                          str(root / "tiny-nobn.cfg"), "--gpus", "2", "--device", "cpu", "--max-batches", "2",
                          "--workers", "0", "--quiet"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    folders = list((tmp_path / "runs" / "train").iterdir())
    assert len(folders) == 1 and (folders[0] / "last.pt").exists()
    assert load_checkpoint(folders[0] / "last.pt")["iteration"] == 2


def layer_weights(model) -> list[torch.Tensor]:
    return [layer.conv.weight.detach().clone() for layer in model.layers if hasattr(layer, "conv")]


@pytest.mark.parametrize("how", ["option", "stopbackward"])
def test_frozen_layers_keep_their_weights_and_the_rest_trains(data, tmp_path, how):
    root = data[0]
    cfg = root / "tiny.cfg"
    if how == "stopbackward":  # darknet: the backward pass stops at layer 1, so 0..1 never learn
        text = CFG.format(bn=1).split("[convolutional]")
        text[2] = text[2].replace("activation=leaky", "activation=leaky\nstopbackward=1")
        cfg = tmp_path / "stop.cfg"
        cfg.write_text("[convolutional]".join(text))
    trainer = Trainer(options(data, tmp_path / how, cfg=cfg, max_batches=3,
                              freeze=2 if how == "option" else None))
    before = layer_weights(trainer.model)
    trainer.train()
    after = layer_weights(trainer.model)
    assert trainer.frozen == 2
    assert all(torch.equal(b, a) for b, a in zip(before[:2], after[:2], strict=True))
    assert all(not torch.equal(b, a) for b, a in zip(before[2:], after[2:], strict=True))
    assert load_checkpoint(tmp_path / how / "last.pt")["frozen_layers"] == 2


def test_resume_keeps_the_frozen_layers_and_refuses_another_count(data, tmp_path):
    Trainer(options(data, tmp_path / "run", max_batches=2, freeze=1)).train()
    resumed = Trainer(options(data, tmp_path / "run", max_batches=3, resume=True))
    assert resumed.frozen == 1
    with pytest.raises(DetkitError, match="--freeze 2 differs"):
        Trainer(options(data, tmp_path / "run", max_batches=3, resume=True, freeze=2))
    with pytest.raises(DetkitError, match="at least the last must train"):
        Trainer(options(data, tmp_path / "other", max_batches=3, freeze=5))


def test_net_adam_uses_darknet_betas_and_eps_and_the_option_overrides_it(data, tmp_path):
    root, _, _ = data
    cfg = root / "adam.cfg"
    cfg.write_text(CFG.format(bn=1).replace("[net]\n", "[net]\nadam=1\nB1=0.8\nB2=0.99\neps=0.000001\n"))
    adam = Trainer(options(data, tmp_path / "a", cfg=cfg)).optimizer
    assert type(adam) is torch.optim.Adam
    assert adam.defaults["betas"] == (0.8, 0.99) and adam.defaults["eps"] == pytest.approx(1e-6)
    # darknet decays conv weights only; biases and BN parameters are not decayed
    assert [group["weight_decay"] for group in adam.param_groups] == [0.0005, 0.0]
    assert type(Trainer(options(data, tmp_path / "b", cfg=cfg, optimizer="adamw")).optimizer) is torch.optim.AdamW
    assert type(Trainer(options(data, tmp_path / "c", cfg=cfg, optimizer="sgd")).optimizer) is torch.optim.SGD
    assert type(Trainer(options(data, tmp_path / "d")).optimizer) is torch.optim.SGD
    with pytest.raises(DetkitError, match="optimizer 'rmsprop' is not one of sgd, adam, adamw"):
        Trainer(options(data, tmp_path / "e", optimizer="rmsprop"))


def test_adam_run_resumes_as_if_uninterrupted(data, tmp_path):
    torch.set_num_threads(1)
    whole = Trainer(options(data, tmp_path / "whole", max_batches=6, optimizer="adam")).train()
    Trainer(options(data, tmp_path / "split", max_batches=3, optimizer="adam")).train()
    rest = Trainer(options(data, tmp_path / "split", max_batches=6, optimizer="adam", resume=True)).train()
    assert trajectory(rest) == trajectory(whole)[3:]
    state = load_checkpoint(tmp_path / "split" / "last.pt")["optimizer"]["state"]
    assert all("exp_avg_sq" in slot for slot in state.values())


def test_resume_keeps_the_optimizer_and_refuses_another(data, tmp_path):
    """torch would load Adam's moments into SGD silently; the run's optimizer is kept instead."""
    Trainer(options(data, tmp_path / "run", max_batches=1, optimizer="adam")).train()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["optimizer_kind"] == "adam"
    assert type(Trainer(options(data, tmp_path / "run", max_batches=2, resume=True)).optimizer) is torch.optim.Adam
    with pytest.raises(DetkitError, match="--optimizer sgd differs from the resumed run's adam"):
        Trainer(options(data, tmp_path / "run", max_batches=2, resume=True, optimizer="sgd"))
    # a checkpoint written before the kind was recorded: read from the optimizer state
    legacy = load_checkpoint(tmp_path / "run" / "last.pt")
    del legacy["optimizer_kind"]
    save_checkpoint(tmp_path / "run" / "last.pt", legacy)
    with pytest.raises(DetkitError, match="--optimizer adamw differs from the resumed run's adam"):
        Trainer(options(data, tmp_path / "run", max_batches=2, resume=True, optimizer="adamw"))


def test_optimizer_kind_is_read_from_a_saved_state():
    params = [torch.nn.Parameter(torch.zeros(2))]
    made = {"sgd": torch.optim.SGD(params, lr=0.1, momentum=0.9), "adam": torch.optim.Adam(params),
            "adamw": torch.optim.AdamW(params)}
    assert {kind: optimizer_kind_of(opt.state_dict()) for kind, opt in made.items()} == {
        "sgd": "sgd", "adam": "adam", "adamw": "adamw"}


def test_gpus_children_get_the_parsed_options_not_sys_argv(monkeypatch):
    """Called from Python (not the `detkit` command) sys.argv is someone else's: the children's
    arguments are rebuilt from the parsed options, without --gpus."""
    from typer.testing import CliRunner

    from detkit import cli, cli_train

    launched = {}
    monkeypatch.setattr(cli_train, "launch_processes",
                        lambda count, args: launched.update(count=count, args=args) or 0)
    monkeypatch.setattr(sys, "argv", ["pytest", "-q", "tests"])
    result = CliRunner().invoke(cli.app, ["train", "--data", "d.data", "--cfg", "x.cfg", "--gpus", "2",
                                          "--device", "cpu", "--lr", "0.01", "--quiet", "--optimizer", "adam"])
    assert result.exit_code == 0, result.output
    args = launched["args"]
    assert launched["count"] == 2 and args[0] == "train" and "--gpus" not in args and "-q" not in args
    options = {arg: (args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True)
               for i, arg in enumerate(args) if arg.startswith("--")}
    assert (options["--data"], options["--cfg"], options["--lr"]) == ("d.data", "x.cfg", "0.01")
    assert options["--device"] == "cpu" and options["--optimizer"] == "adam"
    assert options["--quiet"] is True and "--no-augment" not in options and "--strict" not in options


def test_ema_is_the_warmed_up_running_average_and_is_saved(data, tmp_path):
    torch.set_num_threads(1)
    trainer = Trainer(options(data, tmp_path / "ema", max_batches=4, ema=0.8, ema_warmup=2.0))
    expected = {k: v.clone().float() for k, v in trainer.model.state_dict().items()}
    update = trainer._update_ema

    def record_then_update():
        decay = 0.8 * (1 - np.exp(-trainer.iteration / 2.0))
        for key, value in trainer.model.state_dict().items():
            if value.dtype.is_floating_point:
                expected[key] = decay * expected[key] + (1 - decay) * value.float()
        update()

    trainer._update_ema = record_then_update
    trainer.train()
    saved = load_checkpoint(tmp_path / "ema" / "last.pt")["ema"]
    floats = [k for k, v in saved.items() if v.dtype.is_floating_point]
    assert all(torch.allclose(saved[k], expected[k], atol=1e-6) for k in floats)
    raw = trainer.model.state_dict()
    assert any(not torch.allclose(saved[k], raw[k]) for k in floats)  # the average lags the raw weights


def test_mosaic_and_random_scale_reach_the_augmentation_and_a_bad_scale_is_refused(data, tmp_path):
    root, _, _ = data
    cfg = root / "mosaic.cfg"
    cfg.write_text(CFG.format(bn=1).replace("[net]\n", "[net]\nmosaic=1\nrandom_scale=0.25\n"))
    settings = Trainer(options(data, tmp_path / "a", cfg=cfg))._augment_settings()
    assert settings.mosaic and settings.random_scale == 0.25
    plain = Trainer(options(data, tmp_path / "b"))._augment_settings()
    assert not plain.mosaic and plain.random_scale == 0.0
    bad = root / "bad-scale.cfg"
    bad.write_text(CFG.format(bn=1).replace("[net]\n", "[net]\nrandom_scale=1.5\n"))
    with pytest.raises(DetkitError, match=r"random_scale=1.5 must be in \[0, 1\)"):
        Trainer(options(data, tmp_path / "c", cfg=bad))
