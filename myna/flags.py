"""Command-line flags derived from where an option is declared: a dataclass field or a function parameter.

The declaration is the one place an option lives: the annotation gives the flag's type, the field's (or the
parameter's) default is the default, and the `# comment` beside it (or the comment lines right above it) is the
help. A flag the user leaves out is absent from the parsed arguments (argparse.SUPPRESS), so `given` returns only
what was asked for and the declared default applies everywhere else, from Python and from the command line alike.

Types: bool -> `--name` (store_true), or `--no-name` when the default is True; `X | bool` with default False ->
`--name` alone means True, `--name VALUE` means VALUE; Literal -> choices; tuple[X, ...] -> a repeatable flag;
frozenset[X] -> comma-separated values; anything else -> the annotation's type (str for str | Path).
"""

import argparse
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

from myna.io import atomic_write

REQUIRED = object()  # the declared default of a field or parameter that has none
MAX_CONFIG_BYTES = 1 << 20  # a --config file: a few dozen settings


def comments(source) -> dict[str, str]:
    """name -> help, from the `# comment`s beside (or right above) a dataclass's fields or a function's parameters."""
    is_class = inspect.isclass(source)
    code = textwrap.dedent(inspect.getsource(source))
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(code).readline) if t.type != tokenize.NL]
    found: dict[str, str] = {}
    above: list[str] = []
    name, depth, prev = None, 0, tokens[0]
    for tok, nxt in zip(tokens, tokens[1:], strict=False):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.line.lstrip().startswith("#"):
                above.append(text)
            elif name:
                found[name] = text
            continue
        if is_class and tok.string == "def":
            break  # the fields come before the methods
        depth += (tok.string in "([{") - (tok.string in ")]}") if tok.type == tokenize.OP else 0
        if tok.type == tokenize.NAME and nxt.string == ":":
            starts_field = is_class and depth == 0 and prev.type in (tokenize.NEWLINE, tokenize.INDENT)
            starts_param = not is_class and depth == 1 and prev.string in ("(", ",")
            if starts_field or starts_param:
                name = tok.string
                if above:
                    found[name] = " ".join(above)
                above = []
        prev = tok
    return found


def declared(source) -> dict[str, tuple[object, object]]:
    """name -> (type, default) of a dataclass's fields or a function's parameters (REQUIRED: no default)."""
    if dataclasses.is_dataclass(source):
        hints = typing.get_type_hints(source)
        return {
            f.name: (
                hints[f.name],
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
            )
            for f in dataclasses.fields(source)
        }
    params = inspect.signature(source, eval_str=True).parameters.values()
    return {
        p.name: (p.annotation, REQUIRED if p.default is p.empty else p.default)
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _dest(source, name: str) -> str:
    return f"{source.__qualname__}:{name}"  # two sources may declare the same name (workers)


def add_flags(
    parser: argparse.ArgumentParser,
    source,
    names: list[str],
    flags: dict[str, str] | None = None,
    defaults=None,
    parse: dict[str, typing.Callable] | None = None,
) -> None:
    """A flag per name of `source` (a dataclass or a function): --name-with-dashes unless `flags` renames it.
    `defaults` (an instance) replaces the declared defaults, `parse` a name's value parser. Required names are
    not required here: `resolve` checks them after a --config file had its say."""
    helps, kinds = comments(source), declared(source)
    for name in names:
        kind, default = kinds[name]
        default = getattr(defaults, name) if defaults is not None else default
        args = typing.get_args(kind)
        if isinstance(kind, types.UnionType) and type(None) in args:
            kind, args = args[0], typing.get_args(args[0])
        help = helps.get(name, "")
        if default not in (REQUIRED, None, ()) and not isinstance(default, bool):
            help += f" (default {','.join(sorted(default)) if isinstance(default, frozenset) else default})"
        option = {
            "dest": _dest(source, name),
            "default": argparse.SUPPRESS,
            "help": help,
            "metavar": name.upper(),
        }
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        if name in (parse or {}):
            option["type"] = parse[name]
        elif kind is bool:
            option.update(
                action="store_false" if default else "store_true", help=("off: " if default else "") + help
            )
            del option["metavar"]
            flag = (flags or {}).get(name, "--no-" + name.replace("_", "-") if default else flag)
        elif isinstance(kind, types.UnionType) and bool in args:
            option.update(nargs="?", const=True, type=next(a for a in args if a is not bool))
        elif typing.get_origin(kind) is typing.Literal:
            option.update(choices=args, type=type(args[0]), metavar=None)
        elif typing.get_origin(kind) is tuple:
            option.update(action="append", type=args[0], help=help + " (repeatable)")
        elif typing.get_origin(kind) is frozenset:
            option["type"] = lambda s: frozenset(x.strip() for x in s.split(","))
        else:
            option["type"] = str if kind in (Path, str | Path) else kind
        parser.add_argument(flag, **option)


def given(args: argparse.Namespace, source) -> dict:
    """The values of `source`'s flags that the command line gave (repeated flags as tuples)."""
    prefix = _dest(source, "")
    return {
        dest[len(prefix) :]: tuple(value) if isinstance(value, list) else value
        for dest, value in vars(args).items()
        if dest.startswith(prefix)
    }


def read_config(path: str | Path) -> dict:
    """A YAML file of settings by name (dashes or underscores), as `write_config` writes them."""
    if (size := Path(path).stat().st_size) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,} a settings file may be")
    settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values")
    return {str(k).replace("-", "_"): v for k, v in settings.items()}


def resolve(args: argparse.Namespace, source, names: list[str], flags: dict[str, str] | None = None) -> dict:
    """Every one of `names`: the flag when given, else the --config file's value, else the declared default."""
    kinds = declared(source)
    from_file = read_config(args.config) if getattr(args, "config", None) else {}
    renamed = {flag.lstrip("-").replace("-", "_"): name for name, flag in (flags or {}).items()}
    from_file = {renamed.get(key, key): value for key, value in from_file.items()}  # --data: data_dir
    if unknown := set(from_file) - set(names):
        raise ValueError(f"{args.config}: unknown setting(s) {', '.join(sorted(unknown))}")
    settings = {name: kinds[name][1] for name in names} | from_file | given(args, source)
    if missing := [name for name, value in settings.items() if value is REQUIRED]:
        flag = {name: (flags or {}).get(name, "--" + name.replace("_", "-")) for name in missing}
        raise ValueError("missing " + ", ".join(flag.values()) + " (or the same name in --config)")
    return settings


def write_config(path: Path, settings: dict) -> None:
    """The settings a run resolved, as YAML that `--config` reads back (atomically: never half a file)."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    with atomic_write(path, "w") as f:
        yaml.safe_dump(plain, f, sort_keys=False)
