"""Phase 3 — Quiet-STaR (Zelikman et al. 2024): learned thought tokens generated in parallel at every
position, a mixing head, non-myopic talk loss and REINFORCE on the thoughts. See docs/phases/quietstar.md."""

from forge_models.quietstar.config import QuietStarConfig
from forge_models.quietstar.phase import QuietStarInputs, measure_thoughts, run
from forge_models.quietstar.thoughts import (
    END,
    START,
    THOUGHT_FILES,
    MixingHead,
    QuietStar,
    Streams,
    add_thought_tokens,
    advantages,
    attach_thoughts,
    block_mask,
    check_thought_ids,
    copy_thoughts,
    generate_ids,
    load_quietstar,
    quietstar_loss,
    read_thoughts,
    save_quietstar,
    sequential_hidden,
    stream_hidden,
    talk_targets,
    thought_logits,
)

__all__ = ["END", "START", "THOUGHT_FILES", "MixingHead", "QuietStar", "QuietStarConfig", "QuietStarInputs", "measure_thoughts", "run", "Streams", "add_thought_tokens",
           "advantages", "attach_thoughts", "block_mask", "check_thought_ids", "copy_thoughts", "read_thoughts", "generate_ids", "load_quietstar", "quietstar_loss", "save_quietstar",
           "sequential_hidden", "stream_hidden", "talk_targets", "thought_logits"]
