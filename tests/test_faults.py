"""Nothing lost on faults and bad input (issue 24): checkpoints, run folders, output paths, cfg
and checkpoint errors, size limits. Each test failed before its fix."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DARKNET_DATA, REPO
from test_train import CFG, make_data

from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.train import Trainer, TrainOptions
from detkit.errors import CfgError, DetkitError, WeightsError

TINY_CFG = REPO / "cfg" / "yolov3-tiny.cfg"


def detkit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "detkit", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The single 'error: ...' line of a run that must exit 2 without a traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """The training tests' tiny cfg and white-squares images, as Samples and as an image list."""
    root = tmp_path_factory.mktemp("squares")
    (root / "tiny.cfg").write_text(CFG.format(bn=1))
    train = make_data(root / "train", 16, 0)
    for sample in train:
        rows = [f"0 {' '.join(f'{v:.6f}' for v in box)}" for box in sample.boxes]
        sample.image.with_suffix(".txt").write_text("\n".join(rows) + "\n")
    (root / "train.txt").write_text("".join(f"{s.image}\n" for s in train))
    return root, train


def options(squares, out: Path, **overrides) -> TrainOptions:
    root, train = squares
    settings = dict(cfg=root / "tiny.cfg", train=train, val=train[:4], out=out, workers=0,
                    eval_interval=0, checkpoint_interval=1, quiet=True, seed=3, max_batches=3)
    return TrainOptions(**{**settings, **overrides})


def all_finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


# -- 1. a diverging run never replaces a finite checkpoint ----------------------------------------

def test_a_diverging_resume_keeps_the_good_checkpoint_and_it_resumes(squares, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    Trainer(options(squares, out)).train()
    good = load_checkpoint(out / "last.pt")
    assert all_finite(good["model"]) and good["iteration"] == 3
    diverging = Trainer(options(squares, out, resume=True, max_batches=40, learning_rate=1e5,
                                max_nan_steps=2))
    with pytest.raises(DetkitError, match="not finite"):
        diverging.train()
    kept = load_checkpoint(out / "last.pt")
    assert all_finite(kept["model"]), "a non-finite model replaced last.pt"
    assert kept["iteration"] >= 3
    resumed = Trainer(options(squares, out, resume=True, max_batches=kept["iteration"] + 1)).train()
    assert resumed.iterations == kept["iteration"] + 1


# -- 2. a fresh run never lands in an existing run folder ----------------------------------------

def test_a_fresh_run_into_a_run_folder_is_refused_unless_exist_ok(squares, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    Trainer(options(squares, out)).train()
    before = (out / "last.pt").read_bytes()
    with pytest.raises(DetkitError, match=r"already holds a run \(last.pt, best.pt, last.weights, "
                                          r"metrics.csv\): continue it with --resume"):
        Trainer(options(squares, out))
    assert (out / "last.pt").read_bytes() == before
    Trainer(options(squares, out, exist_ok=True, max_batches=2)).train()
    with open(out / "metrics.csv", newline="") as table:
        assert [row["iteration"] for row in csv.DictReader(table)] == ["2"]   # not appended


def test_the_cli_refuses_a_fresh_run_into_a_run_folder(squares, tmp_path):
    root, _ = squares
    out = tmp_path / "run"
    args = ("train", "--data", str(root / "train.txt"), "--cfg", str(root / "tiny.cfg"), "--out",
            str(out), "--max-batches", "1", "--workers", "0", "--quiet", "--device", "cpu")
    assert detkit(*args).returncode == 0
    assert "--exist-ok" in one_line_error(detkit(*args))
    assert detkit(*args, "--exist-ok").returncode == 0


# -- 5. train faults end in one line and exit 2 ---------------------------------------------------

@pytest.mark.parametrize("case", ["out is a file", "out under a file", "batch 0", "subdivisions 0"])
def test_bad_train_settings_are_one_line_and_leave_no_folder(squares, tmp_path, case):
    root, _ = squares
    (tmp_path / "afile").write_text("mine")
    out = {"out is a file": tmp_path / "afile", "out under a file": tmp_path / "afile" / "run"}.get(
        case, tmp_path / "fresh")
    extra = {"batch 0": ["--batch", "0"], "subdivisions 0": ["--subdivisions", "0"]}.get(case, [])
    run = detkit("train", "--data", str(root / "train.txt"), "--cfg", str(root / "tiny.cfg"),
                 "--out", str(out), "--max-batches", "1", "--workers", "0", "--quiet",
                 "--device", "cpu", *extra)
    message = one_line_error(run)
    expected = {"out is a file": "is a file, not a folder", "out under a file": "cannot create",
                "batch 0": "batch=0 must be at least 1",
                "subdivisions 0": "subdivisions=0 must be at least 1"}[case]
    assert expected in message
    assert not (tmp_path / "fresh").exists()
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_full_disk_while_saving_is_one_error_and_the_old_checkpoint_stays(squares, tmp_path,
                                                                              monkeypatch, capsys):
    import errno

    import detkit.engine.checkpoint as checkpoint
    from detkit import cli

    root, _ = squares
    out = tmp_path / "run"
    Trainer(options(squares, out)).train()
    before = (out / "last.pt").read_bytes()

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full_disk)
    monkeypatch.setattr(sys, "argv", ["detkit", "train", "--data", str(root / "train.txt"), "--cfg",
                                      str(root / "tiny.cfg"), "--resume", str(out), "--max-batches",
                                      "6", "--workers", "0", "--quiet", "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("No space left on device") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {out / 'last.pt'}: cannot write the checkpoint")
    assert (out / "last.pt").read_bytes() == before


# -- 6. a cfg with a UTF-8 byte order mark ---------------------------------------------------------

def test_a_cfg_with_a_byte_order_mark_parses(tmp_path):
    from detkit.cfg import parse_cfg

    cfg = tmp_path / "bom.cfg"
    cfg.write_bytes(b"\xef\xbb\xbf" + TINY_CFG.read_bytes().replace(b"\n", b"\r\n"))
    assert [s.kind for s in parse_cfg(cfg)] == [s.kind for s in parse_cfg(TINY_CFG)]


# -- 8. smaller ones -----------------------------------------------------------------------------

def test_a_cfg_that_is_a_directory_is_said_to_be_one(tmp_path):
    from detkit.cfg import parse_cfg

    with pytest.raises(CfgError, match="is a directory, not a cfg file"):
        parse_cfg(tmp_path)
    run = detkit("detect", str(DARKNET_DATA / "dog.jpg"), "--cfg", str(tmp_path), "--weights",
                 str(tmp_path / "x.weights"), "--out", str(tmp_path / "out"))
    assert "is a directory, not a file" in one_line_error(run)


class NotATensor:
    """A pickled object: loading it would mean running the file's code."""


def test_checkpoint_errors_are_one_line_with_a_reason_and_no_unsafe_advice(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty.pt: not a loadable detkit checkpoint \(the file "
                                           r"is empty\)"):
        load_checkpoint(empty)
    pickled = tmp_path / "object.pt"
    torch.save({"model": NotATensor()}, pickled)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(pickled)
    message = str(info.value)
    assert "\n" not in message and "weights_only=False" not in message
    assert "weights_only=True" in message


def test_weights_of_another_size_say_what_they_look_like(tmp_path):
    import detkit
    from detkit.weights import darknet_tensors, save_darknet_weights

    model = detkit.load_model(TINY_CFG)
    whole = tmp_path / "tiny.weights"
    save_darknet_weights(model, whole)
    floats = sum(t.numel() for layer in list(model.layers)[:15] for t in darknet_tensors(layer))
    backbone = tmp_path / "backbone.weights"
    backbone.write_bytes(whole.read_bytes()[:20 + 4 * floats])
    with pytest.raises(WeightsError, match=r"exactly layers 0..14 of this cfg: load them with "
                                           r"--cutoff 15"):
        detkit.load_model(TINY_CFG, backbone)
    with pytest.raises(WeightsError, match="fits no whole number of this cfg's layers"):
        detkit.load_model(REPO / "cfg" / "yolov2-tiny.cfg", whole)


def test_the_label_cache_sees_a_label_rewritten_with_the_same_size_and_mtime(tmp_path):
    import cv2

    from detkit.data import read_dataset

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.zeros((32, 32, 3), np.uint8))
    label = tmp_path / "a.txt"
    label.write_text("0 0.500000 0.500000 0.250000 0.250000\n")
    listing = tmp_path / "train.txt"
    listing.write_text(f"{image}\n")
    assert read_dataset(listing, names=["a", "b"]).items[0].classes.tolist() == [0]
    stat = label.stat()
    label.write_text("1 0.500000 0.500000 0.250000 0.250000\n")      # same size
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))           # and the old mtime
    assert read_dataset(listing, names=["a", "b"]).items[0].classes.tolist() == [1]


def test_resume_takes_data_and_cfg_from_the_run(squares, tmp_path):
    root, _ = squares
    out = tmp_path / "run"
    first = detkit("train", "--data", str(root / "train.txt"), "--cfg", str(root / "tiny.cfg"),
                   "--out", str(out), "--max-batches", "2", "--workers", "0", "--quiet",
                   "--device", "cpu")
    assert first.returncode == 0, first.stderr[-2000:]
    again = detkit("train", "--resume", str(out), "--max-batches", "3", "--workers", "0", "--quiet",
                   "--device", "cpu", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_checkpoint(out / "last.pt")["iteration"] == 3
    assert "--data and --cfg needed" in one_line_error(detkit("train", "--max-batches", "1"))


# -- 3. --save-json writes regular files only, keeps modes, reports write errors ------------------

def dog_run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return detkit("detect", str(DARKNET_DATA / "dog.jpg"), "--device", "cpu", "--quiet", "--out",
                  str(tmp_path / "out"), *extra, cwd=tmp_path)


def test_save_json_follows_a_symlink_keeps_the_mode_and_refuses_a_fifo(tmp_path, tiny_weights):
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    assert dog_run(tmp_path, "--save-json", str(link)).returncode == 0
    assert link.is_symlink() and real.read_text().startswith("[{")
    assert (real.stat().st_mode & 0o777) == 0o640
    fresh = tmp_path / "fresh.json"
    assert dog_run(tmp_path, "--save-json", str(fresh)).returncode == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask          # not mkstemp's 0600
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    message = one_line_error(dog_run(tmp_path, "--save-json", str(fifo)))
    assert "pipe.json is not a regular file; refusing to replace it" in message
    assert fifo.is_fifo()


def test_a_full_disk_at_the_json_target_is_reported(tmp_path, monkeypatch):
    import errno

    import detkit.engine.outputs as outputs

    def full_disk(path, payload):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs, "atomic_write_bytes", full_disk)
    writer = outputs.CocoJsonWriter(tmp_path / "r.json", 80)
    with pytest.raises(DetkitError, match=r"--save-json .*r.json: cannot write \(No space left"):
        writer.close()


# -- 4. detect --out never overwrites a file detkit did not write ---------------------------------

def test_detect_into_a_folder_keeps_the_users_files_and_replaces_its_own(tmp_path, tiny_weights):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dog.jpg").write_bytes(b"the user's own photo")
    assert dog_run(tmp_path).returncode == 0
    assert (out / "dog.jpg").read_bytes() == b"the user's own photo"
    assert (out / "dog_2.jpg").stat().st_size > 1000
    first = (out / "dog_2.jpg").stat().st_mtime_ns
    assert dog_run(tmp_path, "--conf", "0.5").returncode == 0     # detkit's own file: replaced
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["dog.jpg", "dog_2.jpg"]
    assert (out / "dog_2.jpg").stat().st_mtime_ns >= first


# -- 7. size limits ------------------------------------------------------------------------------

def test_an_absurd_input_size_is_refused_with_the_figure_before_building(tmp_path):
    cfg = tmp_path / "huge.cfg"
    text = TINY_CFG.read_text()
    cfg.write_text(text.replace("width=416", "width=100000").replace("height=416", "height=100000"))
    message = one_line_error(detkit("benchmark", str(cfg), "--device", "cpu"))
    assert "huge.cfg at 100000x100000, batch 1 needs about" in message and "GB" in message


def test_training_memory_is_checked_before_the_run_folder_is_made(squares, tmp_path):
    root, _ = squares
    cfg = tmp_path / "huge.cfg"
    cfg.write_text(CFG.format(bn=1).replace("width=64", "width=64000").replace("height=64",
                                                                                "height=64000"))
    with pytest.raises(DetkitError, match="training huge.cfg at 64000x64000, micro-batch 4 needs"):
        Trainer(options(squares, tmp_path / "run", cfg=cfg))
    assert not (tmp_path / "run").exists()


def test_letterboxing_a_large_photo_needs_no_full_size_float_copy():
    """A 6000x6000 photo: a float copy of it alone is 432 MB (4 bytes x 3 x 36M); 155 MB
    after the fix, 550 MB before it."""
    script = """
import resource, numpy as np, torch
from detkit.engine.letterbox import letterbox_batch
image = np.zeros((6000, 6000, 3), np.uint8)
image[::7] = 200
letterbox_batch([image[:64, :64]], (416, 416), "cpu")  # the first call's one-off allocations
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
letterbox_batch([image], (416, 416), "cpu")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    growth = int(run.stdout.split()[-1])
    assert growth < 216_000_000, f"peak grew by {growth / 1e6:.0f} MB, half the float copy is 216"


def test_the_uint8_resize_equals_the_float_one_exactly():
    from detkit.engine.letterbox import resize_nhwc, resize_uint8_nhwc, to_float

    frames = torch.randint(0, 256, (2, 37, 53, 3), dtype=torch.uint8)
    for size in ((20, 11), (53, 37), (53, 20), (80, 90)):
        assert torch.equal(resize_uint8_nhwc(frames, *size), resize_nhwc(to_float(frames), *size))


def test_detect_nms_takes_at_most_max_nms_candidates_per_image_the_best_ones(monkeypatch):
    import torchvision.ops

    from detkit.boxes import MAX_NMS, postprocess

    seen = []
    real = torchvision.ops.batched_nms

    def spy(boxes, scores, groups, threshold):
        seen.append(len(scores))
        return real(boxes, scores, groups, threshold)

    monkeypatch.setattr(torchvision.ops, "batched_nms", spy)
    generator = torch.Generator().manual_seed(0)
    preds = torch.rand(2, 40000, 7, generator=generator)
    preds[..., 2:4] = 0.01                                       # tiny boxes: few overlaps
    preds[..., 4] = 0.9
    preds[0, 123, 4:] = 1.0                                      # the best box of image 0
    detections = postprocess(preds, conf_thresh=0.1, nms_thresh=0.45, max_det=10, max_nms=MAX_NMS)
    assert seen == [2 * MAX_NMS]
    postprocess(preds, conf_thresh=0.1, nms_thresh=0.45, max_det=10)   # darknet's: no cap
    assert seen[-1] > 2 * MAX_NMS
    assert detections[0][0, 4] == pytest.approx(1.0)


# -- 8. many sources: one rule -------------------------------------------------------------------

def test_a_missing_source_is_skipped_the_rest_run_and_the_exit_code_says_so(tmp_path, tiny_weights):
    run = detkit("detect", str(DARKNET_DATA / "dog.jpg"), "nope.jpg", str(DARKNET_DATA / "kite.jpg"),
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert lines[0] == "warning: source 'nope.jpg' not found (skipped)"
    assert lines[-1].startswith("error: 1 source(s) could not be read and were skipped")
    assert (tmp_path / "out" / "dog.jpg").is_file() and (tmp_path / "out" / "kite.jpg").is_file()


def test_all_sources_unreadable_is_an_error(tmp_path, tiny_weights):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"not an image")
    run = detkit("detect", "a.jpg", "b.jpg", "--device", "cpu", "--quiet", "--out",
                 str(tmp_path / "out"), cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: 2 source(s) could not be read")
