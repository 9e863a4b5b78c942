"""A jinja2 sandbox for chat templates that refuses to build huge things.

Chat templates come from model files and registrations: code from strangers.
jinja2's immutable sandbox already keeps them away from Python's internals; this
one also keeps them from asking for unbounded work in a single step, which a time
limit cannot interrupt once it runs inside C (`'x' * 10**10`, `10**10**8`, a
`center(10**9)`). Every operator, call, filter and `~` concatenation that can
multiply sizes checks the size of what it would make first:

- strings and lists made by `*`, `+`, `%`, `~`, `join`, `replace`, `format`,
  `indent`, `wordwrap` and `expandtabs` are at most `max_chars` long (the
  caller's output cap), as estimated before they are built;
- integers stay below 2**4096 (`**` and `*` on huge numbers are refused);
- `range()` is at most 10,000 items, and integer arguments to filters and
  methods (widths, counts) at most 4,096.

Loops that each take small steps but run long are the time limit's job
(`bounded.py`).
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 10_000
MAX_INT_ARGUMENT = 4096
MAX_INT_BITS = 4096
#: A run of this many digits in a format string is a width or precision of a million or more.
_HUGE_WIDTH = re.compile(r"\d{7,}")
#: `{0:{1}}` and `%*s` take the width from an argument, where a format-string check cannot see it.
_WIDTH_FROM_ARGUMENT = re.compile(r"\{[^{}]*:[^{}]*\{|%[-+ #0]*\*")


class TemplateLimitError(SecurityError):
    """A template asked for more than the sandbox allows in one step."""


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def _text_size(value: Any) -> int:
    """About how long `value` is as text, without building that text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list | tuple):
        return 2 + sum(_text_size(item) + 2 for item in value)
    if isinstance(value, dict):
        return 2 + sum(_text_size(k) + _text_size(v) + 4 for k, v in value.items())
    return 32


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` compiles to a size-checked join on the environment instead of a bare `str_join`."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *, max_chars: int, **options: Any) -> None:
        super().__init__(**options)
        self.max_chars = max_chars
        self.globals["range"] = self._range
        self.globals.pop("lipsum", None)  # thousands of paragraphs on request; no template needs it
        self.concat = self.bounded_concat  # type: ignore[method-assign]

    def refuse(self, what: str) -> TemplateLimitError:
        return TemplateLimitError(f"the chat template asked for {what}, beyond the sandbox's limits")

    def _range(self, *args: int) -> range:
        numbers = range(*args)
        if len(numbers) > MAX_RANGE:
            raise self.refuse(f"range() of {len(numbers)} items (at most {MAX_RANGE})")
        return numbers

    def bounded_concat(self, parts: Any) -> str:
        pieces = [str(p) for p in parts]
        total = sum(len(p) for p in pieces)
        if total > self.max_chars:
            raise self.refuse(f"a string of {total} characters (at most {self.max_chars})")
        return "".join(pieces)

    def _check_length(self, length: int) -> None:
        if length > self.max_chars:
            raise self.refuse(f"a value of {length} characters or items (at most {self.max_chars})")

    def _check_int(self, value: Any) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
            raise self.refuse(f"an integer of {value.bit_length()} bits")

    def call_binop(self, context: Context, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "+":
            # the common case in chat templates ('<|im_start|>' + role + ...): keep it cheap
            if type(left) is str and type(right) is str:
                self._check_length(len(left) + len(right))
                return left + right
            left_size, right_size = _size(left), _size(right)
            if left_size is not None and right_size is not None:
                self._check_length(left_size + right_size)
            self._check_int(left)
            self._check_int(right)
        elif operator_name == "*":
            self._check_int(left)
            self._check_int(right)
            for seq, count in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(count, int):
                    self._check_length(size * count)
            both_ints = isinstance(left, int) and isinstance(right, int)
            if both_ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise self.refuse("a product of huge integers")
        elif operator_name == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * left.bit_length() > MAX_INT_BITS:
                    raise self.refuse(f"{left} ** {right}")
            elif isinstance(right, int | float) and abs(right) > MAX_INT_BITS:
                raise self.refuse(f"an exponent of {right}")
        elif operator_name == "%" and isinstance(left, str):
            arguments = right if isinstance(right, tuple) else (right,)
            if isinstance(right, dict):
                arguments = tuple(right.values())
            self._check_format(left, arguments, "%")
        return self.binop_table[operator_name](left, right)

    def _check_format(self, spec: str, arguments: tuple[Any, ...] = (), marker: str = "{") -> None:
        """A field may repeat an argument (`{0}{0}{0}`): count every field as the longest argument."""
        if _HUGE_WIDTH.search(spec):
            raise self.refuse("a format width or precision of a million or more")
        if _WIDTH_FROM_ARGUMENT.search(spec):
            raise self.refuse("a format width taken from an argument")
        if arguments:
            longest = max(_text_size(a) for a in arguments)
            self._check_length(len(spec) + spec.count(marker) * longest)

    def _check_lines(self, text: Any, lines: int, per_line: int) -> None:
        """`indent`, `wordwrap` and `expandtabs` add up to `per_line` characters `lines` times."""
        if isinstance(text, str):
            self._check_length(len(text) + lines * per_line)

    def check_arguments(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse huge counts and widths, and joins or replacements that would exceed the cap."""
        if target == self._range:  # capped by its length instead
            return
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT_ARGUMENT:
                raise self.refuse(f"an argument of {value} (at most {MAX_INT_ARGUMENT})")
        # the sandbox hands out str.format wrapped; the wrapper keeps the bound method
        method = getattr(target, "__wrapped__", target)
        name = getattr(method, "__name__", "")
        owner = getattr(method, "__self__", None)
        if name == "replace" and isinstance(owner, str) and len(args) >= 2:
            self._check_replace(owner, args[0], args[1])
        elif name == "join" and isinstance(owner, str) and args:
            self._check_join(owner, args[0])
        elif name == "format" and isinstance(owner, str):
            self._check_format(owner, (*args, *kwargs.values()))
        elif name == "format_map" and isinstance(owner, str) and args and isinstance(args[0], dict):
            self._check_format(owner, tuple(args[0].values()))
        elif name == "expandtabs" and isinstance(owner, str):
            size = args[0] if args else kwargs.get("tabsize", 8)
            self._check_lines(owner, owner.count("\t"), size if isinstance(size, int) else 8)

    def _check_replace(self, text: Any, old: Any, new: Any) -> None:
        if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
            hits = len(text) + 1 if not old else text.count(old)
            self._check_length(len(text) + hits * len(new))

    def _check_join(self, separator: Any, items: Any) -> None:
        if isinstance(items, list | tuple):
            sizes = [_size(item) or len(str(item)) for item in items]
            self._check_length(sum(sizes) + len(str(separator)) * max(len(sizes) - 1, 0))

    def set_filter(self, name: str, func: Any) -> None:
        """Add a filter with the same checks as the built-in ones."""
        self.filters[name] = _bounded_filter(self, name, func)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.check_arguments(__obj, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(env: BoundedSandbox, name: str, func: Any) -> Any:
    """Wrap a filter so its arguments are checked like a method call's, then its result's size."""
    pass_arg = getattr(func, "jinja_pass_arg", None)

    def bounded(*args: Any, **kwargs: Any) -> Any:
        # context/eval-context filters receive it first; the value is the next argument
        value_at = 1 if pass_arg is not None else 0
        value, rest = (args[value_at], args[value_at + 1 :]) if len(args) > value_at else (None, ())
        env.check_arguments(func, rest, kwargs)
        if name == "replace" and len(rest) >= 2:
            env._check_replace(value, rest[0], rest[1])
        elif name == "join" and isinstance(value, list | tuple):
            env._check_join(rest[0] if rest else kwargs.get("d", ""), value)
        elif name == "format" and isinstance(value, str):
            env._check_format(value, (*rest, *kwargs.values()), "%")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            env._check_lines(value, value.count("\n") + 1, per_line)
        elif name == "wordwrap" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 79)
            wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
            lines = len(value) // max(width if isinstance(width, int) else 1, 1) + value.count("\n") + 1
            env._check_lines(value, lines, len(wrap) if isinstance(wrap, str) else 1)
        result = func(*args, **kwargs)
        size = _size(result)
        if size is not None:
            env._check_length(size)
        return result

    if pass_arg is not None:
        bounded.jinja_pass_arg = pass_arg  # type: ignore[attr-defined]
    return bounded


def bounded_sandbox(*, max_chars: int, **options: Any) -> BoundedSandbox:
    """A sandbox whose filters are all size-checked as well."""
    env = BoundedSandbox(max_chars=max_chars, **options)
    for name, func in list(env.filters.items()):
        env.set_filter(name, func)
    return env
