"""``--config FILE`` (YAML or TOML) for train, eval and serve: the keys are the command's flag names (``img-size``
or ``img_size``, ``no-pretrained``), the values what the flag takes (a switch takes true or false, a repeated flag
such as serve's ``adapter`` a list). Flags given on the command line win. A run folder's ``config.yaml`` (written by
every ``heartlora train``) is such a file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from heartlora.errors import ConfigError

SKIPPED = {"help", "config"}  # flags a config file cannot set
# The parsed arguments' attribute naming the settings a config file gave (their dests): where two flags exclude each
# other (serve's --adapter and --adapter-dir), the one given on the command line wins over the file's
FROM_FILE = "config_file_set"


def from_file(args: argparse.Namespace, dest: str) -> bool:
    """Whether ``args.<dest>`` came from the --config file, not the command line."""
    return dest in getattr(args, FROM_FILE, frozenset())


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a .yaml / .yml / .toml file (one-line errors for a missing, unreadable or malformed file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: check the path (a run folder's is config.yaml)")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(f"{p}: TOML needs Python 3.11 or the tomli package (pip install tomli); or "
                                      "write the file as YAML") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _load_yaml(text, p)
        else:
            raise ConfigError(f"config file {p}: name a .yaml, .yml or .toml file (its suffix says how to read it)")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text: save it as YAML or TOML text") from None
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError: the parser's own message, on one line
        where = " ".join(str(e).split())[:160]
        raise ConfigError(f"config file {p} is not valid {suffix[1:].upper()}: {where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of flag names to values (e.g. `epochs: 10`), not "
                          f"a {type(data).__name__}")
    return data


def _load_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` (no tags that build objects or run code) that refuses a key given twice in one mapping:
    YAML's own rule would keep the last silently."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: SafeLoader merges it below
                continue
            key = loader.construct_object(key_node)
            if key in seen:
                raise ConfigError(f"config file {path}: {key!r} is given twice; keep one")
            seen.add(key)
        return loader.construct_mapping(node)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return yaml.load(text, Loader=UniqueKeys)  # noqa: S506 (a SafeLoader subclass)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    table: dict[str, argparse.Action] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            name = opt[2:]
            if opt.startswith("--") and name not in SKIPPED:
                table[name] = table[name.replace("-", "_")] = action
    return table


def _typed(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    if isinstance(value, (dict, list)) or (isinstance(value, bool) and action.type in (int, float)):
        raise ConfigError(f"{where}: {key} takes one value, not {value!r}")
    if isinstance(value, bool) and action.type in (None, str):  # `task: true` would be the text "True"
        raise ConfigError(f"{where}: {key} takes text, not {str(value).lower()} (quote it if you mean the word)")
    try:
        value = action.type(str(value) if isinstance(value, (int, float)) else value) if callable(action.type) \
            else str(value)
    except argparse.ArgumentTypeError as exc:  # a range-checked flag's own one-line message
        raise ConfigError(f"{where}: {key}: {exc}") from None
    except (TypeError, ValueError):
        kind = getattr(action.type, "__name__", "value")
        raise ConfigError(f"{where}: {key} {value!r} is not a valid {kind}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {key} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _value(action: argparse.Action, key: str, value: Any, where: str) -> Any:
    if action.nargs == 0:  # a switch: true gives what the flag gives, false the opposite (or the default)
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} is a switch: give true or false, not {value!r}")
        if value:
            return action.const
        return (not action.const) if isinstance(action.const, bool) else action.default
    if isinstance(action, argparse._AppendAction):
        return [_typed(action, key, v, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, list) and action.type in (None, str):  # targets: [q, v] as the flag's q,v
        value = ",".join(str(v) for v in value)
    return _typed(action, key, value, where)


def apply_config(parser: argparse.ArgumentParser, path: str | Path, argv: list[str], command: str) -> None:
    """Make the file's values ``parser``'s defaults, except for flags given in ``argv`` (the command line wins);
    a required flag the file gives is no longer required."""
    where = f"config file {path}"
    table = _actions(parser)
    given = {tok.split("=", 1)[0] for tok in argv if tok.startswith("--")}
    defaults: dict[str, Any] = {}
    keys: dict[str, str] = {}  # action dest → the key that set it
    for key, value in read_config_file(path).items():
        action = table.get(str(key))
        if action is None:
            raise ConfigError(f"{where}: {key!r} is not a flag of heartlora {command}: the keys are its flag names "
                              f"(heartlora {command} --help)")
        if action.dest in keys:
            raise ConfigError(f"{where}: {keys[action.dest]!r} and {key!r} are the same flag; keep one")
        keys[action.dest] = str(key)
        if value is None or given & set(action.option_strings):
            continue
        defaults[action.dest] = _value(action, str(key), value, where)
        action.required = False
    parser.set_defaults(**defaults, **{FROM_FILE: frozenset(defaults)})


def find_config(argv: list[str]) -> str | None:
    """The FILE of ``--config FILE`` / ``--config=FILE`` in ``argv``, if any; two of them is one line (which would
    win is not obvious: files are not merged)."""
    found = []
    for i, tok in enumerate(argv):
        if tok == "--config" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif tok.startswith("--config="):
            found.append(tok.split("=", 1)[1])
    if len(found) > 1:
        raise ConfigError(f"--config is given {len(found)} times ({', '.join(found)}): give one file")
    return found[0] if found else None
