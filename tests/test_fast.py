"""The fast inference path (detkit.fast) answers as the eager float32 model does.

CPU: batch-norm folding, channels-last, oneDNN conv+activation and Winograd convolutions, on
random non-trivial weights layer by layer and on the official weights end to end (detections).
GPU (marked, skipped without CUDA): float16/bfloat16 and CUDA graphs.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DARKNET_DATA, REPO, randomize_model

import detkit
from detkit.errors import DetkitError
from detkit.fast import (
    FastMaxPool,
    FastYoloHead,
    InferenceModel,
    WinogradConv3x3,
    fold_conv_bn,
    optimize_for_inference,
)
from detkit.layers.conv import Convolutional
from detkit.layers.simple import MaxPool

PHOTOS = ["dog", "horses", "person", "eagle", "giraffe", "kite"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def winograd_on_small_layers(monkeypatch):
    """The mini nets' layers are too light for Winograd's FLOP threshold: lift it, so the
    Winograd kernels are exercised in every layer they can run."""
    import detkit.fast

    monkeypatch.setattr(detkit.fast, "WINOGRAD_MIN_GFLOPS", 0.0)


def _conv(filters: int, size: int = 3, stride: int = 1, bn: int = 1, act: str = "leaky") -> str:
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\n"
            f"stride={stride}\npad=1\nactivation={act}\n")


# Small nets with every layer kind of the YOLOs and enough channels (>= 64) for the Winograd
# kernels at both tile sizes (mini-region at 64x64): shortcut, upsample, route, two [yolo]; reorg, [region].
MINI_YOLO = ("[net]\nwidth=96\nheight=96\nchannels=3\n" + _conv(16) + "[maxpool]\nsize=2\nstride=2\n"
             + _conv(128) + _conv(128) + _conv(64, 1) + _conv(128) + "[shortcut]\nfrom=-3\n"
             + "[maxpool]\nsize=2\nstride=2\n" + _conv(192) + "[maxpool]\nsize=2\nstride=1\n"
             + _conv(256) + _conv(21, 1, bn=0, act="linear")
             + "[yolo]\nmask=3,4,5\nanchors=10,14,23,27,37,58,81,82,135,169,344,319\nclasses=2\nnum=6\n"
             + "[route]\nlayers=-3\n" + _conv(64, 1) + "[upsample]\nstride=2\n"
             + "[route]\nlayers=-1,6\n" + _conv(128) + _conv(21, 1, bn=0, act="linear")
             + "[yolo]\nmask=0,1,2\nanchors=10,14,23,27,37,58,81,82,135,169,344,319\nclasses=2\nnum=6\n")
MINI_REGION = ("[net]\nwidth=128\nheight=128\nchannels=3\n" + _conv(32) + "[maxpool]\nsize=2\nstride=2\n"
               + _conv(128) + _conv(128) + "[maxpool]\nsize=2\nstride=2\n" + _conv(256)
               + "[maxpool]\nsize=2\nstride=2\n" + _conv(256) + "[route]\nlayers=-3\n"
               + _conv(16, 1) + "[reorg]\nstride=2\n" + "[route]\nlayers=-1,-4\n" + _conv(256)
               + _conv(35, 1, bn=0, act="linear")
               + "[region]\nanchors=1.3221,1.73145,3.19275,4.00944,5.05587,8.09892,9.47112,4.84053,"
               "11.2364,10.0071\nclasses=2\ncoords=4\nnum=5\nsoftmax=1\n")


def random_model(name: str, size: int, seed: int = 0) -> detkit.Model:
    """A cfg of the repository (or one of the mini nets) with calibrated random weights."""
    from detkit.model import model_from_text

    texts = {"mini-yolo": MINI_YOLO, "mini-region": MINI_REGION}
    model = (model_from_text(texts[name]) if name in texts
             else detkit.load_model(REPO / "cfg" / f"{name}.cfg")).eval()
    gen = torch.Generator().manual_seed(seed)
    return randomize_model(model, seed, calibrate=torch.rand(2, 3, size, size, generator=gen))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)).item()


def photos() -> list[np.ndarray]:
    """darknet's sample photos when installed, else deterministic synthetic images."""
    images = [cv2.imread(str(DARKNET_DATA / f"{n}.jpg")) for n in PHOTOS]
    images = [im for im in images if im is not None]
    if images:
        return images
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(3)]


def assert_same_detections(expected: list[torch.Tensor], got: list[torch.Tensor],
                           box_atol: float, score_atol: float) -> None:
    for e, g in zip(expected, got, strict=True):
        assert e.shape == g.shape
        assert torch.equal(e[:, 5], g[:, 5])                          # classes
        torch.testing.assert_close(g[:, :4], e[:, :4], atol=box_atol, rtol=0)
        torch.testing.assert_close(g[:, 4], e[:, 4], atol=score_atol, rtol=0)


# -- CPU: fp32 folding / channels-last / fused / Winograd ----------------------------------------

@pytest.mark.parametrize("name,size", [("mini-yolo", 96), ("mini-yolo", 160), ("mini-region", 64),
                                       ("mini-region", 128), ("yolov3-tiny", 160)])
def test_every_layer_equals_eager(name, size, native_kernels):
    model = random_model(name, size)
    fast = optimize_for_inference(model, "cpu", size=(size, size))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours, theirs = fast.layer_outputs(x), model.layer_outputs(x)
        preds_fast, preds = fast(x), model(x)
    for i, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        assert relative_error(a, b) < 1e-4, f"layer {i} ({model.layers[i].kind})"
    assert preds_fast.dtype == torch.float32 and preds_fast.shape == preds.shape
    torch.testing.assert_close(preds_fast, preds, rtol=1e-3, atol=1e-3)


def test_the_kernels_are_the_fast_ones(monkeypatch):
    import detkit.fast

    model = random_model("mini-region", 128)
    timed = []
    monkeypatch.setattr(detkit.fast, "_faster", lambda a, b, shape: timed.append(shape) or a)
    # Winograd wherever it is a candidate; at 64x64 the maps are 32, 16 and 8: F(4x4) and F(2x2)
    fast = optimize_for_inference(model, "cpu", size=(64, 64))
    kinds = {type(layer.conv).__name__ for layer in fast.layers if isinstance(layer, Convolutional)}
    assert kinds == {"OneDnnConvAct", "WinogradConv3x3"} and timed
    assert {m.m for m in fast.modules() if isinstance(m, WinogradConv3x3)} == {2, 4}
    assert all(layer.bn is None for layer in fast.layers if isinstance(layer, Convolutional))
    assert any(isinstance(layer, FastMaxPool) for layer in fast.layers)
    slow = optimize_for_inference(model, "cpu", winograd=False, fuse=False)
    assert not any(isinstance(m, WinogradConv3x3) for m in slow.modules())
    unfolded = optimize_for_inference(model, "cpu", fold_bn=False, channels_last=False)
    assert all(layer.bn is not None for layer in unfolded.layers
               if isinstance(layer, Convolutional) and layer.batch_normalize)


def test_weights_are_reordered_once_at_the_tuned_size():
    """The kernel timing reorders the weights for oneDNN; the copy's conversion to channels-last
    must not replace them (a forward would reorder again and keep both copies)."""
    if not detkit.fast._onednn_works() or not detkit.fast._PREPACK_OK:
        pytest.skip("this torch build has no oneDNN weight prepacking")
    fast = optimize_for_inference(random_model("mini-region", 64), "cpu", size=(64, 64))
    caches = [m.reordered for m in fast.modules() if hasattr(m, "reordered")]
    assert caches and any(isinstance(m, WinogradConv3x3) for m in fast.modules())
    timed = [c for c in caches if c.by_key]     # the layers with a Winograd candidate
    before = [{k: id(v[1]) for k, v in c.by_key.items()} for c in timed]
    with torch.inference_mode():
        fast(torch.rand(1, 3, 64, 64))
    assert timed and [{k: id(v[1]) for k, v in c.by_key.items()} for c in timed] == before
    assert all(len(c.by_key) == 1 for c in caches)


def test_the_callers_model_is_untouched_and_the_copy_is_inference_only():
    model = random_model("mini-yolo", 96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, "cpu")
    assert type(model) is detkit.Model and isinstance(fast, InferenceModel)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(layer.bn is not None for layer in model.layers
               if isinstance(layer, Convolutional) and layer.batch_normalize)
    fast.eval()  # allowed
    with pytest.raises(DetkitError, match="inference"):
        fast.train()
    with pytest.raises(DetkitError):
        fast(torch.rand(1, 3, 96, 96), torch.zeros(0, 6))


def test_half_on_the_cpu_falls_back_to_float32(caplog):
    fast = optimize_for_inference(random_model("mini-yolo", 96), "cpu", half=True)
    assert fast.fast_options.dtype == "float32"
    assert "CUDA" in caplog.text


def test_folding_uses_darknets_eval_formula():
    model = random_model("mini-yolo", 96)
    layer = model.layers[0]
    weight, bias = fold_conv_bn(layer)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = layer.bn(layer.conv(x))
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=1), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.fixture(params=[True, False], ids=["native", "torch-ops"])
def native_kernels(request, monkeypatch):
    """The fast path with the native kernels (detkit.native) and with their PyTorch-op
    fallback, as on a machine without a C compiler."""
    import detkit.native

    if request.param:
        if detkit.native.kernels() is None:
            pytest.skip("native kernels not built here (no C compiler?)")
    else:
        monkeypatch.setattr(detkit.native, "kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("hw", [(13, 13), (26, 20), (8, 9)])
@pytest.mark.parametrize("activation", ["leaky", "linear", "logistic"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("onednn", [True, False])   # oneDNN's grouped 1x1 conv / F.conv2d
@pytest.mark.parametrize("channels", [(32, 48), (20, 36)])   # 16-channel blocks, and tails
def test_winograd_equals_direct_convolution(m, hw, activation, threads, onednn, channels,
                                            native_kernels, monkeypatch):
    check_winograd(m, hw, activation, threads, onednn, channels, monkeypatch)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("activation", ["relu", "mish"])   # native code; applied after the kernel
def test_winograd_other_activations(m, activation, native_kernels, monkeypatch):
    check_winograd(m, (13, 11), activation, 2, True, (32, 48), monkeypatch)


def check_winograd(m, hw, activation, threads, onednn, channels, monkeypatch):
    from detkit.layers.activations import ACTIVATIONS

    torch.set_num_threads(threads)
    if not onednn:
        monkeypatch.setattr(detkit.fast, "_onednn_works", lambda: False)

    cin, cout = channels
    gen = torch.Generator().manual_seed(m * 100 + hw[0])
    weight = torch.randn(cout, cin, 3, 3, generator=gen) / 17
    bias = torch.randn(cout, generator=gen)
    x = torch.randn(2, cin, *hw, generator=gen).contiguous(memory_format=torch.channels_last)
    kernel = WinogradConv3x3(weight, bias, activation, m)
    got = kernel(x)
    expected = ACTIVATIONS[activation](F.conv2d(x, weight, bias, padding=1))
    assert got.shape == expected.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(expected, got) < 1e-5
    assert bool(kernel.reordered.by_key) == (onednn and detkit.fast._PREPACK_OK)
    copied = copy.deepcopy(kernel)   # reordered oneDNN weights do not deep-copy: reordered anew
    assert not copied.reordered.by_key and torch.equal(copied(x), got)


def test_the_faster_candidate_is_kept():
    import time

    from detkit.fast import _faster

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.003)
            return x

    quick, slow = torch.nn.Identity(), Slow()
    assert _faster(slow, quick, (3, 8, 8)) is quick and _faster(quick, slow, (3, 8, 8)) is quick


@pytest.mark.parametrize("size,stride,padding", [(2, 2, None), (2, 1, None), (3, 1, None),
                                                 (3, 2, None), (5, 1, None), (2, 2, 0),
                                                 (3, 2, 4), (5, 5, 6)])
@pytest.mark.parametrize("hw", [(13, 13), (26, 26), (15, 10), (14, 20), (3, 2)])
@pytest.mark.parametrize("channels", [4, 37])   # the native kernel: tail only; blocks + tail
def test_fast_maxpool_equals_darknets(size, stride, padding, hw, channels, native_kernels):
    from detkit.model import model_from_text

    pad = "" if padding is None else f"padding={padding}\n"
    model = model_from_text(f"[net]\nwidth={hw[1]}\nheight={hw[0]}\nchannels={channels}\n"
                            f"[maxpool]\nsize={size}\nstride={stride}\n{pad}")
    if min(model.layers[0].out_shape((channels, *hw), [])[1:]) < 1:
        pytest.skip("no output pixel")
    fast = optimize_for_inference(model, "cpu", channels_last=False)
    assert isinstance(fast.layers[0], FastMaxPool) and type(model.layers[0]) is MaxPool
    x = torch.randn(2, channels, *hw)
    x[1, :, 1, 0] = float("nan")                # NaN propagates, as in max_pool2d
    got = fast.layers[0](x, [])
    expected = model.layers[0](x, [])
    assert torch.isnan(expected).any() or hw[1] == 1
    assert torch.equal(got.nan_to_num(nan=7.0), expected.nan_to_num(nan=7.0))
    if native_kernels:
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_detections_equal_eager_with_the_official_weights(tiny_weights):
    from detkit.engine.predict import Detector

    cfg = REPO / "cfg" / "yolov3-tiny.cfg"
    eager = Detector(cfg, tiny_weights, device="cpu", fast=False)
    fast = Detector(cfg, tiny_weights, device="cpu", precision="fp32")   # bf16: test_bf16
    assert isinstance(fast.model, InferenceModel) and not isinstance(eager.model, InferenceModel)
    images = photos()
    expected, got = eager.predict_arrays(images), fast.predict_arrays(images)
    assert sum(len(e) for e in expected) > 0
    assert_same_detections(expected, got, box_atol=1e-2, score_atol=1e-4)


def test_detect_cli_no_fast_flag(tmp_path, tiny_weights):
    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), photos()[0])
    run = subprocess.run([sys.executable, "-m", "detkit", "detect", str(image), "--device", "cpu",
                          "--no-fast", "--out", str(tmp_path / "out"), "-q"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "im.jpg").is_file()


# -- GPU: half precision and CUDA graphs -------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["half", "bf16"])
def test_half_precision_detections_match_eager_fp32(dtype, tiny_weights):
    from detkit.engine.predict import Detector

    cfg = REPO / "cfg" / "yolov3-tiny.cfg"
    eager = Detector(cfg, tiny_weights, device="cpu", fast=False)
    model = detkit.load_model(cfg, tiny_weights)
    fast = optimize_for_inference(model, "cuda", half=dtype == "half", bf16=dtype == "bf16")
    assert fast.fast_options.cuda_graphs
    fast_detector = Detector(cfg, tiny_weights, device="cuda")
    fast_detector.model = fast
    images = photos()
    expected, got = eager.predict_arrays(images), fast_detector.predict_arrays(images)
    for e, g in zip(expected, got, strict=True):
        strong = e[e[:, 4] > 0.4]     # boxes near the threshold may come and go in fp16
        for row in strong:
            same = g[(g[:, 5] == row[5])]
            assert len(same), f"class {int(row[5])} lost"
            distance = (same[:, :4] - row[:4]).abs().max(1).values.min()
            assert distance < 3.0     # pixels of the original image


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_on_the_gpu():
    model = random_model("yolov3-tiny", 224).cuda()
    graphed = optimize_for_inference(model, "cuda")
    eager = optimize_for_inference(model, "cuda", cuda_graphs=False)
    with torch.inference_mode():
        for batch in (1, 3, 1):       # a new shape captures a graph; a known one replays
            x = torch.rand(batch, 3, 224, 224, device="cuda")
            torch.testing.assert_close(graphed(x), eager(x), rtol=1e-4, atol=1e-3)
        assert len(graphed._runner.graphs) == 2
        torch.testing.assert_close(graphed(x), graphed(x.clone()), rtol=1e-5, atol=1e-4)


_FAULTS_SCRIPT = """
import resource, torch
from detkit.fast import retain_freed_memory
tuned = retain_freed_memory()
for _ in range(5):  # warm-up: the heap settles after a few rounds
    torch.empty(10 << 20).fill_(1)                 # 40 MB, more than glibc's adaptive mmap limit
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(10 << 20).fill_(1)
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """The fast path's malloc setting: a 40 MB block freed and allocated again costs no page
    faults (glibc alone maps it anew each time: 10,000 faults per 40 MB); opt-out honoured."""
    import os

    def run(**env):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True,
                             text=True, check=True, env={**os.environ, **env}).stdout.split()
        return out[0] == "True", int(out[1])

    tuned, faults = run()
    if not tuned:
        pytest.skip("the C library is not glibc")
    untouched, system_faults = run(DETKIT_SYSTEM_MALLOC="1")
    assert not untouched
    assert faults < 500 and system_faults > 5 * 9000, (faults, system_faults)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("scale_xy", [1.0, 1.2])
def test_native_yolo_decode_equals_the_heads(channels_last, scale_xy):
    """Logits -> predictions in one pass, as YoloHead.decode(YoloHead.forward(x)): every cell,
    anchor and class (85 channels: five 16-lane blocks and a tail), logits up to +-100, a w
    logit past exp's float range, and NaN logits (NaN predictions, as the heads give: NaN
    fails every threshold, where a clamp would make a confident box)."""
    import detkit.native as native
    from detkit.model import model_from_text

    library = native.kernels()
    if library is None:
        pytest.skip("native kernels not built here (no C compiler?)")
    head = model_from_text(
        "[net]\nwidth=64\nheight=96\nchannels=3\n" + _conv(255, 1, bn=0, act="linear")
        + f"[yolo]\nmask=0,1,2\nanchors=10,14,23,27,37,58\nclasses=80\nnum=3\n"
          f"scale_x_y={scale_xy}\n").layers[1]
    x = torch.randn(2, 255, 3, 2, generator=torch.Generator().manual_seed(0)) * 8
    x[0, :, 0, 0] = torch.linspace(-100, 100, 255)
    x[1, 2, 0, 0], x[1, 3, 0, 0] = 95.0, -95.0             # anchor 0's w, h at cell (0, 0)
    x[1, 85:92, 1, 1] = float("nan")                        # anchor 1 at cell (1, 1)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    expected = head.decode(head(x.contiguous(), []), (96, 64))
    got = native.yolo_decode(library, x, head.anchors, head.scale_x_y, (96, 64))
    assert torch.isinf(expected).any() and torch.isnan(expected).any()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-6, equal_nan=True)


def test_yolo_heads_decode_in_one_pass_only_where_their_output_is_unread():
    from detkit.model import model_from_text

    fast = optimize_for_inference(random_model("mini-yolo", 96), "cpu")
    heads = [layer for layer in fast.layers if isinstance(layer, FastYoloHead)]
    assert len(heads) == 2 and all(h.fuses_decode for h in heads)   # route / end of the net
    read = MINI_YOLO.replace("[route]\nlayers=-3\n", "[route]\nlayers=-1,-3\n", 1)
    fast = optimize_for_inference(model_from_text(read).eval(), "cpu")
    assert [h.fuses_decode for h in fast.layers if isinstance(h, FastYoloHead)] == [False, True]


def test_native_kernels_build_once_and_share_torchs_openmp(tmp_path, monkeypatch):
    """Built into the cache directory once (a second build call reuses the file), and bound to the
    libgomp torch loaded: one OpenMP runtime, one thread pool."""
    import detkit.native as native

    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path))
    built = native._build(native._compiler())
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert native._build(native._compiler()) == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [built.name]   # no partial files left
    native._bind(built)
    gomps = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(gomps) == 1, gomps


def test_native_kernels_fall_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    import detkit.native as native

    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("DETKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level("WARNING", logger="detkit"):
        assert native.kernels() is None
    assert "native kernels not built" in caplog.text
    monkeypatch.setattr(native, "_TRIED", False)
    monkeypatch.setenv("DETKIT_NATIVE", "0")
    monkeypatch.delenv("CC")
    assert native.kernels() is None and not list(tmp_path.iterdir())


def test_native_kernels_never_load_from_a_directory_others_can_write(tmp_path, monkeypatch):
    """The fallback build directory (no writable cache): a library loaded from a directory
    other users can write to could be anyone's code."""
    import os
    import tempfile

    import detkit.native as native

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    own = native._private_directory()
    assert own == tmp_path / f"detkit-{os.getuid()}" and own.stat().st_mode & 0o777 == 0o700
    own.chmod(0o777)
    other = native._private_directory()
    assert other != own and other.stat().st_mode & 0o077 == 0
    monkeypatch.setenv("CC", "ccache gcc -v")
    assert native._compiler() == ["ccache", "gcc", "-v"]
