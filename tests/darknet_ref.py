"""Drive the reference darknet (pjreddie, 2018; Debian package ``darknet``)
from Python so detkit's tests can compare against it.

A tiny C shim (``tests/darknet_shim.c``) is compiled against
``/usr/lib/darknet/include/darknet.h`` on first use and cached in
``$DETKIT_CACHE`` (default ``~/.cache/detkit``) as ``libdarknet_shim.so``;
it is rebuilt whenever the ``.c`` is newer than the ``.so``.  Python talks to
it through :mod:`ctypes` and never mirrors darknet's ``layer`` struct.

Typical use::

    from tests.darknet_ref import DarknetNet, darknet_available
    if not darknet_available():
        pytest.skip("reference darknet not installed")
    with DarknetNet(cfg, weights, batch=1, size=(416, 416)) as dn:
        outs = dn.forward(x)                  # one (B, C, H, W) array per layer
        dets = dn.detections(img_w, img_h, thresh=0.25)

Notes on darknet's behaviour (pjreddie git 61c9d02e, the Debian build):

* darknet allocates every layer buffer for ``batch/subdivisions`` of the cfg,
  and ``set_batch_network`` only changes the ``batch`` fields.  So this module
  loads a temporary copy of the cfg whose ``[net]`` section has
  ``batch=<batch>``, ``subdivisions=1`` (and ``width``/``height`` when *size* is
  given) and then calls ``set_batch_network(net, batch)``.
* Fatal darknet errors (``file_error``, ``error()``) call ``exit``/``abort`` and
  take the Python process down; the wrapper checks what it can beforehand
  (files exist, shapes match).
* libdarknet is built with ``-Ofast`` (fast-math) and is single-threaded.
* Batch-norm: ``(x - mean) / (sqrt(var) + 1e-6)`` (eps *outside* the sqrt);
  in training mode the batch variance is the unbiased one (``/(N-1)``) and
  the rolling statistics are updated with momentum 0.01.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "DARKNET_INCLUDE",
    "DARKNET_LIBDIR",
    "DarknetNet",
    "darknet_available",
    "darknet_letterbox",
    "darknet_load_image",
    "darknet_resize_image",
    "shim_path",
]

DARKNET_LIBDIR = Path("/usr/lib/darknet")
DARKNET_INCLUDE = DARKNET_LIBDIR / "include"
_DARKNET_LIB = DARKNET_LIBDIR / "libdarknet.so"
_DARKNET_HEADER = DARKNET_INCLUDE / "darknet.h"
_SHIM_SRC = Path(__file__).resolve().with_name("darknet_shim.c")
_SHIM_NAME = "libdarknet_shim.so"
_ABI_VERSION = 1

# darknet's LAYER_TYPE enum, in order, lower-cased.
LAYER_TYPES = (
    "convolutional",
    "deconvolutional",
    "connected",
    "maxpool",
    "softmax",
    "detection",
    "dropout",
    "crop",
    "route",
    "cost",
    "normalization",
    "avgpool",
    "local",
    "shortcut",
    "active",
    "rnn",
    "gru",
    "lstm",
    "crnn",
    "batchnorm",
    "network",
    "xnor",
    "region",
    "yolo",
    "iseg",
    "reorg",
    "upsample",
    "logxent",
    "l2norm",
    "blank",
)
# darknet's ACTIVATION enum, in order, lower-cased.
ACTIVATIONS = (
    "logistic",
    "relu",
    "relie",
    "linear",
    "ramp",
    "tanh",
    "plse",
    "leaky",
    "elu",
    "loggy",
    "stair",
    "hardtan",
    "lhtan",
    "selu",
)
COST_TYPES = ("sse", "masked", "l1", "seg", "smooth", "wgan")

# Must match the order written by dks_layer_info() in darknet_shim.c.
_LAYER_INT_FIELDS = (
    "type_id",
    "activation_id",
    "batch",
    "inputs",
    "outputs",
    "h",
    "w",
    "c",
    "out_h",
    "out_w",
    "out_c",
    "n",
    "size",
    "stride",
    "pad",
    "groups",
    "classes",
    "coords",
    "batch_normalize",
    "total",
    "max_boxes",
    "truths",
    "softmax",
    "background",
    "rescore",
    "bias_match",
    "reverse",
    "flatten",
    "index",
    "binary",
    "xnor",
    "noloss",
    "nweights",
    "nbiases",
    "side",
    "sqrt",
    "random",
    "spatial",
    "extra",
    "truth",
    "dontload",
    "dontloadscales",
    "stopbackward",
    "onlyforward",
    "cost_type_id",
    "has_mask",
    "has_softmax_tree",
    "has_map",
)
_LAYER_FLOAT_FIELDS = (
    "ignore_thresh",
    "truth_thresh",
    "thresh",
    "jitter",
    "object_scale",
    "noobject_scale",
    "class_scale",
    "coord_scale",
    "mask_scale",
    "temperature",
    "probability",
    "scale",
    "alpha",
    "beta",
    "kappa",
    "smooth",
    "clip",
    "learning_rate_scale",
    "cost",
    "dot",
    "angle",
    "saturation",
    "exposure",
    "ratio",
)
_NET_INT_FIELDS = (
    "n",
    "batch",
    "w",
    "h",
    "c",
    "inputs",
    "outputs",
    "truths",
    "subdivisions",
    "train",
    "time_steps",
    "notruth",
)
_LOSS_TYPES = ("yolo", "region", "detection")

_PF = ctypes.POINTER(ctypes.c_float)
_PI = ctypes.POINTER(ctypes.c_int)
_lib_lock = threading.Lock()
_lib_handle: ctypes.CDLL | None = None


# --------------------------------------------------------------------------
# building / loading the shim
# --------------------------------------------------------------------------


def darknet_available() -> bool:
    """True when the reference darknet library, its header, the shim source
    and gcc are all present (the shim itself is built lazily on first use)."""
    return (
        _DARKNET_LIB.is_file()
        and _DARKNET_HEADER.is_file()
        and _SHIM_SRC.is_file()
        and shutil.which("gcc") is not None
    )


def _cache_dir() -> Path:
    env = os.environ.get("DETKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "detkit"


def shim_path(build: bool = True) -> Path:
    """Path of the compiled shim; (re)builds it first when *build* is true and
    the cached ``.so`` is missing or older than ``darknet_shim.c``.

    The build goes to a unique temporary name in the cache directory and is
    then atomically renamed, so concurrent pytest workers cannot clash."""
    out = _cache_dir() / _SHIM_NAME
    if not build:
        return out
    try:
        fresh = out.stat().st_mtime_ns >= _SHIM_SRC.stat().st_mtime_ns
    except FileNotFoundError:
        fresh = False
    if fresh:
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found: cannot build the darknet shim")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".libdarknet_shim.", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [
        gcc,
        "-O2",
        "-shared",
        "-fPIC",
        f"-I{DARKNET_INCLUDE}",
        str(_SHIM_SRC),
        f"-L{DARKNET_LIBDIR}",
        "-ldarknet",
        f"-Wl,-rpath,{DARKNET_LIBDIR}",
        "-o",
        tmp,
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(
                "building the darknet shim failed:\n" + " ".join(cmd) + "\n" + res.stderr
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _lib() -> ctypes.CDLL:
    """Build (if needed), load and type the shim; cached per process."""
    global _lib_handle
    with _lib_lock:
        if _lib_handle is not None:
            return _lib_handle
        if not darknet_available():
            raise RuntimeError("reference darknet (lib/header/gcc) is not available")
        # libdarknet links OpenCV highgui -> Qt; never let it look for a display.
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        lib = ctypes.CDLL(str(shim_path()))
        vp, i, f, ull = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_ulonglong
        sigs = {
            "dks_abi_version": (i, []),
            "dks_load": (vp, [ctypes.c_char_p, ctypes.c_char_p, _PI]),
            "dks_set_batch": (None, [vp, i]),
            "dks_resize": (i, [vp, i, i]),
            "dks_free": (None, [vp]),
            "dks_net_info": (None, [vp, _PI]),
            "dks_get_seen": (ull, [vp]),
            "dks_set_seen": (None, [vp, ull]),
            "dks_layer_info": (i, [vp, i, _PI, _PF]),
            "dks_layer_ints": (i, [vp, i, i, _PI, i]),
            "dks_layer_params": (i, [vp, i, i, _PF, i]),
            "dks_layer_buffer": (i, [vp, i, i, _PF, i]),
            "dks_layer_cost": (i, [vp, i, _PF]),
            "dks_predict": (None, [vp, _PF]),
            "dks_train_forward": (f, [vp, _PF, _PF, ull, i]),
            "dks_get_boxes": (vp, [vp, i, i, f, f, i, _PI]),
            "dks_last_classes": (i, [vp]),
            "dks_nms_sort": (None, [vp, i, i, f]),
            "dks_det_classes": (i, [vp, i]),
            "dks_det_copy": (None, [vp, i, _PF, _PF, _PF, i]),
            "dks_free_dets": (None, [vp, i]),
            "dks_load_image": (i, [ctypes.c_char_p, _PF, i, _PI, _PI]),
            "dks_letterbox": (None, [_PF, i, i, i, i, i, _PF]),
            "dks_resize_image": (None, [_PF, i, i, i, i, i, _PF]),
        }
        for name, (res, args) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
        if lib.dks_abi_version() != _ABI_VERSION:
            raise RuntimeError("stale darknet shim in the cache; delete " + str(shim_path(False)))
        _lib_handle = lib
        return lib


def _fptr(a: np.ndarray) -> ctypes._Pointer:
    return a.ctypes.data_as(_PF)


# --------------------------------------------------------------------------
# cfg rewriting
# --------------------------------------------------------------------------


def _patch_net_section(text: str, overrides: dict[str, int]) -> str:
    """Return cfg *text* with the given keys of the first ([net]) section
    replaced (existing lines of those keys are dropped, new ones inserted
    right after the section header)."""
    lines = text.splitlines()
    start = None
    for idx, line in enumerate(lines):
        s = line.strip()
        if s.startswith("["):
            if s.lower() not in ("[net]", "[network]"):
                raise ValueError(f"first cfg section must be [net] or [network], got {s!r}")
            start = idx
            break
    if start is None:
        raise ValueError("cfg has no [net] section")
    end = len(lines)
    for idx in range(start + 1, len(lines)):
        if lines[idx].strip().startswith("["):
            end = idx
            break
    key_re = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=")
    body = []
    for line in lines[start + 1 : end]:
        m = key_re.match(line)
        if m and m.group(1) in overrides:
            continue
        body.append(line)
    new = [f"{k}={v}" for k, v in overrides.items()]
    return "\n".join(lines[: start + 1] + new + body + lines[end:]) + "\n"


# --------------------------------------------------------------------------
# the network wrapper
# --------------------------------------------------------------------------


class DarknetNet:
    """A network loaded by the reference darknet (CPU build).

    ``DarknetNet(cfg, weights=None, batch=1, size=None)`` loads *cfg*
    (``load_network(cfg, weights or 0, clear=0)``) with every buffer sized for
    *batch* images (a temporary copy of the cfg gets ``batch=<batch>``,
    ``subdivisions=1`` and, when *size* ``(w, h)`` is given,
    ``width=w``/``height=h`` -- equivalent to ``resize_network`` but it also
    works for nets with layers darknet cannot resize), then calls
    ``set_batch_network(net, batch)``.  Without weights darknet's own random
    initialisation is kept -- note BN rolling mean *and variance* start at 0,
    so a weightless net explodes (inf/NaN) in test mode; load weights for
    meaningful values.

    Attributes: ``n_layers``, ``width``, ``height`` (network input size),
    ``channels``, ``batch``, ``truths`` (floats of ``net->truth`` per image).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        cfg: str | Path,
        weights: str | Path | None = None,
        batch: int = 1,
        size: tuple[int, int] | None = None,
    ):
        self._net = None
        self._forwarded = False
        self.last_costs: dict[int, float] = {}
        self.last_net_cost: float = float("nan")
        lib = _lib()
        cfg = Path(cfg)
        if not cfg.is_file():
            raise FileNotFoundError(cfg)
        if weights is not None:
            weights = Path(weights)
            if not weights.is_file():
                raise FileNotFoundError(weights)
        batch = int(batch)
        if batch < 1:
            raise ValueError("batch must be >= 1")
        overrides: dict[str, int] = {"batch": batch, "subdivisions": 1}
        if size is not None:
            w, h = (int(v) for v in size)
            if w <= 0 or h <= 0:
                raise ValueError(f"bad size {size!r}")
            overrides["width"] = w
            overrides["height"] = h
        text = _patch_net_section(cfg.read_text(), overrides)
        fd, tmp = tempfile.mkstemp(prefix="detkit_dn_", suffix=".cfg")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            parsed = ctypes.c_int(0)
            net = lib.dks_load(
                tmp.encode(),
                str(weights).encode() if weights is not None else None,
                ctypes.byref(parsed),
            )
        finally:
            os.unlink(tmp)
        if not net:
            raise RuntimeError(f"darknet failed to load {cfg}")
        self._net = net
        if parsed.value != batch:
            self.close()
            raise RuntimeError(
                f"darknet allocated for batch {parsed.value}, wanted {batch} "
                "(time_steps in the cfg?)"
            )
        lib.dks_set_batch(net, batch)
        self.cfg = cfg
        self.weights = weights
        self._refresh()

    # ---- bookkeeping -------------------------------------------------------

    def _refresh(self) -> None:
        iv = (ctypes.c_int * len(_NET_INT_FIELDS))()
        _lib().dks_net_info(self._handle(), iv)
        info = dict(zip(_NET_INT_FIELDS, list(iv), strict=True))
        self.net_info = info
        self.n_layers = info["n"]
        self.width = info["w"]
        self.height = info["h"]
        self.channels = info["c"]
        self.batch = info["batch"]
        self.truths = info["truths"]
        self._infos = [self._layer_info(i) for i in range(self.n_layers)]

    def _handle(self):
        if not self._net:
            raise RuntimeError("DarknetNet is closed")
        return self._net

    def close(self) -> None:
        """Free the darknet network (``free_network``); idempotent."""
        if self._net and _lib_handle is not None:
            _lib_handle.dks_free(self._net)
        self._net = None

    def __enter__(self) -> DarknetNet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ---- layer description -------------------------------------------------

    def _layer_info(self, i: int) -> dict:
        lib = _lib()
        net = self._handle()
        iv = (ctypes.c_int * len(_LAYER_INT_FIELDS))()
        fv = (ctypes.c_float * len(_LAYER_FLOAT_FIELDS))()
        if lib.dks_layer_info(net, i, iv, fv) != 0:
            raise IndexError(i)
        d: dict = dict(zip(_LAYER_INT_FIELDS, list(iv), strict=True))
        d.update(zip(_LAYER_FLOAT_FIELDS, [float(v) for v in fv], strict=True))
        t = d["type_id"]
        d["type"] = LAYER_TYPES[t] if 0 <= t < len(LAYER_TYPES) else f"type{t}"
        a = d["activation_id"]
        d["activation"] = ACTIVATIONS[a] if 0 <= a < len(ACTIVATIONS) else f"act{a}"
        ct = d["cost_type_id"]
        d["cost_type"] = COST_TYPES[ct] if 0 <= ct < len(COST_TYPES) else f"cost{ct}"
        if d["type"] in ("yolo", "region"):
            # resize_yolo/region_layer update w/h but leave out_w/out_h stale.
            d["out_w"], d["out_h"] = d["w"], d["h"]
        d["filters"] = d["n"] if d["type"] == "convolutional" else d["out_c"]
        if d["type"] == "yolo":
            d["mask"] = self._ints(i, 0)
        if d["type"] == "route":
            d["input_layers"] = self._ints(i, 1)
            d["input_sizes"] = self._ints(i, 2)
        if d["type"] == "shortcut":
            d["from"] = d["index"]
        if d["type"] in ("yolo", "region"):
            d["anchors"] = self.layer_params(i)["biases"].reshape(-1, 2)
        return d

    def _ints(self, i: int, which: int) -> list[int]:
        lib = _lib()
        n = lib.dks_layer_ints(self._handle(), i, which, None, 0)
        if n <= 0:
            return []
        buf = (ctypes.c_int * n)()
        lib.dks_layer_ints(self._handle(), i, which, buf, n)
        return list(buf)

    def layer_info(self, i: int) -> dict:
        """Description of layer *i* as a dict.

        Keys include ``type`` (darknet ``LAYER_TYPE`` lower-cased:
        'convolutional', 'maxpool', 'route', 'shortcut', 'upsample', 'reorg',
        'yolo', 'region', 'avgpool', 'connected', 'softmax', 'dropout', 'cost',
        ...), ``activation`` ('leaky', 'linear', 'logistic', ...), ``batch``,
        ``h, w, c`` (input), ``out_h, out_w, out_c``, ``inputs``, ``outputs``
        (per image), ``n`` (filters for conv, anchors-in-layer for yolo/region,
        #inputs for route), ``filters``, ``size``, ``stride``, ``pad``,
        ``groups``, ``batch_normalize``, ``classes``, ``coords``, ``total``,
        ``max_boxes``, ``truths``, ``softmax``, ``rescore``, ``bias_match``,
        ``index``/``from`` (shortcut source), ``ignore_thresh``,
        ``truth_thresh``, ``thresh``, ``object_scale``, ``noobject_scale``,
        ``class_scale``, ``coord_scale``, ``scale`` (upsample), ``alpha``,
        ``beta``, ``cost`` (``*l.cost`` or NaN) and, where relevant, ``mask``
        (yolo), ``anchors`` ((total or n, 2) array, yolo/region),
        ``input_layers``/``input_sizes`` (route).
        """
        if not 0 <= i < self.n_layers:
            raise IndexError(i)
        d = dict(self._infos[i])
        d["cost"] = self._cost(i)
        return d

    def layer_params(self, i: int) -> dict[str, np.ndarray]:
        """Copies of layer *i*'s parameters, as darknet stores them:
        ``biases`` (conv/connected bias, or the anchors for yolo/region),
        ``weights`` (flat, darknet order), ``scales``, ``rolling_mean``,
        ``rolling_variance`` (BN).  Absent arrays are omitted."""
        lib = _lib()
        out = {}
        for which, name in enumerate(
            ("biases", "weights", "scales", "rolling_mean", "rolling_variance")
        ):
            n = lib.dks_layer_params(self._handle(), i, which, None, 0)
            if n > 0:
                a = np.empty(n, np.float32)
                lib.dks_layer_params(self._handle(), i, which, _fptr(a), n)
                out[name] = a
        return out

    def _cost(self, i: int) -> float:
        v = ctypes.c_float()
        if _lib().dks_layer_cost(self._handle(), i, ctypes.byref(v)) == 1:
            return float(v.value)
        return float("nan")

    def _shape(self, i: int) -> tuple[int, int, int, int]:
        d = self._infos[i]
        if d["out_c"] * d["out_h"] * d["out_w"] == d["outputs"] and d["outputs"] > 0:
            return (self.batch, d["out_c"], d["out_h"], d["out_w"])
        return (self.batch, d["outputs"], 1, 1)

    def _buffer(self, i: int, which: int) -> np.ndarray | None:
        lib = _lib()
        shape = self._shape(i)
        size = int(np.prod(shape))
        n = lib.dks_layer_buffer(self._handle(), i, which, None, 0)
        if n <= 0:
            return None
        if n != size:
            raise RuntimeError(f"layer {i}: buffer has {n} floats, expected {shape}")
        a = np.empty(shape, np.float32)
        lib.dks_layer_buffer(self._handle(), i, which, _fptr(a), size)
        return a

    def output(self, i: int) -> np.ndarray:
        """Copy of layer *i*'s current ``l.output`` as (B, out_c, out_h, out_w)
        (or (B, outputs, 1, 1) for layers without a spatial shape)."""
        return self._buffer(i, 0)

    def delta(self, i: int) -> np.ndarray | None:
        """Copy of layer *i*'s current ``l.delta`` (same shape as output), or
        None if the layer has no delta buffer."""
        return self._buffer(i, 1)

    # ---- inference ---------------------------------------------------------

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        want = (self.batch, self.channels, self.height, self.width)
        if x.shape != want:
            raise ValueError(f"input shape {x.shape} != {want} (B, C, H, W)")
        return x

    def forward(self, x: np.ndarray, layers: Iterable[int] | None = None) -> list[np.ndarray]:
        """Test-mode forward pass (``network_predict``: ``net->train = 0``).

        *x* is float32 (B, 3, H, W) RGB in [0, 1] with B = the batch the net
        was built for.  Returns every layer's ``l.output`` copied as
        (B, out_c, out_h, out_w) float32 -- for yolo/region layers that is the
        tensor darknet keeps (x, y, objectness, classes already passed through
        the logistic; w, h raw).  With *layers* only those indices are copied
        and the other entries are None."""
        x = self._check_input(x)
        _lib().dks_predict(self._handle(), _fptr(x))
        self._forwarded = True
        want = None if layers is None else set(int(i) % self.n_layers for i in layers)
        return [self.output(i) if want is None or i in want else None for i in range(self.n_layers)]

    def detections(
        self,
        img_w: int,
        img_h: int,
        thresh: float,
        nms: float = 0.45,
        hier: float = 0.5,
        relative: int = 1,
    ) -> list[dict]:
        """Boxes of the last forward pass (the net must have batch 1).

        ``get_network_boxes(net, img_w, img_h, thresh, hier, 0, relative, &n)``
        then, if *nms* > 0, ``do_nms_sort(dets, n, classes, nms)`` (classes of
        the last layer, as darknet's detector does).  Boxes are corrected for
        darknet's letterboxing of an *img_w* x *img_h* image; with
        ``relative=1`` they are fractions of the image, else pixels.

        Returns every detection (yolo: those with objectness > thresh; region:
        all cells*anchors) as ``dict(x, y, w, h, objectness, prob)`` with
        (x, y) the box centre and ``prob`` a float32 array [classes] of
        objectness*class_prob, zeroed where <= thresh or suppressed by NMS.
        Note: after NMS the order is darknet's (sorted per class)."""
        if self.batch != 1:
            # get_yolo/region_detections average the two images when batch == 2
            raise ValueError("detections() needs a batch-1 network")
        if not self._forwarded:
            raise RuntimeError("call forward() first")
        lib = _lib()
        net = self._handle()
        n = ctypes.c_int(0)
        dets = lib.dks_get_boxes(
            net, int(img_w), int(img_h), float(thresh), float(hier), int(relative), ctypes.byref(n)
        )
        n = n.value
        out = []
        try:
            if n and nms > 0:
                lib.dks_nms_sort(dets, n, lib.dks_last_classes(net), float(nms))
            box = np.empty(4, np.float32)
            obj = ctypes.c_float()
            # prob arrays are allocated with the last layer's classes
            # (region detections leave det.classes at 0).
            c = lib.dks_last_classes(net)
            for k in range(n):
                prob = np.zeros(max(c, 0), np.float32)
                lib.dks_det_copy(dets, k, _fptr(box), ctypes.byref(obj), _fptr(prob), c)
                out.append(
                    dict(
                        x=float(box[0]),
                        y=float(box[1]),
                        w=float(box[2]),
                        h=float(box[3]),
                        objectness=float(obj.value),
                        prob=prob,
                    )
                )
        finally:
            if dets:
                lib.dks_free_dets(dets, n)
        return out

    # ---- training-mode forward ---------------------------------------------

    @property
    def seen(self) -> int:
        """``*net->seen`` (a ``size_t*`` in this darknet)."""
        return int(_lib().dks_get_seen(self._handle()))

    def set_seen(self, seen: int) -> None:
        """Set ``*net->seen`` (images seen so far; region layers add the
        anchor-prior deltas while it is < 12800)."""
        _lib().dks_set_seen(self._handle(), int(seen))

    def pack_truth(self, truth: np.ndarray) -> np.ndarray:
        """Lay *truth* out as darknet's ``net->truth``: (B, net.truths) float32.

        *truth* is (B, N, 5) or (B, N*5) of normalised ``x, y, w, h, class``
        (box centre, fractions of the network input -- what
        ``fill_truth_detection`` writes after letterboxing/augmentation),
        zero-padded.  darknet reads ``truth + t*5 + b*l.truths`` and stops at
        the first box whose x == 0, so real boxes must come first and have
        x != 0.  yolo nets hold 90 boxes per image (truths = 450), region nets
        30 (truths = 30*(coords+1))."""
        t = np.asarray(truth, dtype=np.float32)
        if t.ndim == 3:
            t = t.reshape(t.shape[0], -1)
        if t.ndim != 2 or t.shape[0] != self.batch:
            raise ValueError(
                f"truth must be (B={self.batch}, N, 5) or (B, N*5), got {np.shape(truth)}"
            )
        if t.shape[1] > self.truths:
            raise ValueError(f"{t.shape[1]} truth floats per image > net.truths={self.truths}")
        out = np.zeros((self.batch, self.truths), np.float32)
        out[:, : t.shape[1]] = t
        return out

    def train_deltas(
        self, x: np.ndarray, truth: np.ndarray, seen: int = 0, layers_train: bool = True
    ) -> list[np.ndarray | None]:
        """Training-mode forward (no backward, no update) and the loss deltas.

        Copies *x* (B, 3, H, W) into ``net->input`` and :meth:`pack_truth`
        (*truth*) into ``net->truth`` (as ``train_network``'s
        ``get_next_batch`` does), sets ``*net->seen = seen`` and
        ``net->train = 1`` and runs ``forward_network(net)``.  Note that
        ``train_network_datum`` increments ``seen`` by the batch *before* the
        forward, so the k-th (1-based) batch of training sees ``k*batch``.

        Returns, per layer, ``l.delta`` as (B, out_c, out_h, out_w) for
        yolo/region/detection layers and None for every other layer.  darknet's
        delta is the *negative* gradient of its loss w.r.t. the layer's
        output/input (e.g. ``1 - sigmoid`` for a positive objectness).  The
        layers' ``*l.cost`` (= sum of squared deltas) are stored in
        ``self.last_costs`` ({layer: cost}, also :meth:`layer_costs`) and
        ``*net->cost`` (their mean) in ``self.last_net_cost``.

        *layers_train*: True (default) is darknet's real training forward --
        BN uses batch statistics and updates its rolling mean/variance, dropout
        is active.  False runs every non-loss layer in test mode (BN with
        rolling statistics; nothing but outputs/deltas is mutated) and only the
        loss layers with ``train = 1``, which is handy to compare the loss
        alone against a model in eval mode.
        """
        x = self._check_input(x)
        t = self.pack_truth(truth)
        lib = _lib()
        cost = lib.dks_train_forward(
            self._handle(), _fptr(x), _fptr(t), int(seen), 0 if layers_train else 1
        )
        self._forwarded = True
        self.last_net_cost = float(cost)
        res: list[np.ndarray | None] = []
        self.last_costs = {}
        for i, d in enumerate(self._infos):
            if d["type"] in _LOSS_TYPES:
                res.append(self.delta(i))
                self.last_costs[i] = self._cost(i)
            else:
                res.append(None)
        return res

    def layer_costs(self) -> dict[int, float]:
        """``*l.cost`` of the yolo/region layers after the last
        :meth:`train_deltas` ({layer index: cost})."""
        return dict(self.last_costs)

    def resize(self, w: int, h: int) -> None:
        """darknet's ``resize_network(net, w, h)`` (the multi-scale training
        path).  darknet aborts the process for layer types it cannot resize
        (connected, dropout, softmax...), so those are refused here."""
        ok = {
            "convolutional",
            "crop",
            "maxpool",
            "region",
            "yolo",
            "route",
            "shortcut",
            "upsample",
            "reorg",
            "avgpool",
            "normalization",
            "cost",
        }
        for i, d in enumerate(self._infos):
            if d["type"] not in ok:
                raise ValueError(f"darknet cannot resize layer {i} ({d['type']})")
            if d["type"] == "avgpool":
                break
        _lib().dks_resize(self._handle(), int(w), int(h))
        self._forwarded = False
        self._refresh()

    def __repr__(self) -> str:
        state = "closed" if not self._net else f"{self.n_layers} layers"
        return f"DarknetNet({str(getattr(self, 'cfg', '?'))!r}, batch={getattr(self, 'batch', '?')}, {state})"


# --------------------------------------------------------------------------
# darknet's image helpers
# --------------------------------------------------------------------------


def darknet_load_image(path: str | Path) -> np.ndarray:
    """darknet's ``load_image_color(path, 0, 0)`` (OpenCV imread in this
    build): float32 (3, H, W) RGB in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    lib = _lib()
    w, h = ctypes.c_int(), ctypes.c_int()
    lib.dks_load_image(str(path).encode(), None, 0, ctypes.byref(w), ctypes.byref(h))
    a = np.empty((3, h.value, w.value), np.float32)
    lib.dks_load_image(str(path).encode(), _fptr(a), a.size, ctypes.byref(w), ctypes.byref(h))
    return a


def _chw(img: np.ndarray) -> np.ndarray:
    img = np.ascontiguousarray(img, dtype=np.float32)
    if img.ndim != 3:
        raise ValueError("image must be (C, H, W)")
    return img


def darknet_letterbox(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's ``letterbox_image(im, w, h)`` on a float32 (C, H, W) image:
    aspect-preserving ``resize_image`` + 0.5 padding, centred."""
    img = _chw(img)
    c, ih, iw = img.shape
    out = np.empty((c, h, w), np.float32)
    _lib().dks_letterbox(_fptr(img), iw, ih, c, int(w), int(h), _fptr(out))
    return out


def darknet_resize_image(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """darknet's bilinear ``resize_image(im, w, h)`` on a float32 (C, H, W) image."""
    img = _chw(img)
    c, ih, iw = img.shape
    out = np.empty((c, h, w), np.float32)
    _lib().dks_resize_image(_fptr(img), iw, ih, c, int(w), int(h), _fptr(out))
    return out
