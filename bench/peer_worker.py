"""One peer of bench/peers.py in its own process: load a network, then time forwards on demand.

Run as `python peer_worker.py KIND THREADS` where KIND is detkit-eager, detkit-fast (fp32),
detkit-bf16, detkit-auto (detkit's default precision), detkit-ort, openvino (its default
precision: bf16 on a CPU with bf16 instructions), openvino-f32, onnxruntime, opencv, darknet or
(end to end only) detkit-detector. The opencv
peer runs under bench/.venv-opencv's Python (OpenCV 4.x, no torch), the openvino peers under
bench/.venv-openvino's (OpenVINO, onnxruntime, no torch) on the ONNX file detkit exported, the others under
detkit's. Protocol: one JSON object per line on stdin, one answer per
line on the original stdout (libraries' own prints are sent to stderr):

    {"op": "load", "cfg": ..., "weights": ..., "input": "x.npy", "onnx": ...}
                                                                 -> {"ok": true, "info": ...}
    {"op": "time", "n": 3}                                          -> {"ms": [..., ..., ...]}
    {"op": "detect"}                     -> {"boxes": [[x1, y1, x2, y2, score, class], ...]}
    {"op": "quit"}

Each timed call is the network's forward pass on the same (1, 3, H, W) float32 RGB input in
[0, 1], head activations included (detkit also decodes boxes), no pre- or postprocessing.
With `"mode": "end-to-end"` in load (plus `"image"`: a BGR uint8 photo as .npy, `"size"`: [w, h]
and `"letterbox"`), a timed call goes from the photo to boxes in its pixels: the NumPy pipeline
of bench/numpy_pipeline.py around the peer's forward pass, or for detkit-detector detkit's own
(Detector.predict_arrays). Only detkit's peers and the ONNX peers run end to end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Peer:
    """A loaded network with a `forward()` timed by the worker loop; `infer(x)` is the same
    forward pass on any input, its (B, N, 5+C) head output as a NumPy array (end to end)."""

    info: str = ""

    def forward(self) -> None:
        raise NotImplementedError

    def infer(self, x):
        raise SystemExit(f"{type(self).__name__} does not run end to end")


class DetkitPeer(Peer):
    def __init__(self, cfg: str, weights: str | None, x, threads: int, fast: bool,
                 precision: str = "fp32") -> None:
        import torch

        import detkit

        torch.set_num_threads(threads)
        model = detkit.load_model(cfg, weights)
        note = "fp32"
        if fast:
            from detkit.fast import optimize_for_inference

            model = optimize_for_inference(model, "cpu", size=(x.shape[3], x.shape[2]),
                                           precision=precision)
            note = model.fast_options.precision_note
        self.model = model
        self.x = torch.from_numpy(x)
        self.torch = torch
        self.info = f"torch {torch.__version__}, {torch.get_num_threads()} threads, {note}"

    def forward(self) -> None:
        with self.torch.inference_mode():
            self.model(self.x)

    def infer(self, x):
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(x)).float().numpy()


class DetectorPeer(Peer):
    """detkit.Detector at its defaults (precision auto): its own torch letterbox, forward,
    decode, NMS and box correction: what `detkit detect` runs per photo."""

    def __init__(self, cfg: str, weights: str | None, threads: int, size) -> None:
        import torch

        import detkit

        torch.set_num_threads(threads)
        self.detector = detkit.Detector(cfg, weights, device="cpu", img_size=tuple(size))
        self.info = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                     f"{self.detector.precision_note}")

    def detect(self, image):
        return self.detector.predict_arrays([image])[0].numpy()


class OrtPeer(Peer):
    """detkit's ONNX export run by onnxruntime (the candidate `--backend onnxruntime`)."""

    def __init__(self, cfg: str, weights: str | None, x, threads: int) -> None:
        import tempfile

        import onnxruntime
        import torch

        import detkit
        from detkit.export import export_onnx, ort_session

        torch.set_num_threads(threads)
        model = detkit.load_model(cfg, weights)
        path = Path(tempfile.mkdtemp(prefix="detkit-peers-")) / "model.onnx"
        export_onnx(model, path, size=(x.shape[3], x.shape[2]), check=False)
        self.session = ort_session(path, threads)
        self.feed = {"images": x}
        self.info = f"onnxruntime {onnxruntime.__version__}, {threads} intra-op threads"

    def forward(self) -> None:
        self.session.run(None, self.feed)

    def infer(self, x):
        return self.session.run(None, {next(iter(self.feed)): x})[0]


class OpenVinoPeer(Peer):
    """detkit's ONNX export compiled by OpenVINO for the CPU, at its default inference precision
    (bf16 where the CPU has bf16 instructions) or with INFERENCE_PRECISION_HINT f32; latency
    mode, `threads` inference threads."""

    def __init__(self, onnx: str, x, threads: int, f32: bool) -> None:
        import openvino as ov

        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "NUM_STREAMS": 1}
        if f32:
            config["INFERENCE_PRECISION_HINT"] = "f32"
        self.compiled = core.compile_model(core.read_model(onnx), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.x = x
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self.info = f"OpenVINO {ov.__version__}, {threads} threads, inference precision {precision}"

    def forward(self) -> None:
        self.request.infer({0: self.x})

    def infer(self, x):
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data


class OnnxRuntimePeer(Peer):
    """detkit's ONNX export run by a plain onnxruntime in its own environment (no torch, no
    detkit): the session options a user of onnxruntime gets, with `threads` intra-op threads."""

    def __init__(self, onnx: str, x, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(onnx, options,
                                                    providers=["CPUExecutionProvider"])
        self.feed = {self.session.get_inputs()[0].name: x}
        self.info = f"onnxruntime {onnxruntime.__version__} (own venv), {threads} intra-op threads"

    def forward(self) -> None:
        self.session.run(None, self.feed)

    def infer(self, x):
        return self.session.run(None, {next(iter(self.feed)): x})[0]


class OpenCVPeer(Peer):
    def __init__(self, cfg: str, weights: str | None, x, threads: int) -> None:
        import cv2

        cv2.setNumThreads(threads)
        net = cv2.dnn.readNetFromDarknet(cfg, weights)
        net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
        net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
        self.net, self.x = net, x
        self.outputs = net.getUnconnectedOutLayersNames()
        self.info = f"OpenCV {cv2.__version__} DNN (readNetFromDarknet), {cv2.getNumThreads()} threads"

    def forward(self) -> None:
        self.net.setInput(self.x)
        self.net.forward(self.outputs)


class DarknetPeer(Peer):
    """libdarknet's network_predict through tests/darknet_ref.py (single-threaded build)."""

    def __init__(self, cfg: str, weights: str | None, x, threads: int) -> None:
        sys.path.insert(0, str(REPO / "tests"))
        from darknet_ref import DarknetNet

        self.net = DarknetNet(cfg, weights, batch=1, size=(x.shape[3], x.shape[2]))
        self.x = x
        self.info = "pjreddie darknet (Debian libdarknet.so, CPU, single-threaded)"

    def forward(self) -> None:
        self.net.forward(self.x, layers=[])


DETKIT_PRECISION = {"detkit-fast": "fp32", "detkit-bf16": "bf16", "detkit-auto": "auto"}


def make_peer(kind: str, cfg: str, weights: str | None, x, threads: int,
              onnx: str | None = None) -> Peer:
    if kind == "detkit-eager":
        return DetkitPeer(cfg, weights, x, threads, fast=False)
    if kind in DETKIT_PRECISION:
        return DetkitPeer(cfg, weights, x, threads, fast=True, precision=DETKIT_PRECISION[kind])
    if kind in ("openvino", "openvino-f32"):
        if onnx is None:
            raise SystemExit("the openvino peers need the exported ONNX file (load's onnx)")
        return OpenVinoPeer(onnx, x, threads, f32=kind == "openvino-f32")
    if kind == "onnxruntime":
        if onnx is None:
            raise SystemExit("the onnxruntime peer needs the exported ONNX file (load's onnx)")
        return OnnxRuntimePeer(onnx, x, threads)
    if kind == "detkit-ort":
        return OrtPeer(cfg, weights, x, threads)
    if kind == "opencv":
        return OpenCVPeer(cfg, weights, x, threads)
    if kind == "darknet":
        return DarknetPeer(cfg, weights, x, threads)
    raise SystemExit(f"unknown peer kind {kind}")


class EndToEnd:
    """A peer timed from the photo to boxes: detkit's Detector, or the NumPy pipeline around
    the peer's own forward pass."""

    def __init__(self, peer: Peer, image, size, letterbox: bool) -> None:
        sys.path.insert(0, str(REPO / "bench"))
        import numpy_pipeline

        self.peer, self.image, self.size, self.letterbox = peer, image, tuple(size), letterbox
        self.pipeline = numpy_pipeline
        self.info = peer.info

    def detect(self):
        if isinstance(self.peer, DetectorPeer):
            return self.peer.detect(self.image)
        return self.pipeline.detect(self.peer.infer, self.image, self.size, self.letterbox)

    def forward(self) -> None:
        self.detect()


def load(kind: str, msg: dict, threads: int) -> Peer | EndToEnd:
    import numpy as np

    x = np.ascontiguousarray(np.load(msg["input"]), dtype=np.float32)
    if msg.get("mode", "forward") == "forward":
        if kind == "detkit-detector":
            raise SystemExit("detkit-detector runs end to end only (load's mode)")
        return make_peer(kind, msg["cfg"], msg.get("weights"), x, threads, msg.get("onnx"))
    if kind == "detkit-detector":
        peer = DetectorPeer(msg["cfg"], msg.get("weights"), threads, msg["size"])
    else:   # a peer without `infer` (OpenCV, darknet) refuses at its first detect
        peer = make_peer(kind, msg["cfg"], msg.get("weights"), x, threads, msg.get("onnx"))
    image = np.ascontiguousarray(np.load(msg["image"]), dtype=np.uint8)
    return EndToEnd(peer, image, msg["size"], bool(msg["letterbox"]))


def serve(kind: str, threads: int, reply) -> None:
    peer: Peer | EndToEnd | None = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["op"] == "load":
                peer = load(kind, msg, threads)
                answer = {"ok": True, "info": peer.info}
            elif msg["op"] == "time":
                samples = []
                for _ in range(int(msg["n"])):
                    start = time.perf_counter()
                    peer.forward()
                    samples.append((time.perf_counter() - start) * 1000.0)
                answer = {"ms": samples}
            elif msg["op"] == "detect":
                answer = {"boxes": [[float(v) for v in row] for row in peer.detect()]}
            elif msg["op"] == "quit":
                return
            else:
                answer = {"error": f"unknown op {msg['op']}"}
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


def main() -> None:
    kind, threads = sys.argv[1], int(sys.argv[2])
    reply = os.fdopen(os.dup(1), "w")   # the protocol channel
    os.dup2(2, 1)                       # anything printed by a library goes to stderr
    serve(kind, threads, reply)


if __name__ == "__main__":
    main()
