"""Help pages that read like a normal command line (issue 25).

Typer derives usage lines and value placeholders from the Python annotations, which shows
users `{sources}...`, `<list[str]>` or `--conf <float>`. Every detkit command is built with
`PlainHelpCommand` instead, which writes `Usage: detkit detect [OPTIONS] SOURCE...` and
`--conf <score>`: arguments in capitals, option values named by what they mean. The names are
kept here, in one table, so a new option gets a sensible placeholder without repeating
`metavar=` in every signature.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand

# Option value placeholders by parameter name (the Python name), then by (command, name).
OPTION_METAVARS: dict[str, str] = {
    "cfg": "<file>", "weights": "<file>", "names": "<file>", "save_json": "<file>",
    "json_out": "<file>", "plot": "<file>", "out": "<file>", "data": "<dataset>", "val": "<dataset>",
    "resume": "<dir>", "device": "<device>", "img_size": "<size>", "classes": "<ids>",
    "conf": "<score>", "nms": "<iou>", "iou": "<iou>", "tile_overlap": "<share>",
    "tile": "<pixels>", "eval_tile": "<pixels>", "stride": "<pixels>", "lr": "<rate>",
    "ema": "<decay>", "split": "<name>", "backend": "<name>", "format": "<name>",
    "optimizer": "<name>", "amp": "<mode>", "precision": "<precision>",
}
ARGUMENT_METAVARS: dict[str, str] = {"sources": "SOURCE"}
COMMAND_METAVARS: dict[tuple[str, str], str] = {
    ("detect", "out"): "<dir>", ("train", "out"): "<dir>", ("benchmark", "batch"): "<sizes>",
}


def option_metavar(command: str, name: str, kind: type | None) -> str:
    """The placeholder of one option's value: the tables above, else by the value's type."""
    label = COMMAND_METAVARS.get((command, name)) or OPTION_METAVARS.get(name)
    if label:
        return label
    if kind is int:
        return "<n>"
    if kind is float:
        return "<number>"
    return f"<{name.replace('_', '-')}>"


def _value_type(param: Any) -> type | None:
    """int, float or None: from typer's type descriptor (>= 0.2x), else from the click type."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        annotation = descriptor.annotation
        return annotation if annotation in (int, float) else None
    kind = getattr(getattr(param, "type", None), "name", "")
    return {"integer": int, "float": float}.get(kind)


def argument_label(param: Any) -> str:
    """An argument as usage lines write it: SOURCE..., CFG, [OUT] when optional."""
    label = param.metavar or ARGUMENT_METAVARS.get(param.name, param.name.upper())
    if param.nargs != 1:
        label += "..."
    return label if param.required else f"[{label}]"


def _is_choice(param: Any) -> bool:
    """Choices keep typer's own `<fp32|fp16>` placeholder, which lists them."""
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.2x; click types before
    if descriptor is not None:
        return bool(descriptor.is_choice)
    return bool(getattr(getattr(param, "type", None), "choices", None))


class PlainHelpCommand(TyperCommand):
    """A typer command whose usage line and help rows carry no Python types."""

    def __init__(self, name: str | None, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        for param in self.params:
            if param.metavar is not None:
                continue
            if param.param_type_name == "argument":
                param.metavar = argument_label(param).strip("[]").removesuffix("...")
            elif not getattr(param, "is_flag", False) and not _is_choice(param):
                param.metavar = option_metavar(name or "", param.name or "", _value_type(param))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [argument_label(p) for p in self.get_params(ctx)
                         if p.param_type_name == "argument"]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((argument_label(param).strip("[]"), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def use_plain_help(app: Any) -> None:
    """Build every command of `app` registered so far with PlainHelpCommand."""
    for command in app.registered_commands:
        if command.cls in (None, TyperCommand):  # typer's default; a chosen class is kept
            command.cls = PlainHelpCommand
