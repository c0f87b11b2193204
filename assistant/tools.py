"""Tools the agent can use, behind one small interface.

In: a `ToolContext` (who is asking) and the tool's arguments (a dict, as a model's tool call or the
router gives them). Out: a `ToolResult`: short text for the prompt (quoted as data by the agent),
plus the sources and memories it touched, so the answer can cite them. `Toolbox.run` checks the
arguments against the tool's JSON schema, times the call and returns the step record
(`tool, args, result, ms`) that is stored with the message.

Tools: search_documents, remember, recall, forget (the user's own memories and documents only: the
user comes from the context, never from the arguments), calculator (arithmetic through `ast`, never
`eval`) and current_datetime.
"""

from __future__ import annotations

import ast
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from memory.knowledge import Hit, KnowledgeBase
from memory.longterm import LongTermMemory, extract_facts
from memory.types import User

STEP_RESULT_CHARS = 200


class ToolError(ValueError):
    """A tool call that cannot run (unknown tool, bad arguments, bad expression); the message says why."""


@dataclass(frozen=True)
class ToolContext:
    user: User


@dataclass
class ToolResult:
    text: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    memories: list[dict[str, Any]] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)  # search_documents: the passages themselves


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult: ...


def schema(tool: Tool) -> dict[str, Any]:
    """The tool as chat templates and OpenAI-compatible servers expect it."""
    return {"type": "function",
            "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters}}


def _params(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "integer": int, "number": (int, float),
                                                   "boolean": bool}


def check_args(tool: Tool, args: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise ToolError(f"{tool.name}: arguments must be an object, got {type(args).__name__}")
    props = tool.parameters.get("properties", {})
    missing = [k for k in tool.parameters.get("required", []) if k not in args]
    if missing:
        raise ToolError(f"{tool.name}: missing argument(s) {missing}")
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise ToolError(f"{tool.name}: unknown argument(s) {unknown}")
    for k, v in args.items():
        want = _JSON_TYPES[props[k]["type"]]
        if not isinstance(v, want) or (isinstance(v, bool) and props[k]["type"] != "boolean"):
            raise ToolError(f"{tool.name}: argument {k!r} must be {props[k]['type']}, got {type(v).__name__}")
    return args


# ---------------------------------------------------------------------------------------- calculator
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan, "log": math.log, "log10": math.log10,
    "log2": math.log2, "exp": math.exp, "abs": abs, "round": round, "min": min, "max": max, "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
MAX_EXPRESSION = 200
MAX_MAGNITUDE = 1e100


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic safely: numbers, + - * / // % ** (^ too), parentheses, a few math functions."""
    if not isinstance(expression, str) or not expression.strip():
        raise ToolError("calculator: empty expression")
    if len(expression) > MAX_EXPRESSION:
        raise ToolError(f"calculator: expression longer than {MAX_EXPRESSION} characters")
    src = expression.replace("^", "**").replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(src.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"calculator: not an arithmetic expression: {expression!r}") from exc

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name) and node.id in _CONSTS:
            return _CONSTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 1000 or (abs(left) > 1e6 and abs(right) > 10)):
                raise ToolError("calculator: exponent too large")
            try:
                out = _BINOPS[type(node.op)](left, right)
            except ZeroDivisionError as exc:
                raise ToolError("calculator: division by zero") from exc
            except OverflowError as exc:
                raise ToolError("calculator: result too large") from exc
            if isinstance(out, complex):
                raise ToolError("calculator: the result is not a real number")
            if abs(out) > MAX_MAGNITUDE:
                raise ToolError("calculator: result too large")
            return out
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
                and not node.keywords and 0 < len(node.args) <= 8):
            try:
                return _FUNCS[node.func.id](*[ev(a) for a in node.args])
            except (ValueError, OverflowError, TypeError) as exc:
                raise ToolError(f"calculator: {node.func.id}: {exc}") from exc
        raise ToolError(f"calculator: {type(node).__name__} is not allowed in {expression!r}")

    value = ev(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return round(value, 12) if isinstance(value, float) else value


class Calculator:
    name = "calculator"
    description = "Evaluate an arithmetic expression, e.g. '12 * (3 + 4) / 5' or 'sqrt(2) ^ 2'."
    parameters = _params({"expression": {"type": "string", "description": "the expression"}}, ["expression"])

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        return ToolResult(f"{args['expression']} = {calculate(args['expression'])}")


# ---------------------------------------------------------------------------------------- date/time
class CurrentDateTime:
    name = "current_datetime"
    description = "The current date, time, weekday and time zone of the server."
    parameters = _params({}, [])

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or (lambda: datetime.now().astimezone())

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        now = self.clock()
        return ToolResult(f"{now:%A, %d %B %Y, %H:%M} ({now.tzname() or 'local time'}; ISO {now.isoformat()})")


# ---------------------------------------------------------------------------------------- documents
class SearchDocuments:
    name = "search_documents"
    description = "Search the user's own and the team's shared documents; returns the most relevant passages."
    parameters = _params({"query": {"type": "string", "description": "what to look for"}}, ["query"])

    def __init__(self, knowledge: KnowledgeBase, k: int) -> None:
        self.knowledge = knowledge
        self.k = k

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        hits = self.knowledge.search(ctx.user, args["query"], k=self.k)
        sources = [h.as_source() for h in hits]
        titles = "; ".join(f"{h.title} ({h.chunk_id})" for h in hits)
        return ToolResult(f"{len(hits)} passages: {titles}" if hits else "no matching passages", sources=sources,
                          hits=hits)


# ---------------------------------------------------------------------------------------- memory
class Remember:
    name = "remember"
    description = "Remember a fact or preference about the user for future conversations."
    parameters = _params({"text": {"type": "string", "description": "the fact, in the user's words"}}, ["text"])

    def __init__(self, memories: LongTermMemory) -> None:
        self.memories = memories

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        found = extract_facts("remember that " + args["text"])
        if found:
            done = self.memories.remember_candidate(ctx.user.id, found[0])
        else:
            done = self.memories.remember(ctx.user.id, args["text"], kind="note")
        note = {"added": "remembered", "duplicate": "already remembered", "superseded": "updated"}[done.action]
        replaced = f" (replaces: {'; '.join(m.text for m in done.replaced)})" if done.replaced else ""
        return ToolResult(f"{note}: {done.memory.text}{replaced}", memories=[done.memory.as_prompt_item()])


class Recall:
    name = "recall"
    description = "Look up what you remember about the user that is relevant to a topic."
    parameters = _params({"query": {"type": "string", "description": "the topic"}}, ["query"])

    def __init__(self, memories: LongTermMemory, k: int) -> None:
        self.memories = memories
        self.k = k

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        got = self.memories.recall(ctx.user.id, args["query"], k=self.k)
        items = [r.memory.as_prompt_item() for r in got]
        return ToolResult(f"{len(items)} memories" if items else "nothing remembered about that", memories=items)


class Forget:
    name = "forget"
    description = "Forget what you remember about the user on a topic (e.g. 'my name'), when the user asks."
    parameters = _params({"what": {"type": "string", "description": "what to forget"}}, ["what"])

    def __init__(self, memories: LongTermMemory) -> None:
        self.memories = memories

    def run(self, ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        gone = self.memories.forget_matching(ctx.user.id, args["what"])
        if not gone:
            return ToolResult(f"nothing remembered matches {args['what']!r}")
        return ToolResult(f"forgot {len(gone)} memor{'y' if len(gone) == 1 else 'ies'}")


# ---------------------------------------------------------------------------------------- the box
def _short(text: str, limit: int = STEP_RESULT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Toolbox:
    """Tools by name; runs one call and returns its result and its step record."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = {t.name: t for t in tools}

    def schemas(self) -> list[dict[str, Any]]:
        return [schema(t) for t in self.tools.values()]

    def run(self, ctx: ToolContext, name: str, args: Any) -> tuple[ToolResult, dict[str, Any]]:
        """Run a tool. Bad calls become an error result (the model may try again), never an exception."""
        started = time.perf_counter()
        tool = self.tools.get(name)
        try:
            if tool is None:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(self.tools)}")
            result = tool.run(ctx, check_args(tool, args))
            error = None
        except (ToolError, LookupError, ValueError) as exc:
            result, error = ToolResult(f"error: {exc}"), str(exc)
        step = {"tool": name, "args": args if isinstance(args, dict) else {"raw": str(args)},
                "result": _short(result.text), "ms": round((time.perf_counter() - started) * 1000, 1)}
        if error is not None:
            step["error"] = _short(error)
        return result, step


def default_tools(knowledge: KnowledgeBase, memories: LongTermMemory, retrieval_k: int, memory_k: int,
                  clock: Callable[[], datetime] | None = None) -> Toolbox:
    return Toolbox([SearchDocuments(knowledge, retrieval_k), Remember(memories), Recall(memories, memory_k),
                    Forget(memories), Calculator(), CurrentDateTime(clock)])
