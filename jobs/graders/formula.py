"""multi's calculate_output: an arithmetic formula over sub-grader scores, evaluated with simpleeval."""

from __future__ import annotations

import ast
import math

from simpleeval import InvalidExpression, SimpleEval

FUNCTIONS = {"min": min, "max": max, "abs": abs, "round": round}


def evaluate(formula: str, scores: dict[str, float]) -> float:
    """The formula's value; raises for a formula that fails on these scores (e.g. division by zero)."""
    value = SimpleEval(names=dict(scores), functions=FUNCTIONS).eval(formula)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"calculate_output gave {value!r}, not a finite number")
    return float(value)


def check_formula(formula: str, names: list[str]) -> None:
    """At load: the formula parses, uses only these names and the allowed functions, and evaluates."""
    try:
        tree = ast.parse(formula.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not a formula ({e.msg}): {formula!r}") from None
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    unknown = sorted(used - set(names) - set(FUNCTIONS))
    if unknown:
        raise ValueError(
            f"unknown name(s) {', '.join(unknown)}; the graders are {', '.join(names)} "
            f"and the functions {', '.join(FUNCTIONS)}"
        )
    try:
        evaluate(formula, dict.fromkeys(names, 0.5))
    except ArithmeticError:
        pass  # may divide by a score that is 0.5 here; decided per sample
    except (InvalidExpression, ValueError, TypeError) as e:
        raise ValueError(f"{formula!r} cannot be evaluated: {e}") from None
