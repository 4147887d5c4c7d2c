"""cfg lexing, parsing, writing, and the errors a bad cfg gets."""

from __future__ import annotations

import warnings

import pytest
from conftest import DARKNET_CFG, REPO

from detkit.cfg import parse_cfg, parse_cfg_text, write_cfg
from detkit.errors import CfgError, CfgWarning
from detkit.model import model_from_text

NET = "[net]\nwidth=64\nheight=64\nchannels=3\n"


def test_lexing_strips_whitespace_comments_and_keeps_first_key():
    text = "[net]\n  wid th = 4 16\n# comment\n; other\n\nheight=32\nheight=64\n[CONV]\nfilters=8\n"
    net, conv = parse_cfg_text(text, "x.cfg")
    assert net.get_int("width") == 416
    assert net.get_int("height") == 32
    assert net.options["height"][1] == 6
    assert conv.kind == "convolutional" and conv.line == 8 and conv.index == 0


@pytest.mark.parametrize("alias,kind", [("conv", "convolutional"), ("max", "maxpool"),
                                        ("avg", "avgpool"), ("conn", "connected"),
                                        ("soft", "softmax"), ("network", "net")])
def test_section_aliases(alias, kind):
    text = f"[{alias}]\n" if alias == "network" else f"[net]\n[{alias}]\n"
    assert parse_cfg_text(text)[-1].kind == kind


def parseable(paths):
    """Cfgs the parser reads (all of darknet's: it reads [rnn] and [local] too; building them fails)."""
    good = []
    for path in paths:
        try:
            parse_cfg(path)
            good.append(path)
        except CfgError:
            pass
    return good


@pytest.mark.parametrize("path", parseable(sorted(DARKNET_CFG.glob("*.cfg")) + sorted((REPO / "cfg").glob("*.cfg"))),
                         ids=lambda p: p.name)
def test_round_trip(path):
    sections = parse_cfg(path)
    again = parse_cfg_text(write_cfg(sections))
    assert [(s.kind, {k: v for k, (v, _) in s.options.items()}) for s in sections] == \
           [(s.kind, {k: v for k, (v, _) in s.options.items()}) for s in again]


def build(text: str):
    return model_from_text(NET + text, "bad.cfg")


@pytest.mark.parametrize("body,message", [
    ("[bogus]\n", "bad.cfg:5: unknown section [bogus]"),
    ("[local]\n", "bad.cfg:5: section [local] is not supported"),
    ("[convolutional]\nfilters\n", "bad.cfg:6: malformed line 'filters'"),
    ("[convolutional]\nfilters=eight\n", "bad.cfg:6: [convolutional] 'filters=eight' is not an integer"),
    ("[convolutional]\nfilters=4\n[route]\nlayers=-3\n", "bad.cfg:8: [route] 'layers' refers to layer -3"),
    ("[convolutional]\nfilters=4\n[shortcut]\nfrom=5\n", "bad.cfg:8: [shortcut] 'from' refers to layer 5"),
    ("[convolutional]\nfilters=20\n[yolo]\nclasses=2\nnum=3\nmask=0,1,2\nanchors=1,1,2,2,3,3\n",
     "bad.cfg:8: [yolo] the previous layer has 20 filters but len(mask)*(classes+5) = 3*(2+5) = 21"),
    ("[convolutional]\nfilters=20\n[region]\nclasses=2\nnum=2\nanchors=1,1,2,2\n",
     "bad.cfg:8: [region] the previous layer has 20 filters but num*(classes+coords+1) = 2*(2+4+1) = 14"),
    ("[convolutional]\nfilters=14\n[region]\nclasses=2\nnum=2\nanchors=1,1,2,2\ntree=x.tree\n",
     "softmax tree (yolo9000) is not supported"),
    ("[convolutional]\nfilters=4\nactivation=sparkle\n", "activation 'sparkle' is not supported"),
    ("[convolutional]\nfilters=21\n[yolo]\nclasses=2\nnum=3\nmask=0,1,2\nanchors=1,1,2,2\n",
     "num=3 but only 2 anchor pairs are given"),
])
def test_bad_cfg_errors_name_file_and_line(body, message):
    with pytest.raises(CfgError) as info:
        build(body)
    assert message in str(info.value)


def test_cfg_must_start_with_net():
    with pytest.raises(CfgError, match="x.cfg:1: the first section must be"):
        parse_cfg_text("[convolutional]\nfilters=1\n", "x.cfg")


def test_missing_cfg_file(tmp_path):
    with pytest.raises(CfgError, match="cfg file not found"):
        parse_cfg(tmp_path / "nope.cfg")


def test_unused_keys_warn_once_each():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build("[convolutional]\nfilters=4\nsparkle=1\nglitter=2\n")
    messages = [str(w.message) for w in caught if issubclass(w.category, CfgWarning)]
    assert messages == ["bad.cfg:7: unused field 'sparkle = 1' in [convolutional]",
                        "bad.cfg:8: unused field 'glitter = 2' in [convolutional]"]


def test_darknet_cfgs_raise_no_unused_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("yolov3", "yolov2-voc", "yolov3-tiny", "darknet53"):
            parse_and_build = model_from_text((DARKNET_CFG / f"{name}.cfg").read_text(), name)
            assert parse_and_build.layers
    assert not [w for w in caught if issubclass(w.category, CfgWarning)]


def test_augmentation_keys_detkit_trains_with_are_read_and_the_others_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_from_text(NET + "mosaic=1\nrandom_scale=0.3\nrot90=1\nmixup=1\ncutmix=1\n"
                        "[convolutional]\nfilters=4\n", "aug.cfg")
    messages = [str(w.message) for w in caught if issubclass(w.category, CfgWarning)]
    assert messages == ["aug.cfg:8: unused field 'mixup = 1' in [net]",
                        "aug.cfg:9: unused field 'cutmix = 1' in [net]"]


def test_the_registry_builds_darknet_sections_and_names_detkit_extensions():
    import detkit.model  # noqa: F401  (registers every builder)
    from detkit.cfg import DARKNET_SECTIONS
    from detkit.registry import builders, extension_sections

    table = builders()
    assert extension_sections() == {"l2norm", "ssd"}
    assert set(table) - extension_sections() <= DARKNET_SECTIONS
    assert not extension_sections() & DARKNET_SECTIONS
    assert {"convolutional", "route", "shortcut", "yolo", "region", "ssd"} <= set(table)


def test_a_section_kind_has_one_builder():
    import detkit.model  # noqa: F401
    from detkit.registry import RegistryError, register

    class Impostor:
        pass

    with pytest.raises(RegistryError, match=r"\[yolo\] is already built by YoloHead"):
        register("yolo")(Impostor)


def test_the_parser_reads_any_section_name_and_the_model_rejects_it():
    sections = parse_cfg_text(NET + "[bogus]\n[local]\n", "x.cfg")
    assert [s.kind for s in sections] == ["net", "bogus", "local"]
    with pytest.raises(CfgError, match=r"x.cfg:5: unknown section \[bogus\]"):
        model_from_text(NET + "[bogus]\n[local]\n", "x.cfg")
