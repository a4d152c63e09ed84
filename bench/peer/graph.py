"""The peer's graph: one node that answers with the benchmark's scripted model.

The same work as a Parley run: the thread's last 20 messages go to the model through
ChatOpenAI (streaming), and the answer is appended to the thread's state.
"""

import os

from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph

HISTORY_MESSAGES = 20

model = ChatOpenAI(
    model="bench-model",
    base_url=os.environ["BENCH_MODEL_URL"],
    api_key="bench",
    streaming=True,
    max_retries=1,
)


async def agent(state: MessagesState) -> dict[str, list[object]]:
    reply = await model.ainvoke(state["messages"][-HISTORY_MESSAGES:])
    return {"messages": [reply]}


graph = StateGraph(MessagesState).add_node("agent", agent).add_edge(START, "agent").compile()
