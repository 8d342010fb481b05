"""Reading tool calls out of a reply's text as it streams.

A tool-call reply is ``{"name": <function>, "arguments": {...}}`` or a JSON array of such
objects (``parallel_tool_calls``); ``"parameters"`` is read as ``"arguments"`` (TGI's default
tool prompt asks for that key). :class:`ToolCallScanner` takes the text in pieces of any size,
one character at a time, and reports:

- :class:`CallStarted` once per call, when its name is complete (OpenAI's first
  ``delta.tool_calls`` entry: index, id, type, name);
- :class:`CallArguments`, the raw text of the call's arguments as it arrives (the later
  entries' ``function.arguments`` fragments; joined they are the arguments' JSON text);
- :class:`ReplyText`, when the reply is plain text after all: its first non-space character is
  not ``{`` or ``[`` (with ``tool_choice: "auto"``), or it ends without naming any call.

The non-streamed reply runs the same scanner over the whole text (:func:`read_tool_calls`), so
a streamed reply assembles to exactly the calls the non-streamed one answers;
:class:`StreamedCalls` turns the events into OpenAI's chunk deltas.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")
WHITESPACE = " \t\n\r"


@dataclass(frozen=True)
class CallStarted:
    index: int
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


@dataclass(frozen=True)
class ReplyText:
    text: str


Event = CallStarted | CallArguments | ReplyText


@dataclass
class _Call:
    """What is known of one call object while it streams."""

    index: int
    name: str | None = None
    pending: list[str] = field(default_factory=list)  # argument text read before the name
    any_arguments: bool = False


class ToolCallScanner:
    """An incremental reader of a tool-call reply (see the module doc).

    ``text_allowed``: a reply whose first non-space character is not ``{``/``[`` is plain text
    (``tool_choice: "auto"``); otherwise such a reply is still passed on as text, since it names
    no call, but only when it ends (:meth:`finish`).
    """

    def __init__(self, text_allowed: bool = True):
        self.text_allowed = text_allowed
        self.raw: list[str] = []  # everything read, for a reply that turns out to be text
        self.mode: str | None = None  # None (only spaces so far), "text", "object", "array", "done"
        self.depth = 0  # open containers
        self.in_string = False
        self.escape = False
        self.calls: list[_Call] = []
        self.started = 0  # calls whose CallStarted was reported
        self.call: _Call | None = None  # the call object being read
        self.call_depth = 0  # the depth inside that object
        # the member of the call object being read: its key, then its value
        self.key_chars: list[str] | None = None  # a key string being read
        self.key: str | None = None  # the key whose value comes (or is being read)
        self.value_chars: list[str] | None = None  # the raw text of that value, once it began
        self.value_depth = 0  # depth when the value began (its containers open past it)
        self.value_string = False  # the value is a JSON string

    # ------------------------------------------------------------------ reading

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not text:
            return events
        if self.mode == "text":
            return [ReplyText(text)]
        self.raw.append(text)
        for ch in text:
            if self.mode is None:
                if ch in WHITESPACE:
                    continue
                if ch == "{":
                    self.mode = "object"
                elif ch == "[":
                    self.mode = "array"
                elif self.text_allowed:
                    self.mode = "text"
                    events.append(ReplyText("".join(self.raw)))
                    self.raw.clear()
                    return events
                else:
                    self.mode = "done"  # not a call: passed on as text when the reply ends
                    return events
            if self.mode == "done":
                break
            self._char(ch, events)
        return events

    def finish(self) -> list[Event]:
        """The reply ended: calls that had no arguments get ``{}``; a reply that named no call is text."""
        if self.mode == "text":
            return []
        if self.started == 0:
            text = "".join(self.raw)
            self.raw.clear()
            return [ReplyText(text)] if text else []
        events: list[Event] = []
        for call in self.calls:
            if call.name is not None and not call.any_arguments:
                events.append(CallArguments(call.index, "{}"))
        return events

    @property
    def is_tool_reply(self) -> bool:
        """Whether a call has been reported (the reply's finish reason is ``tool_calls``)."""
        return self.started > 0

    # ------------------------------------------------------------------ one character

    def _char(self, ch: str, events: list[Event]) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
            self._in_member(ch, events, closing_string=not self.in_string)
            return
        if ch == '"':
            self.in_string = True
            self._in_member(ch, events, opening_string=True)
            return
        if ch in "{[":
            self.depth += 1
            if self.call is None and ch == "{" and self.depth == (1 if self.mode == "object" else 2):
                self.call = _Call(index=len(self.calls))
                self.calls.append(self.call)
                self.call_depth = self.depth
                return
            self._in_member(ch, events)
            return
        if ch in "}]":
            if self.call is not None and self.depth == self.call_depth:  # the call object closes
                self._end_value(events)
                self.call = None
            else:
                self._in_member(ch, events)
            self.depth -= 1
            if self.value_chars is not None and not self.value_string and self.depth == self.value_depth:
                self._end_value(events)  # a container value closed
            if self.depth == 0:
                self.mode = "done"
            return
        if self.call is not None and self.depth == self.call_depth and ch == ",":
            self._end_value(events)
            return
        if self.call is not None and self.depth == self.call_depth and ch == ":":
            return
        if ch in WHITESPACE and self.call is not None and self.depth == self.call_depth and self.value_chars is not None and not self.value_string:
            self._end_value(events)  # a number, true, false or null ended
            return
        self._in_member(ch, events)

    def _in_member(self, ch: str, events: list[Event], opening_string: bool = False, closing_string: bool = False) -> None:
        """``ch`` inside the call object's current member (key or value), if any."""
        if self.call is None:
            return
        at_member_level = self.depth == self.call_depth
        if at_member_level and self.value_chars is None and self.key is None:  # a key
            if opening_string:
                self.key_chars = ['"']
            elif self.key_chars is not None:
                self.key_chars.append(ch)
                if closing_string:
                    self.key = _decode("".join(self.key_chars))
                    self.key_chars = None
            return
        if self.key is None:
            return
        if self.value_chars is None:
            if ch in WHITESPACE:
                return
            self.value_chars = []
            self.value_depth = self.depth - (1 if ch in "{[" else 0)
            self.value_string = opening_string and at_member_level
        self.value_chars.append(ch)
        if self.key in ARGUMENT_KEYS and not self.value_string:
            self._arguments(ch, events)
        if closing_string and self.value_string and self.depth == self.call_depth:
            self._end_value(events)

    def _end_value(self, events: list[Event]) -> None:
        call, key, raw = self.call, self.key, self.value_chars
        self.key, self.value_chars, self.value_string = None, None, False
        if call is None or key is None or raw is None:
            return
        text = "".join(raw)
        if key == "name" and call.name is None:
            name = _decode(text)
            if isinstance(name, str) and name:
                call.name = name
                self._start(call, events)
        elif key in ARGUMENT_KEYS and text.startswith('"'):  # arguments given as a JSON string of JSON
            decoded = _decode(text)
            if isinstance(decoded, str):
                self._arguments(decoded, events)

    def _arguments(self, text: str, events: list[Event]) -> None:
        call = self.call
        assert call is not None
        call.any_arguments = True
        if call.name is None:
            call.pending.append(text)
        else:
            events.append(CallArguments(call.index, text))

    def _start(self, call: _Call, events: list[Event]) -> None:
        # calls are reported in order, and an index counts only calls that have names
        index = self.started
        self.started += 1
        events.append(CallStarted(index, call.name or ""))
        call.index = index
        if call.pending:
            events.append(CallArguments(index, "".join(call.pending)))
            call.pending.clear()


def _decode(raw: str) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass
class ToolCallText:
    """One call as read: its name and the text of its arguments."""

    name: str
    arguments: str


def apply_events(events: list[Event], calls: list[ToolCallText], text: list[str]) -> None:
    """Fold scanner events into whole calls and reply text."""
    for event in events:
        if isinstance(event, CallStarted):
            calls.append(ToolCallText(event.name, ""))
        elif isinstance(event, CallArguments):
            calls[event.index].arguments += event.text
        else:
            text.append(event.text)


def read_tool_calls(text: str, text_allowed: bool = True) -> tuple[list[ToolCallText], str | None]:
    """The calls in a whole reply, or its text when it holds none: ``(calls, content)``."""
    scanner = ToolCallScanner(text_allowed)
    calls: list[ToolCallText] = []
    content: list[str] = []
    apply_events(scanner.feed(text), calls, content)
    apply_events(scanner.finish(), calls, content)
    if calls:
        return calls, None
    return [], "".join(content)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StreamedCalls:
    """The chat chunk ``delta`` of each sequence's next text under a tool plan: plain ``content``, or
    ``tool_calls`` entries (the first of a call with its id, type and name, then argument
    fragments), read by a :class:`ToolCallScanner` per sequence."""

    def __init__(self, text_allowed: bool):
        self.text_allowed = text_allowed
        self.scanners: dict[int, ToolCallScanner] = {}
        self.ids: dict[tuple[int, int], str] = {}

    def called(self, index: int) -> bool:
        scanner = self.scanners.get(index)
        return scanner is not None and scanner.is_tool_reply

    def delta(self, index: int, text: str, finished: bool) -> dict[str, Any]:
        scanner = self.scanners.get(index)
        if scanner is None:
            scanner = self.scanners[index] = ToolCallScanner(self.text_allowed)
        events: list[Event] = scanner.feed(text)
        if finished:
            events += scanner.finish()
        content: list[str] = []
        entries: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ReplyText):
                content.append(event.text)
            elif isinstance(event, CallStarted):
                call_id = self.ids[(index, event.index)] = new_call_id()
                entries.append({"index": event.index, "id": call_id, "type": "function",
                                "function": {"name": event.name, "arguments": ""}})
            elif isinstance(event, CallArguments):
                if entries and entries[-1]["index"] == event.index:  # one entry per call and chunk
                    entries[-1]["function"]["arguments"] += event.text
                else:
                    entries.append({"index": event.index, "function": {"arguments": event.text}})
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = "".join(content)
        if entries:
            delta["tool_calls"] = entries
        return delta
