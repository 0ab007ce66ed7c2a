"""Visual-token pruning for VLMs (issue 7): policies (``fastervlm``, ``flowcut``, ``fastv``,
``randomprune``), vision adapters per architecture, and the runtime that rewrites the LM's input."""
