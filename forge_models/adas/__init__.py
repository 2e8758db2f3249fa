"""ADAS over real agent configurations (phase 7b): a typed agent space around the final model, searched on
the validation split, with an optional LLM meta-agent whose code runs only in a sandbox.

- ``config``: :class:`AgentConfig` (experts / mixture, thought budget, tool loop and tools, decoding with
  self-consistency, answer extraction, prompt style; JSON round trip), the search space, search, sandbox
  and meta-agent configs;
- ``rules``: the extraction-rule and tool registries a config names;
- ``questions``: questions with checkable answers and :class:`HeldOutSplits`, which hands out the test split
  once and records every index handed out;
- ``client``: the model protocol (a stub in tests; :class:`ModelClient` over forge_models.generation);
- ``executor``: :func:`run_agent_config` with measured cost per question;
- ``fitness``: accuracy with the bootstrap median and 95% interval;
- ``search``: seed agents, the evolutionary proposer, the never-pruned archive, :func:`search` and
  :func:`final_comparison` (the test split, read once);
- ``sandbox`` / ``meta``: generated agent code in a limited subprocess; the OpenAI-compatible meta-agent.

See docs/adas.md.
"""

from forge_models.adas.client import Completion, ExpertApplier, GenerationClient, ModelClient, ToolRun
from forge_models.adas.config import (
    AgentConfig, Capabilities, MetaAgentConfig, SandboxConfig, SearchConfig, SearchSpace,
)
from forge_models.adas.executor import Answer, Cost, builtin_tool_loop, majority, run_agent_config
from forge_models.adas.fitness import Fitness, fitness_of, mean_cost, outcomes
from forge_models.adas.meta import CodeProposal, MetaAgent, MetaAgentError, OpenAIMetaAgent
from forge_models.adas.questions import (
    HeldOutSplits, Question, TestSplitAlreadyRead, is_correct, questions_from_examples,
)
from forge_models.adas.rules import EXTRACTORS, TOOLS
from forge_models.adas.sandbox import AgentCodeError, SandboxTimeout, check_agent_code, run_code_agent
from forge_models.adas.search import (
    PROPOSERS, ArchiveEntry, SearchResult, evolve_step, final_comparison, search, seed_agents,
)

__all__ = [
    "AgentConfig", "Capabilities", "MetaAgentConfig", "SandboxConfig", "SearchConfig", "SearchSpace",
    "Completion", "ExpertApplier", "GenerationClient", "ModelClient", "ToolRun", "Answer", "Cost",
    "builtin_tool_loop", "majority", "run_agent_config", "Fitness", "fitness_of", "mean_cost", "outcomes",
    "CodeProposal", "MetaAgent", "MetaAgentError", "OpenAIMetaAgent", "HeldOutSplits", "Question",
    "TestSplitAlreadyRead", "is_correct", "questions_from_examples", "EXTRACTORS", "TOOLS", "AgentCodeError",
    "SandboxTimeout", "check_agent_code", "run_code_agent", "PROPOSERS", "ArchiveEntry", "SearchResult",
    "evolve_step", "final_comparison", "search", "seed_agents",
]
