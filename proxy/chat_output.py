"""One choice of a chat completion, from engine text to OpenAI's message or stream deltas.

The output parser (``model_runner.response_parsing``) splits the text into content, reasoning
(``reasoning_content``, as vLLM and DeepSeek's API spell it) and tool calls; this module shapes
them: ``message.tool_calls`` with ``finish_reason: "tool_calls"``, and in a stream the deltas
the OpenAI SDK assembles (a call's index, id and name first, then its argument fragments).
With ``parallel_tool_calls: false`` only the first call is kept. A choice cut off by max_tokens
ends with ``length`` and claims no call: whatever it wrote is content. The legacy ``functions``
spelling gets ``function_call`` and ``finish_reason: "function_call"``.
"""

from __future__ import annotations

from model_runner.records import FinishReason, TextDelta
from model_runner.response_parsing import (
    ContentDelta,
    OutputParser,
    ParsedMessage,
    ParseEvent,
    ReasoningDelta,
    ToolCallArguments,
    ToolCallStart,
)
from proxy.chat_plan import ChatPlan
from proxy.logprobs import LogprobFormatter
from proxy.responses import (
    AssistantMessage,
    ChatDelta,
    ChatLogprobs,
    FunctionCallDelta,
    FunctionCallOut,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
)


class ChoiceOutput:
    def __init__(
        self, index: int, plan: ChatPlan, parser: OutputParser, logprobs: LogprobFormatter | None
    ) -> None:
        self.index = index
        self._plan = plan
        self._parser = parser
        self._logprobs = logprobs
        self._text: list[str] = []
        self._entries: list[TokenLogprobOut] = []
        self._parsed: ParsedMessage | None = None
        self.finish_reason: str | None = None

    # -- streaming -------------------------------------------------------------------------------

    def feed(self, delta: TextDelta) -> tuple[ChatDelta | None, ChatLogprobs | None]:
        """The stream delta for one engine ``TextDelta`` (``None`` when it holds nothing yet)."""
        self._text.append(delta.text)
        logprobs = None
        if self._logprobs is not None and delta.logprobs:
            entries = self._logprobs.chat(delta.logprobs)
            self._entries.extend(entries)
            logprobs = ChatLogprobs(content=entries)
        return self._delta(self._parser.feed(delta.text) if delta.text else []), logprobs

    def finish(self, reason: FinishReason) -> ChatDelta | None:
        """The engine finished this choice: the parser's last events as a delta; sets
        ``finish_reason``."""
        parsed, events = self._parser.finish()
        self._parsed = parsed
        self.finish_reason = self._reason(reason, parsed)
        return self._delta(events)

    def _reason(self, reason: FinishReason, parsed: ParsedMessage) -> str:
        if reason == "stop" and parsed.tool_calls:
            return "function_call" if self._plan.legacy_functions else "tool_calls"
        return "length" if reason == "length" else "stop"

    def _delta(self, events: list[ParseEvent]) -> ChatDelta | None:
        content: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, ToolCallDelta] = {}
        for event in events:
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ToolCallStart) and self._keeps(event.index):
                calls[event.index] = ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=FunctionCallDelta(name=event.name),
                )
            elif isinstance(event, ToolCallArguments) and self._keeps(event.index):
                if event.index in calls:
                    fn = calls[event.index].function
                    fn.arguments = (fn.arguments or "") + event.fragment
                else:
                    calls[event.index] = ToolCallDelta(
                        index=event.index, function=FunctionCallDelta(arguments=event.fragment)
                    )
        if not (content or reasoning or calls):
            return None
        delta = ChatDelta(content="".join(content) or None, reasoning_content="".join(reasoning) or None)
        if calls:
            ordered = [calls[i] for i in sorted(calls)]
            if self._plan.legacy_functions:
                delta.function_call = ordered[0].function
            else:
                delta.tool_calls = ordered
        return delta

    def _keeps(self, call_index: int) -> bool:
        return self._plan.parallel_tool_calls or call_index == 0

    # -- the whole message -----------------------------------------------------------------------

    def message(self) -> AssistantMessage:
        """After ``finish``: the assistant message of a non-streamed response."""
        parsed = self._parsed
        if parsed is None:
            raise RuntimeError("message() before finish()")
        calls = list(parsed.tool_calls)
        if not self._plan.parallel_tool_calls:
            calls = calls[:1]
        content = parsed.content
        if self.finish_reason == "length" and calls:
            # Cut off: claim no call; what the model wrote stays visible as text.
            content, calls = "".join(self._text), []
        message = AssistantMessage(content=content, reasoning_content=parsed.reasoning)
        if calls and self._plan.legacy_functions:
            message.function_call = FunctionCallOut(name=calls[0].name, arguments=calls[0].arguments)
        elif calls:
            message.tool_calls = [
                ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                for c in calls
            ]
        return message

    def logprobs(self) -> ChatLogprobs | None:
        return ChatLogprobs(content=self._entries) if self._logprobs is not None else None
