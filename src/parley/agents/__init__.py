"""Named agents: instructions and the tools each may use, built once at startup on the
configured model. The default is `assistant`, a general assistant with every built-in tool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from parley.agents.runner import ChatAgent
from parley.errors import InvalidMessage
from parley.llm import LLMManager
from parley.tools import ToolRegistry

DEFAULT_AGENT = "assistant"

ASSISTANT_INSTRUCTIONS = """\
You are a helpful assistant inside a chat application. Answer clearly and concisely.
Use the `calculator` tool for any arithmetic instead of computing in your head, the
`current_time` tool when asked about the date or time, and the `search_history` tool when the
user refers to something they said earlier. If a tool returns an error, explain it briefly.
"""


@dataclass(frozen=True)
class AgentSpec:
    name: str
    instructions: str
    # The tools this agent may call; None means every registered tool.
    tools: Sequence[str] | None = None


DEFAULT_AGENTS = (
    AgentSpec(
        name=DEFAULT_AGENT,
        instructions=ASSISTANT_INSTRUCTIONS,
        tools=None,
    ),
)


class AgentRegistry:
    def __init__(self, specs: Sequence[AgentSpec], *, llm: LLMManager, tools: ToolRegistry):
        if not specs:
            raise ValueError("at least one agent is required")
        self._agents: dict[str, ChatAgent] = {}
        for spec in specs:
            self._agents[spec.name] = ChatAgent(
                name=spec.name,
                instructions=spec.instructions,
                toolset=tools.toolset(tools.names if spec.tools is None else spec.tools),
                llm=llm,
            )

    @property
    def names(self) -> list[str]:
        return sorted(self._agents)

    def get(self, name: str | None) -> tuple[str, ChatAgent]:
        chosen = name or DEFAULT_AGENT
        agent = self._agents.get(chosen)
        if agent is None:
            raise InvalidMessage(
                f"field 'agent': unknown agent {chosen!r}; available: {', '.join(self.names)}"
            )
        return chosen, agent
