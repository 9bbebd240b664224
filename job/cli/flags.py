"""Command-line flags generated from the pydantic option models, so a new option needs no new flag.

Each field becomes ``--field-name`` with the field's description as help, its default shown by
``ArgumentDefaultsHelpFormatter``, enums as ``choices`` and ``int | Literal[...]`` fields (``pitch``)
accepting either. Values are validated by the model itself: a bad value is ``options.invalid``.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from shared.errors import CoverError, ErrorCode

M = TypeVar("M", bound=BaseModel)


def _parser_for(annotation: Any) -> tuple[Callable[[str], Any], list[str] | None]:
    """(argparse ``type``, ``choices``) for a field's annotation."""
    if typing.get_origin(annotation) is typing.Annotated:  # constraints are the model's to check
        return _parser_for(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    args = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _parser_for(args[0])
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return str, [member.value for member in annotation]
    if origin in (typing.Union, types.UnionType):
        words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        number = next((a for a in args if a in (int, float)), None)
        if words and number is not None:

            def word_or_number(text: str) -> Any:
                if text in words:
                    return text
                try:
                    return number(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"expected a number or one of {', '.join(words)}") from None

            return word_or_number, None
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    title: str,
    exclude: Iterable[str] = (),
    rename: dict[str, str] | None = None,
) -> None:
    """One flag per field of ``model`` (``rename`` maps a field to another flag name).

    Args:
        parser: the (sub)command's parser the flags go on
        model: the pydantic options model whose fields become flags (descriptions as help, defaults shown)
        title: the heading of the flags' group in ``--help``
        exclude: fields that get no flag
        rename: a field's flag name where it differs from the field's
    """
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        kind, choices = _parser_for(field.annotation)
        default = None if field.default is PydanticUndefined else field.default
        if isinstance(default, enum.Enum):
            default = default.value
        flag = (rename or {}).get(name, name)
        if field.annotation is bool:  # --name / --no-name
            group.add_argument(
                "--" + flag.replace("_", "-"),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=field.description or name.replace("_", " "),
            )
            continue
        group.add_argument(
            "--" + flag.replace("_", "-"),
            dest=name,
            type=kind,
            choices=choices,
            default=default,
            metavar=None if choices else flag.upper(),
            help=field.description or name.replace("_", " "),
        )


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or False, or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # `is`, not `in`: 0 == False, and a default of 0 (pitch, seed, gains) is worth showing
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def model_from_args(model: type[M], args: argparse.Namespace, exclude: Iterable[str] = ()) -> M:
    values = {name: getattr(args, name) for name in model.model_fields if name not in exclude and hasattr(args, name)}
    try:
        return model(**values)
    except ValidationError as exc:
        raise CoverError(ErrorCode.OPTIONS_INVALID, _in_our_words(exc)) from None


def _in_our_words(exc: ValidationError) -> str:
    """One line per flag, in the flag's name, without pydantic's inner names: a value that may be
    a number or a word (``--pitch``) is reported by the number's rule, once."""
    said: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "options"
        branch = str(error["loc"][1]) if len(error["loc"]) > 1 else ""
        if field in said and not branch.startswith(("int", "float")):
            continue
        message = str(error["msg"]).removeprefix("Value error, ")  # our own validators' words, as they are
        message = message[:1].lower() + message[1:]
        said[field] = f"--{field.replace('_', '-')} {error.get('input')!s}: {message}"
    return "; ".join(said.values())
