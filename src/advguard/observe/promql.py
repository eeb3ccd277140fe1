"""A small PromQL reader: which metric names, functions and ``__name__`` matchers a query
uses. Not an evaluator and not a full parser; it tokenizes the expression the way Prometheus
does (strings, label matchers, range brackets, numbers, durations, keywords) so that only
metric identifiers count as metrics: never function names, aggregation keywords, label names
in ``by (...)``/``on (...)``, label values in strings or Grafana variables such as
``$__rate_interval``. Syntax is checked by ``promtool`` in the tests; this module only names
things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from advguard.errors import InputError

AGGREGATORS = frozenset(
    {
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
FUNCTIONS = frozenset(
    {
        "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan",
        "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
        "cos", "cosh", "count_over_time", "day_of_month", "day_of_week", "day_of_year",
        "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing", "end",
        "exp", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
        "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum",
        "holt_winters", "hour", "idelta", "increase", "info", "irate", "label_join",
        "label_replace", "last_over_time", "ln", "log10", "log2", "mad_over_time",
        "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
        "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round",
        "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
        "sort_desc", "sqrt", "start", "stddev_over_time", "stdvar_over_time",
        "sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year",
    }
)  # fmt: skip
#: Keywords followed by a parenthesised list of label names.
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
OPERATOR_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2"})
NUMBER_WORDS = frozenset({"inf", "nan"})

_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_.]*")
_VARIABLE = re.compile(r"\$\{[^}\n]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[A-Za-z0-9_:.]+\]\]")
_MATCH_OP = re.compile(r"=~|!~|!=|=")


@dataclass
class References:
    """What one expression names."""

    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    #: ``(operator, value)`` of every ``__name__`` matcher, e.g. ``("=~", "slo:.+")``.
    name_matchers: list[tuple[str, str]] = field(default_factory=list)


def _string_end(text: str, i: int) -> int:
    """Index after the string literal starting at ``text[i]``."""
    quote = text[i]
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\" and quote != "`":
            j += 2
            continue
        if c == quote:
            return j + 1
        j += 1
    raise InputError(f"PromQL: unterminated string at offset {i}")


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    if literal[0] == "`":
        return body
    return re.sub(r"\\(.)", r"\1", body)


def _close(text: str, i: int, open_: str, close: str) -> int:
    """Index after the bracket matching ``text[i] == open_`` (strings skipped)."""
    depth = 0
    j = i
    while j < len(text):
        c = text[j]
        if c in "\"'`":
            j = _string_end(text, j)
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    raise InputError(f"PromQL: unbalanced {open_!r} at offset {i}")


def _skip_space(text: str, i: int) -> int:
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text[i] == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl + 1
        else:
            break
    return i


def _matchers(text: str, i: int, refs: References) -> int:
    """Read a ``{...}`` label-matcher block starting at ``text[i] == '{'``."""
    end = _close(text, i, "{", "}")
    j = _skip_space(text, i + 1)
    while j < end - 1:
        if text[j] in "\"'`":  # a quoted metric name (Prometheus 3 UTF-8 names)
            k = _string_end(text, j)
            refs.metrics.add(_unquote(text[j:k]))
            j = k
        else:
            m = _LABEL.match(text, j)
            if m is None:
                raise InputError(f"PromQL: expected a label name at offset {j}")
            label = m.group()
            j = _skip_space(text, m.end())
            op = _MATCH_OP.match(text, j)
            if op is None or text[_skip_space(text, op.end())] not in "\"'`":
                raise InputError(f'PromQL: expected a matcher like {label}="value"')
            k0 = _skip_space(text, op.end())
            k = _string_end(text, k0)
            if label == "__name__":
                value = _unquote(text[k0:k])
                if op.group() == "=":
                    refs.metrics.add(value)
                else:
                    refs.name_matchers.append((op.group(), value))
            j = k
        j = _skip_space(text, j)
        if j < end - 1 and text[j] == ",":
            j = _skip_space(text, j + 1)
        elif j < end - 1:
            raise InputError(f"PromQL: expected ',' or '}}' at offset {j}")
    return end


def references(expr: str) -> References:
    """The metrics, functions and ``__name__`` matchers of a PromQL expression (Grafana
    variables allowed); :class:`InputError` on text that cannot be tokenized."""
    refs = References()
    i = 0
    n = len(expr)
    while i < n:
        i = _skip_space(expr, i)
        if i >= n:
            break
        c = expr[i]
        if c in "\"'`":
            i = _string_end(expr, i)
        elif c == "{":
            i = _matchers(expr, i, refs)
        elif c == "[" and not expr.startswith("[[", i):
            i = _close(expr, i, "[", "]")  # range, subquery or offset duration
        elif (var := _VARIABLE.match(expr, i)) is not None:
            i = var.end()
        elif (num := _NUMBER.match(expr, i)) is not None and (c.isdigit() or c == "."):
            i = num.end()
        elif (ident := _IDENT.match(expr, i)) is not None:
            i = _identifier(expr, ident.group(), ident.end(), refs)
        else:
            i += 1  # operators and punctuation
    return refs


def _identifier(expr: str, word: str, end: int, refs: References) -> int:
    nxt = _skip_space(expr, end)
    follows_paren = nxt < len(expr) and expr[nxt] == "("
    low = word.lower()
    if low in LABEL_LIST_KEYWORDS:
        return _close(expr, nxt, "(", ")") if follows_paren else end
    if low in OPERATOR_KEYWORDS or low in NUMBER_WORDS:
        return end
    if follows_paren or word in AGGREGATORS:
        refs.functions.add(word)
        return end
    refs.metrics.add(word)
    return end


_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$", re.S)
_LABEL_NAMES = re.compile(r"^\s*label_names\((.*)\)\s*$", re.S)


def variable_query_references(query: str) -> References:
    """References of a Grafana Prometheus variable query: ``label_values(selector, label)``,
    ``label_names(selector)``, ``query_result(expr)`` or ``metrics(regex)`` (the regex is
    returned as a ``=~`` name matcher)."""
    m = _LABEL_VALUES.match(query) or _LABEL_NAMES.match(query)
    if m is not None:
        return references(m.group(1))
    m = re.match(r"^\s*query_result\((.*)\)\s*$", query, re.S)
    if m is not None:
        return references(m.group(1))
    m = re.match(r"^\s*metrics\((.*)\)\s*$", query, re.S)
    if m is not None:
        return References(name_matchers=[("=~", m.group(1).strip())])
    raise InputError(f"not a Grafana Prometheus variable query: {query[:80]!r}")


__all__ = [
    "AGGREGATORS",
    "FUNCTIONS",
    "References",
    "references",
    "variable_query_references",
]
