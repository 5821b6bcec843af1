"""Read the YAML file into `Settings`, with errors that name each bad field's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.schema import SKIP_UNSET_SECRETS, Settings

__all__ = ["ConfigError", "load_settings", "parse_settings"]


class ConfigError(Exception):
    """The config could not be used; `problems` holds one `path: message` line per fault."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"invalid config {source}:\n  " + "\n  ".join(problems))


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and part.startswith("<"):
            continue  # a union's tag (schema.PRICE_SHEET): a form of the value, not a field
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _message(error: Any) -> str:
    msg = str(error["msg"])
    # pydantic prefixes messages raised by our validators with "Value error, ".
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if error["type"] == "extra_forbidden":
        msg = "unknown field"
    return msg


def parse_settings(
    data: Any, source: str = "<config>", *, require_secrets: bool = True
) -> Settings:
    """Validate already-parsed YAML data into an immutable `Settings` snapshot.

    A secret variable the config names (`api_key_env`, `store.url_env`, `secret_env`,
    `token_env`) that is not set is an error, unless `require_secrets` is false: then it is
    left unread and `Settings.unset_secrets()` lists it. That is for checking a file
    (`check-config`) where the secrets are not at hand; such a snapshot must not be served."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping of sections"])
    try:
        context = None if require_secrets else {SKIP_UNSET_SECRETS: True}
        return Settings.model_validate(data, context=context)
    except ValidationError as exc:
        problems = [f"{_path(tuple(e['loc']))}: {_message(e)}" for e in exc.errors()]
        raise ConfigError(source, problems) from None


def load_settings(path: str | Path, *, require_secrets: bool = True) -> Settings:
    """Read and validate the config file at `path` (`require_secrets`: as `parse_settings`)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"(file): cannot read: {exc.strerror or exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise ConfigError(source, [f"{where}: not valid YAML: {exc}"]) from None
    return parse_settings(data, source, require_secrets=require_secrets)
