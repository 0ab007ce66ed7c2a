"""The VLM patcher: visual-token pruning before the language model (the policies are ``fastervlm``, ``flowcut``,
``fastv`` and ``randomprune`` in ``accel.policies``), vision adapters per architecture, and the runtime that rewrites
the LM's input."""
