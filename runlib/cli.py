"""The command line of a settings dataclass: one-line errors that name the flag a typo meant, no abbreviations, and
the dataclass's fields as flags (help texts from the fields' trailing comments)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import json
import math
import re
import shlex
import shutil
import textwrap
from pathlib import Path

from runlib.checkpoints import load_checkpoint, resolve_checkpoint
from runlib.errors import CheckpointError, ConfigError
from runlib.runs import valid_run_name


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (its usage of some 25 flags would bury the message), that names the flag a
    mistyped one was probably meant to be, and takes no abbreviations: --num-iteration 5 is a mistake, not
    --num-iterations."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        hint = "" if " is --set " in message else self.did_you_mean(message)  # SettingsCLI.unknown said it
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")

    def did_you_mean(self, message: str) -> str:
        """"; did you mean --x?" for the first unrecognised flag of an argparse message that is close to one."""
        words = re.findall(r"(?<![\w-])--?[\w-]+", message.partition("unrecognized arguments:")[2])
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        for word in words:
            close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)
            if close:
                return f"; did you mean {close[0]}?"
        return ""


def help_width() -> int:
    return shutil.get_terminal_size().columns - 2  # argparse's own rule


def shell_word(value) -> str:
    """A value as --set reads it back: true/false, none for no value."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


class SettingsCLI:
    """The fields of a settings dataclass as command-line words. The fields in `flags` have a flag of their own
    (--field-name; the `switches`, booleans, a flag that turns their default around), every other one is set with
    --set FIELD=VALUE, so that each field has one spelling. Help texts are the fields' trailing comments."""

    KIND_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
                  "str | None": "text, or none"}

    def __init__(self, cls, flags: tuple[str, ...], switches: dict[str, str]):
        self.cls, self.flags, self.switches = cls, flags, switches

    def field_help(self) -> dict[str, str]:
        helps = {}
        try:
            src = inspect.getsource(self.cls)
        except (OSError, TypeError):
            return helps
        for line in src.splitlines():
            m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
            if m:
                helps[m.group(1)] = m.group(2)
        return helps

    def kind(self, name: str) -> str:
        """A field's type as the dataclass spells it: int, float, bool, str or str | None."""
        t = next(f for f in dataclasses.fields(self.cls) if f.name == name).type
        return t if isinstance(t, str) else getattr(t, "__name__", str(t))

    def set_fields(self) -> list[str]:
        """The fields --set takes: those without a flag of their own."""
        return [f.name for f in dataclasses.fields(self.cls) if f.name not in self.flags]

    def field_flag(self, name: str) -> str:
        """How the command line sets a field: its flag, or --set NAME=VALUE."""
        if name in self.flags:
            return self.switches.get(name, "--" + name.replace("_", "-"))
        return f"--set {name}=VALUE"

    def spelled(self, name: str) -> str:
        """A setting as messages name it: --flag-name, or --set name."""
        return f"--{name.replace('_', '-')}" if name in self.flags else f"--set {name}"

    def parse_value(self, name: str, text: str):
        """TEXT as a value of the field NAME: int, float, str, bool (true/false) or optional str (none: no value)."""
        kind = self.kind(name)
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if kind == "bool":
                return {"true": True, "false": False}[text.lower()]
            if kind == "str | None":
                return None if text.lower() == "none" else text
            if kind == "str":
                return text
        except (ValueError, KeyError):
            raise ConfigError(f"--set {name}={text}: {name} takes {self.KIND_WORDS[kind]}, got {text!r}") from None
        raise ConfigError(f"--set {name}: a field of type {kind} cannot be set from the command line")

    def set_values(self, pairs: list[str]) -> dict:
        """The --set FIELD=VALUE pairs as field values (a field given twice: the last one)."""
        settable, values = self.set_fields(), {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep:
                raise ConfigError(f"--set {pair}: expected FIELD=VALUE, e.g. --set model_dim=64")
            if name in self.flags:
                raise ConfigError(f"--set {pair}: {name} has a flag of its own, {self.field_flag(name)}")
            if name not in settable:
                close = difflib.get_close_matches(name.replace("-", "_"), settable, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"--set {pair}: no field {name!r}{hint}; --set takes {', '.join(settable)}")
            values[name] = self.parse_value(name, text)
        return values

    def epilog(self, defaults, default_preset: str, helps: dict[str, str]) -> str:
        """--help's table of the --set fields: name, default, meaning (wrapped like argparse's own help)."""
        names = self.set_fields()
        words = {name: shell_word(getattr(defaults, name)) for name in names}
        w1, w2 = max(map(len, names)), max(map(len, words.values()))
        width = max(help_width(), w1 + w2 + 40)
        lines = [textwrap.fill(f"--set FIELD=VALUE (repeatable) sets a field without a flag of its own (VALUE: a "
                               f"number, text, true/false, or none). The fields, their {default_preset} defaults "
                               "and meanings:", width)]
        for name in names:
            lines.append(textwrap.fill(helps.get(name, ""), width,
                                       initial_indent=f"  {name:<{w1}}  {words[name]:<{w2}}  ",
                                       subsequent_indent=" " * (w1 + w2 + 6)))
        return "\n".join(lines)

    def add_flags(self, parser: argparse.ArgumentParser, defaults, default_preset: str, helps: dict[str, str],
                  skip: tuple[str, ...] = ()) -> None:
        """One flag per field in `flags` (but `skip`), typed by the field, its help the field's comment."""
        for f in dataclasses.fields(self.cls):
            if f.name not in self.flags or f.name in skip:
                continue
            if f.name in self.switches:  # each turns its field's usual default around
                on = getattr(self.cls(), f.name) is False
                parser.add_argument(self.switches[f.name], dest=f.name, action="store_true" if on else "store_false",
                                    help=helps.get(f.name, "") if on else f"do not {helps.get(f.name, '')}")
                continue
            kind = {"int": int, "float": float, "str": str, "str | None": str}[self.kind(f.name)]
            parser.add_argument(self.field_flag(f.name), type=kind, metavar=f.name.upper(),
                                help=f"{helps.get(f.name, '')} ({default_preset} default: {getattr(defaults, f.name)})")

    def preset(self, name: str, presets: dict[str, dict]):
        """The settings a preset names: the dataclass's defaults with the preset's values."""
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
        return dataclasses.replace(self.cls(), preset=name, **presets[name])

    def saved(self, ckpt: dict, path: Path):
        """The settings a checkpoint was trained with (fields this version does not know are dropped)."""
        saved = ckpt.get("hyperparameters")
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} holds no hyperparameters; it is not a complete checkpoint of this trainer")
        known = {f.name for f in dataclasses.fields(self.cls)}
        try:
            return self.cls(**{k: v for k, v in saved.items() if k in known})
        except TypeError as e:
            raise CheckpointError(f"{path} holds unusable hyperparameters ({e})") from e

    def parser(self, presets: dict[str, dict], default_preset: str, prog: str, description: str,
               derived: str, examples: str = "") -> argparse.ArgumentParser:
        """--preset, a flag per flag field, --resume, --set and --print-config (which also prints `derived`); after
        the flags, what each preset changes, the --set table and the examples."""
        helps = self.field_help()
        defaults = self.preset(default_preset, presets)
        changes = [textwrap.fill(f"{name}: " + (", ".join(f"{k}={shell_word(v)}" for k, v in values.items())
                                                or "the defaults below"), help_width(), initial_indent="  ",
                                 subsequent_indent="    ") for name, values in presets.items()]
        epilog = "\n".join(["Presets (what each sets; flags and --set values given win):", *changes, "",
                            self.epilog(defaults, default_preset, helps)] + (["", examples] if examples else []))
        parser = OneLineParser(prog=prog, description=textwrap.fill(description, help_width()), epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
        parser.add_argument("--preset", choices=list(presets),
                            help=f"starting values for every setting (default {default_preset}; a resumed run keeps "
                                 "its checkpoint's settings)")
        self.add_flags(parser, defaults, default_preset, helps, skip=("preset", "resume"))
        parser.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                            help=f"continue from a {helps.get('resume', '')} (--resume alone: auto). Settings come "
                                 "from the checkpoint unless given")
        parser.add_argument("--set", action="append", metavar="FIELD=VALUE",
                            help="any other setting, by its field name (repeatable; the list follows)")
        parser.add_argument("--print-config", nargs="?", const="json", choices=["json", "shell"],
                            help=f"print the resolved settings and what follows from them ({derived}), then exit "
                                 "without training: as JSON, or (shell) as NAME=VALUE lines quoted for eval, "
                                 "true/false for switches, empty for none")
        return parser

    def parse(self, parser: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, dict],
              default_preset: str):
        """The settings, and --print-config's form (None: train). They start from the preset or, when resuming, from
        the checkpoint's settings; the flags and --set values given override them."""
        ns, extra = parser.parse_known_args(argv)
        if extra:
            self.unknown(parser, extra)
        given = vars(ns)
        form = given.pop("print_config", None)
        given.update(self.set_values(given.pop("set", [])))
        if "resume" in given:  # the run's own settings; a preset would silently replace them
            path = resolve_checkpoint(given["resume"], given.get("run_name"),
                                      given.get("checkpoint_dir", "checkpoints"))
            ckpt = load_checkpoint(path)
            settings = self.saved(ckpt, path)
            # the run keeps its name (open_run's rule), so that --print-config names the run it continues
            name = settings.run_name or ckpt.get("run_id")
            name = name if isinstance(name, str) and valid_run_name(name) else None
            settings = dataclasses.replace(settings, resume=None, run_name=name)
            if given.get("preset", settings.preset) != settings.preset:
                raise ConfigError(f"--preset {given['preset']} with --resume: {path} was trained with --preset "
                                  f"{settings.preset}, and a resumed run keeps its checkpoint's settings; leave "
                                  "--preset out and give only the settings to change as flags")
        else:
            settings = self.preset(given.get("preset", default_preset), presets)
        return dataclasses.replace(settings, **given), form

    def unknown(self, parser: argparse.ArgumentParser, extra: list[str]) -> None:
        """Words no flag took: one line, saying which --set replaces a field's removed flag."""
        moved = [a for a in extra if a.startswith("--") and a[2:].split("=")[0].replace("-", "_") in self.set_fields()]
        hints = "".join(f"; {a.split('=')[0]} is --set {a[2:].split('=')[0].replace('-', '_')}=VALUE" for a in moved)
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hints}")

    @staticmethod
    def format(settings: dict, derived: dict, form: str = "json") -> str:
        """--print-config's text: JSON ({"settings": ..., "derived": ...}), or for a shell NAME=VALUE lines, each
        value quoted for eval (true/false for switches, empty for none)."""
        if form == "json":
            return json.dumps({"settings": settings, "derived": derived}, indent=2)
        words = {k: "" if v is None else shell_word(v) for k, v in {**settings, **derived}.items()}
        for k, v in words.items():
            if "\n" in v:  # one line per setting is what a reader of the lines may rely on
                raise ConfigError(f"--print-config=shell: {k} holds a newline, which a NAME=VALUE line cannot")
        return "\n".join(f"{k}={shlex.quote(v)}" for k, v in words.items())


def check_fields(settings, rules, spelled) -> list[str]:
    """What is wrong with a settings dataclass, one message each: floats that are not finite, then the values that
    fail a rule, (fields, test, what they must be)."""
    problems, finite = [], {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        finite[f.name] = not isinstance(value, float) or math.isfinite(value)
        if not finite[f.name]:
            problems.append(f"{spelled(f.name)} must be a finite number, got {value}")
    for names, test, must in rules:
        problems += [f"{spelled(n)} must be {must}, got {getattr(settings, n)}" for n in names
                     if finite[n] and not test(getattr(settings, n))]
    return problems


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """--checkpoint PATH or --run NAME, and --checkpoint-dir: how a script that samples or scores chooses the
    checkpoint (checkpoints.resolve_checkpoint's rule)."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", metavar="PATH",
                       help="checkpoint file, or a run directory (its newest step_*.pt) (default: the newest "
                            "checkpoint any run saved, checkpoints/latest)")
    which.add_argument("--run", metavar="NAME", help="the newest checkpoint of this run (checkpoints/NAME/)")
    p.add_argument("--checkpoint-dir", default="checkpoints", metavar="DIR",
                   help="where --run and latest are looked for (default: checkpoints)")
