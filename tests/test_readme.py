"""The README's examples, run as a user runs them.

Every `$ detkit ...` example of the README (a plain fenced block: the command, then its output) is
run for real, in a subprocess, and the key lines of its output are compared with the README's:
the detections of each photo (not the milliseconds), the counts, the layer table, the anchors.
The expected text is read from the README itself, so a refreshed output needs no change here,
and `test_every_example_is_run` fails when an example is added that no test runs. Commands in
```sh blocks and inline ones (`detkit ...` in backquotes) are checked against the command's
--help: every option they use exists. Training for minutes is replaced by the same command with
`--max-batches 2 --batch 4`, whose checkpoint then runs the README's eval and tile examples.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PHOTOS = REPO / "assets" / "photos"
DARKNET_DATA = Path("/usr/share/darknet/data")
TINY_WEIGHTS = REPO / "weights" / "yolov3-tiny.weights"
TREES = REPO / "data" / "trees" / "trees.data"
REQUIRE_REFERENCE = os.environ.get("DETKIT_REQUIRE_REFERENCE") == "1"
TIMING = re.compile(r"\s*\([\d.]+ ms\)$")


@dataclass
class Example:
    """One `$ detkit ...` example: its arguments (after `detkit`) and the output shown."""
    line: int
    args: list[str]
    output: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return self.args[0]


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(info string, line number of the first content line, lines) of each fenced block."""
    blocks, info, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if info is None:
                info, start, body = line[3:].strip(), number + 1, []
            else:
                blocks.append((info, start, body))
                info = None
        elif info is not None:
            body.append(line)
    assert info is None, "README: a fenced block is not closed"
    return blocks


def join_continued(lines: list[str], first: int) -> tuple[str, int]:
    """The command starting at lines[first], backslash continuations joined; the next index."""
    text, index = lines[first], first + 1
    while text.endswith("\\") and index < len(lines):
        text, index = text[:-1] + " " + lines[index].strip(), index + 1
    return text, index


def dollar_examples(text: str) -> list[Example]:
    examples = []
    for info, start, body in fenced_blocks(text):
        if info:
            continue
        index = 0
        while index < len(body):
            if not body[index].startswith("$ "):
                if examples and examples[-1].line >= start:
                    examples[-1].output.append(body[index])
                index += 1
                continue
            command, nxt = join_continued(body, index)
            words = shlex.split(command[2:])
            if words and words[0] == "detkit":
                examples.append(Example(start + index, words[1:]))
            index = nxt
    return examples


def shell_commands(text: str) -> list[list[str]]:
    """The commands of ```sh blocks (comments dropped), split into words."""
    commands = []
    for info, _, body in fenced_blocks(text):
        if info not in ("sh", "bash", "shell"):
            continue
        index = 0
        while index < len(body):
            command, index = join_continued(body, index)
            words = shlex.split(command, comments=True)
            if words:
                commands.append(words)
    return commands


def inline_commands(text: str) -> list[list[str]]:
    return [shlex.split(code) for code in re.findall(r"(?<!`)`(detkit [^`]+)`(?!`)", text)]


TEXT = README.read_text(encoding="utf-8")
EXAMPLES = dollar_examples(TEXT)


def example(command: str, *having: str) -> Example:
    """The one README example of `command` whose arguments include all of `having`."""
    found = [e for e in EXAMPLES if e.command == command and all(h in e.args for h in having)]
    assert len(found) == 1, f"README: {len(found)} `$ detkit {command}` examples with {having}"
    return found[0]


# Each README example and the test that runs it (test_every_example_is_run checks the list).
RUN = {
    ("detect", "assets/photos/dog.jpg"): "test_detect_first_screen",
    ("detect", "--tile"): "test_train_eval_and_tile_examples",
    ("eval",): "test_train_eval_and_tile_examples",
    ("benchmark", "--no-fps"): "test_benchmark_layer_table",
    ("export",): "test_export",
    ("anchors",): "test_anchors",
    ("convert",): "test_convert",
}


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """`args` with `option` set to `value` (replaced where given, else added)."""
    args = list(args)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


def detkit(args: list[str], cwd: Path = REPO, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "COLUMNS": "200"}
    env.pop("DISPLAY", None)
    run = subprocess.run([sys.executable, "-m", "detkit", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, \
        f"detkit {shlex.join(args)}: exit {run.returncode}\n{run.stderr[-3000:]}"
    return run


def lines_of(run: subprocess.CompletedProcess) -> list[str]:
    return [line.rstrip() for line in run.stdout.splitlines()]


def need(path: Path, how: str) -> Path:
    if not path.exists():
        if REQUIRE_REFERENCE:
            pytest.fail(f"{path} missing: {how}")
        pytest.skip(f"{path} missing ({how})")
    return path


def photo(name: str) -> Path:
    """A darknet sample photo: `make photos` puts them in assets/photos; the reference darknet's
    copies (the same bytes, md5 checked by the Makefile) do as well."""
    if (PHOTOS / name).is_file():
        return PHOTOS / name
    return need(DARKNET_DATA / name, "make photos")


def detections(lines: list[str]) -> list[str]:
    """The per-image lines (`dog.jpg: car 0.62 ...`) without their timing."""
    return [TIMING.sub("", line) for line in lines if re.match(r"^\S+\.(jpg|png): ", line)]


# The README shows this machine's default precision (bf16 where the CPU has it, fp32 elsewhere):
# scores agree within the bf16 guard's tolerance, and a box may cross the 0.25 threshold by it.
SCORE_TOL, CONF = 0.05, 0.25


def parsed(lines: list[str]) -> list[tuple[str, list[tuple[str, float]]]]:
    """Per image line: the image name and its (class, score) pairs."""
    out = []
    for line in detections(lines):
        name, _, rest = line.partition(": ")
        pairs, words = [], []
        for word in rest.split():     # class names may have spaces: "traffic light 0.41"
            if re.fullmatch(r"\d\.\d+", word):
                pairs.append((" ".join(words), float(word)))
                words = []
            else:
                words.append(word)
        out.append((name, pairs))
    return out


def unmatched(want: list[tuple[str, float]], got: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Pairs of `want` clear of the threshold band that no pair of `got` matches (same class,
    score within SCORE_TOL, each used once)."""
    free = list(got)
    missing = []
    for cls, score in sorted(want, key=lambda pair: -pair[1]):
        twin = next((g for g in free if g[0] == cls and abs(g[1] - score) <= SCORE_TOL), None)
        if twin is not None:
            free.remove(twin)
        elif score >= CONF + SCORE_TOL:
            missing.append((cls, score))
    return missing


def assert_same_detections(lines: list[str], shown: list[str]) -> None:
    """The README's detections again: same images in order, every box clear of the threshold
    band found both ways within the score tolerance (exact text on the README's own machine)."""
    got, want = parsed(lines), parsed(shown)
    assert [name for name, _ in got] == [name for name, _ in want], (lines, shown)
    for (name, got_pairs), (_, want_pairs) in zip(got, want, strict=True):
        assert not unmatched(want_pairs, got_pairs), (name, "lost", want_pairs, got_pairs)
        assert not unmatched(got_pairs, want_pairs), (name, "added", want_pairs, got_pairs)


def done_counts(lines: list[str]) -> str:
    """`done: 1 image, 0 video frames, 6 detections` of the closing line (no latency)."""
    done = [line for line in lines if line.startswith("done: ")]
    assert len(done) == 1, lines
    return done[0].split(";")[0]


# ---------------------------------------------------------------------------- the README itself

def test_every_example_is_run():
    assert EXAMPLES, "README: no `$ detkit` example found"
    covered = {id(example(key[0], *key[1:])) for key in RUN}
    unrun = [f"line {e.line}: detkit {shlex.join(e.args)}"
             for e in EXAMPLES if id(e) not in covered]
    assert not unrun, f"README examples no test runs (add them to RUN): {unrun}"
    names = {name for name in globals() if name.startswith("test_")}
    assert set(RUN.values()) <= names


def test_every_command_uses_options_that_exist():
    from typer.testing import CliRunner

    import detkit.cli

    commands = ([["detkit", *e.args] for e in EXAMPLES] + inline_commands(TEXT)
                + [words for words in shell_commands(TEXT) if words[0] == "detkit"])
    assert len(commands) >= 10, commands
    helps: dict[str, str] = {}
    for words in commands:
        if len(words) < 2 or words[1].startswith("-"):      # `detkit --help`
            continue
        sub = words[1]
        if sub not in helps:
            result = CliRunner().invoke(detkit.cli.app, [sub, "--help"], env={"COLUMNS": "200"})
            assert result.exit_code == 0, f"detkit {sub}: {result.output}"
            helps[sub] = result.output
        for word in words[2:]:
            if word.startswith("--"):
                option = word.split("=")[0]
                assert re.search(rf"(^|[\s/]){re.escape(option)}([\s/,]|$)", helps[sub], re.M), \
                    f"README: `{shlex.join(words)}`: detkit {sub} has no {option}"


def test_make_targets_exist():
    """The make commands the README gives (make demo, make test, ...) are Makefile targets, and
    `make test` stays the test command (CI runs it)."""
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+):", makefile, re.M))
    used = {word for words in shell_commands(TEXT) if words[0] == "make" for word in words[1:]}
    used |= {t for code in re.findall(r"`make ([\w -]+)`", TEXT) for t in code.split()}
    assert {"demo", "test", "install", "photos"} <= used
    assert used <= targets, f"README names make targets the Makefile lacks: {used - targets}"
    demo = re.search(r"^demo:(.*)$", makefile, re.M).group(1).split()
    assert "darknet" not in demo, "make demo must not need the reference darknet"


# ---------------------------------------------------------------------------- detect

@pytest.mark.slow
def test_detect_first_screen(tmp_path, tiny_weights):
    """`detkit detect assets/photos/dog.jpg`, run from another folder (the default cfg and weights
    are the checkout's): the same detections, and the result in the folder the README names."""
    shown = example("detect", "assets/photos/dog.jpg")
    args = [str(photo("dog.jpg")) if a == "assets/photos/dog.jpg" else a for a in shown.args]
    lines = lines_of(detkit(args, cwd=tmp_path))
    assert_same_detections(lines, shown.output)
    assert done_counts(lines).split(",")[0] == done_counts(shown.output).split(",")[0]
    saved = [line for line in shown.output if line.startswith("results saved to ")]
    assert saved and saved[0] in lines
    folder = tmp_path / saved[0].removeprefix("results saved to ")
    assert (folder / "dog.jpg").is_file()


@pytest.mark.slow
def test_make_demo_photos(tmp_path, tiny_weights):
    """The photo part of `make demo` (the Makefile's own command, another --out): the detections
    the README shows for each photo, in the same order."""
    block = next(body for info, _, body in fenced_blocks(TEXT) if not info
                 and any(line.startswith("results saved to runs/demo/photos") for line in body))
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M).group(1)
    assert "--out runs/demo/photos" in recipe
    names = [line.split(":")[0] for line in detections(block)]
    assert names == ["dog.jpg", "horses.jpg", "person.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg"]
    photos = [str(photo(name)) for name in names]
    lines = lines_of(detkit(["detect", *photos, "--out", str(tmp_path / "photos")]))
    assert_same_detections(lines, block)
    assert done_counts(lines).split(",")[0] == done_counts(block).split(",")[0]


# ---------------------------------------------------------------------------- train, eval, tiles

@pytest.mark.slow
def test_train_eval_and_tile_examples(tmp_path, tiny_weights):
    """The README's train command, cut to 2 iterations of 4 tiles (it trains for 26 minutes
    here), writes the run folder the README describes; its best.pt then runs the README's eval
    example (the data set's counts as shown; the scores are the full run's) and its tile example."""
    need(TREES, "make trees")
    train = [w for w in shell_commands(TEXT) if w[:2] == ["detkit", "train"]]
    assert len(train) == 1, train
    args = train[0][1:]
    run_dir = args[args.index("--out") + 1]
    shown_eval, shown_tile = example("eval"), example("detect", "--tile")
    for shown in (shown_eval, shown_tile):     # train and eval walk through the same folder
        assert shown.args[shown.args.index("--weights") + 1] == f"{run_dir}/best.pt"
    out = tmp_path / "trees"
    args = with_option(with_option(with_option(args, "--out", str(out)), "--max-batches", "2"),
                       "--batch", "4") + ["--quiet"]
    detkit(args)
    readme = TEXT[TEXT.index("The run folder gets"):TEXT.index("### eval")]
    named = re.findall(r"`([\w.]+\.(?:pt|weights|csv|png|jpg))`", readme)
    assert {"last.pt", "best.pt", "metrics.csv"} <= set(named), named
    missing = [name for name in named if not (out / name).is_file()]
    assert not missing, f"files the README names are missing from the run folder: {missing}"

    best = str(out / "best.pt")
    lines = lines_of(detkit(with_option(shown_eval.args, "--weights", best)))
    counts = re.match(r"\d+ images, \d+ boxes", shown_eval.output[0]).group(0)
    assert any(line.startswith(counts) for line in lines), (counts, lines)
    assert any(line.startswith("mAP@0.5") or "AP50" in line for line in lines)

    args = with_option(shown_tile.args, "--weights", best)
    args = with_option(args, "--out", str(tmp_path / "tile"))
    lines = lines_of(detkit(args))
    image = Path(shown_tile.args[1]).name
    assert [line.split(":")[0] for line in detections(lines)] == [image]
    assert done_counts(lines).startswith("done: 1 image, 0 video frames, ")


# ---------------------------------------------------------------------------- the other commands

def test_benchmark_layer_table():
    """Every line of the README's table (the rows shown around `...`) and the totals."""
    shown = example("benchmark", "--no-fps")
    lines = lines_of(detkit(shown.args))
    expected = [line.rstrip() for line in shown.output if line.strip() != "..."]
    missing = [line for line in expected if line not in lines]
    assert not missing, missing


def test_anchors():
    need(TREES, "make trees")
    shown = example("anchors")
    assert lines_of(detkit(shown.args))[-3:] == [line.rstrip() for line in shown.output]


@pytest.mark.slow
def test_export(tmp_path, tiny_weights):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    shown = example("export")
    args = [str(REPO / a) if a.startswith(("cfg/", "weights/")) else a for a in shown.args]
    lines = lines_of(detkit(args, cwd=tmp_path))
    assert shown.output[0] in lines                   # the file, opset, input and output shapes
    assert any(line.startswith("onnxruntime vs PyTorch: max abs diff ") for line in lines)
    assert (tmp_path / shown.args[shown.args.index("--out") + 1]).is_file()


@pytest.mark.slow
def test_convert(tmp_path):
    """A torchvision ssd300_vgg16 state dict (untrained: no weights can be fetched) under the
    README's file name, converted by the README's command."""
    import torch
    from torchvision.models.detection import ssd300_vgg16

    shown = example("convert")
    source = shown.args[2]
    torch.save(ssd300_vgg16(weights=None, weights_backbone=None).state_dict(), tmp_path / source)
    args = [str(REPO / a) if a.startswith("cfg/") else a for a in shown.args]
    lines = lines_of(detkit(args, cwd=tmp_path))
    assert shown.output[0] in lines
    assert (tmp_path / shown.args[shown.args.index("--out") + 1]).stat().st_size > 0


def test_examples_have_outputs():
    """Each `$` example shows output, and none shows a placeholder."""
    for e in EXAMPLES:
        assert e.output and e.output[0].strip(), f"README line {e.line}: no output shown"
        assert not any(re.search(r"TODO|TBD|XXX|<[a-z ]+>", line) for line in e.output), e.output


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of the README and docs/ names a file that exists and, with #anchor, a
    heading of that file."""
    pages = [README, *sorted((REPO / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                if anchor not in {slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken
